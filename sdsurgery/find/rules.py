"""The named rules that reject residual-shaped adds that are not blocks.

A :class:`~.candidates.Candidate` is structurally ``shortcut + branch``; each rule here looks at
one and returns a message when the add is something else that happens to have that shape (a
normalisation, a re-parameterisable conv, a position encoding...). The first rule that
objects rejects the candidate with its code. Codes are stable: tests, ``analyse(m).rejected``
and users filter on them.

========================  =====================================================================
code                      what the add is
========================  =====================================================================
``elementwise-norm``      ``x + w * x * norm(x) + b``: parameters used elementwise only (GRN)
``reparam-conv``          both sides linear maps of one tensor (MobileOne, two heads)
``cpe``                   ``x + dwconv(x)`` without a norm: a conv position encoding
``reparam-dw-sum``        a sum of depthwise linear maps (RepViT's RepVggDw, FastViT's RepMixer)
``split-and-sum``         the two sides read different parts of one tensor (Res2Net)
``top-down``              ``lateral(x) + upsample(deeper)``: an FPN / U-Net top-down merge
``inner-add``             an add inside a larger computation (residual pooling in attention)
``nested``                a residual on a side path of another block's branch (goes with it)
========================  =====================================================================

Adds that are never candidates get the codes of :mod:`.candidates` (``branch-without-params``,
``shortcut-op``...), or one of these when the pattern is recognisable: ``pos-embedding`` (one
side does not depend on the input), ``independent-inputs``, ``rotary`` (``x * cos + rot(x) *
sin``), ``sum-of-branches`` (neither side is a shortcut). ``not-traced`` marks a module whose
adds were not searched because torch.fx cannot trace it.

Add a rule with the :func:`rule` decorator::

    @sdsurgery.find.rules.rule("my-pattern")
    def _my_pattern(facts, cand):
        return "why this is not a block" if ... else None
"""
from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from ..ops import describe, shortcut_role
from .candidates import SHORTCUT_CODES, STRUCTURAL_CODES, Candidate, Rejection
from .graph import GraphFacts, in_scope, is_mul, is_norm

__all__ = ["Rule", "RULES", "rule", "check", "explain", "nested"]

Rule = Callable[[GraphFacts, Candidate], "str | None"]
RULES: dict[str, Rule] = {}


def rule(code: str) -> Callable[[Rule], Rule]:
    """Register ``fn(facts, candidate) -> message | None`` as the rule named ``code`` (run
    after the rules registered before it; registering a code again replaces that rule)."""
    if not code or code in STRUCTURAL_CODES:
        raise ValueError(f"rule code {code!r} is empty or taken by the structural checks")

    def register(fn: Rule) -> Rule:
        RULES[code] = fn
        return fn
    return register


def check(facts: GraphFacts, cand: Candidate) -> Rejection | None:
    """The first rule that rejects ``cand``, or None: it is a block."""
    for code, fn in RULES.items():
        message = fn(facts, cand)
        if message:
            return Rejection(code, message)
    return None


@rule("elementwise-norm")
def _elementwise_norm(facts: GraphFacts, c: Candidate) -> str | None:
    # x + w * x * norm(x) + b (GRN): parameters used elementwise only, no layer: a norm.
    if not any(facts.has_layer(n) for n in c.branch):
        return ("the branch has no layer or pooling, only parameters used elementwise: a "
                "normalisation written as x + f(x) (e.g. GRN), not a block")
    return None


@rule("reparam-conv")
def _reparam_conv(facts: GraphFacts, c: Candidate) -> str | None:
    # conv(x) + conv(x), bn(x) + conv(x): one re-parameterisable conv (MobileOne), or two heads.
    # (RepVGG's bn(x) + [conv1x1(x) + conv3x3(x)] stays a block, as timm slots it; x + linear(x)
    # with a full linear layer stays a residual.)
    if c.mixing is None:
        return None
    full = [n for n in c.mixing if not facts.depthwise(n)]
    roles = [role for _, role in c.chain]
    if "mixing" in roles or any(role != "identity" for role in roles) and len(full) <= 1:
        return ("both sides are linear maps of one tensor (a re-parameterisable multi-branch "
                "conv, e.g. MobileOne, or two heads): not a block")
    return None


def _depthwise_only(facts: GraphFacts, c: Candidate) -> bool:
    return bool(c.mixing) and all(facts.depthwise(n) for n in c.mixing)


@rule("cpe")
def _conv_position_encoding(facts: GraphFacts, c: Candidate) -> str | None:
    # x + dwconv(x) with no norm is a conditional position encoding (CPE/PEG: DaViT, CoaT,
    # Twins): the model's position information, always on. With a norm, x + bn(dwconv(x)) is a
    # token-mixing layer that its architectures train with stochastic depth (EfficientViT-MSRA,
    # SHViT, iFormer, EfficientViM): a block.
    if _depthwise_only(facts, c) and not any(is_norm(n, facts.modules) for n in c.branch):
        return ("the branch is linear, depthwise convs with no norm: a conv position encoding "
                "(x + dwconv(x), CPE), not a block")
    return None


@rule("reparam-dw-sum")
def _depthwise_sum(facts: GraphFacts, c: Candidate) -> str | None:
    # RepViT's conv(x) + conv1(x) + x, FastViT's x + s * (bn(dwconv(x)) - bn(x)): one
    # re-parameterisable layer.
    if _depthwise_only(facts, c) and facts.linear_terms(c.value, c.fork) > 1:
        return ("the branch is a sum of depthwise linear maps of the shortcut's input: one "
                "re-parameterisable layer (e.g. RepViT's RepVggDw, FastViT's RepMixer), not a block")
    return None


@rule("split-and-sum")
def _split_and_sum(facts: GraphFacts, c: Candidate) -> str | None:
    # Res2Net, EdgeNeXt: the shortcut takes one part of the fork, the branch computed another.
    first = c.chain[-1][0] if c.chain else None
    if first is None or first.op != "call_function" or first.target is not operator.getitem:
        return None
    in_branch = set(c.branch)
    reads, todo = [], [u for u in c.fork.users if u in in_branch]
    while todo:  # look through dropout / contiguous / identity modules
        u = todo.pop()
        if facts.kinds[u] != "tensor":
            continue
        if shortcut_role(u, facts.modules) == "identity":
            todo.extend(w for w in u.users if w in in_branch)
        else:
            reads.append(u)
    if not any(u.op != "call_function" or u.target is not operator.getitem
               or u.args[1:] == first.args[1:] for u in reads):
        return ("the shortcut and the branch read different parts of one tensor "
                "(a split-and-sum, e.g. Res2Net), not a block")
    return None


_UPSAMPLES = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear"}


def _is_upsample(n: fx.Node, facts: GraphFacts) -> bool:
    if n.op == "call_module":
        return isinstance(facts.modules[n.target], nn.Upsample)
    return n.op in ("call_function", "call_method") and \
        getattr(n.target, "__name__", n.target) in _UPSAMPLES


@rule("top-down")
def _top_down(facts: GraphFacts, c: Candidate) -> str | None:
    # lateral(x) + upsample(deeper(x)): an FPN / U-Net top-down merge, where the "branch" is the
    # deeper part of the network brought back to x's resolution. Residual blocks keep their
    # resolution; dropping this would cut the deeper features out of the pyramid.
    cur = c.value
    for _ in range(8):
        if _is_upsample(cur, facts):
            return ("the branch ends in an upsampling of a deeper feature (an FPN / U-Net "
                    "top-down merge: lateral(x) + upsample(deeper)), not a block")
        ins = facts.data_inputs(cur)
        if len(ins) != 1 or shortcut_role(cur, facts.modules) not in ("identity", "projection"):
            return None
        cur = ins[0]
    return None


@rule("inner-add")
def _inside_a_computation(facts: GraphFacts, c: Candidate) -> str | None:
    # q + attn(q, k, v): the block computed the fork itself, and the branch also reads what the
    # fork was computed from, so the add sits inside a larger computation (residual pooling in
    # attention), not around a block. Side inputs from outside the block (an attention mask
    # passed to every block) are fine.
    before = facts.computed_from_in_scope(c.fork, c.owner) if c.owner else set()
    in_branch = set(c.branch)
    for n in c.branch:
        if facts.kinds[n] != "tensor":  # sizes read from anywhere are fine
            continue
        for i in n.all_input_nodes:
            if i in before and i not in in_branch and facts.tdata[i]:
                return (f"the branch also reads {describe(i)}, from which the shortcut was "
                        f"computed: an add inside a larger computation, not around a block")
    return None


# ------------------------------------------------------------------- adds that are rejected
def explain(facts: GraphFacts, add: fx.Node, readings: list[Rejection]) -> Rejection:
    """One rejection for an add that neither reading accepted: the first named rule's, else the
    most specific code for the pattern, with both messages when they differ."""
    named = [r for r in readings if r.code not in STRUCTURAL_CODES]
    if named:
        return named[0]
    first, second = readings
    message = first.message if first.message == second.message \
        else f"{first.message}; reversed: {second.message}"
    a, b = add.args[0], add.args[1]
    if first.code == "no-common-input":
        code = "pos-embedding" if not (facts.tdata[a] and facts.tdata[b]) else "independent-inputs"
    elif all(_scaled_by_constant(facts, x) for x in (a, b)):
        code = "rotary"
    elif first.code in SHORTCUT_CODES and second.code in SHORTCUT_CODES:
        code = "sum-of-branches"
    else:
        code = first.code
    return Rejection(code, message)


def _scaled_by_constant(facts: GraphFacts, n: fx.Node) -> bool:
    """``x * c`` where only ``x`` depends on the input (``c``: a buffer such as a cos table)."""
    if not is_mul(n):
        return False
    data = [i for i in n.all_input_nodes if facts.tdata[i]]
    return len(data) == 1 and len(n.all_input_nodes) == 2


def nested(facts: GraphFacts, found: list[Candidate]) -> dict[int, str]:
    """Candidates (by index) on a side path inside the branch of another block's residual,
    with that block's owner. CSATv2's attention transformer, whose output gates the block's
    features, goes with its block, as timm slots only the outer one. Residuals in series on a
    branch (EdgeNeXt's XCA inside its block) and those a model's own forward nests (a stage
    around blocks) are kept."""
    adds = {c.add: i for i, c in enumerate(found)}
    out: dict[int, str] = {}
    for c in found:
        if not c.owner:
            continue
        for b in c.branch:
            if b in adds and in_scope(b, c.owner) and adds[b] not in out \
                    and not facts.on_every_path(b, c.fork, c.value, list(c.branch)):
                out[adds[b]] = c.owner
    return out
