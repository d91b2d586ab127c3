"""One .safetensors file round-trips converted and folded models, and fails cleanly."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import sdsurgery
from sdsurgery.checkpoint import CheckpointError


def _converted(**kw):
    model = sdsurgery.create_model("timm:resnet18", pretrained=False, num_classes=10)
    return sdsurgery.convert(model, seed=4, **kw)


def test_converted_model_round_trips(tmp_path):
    model = _converted(drop_rate=0.3, mode="sample", exclude="layer1.*")
    path = sdsurgery.save(model, tmp_path / "m.safetensors")
    meta = sdsurgery.read_metadata(path)
    assert meta["model"] == {"spec": "timm:resnet18", "num_classes": 10, "kwargs": {}}
    assert meta["converted"] and not meta["folded"]
    sd = meta["stochastic_depth"]
    assert (sd["drop_rate"], sd["mode"], sd["scaling"], sd["seed"], sd["exclude"]) == (0.3, "sample", "expectation", 4, "layer1.*")
    loaded = sdsurgery.load(path)
    assert type(loaded) is type(model)
    assert [(g.name, g.drop_prob) for g in sdsurgery.gates(loaded)] == \
           [(g.name, g.drop_prob) for g in sdsurgery.gates(model)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_custom_schedule_round_trips(tmp_path):
    model = sdsurgery.convert(sdsurgery.create_model("models:CustomNet"), schedule=[0.1, 0.0, 0.3, 0.2])
    loaded = sdsurgery.load(sdsurgery.save(model, tmp_path / "c.safetensors"))
    assert [g.drop_prob for g in sdsurgery.gates(loaded)] == pytest.approx([0.1, 0.0, 0.3, 0.2])


def test_folded_file_loads_without_sdsurgery(tmp_path):
    folded = sdsurgery.fold(_converted())
    path = sdsurgery.save(folded, tmp_path / "f.safetensors")
    assert sdsurgery.read_metadata(path)["folded"]
    plain = timm.create_model("resnet18", num_classes=10)
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), folded.eval()(x))
    assert not sdsurgery.is_converted(sdsurgery.load(path))


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model = _converted()
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous good checkpoint")
    import safetensors.torch

    def broken(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        sdsurgery.save(model, path)
    assert path.read_bytes() == b"previous good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        sdsurgery.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        sdsurgery.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="without sdsurgery metadata; .*--weights"):
        sdsurgery.load(foreign)
    # right metadata, wrong tensors
    meta = sdsurgery.read_metadata(sdsurgery.save(_converted(), tmp_path / "ok.safetensors"))
    meta["model"]["spec"] = "timm:resnet34"
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(tmp_path / "ok.safetensors")), str(bad), metadata={"sdsurgery": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="does not fit ResNet: keys missing"):
        sdsurgery.load(bad)
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        sdsurgery.save(_converted(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        sdsurgery.save(_converted(), tmp_path / "no" / "dir" / "m.safetensors")


def test_models_without_a_source_need_a_spec(tmp_path):
    from models import CustomNet
    with pytest.raises(CheckpointError, match="pass spec="):
        sdsurgery.save(sdsurgery.convert(CustomNet()), tmp_path / "x.safetensors")
    path = sdsurgery.save(sdsurgery.convert(CustomNet()), tmp_path / "x.safetensors", spec="models:CustomNet")
    assert len(sdsurgery.gates(sdsurgery.load(path))) == 4


def test_the_example_size_of_rewritten_size_branching_blocks_round_trips(tmp_path):
    x = torch.randn(2, 3, 4, 4)
    model = sdsurgery.convert(sdsurgery.create_model("models:SizeNet"), seed=1, example=x)
    path = sdsurgery.save(model, tmp_path / "s.safetensors")
    assert sdsurgery.read_metadata(path)["stochastic_depth"]["example_shape"] == [2, 3, 4, 4]
    loaded = sdsurgery.load(path)
    assert "forward" in loaded.blocks[0].__dict__
    calls = []
    loaded.blocks[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    sdsurgery.gates(loaded)[-1].drop_prob = 0.999999
    with torch.no_grad():
        loaded.train()(torch.randn(3, 3, 4, 4))  # the example's sizes: the dropped MLP is skipped
    assert calls == []
