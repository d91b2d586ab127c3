"""Installing a planned conversion into a model, and taking it out again.

:func:`install` puts each :class:`~.plan.Program` in place: gates become registered children
of their block (no parameters, no buffers: the state_dict is unchanged), the rewritten forward
and branch functions become instance attributes, hooked gates are registered as forward hooks,
and existing drop-path modules on gated branches are set to 0. Everything it does is recorded
in the model's :class:`~.gates.GateController`, which :func:`uninstall` (used by ``fold``)
reads to undo it exactly.
"""
from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING

import torch.nn as nn

from .._compat import remove_forward_hook
from ..ops import drop_attr
from .gates import CONTROLLER_ATTR, GateController, GateHook, StochasticDepthGate, controller_of

if TYPE_CHECKING:  # pragma: no cover - annotations only: fold imports this module
    from ..find.residuals import Analysis
    from .plan import Program

__all__ = ["install", "uninstall"]

log = logging.getLogger("sdsurgery")


def install(target: nn.Module, programs: "list[Program]", ctrl: GateController,
            analysis: "Analysis") -> None:
    """Put ``programs`` into ``target`` (see the module docstring); cannot fail halfway for
    reasons :func:`~.plan.prepare` could have seen."""
    gated = {g.name for p in programs for _, g in p.gates}
    for prog in programs:
        block = target.get_submodule(prog.owner)
        for attr, gate in prog.gates:
            block.add_module(attr, gate)
            ctrl.gates.append(gate)
        for attr, fn in prog.branches:
            block.__dict__[attr] = types.MethodType(fn, block)
        if prog.forward is not None:
            block.__dict__["forward"] = types.MethodType(prog.forward, block)
        for (_, gate), tail in zip(prog.gates, prog.hooks):
            handle = target.get_submodule(tail).register_forward_hook(GateHook(gate))
            ctrl.hooks.append((tail, handle.id, gate.name))
        ctrl.installs.append((prog.owner, tuple(a for a, _ in prog.gates),
                              tuple(a for a, _ in prog.branches)))
    ctrl.gates.sort(key=lambda g: g.index)
    _neutralise(target, analysis, gated, ctrl)
    target.__dict__[CONTROLLER_ATTR] = ctrl


def _neutralise(target: nn.Module, analysis: "Analysis", gated: set[str], ctrl: GateController) -> None:
    """Existing stochastic-depth modules on gated branches would drop a second time: set their
    probability to 0 (restored by :func:`uninstall`)."""
    for r in analysis.residuals:
        if r.name not in gated:
            continue
        for name in r.drop_modules:
            m = target.get_submodule(name)
            attr = drop_attr(m)
            if any(n == name for n, _, _ in ctrl.neutralised):
                continue  # one module on two branches (Dinov2's drop_path): keep its first value
            if attr is not None and isinstance(getattr(m, attr, None), (int, float)):
                ctrl.neutralised.append((name, attr, getattr(m, attr)))
                if getattr(m, attr):
                    log.info("sdsurgery: neutralised %s '%s' (%s=%s) on gated branch %r",
                             type(m).__name__, name, attr, getattr(m, attr), r.name)
                setattr(m, attr, 0.0)


def uninstall(model: nn.Module, keep: set[str] = frozenset()) -> None:
    """Remove gates and rewritten forwards, restore neutralised drop modules.

    Blocks holding a gate named in ``keep`` keep their rewritten forward; their other gates
    become plain adds and the kept ones are frozen at their eval behaviour.
    """
    ctrl = controller_of(model)
    hooks, unhooked = [], set()
    for module_name, key, gate_name in ctrl.hooks:
        if gate_name in keep:
            hooks.append((module_name, key, gate_name))
        else:
            remove_forward_hook(model.get_submodule(module_name), key)
            unhooked.add(gate_name)
    ctrl.hooks = hooks
    remaining: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    for owner_name, gate_attrs, branch_attrs in ctrl.installs:
        owner = model.get_submodule(owner_name)
        gates = [getattr(owner, a) for a in gate_attrs]
        if any(g.name in keep for g in gates):
            kept_attrs = []
            for a, g in zip(gate_attrs, gates):
                if g.name in unhooked and "forward" not in owner.__dict__:
                    # a gate that only acted through its removed hook does nothing: remove it
                    delattr(owner, a)
                    continue
                if g.name in keep:
                    g.frozen = True
                else:
                    g.drop_prob = 0.0
                kept_attrs.append(a)
            remaining.append((owner_name, tuple(kept_attrs), branch_attrs))
            continue
        owner.__dict__.pop("forward", None)
        for a in branch_attrs:
            owner.__dict__.pop(a, None)
        for a in gate_attrs:
            delattr(owner, a)
    for module_name, attr, value in ctrl.neutralised:
        setattr(model.get_submodule(module_name), attr, value)
    if remaining:
        ctrl.installs = remaining
        ctrl.gates = [g for g in ctrl.gates if _attached(model, g)]
        ctrl.neutralised = []
    else:
        del model.__dict__[CONTROLLER_ATTR]


def _attached(model: nn.Module, gate: StochasticDepthGate) -> bool:
    return any(m is gate for m in model.modules())
