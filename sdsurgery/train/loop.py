"""The fine-tuning loop, driven by HF accelerate: one process, many GPUs, or CPU ranks (gloo).

    recipe -> create_model -> convert -> train (accelerate) -> fold -> model.safetensors

Stochastic depth and data parallelism: every rank converts with the recipe's seed, so the
gates' generators agree and every rank drops the same branches at the same step (the paper's
semantics for one large batch). Branches dropped everywhere get no gradient; DDP is told so
(``find_unused_parameters=True``) and leaves their ``grad`` as None, so the optimizer skips
them exactly as in one process.

Run directory (locked while a run writes to it, see :mod:`sdsurgery.train.rundir`): ``recipe.yaml``
(resolved), ``metrics.jsonl`` (one line per epoch, valid JSON), ``checkpoints/epoch_N`` (model,
optimizer, scheduler, RNG, gate generator, in safetensors and JSON only, see
:mod:`sdsurgery.train.resume`; written to a temporary directory and renamed, so a crash never corrupts
the last good one), ``model.safetensors`` (folded, the CLI's format), ``result.json``.

Divergence: a non-finite loss or gradient norm stops the run before the optimizer applies it
(``train.skip_nonfinite`` may skip a few such steps first); non-finite weights are never
checkpointed or exported.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ..errors import SurgeryError, first_line
from ..flops import flop_report
from ..fold import fold
from ..gate.surgery import controller, convert, gates, set_drop_rate
from ..io import checkpoint as ckpt
from ..io.checkpoint import CheckpointError
from ..io.models import WeightsError, check_keys, create_model, source_of
from . import resume as resume_state
from . import rundir
from .callbacks import stochastic_depth_callbacks
from . import parts, trackers
from .data import SeededAugmentation, load_datasets, num_classes_of
from .recipes import Recipe

__all__ = ["TrainResult", "DivergenceError", "Interrupted", "evaluate", "EvalResult",
           "checkpoint_file", "evaluate_checkpoint", "finetune"]


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    train_seconds: float
    gated: dict[str, float]    # test metrics of the gated model (eval mode), evaluated once
    folded: dict[str, float]   # test metrics of the folded model (the exported one)
    model_path: str
    best_val_top1: float | None = None  # the best epoch's validation top-1 (None: no val split)
    best_epoch: int | None = None       # checkpoints/best is that epoch's state
    ema_folded: dict[str, float] | None = None  # test metrics of the folded EMA (ema.enabled)
    exported: str = "model"             # model | ema: the better on validation, in model.safetensors
    exported_because: str = ""          # the validation top-1s it was chosen on


class DivergenceError(SurgeryError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite is saved."""


class Interrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C); the message says what was saved."""


class _EpochState:
    """The loop's counters, saved as JSON in every checkpoint."""

    def __init__(self):
        self.epoch = 0      # epochs completed
        self.step = 0       # optimizer steps completed in the current epoch (mid-epoch checkpoints)
        self.best = -1.0
        self.skipped = 0    # non-finite steps skipped (train.skip_nonfinite)
        self.best_epoch: int | None = None  # the epoch of the best validation top-1

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "best": self.best, "skipped": self.skipped,
                "best_epoch": self.best_epoch}

    def load_state_dict(self, d):
        self.epoch, self.step, self.best = int(d["epoch"]), int(d.get("step", 0)), float(d["best"])
        self.skipped = int(d.get("skipped", 0))
        self.best_epoch = None if d.get("best_epoch") is None else int(d["best_epoch"])


def evaluate(model: nn.Module, loader, accelerator=None, *, channels_last: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent, timm's ``accuracy``) and mean cross-entropy of ``model``
    on ``loader``."""
    from timm.utils import accuracy

    model.eval()
    correct1 = correct5 = 0.0
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            if accelerator is not None:
                logits, y = accelerator.gather_for_metrics((logits, y))
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            top1, top5 = accuracy(logits, y, topk=(1, 5))  # timm clips k to the classes
            correct1 += float(top1) * y.numel() / 100.0
            correct5 += float(top5) * y.numel() / 100.0
            n += y.numel()
    return {"top1": 100.0 * round(correct1) / max(n, 1), "top5": 100.0 * round(correct5) / max(n, 1),
            "loss": loss_sum / max(n, 1), "images": n}


@dataclass
class EvalResult:
    checkpoint: str                 # the .safetensors file evaluated
    dataset: str
    metrics: dict[str, float]       # top1, top5 (percent), loss, images: on the test split
    preprocessing: dict[str, Any]   # what was used
    notes: list[str]                # where the request and the recorded preprocessing differ


def checkpoint_file(target: str | Path) -> Path:
    """The ``.safetensors`` file a target names: the file itself, a run directory's exported
    ``model.safetensors``, or a training checkpoint directory's (``checkpoints/best``)."""
    target = Path(target)
    if target.is_dir():
        if (target / "model.safetensors").is_file():
            return target / "model.safetensors"
        if (target / resume_state.CHECKPOINTS).is_dir():
            raise CheckpointError(f"{target} has no model.safetensors (the run has not finished); "
                                  f"evaluate {target / resume_state.CHECKPOINTS}/best or epoch_N")
        raise CheckpointError(f"{target} is neither a .safetensors file, a run directory nor a "
                              f"checkpoint directory")
    return target


def evaluate_checkpoint(target: str | Path, *, dataset: str | None = None, data_dir: str | Path = "data",
                        image_size: int | None = None, batch_size: int = 256, device: str | None = None,
                        download: bool = False, factory=None, trust_code: bool = False) -> EvalResult:
    """Top-1 / top-5 / loss of a checkpoint on a dataset's test split, prepared as recorded in
    the checkpoint (dataset, image size, mean/std, crop) unless told otherwise; the differences
    are returned as notes. Runs through accelerate on ``device`` (default: a GPU when present)."""
    from accelerate import Accelerator

    path = checkpoint_file(target)
    meta = ckpt.read_metadata(path)
    rec = meta.get("preprocessing")
    notes = []
    if rec is None:
        if dataset is None:
            raise CheckpointError(f"{path} does not record the data it was trained on; pass --dataset "
                                  f"(and --image-size if it was not the dataset's own)")
        notes.append("the checkpoint records no preprocessing: the dataset's own size and "
                     "normalisation are used")
        mean = std = None
    else:
        if dataset is not None and dataset != rec["dataset"]:
            notes.append(f"--dataset {dataset}: the model was trained on {rec['dataset']}")
        if image_size is not None and image_size != rec["image_size"]:
            notes.append(f"--image-size {image_size}: the model was trained at {rec['image_size']} px")
        dataset = dataset or rec["dataset"]
        image_size = image_size or rec["image_size"]
        mean, std = rec["mean"], rec["std"]
        resize = {"interpolation": rec.get("interpolation") or "bilinear", "crop_pct": rec.get("crop_pct")}
    model = ckpt.load(path, factory=factory, trust_code=trust_code)
    splits = load_datasets(dataset, data_dir, image_size=image_size, mean=mean, std=std, download=download,
                           **(resize if rec is not None else {}))
    accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    loader = torch.utils.data.DataLoader(splits.test, batch_size=batch_size)
    model, loader = accelerator.prepare(model, loader)
    metrics = evaluate(model, loader, accelerator)
    return EvalResult(checkpoint=str(path), dataset=dataset, metrics=metrics,
                      preprocessing=splits.preprocessing.to_dict(), notes=notes)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


_PRINT_EVERY_S = 10.0  # progress lines without a terminal: at most one per this many seconds


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def finetune(recipe: Recipe, *, resume: str | Path | None = None, console=None) -> TrainResult:
    """Train ``recipe`` end to end and return the gated and folded test metrics.

    Raises DivergenceError when the loss, the gradients or the weights become non-finite
    (nothing non-finite is saved or exported), Interrupted on Ctrl-C (saying what was saved),
    RunDirError when another run holds the directory."""
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, TorchDynamoPlugin,
                                  broadcast)
    from rich.console import Console

    t = recipe.train
    trackers.check_available(t.log_with)  # before anything is built or written
    if resume and not resume_state.checkpoints(Path(resume)):
        raise SurgeryError(f"--resume {resume}: no checkpoints/epoch_N directory there to resume from")
    accelerator = Accelerator(
        # "auto": whatever `accelerate launch --mixed_precision` / `accelerate config` chose
        mixed_precision=None if t.mixed_precision == "auto" else t.mixed_precision,
        # compile: torch.compile in prepare (else whatever `accelerate launch --dynamo_backend` chose)
        dynamo_plugin=TorchDynamoPlugin(backend=t.compile_backend) if t.compile else None,
        gradient_accumulation_steps=t.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step by the loop
        cpu=t.cpu or not torch.cuda.is_available(),
        # one permutation per epoch from the recipe's seed, whatever the number of processes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    console = console or Console()
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise SurgeryError(f"sdsurgery finetune runs on one process or with DDP (accelerate launch "
                           f"--multi_gpu, torchrun), not under {accelerator.distributed_type.name}: "
                           f"stochastic depth skips layers, but there every rank must run every "
                           f"layer to gather its parameters")
    # The main process claims (locks) the run directory; the others learn which one it got.
    lock, suffix, run_dir = None, torch.tensor([1], device=accelerator.device), None
    try:
        if accelerator.is_main_process:
            lock, n = rundir.claim(Path(resume or t.output_dir), resume=bool(resume))
            suffix[0] = n
            if lock.crashed_pid:
                console.print(f"note: the last run in {lock.directory} (PID {lock.crashed_pid}) "
                              f"did not end cleanly", markup=False, soft_wrap=True)
        if accelerator.num_processes > 1:
            suffix = broadcast(suffix)
        n = int(suffix[0])
        run_dir = Path(resume) if resume else Path(t.output_dir if n == 1 else f"{t.output_dir}-{n}")
        try:
            return _Run(recipe, accelerator, run_dir, console).train(bool(resume))
        finally:
            # flush and close the trackers however the run ends (accelerator.end_training()
            # would also destroy the process group, which the caller may still use)
            for tracker in accelerator.trackers:
                tracker.finish()
    except KeyboardInterrupt:
        last = resume_state.checkpoints(run_dir)[-1:] if run_dir is not None else []
        raise Interrupted(f"interrupted; the last checkpoint is {last[0]} (continue with --resume "
                          f"{run_dir})" if last else "interrupted; no checkpoint was saved") from None
    finally:
        if lock is not None:
            lock.release()


class _Reporting:
    """What a run tells a person: the start-up summary, steps.jsonl and progress lines."""

    def _summary(self) -> None:
        """What a person needs to see when a run starts (main process only)."""
        recipe, t, a = self.recipe, self.recipe.train, self.accelerator
        m, sd, p = recipe.model, recipe.stochastic_depth, self.preprocessing
        source = (f"weights {m.weights}" if m.weights else "pretrained weights" if m.pretrained
                  else "random weights")
        lines = [f"model: {self.spec}, {source}, {p['num_classes']} classes"]
        if sd.enabled:
            ctrl = controller(self.raw)
            now = ctrl.drop_rate
            set_drop_rate(self.raw, sd.drop_rate)  # the saving at the target rate, after warm-up
            try:
                size = p["image_size"]
                device = next(self.raw.parameters()).device
                report = flop_report(self.raw, torch.zeros(1, 3, size, size, device=device))
            finally:
                set_drop_rate(self.raw, now)
            warm = f", reached after a {sd.warmup_epochs:g}-epoch warm-up" if sd.warmup_epochs else ""
            lines.append(f"stochastic depth: {len(gates(self.raw))} of {ctrl.count} residual branches "
                         f"gated ({sd.mode} mode, {sd.schedule} to {sd.drop_rate:g}{warm}, {sd.scaling} "
                         f"scaling); expected training compute {100 * report.expected_fraction:.1f}% "
                         f"of the full model (FLOPs at {size} px)")
        sizes = self.split_sizes
        lines.append(f"data: {p['dataset']} at {p['image_size']} px: {sizes['train']} train, "
                     f"{sizes['val']} val, {sizes['test']} test images")
        n = a.num_processes
        lines.append(f"running: {n} process{'es' if n > 1 else ''} on {a.device.type}, precision "
                     f"{a.mixed_precision}, global batch {t.batch_size * n * t.grad_accum} "
                     f"({t.batch_size} per process x {n} x grad_accum {t.grad_accum}), "
                     f"{self.steps_per_epoch} steps per epoch x {t.epochs} epochs")
        lines.append(f"run directory: {self.run_dir.resolve()}")
        for line in lines:
            self.console.print(line, markup=False, soft_wrap=True)

    def _branch_calls(self) -> tuple[int, float]:
        """Gated branch calls in training so far, and how many of them ran."""
        if not self.recipe.stochastic_depth.enabled:
            return 0, 0.0
        ctrl = controller(self.raw)
        return ctrl.calls, ctrl.ran

    def _start_trackers(self, resumed: bool) -> None:
        """``train.log_with``'s trackers (main process), logging through ``accelerator.log``. A
        tracker that cannot start ends the run on every process in one line; a new run's
        directory is emptied back to its lock."""
        names = self.recipe.train.log_with
        if not names:
            return
        failed: Exception | None = None
        if self.main:
            at = self._update(self.state.epoch, self.state.step) if resumed else None
            try:
                started = trackers.start_trackers(names, self.run_dir, at, trackers.flat_config(self.recipe.to_dict()))
                self.accelerator.trackers.extend(started)  # what accelerator.log writes to
            except trackers.TrackerError as e:
                failed = e
                if not resumed:
                    try:
                        rundir.empty(self.run_dir)
                    except OSError:  # a tracker's own process still writing there: leave it
                        pass
        if self.accelerator.num_processes > 1:  # the other ranks stop too, instead of a collective failing
            flag = torch.tensor([float(failed is not None)], device=self.accelerator.device)
            any_failed = self.accelerator.reduce(flag, reduction="sum")[0] > 0  # on every rank
            if failed is None and any_failed:
                raise trackers.TrackerError("train.log_with: the main process's trackers did not start "
                                            "(its error says why)")
        if failed is not None:
            raise failed

    def _mean_loss(self, total: float, count: int) -> float | None:
        """The mean of a loss summed over ``count`` images on every process (a collective)."""
        both = torch.tensor([total, float(count)], device=self.accelerator.device, dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            both = self.accelerator.reduce(both, reduction="sum")
        return float(both[0] / both[1]) if both[1] > 0 else None

    def _log_step(self, epoch: int, steps: int, lr: float, window: list) -> None:
        """One line of ``steps.jsonl`` (and, without a terminal, of the console) every
        ``train.log_every_steps`` optimizer steps: global step, lr, mean loss, drop rate, speed."""
        t = self.recipe.train
        loss = self._mean_loss(window[0], window[1])
        images = window[1] * self.accelerator.num_processes
        now = time.perf_counter()
        speed = images / max(now - window[2], 1e-9)
        calls, ran = self._branch_calls()
        window_calls, window_ran = calls - window[3], ran - window[4]
        window[:] = [0.0, 0, now, calls, ran]
        if not self.main:
            return
        step = epoch * self.steps_per_epoch + steps
        record = {"epoch": epoch + 1, "step": steps, "global_step": step, "lr": lr, "loss": loss,
                  "images_per_second": speed}
        if self.recipe.stochastic_depth.enabled:
            record["drop_rate"] = controller(self.raw).drop_rate
            # of the gated branch calls in the window, the share that ran (1 - the realised drop rate)
            record["branches_run"] = window_ran / window_calls if window_calls else None
        rundir.append_metrics(self.run_dir, record, rundir.STEPS)
        self.accelerator.log({f"train/{k}": v for k, v in record.items()
                              if k not in ("epoch", "step", "global_step")}, step=step)
        if not self.console.is_terminal and now - self.printed >= _PRINT_EVERY_S:
            # log files and schedulers get a line instead of a bar (not more often than this)
            self.printed = now
            total = t.epochs * self.steps_per_epoch
            done = step - self.first_step
            eta = (now - self.started) / max(done, 1) * (total - step)
            self.console.print(f"epoch {epoch + 1}/{t.epochs} step {steps}/{self.steps_per_epoch}: "
                               f"loss {loss if loss is not None else float('nan'):.4f} lr {lr:.4g} "
                               f"{speed:.0f} img/s, ETA {_clock(eta)}", markup=False, soft_wrap=True)


class _Checkpointing:
    """Saving and resuming a run's whole state (code-free files, see :mod:`.resume`)."""

    def _save(self, name: str) -> None:
        """A checkpoint of everything the loop needs to continue exactly (code-free files)."""
        if not _all_finite(self.raw):
            raise self._diverged("the weights are no longer finite")
        states: dict[str, Any] = {"optimizer": self.optimizer.state_dict(),
                                  "scheduler": parts.scheduler_state(self.scheduler)}
        if self.ema is not None:
            states["ema"] = self.ema.module.state_dict()
        if self.recipe.stochastic_depth.enabled:
            states["gates"] = controller(self.raw).state_dict()
        if self.accelerator.scaler is not None:
            states["scaler"] = self.accelerator.scaler.state_dict()
        meta = {ckpt.META_KEY: json.dumps(ckpt.describe(self.raw, preprocessing=self.preprocessing))}
        resume_state.write(self.run_dir / resume_state.CHECKPOINTS / name, model=self.raw,
                           model_metadata=meta, states=states, loop=self.state.state_dict(),
                           rng=resume_state.capture_rng(), rank=self.accelerator.process_index,
                           main=self.main, barrier=self.accelerator.wait_for_everyone)
        if self.main and name != "best":
            resume_state.prune(self.run_dir, self.recipe.train.keep_checkpoints)

    def _resume(self) -> None:
        """Continue from the newest checkpoint that reads back whole; older ones are tried when
        the newest is damaged (saying so)."""
        for line in resume_state.tidy(self.run_dir) if self.main else []:
            self.console.print(f"note: checkpoints: {line}", markup=False, soft_wrap=True)
        self.accelerator.wait_for_everyone()
        problems = []
        for directory in reversed(resume_state.checkpoints(self.run_dir)):
            try:
                ck = resume_state.read(directory, self.accelerator.process_index)
                check_keys(self.raw, ck.model, str(directory / "model.safetensors"))
                break
            except (CheckpointError, WeightsError) as e:
                problems.append(str(e))
                if self.main:
                    self.console.print(f"warning: {e}; trying the one before", markup=False, soft_wrap=True)
        else:
            raise CheckpointError(f"--resume {self.run_dir}: no checkpoint there can be resumed "
                                  f"({problems[0] if problems else 'none found'})")
        try:
            self.raw.load_state_dict(ck.model, strict=True)
            self.optimizer.load_state_dict(ck.states["optimizer"])
            parts.load_scheduler_state(self.scheduler, ck.states["scheduler"])
            if self.ema is not None:
                self.ema.module.load_state_dict(ck.states["ema"], strict=True)
            if self.recipe.stochastic_depth.enabled:
                controller(self.raw).load_state_dict(ck.states["gates"])
            if self.accelerator.scaler is not None and "scaler" in ck.states:
                self.accelerator.scaler.load_state_dict(ck.states["scaler"])
            self.state.load_state_dict(ck.loop)
            # the recipe's schedule at the update count reached (a longer run stretches it)
            parts.step_scheduler(self.scheduler, update=self._update(self.state.epoch, self.state.step))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ck.directory} does not fit this run's recipe "
                                  f"({first_line(e, with_type=True)})") from e
        if ck.rng is not None:
            resume_state.restore_rng(ck.rng)
        if self.main:
            dropped = rundir.truncate_metrics(self.run_dir, self.state.epoch)
            rundir.truncate_metrics(self.run_dir, self.state.epoch * self.steps_per_epoch + self.state.step,
                                    rundir.STEPS, key="global_step")
            self.console.print(f"resumed from {ck.directory} (epoch {self.state.epoch} done"
                               + (f", {self.state.step} steps into the next)" if self.state.step else ")")
                               + (f"; dropped {dropped} metrics lines written after it" if dropped else ""),
                               markup=False, soft_wrap=True)

    def _diverged(self, what: str, epoch: int | None = None, step: int | None = None) -> DivergenceError:
        t, o = self.recipe.train, self.recipe.optimizer
        where = f" at epoch {epoch + 1}, step {step}" if epoch is not None else ""
        hint = "set train.clip_grad (e.g. 1.0)" if not t.clip_grad else f"lower train.clip_grad (now {t.clip_grad:g})"
        last = resume_state.checkpoints(self.run_dir)[-1:]
        kept = (f"the last checkpoint, {last[0].relative_to(self.run_dir)}, is kept (--resume "
                f"{self.run_dir} continues from it)" if last else "nothing was saved")
        return DivergenceError(f"training diverged{where}: {what}; {kept}; lower optimizer.lr (now "
                               f"{o.lr:g}) or {hint}, or let train.skip_nonfinite skip a few bad steps")


class _Setup:
    """Building a run from its recipe: model, conversion, data, loaders, optimizer."""

    def _build(self) -> None:
        from accelerate.utils import set_seed

        recipe, t, accelerator = self.recipe, self.recipe.train, self.accelerator
        set_seed(t.seed)
        d, m = recipe.data, recipe.model
        num_classes = m.num_classes or num_classes_of(d.dataset)
        if num_classes is None:  # imagefolder: count the classes
            num_classes = load_datasets(d.dataset, d.data_dir, image_size=d.image_size).num_classes
        try:
            model = create_model(m.name, pretrained=m.pretrained, weights=m.weights,
                                 num_classes=num_classes, **m.kwargs)
        except WeightsError as e:
            if not m.pretrained or m.weights:
                raise
            what = str(e).split("; use ")[0]  # the reason, without the convert/inspect options
            raise WeightsError(f"{what}; train from random weights with --set model.pretrained=false, "
                               f"or give a local file with --set model.weights=FILE") from e
        splits = self._datasets(model)
        self._check_input_size(model)
        model = self._gated(model)
        if t.grad_checkpointing:
            if not callable(getattr(model, "set_grad_checkpointing", None)):
                raise SurgeryError(f"train.grad_checkpointing: {type(model).__name__} has no "
                                   f"set_grad_checkpointing() (timm models have it); drop the key")
            # recomputed blocks replay their gate's decision: dropped branches stay skipped
            model.set_grad_checkpointing(True)
        self._build_loaders(model, splits)

    def _check_input_size(self, model: nn.Module) -> None:
        """One image at the data's size through the model (on its device, under the run's
        autocast), before anything is converted or trained: a model built for another size fails
        here in one line, not in a traceback at the first step."""
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

        def runs_at(size: int) -> Exception | None:
            try:
                with torch.no_grad(), self.accelerator.autocast():
                    model(torch.zeros(1, 3, size, size, device=device))
            except Exception as e:
                return e
            return None

        size, modes = self.preprocessing["image_size"], [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            error = runs_at(size)
            if error is None:
                return
            cfg = getattr(model, "pretrained_cfg", None) or {}
            other = int(cfg["input_size"][-1]) if "input_size" in cfg else None
            other_runs = other not in (None, size) and runs_at(other) is None
        finally:
            for m, training in modes:
                m.training = training
        # the size is named as the cause only where another size runs
        what, fix = ((f"cannot take the data's {size} px images (it takes {other} px)",
                      f"set data.image_size: {other}") if other_runs else
                     (f"fails on one of the data's {size} px images",
                      "if it is built for another input size, set data.image_size to it"))
        raise SurgeryError(f"model {self.recipe.model.name} {what}: {first_line(error, with_type=True).rstrip('.')}; "
                           f"{fix}, or build it for {size} px with model.kwargs (timm ViTs: "
                           f"{{img_size: {size}}})") from error

    def _gated(self, model: nn.Module) -> nn.Module:
        """``model`` converted as the recipe says (at drop rate 0 when it warms up)."""
        sd, t = self.recipe.stochastic_depth, self.recipe.train
        if sd.enabled:
            start_rate = 0.0 if sd.warmup_epochs > 0 else sd.drop_rate
            model = convert(model, drop_rate=start_rate, schedule=sd.schedule, mode=sd.mode,
                            scaling=sd.scaling, include=sd.include, exclude=sd.exclude, seed=t.seed,
                            inplace=True)
            if sd.warmup_epochs > 0:
                set_drop_rate(model, 0.0)
        return model

    def _datasets(self, model: nn.Module):
        """The recipe's splits, prepared as the recipe (and the model's pretrained data config)
        says: the dataset's own pipeline or timm's transforms."""
        d, t = self.recipe.data, self.recipe.train
        options = parts.data_options(self.recipe, model)
        splits = load_datasets(d.dataset, d.data_dir, download=d.download, val_split=d.val_split, seed=t.seed,
                               augment=d.augment, train_split=d.train_split, **options)
        self.spec = source_of(model).spec
        self.has_val = splits.val is not None
        self.preprocessing = splits.preprocessing.to_dict()
        self.num_classes = splits.num_classes
        return splits

    def _build_loaders(self, model: nn.Module, splits) -> None:
        """Loaders, optimizer and schedule for ``model``, all through accelerate."""
        recipe, t, accelerator = self.recipe, self.recipe.train, self.accelerator
        d = recipe.data
        # On a GPU, loading runs beside the compute; on the CPU, workers would take cores from it
        # (the demo on 2 cores: 57 s with one worker, 43 s without).
        gpu = accelerator.device.type == "cuda"
        workers = d.workers if d.workers is not None else (
            min(8, max(0, (os.cpu_count() or 1) - 1)) if gpu else 0)
        # Augmentation is seeded per image and epoch (SeededAugmentation): workers do not change
        # results. Not persistent: workers hold a copy of the dataset, and set_epoch must reach it.
        loader_kw = dict(num_workers=workers, pin_memory=torch.cuda.is_available())
        self.train_set = SeededAugmentation(splits.train, t.seed)
        train_loader = torch.utils.data.DataLoader(self.train_set, batch_size=t.batch_size, shuffle=True,
                                                   drop_last=len(self.train_set) > t.batch_size, **loader_kw)
        # Without a validation split nothing is evaluated per epoch: "best" is never chosen on
        # the test set, which is evaluated once, at the end.
        eval_loader = (torch.utils.data.DataLoader(splits.val, batch_size=t.eval_batch_size, **loader_kw)
                       if splits.val is not None else None)
        self.split_sizes = {"train": len(splits.train), "val": len(splits.val) if splits.val is not None else 0,
                            "test": len(splits.test)}
        test_loader = torch.utils.data.DataLoader(splits.test, batch_size=t.eval_batch_size, **loader_kw)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = parts.create_optimizer(recipe, model)
        (self.model, self.optimizer, self.train_loader, self.eval_loader,
         self.test_loader) = accelerator.prepare(model, optimizer, train_loader, eval_loader, test_loader)
        # this process's share of the batches, as accelerate shards them (drop_last: the floor)
        steps = math.ceil(len(self.train_loader) / t.grad_accum)
        self.steps_per_epoch = min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps
        # timm's schedulers are stepped by the loop with the global update count, not by accelerate
        self.scheduler = parts.create_scheduler(recipe, optimizer, self.steps_per_epoch)
        self.raw = accelerator.unwrap_model(self.model, keep_torch_compile=False)  # the converted model itself
        self.mixup = parts.create_mixup(recipe, self.num_classes)
        self.loss_fn = parts.create_loss(recipe)
        self.ema = parts.create_ema(recipe, self.raw)


class _Run(_Setup, _Checkpointing, _Reporting):
    """One fine-tuning run: built from the recipe, trained, folded, exported."""

    def __init__(self, recipe: Recipe, accelerator, run_dir: Path, console):
        self.recipe, self.accelerator, self.run_dir, self.console = recipe, accelerator, run_dir, console
        self.main = accelerator.is_main_process
        self.state = _EpochState()

    # ----------------------------------------------------------------------- training
    def _step_is_bad(self, bad_loss: bool, norm: torch.Tensor | None) -> tuple[bool, str]:
        """Whether this optimizer step saw a non-finite loss or gradient on any process."""
        bad_grad = norm is not None and not bool(torch.isfinite(norm))
        flags = torch.tensor([float(bad_loss), float(bad_grad)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        what = [w for w, f in (("the loss is not finite", flags[0]), ("the gradient norm is not finite",
                                                                      flags[1])) if f > 0]
        return bool(what), " and ".join(what)

    def _optimizer_step(self, bad_loss: bool, epoch: int, steps: int) -> float:
        """Clip, check and apply the accumulated gradients; returns the step's learning rate.
        A non-finite loss or gradient norm is skipped (train.skip_nonfinite) or stops the run."""
        t, accelerator = self.recipe.train, self.accelerator
        if t.clip_grad:
            norm = accelerator.clip_grad_norm_(self.model.parameters(), t.clip_grad)
            if accelerator.scaler is not None:
                norm = None  # an fp16 overflow: the scaler skips the step and lowers its scale
        else:  # an AMP scaler skips inf gradients itself
            norm = _grad_norm(self.model) if accelerator.scaler is None else None
        bad, what = self._step_is_bad(bad_loss, norm)
        if bad and self.state.skipped >= t.skip_nonfinite:
            raise self._diverged(what, epoch, steps + 1)
        lr = parts.head_lr(self.optimizer)
        if bad:
            self.state.skipped += 1
            if self.main:
                self.console.print(f"warning: epoch {epoch + 1}, step {steps + 1}: {what}; step "
                                   f"skipped ({self.state.skipped} of train.skip_nonfinite="
                                   f"{t.skip_nonfinite})", markup=False, soft_wrap=True)
        else:
            self.optimizer.step()
            if self.ema is not None and not self.optimizer.step_was_skipped:  # AMP skipped an inf step
                self.ema.update(self.raw, step=self._update(epoch, steps + 1))
        # the schedule is a function of the update count: the same lr after any skip or resume
        parts.step_scheduler(self.scheduler, update=self._update(epoch, steps + 1))
        return lr

    def _update(self, epoch: int, steps: int) -> int:
        """The global optimizer-update count after ``steps`` updates of epoch ``epoch``."""
        return epoch * self.steps_per_epoch + steps

    def _epoch(self, epoch: int) -> tuple[float | None, int, float]:
        """One epoch of training; returns (mean loss over all processes, images seen, seconds).

        The learning rate and the drop-rate warm-up are functions of the global optimizer step
        (``epoch * steps_per_epoch + step``), so they are the same for any number of processes
        and any ``grad_accum`` with the same global batch: the scheduler is stepped once per
        optimizer step (accelerate's own stepping assumes a schedule written for one process
        and steps it ``num_processes`` times)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        t, sd, accelerator = self.recipe.train, self.recipe.stochastic_depth, self.accelerator
        if self.mixup is not None and self.recipe.mixup.off_epoch is not None \
                and epoch >= self.recipe.mixup.off_epoch:
            self.mixup.mixup_enabled = False  # timm's mixup_off_epoch: soft targets, no mixing
        log_every = t.log_every_steps or max(1, self.steps_per_epoch // 10)
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)  # the epoch's permutation, resumed or not
        self.train_set.set_epoch(epoch)  # and its augmentations
        self.model.train()
        seen, loss_sum, steps, bad_loss = 0, 0.0, 0, False
        batches = self.train_loader
        if self.state.step:  # resuming mid-epoch: skip what was already trained on
            batches = accelerator.skip_first_batches(self.train_loader, self.state.step * t.grad_accum)
            steps = self.state.step
        t0 = time.perf_counter()
        window = [0.0, 0, t0, *self._branch_calls()]  # loss sum, images, start, gate calls, branches run
        progress = Progress(TextColumn(f"epoch {epoch + 1}/{t.epochs}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not (self.main and self.console.is_terminal),
                            transient=True)
        with progress:
            task = progress.add_task("train", total=self.steps_per_epoch, completed=steps, info="")
            callbacks = stochastic_depth_callbacks(self.recipe, self.raw, self.steps_per_epoch)
            for micro, (x, y) in enumerate(batches):
                for cb in callbacks:
                    cb.before_batch(epoch, steps, micro)
                if t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                target = y
                if self.mixup is not None:
                    x, target = self.mixup(x, y)  # soft targets
                with accelerator.accumulate(self.model):
                    loss = self.loss_fn(self.model(x), target)
                    accelerator.backward(loss)
                    value = loss.item()
                    bad_loss = bad_loss or not math.isfinite(value)
                    if accelerator.sync_gradients:
                        lr = self._optimizer_step(bad_loss, epoch, steps)
                        bad_loss = False
                    self.optimizer.zero_grad(set_to_none=True)
                if math.isfinite(value):
                    loss_sum += value * y.shape[0]
                    window[0] += value * y.shape[0]
                    window[1] += y.shape[0]
                seen += y.shape[0]
                if accelerator.sync_gradients:
                    steps += 1
                    progress.update(task, advance=1, info=(
                        f"loss {loss_sum / seen:.3f} lr {lr:.4g} "
                        f"{seen * accelerator.num_processes / (time.perf_counter() - t0):.0f} img/s"))
                    if steps % log_every == 0 or steps == self.steps_per_epoch:
                        self._log_step(epoch, steps, lr, window)
                    if t.checkpoint_every_steps and steps % t.checkpoint_every_steps == 0 \
                            and steps < self.steps_per_epoch:
                        self.state.step = steps
                        self._save(f"epoch_{epoch}_step_{steps}")
                    if steps >= self.steps_per_epoch:
                        break
        return self._mean_loss(loss_sum, seen), seen, time.perf_counter() - t0

    def train(self, resume: bool) -> TrainResult:
        t, sd, accelerator = self.recipe.train, self.recipe.stochastic_depth, self.accelerator
        self._build()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        if resume:
            self._resume()
        self._start_trackers(bool(resume))
        if self.main:
            self._summary()
        if self.main and not self.has_val:
            self.console.print("note: no validation split (data.val_split: 0): no 'best' checkpoint is "
                               "kept; the test set is evaluated once, at the end", markup=False, soft_wrap=True)
        start = self.started = time.perf_counter()
        self.printed = -math.inf  # the first progress line at once, then one per _PRINT_EVERY_S
        self.first_step = self.state.epoch * self.steps_per_epoch + self.state.step
        for epoch in range(self.state.epoch, t.epochs):
            train_loss, seen, seconds = self._epoch(epoch)
            if not _all_finite(self.raw):
                raise self._diverged("the weights are no longer finite", epoch, self.steps_per_epoch)
            metrics = self._evaluate(self.model, self.eval_loader) if self.has_val else {}
            if self.has_val and self.ema is not None:
                metrics.update({f"ema_{k}": v for k, v in self._evaluate(self._ema_model(), self.eval_loader).items()})
            if self.scheduler is not None and self.recipe.schedule.name == "plateau":
                parts.step_scheduler(self.scheduler, epoch=epoch + 1, metric=metrics["top1"])
            self.state.epoch, self.state.step = epoch + 1, 0
            improved = self.has_val and metrics["top1"] > self.state.best
            if improved:
                self.state.best, self.state.best_epoch = metrics["top1"], epoch + 1
            record = {"epoch": epoch + 1, "train_loss": train_loss,
                      "lr": parts.head_lr(self.optimizer), "epoch_seconds": seconds,
                      **{f"val_{k}": v for k, v in metrics.items()}}
            if sd.enabled:
                record["drop_rate"] = controller(self.raw).drop_rate
            if self.main:
                rundir.append_metrics(self.run_dir, record)
                accelerator.log({f"epoch/{k}": v for k, v in record.items()
                                 if k != "epoch" and not k.endswith("images")},
                                step=self._update(epoch + 1, 0))
                val = f", val top-1 {metrics['top1']:.2f}%" if metrics else ""
                self.console.print(f"epoch {epoch + 1}/{t.epochs}: loss {train_loss or float('nan'):.4f}"
                                   f"{val}, {seconds:.1f} s", markup=False, soft_wrap=True)
            if t.checkpoint_every and ((epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs):
                self._save(f"epoch_{epoch + 1}")
            if improved and t.checkpoint_every:
                self._save("best")
        return self._finish(time.perf_counter() - start)

    def _evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        return evaluate(model, loader, self.accelerator, channels_last=self.recipe.train.channels_last)

    def _ema_model(self) -> nn.Module:
        """The EMA copy, its gates at the model's drop rate (they scale the branches in eval)."""
        if self.recipe.stochastic_depth.enabled:
            set_drop_rate(self.ema.module, controller(self.raw).drop_rate)
        return self.ema.module

    def _folded_ema(self) -> tuple[nn.Module | None, dict | None, str, str]:
        """The folded EMA, its test metrics, which of model and EMA to export and why: the better
        on the validation split (never chosen on test; without a validation split, the model)."""
        if self.ema is None:
            return None, None, "model", ""
        sd = self.recipe.stochastic_depth
        ema = fold(self._ema_model()) if sd.enabled else self.ema.module
        prepared = self.accelerator.prepare_model(ema, evaluation_mode=True)
        metrics = self._evaluate(prepared, self.test_loader)
        if not self.has_val:
            return ema, metrics, "model", "no validation split to choose on (data.val_split)"
        mine, its = self._evaluate(self.model, self.eval_loader)["top1"], self._evaluate(prepared, self.eval_loader)["top1"]
        why = f"validation top-1: EMA {its:.2f}%, model {mine:.2f}%{'; a tie keeps the model' if its == mine else ''}"
        return ema, metrics, "ema" if its > mine else "model", why

    def _finish(self, train_seconds: float) -> TrainResult:
        """Evaluate the gated model, fold it (and its EMA), evaluate, export the better one."""
        t, sd, accelerator = self.recipe.train, self.recipe.stochastic_depth, self.accelerator
        gated = self._evaluate(self.model, self.test_loader)
        ema, ema_metrics, exported, why = self._folded_ema()
        model_path = self.run_dir / "model.safetensors"
        final = fold(self.raw) if sd.enabled else self.raw
        if not _all_finite(final):
            raise self._diverged("the folded model's weights are not finite; it was not exported")
        folded_metrics = self._evaluate(accelerator.prepare_model(final, evaluation_mode=True),
                                        self.test_loader) if sd.enabled else gated
        result = TrainResult(run_dir=str(self.run_dir), epochs=t.epochs, train_seconds=train_seconds,
                             gated=gated, folded=folded_metrics, model_path=str(model_path),
                             best_val_top1=self.state.best if self.has_val else None,
                             best_epoch=self.state.best_epoch, ema_folded=ema_metrics, exported=exported,
                             exported_because=why)
        tests = {"gated": gated, "folded": folded_metrics, "ema_folded": ema_metrics or {}}
        self.accelerator.log({f"test/{name}_{k}": v for name, m in tests.items() for k, v in m.items()
                              if k != "images"}, step=self._update(t.epochs, 0))
        out = ema if exported == "ema" else final
        if not _all_finite(out):  # on every rank (identical weights): none waits for a rank that raised
            raise self._diverged("the folded EMA's weights are not finite; it was not exported")
        if self.main:
            ckpt.save(out.to("cpu") if (sd.enabled or exported == "ema") else out, model_path,
                      preprocessing=self.preprocessing)
            (self.run_dir / "result.json").write_text(json.dumps(rundir.json_safe(asdict(result)),
                                                                 indent=2, allow_nan=False))
        accelerator.wait_for_everyone()
        if t.require_top1 is not None:
            shown = ({"gated": gated["top1"], "folded": folded_metrics["top1"]} if sd.enabled
                     else {"model": gated["top1"]})
            if exported == "ema":
                shown["EMA folded" if sd.enabled else "EMA"] = ema_metrics["top1"]
            worst = min(shown.values())
            if worst < t.require_top1:
                listed = ", ".join(f"{k} {v:.2f}%" for k, v in shown.items())
                raise SurgeryError(f"test top-1 {worst:.2f}% ({listed}) is below the recipe's "
                                   f"train.require_top1 = {t.require_top1}")
        return result
