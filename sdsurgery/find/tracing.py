"""Tracing models with torch.fx the way surgery needs it.

Two traces are made:

* :func:`trace_model`: the whole model, flat (into every module except leaves), in eval mode.
  It is where residual connections are found and analysed. Leaves are the modules timm and
  torchvision register as not traceable, the stochastic-depth modules (so they stay visible as
  one node), and whatever the caller names in ``leaf_modules``. The tracer also records how
  every module was called (which arguments were tensors, which were constants), so that a
  block can later be traced again on its own with the same specialisation.
* :func:`trace_block`: one module's own ``forward`` with *every* child a leaf. Its code is what
  surgery rewrites and installs as the module's new ``forward``: children keep running their
  own (train/eval-aware) code, only the block's body is regenerated.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .._compat import without_fx_patches
from ..errors import TraceError, first_line
from ..ops import drop_module_types
from .standins import traceable_forward

__all__ = ["LeafSpec", "Specialisation", "ModuleCall", "FlatTrace", "resolve_leaves", "traceable",
           "notrace_module_types", "trace_model", "trace_with_example", "split_call",
           "trace_block_on_example", "trace_block", "inline_constants"]

LeafSpec = Iterable["type[nn.Module] | str | nn.Module"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    from timm.layers import get_notrace_functions, get_notrace_modules

    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class Specialisation(dict):
    """The constant arguments of a module call, by name, and the names of the extra keyword
    arguments it passed through ``**kwargs`` (``extra_keywords``): a trace of the module makes
    those explicit parameters (see :func:`explicit_signature`)."""

    extra_keywords: tuple[str, ...] = ()


@dataclass
class ModuleCall:
    """How a module was called during the flat trace: which arguments were traced values."""

    args: tuple
    kwargs: dict

    def concrete_args(self, module: nn.Module) -> Specialisation | None:
        """Arguments of ``module.forward`` to specialise, or None when the call cannot be
        mapped onto the signature. Tensors (and tuples of them) are data, not constants, even
        when a trace specialised to an example computed them (a decoder's ``position_ids``):
        they stay inputs. Extra keyword arguments are named in ``extra_keywords``."""
        try:
            sig = inspect.signature(module.forward)
            bound = sig.bind(*self.args, **self.kwargs)
        except (TypeError, ValueError):
            return None
        bound.apply_defaults()
        concrete = Specialisation()
        for name, param in sig.parameters.items():
            value = bound.arguments[name]
            if param.kind is param.VAR_POSITIONAL:
                if value:  # extra positional arguments fx cannot pass to a placeholder
                    return None
                continue
            if param.kind is param.VAR_KEYWORD:  # passed on by name: explicit parameters
                if any(k in sig.parameters for k in value):
                    return None
                concrete.extra_keywords = tuple(value)
                concrete.update((k, v) for k, v in value.items() if not _is_data(v))
                continue
            if not _is_data(value):
                concrete[name] = value
        return concrete


def _untraced(value: Any) -> Any:
    """``value`` with each proxy in it (in tuples, lists, dicts) replaced by a :class:`_Traced`."""
    if isinstance(value, fx.Proxy):
        return _Traced(value.node)
    if type(value) in (tuple, list):
        return type(value)(_untraced(v) for v in value)
    if type(value) is dict:
        return {k: _untraced(v) for k, v in value.items()}
    return value


def _is_data(value: Any) -> bool:
    """A traced value, a tensor, or a tuple / list / dict holding one."""
    if isinstance(value, (fx.Proxy, _Traced, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_is_data(v) for v in value)
    if isinstance(value, dict):
        return any(_is_data(v) for v in value.values())
    return False


def explicit_signature(fn: Callable, extra_keywords: Sequence[str] = ()) -> Callable:
    """``fn`` itself, or, for a forward taking ``**kwargs`` or decorated (``functools.wraps``
    around ``(self, *args, **kwargs)``, as transformers 5 writes them), a function with the
    (wrapped) forward's named parameters that calls ``fn``: fx makes one placeholder per
    parameter instead of a ``*args`` / ``**kwargs`` proxy that the code would unpack. Of the
    extra keyword arguments, those named in ``extra_keywords`` become keyword-only parameters
    passed on by name (the call being traced gave them); others are not passed on."""
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS) or \
            code.co_flags & inspect.CO_VARARGS and getattr(fn, "__wrapped__", None) is None:
        return fn
    try:
        params = list(inspect.signature(fn).parameters.values())  # follows __wrapped__
    except (TypeError, ValueError):
        return fn
    if any(p.kind is p.VAR_POSITIONAL for p in params) or not params:
        return fn
    namespace: dict[str, Any] = {"_sd_fn": fn}
    decl, call, star = [], [], False
    for p in params:
        default = ""
        if p.default is not p.empty:
            namespace[f"_sd_default_{p.name}"] = p.default
            default = f"=_sd_default_{p.name}"
        if p.kind is p.VAR_KEYWORD:  # a placeholder fx cannot unpack: made explicit, or none
            extra = [k for k in extra_keywords if k.isidentifier() and k not in {q.name for q in params}]
            if extra and not star:
                decl.append("*")
                star = True
            decl.extend(f"{k}=None" for k in extra)  # fx writes placeholders positional
            call.extend(f"{k}={k}" for k in extra)
            decl.append(f"**{p.name}")
        elif p.kind is p.KEYWORD_ONLY:
            if not star:
                decl.append("*")
                star = True
            decl.append(p.name + default)
            call.append(f"{p.name}={p.name}")
        else:
            decl.append(p.name + default)
            # self and positional-only ones by position, the rest by name (a decorator may
            # fill some in by name itself, as transformers' do)
            call.append(p.name if p.kind is p.POSITIONAL_ONLY or not call else f"{p.name}={p.name}")
    src = f"def forward({', '.join(decl)}):\n    return _sd_fn({', '.join(call)})\n"
    exec(compile(src, f"<sdsurgery signature of {getattr(fn, '__qualname__', 'forward')}>", "exec"), namespace)
    shim = namespace["forward"]
    shim.__qualname__ = getattr(fn, "__qualname__", "forward")
    return shim


class _ExplicitRoot:
    """Traces a root through its registered stand-in (:mod:`.standins`), or a decorated root
    forward through :func:`explicit_signature`; traces through modules made inside a forward
    (``nn.ReLU()(x)``, DistilBERT's head), which have no path to be called by."""

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)  # type: ignore[attr-defined]
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)  # type: ignore[misc]

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        root = getattr(self, "root", None)
        standin = traceable_forward(root) if isinstance(root, nn.Module) else None
        if standin is not None and root_fn is type(root).forward:
            root_fn = standin
        extra = getattr(concrete_args, "extra_keywords", ())
        return super().create_args_for_root(explicit_signature(root_fn, extra), is_module,
                                            dict(concrete_args) if concrete_args else concrete_args)


class _SurgeryTracer(_ExplicitRoot, fx.Tracer):
    """fx tracer with timm/torchvision leaves, buffers kept as attributes, call recording."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_ids: set[int],
                 autowrap_functions: tuple[Callable, ...]):
        super().__init__(autowrap_modules=(math,), autowrap_functions=autowrap_functions)
        # Without this, buffers used in expressions are baked in as `_tensor_constantN`
        # attributes and the state_dict would change.
        self.proxy_buffer_attributes = True
        self.leaf_types = leaf_types
        self.leaf_ids = leaf_ids
        self.calls: dict[str, list[ModuleCall]] = {}
        self.failed_module: tuple[str, type] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.leaf_ids or isinstance(m, self.leaf_types):
            return True
        if traceable_forward(m) is not None:  # torch.nn modules are leaves to fx, these not
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            name = self.path_of_module(m)
        except NameError:  # made inside a forward: traced through (see _ExplicitRoot)
            return forward(*args, **kwargs)
        self.calls.setdefault(name, []).append(ModuleCall(_untraced(tuple(args)), _untraced(dict(kwargs))))
        standin = traceable_forward(m)
        if standin is not None and not self.is_leaf_module(m, name):
            forward = functools.partial(standin, m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception:
            if self.failed_module is None:
                self.failed_module = (name, type(m))
            raise


class _Value:
    """An example value of a traced node. Proxies hold it; the node only weakly (``_example_of``):
    it lives as long as the traced code can still use the value (a proxy of it is alive), so a
    trace on an example holds a forward's live values, not every value it ever computed."""

    __slots__ = ("value", "__weakref__")

    def __init__(self, value: Any):
        self.value = value


def _example_of(node: fx.Node) -> Any:
    ref = node.meta.get("example")
    held = ref if isinstance(ref, _Value) or ref is None else ref()
    return held.value if held is not None else None


class _Traced:
    """A traced value in a recorded :class:`ModuleCall` (its node, not the proxy: recorded
    calls must not keep example values alive)."""

    __slots__ = ("node",)

    def __init__(self, node: fx.Node):
        self.node = node


class _ShapedProxy(fx.Proxy):
    """A proxy that answers size questions with the example's sizes (see :func:`trace_with_example`)."""

    _sd_value: _Value | None = None  # keeps the example value alive while the proxy is

    def _example(self):
        return _example_of(self.node)

    def _concrete(attr: str):  # noqa: N805 - a property factory used in the class body
        def get(self):
            v = self._example()
            return getattr(v, attr) if isinstance(v, torch.Tensor) else fx.Proxy.__getattr__(self, attr)
        return property(get)

    shape, ndim, dtype, device = _concrete("shape"), _concrete("ndim"), _concrete("dtype"), _concrete("device")
    del _concrete

    def size(self, *dim):
        v = self._example()
        return v.size(*dim) if isinstance(v, torch.Tensor) else fx.Proxy.__getattr__(self, "size")(*dim)

    def dim(self):
        v = self._example()
        return v.dim() if isinstance(v, torch.Tensor) else fx.Proxy.__getattr__(self, "dim")()

    def __len__(self):
        v = self._example()
        if isinstance(v, (torch.Tensor, tuple, list)):
            return len(v)
        return super().__len__()

    def __iter__(self):
        v = self._example()
        if isinstance(v, (tuple, list)):
            return iter([self[i] for i in range(len(v))])
        return super().__iter__()


class _BatchProxy(_ShapedProxy):
    """Like :class:`_ShapedProxy`, but dimension 0 (the batch) stays a traced value: the graph
    then holds for any batch size at the example's other sizes."""

    def _dims(self, v: torch.Tensor):
        if v.dim() == 0:
            return v.shape
        return (fx.Proxy.__getattr__(self, "size")(0), *v.shape[1:])

    @property
    def shape(self):
        v = self._example()
        return self._dims(v) if isinstance(v, torch.Tensor) else fx.Proxy.__getattr__(self, "shape")

    def size(self, *dim):
        v = self._example()
        if not isinstance(v, torch.Tensor):
            return fx.Proxy.__getattr__(self, "size")(*dim)
        if not dim:
            return self._dims(v)
        return self._dims(v)[0] if dim[0] in (0, -v.dim()) else v.size(*dim)

    def __len__(self):
        raise TraceError("len() of a traced tensor is its batch size, which stays symbolic")


class _RunsExamples:
    """Tracer mixin: runs every traced op on example values as it records it, so that proxies
    can answer size questions (``if H == self.window_size`` then traces, specialised)."""

    examples: dict[str, Any]
    proxy_class: type = _ShapedProxy

    def proxy(self, node: fx.Node) -> fx.Proxy:
        p = self.proxy_class(node, self)
        ref = node.meta.get("example")
        p._sd_value = ref if isinstance(ref, _Value) or ref is None else ref()
        return p

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)  # type: ignore[misc]
        held = _Value(self._run(node))
        # Inputs and module attributes (parameters made into get_attr nodes without a proxy)
        # are alive anyway: held by the node. Computed values: weakly (see _Value).
        node.meta["example"] = held if node.op in ("placeholder", "get_attr") else weakref.ref(held)
        self._sd_newest = held  # alive until proxy() hands it to the node's first proxy
        return node

    def _run(self, node: fx.Node):
        def value(a):
            return fx.node.map_arg(a, _example_of)
        args, kwargs = value(node.args), value(node.kwargs)
        # fx patches Module.__call__ / __getattr__ and wrapped functions while tracing: run
        # the example outside those patches.
        with torch.no_grad(), without_fx_patches():
            if node.op == "placeholder":
                name = str(node.target).lstrip("*")
                if name in self.examples:
                    return self.examples[name]
                return _concrete_leaf(getattr(self, "concrete", None) or {}, name)
            if node.op == "get_attr":
                obj = self.root  # type: ignore[attr-defined]
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                return obj
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)  # type: ignore[attr-defined]
        return None


def _concrete_leaf(concrete: dict[str, Any], name: str) -> Any:
    """The value of a placeholder fx made for a concrete argument: the argument itself, or for
    ``NAME_K`` the K-th leaf of a tuple / list / dict argument ``NAME`` (fx flattens those and
    asserts each leaf)."""
    if name in concrete:
        return concrete[name]
    base, _, k = name.rpartition("_")
    if base in concrete and k.isdigit():
        leaves = _leaves(concrete[base])
        if 0 < int(k) <= len(leaves):
            return leaves[int(k) - 1]
    return None


def _leaves(value: Any) -> list:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


class _ShapeTracer(_RunsExamples, _SurgeryTracer):
    """The flat tracer, specialised to an example's sizes (see :func:`trace_with_example`)."""

    def __init__(self, *args, examples: dict[str, Any]):
        super().__init__(*args)
        self.examples = examples


class _BlockTracer(_ExplicitRoot, fx.Tracer):
    """Traces one module's own forward: every child module is a leaf, but those named in
    ``inline`` (paths relative to the module), whose forwards are traced into."""

    def __init__(self, autowrap_functions: tuple[Callable, ...], inline: Sequence[str] = ()):
        super().__init__(autowrap_modules=(math,), autowrap_functions=autowrap_functions)
        self.proxy_buffer_attributes = True
        self.inline = frozenset(inline)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.inline


@dataclass
class FlatTrace:
    """The flat trace of a model and what was learnt while making it."""

    root: nn.Module
    graph: fx.Graph
    modules: dict[str, nn.Module]
    calls: dict[str, list[ModuleCall]]
    autowrap_functions: tuple[Callable, ...] = field(default_factory=tuple)


def resolve_leaves(model: nn.Module, leaf_modules: LeafSpec) -> tuple[tuple[type, ...], set[int]]:
    """Split the caller's ``leaf_modules`` (types, qualified names or module objects)."""
    types: list[type] = []
    ids: set[int] = set()
    named = dict(model.named_modules())
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            if leaf not in named:
                raise ValueError(f"leaf_modules: no submodule named {leaf!r} in the model; "
                                 f"give a qualified name from model.named_modules() or a class")
            ids.add(id(named[leaf]))
        elif isinstance(leaf, nn.Module):
            ids.add(id(leaf))
        else:
            raise ValueError(f"leaf_modules: {leaf!r} is neither a module class, a qualified "
                             f"module name nor a module")
    return tuple(types), ids


@contextlib.contextmanager
def traceable(model: nn.Module):
    """Eval mode and no gradient checkpointing while tracing; both restored afterwards. Yields
    a dict that receives, at the end, the tensor constants fx left on the modules (removed).

    Eval mode because timm's DropPath traced in train mode leaves a dead in-place op behind;
    checkpointing because fx silently drops it.
    """
    modes = {m: m.training for m in model.modules()}
    attrs = {m: set(m.__dict__) for m in model.modules()}
    constants: dict[str, torch.Tensor] = {}
    ckpt = None
    if hasattr(model, "set_grad_checkpointing"):
        ckpt = bool(getattr(model, "grad_checkpointing", False))
        if ckpt:
            model.set_grad_checkpointing(False)
    model.eval()
    try:
        yield constants
    finally:
        for m, mode in modes.items():
            m.training = mode
        # fx keeps tensors a trace made (`torch.tensor(...)` in a forward) as attributes of
        # the module traced: take them off the user's modules (see inline_constants)
        for prefix, m in model.named_modules():
            for k in set(m.__dict__) - attrs.get(m, set()):
                if k.startswith("_tensor_constant"):
                    constants[f"{prefix}.{k}" if prefix else k] = m.__dict__.pop(k)
        if ckpt:
            model.set_grad_checkpointing(True)


def _trace_failure(name: str, cls: type, e: Exception) -> TraceError:
    """A one-line TraceError: which module, what fx said and where (the last frame outside
    torch and sdsurgery), and a hint that fits."""
    reason = first_line(e, with_type=True)
    where_in_code = _user_frame(e)
    if where_in_code:
        reason += f" (at {where_in_code})"
    values = "control flow" in reason  # `if x.sum() > 0`: no example makes that traceable
    if name:
        where = f"'{name}' ({cls.__name__})"
        hint = (f"mark it a leaf with leaf_modules=[{name!r}] or leaf_modules=[{cls.__module__}."
                f"{cls.__name__}] (residuals inside a leaf are not gated)")
        if values:
            hint += ", or pass example= so it is traced on an example input (helps when it branches on sizes)"
    else:
        where = f"the model's own forward ({cls.__name__})"
        hint = ("convert the submodule that holds the blocks instead (sdsurgery.convert(model.backbone, "
                "inplace=True); the model then answers gates / fold for it)")
    return TraceError(f"torch.fx cannot trace {where}: {reason}; {hint}", module=name, reason=reason)


def _user_frame(e: BaseException) -> str:
    """``file.py:line`` of the innermost traceback frame outside torch, sdsurgery and the
    generated code, or ''."""
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        path = f.filename.replace("\\", "/")
        if "/torch/" in path or "/sdsurgery/" in path or path.startswith("<"):
            continue
        return f"{path.rsplit('/', 1)[-1]}:{f.lineno}"
    return ""


def notrace_module_types() -> tuple[type, ...]:
    """The module classes timm registers as not traceable (their residuals are searched
    separately)."""
    return _timm_notrace()[0]


def trace_model(model: nn.Module, leaf_modules: LeafSpec = (),
                concrete_args: dict[str, Any] | None = None,
                examples: dict[str, Any] | None = None) -> FlatTrace:
    """Trace ``model`` flat, in eval mode. Raises :class:`TraceError` naming the failing module.
    With ``examples`` (tensor arguments by name), see :func:`trace_with_example`."""
    timm_leaves, timm_fns = _timm_notrace()
    user_types, user_ids = resolve_leaves(model, leaf_modules)
    leaf_types = tuple(dict.fromkeys(timm_leaves + drop_module_types(model) + user_types))
    if examples is None:
        tracer = _SurgeryTracer(leaf_types, user_ids, timm_fns)
    else:
        tracer = _ShapeTracer(leaf_types, user_ids, timm_fns, examples=examples)
        tracer.concrete = concrete_args or {}
    with traceable(model):
        try:
            graph = tracer.trace(model, concrete_args=_given(concrete_args))
        except Exception as e:
            name, cls = tracer.failed_module or ("", type(model))
            raise _trace_failure(name, cls, e) from e
    return FlatTrace(root=model, graph=graph, modules=dict(model.named_modules()),
                     calls=tracer.calls, autowrap_functions=timm_fns)


def trace_with_example(module: nn.Module, leaf_modules: LeafSpec, args: tuple,
                       kwargs: dict) -> FlatTrace:
    """Like :func:`trace_model`, specialised to one call ``module(*args, **kwargs)``: tensor
    sizes read in the forward are those of the example (for forwards that branch on them).
    The graph is valid for that call's shapes only: it is for analysis, not for running."""
    concrete, examples = split_call(module, args, kwargs)
    return trace_model(module, leaf_modules, concrete_args=concrete, examples=examples)


class _BlockExampleTracer(_RunsExamples, _BlockTracer):
    proxy_class = _BatchProxy

    def __init__(self, autowrap_functions: tuple[Callable, ...], examples: dict[str, Any]):
        super().__init__(autowrap_functions)
        self.examples = examples


def split_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """A call of ``module.forward`` as (non-tensor arguments, tensor arguments) by name."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise TraceError(f"cannot bind the example call of {type(module).__name__}: {e}") from e
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
    return concrete, tensors


def trace_block_on_example(block: nn.Module, concrete: dict[str, Any], tensors: dict[str, Any],
                           autowrap_functions: Sequence[Callable] = ()) -> fx.Graph:
    """:func:`trace_block` for a forward that branches on sizes: specialised to the sizes of an
    example call (as :func:`split_call` gives it) and to its non-tensor arguments, except the
    batch size. The graph holds only for inputs of those sizes (a caller must guard on them)."""
    tracer = _BlockExampleTracer(tuple(autowrap_functions), tensors)
    tracer.concrete = concrete or {}
    with traceable(block) as constants:
        graph = tracer.trace(block, concrete_args=concrete or None)
    return inline_constants(graph, constants)


def trace_block(block: nn.Module, concrete_args: dict[str, Any] | None,
                autowrap_functions: Sequence[Callable] = (), train: bool = False,
                inline: Sequence[str] = ()) -> fx.Graph:
    """Trace ``block``'s own forward with every child module a leaf but those in ``inline``
    (in eval mode, or in train mode to check that the code traced does not depend on it)."""
    tracer = _BlockTracer(tuple(autowrap_functions), inline)
    with traceable(block) as constants:
        if train:
            for m in [block] + [block.get_submodule(p) for p in inline]:
                m.training = True
        graph = tracer.trace(block, concrete_args=_given(concrete_args))
    return inline_constants(graph, constants)


def inline_constants(graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.Graph:
    """Read the tensor constants of a trace (``get_attr _tensor_constantN``) from functions
    held by the generated code instead of attributes of the module: the module stays as it
    was, and blocks sharing the code share the values (as a GraphModule would hold them)."""
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in constants:
            with graph.inserting_before(node):
                new = graph.call_function(_constant(constants[node.target]), ())
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.lint()
    return graph


def _constant(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    def _sd_constant() -> torch.Tensor:
        return value
    return _sd_constant


def _given(concrete: dict[str, Any] | None) -> dict[str, Any] | None:
    """``concrete`` for fx: None when it specialises nothing and names no extra keyword."""
    return concrete if concrete or getattr(concrete, "extra_keywords", ()) else None
