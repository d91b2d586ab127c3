"""What the operations in an fx graph mean for stochastic-depth surgery.

Three questions are answered here, node by node, from the node alone (and the module it calls):

* Is it a tensor add (a candidate residual connection)?  :func:`add_operands`
* What kind of value does it produce: a tensor, or shape arithmetic?  :func:`value_kinds`
* Can it sit on a shortcut (identity or a short projection)?  :func:`shortcut_role`

Which operations commute with a positive scale, and which layers can absorb one, is the
concern of :mod:`sdsurgery.fold`.
"""
from __future__ import annotations

import builtins
import operator
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._compat import BATCH_NORM, children_of, parameters_of

__all__ = ["ADD_FUNCTIONS", "ADD_METHODS", "is_add_call", "is_inplace_add", "add_operands",
           "value_kinds", "get_attr", "register_drop_module", "register_shortcut_op", "drop_attr",
           "drop_module_types", "is_drop_module", "shortcut_role",
           "describe"]

# ----------------------------------------------------------------------------------- adds
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}


def is_add_call(node: fx.Node) -> bool:
    """True for every add-like call, whatever the operand types (tensors, ints, traced
    tuples), but a tuple concatenation with a literal tuple (``(out,) + rest``: whether the
    trace shows it depends on whether ``rest`` was traced, so counts would not agree)."""
    if any(isinstance(a, (tuple, list)) for a in node.args[:2]):
        return False
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS
    if node.op == "call_method":
        return node.target in ADD_METHODS
    return False


def is_inplace_add(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("add_", "__iadd__")


def add_operands(node: fx.Node, kinds: dict[fx.Node, str]) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain tensor add, or None.

    An add with ``alpha`` or an ``out=`` argument, or with an operand that is not a tensor
    produced in the graph (a Python number, a tuple, shape arithmetic), is not a candidate.
    """
    if not is_add_call(node) or len(node.args) < 2:
        return None
    if any(k not in ("out",) for k in node.kwargs) or node.kwargs.get("out") is not None:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if kinds.get(a) != "tensor" or kinds.get(b) != "tensor":
        return None
    return a, b


# ---------------------------------------------------------------------------- value kinds
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "__len__", "stride",
                  "element_size", "get_device", "data_ptr", "is_contiguous", "is_floating_point"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}


def value_kinds(graph: fx.Graph, root: nn.Module) -> dict[fx.Node, str]:
    """Classify each node's value as ``"tensor"`` or ``"other"`` (shapes, ints, dtypes, ...).

    fx gives no types, so this follows the data: sizes and attributes like ``.shape`` are
    "other", arithmetic on "other" values stays "other", and anything touching a tensor is a
    tensor. Placeholders are taken to be tensors (non-tensor arguments are traced concretely).
    """
    kinds: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            kinds[n] = "tensor"
        elif n.op == "get_attr":
            kinds[n] = "tensor" if isinstance(_get_attr(root, n.target), torch.Tensor) else "other"
        elif n.op == "call_module":
            kinds[n] = "tensor"
        elif n.op == "output":
            kinds[n] = "other"
        elif n.op == "call_method" and n.target in _SHAPE_METHODS:
            kinds[n] = "other"
        elif n.op == "call_function" and n.target is builtins.getattr and len(n.args) > 1 \
                and n.args[1] in _SHAPE_ATTRS:
            kinds[n] = "other"
        elif n.op == "call_function" and n.target is builtins.len:
            kinds[n] = "other"
        else:
            inputs = n.all_input_nodes
            kinds[n] = "tensor" if any(kinds.get(i) == "tensor" for i in inputs) else "other"
    return kinds


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def get_attr(root: nn.Module, target: str):
    """Resolve a dotted attribute path on ``root`` (None when it does not exist)."""
    return _get_attr(root, target)


# ------------------------------------------------------------------------------ shortcuts
# Modules that may stand on a shortcut. "identity" ones pass the tensor through unchanged in
# value (at eval); the others make it a projection.
_IDENTITY_MODULES: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                       nn.Dropout3d, nn.AlphaDropout)
_PROJECTION_MODULES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    BATCH_NORM, nn.LayerNorm, nn.GroupNorm,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.Flatten, nn.Upsample,
)
_MIXING_MODULES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_PROJECTION_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pad, F.interpolate,
    F.batch_norm, F.layer_norm, F.group_norm, F.conv1d, F.conv2d, F.conv3d, F.linear,
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.amax, torch.mean,
}
_MIXING_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.addmm}  # addmm: bias + x @ W
_IDENTITY_METHODS = {"contiguous", "clone", "to", "type_as", "float", "half", "bfloat16"}
_PROJECTION_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "unsqueeze",
                       "squeeze", "expand", "repeat",
                       "amax", "mean"}  # pooling written as a reduction (Hiera: view(...).amax(1))


# Existing stochastic-depth modules (identities at eval): class -> the attribute holding their
# drop probability, which ``convert`` sets to 0 on the branches it gates.
_DROP_MODULES: dict[type, str] = {}
# Shortcut ops registered by users: module classes, functions and tensor-method names -> role.
_USER_MODULE_ROLES: dict[type, str] = {}
_USER_FUNCTION_ROLES: dict[object, str] = {}
_USER_METHOD_ROLES: dict[str, str] = {}
_ROLES = ("identity", "projection", "mixing")


def register_drop_module(cls: type | None = None, *, attr: str = "drop_prob"):
    """Register a stochastic-depth (drop-path) module class, as timm registers its modules: it
    is an identity at eval, may stand on a shortcut, commutes with the fold's scale, and
    ``convert`` sets its ``attr`` to 0 on the branches it gates (else the branch is dropped
    twice). Use as ``@register_drop_module`` or ``register_drop_module(MyDropPath, attr="p")``.
    """
    def register(c: type) -> type:
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise TypeError(f"register_drop_module takes an nn.Module subclass, got {c!r}")
        _DROP_MODULES[c] = attr
        return c
    return register if cls is None else register(cls)


def register_shortcut_op(op=None, *, role: str = "projection"):
    """Let ``op`` stand on a residual's shortcut: an ``nn.Module`` class, a function, or the name
    of a tensor method. ``role``: ``"identity"`` (the value passes unchanged at eval),
    ``"projection"`` (a cheap transform: norm, pooling, reshape) or ``"mixing"`` (a conv or
    linear map; at most one per shortcut). Use as a decorator (``@register_shortcut_op`` or
    ``@register_shortcut_op(role="identity")``) or call it."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")

    def register(o):
        if isinstance(o, str):
            _USER_METHOD_ROLES[o] = role
        elif isinstance(o, type):
            if not issubclass(o, nn.Module):
                raise TypeError(f"register_shortcut_op takes an nn.Module subclass, a function or a "
                                f"method name, got {o!r}")
            _USER_MODULE_ROLES[o] = role
        elif callable(o):
            _USER_FUNCTION_ROLES[o] = role
        else:
            raise TypeError(f"register_shortcut_op takes an nn.Module subclass, a function or a "
                            f"method name, got {o!r}")
        return o
    return register if op is None else register(op)


# Drop-path modules of other libraries are recognised by name and shape: a class named like
# one (HF transformers' ConvNextDropPath, Dinov2DropPath, BeitDropPath...), without parameters or
# children, holding its probability in one of these attributes.
_DROP_NAMES = ("DropPath", "StochasticDepth")
_DROP_ATTRS = ("drop_prob", "p", "drop_rate", "drop_path", "drop_path_rate", "rate")


def drop_attr(m: nn.Module) -> str | None:
    """The attribute holding the drop probability of a drop-path module (registered with
    :func:`register_drop_module`, or recognised by name, see ``_DROP_NAMES``), or None."""
    for cls in type(m).__mro__:
        if cls in _DROP_MODULES:
            return _DROP_MODULES[cls]
    if type(m).__name__.endswith(_DROP_NAMES) and not children_of(m) and not parameters_of(m):
        for attr in _DROP_ATTRS:
            value = getattr(m, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) or \
                    value is None and attr in vars(m):
                return attr
    return None


def drop_module_types(model: nn.Module | None = None) -> tuple[type, ...]:
    """The drop-path module classes that are leaves of every trace: the registered ones, and
    those recognised by name in ``model``."""
    found = {type(m) for m in model.modules() if is_drop_module(m)} if model is not None else set()
    return tuple(dict.fromkeys(list(_DROP_MODULES) + sorted(found, key=lambda c: c.__qualname__)))


def is_drop_module(m: nn.Module) -> bool:
    """timm ``DropPath``, torchvision ``StochasticDepth``, or a class given to
    :func:`register_drop_module`."""
    return drop_attr(m) is not None


def _register_library_drop_modules() -> None:
    try:
        from timm.layers import DropPath
        register_drop_module(DropPath, attr="drop_prob")
    except Exception:  # pragma: no cover - timm is a dependency, but keep the core importable
        pass
    try:
        from torchvision.ops import StochasticDepth
        register_drop_module(StochasticDepth, attr="p")
    except Exception:  # pragma: no cover
        pass


_register_library_drop_modules()


def _user_role(m: nn.Module) -> str | None:
    for cls in type(m).__mro__:
        if cls in _USER_MODULE_ROLES:
            return _USER_MODULE_ROLES[cls]
    return None


def _module_role(m: nn.Module) -> str | None:
    user = _user_role(m)
    if user is not None:
        return user
    if isinstance(m, _IDENTITY_MODULES) or is_drop_module(m):
        return "identity"
    if type(m) is nn.Sequential or isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        roles = [_module_role(c) for c in m]
        if any(r is None for r in roles):
            return None
        mixing = sum(r == "mixing" for r in roles)
        if mixing > 1:
            return None
        if mixing == 1:
            return "mixing"
        return "projection" if "projection" in roles else "identity"
    if isinstance(m, _MIXING_MODULES):
        return "mixing"
    if isinstance(m, _PROJECTION_MODULES):
        # A norm with a fused activation (timm BatchNormAct2d) is not a plain projection
        # unless the activation is an identity.
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module) and not isinstance(act, _IDENTITY_MODULES):
            return None
        return "projection"
    return None


def shortcut_role(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How ``node`` may take part in a shortcut.

    Returns ``"identity"`` (value passes through unchanged), ``"projection"`` (a cheap,
    parameter-light transform: norm, pooling, padding, reshapes), ``"mixing"`` (one conv or
    linear map: at most one is allowed on a projection shortcut) or None (not a shortcut op:
    activations, attention, arbitrary arithmetic...).
    """
    if node.op == "call_module":
        return _module_role(modules[node.target])
    if node.op == "call_function":
        if node.target in _USER_FUNCTION_ROLES:
            return _USER_FUNCTION_ROLES[node.target]
        if node.target in _IDENTITY_FUNCTIONS:
            return "identity"
        if node.target in ADD_FUNCTIONS and len(node.args) == 2 and sum(
                isinstance(a, (int, float)) and a == 0 for a in node.args) == 1:
            return "identity"  # out = 0; out = out + x (MobileOne's optional branches)
        if node.target in _MIXING_FUNCTIONS:
            return "mixing"
        if node.target in _PROJECTION_FUNCTIONS:
            return "projection"
        if node.target is torch.cat:
            return "projection"  # zero channel padding, checked by the caller's data-input rule
        return None
    if node.op == "call_method":
        if node.target in _USER_METHOD_ROLES:
            return _USER_METHOD_ROLES[node.target]
        if node.target in _IDENTITY_METHODS:
            return "identity"
        if node.target in _PROJECTION_METHODS:
            return "projection"
        return None
    return None


def describe(node: fx.Node) -> str:
    """A short human description of a node, for messages."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        return f"attribute '{node.target}'"
    return f"{node.op} '{node.name}'"
