"""train.log_with: accelerate's TensorBoard tracker and sdsurgery's CSV one, on a real run; the
'branches_run' metric against branch calls counted with hooks."""
import csv
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import sdsurgery
from sdsurgery_cli.main import app

runner = CliRunner()


def recipe(tmp_path, **train):
    r = {"model": {"name": "cifar_resnet20"},
         "data": {"dataset": "fake", "image_size": 8, "val_split": 8},
         "optimizer": {"name": "sgd", "lr": 0.05},
         "schedule": {"name": "cosine", "warmup_epochs": 0.5},
         "stochastic_depth": {"drop_rate": 0.5},
         "train": {"epochs": 2, "batch_size": 16, "seed": 0, "max_steps_per_epoch": 4, "log_every_steps": 2,
                   "output_dir": str(tmp_path / "run"), "keep_checkpoints": 2, **train}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_branches_run_counts_what_really_ran():
    """The gates' tally of branches that ran equals the branch calls hooks count."""
    model = sdsurgery.convert(sdsurgery.create_model("cifar_resnet20", pretrained=False), drop_rate=0.5, seed=1)
    ran = []
    for name, m in model.named_modules():
        if name.endswith(".conv1") and name.startswith("layer"):
            m.register_forward_hook(lambda *a: ran.append(1))
    ctrl = sdsurgery.gates(model)[0].controller
    model.train()
    for _ in range(20):
        model(torch.randn(2, 3, 8, 8))
    assert ctrl.calls == 20 * len(sdsurgery.gates(model)) == 180
    assert ctrl.ran == len(ran) and 0.6 < len(ran) / 180 < 0.9  # expected survival 0.72
    model.eval()
    model(torch.randn(2, 3, 8, 8))
    assert ctrl.calls == 180  # evaluation is not training


def test_csv_and_tensorboard_trackers_on_a_run_and_its_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    path = recipe(tmp_path, log_with=["csv", "tensorboard"])
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    steps = read_csv(run / "csv" / "train.csv")
    assert [int(s["step"]) for s in steps] == [2, 4, 6, 8]
    assert set(steps[0]) == {"step", "lr", "loss", "images_per_second", "drop_rate", "branches_run"}
    assert all(0 <= float(s["branches_run"]) <= 1 for s in steps)
    mean_run = sum(float(s["branches_run"]) for s in steps) / len(steps)
    assert 0.55 < mean_run < 0.9, mean_run  # linear to 0.5 over 9 blocks: 0.72 expected
    epochs = read_csv(run / "csv" / "epoch.csv")
    assert [int(e["step"]) for e in epochs] == [4, 8] and {"val_top1", "epoch_seconds", "train_loss"} <= set(epochs[0])
    assert {"gated_top1", "folded_top1"} <= set(read_csv(run / "csv" / "test.csv")[0])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/branches_run", "epoch/val_top1", "test/folded_top1"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    # resumed from epoch 1: the CSV rows after it are dropped and written again, not doubled
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "epoch_2")
    resumed = runner.invoke(app, ["finetune", "--resume", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    again = read_csv(cut / "csv" / "train.csv")
    assert [int(s["step"]) for s in again] == [2, 4, 6, 8]
    assert [s["loss"] for s in again] == [s["loss"] for s in steps]
    assert [s["branches_run"] for s in again] == [s["branches_run"] for s in steps]
    # TensorBoard too (SummaryWriter's purge_step): each step once, the resumed run's values
    resumed_events = EventAccumulator(str(cut / "tensorboard"))
    resumed_events.Reload()
    for tag in ("train/loss", "epoch/val_top1"):
        before = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [(e.step, e.value) for e in resumed_events.Scalars(tag)] == before, tag


def test_a_missing_tracker_package_is_one_clear_line(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    r = runner.invoke(app, ["finetune", str(recipe(tmp_path, log_with=["wandb"]))])
    assert r.exit_code == 2
    assert r.stderr == ("error: train.log_with: wandb needs the wandb package (pip install wandb), or drop it "
                        "from train.log_with\n")
    assert not (tmp_path / "run").exists()


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_a_tracker_that_cannot_start_is_one_line_and_the_new_run_leaves_nothing(tmp_path, monkeypatch):
    """A tracker failing in its start (a tracking server out of reach, no login) was accelerate's
    traceback after recipe.yaml was written; now one line naming it, the CSV tracker started
    before it is closed, and the directory holds only its lock (the next run reuses it)."""
    pytest.importorskip("tensorboard")
    import torch.utils.tensorboard as tb

    def unreachable(self, *a, **k):
        raise OSError("tracking server unreachable")
    monkeypatch.setattr(tb.SummaryWriter, "__init__", unreachable)
    r = runner.invoke(app, ["finetune", str(recipe(tmp_path, log_with=["csv", "tensorboard"]))])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith("error: train.log_with: tensorboard did not start: OSError: tracking server "
                               "unreachable; "), r.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    monkeypatch.undo()
    again = runner.invoke(app, ["finetune", str(recipe(tmp_path, log_with=["csv"]))])
    assert again.exit_code == 0 and (tmp_path / "run" / "csv" / "train.csv").exists(), again.output


def test_plot_a_run_and_the_gates(tmp_path):
    pytest.importorskip("matplotlib")
    r = runner.invoke(app, ["finetune", str(recipe(tmp_path, epochs=1))])
    assert r.exit_code == 0, r.output
    p = runner.invoke(app, ["plot", str(tmp_path / "run")])
    assert p.exit_code == 0, p.output
    names = {"loss", "top1", "lr", "drop_rate", "epoch_time", "summary"}
    assert {f.stem for f in (tmp_path / "run" / "plots").iterdir()} == names
    assert all(_png(tmp_path / "run" / "plots" / f"{n}.png") for n in names)
    i = runner.invoke(app, ["inspect", "cifar_resnet20", "--image-size", "32", "--plot", str(tmp_path / "g.png")])
    assert i.exit_code == 0 and _png(tmp_path / "g.png"), i.output
    bad = runner.invoke(app, ["plot", str(tmp_path)])
    assert bad.exit_code == 2 and "has no steps.jsonl or metrics.jsonl" in bad.stderr


@pytest.mark.parametrize("line", ['{"lr": 0.1}', "[1]", '{"step": "x", "global_step": 1}'])
def test_plot_refuses_lines_it_did_not_write_in_one_line(tmp_path, line):
    (tmp_path / "steps.jsonl").write_text('{"step": 1, "global_step": 1, "loss": 2.0}\n' + line + "\n")
    r = runner.invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {tmp_path / 'steps.jsonl'}:2 is not a line")
    assert r.stderr.count("\n") == 1
