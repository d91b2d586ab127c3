"""The fine-tuning loop, driven by HF accelerate: one process, many GPUs, or CPU ranks (gloo).

    recipe -> create_model -> convert -> train (accelerate) -> fold -> model.safetensors

Stochastic depth and data parallelism: every rank converts with the recipe's seed, so the
gates' generators agree and every rank drops the same branches at the same step (the paper's
semantics for one large batch). Branches dropped everywhere get no gradient; DDP is told so
(``find_unused_parameters=True``) and leaves their ``grad`` as None, so the optimizer skips
them exactly as in one process.

Run directory: ``recipe.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch),
``checkpoints/epoch_N`` (accelerate state: model, optimizer, scheduler, RNG, gate generator;
written to a temporary directory and renamed, so a crash never corrupts the last good one),
``model.safetensors`` (folded, the CLI's format), ``result.json``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import yaml

from .errors import SurgeryError
from .recipes import Recipe


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    train_seconds: float
    gated: dict[str, float]    # test metrics of the gated model (eval mode)
    folded: dict[str, float]   # test metrics of the folded model
    model_path: str


class _EpochState:
    """What the loop needs to resume, saved beside accelerate's state."""

    def __init__(self):
        self.epoch = 0   # epochs completed
        self.step = 0    # optimizer steps completed in the current epoch (mid-epoch checkpoints)
        self.best = -1.0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "best": self.best}

    def load_state_dict(self, d):
        self.epoch, self.step, self.best = int(d["epoch"]), int(d.get("step", 0)), float(d["best"])


def _lr_lambda(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    s = recipe.schedule
    total = recipe.train.epochs * steps_per_epoch
    warm = s.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        epoch = step / steps_per_epoch
        if s.name == "step":
            return s.gamma ** sum(epoch >= m for m in s.milestones)
        if s.name == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return f


def _optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr)


def evaluate(model: nn.Module, loader, accelerator=None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``."""
    model.eval()
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            if accelerator is not None:
                logits, y = accelerator.gather_for_metrics((logits, y))
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            n += y.numel()
    return {"top1": 100.0 * correct1 / max(n, 1), "top5": 100.0 * correct5 / max(n, 1),
            "loss": loss_sum / max(n, 1), "images": n}


def _save_state_atomically(accelerator, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    accelerator.wait_for_everyone()


def _checkpoint_key(p: Path) -> tuple[int, int] | None:
    """``epoch_E`` (E epochs done) or ``epoch_E_step_S`` (E done, S steps into the next)."""
    parts = p.name.split("_")
    if len(parts) == 2 and parts[0] == "epoch" and parts[1].isdigit():
        return int(parts[1]), 0
    if len(parts) == 4 and parts[0] == "epoch" and parts[2] == "step" and parts[1].isdigit() and parts[3].isdigit():
        return int(parts[1]), int(parts[3])
    return None


def _checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in training order (``best`` is not one of them)."""
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir() if p.is_dir() and _checkpoint_key(p) is not None]
    return sorted(found, key=_checkpoint_key)


def _fresh_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3`` ... when it already holds a run (never overwrite one).
    Every rank computes the same answer before any of them writes."""
    if not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while Path(f"{path}-{n}").exists():
        n += 1
    return Path(f"{path}-{n}")


def _prune(run_dir: Path, keep: int, main: bool) -> None:
    if main:
        for old in _checkpoints(run_dir)[:-max(1, keep)]:
            shutil.rmtree(old)


def finetune(recipe: Recipe, *, resume: str | Path | None = None, console=None) -> TrainResult:
    """Train ``recipe`` end to end and return the gated and folded test metrics."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import checkpoint as ckpt
    from .data import SeededAugmentation, load_datasets, num_classes_of
    from .fold import fold
    from .models import create_model
    from .surgery import controller, convert, set_drop_rate

    t = recipe.train
    if resume and not _checkpoints(Path(resume)):
        raise SurgeryError(f"--resume {resume}: no checkpoints/epoch_N directory there to resume from")
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        cpu=t.cpu or not torch.cuda.is_available(),
        # one permutation per epoch from the recipe's seed, whatever the number of processes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    console = console or Console()
    main = accelerator.is_main_process
    if recipe.stochastic_depth.enabled and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise SurgeryError(f"stochastic depth skips layers, but under {accelerator.distributed_type.name} "
                           f"every rank must run every layer to gather its parameters; use DDP "
                           f"(accelerate launch --multi_gpu) or set stochastic_depth.enabled=false")
    run_dir = Path(resume) if resume else _fresh_dir(Path(t.output_dir))
    accelerator.wait_for_everyone()  # every rank has chosen the directory before any writes
    set_seed(t.seed)

    d, m = recipe.data, recipe.model
    num_classes = m.num_classes or num_classes_of(d.dataset)
    if num_classes is None:  # imagefolder: count the classes
        num_classes = load_datasets(d.dataset, d.data_dir, image_size=d.image_size).num_classes
    model = create_model(m.name, pretrained=m.pretrained, weights=m.weights,
                         num_classes=num_classes, **m.kwargs)
    mean, std = d.mean, d.std
    if d.normalize == "model" and mean is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
        std = d.std or list(cfg.get("std", (0.229, 0.224, 0.225)))
    splits = load_datasets(d.dataset, d.data_dir, download=d.download, image_size=d.image_size,
                           val_split=d.val_split, seed=t.seed, mean=mean, std=std,
                           augment=d.augment, train_split=d.train_split)
    sd = recipe.stochastic_depth
    if sd.enabled:
        start_rate = 0.0 if sd.warmup_epochs > 0 else sd.drop_rate
        model = convert(model, drop_rate=start_rate, schedule=sd.schedule, mode=sd.mode,
                        scaling=sd.scaling, include=sd.include, exclude=sd.exclude, seed=t.seed,
                        inplace=True)
        if sd.warmup_epochs > 0:
            set_drop_rate(model, 0.0)
    loader_kw = dict(num_workers=recipe.data.workers, pin_memory=torch.cuda.is_available())
    train_set = SeededAugmentation(splits.train, t.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=t.batch_size, shuffle=True,
                                               drop_last=len(train_set) > t.batch_size, **loader_kw)
    eval_set = splits.val if splits.val is not None else splits.test
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=t.eval_batch_size, **loader_kw)
    test_loader = torch.utils.data.DataLoader(splits.test, batch_size=t.eval_batch_size, **loader_kw)
    optimizer = _optimizer(recipe, model)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / t.grad_accum)
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe, steps_per_epoch))
    model, optimizer, train_loader, eval_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, test_loader, scheduler)
    state = _EpochState()
    accelerator.register_for_checkpointing(state)
    raw = accelerator.unwrap_model(model)
    if sd.enabled:
        accelerator.register_for_checkpointing(controller(raw))

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if resume:
        last = _checkpoints(run_dir)[-1]
        accelerator.load_state(str(last))
        if main:
            console.print(f"resumed from {last} (epoch {state.epoch} done"
                          + (f", {state.step} steps into the next)" if state.step else ")"))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    start = time.perf_counter()
    for epoch in range(state.epoch, t.epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)  # the epoch's permutation, resumed or not
        train_set.set_epoch(epoch)  # and its augmentations
        model.train()
        seen, loss_sum, steps = 0, 0.0, 0
        batches = train_loader
        if state.step:  # resuming mid-epoch: skip what was already trained on
            batches = accelerator.skip_first_batches(train_loader, state.step * t.grad_accum)
            steps = state.step
        t0 = time.perf_counter()
        progress = Progress(TextColumn(f"epoch {epoch + 1}/{t.epochs}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            console=console, disable=not (main and console.is_terminal),
                            transient=True)
        with progress:
            task = progress.add_task("train", total=steps_per_epoch, info="")
            for i, (x, y) in enumerate(batches, start=steps * t.grad_accum):
                if sd.enabled and sd.warmup_epochs > 0:
                    frac = min(1.0, (epoch + i / max(1, len(train_loader))) / sd.warmup_epochs)
                    set_drop_rate(raw, sd.drop_rate * frac)
                with accelerator.accumulate(model):
                    loss = loss_fn(model(x), y)
                    accelerator.backward(loss)
                    if t.clip_grad and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item() * y.shape[0]
                seen += y.shape[0]
                if accelerator.sync_gradients:
                    steps += 1
                    progress.update(task, advance=1, info=(
                        f"loss {loss_sum / seen:.3f} lr {scheduler.get_last_lr()[0]:.4g} "
                        f"{seen * accelerator.num_processes / (time.perf_counter() - t0):.0f} img/s"))
                    if t.checkpoint_every_steps and steps % t.checkpoint_every_steps == 0 \
                            and steps < steps_per_epoch:
                        state.step = steps
                        _save_state_atomically(accelerator, run_dir / "checkpoints" / f"epoch_{epoch}_step_{steps}")
                        _prune(run_dir, t.keep_checkpoints, main)
                    if t.max_steps_per_epoch and steps >= t.max_steps_per_epoch:
                        break
        metrics = evaluate(model, eval_loader, accelerator)
        state.epoch, state.step = epoch + 1, 0
        improved = metrics["top1"] > state.best
        state.best = max(state.best, metrics["top1"])
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                  "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - t0,
                  "eval_split": "val" if splits.val is not None else "test",
                  **{f"eval_{k}": v for k, v in metrics.items()}}
        if sd.enabled:
            record["drop_rate"] = controller(raw).drop_rate
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            console.print(f"epoch {epoch + 1}/{t.epochs}: loss {record['train_loss']:.4f}, "
                          f"{record['eval_split']} top-1 {metrics['top1']:.2f}%, "
                          f"{record['epoch_seconds']:.1f} s")
        if t.checkpoint_every and ((epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs):
            _save_state_atomically(accelerator, run_dir / "checkpoints" / f"epoch_{epoch + 1}")
            _prune(run_dir, t.keep_checkpoints, main)
        if improved and t.checkpoint_every:
            _save_state_atomically(accelerator, run_dir / "checkpoints" / "best")
    train_seconds = time.perf_counter() - start

    gated = evaluate(model, test_loader, accelerator)
    model_path = run_dir / "model.safetensors"
    final = raw
    if sd.enabled:
        final = fold(raw)
    folded_metrics = evaluate(accelerator.prepare_model(final, evaluation_mode=True), test_loader,
                              accelerator) if sd.enabled else gated
    result = TrainResult(run_dir=str(run_dir), epochs=t.epochs, train_seconds=train_seconds,
                         gated=gated, folded=folded_metrics, model_path=str(model_path))
    if main:
        ckpt.save(final.to("cpu") if sd.enabled else final, model_path)
        (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    accelerator.wait_for_everyone()
    if t.require_top1 is not None:
        worst = min(gated["top1"], folded_metrics["top1"])
        if worst < t.require_top1:
            raise SurgeryError(f"test top-1 {worst:.2f}% (gated {gated['top1']:.2f}%, folded "
                               f"{folded_metrics['top1']:.2f}%) is below the recipe's "
                               f"train.require_top1 = {t.require_top1}")
    return result
