"""Every use of a private torch API in sdsurgery, in one place.

torch is pinned (pyproject / Makefile), and ``tests/test_compat.py`` holds one test per name
that fails if a torch release changes what sdsurgery relies on. Nothing else in the package
touches a private torch name.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["BATCH_NORM", "INSTANCE_NORM", "CONV", "POOLS", "children_of", "parameters_of",
           "buffers_of", "remove_forward_hook", "pytree_info", "SPEC_ATTRS", "without_fx_patches",
           "canonical_mask", "none_or_dtype", "detect_is_causal_mask", "compiler_backend",
           "saved_tensors_hooks_now", "version_of", "graph_task"]

# Base classes torch keeps private: every BatchNorm*d / InstanceNorm*d / Conv*d and pooling layer.
BATCH_NORM: type = nn.modules.batchnorm._BatchNorm
INSTANCE_NORM: type = nn.modules.instancenorm._InstanceNorm
CONV: type = nn.modules.conv._ConvNd
POOLS: tuple[type, ...] = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd)


def children_of(module: nn.Module) -> dict[str, nn.Module | None]:
    """The module's own child slots by name, including slots set to None (``named_children``
    skips those)."""
    return module._modules


def parameters_of(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The module's own parameter slots, including ``bias=None`` (``named_parameters`` skips it)."""
    return module._parameters


def buffers_of(module: nn.Module) -> dict[str, Any]:
    """The module's own buffer slots, including ones set to None."""
    return module._buffers


def remove_forward_hook(module: nn.Module, key: int) -> None:
    """Remove the forward hook registered under ``key`` (``RemovableHandle.id``): handles do not
    survive ``copy.deepcopy`` of the model, the keys do."""
    module._forward_hooks.pop(key, None)


def pytree_info(graph: fx.Graph):
    """The pytree specs of a graph traced on tuple / dict inputs (None otherwise)."""
    return getattr(graph._codegen, "pytree_info", None)


# The attributes generated code reads the pytree specs from (``self._in_spec``).
SPEC_ATTRS = ("self._in_spec", "self._out_spec")


def without_fx_patches() -> contextlib.AbstractContextManager:
    """Undo torch.fx's tracing-time patches of ``Module.__call__`` / ``__getattr__`` and wrapped
    functions for the duration (to run real example values inside a trace)."""
    from torch.fx._symbolic_trace import _maybe_revert_all_patches

    return _maybe_revert_all_patches()


# The mask helpers nn.TransformerEncoder(Layer) call before their slow path; the traceable
# stand-ins of sdsurgery.find.standins call the same ones.
canonical_mask = nn.functional._canonical_mask
none_or_dtype = nn.functional._none_or_dtype
detect_is_causal_mask = nn.modules.transformer._detect_is_causal_mask


def compiler_backend(name: str):
    """The torch.compile backend registered as ``name`` (``"inductor"``, ``"eager"``...), as
    the callable ``backend(graph_module, example_inputs)`` (to wrap it: count its graphs)."""
    from torch._dynamo import lookup_backend

    return lookup_backend(name)


def saved_tensors_hooks_now():
    """The ``(pack, unpack)`` hooks of the innermost ``torch.autograd.graph.saved_tensors_hooks``
    in force, or None (hooks do not compose: one pushed inside another replaces it, so a hook
    that wants to keep the outer one's work calls it itself)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def version_of(t: torch.Tensor) -> int:
    """How many in-place changes ``t`` has seen (autograd's version counter)."""
    return t._version


def graph_task() -> int | None:
    """The id of the backward pass autograd is running on this thread (None outside backward):
    a forward called inside one is a checkpoint's recomputation (``torch.utils.checkpoint``)."""
    task = torch._C._current_graph_task_id()
    return None if task == -1 else task
