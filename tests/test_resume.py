"""Resumable state: code-free files, planted pickles never run, damaged checkpoints fall back."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sdsurgery_cli.main import app
from sdsurgery.train import resume
from sdsurgery.io.checkpoint import CheckpointError
from test_data import write_cifar10
from test_finetune import _metrics, no_md5, recipe  # noqa: F401 (fixture)

runner = CliRunner()


class Payload:
    """Unpickling this creates ``marker``: proof that a file was run as code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_flatten_round_trips_optimizer_state_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "inf": float("inf"), "pair": (1, "a"), "n": None}
    tensors = {}
    tree = json.loads(json.dumps(resume.flatten(state, "s", tensors)))
    back = resume.unflatten(tree, tensors)
    assert back["inf"] == float("inf") and back["pair"] == (1, "a") and back["n"] is None
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer keys survive JSON
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(back["optimizer"])
    with pytest.raises(ValueError, match="unexpected object"):
        resume.unflatten({"__reduce__": 1}, {})
    with pytest.raises(TypeError, match="cannot store"):
        resume.flatten({"f": print}, "s", {})


def _one_epoch_run(tmp_path):
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=1, keep_checkpoints=3)
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 0, r.output
    return path, tmp_path / "run"


def test_resume_runs_no_file_planted_in_the_run_directory(tmp_path, no_md5):
    path, run = _one_epoch_run(tmp_path)
    marker = tmp_path / "pwned"
    # every pickle an accelerate checkpoint would hold, in every checkpoint, plus the files
    # that are there already if they were .pkl / .bin
    names = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
             "optimizer.bin", "scheduler.bin", "sampler.bin", "pytorch_model.bin", "scaler.pt"]
    planted = 0
    for d in [run, *(run / "checkpoints").iterdir()]:
        for name in names:
            torch.save({"x": Payload(marker)}, d / name)
            planted += 1
        for f in d.iterdir():
            if f.suffix in (".pkl", ".bin"):
                f.write_bytes(pickle.dumps(Payload(marker)))
    assert planted >= 24
    r = runner.invoke(app, ["finetune", str(path), "--resume", str(run), "--set", "train.epochs=2"])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and [m["epoch"] for m in _metrics(run)] == [1, 2]
    assert not marker.exists(), "a planted pickle was run"


def test_damaged_checkpoints_are_named_and_never_run(tmp_path, no_md5):
    path, run = _one_epoch_run(tmp_path)
    marker = tmp_path / "pwned"
    for ck in (run / "checkpoints").iterdir():
        for f in ck.iterdir():  # our own files replaced by pickles
            torch.save({"x": Payload(marker)}, f)
    r = runner.invoke(app, ["finetune", str(path), "--resume", str(run), "--set", "train.epochs=2"])
    assert r.exit_code == 2, r.output
    assert "no checkpoint there can be resumed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not marker.exists()


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=2, keep_checkpoints=2)
    assert runner.invoke(app, ["finetune", str(path)]).exit_code == 0
    run = tmp_path / "run"
    model = run / "checkpoints" / "epoch_2" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    r = runner.invoke(app, ["finetune", str(path), "--resume", str(run), "--set", "train.epochs=3"])
    assert r.exit_code == 0, r.output
    assert "warning: checkpoints/epoch_2 is unreadable" in r.output
    assert "resumed from" in r.output and "epoch_1 (epoch 1 done" in r.output
    assert "dropped 1 metrics lines" in r.output
    assert [m["epoch"] for m in _metrics(run)] == [1, 2, 3]


def test_checkpoints_written_by_accelerate_are_refused(tmp_path):
    ck = tmp_path / "checkpoints" / "epoch_1"
    ck.mkdir(parents=True)
    (ck / "custom_checkpoint_0.pkl").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="written with pickles by an older sdsurgery"):
        resume.read(ck, 0)


def test_an_interrupted_swap_is_finished_or_undone(tmp_path):
    ck = tmp_path / "checkpoints"
    # killed after the old 'best' moved aside and before the new one moved in
    (ck / "best.old").mkdir(parents=True)
    (ck / "best.tmp").mkdir()
    (ck / "best.tmp" / resume.STATE).write_text("{}")
    # killed while writing epoch_3
    (ck / "epoch_3.tmp").mkdir()
    done = resume.tidy(tmp_path)
    assert sorted(p.name for p in ck.iterdir()) == ["best"]
    assert (ck / "best" / resume.STATE).is_file() and len(done) == 2
    (ck / "best.old").mkdir()
    resume.tidy(tmp_path)
    assert sorted(p.name for p in ck.iterdir()) == ["best"]


def test_a_failed_checkpoint_write_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    target = tmp_path / "checkpoints" / "epoch_1"
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*No space left"):
        resume.write(target, model=torch.nn.Linear(2, 2), states={}, loop={}, rng=resume.capture_rng(),
                     rank=0, main=True)
    assert list((tmp_path / "checkpoints").iterdir()) == []
