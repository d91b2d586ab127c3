"""Finding residual connections in a traced model.

A residual connection is a tensor add ``shortcut + branch`` where

* both operands descend from one *fork* tensor ``x`` (their latest common ancestor);
* the shortcut side is ``x`` itself (an *identity* shortcut) or ``x`` through a short chain of
  shortcut operations: at most one conv/linear map plus norms, pooling, padding and reshapes
  (a *projection* shortcut). Activations, attention or arbitrary arithmetic disqualify it;
* the branch side carries parameters.

This leaves out position-embedding adds (one side is a parameter: no common ancestor),
rotary embeddings (neither side is a shortcut chain, nor carries parameters), shape or tuple
arithmetic (not tensors), and sums of two real branches (neither side is a short chain).
When both operands qualify, the identity side, then the side with fewer parameters, is the
shortcut (``pb(proj(x)) + b2(c2(x))`` is a projection block whichever order it is written in).
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .._compat import BATCH_NORM, CONV, INSTANCE_NORM, POOLS
from ..errors import NoResidualsError, TraceError
from ..ops import (add_operands, describe, is_add_call, is_drop_module, is_inplace_add, get_attr,
                  shortcut_role, value_kinds)
from .tracing import (FlatTrace, LeafSpec, notrace_module_types, resolve_leaves, trace_model,
                      trace_with_example, traceable)

__all__ = ["Residual", "RejectedAdd", "Analysis", "find_residuals", "analyse", "select",
           "owner_of", "redirect_inplace_adds", "drop_dead_getitems", "ancestor_masks",
           "iter_bits", "require_residuals"]

_MAX_SHORTCUT_OPS = 8
_MAX_AUTO_LEAVES = 64
_RESHAPES = {"view", "reshape", "expand", "repeat", "permute", "transpose", "flatten", "unsqueeze",
             "squeeze", "contiguous"}


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
        specialised: found in a trace specialised to an example's sizes (the owner's forward
            branches on them), so the owner is gated through ``tail``, never rewritten.
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


@dataclass
class Analysis:
    """Everything :func:`analyse` learns about a model."""

    residuals: list[Residual]
    rejected: list[RejectedAdd]
    trace: FlatTrace = field(repr=False)
    add_counts: dict[str, int] = field(default_factory=dict, repr=False)  # add calls per owner
    order: list[int] = field(default_factory=list, repr=False)  # graph position of each residual
    examples: "_Examples | None" = field(default=None, repr=False)  # module calls on an example


def find_residuals(model: nn.Module, *, leaf_modules: LeafSpec = (),
                   example: torch.Tensor | None = None) -> list[Residual]:
    """The residual connections of ``model``, in depth order.

    Args:
        model: any ``nn.Module`` torch.fx can trace (timm, torchvision, custom).
        leaf_modules: module classes, qualified names or module objects fx must not trace into.
        example: an input for ``model``, used only to trace modules whose forward branches on
            tensor sizes (timm's TinyViT blocks), specialised to its sizes; by default a random
            batch of the model's ``pretrained_cfg["input_size"]``.

    Raises:
        TraceError: fx cannot trace the model; the message names the module and how to mark it
            a leaf.
    """
    return analyse(model, leaf_modules=leaf_modules, example=example).residuals


def analyse(model: nn.Module, *, leaf_modules: LeafSpec = (),
            example: torch.Tensor | None = None) -> Analysis:
    """Trace ``model`` and classify every tensor add (see the module docstring and
    :func:`find_residuals`)."""
    from ..gate.gates import is_converted  # local: gates imports nothing from here, keep it that way

    if is_converted(model):
        raise ValueError("the model is already converted (it carries stochastic-depth gates); "
                         "call sdsurgery.fold(model) first, or use sdsurgery.gates(model)")
    examples = _Examples(model, example)
    analysis = _analyse_with(model, leaf_modules, None, examples)
    analysis.examples = examples
    return analysis


class _Examples:
    """How modules are called on an example input, recorded in one eval forward pass of the
    model the first time it is asked (only modules that fx cannot trace need it)."""

    def __init__(self, root: nn.Module, example: torch.Tensor | None):
        self.root, self.example = root, example
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.wanted: set[int] = set()
        self.error = ""

    def of(self, module: nn.Module) -> tuple[tuple, dict] | None:
        """The first call of ``module`` (or of any module inside it: they are recorded along)."""
        if id(module) not in self.wanted:
            if not self.wanted:  # one pass for all of timm's not-traceable modules
                notrace = notrace_module_types()
                self.wanted = {id(m) for leaf in self.root.modules() if isinstance(leaf, notrace)
                               for m in leaf.modules()}
            self.wanted |= {id(m) for m in module.modules()}
            self._record()
        return self.calls.get(id(module))

    def _record(self) -> None:
        self.calls = {}
        x = self.example
        if x is None:
            cfg = getattr(self.root, "pretrained_cfg", None) or getattr(self.root, "default_cfg", None) or {}
            size = cfg.get("input_size") if isinstance(cfg, dict) else None
            if not size:
                self.error = "no example input (pass example=... with an input for the model)"
                return
            x = torch.randn(2, *size)
        wanted, calls = self.wanted, self.calls

        def record(module, args, kwargs):
            calls.setdefault(id(module), (args, kwargs))

        handles = [m.register_forward_pre_hook(record, with_kwargs=True)
                   for m in self.root.modules() if id(m) in wanted]
        try:
            with torch.no_grad(), traceable(self.root):
                self.root(x)
        except Exception as e:
            self.calls.clear()
            self.error = f"the example input failed: {type(e).__name__}: {str(e)[:120]}"
        finally:
            for h in handles:
                h.remove()


def _search_leaves(analysis: Analysis, leaf_modules: LeafSpec, examples: "_Examples",
                   auto: set[int] = frozenset()) -> None:
    """Residuals inside modules timm registers as not traceable (NormFreeBlock, MobileVitBlock,
    ...) and those fx failed on (``auto``): trace each such leaf on its own, as it was called,
    and lift what it holds into ``analysis``. A leaf whose own forward cannot be traced (it
    branches on tensor sizes) is traced on an example call, or else searched through its
    children; what stays unsearched is said in ``analysis.rejected``."""
    ft = analysis.trace
    user_types, user_ids = resolve_leaves(ft.root, leaf_modules)
    user_leaves = list(user_types) + [m for m in ft.modules.values() if id(m) in user_ids]
    notrace = notrace_module_types()
    found: list[tuple[int, Residual]] = list(zip(analysis.order, analysis.residuals))
    for pos, node in enumerate(ft.graph.nodes):
        if node.op != "call_module":
            continue
        path, leaf = node.target, ft.modules[node.target]
        if id(leaf) not in auto and (id(leaf) in user_ids or isinstance(leaf, user_types)
                                     or not isinstance(leaf, notrace)):
            continue
        calls = ft.calls.get(path, [])
        concrete = calls[0].concrete_args(leaf) if len(calls) == 1 else None
        _search_module(analysis, path, leaf, concrete, user_leaves, pos, found, examples)
    found.sort(key=lambda kr: kr[0])  # depth order: leaves sit where they are called
    analysis.residuals = [replace(r, index=i) for i, (_, r) in enumerate(found)]
    analysis.order = [k for k, _ in found]


def _search_module(analysis: Analysis, path: str, module: nn.Module, concrete: dict | None,
                   user_leaves: list, pos: int, found: list[tuple[int, Residual]],
                   examples: _Examples) -> None:
    ft = analysis.trace
    specialised = False
    try:
        sub = _analyse_with(module, user_leaves, concrete, examples)
    except TraceError as e:
        why = _trace_why(e)
        call = examples.of(module)
        sub = None
        if call is not None:  # its forward branches on sizes: specialise to the example's
            try:
                sub = _analyse_with(module, user_leaves, None, examples, example_call=call)
                specialised = True
            except TraceError as e2:
                why2 = _trace_why(e2)
                why += ", also on an example input" if why2 == why else f"; on an example input: {why2}"
        elif examples.error:
            why += f"; {examples.error}"
        if sub is None:
            children = [(name, child) for name, child in module.named_children()
                        if any(True for _ in child.parameters()) and len(list(child.modules())) > 1]
            analysis.rejected.append(RejectedAdd(path, f"leaf {path}", (
                f"adds in the forward of '{path}' ({type(module).__name__}) were not searched: "
                f"torch.fx cannot trace it ({why})" + ("; its submodules were" if children else ""))))
            for name, child in children:
                _search_module(analysis, f"{path}.{name}", child, None, user_leaves, pos, found, examples)
            return
    prefix = path + "."
    for owner, count in sub.add_counts.items():
        analysis.add_counts[prefix + owner if owner else path] = count
    for name, c in sub.trace.calls.items():
        if name:
            ft.calls.setdefault(prefix + name, c)
    per_owner: dict[str, int] = {}
    for r in sub.residuals:
        per_owner[r.owner] = per_owner.get(r.owner, 0) + 1
    for r in sub.residuals:
        owner = prefix + r.owner if r.owner else path
        mods = tuple(prefix + m for m in r.modules)
        # In a specialised trace, a block inside the module was called with arguments that may
        # be sizes of the example: rewriting it would bake them in. The module itself was
        # called from the unspecialised trace around it.
        fixed = specialised and bool(r.owner) and not _size_free(sub.trace, r.owner)
        found.append((pos, replace(
            r, owner=owner, modules=mods,
            name=_name(owner, mods, ft.modules, per_owner[r.owner] > 1, r.add_position),
            shortcut_modules=tuple(prefix + m for m in r.shortcut_modules),
            fold_target=prefix + r.fold_target if r.fold_target else None,
            fold_params=tuple(prefix + p for p in r.fold_params),
            drop_modules=tuple(prefix + m for m in r.drop_modules),
            tail=prefix + r.tail if r.tail else None,
            specialised=r.specialised or fixed)))
    analysis.rejected.extend(replace(x, owner=prefix + x.owner if x.owner else path)
                             for x in sub.rejected)


def _trace_why(e: TraceError) -> str:
    """What fx said in a :class:`TraceError`, without the module name and the leaf hint."""
    return str(e).split(": ", 2)[-1].split(". Mark it")[0][:140]


def _size_free(ft: FlatTrace, owner: str) -> bool:
    """The one call of ``owner`` passed no constant that could be a size (only tensors, None,
    bools, strings)."""
    calls = ft.calls.get(owner, [])
    concrete = calls[0].concrete_args(ft.modules[owner]) if len(calls) == 1 else None
    return concrete is not None and all(v is None or isinstance(v, (bool, str)) for v in concrete.values())


def _analyse_with(module: nn.Module, leaf_modules: LeafSpec, concrete: dict | None,
                  examples: _Examples, example_call: tuple[tuple, dict] | None = None) -> Analysis:
    """Trace ``module`` (specialised on ``concrete`` arguments, or on the sizes of
    ``example_call``), classify its adds, search its not-traceable leaves.

    A submodule fx cannot trace becomes a leaf, and the trace is made again; such leaves are
    then searched like timm's not-traceable ones (on their own, on an example, or through
    their children)."""
    leaves = list(leaf_modules)
    auto: list[nn.Module] = []
    while True:
        try:
            if example_call is None:
                ft = trace_model(module, leaves + auto, concrete_args=concrete)
            else:
                ft = trace_with_example(module, leaves + auto, *example_call)
            break
        except TraceError as e:
            failed = module.get_submodule(e.module) if e.module else None
            if failed is None or any(failed is m for m in auto) or len(auto) >= _MAX_AUTO_LEAVES:
                raise
            auto.append(failed)
    analysis = _Analyser(ft).run()
    _search_leaves(analysis, leaf_modules, examples, {id(m) for m in auto})
    return analysis


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


# ------------------------------------------------------------------------------ internals
def owner_of(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ('' = root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _in_scope(node: fx.Node, owner: str) -> bool:
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


def drop_dead_getitems(graph: fx.Graph) -> None:
    """Erase unused ``getitem`` nodes (``x, _ = attn(...)`` leaves one for ``_``).

    They are pure, and left in place they look like a second use of the tuple they index.
    (No general dead-code elimination: fx would also delete live in-place ops.)
    """
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
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
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _sub_operands(node: fx.Node, kinds: dict[fx.Node, str]) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of ``a - b`` (a linear combination, like an add)."""
    if node.op == "call_function" and node.target in (operator.sub, torch.sub) \
            or node.op == "call_method" and node.target in ("sub", "__sub__"):
        a, b = (node.args + (None, None))[:2]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and kinds.get(a) == kinds.get(b) == "tensor":
            return a, b
    return None


def _is_pooling(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Spatial pooling (PoolFormer's token mixer: pool(x) - x)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], POOLS)
    return node.op == "call_function" and getattr(node.target, "__name__", "").endswith(("avg_pool2d", "max_pool2d"))


_NORMS = (BATCH_NORM, nn.LayerNorm, nn.GroupNorm, INSTANCE_NORM)


def _is_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _NORMS)
    return node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "batch_norm", "layer_norm", "group_norm", "instance_norm")


def _is_mul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.mul, torch.mul)
    return node.op == "call_method" and node.target in ("mul", "__mul__", "__rmul__")


def _is_zero_like(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (torch.zeros_like, torch.zeros):
        return True
    if node.op == "call_method" and node.target in ("new_zeros", "zero_"):
        return True
    if node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in ("mul", "mul_"):
        return any(isinstance(a, (int, float)) and a == 0 for a in node.args)
    return False


class _Analyser:
    def __init__(self, ft: FlatTrace):
        self.ft = ft
        self._param_uses: dict[int, int] | None = None
        self.graph = ft.graph
        redirect_inplace_adds(self.graph)
        drop_dead_getitems(self.graph)
        self.nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.kinds = value_kinds(self.graph, ft.root)
        self.anc = ancestor_masks(self.nodes)
        placeholders = 0
        for n in self.nodes:
            if n.op == "placeholder":
                placeholders |= 1 << self.index[n]
        # tanc: ancestry through tensor values only. A branch that reads the fork only through
        # its shape (a position embedding sized like x) does not descend from it.
        self.tanc = ancestor_masks(self.nodes, lambda i: self.kinds.get(i) == "tensor")
        # data[n]: n depends on a model input (as opposed to parameters and constants)
        self.data = {n: bool(self.anc[n] & placeholders) for n in self.nodes}
        self.tdata = {n: bool(self.tanc[n] & placeholders) for n in self.nodes}
        self.modules = ft.modules

    # -- the chain from the fork to the shortcut operand
    def param_uses(self) -> dict[int, int]:
        """How many graph nodes use each parameter (by id): a fold target's parameters must be
        used once (not shared, not tied). Computed once per analysis."""
        if self._param_uses is None:
            uses: dict[int, int] = {}
            for n in self.nodes:
                if n.op == "call_module":
                    for p in self.modules[n.target].parameters():
                        uses[id(p)] = uses.get(id(p), 0) + 1
                elif n.op == "get_attr":
                    obj = get_attr(self.ft.root, n.target)
                    if isinstance(obj, nn.Parameter):
                        uses[id(obj)] = uses.get(id(obj), 0) + 1
            self._param_uses = uses
        return self._param_uses

    def _shortcut_chain(self, s: fx.Node, fork: fx.Node) -> tuple[list[tuple[fx.Node, str]], str | None]:
        chain: list[tuple[fx.Node, str]] = []
        cur = s
        while cur is not fork:
            ins = self._data_inputs(cur)
            role = self._linear_role(cur, ins)
            if role is None and chain and chain[-1][1] == "mixing" and self._is_norm_act(cur):
                role = "projection"  # a pre-activation projection: conv(relu(bn(x))) (DPN)
            if role is None:
                return chain, f"the shortcut side passes through {describe(cur)}"
            if len(ins) > 1 and cur.op == "call_function" and cur.target is torch.cat:
                # parts of the fork processed apart and put back (MViTv2 pools all tokens but
                # the class token): every part must be a shortcut chain from the fork
                chain.append((cur, role))
                for i in ins:
                    sub, why = self._shortcut_chain(i, fork)
                    if why:
                        return chain, why
                    chain.extend(sub)
                break
            if len(ins) != 1:
                return chain, f"the shortcut side merges {len(ins)} tensors at {describe(cur)}"
            chain.append((cur, role))
            if len(chain) > _MAX_SHORTCUT_OPS:
                return chain, "the shortcut side is longer than a projection"
            cur = ins[0]
        if sum(role == "mixing" and not self._depthwise(n) for n, role in chain) > 1:
            return chain, "the shortcut side has more than one conv/linear layer"
        return chain, None

    def _on_every_path(self, node: fx.Node, fork: fx.Node, f: fx.Node, branch: list[fx.Node]) -> bool:
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

    def _linear_role(self, n: fx.Node, ins: list[fx.Node]) -> str | None:
        """:func:`shortcut_role`, plus ``x * scale`` with one data input (MetaFormer's
        res_scale, a layer scale): a parameter or computed gain, not data."""
        role = shortcut_role(n, self.modules)
        if role is None and _is_mul(n) and len(ins) == 1:
            return "projection"
        return role

    def _is_norm_act(self, n: fx.Node) -> bool:
        m = self.modules.get(n.target) if n.op == "call_module" else None
        return isinstance(m, BATCH_NORM) and isinstance(getattr(m, "act", None), nn.Module)

    def _data_inputs(self, n: fx.Node) -> list[fx.Node]:
        """The tensors ``n`` computes on (for reshapes only the first argument: the sizes may
        come from a tuple that fx cannot tell from a tensor)."""
        if n.op == "call_method" and n.target in _RESHAPES or \
                n.op == "call_function" and n.target in (torch.reshape, torch.flatten, torch.permute,
                                                         torch.transpose):
            first = n.args[0] if n.args else None
            cands = [first] if isinstance(first, fx.Node) else []
        else:
            cands = n.all_input_nodes
        return [i for i in cands if self.data[i] and self.kinds[i] == "tensor" and not _is_zero_like(i)]

    def _branch_params(self, nodes: list[fx.Node]) -> int:
        seen: set[int] = set()
        total = 0
        for n in nodes:
            params: list[torch.Tensor] = []
            if n.op == "call_module":
                params = list(self.modules[n.target].parameters())
            elif n.op == "get_attr":
                obj = get_attr(self.ft.root, n.target)
                if isinstance(obj, nn.Parameter):
                    params = [obj]
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    def _try(self, s: fx.Node, f: fx.Node, owner: str):
        common = self.tanc[s] & self.tanc[f]
        if not common:
            return None, "the operands share no input (e.g. a position embedding)"
        fork = self.nodes[common.bit_length() - 1]
        if fork is f:
            return None, "the branch side is the shortcut's input"
        chain, why = self._shortcut_chain(s, fork)
        if why:
            return None, why
        branch_mask = self.anc[f] & ~self.anc[s]
        branch = [self.nodes[i] for i in iter_bits(branch_mask)]
        branch = [n for n in branch if n.op != "placeholder"]
        params = self._branch_params(branch)
        if params == 0:
            return None, "the branch side has no parameters"
        why = self._not_a_block(fork, chain, f, branch, owner)
        if why:
            return None, why
        kind = "identity" if all(role == "identity" for _, role in chain) else "projection"
        return dict(s=s, f=f, fork=fork, chain=chain, branch=branch, params=params, kind=kind), None

    def _not_a_block(self, fork: fx.Node, chain, f: fx.Node, branch: list[fx.Node],
                     owner: str) -> str | None:
        """Adds shaped like ``shortcut + branch`` that are not a block around a residual."""
        # x + dwconv(x), conv1x1(x) + conv3x3(x): one linear map written as a sum (conv position
        # encodings, RepVGG's training-time branches, two heads). Dropping a part of it is not
        # stochastic depth. (x + linear(x) with a full linear layer stays a residual.)
        # x + w * x * norm(x) + b (GRN): parameters used elementwise only, no layer: a norm.
        if not any(n.op == "call_module" and any(True for _ in self.modules[n.target].parameters())
                   or shortcut_role(n, self.modules) == "mixing" or _is_pooling(n, self.modules)
                   for n in branch):
            return ("the branch has no layer or pooling, only parameters used elementwise: a "
                    "normalisation written as x + f(x) (e.g. GRN), not a block")
        mixing = self._linear_mixing(f, fork)
        if mixing is not None:
            full = [n for n in mixing if not self._depthwise(n)]
            # conv(x) + conv(x), bn(x) + conv(x): one re-parameterisable conv (MobileOne), or two
            # heads. (RepVGG's bn(x) + [conv1x1(x) + conv3x3(x)] stays a block, as timm slots it.)
            if any(role == "mixing" for _, role in chain) or \
                    any(role != "identity" for _, role in chain) and len(full) <= 1:
                return ("both sides are linear maps of one tensor (a re-parameterisable multi-branch "
                        "conv, e.g. MobileOne, or two heads): not a block")
            # x + dwconv(x) with no norm is a conditional position encoding (CPE/PEG: DaViT,
            # CoaT, Twins): the model's position information, always on. With a norm,
            # x + bn(dwconv(x)) is a token-mixing layer that its architectures train with
            # stochastic depth (EfficientViT-MSRA, SHViT, iFormer, EfficientViM): a block.
            # A sum of several depthwise linear maps (RepViT's conv(x) + conv1(x) + x,
            # FastViT's x + s * (bn(dwconv(x)) - bn(x))) is one re-parameterisable layer.
            if mixing and all(self._depthwise(n) for n in mixing):
                if not any(_is_norm(n, self.modules) for n in branch):
                    return ("the branch is linear, depthwise convs with no norm: a conv position "
                            "encoding (x + dwconv(x), CPE), not a block")
                if self._linear_terms(f, fork) > 1:
                    return ("the branch is a sum of depthwise linear maps of the shortcut's input: "
                            "one re-parameterisable layer (e.g. RepViT's RepVggDw, FastViT's "
                            "RepMixer), not a block")
        # split-and-sum (Res2Net, EdgeNeXt): the shortcut takes one part of the fork, the
        # branch computed another part.
        first = chain[-1][0] if chain else None
        in_branch = set(branch)
        if first is not None and first.op == "call_function" and first.target is operator.getitem:
            reads, todo = [], [u for u in fork.users if u in in_branch]
            while todo:  # look through dropout / contiguous / identity modules
                u = todo.pop()
                if self.kinds[u] != "tensor":
                    continue
                if shortcut_role(u, self.modules) == "identity":
                    todo.extend(w for w in u.users if w in in_branch)
                else:
                    reads.append(u)
            if not any(u.op != "call_function" or u.target is not operator.getitem
                       or u.args[1:] == first.args[1:] for u in reads):
                return ("the shortcut and the branch read different parts of one tensor "
                        "(a split-and-sum, e.g. Res2Net), not a block")
        # q + attn(q, k, v): the block computed the fork itself, and the branch also reads what
        # the fork was computed from, so the add sits inside a larger computation (residual
        # pooling in attention), not around a block. Side inputs from outside the block (an
        # attention mask passed to every block) are fine.
        before = self._computed_from_in_scope(fork, owner) if owner else set()
        for n in branch:
            if self.kinds[n] != "tensor":  # sizes read from anywhere are fine
                continue
            for i in n.all_input_nodes:
                if i in before and i not in in_branch and self.tdata[i]:
                    return (f"the branch also reads {describe(i)}, from which the shortcut was "
                            f"computed: an add inside a larger computation, not around a block")
        return None

    def _linear_mixing(self, f: fx.Node, fork: fx.Node, depth: int = 0) -> list[fx.Node] | None:
        """The conv/linear nodes of ``f`` if it is a linear map of ``fork`` (chains of shortcut
        ops, and sums of them: RepVGG-style branches), else None."""
        mixing: list[fx.Node] = []
        cur = f
        while cur is not fork:
            depth += 1
            if depth > 2 * _MAX_SHORTCUT_OPS:
                return None
            ops = add_operands(cur, self.kinds) or _sub_operands(cur, self.kinds)
            if ops is not None:
                parts = [self._linear_mixing(o, fork, depth) for o in ops]
                return None if None in parts else mixing + parts[0] + parts[1]
            ins = self._data_inputs(cur)
            role = self._linear_role(cur, ins)
            if role is None or len(ins) != 1:
                return None
            if role == "mixing":
                mixing.append(cur)
            cur = ins[0]
        return mixing

    def _linear_terms(self, f: fx.Node, fork: fx.Node, depth: int = 0) -> int:
        """How many terms of the linear sum ``f`` (see :meth:`_linear_mixing`) are not the fork
        itself: ``dw(x) - x`` has one, ``dw(x) + conv1(x)`` and ``dw(x) - bn(x)`` have two."""
        cur, identity = f, True
        while cur is not fork and depth <= 2 * _MAX_SHORTCUT_OPS:
            depth += 1
            ops = add_operands(cur, self.kinds) or _sub_operands(cur, self.kinds)
            if ops is not None:
                return sum(self._linear_terms(o, fork, depth) for o in ops)
            ins = self._data_inputs(cur)
            if self._linear_role(cur, ins) != "identity":
                identity = False
            if len(ins) != 1:
                break
            cur = ins[0]
        return 0 if identity else 1

    def _depthwise(self, n: fx.Node) -> bool:
        m = self.modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Sequential):
            m = next((c for c in m if isinstance(c, CONV)), None)
        return isinstance(m, CONV) and m.groups == m.in_channels

    def _computed_from_in_scope(self, fork: fx.Node, owner: str) -> set[fx.Node]:
        """Tensors the owner's forward computed ``fork`` from (its own inputs included)."""
        out: set[fx.Node] = set()
        if not _in_scope(fork, owner) or fork.op == "placeholder":
            return out
        todo = [i for i in fork.all_input_nodes if self.kinds[i] == "tensor"]
        while todo:
            n = todo.pop()
            if n in out:
                continue
            out.add(n)
            if _in_scope(n, owner) and n.op != "placeholder":
                todo.extend(i for i in n.all_input_nodes if self.kinds[i] == "tensor")
        return out

    def run(self) -> Analysis:
        from ..fold import fold_plan  # fold analysis reads the same flat graph

        found: list[tuple[fx.Node, dict]] = []
        rejected: list[RejectedAdd] = []
        owner_adds: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            if is_add_call(n):
                owner_adds.setdefault(owner_of(n), []).append(n)
        for n in self.nodes:
            ops = add_operands(n, self.kinds)
            if ops is None:
                continue
            a, b = ops
            options, reasons = [], []
            for s, f, branch_operand in ((b, a, 0), (a, b, 1)):
                res, why = self._try(s, f, owner_of(n))
                if res is None:
                    reasons.append(why)
                else:
                    res["branch_operand"] = branch_operand
                    options.append(res)
            if not options:
                reason = reasons[0] if reasons[0] == reasons[1] else f"{reasons[0]}; reversed: {reasons[1]}"
                rejected.append(RejectedAdd(owner_of(n), n.format_node() or n.name, reason))
                continue
            options.sort(key=lambda r: (r["kind"] != "identity", -r["params"]))
            found.append((n, options[0]))

        # A residual on a side path inside the branch of a block's own residual (CSATv2's
        # attention transformer, whose output gates the block's features) goes with it, as timm
        # slots only the outer one. Residuals in series on the branch (EdgeNeXt's XCA inside
        # its block) and those a model's own forward nests (a stage around blocks) are kept.
        adds = {n: i for i, (n, _) in enumerate(found)}
        nested: dict[int, str] = {}
        for n, r in found:
            owner = owner_of(n)
            if not owner:
                continue
            for b in r["branch"]:
                if b in adds and _in_scope(b, owner) and adds[b] not in nested \
                        and not self._on_every_path(b, r["fork"], r["f"], r["branch"]):
                    nested[adds[b]] = owner
        for i in sorted(nested):
            n = found[i][0]
            rejected.append(RejectedAdd(owner_of(n), n.format_node() or n.name, (
                f"nested inside the branch of the residual in '{nested[i]}': it is dropped with "
                f"that block, not on its own")))
        found = [x for i, x in enumerate(found) if i not in nested]

        residuals: list[Residual] = []
        per_owner: dict[str, int] = {}
        for n, _ in found:
            per_owner[owner_of(n)] = per_owner.get(owner_of(n), 0) + 1
        names: set[str] = set()
        for i, (n, r) in enumerate(found):
            owner = owner_of(n)
            branch_modules = tuple(dict.fromkeys(
                x.target for x in r["branch"] if x.op == "call_module"))
            name = _name(owner, branch_modules, self.modules, per_owner[owner] > 1 or owner == "",
                         owner_adds[owner].index(n))
            base, k = name, 1
            while name in names:
                name, k = f"{base}.{k}", k + 1
            names.add(name)
            plan = fold_plan(self, r["f"], n)
            residuals.append(Residual(
                name=name, index=i, owner=owner, shortcut=r["kind"], modules=branch_modules,
                shortcut_modules=tuple(c.target for c, _ in reversed(r["chain"]) if c.op == "call_module"),
                params=r["params"], fold_target=plan.target, fold_params=plan.params,
                fold_blocker=plan.blocker,
                drop_modules=tuple(m for m in branch_modules if is_drop_module(self.modules[m])),
                add_position=owner_adds[owner].index(n), branch_operand=r["branch_operand"],
                tail=_tail(r["f"], self.ft)))
        return Analysis(residuals=residuals, rejected=rejected, trace=self.ft,
                        add_counts={o: len(ns) for o, ns in owner_adds.items()},
                        order=[self.index[n] for n, _ in found])


def _tail(f: fx.Node, ft: FlatTrace) -> str | None:
    """The module whose output is the branch value ``f``, when nothing else uses that output
    and the module is called once."""
    if f.op == "call_module" and len(f.users) == 1 and len(ft.calls.get(f.target, [])) == 1:
        return f.target
    return None


def _name(owner: str, branch_modules: tuple[str, ...], modules: dict[str, nn.Module],
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


def require_residuals(residuals: Sequence[Residual], model: nn.Module) -> None:
    if not residuals:
        raise NoResidualsError(
            f"{type(model).__name__} has no residual connection (an add of a shortcut and a "
            f"branch with parameters); nothing to gate. If its blocks hide inside a module fx "
            f"cannot trace, that module is a leaf: see sdsurgery.analyse(model).rejected")
