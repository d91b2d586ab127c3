"""Reading a tensor add as ``shortcut + branch``: the structural part of recognising a residual.

An add ``a + b`` is read both ways (``a`` the shortcut, then ``b``). A reading is a
:class:`Candidate` when

* both operands descend from one *fork* tensor (their latest common ancestor through tensor
  values), which is not the branch operand itself;
* the shortcut side is the fork, or the fork through a short chain of shortcut operations
  (:func:`~sdsurgery.ops.shortcut_role`: at most one conv/linear map plus norms, pooling,
  padding and reshapes);
* the branch side (what the branch operand computes that the shortcut does not) uses parameters.

Otherwise the reading is a :class:`Rejection` with a stable ``code``. A candidate then faces the
named rules of :mod:`.rules`, which reject adds shaped like this that are not blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ops import describe
from .graph import MAX_SHORTCUT_OPS, GraphFacts, iter_bits, owner_of

__all__ = ["Rejection", "Candidate", "read", "shortcut_chain", "SHORTCUT_CODES", "STRUCTURAL_CODES"]


@dataclass(frozen=True)
class Rejection:
    """Why an add is not a residual connection: a stable ``code`` to test and filter on, and a
    ``message`` for people."""

    code: str
    message: str


# Codes of readings that fail before the rules: the shortcut side is not a shortcut chain
# (SHORTCUT_CODES), or the structure is missing (the rest).
SHORTCUT_CODES = ("shortcut-op", "shortcut-merge", "shortcut-long", "shortcut-layers")
STRUCTURAL_CODES = ("no-common-input", "branch-is-fork", "branch-without-params") + SHORTCUT_CODES


@dataclass(frozen=True, eq=False)
class Candidate:
    """One reading of the add ``add`` as ``shortcut + value`` around a block.

    Attributes:
        add: the add node; ``owner``: the module whose forward performs it.
        shortcut, value: the shortcut operand and the branch operand (the branch's output).
        branch_operand: which operand of the add is ``value`` (0 or 1).
        fork: the tensor both sides start from.
        chain: the shortcut ops from ``shortcut`` back to ``fork``, with their roles.
        branch: the nodes the branch computes (those the shortcut does not), in graph order.
        params: parameter elements used on the branch.
        kind: ``"identity"`` or ``"projection"``.
        mixing: the conv/linear nodes of ``value`` if it is a linear map of ``fork``, else None.
    """

    add: fx.Node
    owner: str
    shortcut: fx.Node
    value: fx.Node
    branch_operand: int
    fork: fx.Node
    chain: tuple[tuple[fx.Node, str], ...]
    branch: tuple[fx.Node, ...]
    params: int
    kind: str
    mixing: tuple[fx.Node, ...] | None


def read(facts: GraphFacts, add: fx.Node, s: fx.Node, f: fx.Node,
         branch_operand: int) -> Candidate | Rejection:
    """Read ``add`` as shortcut ``s`` plus branch value ``f`` (see the module docstring)."""
    common = facts.tanc[s] & facts.tanc[f]
    if not common:
        return Rejection("no-common-input", "the operands share no input (e.g. a position embedding)")
    fork = facts.nodes[common.bit_length() - 1]
    if fork is f:
        return Rejection("branch-is-fork", "the branch side is the shortcut's input")
    chain = shortcut_chain(facts, s, fork)
    if isinstance(chain, Rejection):
        return chain
    branch = [facts.nodes[i] for i in iter_bits(facts.anc[f] & ~facts.anc[s])]
    branch = tuple(n for n in branch if n.op != "placeholder")
    params = facts.params_in(list(branch))
    if params == 0:
        return Rejection("branch-without-params", "the branch side has no parameters")
    kind = "identity" if all(role == "identity" for _, role in chain) else "projection"
    mixing = facts.linear_mixing(f, fork)
    return Candidate(add=add, owner=owner_of(add), shortcut=s, value=f, branch_operand=branch_operand,
                     fork=fork, chain=tuple(chain), branch=branch, params=params, kind=kind,
                     mixing=None if mixing is None else tuple(mixing))


def shortcut_chain(facts: GraphFacts, s: fx.Node, fork: fx.Node) -> list[tuple[fx.Node, str]] | Rejection:
    """The shortcut ops from ``s`` back to ``fork`` with their roles, or why there is none."""
    chain: list[tuple[fx.Node, str]] = []
    cur = s
    while cur is not fork:
        ins = facts.data_inputs(cur)
        role = facts.linear_role(cur, ins)
        if role is None and chain and chain[-1][1] == "mixing" and facts.is_norm_act(cur):
            role = "projection"  # a pre-activation projection: conv(relu(bn(x))) (DPN)
        if role is None:
            return Rejection("shortcut-op", f"the shortcut side passes through {describe(cur)}")
        if len(ins) > 1 and cur.op == "call_function" and cur.target is torch.cat:
            # parts of the fork processed apart and put back (MViTv2 pools all tokens but
            # the class token): every part must be a shortcut chain from the fork
            chain.append((cur, role))
            for i in ins:
                sub = shortcut_chain(facts, i, fork)
                if isinstance(sub, Rejection):
                    return sub
                chain.extend(sub)
            break
        if len(ins) != 1:
            return Rejection("shortcut-merge", f"the shortcut side merges {len(ins)} tensors at {describe(cur)}")
        chain.append((cur, role))
        if len(chain) > MAX_SHORTCUT_OPS:
            return Rejection("shortcut-long", "the shortcut side is longer than a projection")
        cur = ins[0]
    if sum(role == "mixing" and not facts.depthwise(n) for n, role in chain) > 1:
        return Rejection("shortcut-layers", "the shortcut side has more than one conv/linear layer")
    return chain
