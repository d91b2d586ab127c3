"""sdsurgery finetune end to end on tiny files in the real formats; resume; two processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import sdsurgery
from sdsurgery_cli.main import app
from test_data import write_cifar10, write_svhn

TESTS = Path(__file__).parent
runner = CliRunner()


def recipe(tmp_path, dataset, **train):
    r = {
        "model": {"name": "cifar_resnet20"},
        "data": {"dataset": dataset, "data_dir": str(tmp_path / "data"), "image_size": 8, "val_split": 4},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "multistep", "decay_milestones": [2]},
        "stochastic_depth": {"drop_rate": 0.5},
        "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "seed": 1,
                  "output_dir": str(tmp_path / "run"), "keep_checkpoints": 1, **train},
    }
    path = tmp_path / f"{dataset}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)


def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_cifar10_checkpoint_resume_fold_eval(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=40, n_test=10)
    path = recipe(tmp_path, "cifar10")
    run = tmp_path / "run"
    # an uninterrupted run of 2 epochs ...
    straight = runner.invoke(app, ["finetune", str(path), "--set", f"train.output_dir={tmp_path / 'straight'}"])
    assert straight.exit_code == 0, straight.output
    assert "folded (plain architecture)" in straight.output
    # ... against one stopped after epoch 1 and resumed
    first = runner.invoke(app, ["finetune", str(path), "--set", "train.epochs=1"])
    assert first.exit_code == 0, first.output
    assert [m["epoch"] for m in _metrics(run)] == [1]
    resumed = runner.invoke(app, ["finetune", str(path), "--resume", str(run), "--set", "train.epochs=2"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output
    assert [m["epoch"] for m in _metrics(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "epoch_2"]
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a), "resume must continue exactly"
    # the exported model is folded, in the CLI's format; eval reads it back
    meta = sdsurgery.read_metadata(run / "model.safetensors")
    assert meta["folded"] and not meta["converted"] and meta["model"]["spec"] == "sdsurgery:cifar_resnet20"
    result = json.loads((run / "result.json").read_text())
    assert abs(result["gated"]["top1"] - result["folded"]["top1"]) < 1e-9
    # eval needs no flag but where the data is: the preprocessing is in the checkpoint
    ev = runner.invoke(app, ["eval", str(run / "model.safetensors"), "--data-dir", str(tmp_path / "data")])
    assert ev.exit_code == 0, ev.output
    assert f"on cifar10 test (10 images, 8 px): top-1 {result['folded']['top1']:.2f}%" in ev.output
    assert ev.stderr == ""
    assert meta["preprocessing"] == {"dataset": "cifar10", "num_classes": 10, "image_size": 8,
                                     "mean": pytest.approx([0.4914, 0.4822, 0.4465]),
                                     "std": pytest.approx([0.2470, 0.2435, 0.2616]),
                                     "interpolation": "bilinear", "crop_pct": None}
    # the folded file keeps what it was trained with
    assert meta["stochastic_depth"]["folded"] and meta["stochastic_depth"]["drop_rate"] == 0.5
    # a run directory and a training checkpoint are targets too; a contradicting flag warns
    for target in (run, run / "checkpoints" / "best"):
        ev = runner.invoke(app, ["eval", str(target), "--data-dir", str(tmp_path / "data")])
        assert ev.exit_code == 0 and "top-1" in ev.output, ev.output
    ev = runner.invoke(app, ["eval", str(run), "--data-dir", str(tmp_path / "data"), "--image-size", "16"])
    assert ev.exit_code == 0 and "warning: --image-size 16: the model was trained at 8 px" in ev.stderr


def test_finetune_svhn(tmp_path, no_md5):
    write_svhn(tmp_path / "data", ("train", "test"), n=16)
    r = runner.invoke(app, ["finetune", str(recipe(tmp_path, "svhn")), "--set", "train.epochs=1",
                            "--set", "stochastic_depth.mode=sample"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoints" / "epoch_1").is_dir()
    resumed = runner.invoke(app, ["finetune", str(tmp_path / "svhn.yaml"), "--resume", str(tmp_path / "run"),
                                  "--set", "train.epochs=2", "--set", "stochastic_depth.mode=sample"])
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    assert [m["epoch"] for m in _metrics(tmp_path / "run")] == [1, 2]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    ev = runner.invoke(app, ["eval", str(tmp_path / "run" / "model.safetensors"),
                             "--data-dir", str(tmp_path / "data")])
    assert ev.exit_code == 0 and f"top-1 {result['folded']['top1']:.2f}%" in ev.output, ev.output


def test_without_stochastic_depth_nothing_is_called_gated_or_folded(tmp_path, no_md5):
    """stochastic_depth.enabled: false trains the plain model: the report names it so (it said
    "gated" and "folded" twice over the same model), EMA rows likewise."""
    write_cifar10(tmp_path / "data", n_train=16, n_test=8)
    r = runner.invoke(app, ["finetune", str(recipe(tmp_path, "cifar10")), "--set", "train.epochs=1",
                            "--set", "stochastic_depth.enabled=false", "--set", "ema.enabled=true"])
    assert r.exit_code == 0, r.output
    assert "model (no stochastic depth)" in r.output and "EMA " in r.output
    assert "gated" not in r.output.split("on cifar10")[-1] and "folded" not in r.output, r.output
    loaded = sdsurgery.load(tmp_path / "run" / "model.safetensors")
    assert not any("Gate" in type(m).__name__ for m in loaded.modules())


def test_imagefolder(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "owl"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    path = recipe(tmp_path, "imagefolder", epochs=1)
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 0, r.output
    meta = sdsurgery.read_metadata(tmp_path / "run" / "model.safetensors")
    assert meta["model"]["num_classes"] == 3


def test_finetune_errors(tmp_path):
    path = recipe(tmp_path, "cifar10")
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 2 and "cifar10 not found" in r.stderr and "--set data.download=true" in r.stderr
    r = runner.invoke(app, ["finetune", str(path), "--set", "train.epochz=3"])
    assert r.exit_code == 2 and "unknown recipe key 'train.epochz'" in r.stderr
    r = runner.invoke(app, ["finetune", str(path), "--resume", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "not a run directory" in r.stderr


def test_killed_mid_epoch_resumes_exactly(tmp_path, no_md5):
    """SIGKILL a run right after its first mid-epoch checkpoint; the resumed run ends with the
    weights of an uninterrupted one."""
    import signal
    import time
    write_cifar10(tmp_path / "data", n_train=200, n_test=10)
    path = recipe(tmp_path, "cifar10", epochs=1, checkpoint_every_steps=5, keep_checkpoints=2)
    r = yaml.safe_load(path.read_text())
    r["data"]["workers"] = 1  # a forked worker must not keep the killed run's directory lock
    path.write_text(yaml.safe_dump(r))
    straight = runner.invoke(app, ["finetune", str(path), "--set", f"train.output_dir={tmp_path / 'straight'}"])
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "run"
    # same thread count as this process: float sums must add up in the same order
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c",
                             "import torchvision.datasets.cifar as c; c.check_integrity = lambda *a, **k: True; "
                             "import sys; sys.argv = ['sdsurgery', 'finetune', sys.argv[1]]; "
                             "from sdsurgery_cli.main import main; main()", str(path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "epoch_0_step_5").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "epoch_0_step_5").is_dir()
    assert not (run / "model.safetensors").exists(), "killed too late to test anything"
    resumed = runner.invoke(app, ["finetune", str(path), "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert "steps into the next" in resumed.output
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def _torchrun_recipe(tmp_path, name, batch_size, grad_accum=1, schedule=None):
    r = {
        "model": {"name": "models:residual_convnet"},
        "data": {"dataset": "fake", "augment": False, "image_size": 8},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": schedule or {"name": "constant"},
        "stochastic_depth": {"drop_rate": 0.5, "warmup_epochs": 1},
        "train": {"epochs": 2, "batch_size": batch_size, "grad_accum": grad_accum, "seed": 3, "cpu": True,
                  "max_steps_per_epoch": 5, "output_dir": str(tmp_path / name), "checkpoint_every": 0,
                  "log_every_steps": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _per_step(run):
    """(global step, lr, drop rate) of every logged step."""
    return [(json.loads(l)["global_step"], json.loads(l)["lr"], json.loads(l)["drop_rate"])
            for l in (run / "steps.jsonl").read_text().splitlines()]


def _flat(rows):
    return [v for row in rows for v in row]


@pytest.mark.parametrize("schedule", [
    {"name": "cosine", "warmup_epochs": 0.4},
    {"name": "multistep", "decay_milestones": [1], "decay_rate": 0.1, "warmup_epochs": 0.4},
], ids=["cosine", "multistep"])
def test_two_cpu_processes_and_grad_accum_match_one_process(tmp_path, schedule):
    """Same global batch (8 = 1 x 8 = 1 x 4 x grad_accum 2 = 2 ranks x 4): the same learning
    rate and drop rate at every global step, and the same weights at the end."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    for name, batch, accum in (("one", 8, 1), ("accum", 4, 2)):
        r = subprocess.run([sys.executable, "-m", "sdsurgery", "finetune", "--trust-code",
                            str(_torchrun_recipe(tmp_path, name, batch, accum, schedule))],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "sdsurgery", "finetune", "--trust-code",
                          str(_torchrun_recipe(tmp_path, "two", 4, 1, schedule))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("find_unused_parameters=True was specified") <= 1  # not once per rank
    one = _per_step(tmp_path / "one")
    assert [s for s, _, _ in one] == list(range(1, 11))
    lrs = [lr for _, lr, _ in one]
    assert lrs[0] < lrs[1] <= 0.1 and min(lrs[4:]) < 0.05, lrs  # warm-up, then the schedule decays
    for other in ("accum", "two"):
        assert _flat(_per_step(tmp_path / other)) == pytest.approx(_flat(one), rel=1e-12), other
    # only the main process writes: one metrics line per epoch, one model
    assert len(_metrics(tmp_path / "two")) == 2
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    for other in ("accum", "two"):
        b = load_file(str(tmp_path / other / "model.safetensors"))
        # same global batch, same gate seed: the ranks dropped what one process dropped
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (other, k)


# ------------------------------------------------------------------- faults end in one line
def _strict_json(line):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, no_md5):
    from sdsurgery.train import resume
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    # lr 0.05 for one epoch, then 5e6: the second epoch diverges
    path = recipe(tmp_path, "cifar10", epochs=3, keep_checkpoints=1)
    r = runner.invoke(app, ["finetune", str(path), "--set", "schedule.decay_rate=1.0e8", "--set", "schedule.decay_milestones=[1]"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: training diverged at epoch 2, step ") and r.stderr.count("\n") == 1
    assert "checkpoints/epoch_1, is kept" in r.stderr and "optimizer.lr" in r.stderr
    run = tmp_path / "run"
    assert not (run / "model.safetensors").exists() and not (run / "result.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "epoch_1"]
    for name in ("best", "epoch_1"):
        ck = resume.read(run / "checkpoints" / name, 0)
        assert all(torch.isfinite(t).all() for t in ck.model.values())
    assert [_strict_json(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_skip_nonfinite_skips_that_many_bad_steps_then_stops(tmp_path, no_md5, monkeypatch):
    import torch.nn as nn
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=1)
    real = nn.CrossEntropyLoss.forward
    calls = []

    def second_is_nan(self, logits, target):
        calls.append(1)
        loss = real(self, logits, target)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", second_is_nan)
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 2 and "diverged at epoch 1, step 2: the loss is not finite" in r.stderr, r.output
    calls.clear()
    r = runner.invoke(app, ["finetune", str(path), "--set", "train.skip_nonfinite=1",
                            "--set", f"train.output_dir={tmp_path / 'skip'}"])
    assert r.exit_code == 0, r.output
    assert "warning: epoch 1, step 2: the loss is not finite" in r.output
    assert "step skipped (1 of train.skip_nonfinite=1)" in r.output
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "skip" / "model.safetensors")).values())


def test_ctrl_c_exits_130_saying_what_was_saved(tmp_path, no_md5, monkeypatch):
    from sdsurgery.train import loop as train
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=3)

    def interrupt(self, *a):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train._Run, "_build", interrupt)
        r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 130 and r.stderr == "interrupted; no checkpoint was saved\n", r.output
    real = train._Run._epoch

    def second_epoch_interrupted(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)
    monkeypatch.setattr(train._Run, "_epoch", second_epoch_interrupted)
    r = runner.invoke(app, ["finetune", str(path), "--set", f"train.output_dir={tmp_path / 'b'}"])
    assert r.exit_code == 130, r.output
    assert r.stderr.startswith(f"interrupted; the last checkpoint is {tmp_path / 'b' / 'checkpoints' / 'epoch_1'}")
    assert f"--resume {tmp_path / 'b'}" in r.stderr and r.stderr.count("\n") == 1
    assert not [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.suffix in (".tmp", ".old")]


def test_two_runs_started_together_never_share_a_directory(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=2)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    code = ("import torchvision.datasets.cifar as c; c.check_integrity = lambda *a, **k: True; "
            "import sys; sys.argv = ['sdsurgery', 'finetune', sys.argv[1]]; from sdsurgery_cli.main import main; main()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    saved = sorted(line.split("model saved to ")[1].strip() for out, _ in outs
                   for line in out.replace("\n", " ").split("training time")[1:])
    runs = [tmp_path / "run", tmp_path / "run-2"]
    assert saved == sorted(str(r / "model.safetensors") for r in runs), outs
    for run in runs:
        assert [m["epoch"] for m in _metrics(run)] == [1, 2]


def test_a_locked_run_directory_is_refused_naming_its_holder(tmp_path, no_md5):
    from sdsurgery.train import rundir
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=1)
    assert runner.invoke(app, ["finetune", str(path)]).exit_code == 0
    lock, _ = rundir.claim(tmp_path / "run", resume=True)
    try:
        r = runner.invoke(app, ["finetune", str(path), "--resume", str(tmp_path / "run"), "--set", "train.epochs=2"])
        assert r.exit_code == 2 and f"in use by another sdsurgery run (PID {os.getpid()})" in r.stderr, r.output
    finally:
        lock.release()


def test_a_full_disk_ends_in_one_line_and_leaves_no_partial_checkpoint(tmp_path, no_md5, monkeypatch):
    import errno
    import safetensors.torch
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=2)
    real, calls = safetensors.torch.save_file, []

    def full_after_first_checkpoint(*a, **k):
        calls.append(1)
        if len(calls) > 6:  # epoch_1 and best are written (rng, model, state each), then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", full_after_first_checkpoint)
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: cannot write checkpoint") and "No space left on device" in r.stderr
    assert r.stderr.count("\n") == 1
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["best", "epoch_1"]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_without_a_validation_split_nothing_is_chosen_on_the_test_set(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=2)
    r = runner.invoke(app, ["finetune", str(path), "--set", "data.val_split=0"])
    assert r.exit_code == 0, r.output
    assert "no validation split (data.val_split: 0): no 'best' checkpoint is kept" in r.output
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_2"]
    assert not any(k.startswith(("val_", "eval_", "test_")) for m in _metrics(run) for k in m)
    result = json.loads((run / "result.json").read_text())
    assert result["best_val_top1"] is None and result["gated"]["images"] == 8
    # with one, best is chosen on it and said so
    r = runner.invoke(app, ["finetune", str(path), "--set", f"train.output_dir={tmp_path / 'v'}"])
    assert r.exit_code == 0 and "best validation top-1" in r.output, r.output
    assert all("val_top1" in m for m in _metrics(tmp_path / "v"))


def test_resume_needs_only_the_run_directory_and_a_run_says_what_it_will_do(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=1)
    r = runner.invoke(app, ["finetune", str(path)])
    assert r.exit_code == 0, r.output
    for line in ("model: sdsurgery:cifar_resnet20, random weights, 10 classes",
                 "stochastic depth: 9 of 9 residual branches gated (block mode, linear to 0.5",
                 "data: cifar10 at 8 px: 16 train, 4 val, 8 test images",
                 "running: 1 process on cpu, precision no, global batch 4 (4 per process x 1 x grad_accum 1), 4 steps per epoch x 1 epochs",
                 f"run directory: {(tmp_path / 'run').resolve()}"):
        assert line in r.output, line
    assert "epoch 1/1 step 1/4: loss " in r.output and " img/s, ETA 0:00:0" in r.output  # no terminal: lines
    run = tmp_path / "run"
    r = runner.invoke(app, ["inspect", str(run / "model.safetensors")])
    assert r.exit_code == 0 and "trained on cifar10 (10 classes) at 8 px, bilinear resize" in r.output, r.output
    r = runner.invoke(app, ["finetune", "--resume", str(run), "--set", "train.epochs=2"])
    assert r.exit_code == 0 and "resumed from" in r.output, r.output
    # a recipe that is not the run's own is refused without --set
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("lr: 0.05", "lr: 0.01"))
    r = runner.invoke(app, ["finetune", str(other), "--resume", str(run)])
    assert r.exit_code == 2 and "differs from" in r.stderr and "optimizer.lr: 0.01 vs 0.05" in r.stderr, r.output
    r = runner.invoke(app, ["finetune"])
    assert r.exit_code == 2 and "give a RECIPE" in r.stderr


def test_a_failed_download_names_the_recipe_keys(tmp_path, monkeypatch):
    import sdsurgery.io.models as models

    def offline(*a, **k):
        raise models.WeightsError("cannot fetch pretrained weights for 'x' (OSError: offline); use "
                                  "--no-pretrained (pretrained=False) for random weights or --weights FILE")
    monkeypatch.setattr(models, "_build_registered", offline)
    path = recipe(tmp_path, "digits", epochs=1)
    r = runner.invoke(app, ["finetune", str(path), "--set", "model.pretrained=true"])
    assert r.exit_code == 2, r.output
    assert "(OSError: offline); train from random weights with --set model.pretrained=false" in r.stderr
    assert "--no-pretrained" not in r.stderr


def test_mixed_precision_defers_to_the_launcher_unless_the_recipe_says(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState
    path = recipe(tmp_path, "digits", epochs=1, max_steps_per_epoch=1)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    try:  # accelerate keeps one state per process: each run here stands for a new process
        for override, expected in (([], "precision bf16"), (["--set", "train.mixed_precision=no"], "precision no")):
            AcceleratorState._reset_state(True)
            r = runner.invoke(app, ["finetune", str(path), *override,
                                    "--set", f"train.output_dir={tmp_path / expected.replace(' ', '_')}"])
            assert r.exit_code == 0 and expected in r.output, r.output
    finally:
        AcceleratorState._reset_state(True)


def test_data_workers_do_not_change_the_result(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=2)
    for workers in (0, 2):
        r = runner.invoke(app, ["finetune", str(path), "--set", f"data.workers={workers}",
                                "--set", f"train.output_dir={tmp_path / str(workers)}"])
        assert r.exit_code == 0, r.output
    a, b = (load_file(str(tmp_path / w / "model.safetensors")) for w in ("0", "2"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_true_trains_the_compiled_model_and_exports_the_plain_one(tmp_path, no_md5):
    """train.compile: accelerate's dynamo plugin compiles the converted model (the eager
    backend keeps the test fast); the run trains, skips, folds and exports as without it."""
    write_cifar10(tmp_path / "data", n_train=24, n_test=8)
    path = recipe(tmp_path, "cifar10", epochs=1, compile=True, compile_backend="eager")
    torch.compiler.reset()
    r = runner.invoke(app, ["finetune", str(path)])
    torch.compiler.reset()
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    assert result["gated"]["images"] == 8 and (run / "model.safetensors").exists()
    assert all(not k.startswith("_orig_mod.") for k in load_file(run / "model.safetensors"))
    r = runner.invoke(app, ["finetune", str(path), "--set", "train.compile_backend=nope"])
    assert r.exit_code == 2 and "compile_backend" in r.output and "inductor" in r.output, r.output
