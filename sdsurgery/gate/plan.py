"""Planning a conversion: for each block that owns gated residuals, how it will be gated.

Each owner gets a :class:`Program`: its rewritten forward and branch functions (from
:mod:`.rewrite`, shared by blocks of one structure) and its gates; or, when its forward cannot
be rewritten (it branches on input sizes, or cannot be traced alone), gates hooked on the
output of the branches' tail modules, which mask a computed branch instead of skipping it.
Nothing is installed here: :func:`prepare` touches no module, so a failure leaves the model as
it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch.nn as nn

from .._compat import children_of
from ..find.graph import owner_of
from ..find.residuals import Analysis, Residual
from ..ops import is_add_call
from ..find.tracing import FlatTrace, split_call, trace_block, trace_block_on_example
from .gates import GateController, GateSpec, StochasticDepthGate
from .rewrite import (Rewrite, Skip, Untraceable, guarded_forward, reads_training, rewrite_block,
                      short_error, structure_key)

__all__ = ["Program", "prepare"]


@dataclass
class Program:
    """The rewritten forward of one owner module (or, with ``forward`` None, gates hooked on
    the output of the modules named in ``hooks``, one per gate)."""

    owner: str
    forward: Callable | None
    branches: list[tuple[str, Callable]] = field(default_factory=list)
    gates: list[tuple[str, StochasticDepthGate]] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)


def _gate(r: Residual, probs: list[float], ctrl: GateController, **cut: Any) -> StochasticDepthGate:
    if r.outside and not cut.get("masked"):
        # Honest about what a drop saves: the caller computes part of the branch anyway.
        more = f" and {len(r.outside) - 1} more" if len(r.outside) > 1 else ""
        cut["masked"] = (f"part of its branch ('{r.outside[0]}'{more}) is computed by the module "
                         f"that calls '{r.owner}', outside it: a drop skips only the part inside")
    return StochasticDepthGate(GateSpec.of(r, **cut), drop_prob=probs[r.index], controller=ctrl)


def _program_of(owner: str, rewrite: Rewrite, residuals: list[Residual], probs: list[float],
                ctrl: GateController, **extra: Any) -> Program:
    """The program of a rewritten owner: its forward, branch functions and gates."""
    return Program(owner=owner, forward=extra.pop("forward", rewrite.forward),
                   branches=[(c.fn_attr, c.fn) for c in rewrite.cuts],
                   gates=[(c.gate_attr, _gate(r, probs, ctrl, batched=c.batched,
                                              sample_fallback=c.sample_fallback, masked=c.masked,
                                              skips=tuple(f"{owner}.{m}" if owner else m for m in c.modules)))
                          for c, r in zip(rewrite.cuts, residuals)], **extra)


def prepare(target: nn.Module, analysis: Analysis, chosen: list[Residual], probs: list[float],
            ctrl: GateController) -> tuple[list[Program], list[tuple[str, str]]]:
    """A program for each block owning residuals in ``chosen``, and the (name, why) of the
    residuals that cannot be gated. Touches nothing in ``target``."""
    ft = analysis.trace
    cache: dict[Any, Rewrite] = {}
    by_owner = _lift_partial(target, analysis, chosen, cache)
    programs, skipped = [], []
    for owner, rs in by_owner.items():
        untraceable = None
        if any(r.specialised for r in rs):
            untraceable = "its block's forward depends on input sizes (traced on an example)"
        while rs and untraceable is None:
            try:
                programs.append(_program(target, owner, rs, probs, ctrl, ft,
                                         analysis.add_counts.get(owner, 0), cache))
                break
            except Untraceable as e:
                untraceable = str(e)
            except Skip as e:
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
            except Skip as e:
                hooked, why = _hook_program(target, owner, rs, probs, ctrl, f"{untraceable}; {e}")
                programs.extend(hooked)
                skipped.extend(why)
    return programs, skipped


def _groups(residuals: list[Residual]) -> dict[str, list[Residual]]:
    by_owner: dict[str, list[Residual]] = {}
    for r in residuals:
        by_owner.setdefault(r.owner, []).append(r)
    return by_owner


def _lift_partial(target: nn.Module, analysis: Analysis, chosen: list[Residual],
                  cache: dict[Any, Rewrite]) -> dict[str, list[Residual]]:
    """The residuals by owner, where a block whose rewrite can cut only part of a branch out
    (the rest is also returned by the block: BERT's attention returns its weights, which
    BertLayer throws away) is traced inline in its parent instead, when the parent's rewrite
    then cuts every branch whole."""
    groups = _groups(chosen)
    ft = analysis.trace
    for owner, rs in list(groups.items()):
        if not owner or owner not in groups or any(r.specialised for r in rs):
            continue
        cuts = _trial(target, owner, rs, ft, analysis.add_counts.get(owner, 0), cache)
        if not any(_partial(target, c, r, owner) for c, r in zip(cuts, rs)):
            continue
        parent, _, child = owner.rpartition(".")
        inline = {child, *(f"{child}.{p}" for p in rs[0].inline)}
        inline |= set(groups[parent][0].inline) if parent in groups else set()
        relocated = _relocate(target, ft, groups.get(parent, []) + rs, parent, tuple(sorted(inline)))
        if relocated is None:
            continue
        moved, add_count = relocated
        cuts = _trial(target, parent, moved, ft, add_count, cache)
        if len(cuts) == len(moved) and not any(_partial(target, c, r, parent) for c, r in zip(cuts, moved)):
            groups.pop(owner)
            groups[parent] = moved
            analysis.add_counts[parent] = add_count  # the adds of its trace with these inline
    return groups


def _trial(target: nn.Module, owner: str, rs: list[Residual], ft: FlatTrace, add_count: int,
           cache: dict[Any, Rewrite]) -> list:
    try:
        return _rewrite_for(target, owner, rs, ft, add_count, cache)[0].cuts
    except Skip:
        return []


def _partial(target: nn.Module, cut, r: Residual, owner: str) -> bool:
    """The cut leaves in the block a module of the branch that has parameters."""
    have = [f"{owner}.{m}" if owner else m for m in cut.modules]
    return any(m.startswith(owner + ".") and any(True for _ in target.get_submodule(m).parameters())
               and not any(m == h or m.startswith(h + ".") for h in have) for m in r.modules)


def _relocate(target: nn.Module, ft: FlatTrace, rs: list[Residual], owner: str,
              inline: tuple[str, ...]) -> tuple[list[Residual], int] | None:
    """``rs`` owned by ``owner`` with ``inline`` (their adds found in that trace by the module
    that made them) and how many adds that trace shows; None when it cannot be traced so."""
    calls = ft.calls.get(owner, [])
    block = target.get_submodule(owner)
    concrete = calls[0].concrete_args(block) if len(calls) == 1 else None
    if concrete is None:
        return None
    try:
        graph = trace_block(block, concrete, ft.autowrap_functions, inline=inline)
    except Exception:
        return None
    adds = [n for n in graph.nodes if is_add_call(n)]

    def scope(o: str, inl: tuple[str, ...]) -> list:
        names = {o} | {f"{o}.{p}" if o else p for p in inl}
        return [n for n in adds if owner_of(n) in names]

    whole = scope("", inline)
    out = []
    for r in rs:
        mine = scope(r.owner[len(owner) + 1:] if owner else r.owner, r.inline)
        if r.owner != owner and not r.owner.startswith(owner + ".") or r.add_position >= len(mine):
            return None
        out.append(replace(r, owner=owner, inline=inline, add_position=whole.index(mine[r.add_position])))
    return out, len(whole)


def _rewrite_for(target: nn.Module, owner: str, residuals: list[Residual], ft: FlatTrace, add_count: int,
                 cache: dict[Any, Rewrite]) -> tuple[Rewrite, Any]:
    """The rewrite of ``owner`` for ``residuals`` (shared by blocks of one structure) and the
    constants of its call."""
    block = target.get_submodule(owner)
    if "forward" in block.__dict__:
        raise Skip(f"'{owner}' already has a patched forward")
    concrete: dict[str, Any] | None = None
    if owner:
        calls = ft.calls.get(owner, [])
        if not calls:
            raise Skip(f"no call of '{owner}' was traced (its caller could not be traced, so it "
                       f"was searched on its own); convert the module that calls it, if that "
                       f"one traces")
        if len(calls) > 1:
            raise Skip(f"'{owner}' is called {len(calls)} times in one forward pass (shared "
                       f"weights); sdsurgery gates blocks called once")
        concrete = calls[0].concrete_args(block)
        if concrete is None:
            raise Skip(f"cannot map the call of '{owner}' onto its forward signature")
    specs = tuple((r.add_position, r.branch_operand) for r in residuals)
    key = structure_key(block, concrete, specs, add_count, residuals[0].inline)
    rewrite = cache.get(key) if key is not None else None
    if rewrite is None:
        rewrite = rewrite_block(block, owner, residuals, concrete, ft, add_count)
        if key is not None:
            cache[key] = rewrite
    return rewrite, concrete


def _program(target: nn.Module, owner: str, residuals: list[Residual], probs: list[float],
             ctrl: GateController, ft: FlatTrace, add_count: int,
             cache: dict[Any, Rewrite]) -> Program:
    block = target.get_submodule(owner)
    rewrite, concrete = _rewrite_for(target, owner, residuals, ft, add_count, cache)
    if concrete and (any(v is not None for v in concrete.values()) or concrete.extra_keywords) \
            and all(r.tail is not None for r in residuals):
        # Called with constants (a decoder layer: cache=None, use_cache=False) that a later
        # call may not give (a KV cache in generation): such calls run the block's own
        # forward, its gates hooked on the branch tails.
        forward = guarded_forward(rewrite.forward, block, {}, concrete,
                                  tuple(c.gate_attr for c in rewrite.cuts))
        return _program_of(owner, rewrite, residuals, probs, ctrl, forward=forward,
                           hooks=[r.tail for r in residuals])
    return _program_of(owner, rewrite, residuals, probs, ctrl)


def _guarded_program(target: nn.Module, owner: str, residuals: list[Residual], probs: list[float],
                     ctrl: GateController, analysis: Analysis) -> Program:
    """A block whose forward branches on sizes, rewritten from a trace of its example call that
    keeps the batch size free. The new forward runs when the call has the example's other sizes
    and non-tensor arguments; any other call runs the block's own forward with the gates hooked
    on the branches' tail modules (masking, as for :func:`_hook_program`)."""
    if any(r.tail is None for r in residuals):
        raise Skip("not every branch ends in a module output a gate could take over")
    root = analysis.trace.root
    call = analysis.examples.of(root.get_submodule(owner)) if analysis.examples is not None else None
    if call is None:
        raise Skip("no example call of it was recorded")
    block = target.get_submodule(owner)
    if "forward" in block.__dict__ or reads_training(block):
        raise Skip("its forward is patched or reads self.training")
    try:
        concrete, tensors = split_call(block, *call)
        graph = trace_block_on_example(block, concrete, tensors, analysis.trace.autowrap_functions)
    except Exception as e:
        raise Skip(f"not traceable on its example call either: {type(e).__name__}: "
                    f"{short_error(e)}") from None
    rewrite = rewrite_block(block, owner, residuals, None, analysis.trace,
                            analysis.add_counts.get(owner, 0), graph=graph)
    sizes = {name: tuple(t.shape[1:]) for name, t in tensors.items()}
    forward = guarded_forward(rewrite.forward, block, sizes, concrete,
                              tuple(c.gate_attr for c in rewrite.cuts))
    return _program_of(owner, rewrite, residuals, probs, ctrl, forward=forward,
                       hooks=[r.tail for r in residuals])


def _hook_program(target: nn.Module, owner: str, residuals: list[Residual], probs: list[float],
                  ctrl: GateController, why: str) -> tuple[list[Program], list[tuple[str, str]]]:
    """Gate the residuals of a block that cannot be rewritten at their tail modules (a
    drop-path slot): the branch is computed and its value masked, as timm's DropPath does."""
    block = target.get_submodule(owner)
    prog = Program(owner=owner, forward=None)
    skipped = []
    for r in residuals:
        attr = f"sd_gate_{len(prog.gates)}"
        if r.tail is None or attr in children_of(block) or attr in block.__dict__:
            skipped.append((r.name, f"block '{owner}' not rewritten: {why}; its branch does not "
                                    f"end in a module output that a gate could take over"))
            continue
        prog.gates.append((attr, _gate(r, probs, ctrl, masked=f"{why}: gated at the output of '{r.tail}'")))
        prog.hooks.append(r.tail)
    return ([prog] if prog.gates else []), skipped
