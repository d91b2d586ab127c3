"""sdsurgery finetune with timm's parts: optimizer (layer decay), scheduler, transforms from the
model's pretrained config, mixup / cutmix, model EMA, channels_last; end to end on tiny CIFAR-10
files in the real format, resumed exactly."""
import json
from pathlib import Path
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import sdsurgery
from sdsurgery.train import parts
from sdsurgery.train.data import SeededAugmentation, TimmTransforms, load_datasets
from sdsurgery.train.recipes import load_recipe, parse_recipe
from sdsurgery_cli.main import app
from test_data import no_md5, write_cifar10  # noqa: F401 - no_md5 is a fixture

runner = CliRunner()

VIT = {"name": "timm:vit_tiny_patch16_224",
       "kwargs": {"img_size": 16, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}}


def everything(tmp_path, **train):
    """A recipe with every timm-level feature on."""
    return {
        "model": VIT,
        "data": {"dataset": "cifar10", "data_dir": str(tmp_path / "data"), "image_size": 16, "val_split": 8,
                 "transforms": "timm", "normalize": "model", "auto_augment": "rand-m9-mstd0.5-inc1",
                 "re_prob": 0.25, "scale": [0.5, 1.0]},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.99],
                      "layer_decay": 0.65},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5, "warmup_lr": 1e-6, "min_lr": 1e-5},
        "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5},
        "ema": {"enabled": True, "decay": 0.9},
        "stochastic_depth": {"drop_rate": 0.3},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "seed": 2, "label_smoothing": 0.1,
                  "channels_last": True, "grad_checkpointing": True, "output_dir": str(tmp_path / "run"),
                  "log_every_steps": 1, "keep_checkpoints": 2, **train},
    }


def write(tmp_path, r, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(r))
    return path


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_every_timm_feature_end_to_end_and_resumed_exactly(tmp_path, no_md5, monkeypatch):
    from timm.data import Mixup
    write_cifar10(tmp_path / "data", n_train=40, n_test=10)
    # count what really runs: mixup calls, and the memory format the convolutions see
    calls, formats = [], set()
    real = Mixup.__call__
    monkeypatch.setattr(Mixup, "__call__", lambda self, x, y: calls.append(x.shape[0]) or real(self, x, y))

    def seen(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            formats.add(args[0].is_contiguous(memory_format=torch.channels_last))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    try:
        path = write(tmp_path, everything(tmp_path))
        r = runner.invoke(app, ["finetune", str(path), "--set", f"train.output_dir={tmp_path / 'straight'}"])
    finally:
        handle.remove()
    assert r.exit_code == 0, r.output
    assert calls == [8, 8, 8, 8] * 2, calls  # 32 training images, batch 8, two epochs
    assert formats == {True}
    run = tmp_path / "straight"
    result = json.loads((run / "result.json").read_text())
    assert result["exported"] in ("model", "ema") and set(result["ema_folded"]) >= {"top1", "top5", "loss"}
    assert f"exported: the {'EMA' if result['exported'] == 'ema' else 'model'}" in r.output
    epochs = lines(run / "metrics.jsonl")
    assert all("val_ema_top1" in e and "val_top1" in e for e in epochs)
    steps = lines(run / "steps.jsonl")
    lrs = [s["lr"] for s in steps]
    # timm's cosine with a 2-update warm-up from 1e-6, then decaying to min_lr, per update
    assert lrs[0] < lrs[1] and max(lrs) <= 1e-3 + 1e-12 and lrs[-1] < max(lrs) and min(lrs) >= 1e-6
    # the exported file is the one the result names: eval gives its test top-1
    key = "ema_folded" if result["exported"] == "ema" else "folded"
    ev = runner.invoke(app, ["eval", str(run), "--data-dir", str(tmp_path / "data")])
    assert ev.exit_code == 0 and f"top-1 {result[key]['top1']:.2f}%" in ev.output, (ev.output, result)
    meta = sdsurgery.read_metadata(run / "model.safetensors")
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["preprocessing"]["crop_pct"] == 0.9
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the ViT's own, from its pretrained cfg
    # the same run resumed from its epoch-1 checkpoint ends with the same EMA, weights and lrs
    # (the schedule spans both epochs, so the run is cut, not shortened)
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    for name in ("model.safetensors", "result.json"):
        (cut / name).unlink()
    shutil.rmtree(cut / "checkpoints" / "epoch_2")
    resumed = runner.invoke(app, ["finetune", "--resume", str(cut)])
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    a, b = load_file(str(run / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s["lr"] for s in lines(cut / "steps.jsonl")] == lrs
    assert json.loads((cut / "result.json").read_text())["ema_folded"] == result["ema_folded"]


def test_layer_decay_and_no_decay_groups_reach_the_optimizer(tmp_path):
    r = parse_recipe(everything(tmp_path))
    model = sdsurgery.convert(sdsurgery.create_model(VIT["name"], pretrained=False, num_classes=10, **VIT["kwargs"]))
    opt = parts.create_optimizer(r, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.99)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == 6 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.65 ** 5)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():  # biases, norms, pos_embed / cls_token: no decay
        assert (id(p) in decayed) == (p.ndim > 1 and name not in ("pos_embed", "cls_token")), name
    # a model timm cannot split into layers is refused, not silently given one group
    r.optimizer.layer_decay = 0.65
    flat = sdsurgery.convert(sdsurgery.create_model("cifar_resnet20", pretrained=False, num_classes=10))
    with pytest.raises(parts.PartsError, match="cannot be split into layers"):
        parts.create_optimizer(r, flat)


def test_timm_transforms_come_from_the_model_config_and_are_seeded(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=12, n_test=4)
    model = sdsurgery.create_model(VIT["name"], pretrained=False, num_classes=10, **VIT["kwargs"])
    r = parse_recipe(everything(tmp_path))
    options = parts.data_options(r, model)
    assert (options["interpolation"], options["crop_pct"], options["mean"]) == ("bicubic", 0.9, [0.5] * 3)
    splits = load_datasets("cifar10", tmp_path / "data", **options)
    names = [type(t).__name__ for t in splits.train.transform.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names and "RandomErasing" in names
    assert "CenterCrop" in [type(t).__name__ for t in splits.test.transform.transforms]
    # timm draws from Python's and NumPy's RNGs too: a seeded item is the same every time
    seeded = SeededAugmentation(splits.train, seed=5)
    assert torch.equal(seeded[3][0], seeded[3][0])
    seeded.set_epoch(1)
    assert not torch.equal(seeded[3][0], SeededAugmentation(splits.train, seed=5)[3][0])
    with pytest.raises(Exception, match="auto_augment"):
        parts.data_options(parse_recipe({**everything(tmp_path), "data": {
            "transforms": "timm", "auto_augment": "nonsense-m9"}}), model)
    assert TimmTransforms().re_mode == "pixel"


def test_a_model_built_for_another_size_is_one_line_before_anything_runs(tmp_path, no_md5):
    """A ViT built for 16 px fed the data's 32 px images: timm's assertion in the first training
    step was a traceback; now one line naming the size and the fix, and nothing written."""
    write_cifar10(tmp_path / "data", n_train=12, n_test=4)
    r = everything(tmp_path)
    r["data"]["image_size"] = 32
    out = runner.invoke(app, ["finetune", str(write(tmp_path, r))])
    assert out.exit_code == 2 and out.stdout.count("\n") == 0, out.output
    assert "fails on one of the data's 32 px images: AssertionError" in out.stderr
    assert "{img_size: 32}" in out.stderr
    assert [p.name for p in (tmp_path / "run").rglob("*")] == [".lock"]  # the claim, emptied; nothing else
    # the fix it names works
    r["model"] = {**VIT, "kwargs": {**VIT["kwargs"], "img_size": 32}}
    r["train"].update(epochs=1, max_steps_per_epoch=1)
    assert runner.invoke(app, ["finetune", str(write(tmp_path, r))]).exit_code == 0


def test_the_size_check_runs_the_model_as_training_will(tmp_path):
    """The check feeds the model on its device under the run's autocast: a bf16 model trained
    with mixed_precision bf16 passes it (a plain float32 probe called it a size problem)."""
    (tmp_path / "factory.py").write_text(
        "import torch\nfrom sdsurgery.zoo.cifar_resnet import CifarResNet\n"
        "def build(num_classes=10):\n    return CifarResNet(3, num_classes=num_classes).to(torch.bfloat16)\n")
    r = {"model": {"name": f"{tmp_path / 'factory.py'}:build"},
         "data": {"dataset": "fake", "image_size": 16, "val_split": 8},
         "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "mixed_precision": "bf16",
                   "output_dir": str(tmp_path / "run")}}
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)  # another precision than the tests before
    try:
        out = runner.invoke(app, ["finetune", str(write(tmp_path, r)), "--trust-code"])
    finally:
        AcceleratorState._reset_state(True)
    assert out.exit_code == 0, out.output


def test_plateau_and_step_schedules_follow_timm(tmp_path, no_md5):
    write_cifar10(tmp_path / "data", n_train=24, n_test=4)
    r = everything(tmp_path, epochs=3)
    r["model"] = {"name": "cifar_resnet20"}
    r["data"] = {"dataset": "cifar10", "data_dir": str(tmp_path / "data"), "image_size": 8, "val_split": 8}
    r["mixup"], r["ema"] = {}, {"enabled": False}
    r["optimizer"] = {"name": "momentum", "lr": 0.1}
    r["schedule"] = {"name": "plateau", "patience_epochs": 0, "decay_rate": 0.5}
    r["train"]["keep_checkpoints"], r["train"]["grad_checkpointing"] = 3, False
    res = runner.invoke(app, ["finetune", str(write(tmp_path, r))])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    lrs = [e["lr"] for e in lines(run / "metrics.jsonl")]
    assert lrs[0] == 0.1 and all(b in (a, a * 0.5) for a, b in zip(lrs, lrs[1:])), lrs
    # the plateau counters (timm's own state_dict drops them) survive a resume
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "epoch_3")
    (cut / "model.safetensors").unlink()
    resumed = runner.invoke(app, ["finetune", "--resume", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    assert [e["lr"] for e in lines(cut / "metrics.jsonl")] == lrs
    a, b = load_file(str(run / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpointed_blocks_replay_their_decision_and_skip_dropped_branches():
    """timm's activation checkpointing recomputes blocks in backward: the gates replay the
    forward's decision, so the gradients are exactly those without checkpointing, and a
    dropped branch runs neither in the forward nor in the recomputation (counted)."""
    def make():
        torch.manual_seed(0)
        return sdsurgery.convert(sdsurgery.create_model(VIT["name"], pretrained=False, num_classes=10,
                                                        **{**VIT["kwargs"], "depth": 6}), drop_rate=0.5, seed=3)
    plain, checkpointed = make(), make()
    checkpointed.set_grad_checkpointing(True)
    runs = {"plain": 0, "checkpointed": 0}
    for tag, model in (("plain", plain), ("checkpointed", checkpointed)):
        for name, m in model.named_modules():
            if name.endswith("mlp.fc1"):
                m.register_forward_hook(lambda *a, tag=tag: runs.__setitem__(tag, runs[tag] + 1))
    x = torch.randn(4, 3, 16, 16)
    for _ in range(6):
        for model in (plain, checkpointed):
            model.zero_grad()
            model(x).sum().backward()
        for p, q in zip(plain.parameters(), checkpointed.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert 0 < runs["plain"] < 36  # of 6 steps x 6 blocks, some dropped
    assert runs["checkpointed"] == 2 * runs["plain"]  # kept: forward + recomputation; dropped: never
    # a train-mode forward without grad between forward and backward, and a second backward of
    # a retained graph, replay the right decisions (sample mode: per-sample decisions)
    for mode in ("block", "sample"):
        for model in (plain, checkpointed):
            for g in sdsurgery.gates(model):
                g.controller.mode = mode
        for _ in range(6):
            grads = []
            for model in (plain, checkpointed):
                model.zero_grad()
                out = model(x)
                with torch.no_grad():
                    model(x)
                out.sum().backward(retain_graph=True)
                out.sum().backward()
                grads.append([p.grad for p in model.parameters()])
            for p, q in zip(*grads):
                assert (p is None and q is None) or torch.equal(p, q)
    with pytest.raises(Exception, match="has no set_grad_checkpointing"):
        from sdsurgery.train.loop import finetune
        finetune(parse_recipe({"model": {"name": "cifar_resnet20"}, "data": {"dataset": "fake", "image_size": 8},
                               "train": {"grad_checkpointing": True, "epochs": 1, "output_dir": "/nonexistent/x"}}))


# the fine-tune recipes themselves, with a tiny random model of the same family and fake data
TINY = {
    "cifar100_vit_small": ["model.name=timm:vit_tiny_patch16_224",
                           "model.kwargs={img_size: 16, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
                           "data.image_size=16"],
    "cifar10_resnet50": ["model.name=timm:resnet10t", "data.image_size=32"],
    "svhn_convnext_tiny": ["model.name=timm:convnext_atto", "data.image_size=32"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_finetune_recipes_run_end_to_end(tmp_path, name):
    """Every feature each recipe turns on (timm transforms, layer decay, mixup, EMA, channels_last,
    the CSV tracker) runs, on a tiny model of the recipe's family and fake images: 2 steps x 2 epochs."""
    path = Path(__file__).parent.parent / "recipes" / "finetune" / f"{name}.yaml"
    sets = TINY[name] + ["model.pretrained=false", "data.dataset=fake", "data.val_split=16", "data.download=false",
                         "train.batch_size=8", "train.epochs=2", "train.max_steps_per_epoch=2",
                         "train.mixed_precision=no", "train.eval_batch_size=32", f"train.output_dir={tmp_path / 'run'}",
                         "stochastic_depth.warmup_epochs=1", "schedule.warmup_epochs=1"]
    r = runner.invoke(app, ["finetune", str(path), *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["ema_folded"] is not None and result["exported"] in ("model", "ema")
    assert (tmp_path / "run" / "csv" / "train.csv").is_file()


def test_timm_posterize_at_zero_bits_is_a_black_image_not_a_crash():
    """timm's RandAugment posterizes to 0 bits at its top magnitude ('inc1' policies); Pillow 13
    refuses 0 bits. After the transforms are built, the op gives the black image instead."""
    from PIL import Image
    from timm.data import auto_augment
    load_datasets("fake", image_size=8, fake_size=4, timm=TimmTransforms(auto_augment="rand-m9-mstd0.5-inc1"))
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    out = auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 0)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert auto_augment.NAME_TO_OP["Posterize"](img, 4).getpixel((0, 0)) == (192, 96, 48)  # unchanged above 0


def test_a_resumed_run_follows_the_recipes_schedule_not_the_checkpoints(tmp_path):
    """--resume --set train.epochs=N stretches the schedule: epoch 2 of a 1-epoch run resumed to
    2 epochs has the lrs of a 2-epoch run's epoch 2 (a restored cosine would be at min_lr)."""
    r = {"model": {"name": "cifar_resnet20"}, "data": {"dataset": "fake", "image_size": 8},
         "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "cosine", "min_lr": 0.0},
         "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 4, "log_every_steps": 1,
                   "output_dir": str(tmp_path / "straight")}}
    path = write(tmp_path, r)
    assert runner.invoke(app, ["finetune", str(path)]).exit_code == 0
    short = runner.invoke(app, ["finetune", str(path), "--set", "train.epochs=1",
                                "--set", f"train.output_dir={tmp_path / 'short'}"])
    assert short.exit_code == 0, short.output
    resumed = runner.invoke(app, ["finetune", "--resume", str(tmp_path / "short"), "--set", "train.epochs=2"])
    assert resumed.exit_code == 0, resumed.output
    epoch2 = lambda run: [s["lr"] for s in lines(run / "steps.jsonl") if s["epoch"] == 2]
    assert epoch2(tmp_path / "short") == pytest.approx(epoch2(tmp_path / "straight"), rel=1e-12)
    assert min(epoch2(tmp_path / "short")[:-1]) > 0.001


def test_two_cpu_ranks_with_ema_mixup_and_trackers(tmp_path):
    """Two gloo ranks with EMA, mixup / cutmix, the CSV tracker and an EMA export decision: the
    run ends (no rank waits for another that stopped), one rank writes, the ranks agree."""
    import os
    import subprocess
    import sys
    r = {"model": {"name": "models:residual_convnet"}, "data": {"dataset": "fake", "image_size": 8, "val_split": 32},
         "optimizer": {"name": "adamw", "lr": 0.01}, "schedule": {"name": "cosine", "warmup_epochs": 0.5},
         "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, "ema": {"enabled": True, "decay": 0.9},
         "stochastic_depth": {"drop_rate": 0.3},
         "train": {"epochs": 2, "batch_size": 8, "seed": 1, "cpu": True, "max_steps_per_epoch": 3,
                   "log_every_steps": 1, "log_with": ["csv"], "output_dir": str(tmp_path / "run")}}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", "-m", "sdsurgery", "finetune", "--trust-code",
                          str(write(tmp_path, r))], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    run = tmp_path / "run"
    assert len(lines(run / "metrics.jsonl")) == 2 and all("val_ema_top1" in e for e in lines(run / "metrics.jsonl"))
    assert (run / "csv" / "train.csv").read_text().count("\n") == 1 + 6  # header + 3 steps x 2 epochs, once
    result = json.loads((run / "result.json").read_text())
    assert result["exported"] in ("model", "ema") and result["ema_folded"]["images"] == result["folded"]["images"]
    assert two.stdout.count("exported: the") == 1
