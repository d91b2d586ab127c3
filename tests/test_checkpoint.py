"""One .safetensors file round-trips converted and folded models, and fails cleanly."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import sdsurgery
from sdsurgery.io.checkpoint import CheckpointError


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
    loaded = sdsurgery.load(sdsurgery.save(model, tmp_path / "c.safetensors"), factory="models:CustomNet")
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
    with pytest.raises(CheckpointError, match="cannot write .*m.safetensors: OSError: disk full"):
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
    assert len(sdsurgery.gates(sdsurgery.load(path, trust_code=True))) == 4


def test_the_example_size_of_rewritten_size_branching_blocks_round_trips(tmp_path):
    x = torch.randn(2, 3, 4, 4)
    model = sdsurgery.convert(sdsurgery.create_model("models:SizeNet"), seed=1, example=x)
    path = sdsurgery.save(model, tmp_path / "s.safetensors")
    assert sdsurgery.read_metadata(path)["stochastic_depth"]["example_shape"] == [2, 3, 4, 4]
    loaded = sdsurgery.load(path, factory="models:SizeNet")
    assert "forward" in loaded.blocks[0].__dict__
    calls = []
    loaded.blocks[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    sdsurgery.gates(loaded)[-1].drop_prob = 0.999999
    with torch.no_grad():
        loaded.train()(torch.randn(3, 3, 4, 4))  # the example's sizes: the dropped MLP is skipped
    assert calls == []


# ----------------------------------------------------------- untrusted files are data, not code
def _rewrite(tmp_path, name, change, tensors=None):
    """A copy of a valid converted checkpoint whose metadata ``change(meta)`` edits."""
    ok = tmp_path / "ok.safetensors"
    if not ok.exists():
        sdsurgery.save(sdsurgery.convert(sdsurgery.create_model("cifar_resnet20", num_classes=10), seed=1), ok)
    meta = sdsurgery.read_metadata(ok)
    change(meta)
    path = tmp_path / name
    save_file(tensors if tensors is not None else load_file(str(ok)), str(path),
              metadata={"sdsurgery": json.dumps(meta)})
    return path


def _spec(spec, kwargs=None):
    def change(meta):
        meta["model"] = {"spec": spec, "num_classes": None, "kwargs": kwargs or {}}
    return change


def test_opening_a_checkpoint_never_runs_code_it_names(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from sdsurgery_cli.main import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text("open('pwned_by_import', 'w').close()\ndef f(): pass\n")
    files = [_rewrite(tmp_path, "a.safetensors", _spec("subprocess:getoutput", {"cmd": "touch pwned"})),
             _rewrite(tmp_path, "b.safetensors", _spec("evil.py:f")),
             _rewrite(tmp_path, "c.safetensors", _spec("os:system", {"command": "touch pwned"}))]
    runner = CliRunner()
    for path in files:
        with pytest.raises(CheckpointError, match="would import and run code.*factory=.*--trust-code"):
            sdsurgery.load(path)
        for args in (["inspect", str(path)], ["fold", str(path), "-o", "out.safetensors"],
                     ["eval", str(path), "--dataset", "digits"]):
            r = runner.invoke(app, args)
            assert r.exit_code == 2, r.output
            assert r.stderr.count("\n") == 1 and "--trust-code" in r.stderr, r.stderr
    assert not any(p.name.startswith("pwned") for p in tmp_path.iterdir())
    assert not (tmp_path / "out.safetensors").exists()


def test_a_checkpoint_of_your_own_model_loads_when_you_name_the_factory(tmp_path):
    from models import CustomNet
    model = sdsurgery.convert(CustomNet(), seed=2)
    path = sdsurgery.save(model, tmp_path / "mine.safetensors", spec="models:CustomNet")
    with pytest.raises(CheckpointError, match="'models:CustomNet'"):
        sdsurgery.load(path)
    x = torch.randn(2, 3, 8, 8)
    expected = model.eval()(x)
    for loaded in (sdsurgery.load(path, factory="models:CustomNet"), sdsurgery.load(path, factory=CustomNet),
                   sdsurgery.load(path, trust_code=True)):
        assert len(sdsurgery.gates(loaded)) == 4
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), expected)


def test_leaf_classes_named_by_a_file_are_never_imported(tmp_path, monkeypatch):
    import sys
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plantedmod.py").write_text("open(__file__ + '.ran', 'w').close()\nimport torch\n"
                                            "class Leaf(torch.nn.Module): pass\n")

    def leaf(meta):
        meta["stochastic_depth"]["leaf_modules"] = ["plantedmod:Leaf"]
    path = _rewrite(tmp_path, "leaf.safetensors", leaf)
    with pytest.raises(CheckpointError, match="leaf module class 'plantedmod:Leaf'.*--trust-code"):
        sdsurgery.load(path)
    assert "plantedmod" not in sys.modules and not (tmp_path / "plantedmod.py.ran").exists()

    def not_a_module(meta):
        meta["stochastic_depth"]["leaf_modules"] = ["os:system"]
    with pytest.raises(CheckpointError, match="'os:system' is not an nn.Module class"):
        sdsurgery.load(_rewrite(tmp_path, "os.safetensors", not_a_module))


def _set(path_keys, value):
    def change(meta):
        node = meta
        for k in path_keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path_keys[-1]]
        else:
            node[path_keys[-1]] = value
    return change


@pytest.mark.parametrize("keys, value, message", [
    (("model", "num_classes"), "ten", "model.num_classes must be int or null"),
    (("model", "num_classes"), -3, "model.num_classes must be in"),
    (("model", "kwargs"), [1, 2], "model.kwargs must be dict or null"),
    (("model", "kwargs"), {"checkpoint_path": "x.pth"}, "would make the factory read or fetch files"),
    (("model", "kwargs"), {"not an identifier": 1}, "is not a Python identifier"),
    (("model", "spec"), 7, "model.spec must be str"),
    (("model",), KeyError, "model is missing"),
    (("stochastic_depth",), "linear", "stochastic_depth must be dict or null"),
    (("stochastic_depth", "mode"), KeyError, "stochastic_depth.mode is missing"),
    (("stochastic_depth", "mode"), "row", "stochastic_depth.mode must be one of block, sample"),
    (("stochastic_depth", "drop_rate"), 1.5, "drop_rate must be in"),
    (("stochastic_depth", "schedule"), [0.1, "x"], "schedule must hold probabilities"),
    (("stochastic_depth", "example_shape"), [100000, 3, 10000, 10000], "larger than any example input"),
    (("stochastic_depth", "example_shape"), [2, -3], "positive sizes"),
    (("format",), "1", "format must be int"),
    (("converted",), "yes", "converted must be bool"),
])
def test_bad_metadata_is_one_clear_error(tmp_path, keys, value, message):
    path = _rewrite(tmp_path, "bad.safetensors", _set(keys, value))
    with pytest.raises(CheckpointError, match="metadata is corrupt") as e:
        sdsurgery.load(path)
    assert message in str(e.value) and "\n" not in str(e.value)
