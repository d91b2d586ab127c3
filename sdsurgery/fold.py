"""Folding the survival scale back into the weights.

With ``scaling="expectation"`` a converted model's eval output is ``shortcut + s * branch``
(``s`` the branch's survival probability). :func:`fold` removes the gates and multiplies the
branch's *last affine layer* by ``s``, so the model is again the plain original architecture
and computes the same thing with no overhead.

The last affine layer is found by walking back from the branch output through operations that
commute with a positive scale (ReLU, dropout, pooling, reshapes, zero padding, positive
constants, ...) to the first layer whose output is linear in its parameters: conv / linear
weight and bias, BatchNorm / LayerNorm / GroupNorm affine, an RMSNorm weight, a layer-scale
parameter, an attention output projection. Anything else on the way (GELU, SiLU, a squeeze-excite gate, a
norm without affine parameters, a weight-standardised conv) blocks the fold, with the reason.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import FoldError
from .gate.gates import CONTROLLER_ATTR, FOLDED_ATTR, FOLDED_FROM_ATTR, converted_parts, installed_gates
from .gate.install import uninstall
from ._compat import BATCH_NORM
from .ops import describe, get_attr, is_drop_module

__all__ = ["FoldPlan", "fold_plan", "fold", "register_foldable"]

if TYPE_CHECKING:  # pragma: no cover
    from .find.graph import GraphFacts


@dataclass(frozen=True)
class FoldPlan:
    target: str | None
    params: tuple[str, ...]
    blocker: str | None


class _Blocked(Exception):
    pass


# Modules whose output scales with a positive scale of their (single) input.
_PASS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten,
    nn.Upsample, nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pixel_shuffle,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.roll, torch.squeeze,
    torch.unsqueeze, torch.movedim, operator.getitem,
}
# Pure re-arrangements that timm / torchvision wrap for fx (window partitions and reversals).
_PASS_FUNCTION_NAMES = {"window_reverse", "window_partition", "grid_reverse", "grid_reverse_nchw",
                        "window_reverse_nchw", "deblockify", "blockify", "grid_partition"}
_PASS_METHODS = {"view", "reshape", "permute", "transpose", "contiguous", "flatten", "roll",
                 "squeeze", "unsqueeze", "relu", "relu_", "mean", "sum", "expand", "to",
                 "movedim", "clone"}
# Functions whose output is linear in some parameter arguments: name -> (argument names).
_AFFINE_FUNCTIONS: dict[object, tuple[str, ...]] = {
    F.linear: ("weight", "bias"), F.conv1d: ("weight", "bias"), F.conv2d: ("weight", "bias"),
    F.conv3d: ("weight", "bias"), F.batch_norm: ("weight", "bias"),
    F.layer_norm: ("weight", "bias"), F.group_norm: ("weight", "bias"), F.rms_norm: ("weight",),
    torch.addmm: ("input", "mat2"),  # bias + x @ weight (transformers' GPT-2 Conv1D)
}


def _linear(input, weight, bias=None): ...  # noqa: A002 - signatures of builtins
def _addmm(input, mat1, mat2, *, beta=1, alpha=1): ...  # noqa: A002


_BUILTIN_SIGNATURES = {F.linear: inspect.signature(_linear), torch.addmm: inspect.signature(_addmm)}
_AFFINE_FUNCTION_NAMES = {"shifted_window_attention": ("proj_weight", "proj_bias")}
_STANDARD_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward,
                      nn.LayerNorm.forward, nn.GroupNorm.forward,
                      BATCH_NORM.forward}


# Layers registered by users: class -> the names of the parameters whose positive scaling
# scales the layer's output (or a function of the module returning them).
_USER_AFFINE: dict[type, "tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]]"] = {}


def register_foldable(cls: type | None = None, *, params=("weight", "bias")):
    """Register a layer class whose output scales with its parameters ``params`` (scaling them
    all by ``s > 0`` scales its output by ``s``), so a branch ending in it folds: the survival
    scale goes into those parameters. ``params``: attribute names (those that are None on a
    module are skipped) or a function ``module -> names``. Use as ``@register_foldable``,
    ``@register_foldable(params=("gamma",))`` or ``register_foldable(MyNorm, params=...)``."""
    if not callable(params) and (isinstance(params, str) or not all(isinstance(p, str) for p in params)):
        raise TypeError(f"params must be attribute names or a function, got {params!r}")

    def register(c: type) -> type:
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise TypeError(f"register_foldable takes an nn.Module subclass, got {c!r}")
        _USER_AFFINE[c] = params if callable(params) else tuple(params)
        return c
    return register if cls is None else register(cls)


def _user_affine_params(m: nn.Module, name: str) -> tuple[str, ...] | None:
    spec = next((_USER_AFFINE[c] for c in type(m).__mro__ if c in _USER_AFFINE), None)
    if spec is None:
        return None
    names = spec(m) if callable(spec) else spec
    found = tuple(f"{name}.{p}" for p in names if isinstance(getattr(m, p, None), torch.Tensor))
    if not found:
        raise _Blocked(f"its last layer '{name}' ({type(m).__name__}) has none of its registered "
                       f"affine parameters ({', '.join(names)})")
    return found


def _commuting_act(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.Dropout)) or is_drop_module(m)


def _module_affine_params(m: nn.Module, name: str) -> tuple[str, ...]:
    """Parameters of ``m`` whose positive scaling scales its output, or raise _Blocked."""
    def with_bias(weight: str = "weight") -> tuple[str, ...]:
        out = [f"{name}.{weight}"]
        if getattr(m, "bias", None) is not None:
            out.append(f"{name}.bias")
        return tuple(out)

    user = _user_affine_params(m, name)
    if user is not None:
        return user
    cls = type(m).__name__
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        if type(m).forward in _STANDARD_FORWARDS:
            return with_bias()
        if isinstance(getattr(m, "gain", None), nn.Parameter):  # timm ScaledStdConv2d
            return with_bias("gain")
        raise _Blocked(f"its last layer '{name}' ({cls}) re-normalises its weight, so a scale "
                       f"on the weight does not reach the output")
    if isinstance(m, (BATCH_NORM, nn.LayerNorm, nn.GroupNorm)):
        if getattr(m, "weight", None) is None:
            raise _Blocked(f"its last layer '{name}' ({cls}) is a norm without affine parameters")
        if type(m).forward not in _STANDARD_FORWARDS:
            # timm BatchNormAct2d: norm, then drop and act; fine when those commute.
            if not (_commuting_act(getattr(m, "act", None)) and _commuting_act(getattr(m, "drop", None))):
                raise _Blocked(f"its last layer '{name}' ({cls}) applies "
                               f"{type(getattr(m, 'act', None)).__name__} after the norm, which "
                               f"does not commute with a scale")
        return with_bias()
    if isinstance(m, nn.RMSNorm) or type(m).__module__ == "timm.layers.norm" and \
            cls.startswith(("RmsNorm", "SimpleNorm")):  # x / rms(x) * weight: linear in weight
        if not isinstance(getattr(m, "weight", None), nn.Parameter):
            raise _Blocked(f"its last layer '{name}' ({cls}) is a norm without affine parameters")
        return (f"{name}.weight",)
    raise KeyError


def _sequential_plan(seq: nn.Sequential, name: str) -> tuple[str, tuple[str, ...]]:
    for child_name, child in reversed(list(seq.named_children())):
        qual = f"{name}.{child_name}"
        if isinstance(child, _PASS_MODULES) or is_drop_module(child):
            continue
        if type(child).forward is nn.Sequential.forward:
            return _sequential_plan(child, qual)
        try:
            return qual, _module_affine_params(child, qual)
        except KeyError:
            raise _Blocked(f"its last layer '{qual}' ({type(child).__name__}) has no known affine "
                           f"form") from None
    raise _Blocked(f"'{name}' has no affine layer")


def _data_input(node: fx.Node, an: "GraphFacts") -> fx.Node:
    ins = [i for i in node.all_input_nodes if an.data[i] and an.kinds[i] == "tensor"]
    if len(ins) != 1:
        raise _Blocked(f"the branch merges {len(ins)} tensors at {node.name}")
    return ins[0]


def _param_of(node: fx.Node, an: "GraphFacts") -> str | None:
    """The parameter a node reads, through reshapes (``gamma.reshape(1, -1, 1, 1)``)."""
    while True:
        if node.op == "get_attr":
            return node.target if isinstance(get_attr(an.ft.root, node.target), nn.Parameter) else None
        if node.op == "call_method" and node.target in ("reshape", "view", "unsqueeze", "to",
                                                         "expand", "type_as", "expand_as"):
            node = node.args[0]
        elif node.op == "call_function" and node.target in (torch.reshape, torch.unsqueeze):
            node = node.args[0]
        else:
            return None
        if not isinstance(node, fx.Node):
            return None


def _module_plan(node: fx.Node, m: nn.Module) -> tuple[str, tuple[str, ...]]:
    """The fold target and parameters of the module a branch ends in (raises _Blocked)."""
    if type(m).forward is nn.Sequential.forward:
        return _sequential_plan(m, node.target)
    try:
        return node.target, _module_affine_params(m, node.target)
    except KeyError:
        if not any(True for _ in m.parameters()):
            raise _Blocked(f"{describe(node)} ({type(m).__name__}) does not commute with "
                           f"a scale") from None
        raise _Blocked(f"its last layer '{node.target}' ({type(m).__name__}) is opaque to "
                       f"sdsurgery (a leaf module with no known affine form)") from None


def _walk(start: fx.Node, an: "GraphFacts") -> tuple[str, tuple[str, ...]]:

    cur = start
    for _ in range(256):
        if cur is not start and len(cur.users) != 1:
            raise _Blocked(f"{describe(cur)} feeds more than the branch output")
        if cur.op == "call_module":
            m = an.modules[cur.target]
            if isinstance(m, _PASS_MODULES) or is_drop_module(m):
                cur = _data_input(cur, an)
                continue
            return _module_plan(cur, m)
        if cur.op == "call_function" and cur.target is operator.getitem:
            base = cur.args[0]
            if isinstance(base, fx.Node) and base.op == "call_module" \
                    and isinstance(an.modules[base.target], nn.MultiheadAttention):
                if cur.args[1] != 0:
                    raise _Blocked("the branch uses the attention weights")
                if len(base.users) != 1:
                    raise _Blocked(f"{describe(base)} feeds more than the branch output")
                name = f"{base.target}.out_proj"
                return name, (f"{name}.weight",) + ((f"{name}.bias",) if an.modules[base.target].out_proj.bias is not None else ())
        if cur.op in ("call_function", "call_method"):
            target = cur.target
            fname = target if cur.op == "call_method" else getattr(target, "__name__", "")
            if cur.op == "call_function" and (target in _AFFINE_FUNCTIONS or fname in _AFFINE_FUNCTION_NAMES):
                names = _AFFINE_FUNCTIONS.get(target) or _AFFINE_FUNCTION_NAMES[fname]
                try:
                    sig = _BUILTIN_SIGNATURES.get(target) or inspect.signature(target)
                    bound = sig.bind(*cur.args, **cur.kwargs)
                except (TypeError, ValueError):
                    raise _Blocked(f"cannot read the arguments of {describe(cur)}") from None
                params = []
                for arg in names:
                    value = bound.arguments.get(arg)
                    if value is None:
                        continue
                    p = _param_of(value, an) if isinstance(value, fx.Node) else None
                    if p is None:
                        raise _Blocked(f"{describe(cur)} takes its {arg} from a computed tensor")
                    params.append(p)
                if not params:
                    raise _Blocked(f"{describe(cur)} has no affine parameters")
                owner = params[0].rsplit(".", 1)[0] if "." in params[0] else params[0]
                return owner, tuple(params)
            if fname in ("mul", "mul_", "__mul__", "__rmul__", "truediv", "div", "div_", "__truediv__"):
                a, b = cur.args[0], cur.args[1]
                data_side = [x for x in (a, b) if isinstance(x, fx.Node) and an.data.get(x)]
                if len(data_side) != 1:
                    raise _Blocked(f"the branch output is multiplied by a gate computed from the "
                                   f"data ({describe(cur)}, e.g. squeeze-excite) after its last "
                                   f"affine layer")
                other = b if data_side[0] is a else a
                if isinstance(other, (int, float)):
                    if other <= 0:
                        raise _Blocked(f"{describe(cur)} scales by a non-positive constant")
                    cur = data_side[0]
                    continue
                if fname.startswith("mul") or fname in ("__rmul__",):
                    p = _param_of(other, an) if isinstance(other, fx.Node) else None
                    if p is not None:
                        return p, (p,)
                raise _Blocked(f"{describe(cur)} scales the branch by a computed tensor")
            if (cur.op == "call_function" and (target in _PASS_FUNCTIONS or fname in _PASS_FUNCTION_NAMES)) \
                    or (cur.op == "call_method" and target in _PASS_METHODS):
                if target is F.pad or fname == "pad":
                    mode = cur.kwargs.get("mode", cur.args[2] if len(cur.args) > 2 else "constant")
                    value = cur.kwargs.get("value", cur.args[3] if len(cur.args) > 3 else None)
                    if mode != "constant" or (value not in (None, 0, 0.0)):
                        raise _Blocked(f"{describe(cur)} pads with a non-zero value")
                cur = _data_input(cur, an)
                continue
        raise _Blocked(f"{describe(cur)} does not commute with a scale")
    raise _Blocked("the branch is too long to walk")  # pragma: no cover


def fold_plan(an: "GraphFacts", branch_out: fx.Node, add: fx.Node) -> FoldPlan:
    """Where the survival scale of the branch ending in ``branch_out`` folds (flat graph)."""
    try:
        extra = [u for u in branch_out.users if u is not add]
        if extra:
            raise _Blocked("the branch output is also used outside the residual add")
        target, params = _walk(branch_out, an)
        _check_private(params, an)
    except _Blocked as e:
        return FoldPlan(target=None, params=(), blocker=str(e))
    return FoldPlan(target=target, params=params, blocker=None)


def _check_private(params: tuple[str, ...], an: "GraphFacts") -> None:
    """The parameters must be used once in the whole model (not shared, not tied)."""
    uses = an.param_uses()
    for name in params:
        p = get_attr(an.ft.root, name)
        if not isinstance(p, torch.Tensor):
            raise _Blocked(f"'{name}' is not a parameter")
        if uses.get(id(p), 0) > 1:
            raise _Blocked(f"'{name}' is shared with another layer, so scaling it would change "
                           f"that layer too")


# ------------------------------------------------------------------------------------ fold
def fold(model: nn.Module, *, keep_scale: bool = False, inplace: bool = False) -> nn.Module:
    """Return ``model`` in its original architecture, with the survival scaling folded in.

    The result has no gates, is of the same class as the model before ``convert``, and its
    eval output equals the converted model's eval output.

    Args:
        model: a model returned by :func:`sdsurgery.convert`, or a model holding submodules
            converted in place (``convert(det.backbone.body, inplace=True)``): each is folded.
        keep_scale: for branches whose scale cannot be folded (see ``Residual.fold_blocker``),
            keep an explicit scale instead of raising: their gates stay installed, frozen at the
            eval behaviour (always on, scaled), so the model is not plain for those branches.
        inplace: fold ``model`` itself instead of a copy.

    Raises:
        FoldError: a branch needs a scale and has nowhere to put it (and ``keep_scale`` is off).
    """
    gates = installed_gates(model)
    blocked = [g for g in gates if g.needs_scale() and g.fold_blocker]
    if blocked and not keep_scale:
        g = blocked[0]
        more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
        raise FoldError(f"cannot fold branch '{g.name}'{more}: {g.fold_blocker}; pass "
                        f"keep_scale=True to keep an explicit scale on it")
    out = model if inplace else copy.deepcopy(model)
    parts = converted_parts(out)
    if parts != [("", out)]:  # a model holding converted submodules: fold each where it is
        for _, part in parts:
            _fold_part(part)
        return out
    _fold_part(out)
    return out


def _fold_part(out: nn.Module) -> None:
    """Fold a converted module in place (its blocked branches already accepted)."""
    gates = installed_gates(out)
    with torch.no_grad():
        for g in gates:
            if g.needs_scale() and not g.fold_blocker:
                for name in g.fold_params:
                    get_attr(out, name).mul_(g.survival_prob)
    keep = {g.name for g in gates if g.needs_scale() and g.fold_blocker}
    ctrl = out.__dict__.get(CONTROLLER_ATTR)
    uninstall(out, keep=keep)
    out.__dict__[FOLDED_ATTR] = True  # recorded in checkpoints
    out.__dict__[FOLDED_FROM_ATTR] = ctrl     # its settings too: what the weights were trained with
