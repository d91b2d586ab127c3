"""Traceable stand-ins for forwards torch.fx cannot trace but whose math is known.

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` pick a fused fast path at
inference by inspecting their input (``src.dim()``, ``src.is_nested``...), which fx cannot
follow, and torch.fx treats everything in ``torch.nn`` as a leaf. For tracing and rewriting,
sdsurgery uses their slow path instead: the same computation (the one they run in training),
written so fx can follow it. A converted layer runs that slow path; ``fold`` removes the
rewrite, so the folded model has its own forward, fast path included, again.

Register more with :func:`register_traceable_forward` (a function with the module's forward
signature, ``self`` first).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .._compat import canonical_mask, detect_is_causal_mask, none_or_dtype

__all__ = ["register_traceable_forward", "traceable_forward", "transformer_encoder_layer_forward",
           "transformer_encoder_forward"]

_FORWARDS: dict[type, Callable] = {}


def register_traceable_forward(cls: type, forward: Callable) -> None:
    """Trace and rewrite instances of ``cls`` (exactly that class) through ``forward`` instead of
    their own forward; it must compute the same thing and take the same arguments."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not callable(forward):
        raise TypeError("register_traceable_forward takes an nn.Module subclass and a function")
    _FORWARDS[cls] = forward


def traceable_forward(module: nn.Module) -> Callable | None:
    """The registered stand-in of ``module``'s class, or None."""
    return _FORWARDS.get(type(module))


# Kept whole in traces (call_function nodes): they branch on the mask's dtype.
def _mask(mask, name, other_type, other_name, target_type, check_other=True):
    return canonical_mask(mask=mask, mask_name=name, other_type=other_type, other_name=other_name,
                          target_type=target_type, check_other=check_other)


def _dtype_of(mask):
    return none_or_dtype(mask)


def _is_causal(mask, is_causal, size):
    return detect_is_causal_mask(mask, is_causal, size)


fx.wrap("_mask")
fx.wrap("_dtype_of")
fx.wrap("_is_causal")


def transformer_encoder_layer_forward(self, src: torch.Tensor, src_mask=None, src_key_padding_mask=None,
                                      is_causal: bool = False) -> torch.Tensor:
    """``nn.TransformerEncoderLayer.forward`` without the fast path (torch 2.x)."""
    src_key_padding_mask = _mask(src_key_padding_mask, "src_key_padding_mask", _dtype_of(src_mask),
                                 "src_mask", src.dtype)
    src_mask = _mask(src_mask, "src_mask", None, "", src.dtype, False)
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + self._ff_block(self.norm2(x))
    else:
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = self.norm2(x + self._ff_block(x))
    return x


def transformer_encoder_forward(self, src: torch.Tensor, mask=None, src_key_padding_mask=None,
                                is_causal=None) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` without the fast path (no nested-tensor conversion)."""
    src_key_padding_mask = _mask(src_key_padding_mask, "src_key_padding_mask", _dtype_of(mask),
                                 "mask", src.dtype)
    mask = _mask(mask, "mask", None, "", src.dtype, False)
    batch_first = self.layers[0].self_attn.batch_first
    is_causal = _is_causal(mask, is_causal, src.size(1 if batch_first else 0))
    output = src
    for mod in self.layers:
        output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
    if self.norm is not None:
        output = self.norm(output)
    return output


register_traceable_forward(nn.TransformerEncoderLayer, transformer_encoder_layer_forward)
register_traceable_forward(nn.TransformerEncoder, transformer_encoder_forward)
