"""The fine-tuning parts timm already has, built from a recipe: optimizer, LR schedule, mixup and
its loss, model EMA, the training and evaluation transforms' options.

sdsurgery keeps no copies of these; this module only maps recipe sections (named as timm's
train.py names its arguments) onto timm's factories and says clearly what does not fit.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from ..errors import SurgeryError
from .data import TimmTransforms
from .recipes import Recipe

__all__ = ["PartsError", "create_optimizer", "create_scheduler", "step_scheduler", "scheduler_state",
           "load_scheduler_state",
           "create_mixup", "create_loss", "create_ema", "data_options", "head_lr"]


class PartsError(SurgeryError, ValueError):
    """A recipe asks for something the model or timm's parts cannot do."""


def create_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``: no weight decay on biases, norms and ``no_weight_decay()``
    parameters; layer-wise lr decay through the model's ``group_matcher``."""
    from timm.optim import create_optimizer_v2

    o = recipe.optimizer
    kwargs: dict[str, Any] = {}
    if o.betas is not None:
        kwargs["betas"] = tuple(o.betas)
    if o.eps is not None:
        kwargs["eps"] = o.eps
    try:
        optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                        momentum=o.momentum, layer_decay=o.layer_decay, **kwargs)
    except (TypeError, ValueError, ImportError, AssertionError) as e:
        raise PartsError(f"optimizer {o.name!r} cannot be built with this recipe's settings: "
                         f"{' '.join(str(e).split())}") from e
    if o.layer_decay is not None and len({g.get("lr_scale", 1.0) for g in optimizer.param_groups}) < 2:
        raise PartsError(f"optimizer.layer_decay: {type(model).__name__} cannot be split into layers "
                         f"(timm's layer decay needs a timm model with a group_matcher, e.g. a ViT); "
                         f"drop optimizer.layer_decay")
    return optimizer


def create_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's ``create_scheduler_v2``, stepped per optimizer update (plateau: per epoch);
    None for ``schedule.name: none``."""
    from timm.scheduler import create_scheduler_v2

    s = recipe.schedule
    per_epoch = s.name == "plateau"
    kwargs: dict[str, Any] = {}
    if s.decay_epochs is not None:
        kwargs["decay_epochs"] = s.decay_epochs
    with warnings.catch_warnings():
        # timm deprecates plateau because its checkpoints lose the counters; ours keep them
        # (scheduler_state / load_scheduler_state)
        warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=s.name, num_epochs=recipe.train.epochs, decay_milestones=list(s.decay_milestones),
            decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs,
            patience_epochs=s.patience_epochs, plateau_mode="max", step_on_epochs=per_epoch,
            updates_per_epoch=steps_per_epoch, **kwargs)
    return scheduler


# What a checkpoint keeps of a schedule: timm's schedules are functions of the update count,
# rebuilt from the recipe on resume (so --set train.epochs=N stretches them); only plateau has
# counters, kept in torch's ReduceLROnPlateau (timm's own state_dict leaves them out).
_PLATEAU_STATE = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


def _plateau(scheduler):
    inner = getattr(scheduler, "lr_scheduler", None)
    return inner if isinstance(inner, torch.optim.lr_scheduler.ReduceLROnPlateau) else None


def scheduler_state(scheduler) -> dict:
    """The plateau counters for a checkpoint ({} for every other schedule)."""
    inner = _plateau(scheduler)
    return {k: getattr(inner, k) for k in _PLATEAU_STATE} if inner is not None else {}


def step_scheduler(scheduler, *, update: int | None = None, epoch: int | None = None,
                   metric: float | None = None) -> None:
    """Tell a timm scheduler that ``update`` optimizer updates (or ``epoch`` epochs) are done."""
    if scheduler is None:
        return
    if update is not None:
        scheduler.step_update(update)
    if epoch is not None:
        scheduler.step(epoch, metric)


def load_scheduler_state(scheduler, state: dict) -> None:
    """A checkpoint's plateau counters (numbers only; nothing else is read from the file). A
    checkpoint of another schedule holds none; one of an older version, timm's whole state, is
    ignored: the schedule is the recipe's."""
    inner = _plateau(scheduler)
    if inner is None or not set(_PLATEAU_STATE) <= set(state):
        return
    for key in _PLATEAU_STATE:
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"plateau state {key!r} must be a number, got {type(value).__name__}")
        setattr(inner, key, type(getattr(inner, key))(value))


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled learning rate: the largest of the groups' (layer decay scales the others)."""
    return max(g["lr"] for g in optimizer.param_groups)


def mixup_active(recipe: Recipe) -> bool:
    m = recipe.mixup
    return m.mixup_alpha > 0 or m.cutmix_alpha > 0 or m.cutmix_minmax is not None


def create_mixup(recipe: Recipe, num_classes: int):
    """timm's ``Mixup`` (None when the recipe mixes nothing)."""
    from timm.data import Mixup

    if not mixup_active(recipe):
        return None
    m = recipe.mixup
    return Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha,
                 cutmix_minmax=tuple(m.cutmix_minmax) if m.cutmix_minmax else None, prob=m.prob,
                 switch_prob=m.switch_prob, mode=m.mode, label_smoothing=recipe.train.label_smoothing,
                 num_classes=num_classes)


def create_loss(recipe: Recipe) -> nn.Module:
    """The training loss: timm's SoftTargetCrossEntropy on mixup's soft targets (mixup carries the
    label smoothing), cross-entropy with label smoothing else."""
    from timm.loss import SoftTargetCrossEntropy

    if mixup_active(recipe):
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)


def create_ema(recipe: Recipe, model: nn.Module):
    """timm's ``ModelEmaV3`` of the converted model (None when the recipe has no EMA)."""
    from timm.utils import ModelEmaV3

    e = recipe.ema
    if not e.enabled:
        return None
    return ModelEmaV3(model, decay=e.decay, use_warmup=e.warmup)


def data_options(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    """``load_datasets`` keyword arguments for the recipe's transforms: the dataset's own
    pipeline, or timm's from the model's pretrained data config (``resolve_model_data_config``:
    input size, interpolation, crop_pct, mean/std) with the recipe's keys over it."""
    from timm.data import resolve_model_data_config

    d = recipe.data
    cfg = resolve_model_data_config(model)  # timm's defaults (ImageNet's) for other models
    options: dict[str, Any] = {"mean": d.mean, "std": d.std}
    if d.normalize == "model" and d.mean is None:
        options["mean"], options["std"] = list(cfg["mean"]), d.std or list(cfg["std"])
    if d.transforms == "dataset":
        return {**options, "image_size": d.image_size, "interpolation": d.interpolation or "bilinear"}
    options |= {
        "image_size": d.image_size or int(cfg["input_size"][-1]),
        "interpolation": d.interpolation or cfg.get("interpolation") or "bilinear",
        "crop_pct": d.crop_pct or cfg.get("crop_pct") or 1.0,
        "timm": TimmTransforms(scale=tuple(d.scale) if d.scale else None,
                               ratio=tuple(d.ratio) if d.ratio else None, hflip=d.hflip, vflip=d.vflip,
                               color_jitter=d.color_jitter, auto_augment=d.auto_augment,
                               re_prob=d.re_prob, re_mode=d.re_mode, re_count=d.re_count)}
    if d.auto_augment:
        _check_auto_augment(d.auto_augment)
    return options


def _check_auto_augment(policy: str) -> None:
    """timm reads the policy string when it builds the transform; a wrong one fails there with
    an assertion or a KeyError: say which key is wrong instead."""
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception as e:  # noqa: BLE001 - timm raises assertion, key and value errors
        raise PartsError(f"data.auto_augment {policy!r} is not a timm augmentation policy ({type(e).__name__}: "
                         f"{e}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original") from e
