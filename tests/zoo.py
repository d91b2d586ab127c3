"""The architecture-coverage harness (issue 5): an oracle nobody here wrote.

timm puts a drop-path slot on each residual branch (attributes ``drop_path``, ``drop_path1``,
``drop_path2`` ...: ``DropPath`` when the rate is > 0, ``Identity`` or ``None`` at rate 0). Build
the model with ``drop_path_rate > 0``, make ``None`` slots visible (a counting identity in their
place), count the slot calls in one forward pass: that is how many residual branches
``find_residuals`` must find, and the slots' parents are the blocks that own them.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

import sdsurgery

SLOT = re.compile(r"^drop_path\d*$")
PREFERENCE = ["atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "18", "b0", "mini", "s"]


class _CountingSlot(nn.Identity):
    """Stands where a block keeps ``None`` for a drop-path slot at rate 0."""


def smallest_variant(names: list[str]) -> str:
    """A small model of a family, by name (building them all to compare sizes is too slow)."""
    for p in PREFERENCE:
        found = [n for n in names if re.search(rf"(^|_){p}(\d|_|$)", n)]
        if found:
            return sorted(found, key=len)[0]
    return sorted(names, key=len)[0]


def oracle(name: str, x: torch.Tensor, **kwargs) -> tuple[int, set[str]]:
    """Drop-path slot calls in one eval forward pass of timm model ``name``, and the qualified
    names of the modules holding the slots that were called."""
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.1, **kwargs).eval()
    for module in list(model.modules()):
        for attr in [a for a in vars(module) if SLOT.match(a) and getattr(module, a) is None]:
            setattr(module, attr, _CountingSlot())
    calls, owners = [0], set()
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if SLOT.match(child_name):
                def hook(*_, owner=parent_name):
                    calls[0] += 1
                    owners.add(owner)
                child.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    return calls[0], owners


@dataclass
class ZooRow:
    family: str
    model: str
    found: int
    expected: int
    foldable: int
    status: str
    reason: str
    seconds: float


def check(family: str, name: str, tolerance: float = 1e-4) -> ZooRow:
    """Count, convert, train-step in block mode at a high rate, fold: one row of the table."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    size = timm.create_model(name, pretrained=False).pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, *size)
    expected, slot_owners = oracle(name, x)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.1).eval()
    for p in model.parameters():  # layer scales start at 1e-6 and heads at 0: make branches count
        if p.dim() <= 1:
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
    residuals = sdsurgery.find_residuals(model)
    row = ZooRow(family, name, len(residuals), expected, sum(r.fold_target is not None for r in residuals),
                 "ok", "", 0.0)
    if len(residuals) != expected:
        row.status, row.reason = "count", f"found {len(residuals)}, timm has {expected} drop-path slots"
    elif {r.owner for r in residuals} != slot_owners:
        row.status, row.reason = "owners", "the residuals found are not the slotted blocks"
    else:
        converted = sdsurgery.convert(model, drop_rate=0.9, schedule="uniform", seed=0)
        converted.train()
        out = converted(x)
        (out[0] if isinstance(out, (tuple, list)) else out).float().mean().backward()
        converted.eval()
        folded = sdsurgery.fold(converted, keep_scale=True).eval()
        with torch.no_grad():
            a, b = converted(x), folded(x)
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        if rel > tolerance:
            row.status, row.reason = "fold", f"folded differs by {rel:.1e}"
    row.seconds = time.perf_counter() - t0
    return row


def families() -> dict[str, str]:
    """One small variant per timm model module."""
    out = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            out[module] = smallest_variant(names)
    return out
