"""Graph to code: a block's forward rewritten so each gated residual calls its gate.

The block (the *owner* of one or more residual adds) is traced on its own with every child a
leaf. In that graph each residual's branch nodes are cut out into a separate function of the
branch's inputs, and the add is replaced by a call of a gate module (through
:func:`~sdsurgery.gate.gates.gate_caller`, for torch.compile)::

    def forward(self, x):                       # the owner's new forward
        ...
        _sd_branch_0 = self._sd_branch_0        # the branch, as a function of its inputs
        sd_gate_0 = self.sd_gate_0
        sd_gate_0_of_layer1_0 = sd_gate_0_of_layer1_0(sd_gate_0, _sd_branch_0, shortcut, x)
        ...

The code is generated Python (registered with linecache, so tracebacks, ``inspect`` and
``torch.compile`` see it), independent of the instance: blocks of one class and structure
share it (:func:`structure_key`). Installing it is :mod:`.install`'s job.
"""
from __future__ import annotations

import inspect
import linecache
import operator
import re
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .._compat import SPEC_ATTRS, buffers_of, children_of, parameters_of, pytree_info
from ..errors import first_line
from ..find.graph import ancestor_masks, drop_dead_getitems, iter_bits, redirect_inplace_adds
from ..find.residuals import Residual
from ..find.tracing import FlatTrace, trace_block
from ..ops import get_attr, is_add_call, value_kinds
from .gates import gate_caller, own_code

__all__ = ["Skip", "Untraceable", "Shared", "Cut", "Rewrite", "rewrite_block", "guarded_forward",
           "structure_key", "reads_training", "compile_graph", "signature_preserving", "short_error"]


class Skip(Exception):
    """A block cannot be rewritten; ``residual`` names the one branch to blame, when it is one."""

    def __init__(self, message: str, residual: str | None = None):
        super().__init__(message)
        self.residual = residual


class Untraceable(Skip):
    """A block's own forward cannot be traced: its residuals can only be gated at a tail module."""


class Shared(Skip):
    """A branch's computation is needed by the rest of its block: it can be masked, not skipped."""


@dataclass(frozen=True)
class Cut:
    """One branch cut out of a block's forward: the gate attribute the new forward calls, the
    branch function and its attribute, and what the gate must know about its inputs."""

    gate_attr: str
    fn_attr: str
    fn: Callable
    batched: tuple[bool, ...]  # per input: has the batch dimension
    sample_fallback: bool  # an input is not a tensor (sizes): sample mode masks
    masked: str | None  # why the branch is masked rather than skipped
    modules: tuple[str, ...] = ()  # the modules the branch function calls (block-relative)


@dataclass
class Rewrite:
    """An owner's rewritten code, independent of the instance: blocks of the same class and
    structure share it (a ResNet-152 has 50 blocks but four distinct ones)."""

    forward: Callable
    cuts: list[Cut]


def rewrite_block(block: nn.Module, owner: str, residuals: list[Residual],
                  concrete: dict[str, Any] | None, ft: FlatTrace, add_count: int,
                  graph: fx.Graph | None = None) -> Rewrite:
    """Trace ``block`` alone (or take ``graph``, its trace on an example call), cut each
    residual's branch out into a function and replace its add by a gate call; raise
    :class:`Skip` when that cannot be done safely."""
    inline = residuals[0].inline if residuals else ()
    graph = _trace_alone(block, owner, concrete, ft, graph, inline)
    redirect_inplace_adds(graph)
    drop_dead_getitems(graph)
    adds = [n for n in graph.nodes if is_add_call(n)]
    if len(adds) != add_count:
        raise Skip(f"'{owner}' traced alone shows {len(adds)} adds, the full trace {add_count}")
    kinds = value_kinds(graph, block)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    used = set(children_of(block)) | set(block.__dict__)
    cuts = [_cut(graph, block, owner, k, r, adds[r.add_position], kinds, placeholders, used)
            for k, r in enumerate(residuals)]
    graph.lint()  # the rewritten graph is well formed before it becomes code
    forward = signature_preserving(compile_graph(graph, f"forward {owner or '<model>'}"), block,
                                   placeholders, owner)
    return Rewrite(forward=forward, cuts=cuts)


def _trace_alone(block: nn.Module, owner: str, concrete: dict[str, Any] | None, ft: FlatTrace,
                 graph: fx.Graph | None, inline: tuple[str, ...] = ()) -> fx.Graph:
    try:
        if graph is None:
            graph = trace_block(block, concrete, ft.autowrap_functions, inline=inline)
        elif inline:
            raise Skip(f"'{owner}' would be traced on an example with {inline[0]!r} inline")
        if any(reads_training(m) for m in [block] + [block.get_submodule(p) for p in inline]):
            train_graph = trace_block(block, concrete, ft.autowrap_functions, train=True, inline=inline)
            if graph.python_code("self").src != train_graph.python_code("self").src:
                raise Skip(f"the forward of '{owner}' itself behaves differently in training "
                           f"and eval")
    except Skip:
        raise
    except Exception as e:  # e.g. the forward branches on sizes (found in a specialised trace)
        raise Untraceable(f"cannot trace '{owner}' on its own: {type(e).__name__}: "
                          f"{short_error(e)}") from None
    return graph


def _cut(graph: fx.Graph, block: nn.Module, owner: str, k: int, r: Residual, add: fx.Node,
         kinds: dict[fx.Node, str], placeholders: list[fx.Node], used: set[str]) -> Cut:
    """Cut the branch of ``r`` (the ``k``-th gated residual of ``block``) out of ``graph``."""
    gate_attr, fn_attr = f"sd_gate_{k}", f"_sd_branch_{k}"
    if gate_attr in used or fn_attr in used or hasattr(type(block), gate_attr):
        raise Skip(f"'{owner}' already has an attribute {gate_attr!r}")
    f, s = add.args[r.branch_operand], add.args[1 - r.branch_operand]
    if not (isinstance(f, fx.Node) and isinstance(s, fx.Node)):
        raise Skip(f"the add of {r.name!r} has no tensor operands when '{owner}' is traced alone")
    whole, masked = None, None
    try:
        branch_fn, inputs, branch = _cut_branch(graph, block, add, f, s, r, placeholders)
    except Shared as e:
        # The block computes the branch anyway: the gate takes its value and masks it.
        # cat([x[:, :C] + s, x[:, C:]]) (ReXNet): all of x is masked, as a drop-path on x
        # does; the add stays and the gate is called without a shortcut.
        whole = _sliced_back(add, f)
        branch_fn, inputs, branch = _masked_branch, [whole or f], []
        masked = (f"{e}: it is a slice of a value concatenated back, so all of that value is "
                  f"masked" if whole is not None else str(e))
    if whole is None:
        anchor = add
    else:  # the first user of the whole value, in graph order
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = min(whole.users, key=lambda u: order[u])
    with graph.inserting_before(anchor):
        fn_node = graph.get_attr(fn_attr)
        call = gate_caller(f"{gate_attr}_of_{_identifier(owner)}")  # for torch.compile
        gate_node = graph.call_function(call, (graph.get_attr(gate_attr), fn_node,
                                               s if whole is None else None, *inputs))
    if whole is None:
        add.replace_all_uses_with(gate_node)
        graph.erase_node(add)
    else:
        whole.replace_all_uses_with(gate_node, delete_user_cb=lambda u: u is not gate_node)
    for n in reversed(branch):  # users come later in the branch: already erased
        graph.erase_node(n)
    graph.lint()
    return Cut(gate_attr=gate_attr, fn_attr=fn_attr, fn=branch_fn,
               batched=tuple(kinds.get(i) == "tensor" and _depends_on(i, placeholders[:1]) for i in inputs),
               sample_fallback=any(kinds.get(i) != "tensor" for i in inputs), masked=masked,
               modules=tuple(dict.fromkeys(n.target for n in branch if n.op == "call_module")))


_SIMPLE = (int, float, bool, str, type(None))

def structure_key(block: nn.Module, concrete: dict[str, Any] | None, specs: tuple, add_count: int,
                  inline: tuple[str, ...] = ()):
    """What a block's traced graph can depend on, or None when that cannot be told safely."""
    attrs = _simple_attrs(block)
    if attrs is None:
        return None
    # The block's code may also read its children's settings (`self.conv.stride`): one level.
    children = tuple((n, type(m), _simple_attrs(m, strict=False)) for n, m in children_of(block).items())
    try:
        concrete_key = (tuple(sorted((k, v) for k, v in (concrete or {}).items())),
                        getattr(concrete, "extra_keywords", ()))
        hash(concrete_key)
    except TypeError:
        return None
    inline = tuple((p, type(block.get_submodule(p)), _simple_attrs(block.get_submodule(p), strict=False))
                   for p in inline)
    return (type(block), concrete_key, specs, add_count, tuple(attrs),
            children, inline,
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


def reads_training(block: nn.Module) -> bool:
    """Whether the block's own class code reads ``self.training`` (then its eval trace is not
    valid in training)."""
    for cls in type(block).__mro__:
        if cls in (nn.Module, object):
            break
        for attr, value in vars(cls).items():
            if attr == "__call__":  # wraps forward (HF's gradient-checkpointing layers)
                continue
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and "training" in code.co_names:
                return True
    return False


def guarded_forward(rewritten: Callable, block: nn.Module, sizes: dict[str, tuple], concrete: dict[str, Any],
                    gate_attrs: tuple[str, ...]) -> Callable:
    """``rewritten`` for calls like the traced one: inputs of the example's ``sizes`` (but the
    batch), the same ``concrete`` arguments, the same extra keyword names; the block's own
    forward otherwise, its gates then acting through their hooks (masking)."""
    sig = inspect.signature(block.forward)
    varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    extra = frozenset(getattr(concrete, "extra_keywords", ()))
    own = type(block).forward
    impl = rewritten.__wrapped_impl__  # type: ignore[attr-defined]

    def mismatch(bound) -> str | None:
        for name, value in bound.arguments.items():
            if name == varkw:
                if set(value) != extra:
                    return f"extra keyword arguments {sorted(value)} (traced: {sorted(extra)})"
                value = {k: v for k, v in value.items() if k in concrete}
                checks = value.items()
            else:
                checks = [(name, value)]
            for key, v in checks:
                if key in sizes:
                    if not isinstance(v, torch.Tensor) or tuple(v.shape[1:]) != sizes[key]:
                        return f"{key} of size {_size_of(v)} (converted for (B, *{sizes[key]}))"
                elif key in concrete and not _same(v, concrete[key]):
                    return f"{key}={_short(v)} (converted for {key}={_short(concrete[key])})"
        return None

    def forward(self, *args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        why = mismatch(bound)
        if why is not None:
            if self.training:
                hint = (" (transformers: train with use_cache=False)"
                        if "cache" in why or "past_key_values" in why else "")
                warnings.warn(f"sdsurgery: {type(self).__name__} called with {why}: its dropped "
                              f"branches are masked, not skipped; convert with example= a call "
                              f"like the ones you train with{hint}", stacklevel=2)
            for a in gate_attrs:
                getattr(self, a).tail_seen = 0  # counts its tail's calls from this forward on
            return own(self, *args, **kwargs)
        gates = [getattr(self, a) for a in gate_attrs]
        for g in gates:
            g.hook_bypass = True  # the branch's tail module runs inside the gate here
        try:
            return impl(self, *bound.args, **bound.kwargs)
        finally:
            for g in gates:
                g.hook_bypass = False

    forward = own_code(forward, f"sd_guarded_{rewritten.__code__.co_name}")
    forward.__doc__ = rewritten.__doc__ + " (for calls like the traced one)"
    forward.__wrapped_impl__ = impl  # type: ignore[attr-defined]
    return forward


def _same(value: Any, expected: Any) -> bool:
    try:
        return bool(value is expected or value == expected)
    except Exception:
        return False


def _short(value: Any) -> str:
    return repr(value)[:40] if isinstance(value, (int, float, bool, str, type(None), tuple)) \
        else f"<{type(value).__name__}>"


def _size_of(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"<{type(value).__name__}>"


def short_error(e: Exception) -> str:
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
        raise Shared("its output is also used outside the residual add", r.name)
    if not any(_has_params(n, block) for n in branch):
        raise Shared("its computation is shared with the rest of its block", r.name)
    inputs: list[fx.Node] = []
    for n in branch:
        for i in n.all_input_nodes:
            if not (mask >> index[i]) & 1 and i not in inputs:
                inputs.append(i)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i in inputs:
        env[i] = sub.placeholder(i.name if i.name != "self" else "self_value")  # `self`: the module
    for n in branch:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[f])
    sub.lint()
    return compile_graph(sub, f"branch {r.name}"), inputs, branch


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


def compile_graph(graph: fx.Graph, label: str) -> Callable:
    """Generated Python for ``graph`` as a function ``forward(self, *inputs)``."""
    # The module is `self` in the code, unless a node has that name (BertAttention's child
    # module `self`): then the module is `self_`.
    root = "self_" if any(n.name == "self" for n in graph.nodes) else "self"
    info = pytree_info(graph)
    if info is not None:
        # fx writes the defaults of flattened placeholders into a tuple assignment, which is
        # not Python (`a, b = None, = ...`); callers pass every argument, so drop them.
        for n in graph.nodes:
            if n.op == "placeholder":
                n.args = ()
    code = graph.python_code(root_module=root)
    src, namespace = code.src, dict(code.globals)
    if root != "self":  # fx writes `def forward(self, ...` whatever the root's name
        src = src.replace("def forward(self", f"def forward({root}", 1)
    if info is not None:
        # Blocks called with tuples / dicts get pytree-flattening code that reads the specs from
        # a GraphModule's attributes; hand them to the function instead (the block has none).
        spec = tuple(a.replace("self.", root + ".", 1) for a in SPEC_ATTRS)
        src = src.replace(spec[0], "_sd_in_spec").replace(spec[1], "_sd_out_spec")
        namespace["_sd_in_spec"], namespace["_sd_out_spec"] = info.in_spec, info.out_spec
    key = f"<sdsurgery {label} {uuid.uuid4().hex[:8]}>"
    # Registered with linecache so tracebacks, inspect and torch.compile see the source.
    linecache.cache[key] = (len(src), None, src.splitlines(True), key)
    exec(compile(src, key, "exec"), namespace)
    return namespace["forward"]


def signature_preserving(impl: Callable, block: nn.Module, placeholders: list[fx.Node],
                         owner: str = "") -> Callable:
    """Wrap ``impl(self, *placeholders)`` so the block keeps its forward signature (a wrapper
    with its own code object: see :func:`~sdsurgery.gate.gates.own_code`)."""
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

    forward = own_code(forward, f"sd_forward_of_{_identifier(owner)}")
    forward.__doc__ = f"sdsurgery: {type(block).__name__}.forward with stochastic-depth gates"
    forward.__wrapped_impl__ = impl  # type: ignore[attr-defined]
    return forward


def _identifier(owner: str) -> str:
    """A module path as a Python identifier (for code object names)."""
    return re.sub(r"\W", "_", owner) or "model"
