"""One self-describing checkpoint: a ``.safetensors`` file with sdsurgery metadata.

The tensors are the model's state_dict, under the original architecture's keys (a converted
model's state_dict *is* the original's). The safetensors header carries, as JSON under the key
``"sdsurgery"``: the model spec, num_classes and factory kwargs; whether the model is converted
or folded; the stochastic-depth settings; the sdsurgery version. ``load`` rebuilds the model
from that without downloading anything. A folded file is a plain state_dict: it also loads
with ``safetensors.torch.load_file`` into a freshly built timm / torchvision model.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import SurgeryError

FORMAT = 1
META_KEY = "sdsurgery"


class CheckpointError(SurgeryError, ValueError):
    """A checkpoint cannot be written, read, or does not fit its architecture."""


def describe(model: nn.Module, spec: str | None = None) -> dict[str, Any]:
    """The metadata ``save`` writes for ``model``."""
    from . import __version__
    from .gates import CONTROLLER_ATTR
    from .models import source_of

    src = source_of(model)
    if spec is None and src is None:
        raise CheckpointError(f"{type(model).__name__} has no recorded source (it was not built "
                              f"by sdsurgery.create_model): pass spec='module:factory' to save()")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "sdsurgery_version": __version__,
        "model": {"spec": spec or src.spec, "num_classes": src.num_classes if src else None,
                  "kwargs": src.kwargs if src else {}},
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "converted": False,
        "folded": bool(model.__dict__.get("_sdsurgery_folded", False)),
        "stochastic_depth": None,
    }
    ctrl = model.__dict__.get(CONTROLLER_ATTR)
    if ctrl is not None:
        meta["converted"] = True
        meta["stochastic_depth"] = {
            "drop_rate": ctrl.drop_rate, "mode": ctrl.mode, "scaling": ctrl.scaling,
            "seed": ctrl.seed, **ctrl.settings,
            "gates": [g.name for g in ctrl.gates],
        }
    try:
        json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"the model's factory arguments cannot be stored as JSON ({e}); "
                              f"use plain numbers, strings and lists") from e
    return meta


def save(model: nn.Module, path: str | Path, *, spec: str | None = None) -> Path:
    """Write ``model`` (converted, folded or plain) to ``path`` (``.safetensors``), atomically:
    a failed save leaves no partial file and does not touch an existing one."""
    from safetensors.torch import save_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path {str(path)!r} must end in .safetensors")
    meta = describe(model, spec)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"cannot write {path}: directory {str(directory)!r} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_model(model, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The sdsurgery metadata of a checkpoint (raises CheckpointError for other files)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if META_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file without sdsurgery metadata; load its "
                              f"tensors into a model with --weights {path} instead")
    try:
        meta = json.loads(header[META_KEY])
        meta["model"]["spec"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the sdsurgery metadata is corrupt ({e})") from e
    if meta.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path} was written by a newer sdsurgery (format "
                              f"{meta.get('format')}); upgrade sdsurgery to read it")
    return meta


def _leaf(entry: str):
    if ":" in entry:
        module, _, name = entry.partition(":")
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    return entry


def load(path: str | Path) -> nn.Module:
    """Rebuild the model a checkpoint describes (no download) and load its tensors strictly."""
    from safetensors.torch import load_model

    from .models import WeightsError, check_keys, create_model
    from .surgery import convert

    path = Path(path)
    meta = read_metadata(path)
    m = meta["model"]
    model = create_model(m["spec"], pretrained=False, num_classes=m.get("num_classes"),
                         **(m.get("kwargs") or {}))
    sd = meta.get("stochastic_depth")
    if meta.get("converted") and sd:
        schedule = sd.get("schedule", "linear")
        model = convert(model, drop_rate=sd["drop_rate"] if isinstance(schedule, str) else 0.0,
                        schedule=schedule, mode=sd["mode"], scaling=sd["scaling"],
                        gate_projection=sd.get("gate_projection", True), include=sd.get("include"),
                        exclude=sd.get("exclude"), seed=sd.get("seed"),
                        leaf_modules=[_leaf(x) for x in sd.get("leaf_modules") or [] if x],
                        example=torch.randn(*sd["example_shape"]) if sd.get("example_shape") else None,
                        inplace=True)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: "
                              f"{str(e).strip().splitlines()[-1].strip()}") from e
    if missing or unexpected:
        from safetensors.torch import load_file
        try:
            check_keys(model, load_file(str(path)), str(path))
        except WeightsError as e:
            raise CheckpointError(str(e)) from e
    if meta.get("folded"):
        model.__dict__["_sdsurgery_folded"] = True
    return model
