"""Facts about one flat fx graph that the residual rules and the fold planner ask for.

:class:`GraphFacts` is built once per traced module: node order, what kind of value each node
is (tensor or shape arithmetic), ancestries as bitmasks, which nodes depend on the model's
inputs, parameter use counts, and the small linear-algebra questions the rules ask ("is this
a linear map of that tensor?"). Nothing here decides what a residual is; :mod:`.candidates`
and :mod:`.rules` do, from these facts.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .._compat import BATCH_NORM, CONV, INSTANCE_NORM, POOLS
from ..ops import add_operands, get_attr, is_inplace_add, shortcut_role, value_kinds
from .tracing import FlatTrace

__all__ = ["GraphFacts", "MAX_SHORTCUT_OPS", "owner_of", "in_scope", "redirect_inplace_adds",
           "drop_dead_getitems", "ancestor_masks", "iter_bits", "sub_operands", "is_pooling",
           "is_norm", "is_mul", "is_zero_like"]

MAX_SHORTCUT_OPS = 8
_RESHAPES = {"view", "reshape", "expand", "repeat", "permute", "transpose", "flatten", "unsqueeze",
             "squeeze", "contiguous"}
_NORMS = (BATCH_NORM, nn.LayerNorm, nn.GroupNorm, INSTANCE_NORM)


class GraphFacts:
    """The facts of one traced module's flat graph (see the module docstring).

    Attributes:
        ft: the trace; ``graph``, ``modules`` and ``nodes`` (in order) are its parts.
        kinds: node -> ``"tensor"`` or ``"other"`` (sizes, dtypes, tuples).
        anc, tanc: node -> bitmask of itself and its ancestors (all inputs / tensor inputs only;
            a branch that reads the fork only through its shape does not descend from it).
        data, tdata: the node depends on a model input (through any / tensor inputs), as
            opposed to parameters and constants.
    """

    def __init__(self, ft: FlatTrace):
        self.ft = ft
        self.graph = ft.graph
        redirect_inplace_adds(self.graph)
        drop_dead_getitems(self.graph)
        self.modules = ft.modules
        self.nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.kinds = value_kinds(self.graph, ft.root)
        self.anc = ancestor_masks(self.nodes)
        self.tanc = ancestor_masks(self.nodes, lambda i: self.kinds.get(i) == "tensor")
        placeholders = 0
        for n in self.nodes:
            if n.op == "placeholder":
                placeholders |= 1 << self.index[n]
        self.data = {n: bool(self.anc[n] & placeholders) for n in self.nodes}
        self.tdata = {n: bool(self.tanc[n] & placeholders) for n in self.nodes}
        self._param_uses: dict[int, int] | None = None

    def param_uses(self) -> dict[int, int]:
        """How many graph nodes use each parameter (by id): a fold target's parameters must be
        used once (not shared, not tied). Computed once."""
        if self._param_uses is None:
            uses: dict[int, int] = {}
            for n in self.nodes:
                for p in self._params_of(n):
                    uses[id(p)] = uses.get(id(p), 0) + 1
            self._param_uses = uses
        return self._param_uses

    def _params_of(self, n: fx.Node) -> list[torch.Tensor]:
        if n.op == "call_module":
            return list(self.modules[n.target].parameters())
        if n.op == "get_attr":
            obj = get_attr(self.ft.root, n.target)
            if isinstance(obj, nn.Parameter):
                return [obj]
        return []

    def params_in(self, nodes: list[fx.Node]) -> int:
        """The number of distinct parameter elements ``nodes`` use."""
        seen: set[int] = set()
        total = 0
        for n in nodes:
            for p in self._params_of(n):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    def data_inputs(self, n: fx.Node) -> list[fx.Node]:
        """The tensors ``n`` computes on (for reshapes only the first argument: the sizes may
        come from a tuple that fx cannot tell from a tensor)."""
        if n.op == "call_method" and n.target in _RESHAPES or \
                n.op == "call_function" and n.target in (torch.reshape, torch.flatten, torch.permute,
                                                         torch.transpose):
            first = n.args[0] if n.args else None
            cands = [first] if isinstance(first, fx.Node) else []
        else:
            cands = n.all_input_nodes
        return [i for i in cands if self.data[i] and self.kinds[i] == "tensor" and not is_zero_like(i)]

    def linear_role(self, n: fx.Node, ins: list[fx.Node]) -> str | None:
        """:func:`~sdsurgery.ops.shortcut_role`, plus ``x * scale`` with one data input
        (MetaFormer's res_scale, a layer scale): a parameter or computed gain, not data."""
        role = shortcut_role(n, self.modules)
        if role is None and is_mul(n) and len(ins) == 1:
            return "projection"
        return role

    def is_norm_act(self, n: fx.Node) -> bool:
        """A batch norm with a fused activation (timm ``BatchNormAct2d``)."""
        m = self.modules.get(n.target) if n.op == "call_module" else None
        return isinstance(m, BATCH_NORM) and isinstance(getattr(m, "act", None), nn.Module)

    def depthwise(self, n: fx.Node) -> bool:
        m = self.modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Sequential):
            m = next((c for c in m if isinstance(c, CONV)), None)
        return isinstance(m, CONV) and m.groups == m.in_channels

    def has_layer(self, n: fx.Node) -> bool:
        """``n`` calls a module with parameters, a conv/linear map or a pooling."""
        return (n.op == "call_module" and any(True for _ in self.modules[n.target].parameters())
                or shortcut_role(n, self.modules) == "mixing" or is_pooling(n, self.modules))

    def linear_mixing(self, f: fx.Node, fork: fx.Node, depth: int = 0) -> list[fx.Node] | None:
        """The conv/linear nodes of ``f`` if it is a linear map of ``fork`` (chains of shortcut
        ops, and sums of them: RepVGG-style branches), else None."""
        mixing: list[fx.Node] = []
        cur = f
        while cur is not fork:
            depth += 1
            if depth > 2 * MAX_SHORTCUT_OPS:
                return None
            ops = _sum_operands(cur, self.kinds)
            if ops is not None:
                parts = [self.linear_mixing(o, fork, depth) for o in ops]
                return None if None in parts else mixing + parts[0] + parts[1]
            ins = self.data_inputs(cur)
            role = self.linear_role(cur, ins)
            if role is None or len(ins) != 1:
                return None
            if role == "mixing":
                mixing.append(cur)
            cur = ins[0]
        return mixing

    def linear_terms(self, f: fx.Node, fork: fx.Node, depth: int = 0) -> int:
        """How many terms of the linear sum ``f`` (see :meth:`linear_mixing`) are not the fork
        itself: ``dw(x) - x`` has one, ``dw(x) + conv1(x)`` and ``dw(x) - bn(x)`` have two."""
        cur, identity = f, True
        while cur is not fork and depth <= 2 * MAX_SHORTCUT_OPS:
            depth += 1
            ops = _sum_operands(cur, self.kinds)
            if ops is not None:
                return sum(self.linear_terms(o, fork, depth) for o in ops)
            ins = self.data_inputs(cur)
            if self.linear_role(cur, ins) != "identity":
                identity = False
            if len(ins) != 1:
                break
            cur = ins[0]
        return 0 if identity else 1

    def computed_from_in_scope(self, fork: fx.Node, owner: str) -> set[fx.Node]:
        """Tensors the owner's forward computed ``fork`` from (its own inputs included)."""
        out: set[fx.Node] = set()
        if not in_scope(fork, owner) or fork.op == "placeholder":
            return out
        todo = [i for i in fork.all_input_nodes if self.kinds[i] == "tensor"]
        while todo:
            n = todo.pop()
            if n in out:
                continue
            out.add(n)
            if in_scope(n, owner) and n.op != "placeholder":
                todo.extend(i for i in n.all_input_nodes if self.kinds[i] == "tensor")
        return out

    def on_every_path(self, node: fx.Node, fork: fx.Node, f: fx.Node, branch: list[fx.Node]) -> bool:
        """Every tensor path from ``fork`` to ``f`` inside the branch passes through ``node``."""
        inside = set(branch)
        seen, todo = {fork}, [fork]
        while todo:
            n = todo.pop()
            for u in n.users:
                if u is node or u in seen or u not in inside or self.kinds.get(u) != "tensor":
                    continue
                if u is f:
                    return False
                seen.add(u)
                todo.append(u)
        return True


# ----------------------------------------------------------------------- graph utilities
def owner_of(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ('' = root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def in_scope(node: fx.Node, owner: str) -> bool:
    """``node`` was created by the forward of ``owner`` or of one of its submodules (any frame
    of the module stack counts: a module shared between blocks is named by its first path)."""
    if not owner:
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == owner or path.startswith(owner + ".") for path, _ in stack.values())


def redirect_inplace_adds(graph: fx.Graph) -> None:
    """Make ``y.add_(s)`` visible as a value: later users of ``y`` read the add's result.

    fx records ``y.add_(s)`` as a node nobody uses (the mutated ``y`` is used instead), so
    the add would look dead and its operand ``y`` would look used outside the branch.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not is_inplace_add(node) or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
    graph.lint()


_PURE_METHODS = {"size", "dim", "numel"}


def drop_dead_getitems(graph: fx.Graph) -> None:
    """Erase unused ``getitem`` nodes (``x, _ = attn(...)`` leaves one for ``_``) and unused
    size queries (``x.size(0)`` a trace on an example answered itself).

    They are pure, and left in place they look like a second use of the value they read.
    (No general dead-code elimination: fx would also delete live in-place ops.)
    """
    for node in reversed(list(graph.nodes)):
        if not node.users and (node.op == "call_function" and node.target in (operator.getitem, getattr)
                               or node.op == "call_method" and node.target in _PURE_METHODS):
            graph.erase_node(node)
    graph.lint()


def ancestor_masks(nodes: list[fx.Node], follow=None) -> dict[fx.Node, int]:
    """For each node, a bitmask (bit i = nodes[i]) of itself and all its ancestors (through the
    inputs ``follow`` accepts, all by default)."""
    index = {n: i for i, n in enumerate(nodes)}
    masks: dict[fx.Node, int] = {}
    for n in nodes:
        m = 1 << index[n]
        for i in n.all_input_nodes:
            if follow is None or follow(i):
                m |= masks[i]
        masks[n] = m
    return masks


def iter_bits(mask: int):
    """The indices of the set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _sum_operands(node: fx.Node, kinds: dict[fx.Node, str]) -> tuple[fx.Node, fx.Node] | None:
    return add_operands(node, kinds) or sub_operands(node, kinds)


def sub_operands(node: fx.Node, kinds: dict[fx.Node, str]) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of ``a - b`` (a linear combination, like an add)."""
    if node.op == "call_function" and node.target in (operator.sub, torch.sub) \
            or node.op == "call_method" and node.target in ("sub", "__sub__"):
        a, b = (node.args + (None, None))[:2]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and kinds.get(a) == kinds.get(b) == "tensor":
            return a, b
    return None


def is_pooling(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Spatial pooling (PoolFormer's token mixer: pool(x) - x)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], POOLS)
    return node.op == "call_function" and getattr(node.target, "__name__", "").endswith(("avg_pool2d", "max_pool2d"))


def is_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _NORMS)
    return node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "batch_norm", "layer_norm", "group_norm", "instance_norm")


def is_mul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.mul, torch.mul)
    return node.op == "call_method" and node.target in ("mul", "__mul__", "__rmul__")


def is_zero_like(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (torch.zeros_like, torch.zeros):
        return True
    if node.op == "call_method" and node.target in ("new_zeros", "zero_"):
        return True
    if node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in ("mul", "mul_"):
        return any(isinstance(a, (int, float)) and a == 0 for a in node.args)
    return False
