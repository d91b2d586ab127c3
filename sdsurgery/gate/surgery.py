"""convert: install stochastic-depth gates in a model, keeping its class and its state_dict.

How it works. :func:`~sdsurgery.analyse` (:mod:`sdsurgery.find`) says which module's ``forward``
performs each residual add: its *owner* (``layer3.5`` for a ResNet block). :mod:`.plan` decides
how each owner is gated, :mod:`.rewrite` generates its new forward (each branch cut out into a
function, each add replaced by a call to a gate), :mod:`.install` puts it in place. Nothing
else changes: the model is still a ``torchvision.models.ResNet`` (or whatever it was), every
module stays at its path, the state_dict keys and tensors are those of the original, children
run their own code (so train/eval behaviour of BatchNorm, dropout ... is untouched).
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import NoResidualsError
from ..find.residuals import Analysis, Example, Residual, analyse, require_residuals, select
from ..find.tracing import LeafSpec
from .gates import (MODES, SCALINGS, GateController, StochasticDepthGate, controller_of, converted_parts,
                    installed_gates)
from .install import install
from .plan import prepare
from .schedules import Schedule, check_rate

__all__ = ["log", "convert", "gates", "set_drop_rate", "controller"]

_DEFAULT_SEED_SALT = 0x5D5D
log = logging.getLogger("sdsurgery")


def convert(model: nn.Module, *, drop_rate: float = 0.5, schedule: Schedule = "linear",
            mode: str = "block", scaling: str = "expectation", gate_projection: bool = True,
            include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
            seed: int | None = None, leaf_modules: LeafSpec = (), example: "Example | None" = None,
            inplace: bool = False) -> nn.Module:
    """Give ``model`` stochastic depth: gate every residual branch.

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own) whose residual connections are
            tensor adds torch.fx can trace.
        drop_rate: drop probability of the deepest branch, in [0, 1).
        schedule: ``"linear"`` (the paper: branch l of L drops with ``l/L * drop_rate``),
            ``"uniform"``, a sequence of one probability per residual branch, or a callable
            ``f(l, L) -> p`` (l 1-based).
        mode: ``"block"`` (one decision per branch per forward; a dropped branch is not
            computed at all) or ``"sample"`` (one decision per sample; the branch runs on the
            kept samples only).
        scaling: ``"expectation"`` (the paper: eval scales each branch by its survival
            probability) or ``"inverted"`` (train scales kept branches by ``1/survival``; eval
            is the unmodified network).
        gate_projection: also gate branches whose shortcut is a projection.
        include, exclude: glob patterns over residual names (see :func:`find_residuals`).
        seed: seed of the gates' own generator (defaults to ``torch.initial_seed()``-derived).
        leaf_modules: module classes / qualified names fx must not trace into.
        example: an input for ``model`` (a tensor, a tuple of inputs, or a dict of keyword
            inputs), only to trace modules whose forward branches on sizes (see
            :func:`find_residuals`).
        inplace: convert ``model`` itself instead of a deep copy.

    Returns:
        The converted model: the same class as ``model``, the same state_dict.

    Raises:
        ValueError: bad ``drop_rate``, ``schedule``, ``mode`` or ``scaling``.
        TraceError: fx cannot trace the model.
        NoResidualsError: nothing to gate.
    """
    rate = check_rate(drop_rate)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(map(repr, SCALINGS))}, got {scaling!r}")
    analysis = analyse(model, leaf_modules=leaf_modules, example=example)
    residuals = analysis.residuals
    require_residuals(residuals, model)
    if seed is None:
        seed = (torch.initial_seed() ^ _DEFAULT_SEED_SALT) & 0x7FFF_FFFF_FFFF_FFFF
    ctrl = GateController(seed=seed, schedule=schedule, drop_rate=rate, count=len(residuals),
                          mode=mode, scaling=scaling)
    probs = ctrl.probabilities(rate)
    if not isinstance(schedule, str):
        ctrl.drop_rate = max(probs)  # custom probabilities are used as given
    chosen = _choose(residuals, include, exclude, gate_projection)

    target = model if inplace else copy.deepcopy(model)
    # Everything that can fail happens before `target` is touched: no half-converted model.
    programs, skipped = prepare(target, analysis, chosen, probs, ctrl)
    if not programs:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise NoResidualsError(f"no residual branch could be gated: {skipped[0][0]}: "
                               f"{skipped[0][1]}{more}")
    ctrl.skipped = _warn_about_what_is_left(analysis, programs, skipped)
    ctrl.settings = {
        "include": include, "exclude": exclude, "gate_projection": gate_projection,
        "leaf_modules": [_leaf_name(leaf) for leaf in leaf_modules],
        "schedule": schedule if isinstance(schedule, str) else list(probs),
        # the sizes size-branching blocks were rewritten for (load() converts again with them)
        "example_shape": list(example.shape) if isinstance(example, torch.Tensor) else None,
        "example_inputs": _example_inputs(example),  # a dict / tuple example: shapes and dtypes
    }
    install(target, programs, ctrl, analysis)
    return target


def _example_inputs(example: Any) -> "dict | list | None":
    """The shape and dtype of each input of a dict (keyword) or tuple (positional) example of
    tensors, or None."""
    def spec(t: Any) -> dict | None:
        if not isinstance(t, torch.Tensor):
            return None
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(example, dict):
        specs: dict | list = {k: spec(v) for k, v in example.items()}
        values = list(specs.values())
    elif isinstance(example, (tuple, list)):
        specs = values = [spec(v) for v in example]
    else:
        return None
    return specs if values and all(v is not None for v in values) else None


def _choose(residuals: list[Residual], include, exclude, gate_projection: bool) -> list[Residual]:
    """The residuals to gate: ``include`` / ``exclude`` globs, projection shortcuts or not."""
    chosen = select(residuals, include, exclude)
    if not gate_projection:
        chosen = [r for r in chosen if r.shortcut == "identity"]
    if not chosen:
        raise NoResidualsError(f"include={include!r} / exclude={exclude!r} / gate_projection="
                               f"{gate_projection} leave none of the {len(residuals)} residual "
                               f"branches ({residuals[0].name} ... {residuals[-1].name})")
    return chosen


def _warn_about_what_is_left(analysis: Analysis, programs: list, skipped: list) -> list[tuple[str, str]]:
    """One warning per module left unsearched and per residual left ungated, one for all masked
    branches (warned at convert's caller); returns the (name, reason) pairs left alone."""
    unsearched = [(x.owner, x.reason) for x in analysis.rejected if x.node.startswith("leaf ")]
    for name, why in unsearched:
        warnings.warn(f"sdsurgery: module {name!r} left as it is: {why}", stacklevel=3)
    for name, why in skipped:
        warnings.warn(f"sdsurgery: residual {name!r} left ungated: {why}", stacklevel=3)
    masked = [(g.name, g.masked) for p in programs for _, g in p.gates if g.masked]
    if masked:
        more = f" (and {len(masked) - 1} more)" if len(masked) > 1 else ""
        warnings.warn(f"sdsurgery: {len(masked)} residual branches are gated by masking, so "
                      f"dropping them saves no compute: {masked[0][0]!r}: {masked[0][1]}{more}; "
                      f"see gate.masked", stacklevel=3)
    return unsearched + skipped


def _leaf_name(leaf) -> str | None:
    """A leaf_modules entry as text for checkpoints (None for module objects)."""
    if isinstance(leaf, str):
        return leaf
    if isinstance(leaf, type):
        return f"{leaf.__module__}:{leaf.__qualname__}"
    return None


def gates(model: nn.Module) -> list[StochasticDepthGate]:
    """The installed gates of a converted model in depth order (``name``, ``drop_prob``,
    ``survival_prob``, ``fold_target`` ...)."""
    return installed_gates(model)


def set_drop_rate(model: nn.Module, drop_rate: float) -> None:
    """Re-spread a new ``drop_rate`` over the gates with the schedule given to ``convert``
    (custom schedules are rescaled so their largest probability becomes ``drop_rate``)."""
    for _, part in converted_parts(model, required=True):
        controller_of(part).set_drop_rate(drop_rate)


def controller(model: nn.Module) -> GateController:
    """The shared gate state of a converted model (generator, settings); it has
    ``state_dict`` / ``load_state_dict`` for checkpoints."""
    return controller_of(model)
