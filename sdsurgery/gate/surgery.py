"""convert: install stochastic-depth gates in a model, keeping its class and its state_dict.

How it works. The flat trace (:mod:`sdsurgery.find.residuals`) says which module's ``forward``
performs each residual add: its *owner* (``layer3.5`` for a ResNet block). Each owner is traced
again on its own with every child a leaf, and in that graph the branch nodes of each residual
are cut out into a separate function and the add is replaced by a call to a gate::

    def forward(self, x):                       # the owner's new forward
        ...
        _sd_branch_0 = self._sd_branch_0        # the branch, as a function of its inputs
        sd_gate_0 = self.sd_gate_0(_sd_branch_0, shortcut, x)
        ...

The new forward and branch functions are generated Python bound to the owner instance; the
gate is a registered child without parameters or buffers. Nothing else changes: the model is
still a ``torchvision.models.ResNet`` (or whatever it was), every module stays at its path, the
state_dict keys and tensors are those of the original, children run their own code (so
train/eval behaviour of BatchNorm, dropout ... is untouched).
"""
from __future__ import annotations

import copy
import inspect
import linecache
import logging
import operator
import types
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .._compat import SPEC_ATTRS, buffers_of, children_of, parameters_of, pytree_info
from ..errors import NoResidualsError, first_line
from .gates import (CONTROLLER_ATTR, MODES, SCALINGS, GateController, GateHook,
                    StochasticDepthGate, controller_of, installed_gates)
from ..ops import get_attr, is_add_call, value_kinds
from ..find.residuals import (Analysis, Residual, analyse, ancestor_masks, drop_dead_getitems, iter_bits,
                        redirect_inplace_adds, require_residuals, select)
from .schedules import Schedule, check_rate
from ..find.tracing import FlatTrace, LeafSpec, split_call, trace_block, trace_block_on_example

__all__ = ["log", "convert", "gates", "set_drop_rate", "controller"]

_DEFAULT_SEED_SALT = 0x5D5D
log = logging.getLogger("sdsurgery")


def convert(model: nn.Module, *, drop_rate: float = 0.5, schedule: Schedule = "linear",
            mode: str = "block", scaling: str = "expectation", gate_projection: bool = True,
            include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
            seed: int | None = None, leaf_modules: LeafSpec = (), example: torch.Tensor | None = None,
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
        example: an input for ``model``, only to trace modules whose forward branches on sizes
            (see :func:`find_residuals`).
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
    programs, skipped = _prepare(target, analysis, chosen, probs, ctrl)
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
    }
    _install(target, programs, ctrl, analysis)
    return target


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
    controller_of(model).set_drop_rate(drop_rate)


def controller(model: nn.Module) -> GateController:
    """The shared gate state of a converted model (generator, settings); it has
    ``state_dict`` / ``load_state_dict`` for checkpoints."""
    return controller_of(model)


# ------------------------------------------------------------------------------- programs
@dataclass
class _Program:
    """The rewritten forward of one owner module (or, with ``forward`` None, gates hooked on
    the output of the modules named in ``hooks``, one per gate)."""

    owner: str
    forward: Callable | None
    branches: list[tuple[str, Callable]] = field(default_factory=list)
    gates: list[tuple[str, StochasticDepthGate]] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)


def _gate(r: Residual, probs: list[float], ctrl: GateController, *, batched: tuple[bool, ...],
          sample_fallback: bool, masked: str | None) -> StochasticDepthGate:
    return StochasticDepthGate(
        name=r.name, index=r.index, drop_prob=probs[r.index], controller=ctrl,
        shortcut=r.shortcut, fold_target=r.fold_target, fold_params=r.fold_params,
        fold_blocker=r.fold_blocker, batched=batched, sample_fallback=sample_fallback,
        drop_modules=r.drop_modules, masked=masked)


def _rewrite_gates(rewrite: "_Rewrite", residuals: list[Residual], probs: list[float],
                   ctrl: GateController) -> list[tuple[str, StochasticDepthGate]]:
    """The gates a rewritten forward calls, by attribute."""
    return [(rewrite.gate_attrs[k], _gate(r, probs, ctrl, batched=rewrite.batched[k],
                                          sample_fallback=rewrite.fallback[k],
                                          masked=rewrite.masked[k]))
            for k, r in enumerate(residuals)]


def _hook_program(target: nn.Module, owner: str, residuals: list[Residual], probs: list[float],
                  ctrl: GateController, why: str) -> tuple[list[_Program], list[tuple[str, str]]]:
    """Gate the residuals of a block that cannot be rewritten at their tail modules (a
    drop-path slot): the branch is computed and its value masked, as timm's DropPath does."""
    block = target.get_submodule(owner)
    prog = _Program(owner=owner, forward=None)
    skipped = []
    for r in residuals:
        attr = f"sd_gate_{len(prog.gates)}"
        if r.tail is None or attr in children_of(block) or attr in block.__dict__:
            skipped.append((r.name, f"block '{owner}' not rewritten: {why}; its branch does not "
                                    f"end in a module output that a gate could take over"))
            continue
        prog.gates.append((attr, _gate(r, probs, ctrl, batched=(), sample_fallback=True,
                                       masked=f"{why}: gated at the output of '{r.tail}'")))
        prog.hooks.append(r.tail)
    return ([prog] if prog.gates else []), skipped


class _Skip(Exception):
    """A block cannot be rewritten; ``residual`` names the one branch to blame, when it is one."""

    def __init__(self, message: str, residual: str | None = None):
        super().__init__(message)
        self.residual = residual


class _Untraceable(_Skip):
    """A block's own forward cannot be traced: its residuals can only be gated at a tail module."""


class _Shared(_Skip):
    """A branch's computation is needed by the rest of its block: it can be masked, not skipped."""


def _prepare(target: nn.Module, analysis: Analysis, chosen: list[Residual], probs: list[float],
             ctrl: GateController) -> tuple[list[_Program], list[tuple[str, str]]]:
    ft = analysis.trace
    by_owner: dict[str, list[Residual]] = {}
    for r in chosen:
        by_owner.setdefault(r.owner, []).append(r)
    programs, skipped = [], []
    cache: dict[Any, _Rewrite] = {}
    for owner, rs in by_owner.items():
        untraceable = None
        if any(r.specialised for r in rs):
            untraceable = "its block's forward depends on input sizes (traced on an example)"
        while rs and untraceable is None:
            try:
                programs.append(_program(target, owner, rs, probs, ctrl, ft,
                                         analysis.add_counts.get(owner, 0), cache))
                break
            except _Untraceable as e:
                untraceable = str(e)
            except _Skip as e:
                if e.residual is None or len(rs) == 1:
                    skipped.extend((r.name, f"block '{owner}' not rewritten: {e}") for r in rs)
                    break
                # gate the block's other residuals without the one that cannot be cut out
                skipped.append((e.residual, f"residual left ungated in block '{owner}': {e}"))
                rs = [r for r in rs if r.name != e.residual]
        if untraceable is not None:
            # its forward branches on sizes: rewritten for the example's sizes (other sizes
            # fall back to hooks), or else hooks only
            try:
                programs.append(_guarded_program(target, owner, rs, probs, ctrl, analysis))
            except _Skip as e:
                hooked, why = _hook_program(target, owner, rs, probs, ctrl, f"{untraceable}; {e}")
                programs.extend(hooked)
                skipped.extend(why)
    return programs, skipped


def _guarded_program(target: nn.Module, owner: str, residuals: list[Residual], probs: list[float],
                     ctrl: GateController, analysis: Analysis) -> _Program:
    """A block whose forward branches on sizes, rewritten from a trace of its example call that
    keeps the batch size free. The new forward runs when the call has the example's other sizes
    and non-tensor arguments; any other call runs the block's own forward with the gates hooked
    on the branches' tail modules (masking, as for :func:`_hook_program`)."""
    if any(r.tail is None for r in residuals):
        raise _Skip("not every branch ends in a module output a gate could take over")
    root = analysis.trace.root
    call = analysis.examples.of(root.get_submodule(owner)) if analysis.examples is not None else None
    if call is None:
        raise _Skip("no example call of it was recorded")
    block = target.get_submodule(owner)
    if "forward" in block.__dict__ or _reads_training(block):
        raise _Skip("its forward is patched or reads self.training")
    try:
        concrete, tensors = split_call(block, *call)
        graph = trace_block_on_example(block, concrete, tensors, analysis.trace.autowrap_functions)
    except Exception as e:
        raise _Skip(f"not traceable on its example call either: {type(e).__name__}: "
                    f"{_first_line(e)}") from None
    rewrite = _rewrite(block, owner, residuals, None, analysis.trace,
                       analysis.add_counts.get(owner, 0), graph=graph)
    sizes = {name: tuple(t.shape[1:]) for name, t in tensors.items()}
    return _Program(owner=owner, forward=_guarded(rewrite.forward, block, sizes, concrete,
                                                  tuple(rewrite.gate_attrs)),
                    branches=list(rewrite.branches), hooks=[r.tail for r in residuals],
                    gates=_rewrite_gates(rewrite, residuals, probs, ctrl))


def _guarded(rewritten: Callable, block: nn.Module, sizes: dict[str, tuple], concrete: dict[str, Any],
             gate_attrs: tuple[str, ...]) -> Callable:
    """``rewritten`` for calls with the example's ``sizes`` (but the batch) and ``concrete``
    arguments; the block's own forward otherwise, its gates then acting through their hooks."""
    sig = inspect.signature(block.forward)
    own = type(block).forward
    impl = rewritten.__wrapped_impl__  # type: ignore[attr-defined]

    def matches(bound) -> bool:
        for name, value in bound.arguments.items():
            if name in sizes:
                if not isinstance(value, torch.Tensor) or tuple(value.shape[1:]) != sizes[name]:
                    return False
            elif name in concrete:
                try:
                    if not bool(value is concrete[name] or value == concrete[name]):
                        return False
                except Exception:
                    return False
        return True

    def forward(self, *args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        if not matches(bound):
            if self.training:
                warnings.warn(f"sdsurgery: {type(self).__name__} called with sizes other than the "
                              f"example's {sizes}: its dropped branches are masked, not skipped; "
                              f"convert with example= an input of your training size",
                              stacklevel=2)
            return own(self, *args, **kwargs)
        gates = [getattr(self, a) for a in gate_attrs]
        for g in gates:
            g.hook_bypass = True  # the branch's tail module runs inside the gate here
        try:
            return impl(self, *bound.args, **bound.kwargs)
        finally:
            for g in gates:
                g.hook_bypass = False

    forward.__doc__ = rewritten.__doc__ + " (for the example's sizes)"
    forward.__wrapped_impl__ = impl  # type: ignore[attr-defined]
    return forward


@dataclass
class _Rewrite:
    """An owner's rewritten code, independent of the instance: blocks of the same class and
    structure share it (a ResNet-152 has 50 blocks but four distinct ones)."""

    forward: Callable
    branches: list[tuple[str, Callable]]
    gate_attrs: list[str]
    batched: list[tuple[bool, ...]]
    fallback: list[bool]
    masked: list[str | None]  # why a branch is masked rather than skipped


def _program(target: nn.Module, owner: str, residuals: list[Residual], probs: list[float],
             ctrl: GateController, ft: FlatTrace, add_count: int,
             cache: dict[Any, _Rewrite]) -> _Program:
    block = target.get_submodule(owner)
    if "forward" in block.__dict__:
        raise _Skip(f"'{owner}' already has a patched forward")
    concrete: dict[str, Any] | None = None
    if owner:
        calls = ft.calls.get(owner, [])
        if len(calls) != 1:
            raise _Skip(f"'{owner}' is called {len(calls)} times in one forward pass (shared "
                        f"weights); sdsurgery gates blocks called once")
        concrete = calls[0].concrete_args(block)
        if concrete is None:
            raise _Skip(f"cannot map the call of '{owner}' onto its forward signature")
    specs = tuple((r.add_position, r.branch_operand) for r in residuals)
    key = _structure_key(block, concrete, specs, add_count)
    rewrite = cache.get(key) if key is not None else None
    if rewrite is None:
        rewrite = _rewrite(block, owner, residuals, concrete, ft, add_count)
        if key is not None:
            cache[key] = rewrite
    return _Program(owner=owner, forward=rewrite.forward, branches=list(rewrite.branches),
                    gates=_rewrite_gates(rewrite, residuals, probs, ctrl))


_SIMPLE = (int, float, bool, str, type(None))


def _structure_key(block: nn.Module, concrete: dict[str, Any] | None, specs: tuple, add_count: int):
    """What a block's traced graph can depend on, or None when that cannot be told safely."""
    attrs = _simple_attrs(block)
    if attrs is None:
        return None
    # The block's code may also read its children's settings (`self.conv.stride`): one level.
    children = tuple((n, type(m), _simple_attrs(m, strict=False)) for n, m in children_of(block).items())
    try:
        concrete_key = tuple(sorted((k, v) for k, v in (concrete or {}).items()))
        hash(concrete_key)
    except TypeError:
        return None
    return (type(block), concrete_key, specs, add_count, tuple(attrs),
            children,
            tuple((n, None if p is None else tuple(p.shape)) for n, p in parameters_of(block).items()),
            tuple((n, None if b is None else tuple(b.shape)) for n, b in buffers_of(block).items()))


def _simple_attrs(module: nn.Module | None, strict: bool = True):
    """The plain-valued settings of a module (ints, strings, tuples of them...); with
    ``strict``, None when it holds any other kind of non-module attribute."""
    if module is None:
        return ()
    attrs = []
    for k, v in sorted(module.__dict__.items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(isinstance(x, _SIMPLE) for x in v)):
            attrs.append((k, v))
        elif callable(v) and not isinstance(v, nn.Module):
            attrs.append((k, id(v)))
        elif strict:
            return None
    return tuple(attrs)


def _reads_training(block: nn.Module) -> bool:
    """Whether the block's own class code reads ``self.training`` (then its eval trace is not
    valid in training)."""
    for cls in type(block).__mro__:
        if cls in (nn.Module, object):
            break
        for value in vars(cls).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and "training" in code.co_names:
                return True
    return False


def _rewrite(block: nn.Module, owner: str, residuals: list[Residual],
             concrete: dict[str, Any] | None, ft: FlatTrace, add_count: int,
             graph: fx.Graph | None = None) -> _Rewrite:
    try:
        if graph is None:
            graph = trace_block(block, concrete, ft.autowrap_functions)
        if _reads_training(block):
            train_graph = trace_block(block, concrete, ft.autowrap_functions, train=True)
            if graph.python_code("self").src != train_graph.python_code("self").src:
                raise _Skip(f"the forward of '{owner}' itself behaves differently in training "
                            f"and eval")
    except _Skip:
        raise
    except Exception as e:  # e.g. the forward branches on sizes (found in a specialised trace)
        raise _Untraceable(f"cannot trace '{owner}' on its own: {type(e).__name__}: "
                           f"{_first_line(e)}") from None

    redirect_inplace_adds(graph)
    drop_dead_getitems(graph)
    adds = [n for n in graph.nodes if is_add_call(n)]
    if len(adds) != add_count:
        raise _Skip(f"'{owner}' traced alone shows {len(adds)} adds, the full trace {add_count}")
    kinds = value_kinds(graph, block)
    order = {n: i for i, n in enumerate(graph.nodes)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    used = set(children_of(block)) | set(block.__dict__)
    out = _Rewrite(forward=None, branches=[], gate_attrs=[], batched=[], fallback=[],  # type: ignore[arg-type]
                   masked=[])
    for k, (r, add) in enumerate([(r, adds[r.add_position]) for r in residuals]):
        gate_attr, fn_attr = f"sd_gate_{k}", f"_sd_branch_{k}"
        if gate_attr in used or fn_attr in used or hasattr(type(block), gate_attr):
            raise _Skip(f"'{owner}' already has an attribute {gate_attr!r}")
        f, s = add.args[r.branch_operand], add.args[1 - r.branch_operand]
        if not (isinstance(f, fx.Node) and isinstance(s, fx.Node)):
            raise _Skip(f"the add of {r.name!r} has no tensor operands when '{owner}' is traced alone")
        whole = None
        try:
            branch_fn, inputs, branch = _cut_branch(graph, block, add, f, s, r, placeholders)
            out.masked.append(None)
        except _Shared as e:
            # The block computes the branch anyway: the gate takes its value and masks it.
            # cat([x[:, :C] + s, x[:, C:]]) (ReXNet): all of x is masked, as a drop-path on x
            # does; the add stays and the gate is called without a shortcut.
            whole = _sliced_back(add, f)
            branch_fn, inputs, branch = _masked_branch, [whole or f], []
            out.masked.append(f"{e}: it is a slice of a value concatenated back, so all of that "
                              f"value is masked" if whole is not None else str(e))
        out.batched.append(tuple(kinds.get(i) == "tensor" and _depends_on(i, placeholders[:1])
                                 for i in inputs))
        out.fallback.append(any(kinds.get(i) != "tensor" for i in inputs))
        anchor = add if whole is None else min(whole.users, key=lambda u: order[u])
        with graph.inserting_before(anchor):
            fn_node = graph.get_attr(fn_attr)
            gate_node = graph.call_module(gate_attr, (fn_node, s if whole is None else None, *inputs))
        if whole is None:
            add.replace_all_uses_with(gate_node)
            graph.erase_node(add)
        else:
            whole.replace_all_uses_with(gate_node, delete_user_cb=lambda u: u is not gate_node)
        for n in reversed(branch):  # users come later in the branch: already erased
            graph.erase_node(n)
        out.branches.append((fn_attr, branch_fn))
        out.gate_attrs.append(gate_attr)
    graph.lint()  # the rewritten graph is well formed before it becomes code
    out.forward = _signature_preserving(_compile(graph, f"forward {owner or '<model>'}"), block,
                                        placeholders)
    return out


def _first_line(e: Exception) -> str:
    return first_line(e)[:160]


def _depends_on(node: fx.Node, sources: list[fx.Node]) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in sources:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _cut_branch(graph: fx.Graph, block: nn.Module, add: fx.Node, f: fx.Node, s: fx.Node,
                r: Residual, placeholders: list[fx.Node]) -> tuple[Callable, list[fx.Node], list[fx.Node]]:
    """Move the nodes only the branch needs out of ``graph`` into a function of its inputs."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    anc = ancestor_masks(nodes)
    mask = anc[f] & ~anc[s]
    for p in placeholders:
        mask &= ~(1 << index[p])
    # Nodes whose values are also used outside the branch must be computed anyway: keep them
    # (and what they need) in the block.
    changed = True
    while changed:
        changed = False
        for i in iter_bits(mask):
            n = nodes[i]
            if any(u is not add and not (mask >> index[u]) & 1 for u in n.users):
                mask &= ~anc[n]
                changed = True
                break
    branch = [nodes[i] for i in iter_bits(mask)]
    if f not in branch:
        raise _Shared("its output is also used outside the residual add", r.name)
    if not any(_has_params(n, block) for n in branch):
        raise _Shared("its computation is shared with the rest of its block", r.name)
    inputs: list[fx.Node] = []
    for n in branch:
        for i in n.all_input_nodes:
            if not (mask >> index[i]) & 1 and i not in inputs:
                inputs.append(i)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i in inputs:
        env[i] = sub.placeholder(i.name)
    for n in branch:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[f])
    sub.lint()
    return _compile(sub, f"branch {r.name}"), inputs, branch


def _sliced_back(add: fx.Node, f: fx.Node) -> fx.Node | None:
    """``x`` when the branch operand ``f`` is a slice of ``x`` and the add is concatenated
    back with the other slices of ``x``: ``cat([x[:, :C] + s, x[:, C:]])``."""
    if not (f.op == "call_function" and f.target is operator.getitem and isinstance(f.args[0], fx.Node)):
        return None
    whole = f.args[0]
    users = list(add.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target is not torch.cat:
        return None
    parts = users[0].args[0] if users[0].args else users[0].kwargs.get("tensors")
    others = [u for u in whole.users if u is not f]
    if not others or not all(u.op == "call_function" and u.target is operator.getitem for u in others):
        return None
    return whole if isinstance(parts, (list, tuple)) and set(parts) == {add, *others} else None


def _masked_branch(self, value):
    """The branch function of a masked gate: the branch value, computed by the block."""
    return value


def _has_params(node: fx.Node, block: nn.Module) -> bool:
    if node.op == "call_module":
        return any(True for _ in block.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        return isinstance(get_attr(block, node.target), nn.Parameter)
    return False


def _compile(graph: fx.Graph, label: str) -> Callable:
    """Generated Python for ``graph`` as a function ``forward(self, *inputs)``."""
    code = graph.python_code(root_module="self")
    src, namespace = code.src, dict(code.globals)
    info = pytree_info(graph)
    if info is not None:
        # Blocks called with tuples / dicts get pytree-flattening code that reads the specs from
        # a GraphModule's attributes; hand them to the function instead (the block has none).
        src = src.replace(SPEC_ATTRS[0], "_sd_in_spec").replace(SPEC_ATTRS[1], "_sd_out_spec")
        namespace["_sd_in_spec"], namespace["_sd_out_spec"] = info.in_spec, info.out_spec
    key = f"<sdsurgery {label} {uuid.uuid4().hex[:8]}>"
    # Registered with linecache so tracebacks, inspect and torch.compile see the source.
    linecache.cache[key] = (len(src), None, src.splitlines(True), key)
    exec(compile(src, key, "exec"), namespace)
    return namespace["forward"]


def _signature_preserving(impl: Callable, block: nn.Module, placeholders: list[fx.Node]) -> Callable:
    """Wrap ``impl(self, *placeholders)`` so the block keeps its forward signature."""
    sig = inspect.signature(block.forward)
    params = list(sig.parameters.values())
    n = len(placeholders)
    defaults = tuple(p.default for p in params[:n])

    def forward(self, *args, **kwargs):
        if not kwargs and len(args) <= n and all(d is not inspect.Parameter.empty
                                                 for d in defaults[len(args):]):
            return impl(self, *args, *defaults[len(args):])
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return impl(self, *bound.args, **bound.kwargs)

    forward.__doc__ = f"sdsurgery: {type(block).__name__}.forward with stochastic-depth gates"
    forward.__wrapped_impl__ = impl  # type: ignore[attr-defined]
    return forward


def _install(target: nn.Module, programs: list[_Program], ctrl: GateController,
             analysis: Analysis) -> None:
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
    # Existing stochastic-depth modules on gated branches would drop a second time.
    for r in analysis.residuals:
        if r.name not in gated:
            continue
        for name in r.drop_modules:
            m = target.get_submodule(name)
            for attr in ("drop_prob", "p"):
                if isinstance(getattr(m, attr, None), (int, float)):
                    ctrl.neutralised.append((name, attr, getattr(m, attr)))
                    if getattr(m, attr):
                        log.info("sdsurgery: neutralised %s '%s' (%s=%s) on gated branch %r",
                                 type(m).__name__, name, attr, getattr(m, attr), r.name)
                    setattr(m, attr, 0.0)
                    break
    target.__dict__[CONTROLLER_ATTR] = ctrl
