"""Classifying the tensor adds of one traced graph: which are residual connections.

A residual connection is a tensor add ``shortcut + branch`` where

* both operands descend from one *fork* tensor ``x`` (their latest common ancestor);
* the shortcut side is ``x`` itself (an *identity* shortcut) or ``x`` through a short chain of
  shortcut operations: at most one conv/linear map plus norms, pooling, padding and reshapes
  (a *projection* shortcut). Activations, attention or arbitrary arithmetic disqualify it;
* the branch side carries parameters;
* no named rule of :mod:`.rules` recognises the add as something else with that shape.

This leaves out position-embedding adds (one side is a parameter: no common ancestor),
rotary embeddings (neither side is a shortcut chain, nor carries parameters), shape or tuple
arithmetic (not tensors), and sums of two real branches (neither side is a short chain).
When both operands qualify, the identity side, then the side with fewer parameters, is the
shortcut (``pb(proj(x)) + b2(c2(x))`` is a projection block whichever order it is written in).

Each step has its module: :mod:`.graph` (facts about the graph), :mod:`.candidates` (reading an
add as shortcut + branch), :mod:`.rules` (named rejections); this one puts them together.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import torch.fx as fx
import torch.nn as nn

from ..errors import NoResidualsError
from ..fold import fold_plan
from ..ops import add_operands, is_add_call, is_drop_module
from . import rules
from .candidates import Candidate, Rejection, read
from .graph import GraphFacts, in_scope, owner_of
from .tracing import FlatTrace

if TYPE_CHECKING:  # pragma: no cover
    from .residuals import _Examples

__all__ = ["Residual", "RejectedAdd", "Analysis", "classify", "residual_name", "select", "require_residuals"]


@dataclass(frozen=True)
class Residual:
    """One residual connection ``shortcut + branch`` of a model.

    Attributes:
        name: stable name from the module path (``layer3.5``, ``blocks.4.attn``).
        index: position in depth order (0 = closest to the input).
        owner: qualified name of the module whose ``forward`` performs the add ('' = the model).
        shortcut: ``"identity"`` or ``"projection"``.
        modules: qualified names of the modules on the branch, in execution order.
        shortcut_modules: qualified names of the modules on the shortcut (empty for identity).
        params: number of parameters on the branch.
        fold_target: qualified name of the layer (or layer-scale parameter) the survival scale
            folds into, or None when it cannot be folded (see ``fold_blocker``).
        fold_params: the parameters that get multiplied when folding.
        fold_blocker: why the scale cannot be folded, or None.
        drop_modules: existing stochastic-depth modules (timm ``DropPath``, torchvision
            ``StochasticDepth``) on the branch; ``convert`` neutralises them.
        add_position: which add call of the owner's forward this is (0-based), and
        branch_operand: which operand of that add is the branch (0 or 1); both are used to
            find the add again when the owner is traced on its own.
        tail: the module whose output is the branch value (used by nothing but the add, e.g. a
            drop-path slot), or None; a gate can hook it when the owner cannot be rewritten.
        tail_call: ``(i, n)`` when ``tail`` is called ``n`` times per forward of the owner (one
            drop-path module ending both branches of a HF Swinv2 layer) and this branch's value
            is its ``i``-th call; None when it is called once.
        specialised: found in a trace specialised to an example's sizes (the owner's forward
            branches on them), so the owner is gated through ``tail``, never rewritten.
        outside: modules of the branch that the owner's caller runs, not the owner, when the
            owner could not be lifted (see ``inline``): a gate in the owner cannot skip them.
        inline: submodules of ``owner`` (paths relative to it) to trace into when the owner is
            traced on its own. Set when the add sits in a child that the branch starts outside
            of (BERT's ``BertOutput`` adds ``dense(h)`` to its input, ``h = intermediate(x)``
            computed by ``BertLayer``): the owner is lifted to the module that runs the whole
            branch (``BertLayer``) and the child is traced inline, so a drop skips all of it.
    """

    name: str
    index: int
    owner: str
    shortcut: str
    modules: tuple[str, ...]
    shortcut_modules: tuple[str, ...]
    params: int
    fold_target: str | None
    fold_params: tuple[str, ...]
    fold_blocker: str | None
    drop_modules: tuple[str, ...]
    add_position: int = field(repr=False, default=0)
    branch_operand: int = field(repr=False, default=1)
    tail: str | None = field(repr=False, default=None)
    specialised: bool = field(repr=False, default=False)
    tail_call: tuple[int, int] | None = field(repr=False, default=None)
    outside: tuple[str, ...] = field(repr=False, default=())
    inline: tuple[str, ...] = field(repr=False, default=())

    def __repr__(self) -> str:  # one line, readable in a list
        fold = self.fold_target if self.fold_target else f"<not foldable: {self.fold_blocker}>"
        return (f"Residual({self.name!r}, shortcut={self.shortcut}, modules={len(self.modules)}, "
                f"params={self.params}, fold_target={fold!r})")


@dataclass(frozen=True)
class RejectedAdd:
    """A tensor add that was not taken as a residual connection, and why."""

    owner: str
    node: str
    reason: str
    code: str  # stable: see sdsurgery.find.rules


@dataclass
class Analysis:
    """Everything :func:`analyse` learns about a model."""

    residuals: list[Residual]
    rejected: list[RejectedAdd]
    trace: FlatTrace = field(repr=False)
    # adds in each owner's trace (its inline modules included)
    add_counts: dict[str, int] = field(default_factory=dict, repr=False)
    order: list[int] = field(default_factory=list, repr=False)  # graph position of each residual
    examples: "_Examples | None" = field(default=None, repr=False)  # module calls on an example


def classify(ft: FlatTrace) -> Analysis:
    """Every tensor add of the flat trace ``ft``, as a residual or a rejection (see the
    module docstring). Modules fx did not trace into are searched by :mod:`.residuals`."""
    facts = GraphFacts(ft)
    owner_adds: dict[str, list[fx.Node]] = {}
    for n in facts.nodes:
        if is_add_call(n):
            owner_adds.setdefault(owner_of(n), []).append(n)
    found: list[Candidate] = []
    rejected: list[RejectedAdd] = []
    for n in facts.nodes:
        ops = add_operands(n, facts.kinds)
        if ops is None:
            continue
        accepted, readings = _readings(facts, n, *ops)
        if accepted:  # the identity side, then the side with fewer parameters, is the shortcut
            found.append(min(accepted, key=lambda c: (c.kind != "identity", -c.params)))
        else:
            why = rules.explain(facts, n, readings)
            rejected.append(RejectedAdd(owner_of(n), n.format_node() or n.name, why.message, why.code))
    nested = rules.nested(facts, found)
    for i in sorted(nested):
        n = found[i].add
        rejected.append(RejectedAdd(owner_of(n), n.format_node() or n.name, (
            f"nested inside the branch of the residual in '{nested[i]}': it is dropped with "
            f"that block, not on its own"), "nested"))
    found = [c for i, c in enumerate(found) if i not in nested]
    residuals = _residuals(facts, found, owner_adds)
    add_counts = {o: len(ns) for o, ns in owner_adds.items()}
    residuals = _lift(residuals, found, owner_adds, facts, add_counts)
    return Analysis(residuals=residuals, rejected=rejected, trace=ft, add_counts=add_counts,
                    order=[facts.index[c.add] for c in found])


def _readings(facts: GraphFacts, add: fx.Node, a: fx.Node,
              b: fx.Node) -> tuple[list[Candidate], list[Rejection]]:
    """Both readings of ``a + b`` (``b`` the shortcut, then ``a``): the blocks and the rejections."""
    accepted, readings = [], []
    for s, f, branch_operand in ((b, a, 0), (a, b, 1)):
        cand = read(facts, add, s, f, branch_operand)
        if isinstance(cand, Candidate):
            why = rules.check(facts, cand)
            if why is None:
                accepted.append(cand)
                continue
            cand = why
        readings.append(cand)
    return accepted, readings


def _residuals(facts: GraphFacts, found: list[Candidate],
               owner_adds: dict[str, list[fx.Node]]) -> list[Residual]:
    per_owner: dict[str, int] = {}
    for c in found:
        per_owner[c.owner] = per_owner.get(c.owner, 0) + 1
    names: set[str] = set()
    out: list[Residual] = []
    for i, c in enumerate(found):
        branch_modules = tuple(dict.fromkeys(x.target for x in c.branch if x.op == "call_module"))
        position = owner_adds[c.owner].index(c.add)
        name = residual_name(c.owner, branch_modules, facts.modules, per_owner[c.owner] > 1 or c.owner == "",
                     position)
        base, k = name, 1
        while name in names:
            name, k = f"{base}.{k}", k + 1
        names.add(name)
        plan = fold_plan(facts, c.value, c.add)
        out.append(Residual(
            name=name, index=i, owner=c.owner, shortcut=c.kind, modules=branch_modules,
            shortcut_modules=tuple(n.target for n, _ in reversed(c.chain) if n.op == "call_module"),
            params=c.params, fold_target=plan.target, fold_params=plan.params,
            fold_blocker=plan.blocker,
            drop_modules=tuple(m for m in branch_modules if is_drop_module(facts.modules[m])),
            add_position=position, branch_operand=c.branch_operand, tail=_tail(c.value, facts, c.owner),
            tail_call=_tail_call(c.value, facts, c.owner),
            outside=tuple(m for m in branch_modules
                          if c.owner and m != c.owner and not m.startswith(c.owner + "."))))
    return out


def _lift(residuals: list[Residual], found: list[Candidate], owner_adds: dict[str, list[fx.Node]],
          facts: GraphFacts, add_counts: dict[str, int]) -> list[Residual]:
    """Move the owner of a residual one module up, with that child traced inline (see
    ``Residual.inline``), when its branch starts outside it (to the innermost module that runs
    the whole branch), or when part of the branch's computation is also returned by the owner
    and thrown away by its caller (BERT's attention returns its weights, BertLayer drops them:
    one module up, where it is dead). Residuals owned by a module that gets traced inline move
    with it. ``add_position`` then counts the adds of the lifted owner's trace, and
    ``add_counts`` gets the lifted owners' counts."""
    owners = [r.owner for r in residuals]
    inline: dict[str, set[str]] = {}
    for i, r in enumerate(residuals):
        lifted = _common_module(r.owner, *r.modules) if r.outside else r.owner
        if lifted and _returns_dropped_parts(found[i]):
            lifted = lifted.rpartition(".")[0]
        # One level up at most (the caller runs the branch's start): further up, the blocks
        # of a whole stage would become one (CoaT's parallel blocks): those stay masked.
        if lifted != r.owner and lifted == r.owner.rpartition(".")[0]:
            owners[i] = lifted
            inline.setdefault(lifted, set()).update(_chain(lifted, r.owner))
    changed = True
    while changed:  # a residual owned by a module now traced inline moves up with it
        changed = False
        for lifted in list(inline):
            members = {_join(lifted, p) for p in inline.get(lifted, ())}
            for i, owner in enumerate(owners):
                if owner in members:
                    owners[i], changed = lifted, True
                    if owner in inline:  # its own inline modules come along
                        inline[lifted] |= {f"{_rel(lifted, owner)}.{q}" for q in inline.pop(owner)}
    out = []
    for i, r in enumerate(residuals):
        lifted = owners[i]
        if lifted not in inline:
            out.append(r)
            continue
        if r.name == r.owner == lifted:  # its owner now holds lifted residuals too: qualify it
            r = replace(r, name=residual_name(lifted, r.modules, facts.modules, True, r.add_position))
        scope = {lifted} | {_join(lifted, p) for p in inline[lifted]}
        scope_adds = sorted((n for o in scope for n in owner_adds.get(o, ())), key=facts.index.__getitem__)
        add_counts[lifted] = len(scope_adds)
        out.append(replace(r, owner=lifted, inline=tuple(sorted(inline[lifted])), outside=(),
                           add_position=scope_adds.index(found[i].add)))
    return out


def _returns_dropped_parts(c: Candidate) -> bool:
    """A value computed with the branch has a part nobody uses (``out, _ = attention(x)``): in
    a trace of the module that returns it, it would be used, so the branch could not be cut."""
    branch = set(c.branch)
    return any(u not in branch and u is not c.add and u.op == "call_function"
               and u.target is operator.getitem and not u.users
               for n in c.branch for u in n.users)


def _join(owner: str, rel: str) -> str:
    return f"{owner}.{rel}" if owner else rel


def _rel(owner: str, path: str) -> str:
    return path[len(owner) + 1:] if owner else path


def _common_module(*paths: str) -> str:
    """The innermost module whose path is a prefix of every one of ``paths``."""
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def _chain(owner: str, inner: str) -> list[str]:
    """The modules from ``owner`` (exclusive) down to ``inner``, relative to ``owner``."""
    parts = _rel(owner, inner).split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _tail(f: fx.Node, facts: GraphFacts, owner: str) -> str | None:
    """The module whose output is the branch value ``f``, when nothing else uses that output
    and the module is called once, or only inside the owner's forward (see ``tail_call``)."""
    if f.op == "call_module" and len(f.users) == 1 and _tail_calls(f, facts, owner):
        return f.target
    return None


def _tail_call(f: fx.Node, facts: GraphFacts, owner: str) -> tuple[int, int] | None:
    calls = _tail_calls(f, facts, owner) if f.op == "call_module" and len(f.users) == 1 else []
    return (calls.index(f), len(calls)) if len(calls) > 1 else None


def _tail_calls(f: fx.Node, facts: GraphFacts, owner: str) -> list[fx.Node]:
    """The calls of ``f``'s module in graph order, when it is called once or only by ``owner``."""
    calls = [n for n in facts.nodes if n.op == "call_module" and n.target == f.target]
    if len(calls) == 1 or all(in_scope(n, owner) for n in calls):
        return calls
    return []


def residual_name(owner: str, branch_modules: tuple[str, ...], modules: dict[str, nn.Module],
          qualify: bool, position: int) -> str:
    if not qualify:
        return owner
    prefix = owner + "." if owner else ""
    best, best_params = None, -1
    for m in branch_modules:
        if not m.startswith(prefix):
            continue
        child = m[len(prefix):].split(".")[0]
        params = sum(p.numel() for p in modules[prefix + child].parameters())
        if params > best_params:
            best, best_params = child, params
    return prefix + (best if best is not None else f"add{position}")


def select(residuals: Sequence[Residual], include: Sequence[str] | str | None,
           exclude: Sequence[str] | str | None) -> list[Residual]:
    """Residuals whose name matches any ``include`` glob (all when None) and no ``exclude`` glob."""
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    out = []
    for r in residuals:
        if inc and not any(fnmatch.fnmatchcase(r.name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(r.name, p) for p in exc):
            continue
        out.append(r)
    return out


def require_residuals(residuals: Sequence[Residual], model: nn.Module) -> None:
    if not residuals:
        raise NoResidualsError(
            f"{type(model).__name__} has no residual connection (an add of a shortcut and a "
            f"branch with parameters); nothing to gate. If its blocks hide inside a module fx "
            f"cannot trace, that module is a leaf: see sdsurgery.analyse(model).rejected")
