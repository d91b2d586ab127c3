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
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn as nn

from ..errors import SurgeryError, first_line
from ..gate.gates import CONTROLLER_ATTR, FOLDED_ATTR, FOLDED_FROM_ATTR, MODES, SCALINGS, converted_parts
from ..gate.schedules import SCHEDULES
from ..gate.surgery import convert
from ..version import __version__
from .models import (SOURCE_ATTR, ModelSource, WeightsError, call_factory, check_keys, create_model,
                     source_of, split_spec)

__all__ = ["FORMAT", "META_KEY", "CheckpointError", "describe", "save", "read_metadata",
           "SAFE_SOURCES", "Factory", "build", "load"]

FORMAT = 1
META_KEY = "sdsurgery"


class CheckpointError(SurgeryError, ValueError):
    """A checkpoint cannot be written, read, or does not fit its architecture."""


def describe(model: nn.Module, spec: str | None = None,
             preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata ``save`` writes for ``model``.

    ``preprocessing`` (``sdsurgery.train.data.Preprocessing.to_dict()``: dataset, class count, image
    size, mean/std, interpolation, crop) is what the model was trained on: ``eval`` uses it."""
    parts = [n for n, _ in converted_parts(model) if n]
    if parts:  # its file would read as a plain model whose branches were never scaled
        raise CheckpointError(f"{type(model).__name__} holds converted submodules ({', '.join(parts)}): "
                              f"fold it first (sdsurgery.fold(model)), or save the converted submodule "
                              f"itself")
    src = source_of(model)
    if spec is None and src is None:
        raise CheckpointError(f"{type(model).__name__} has no recorded source (it was not built "
                              f"by sdsurgery.create_model): pass spec='module:factory' to save()")
    folded = bool(model.__dict__.get(FOLDED_ATTR, False))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "sdsurgery_version": __version__,
        "model": {"spec": spec or src.spec, "num_classes": src.num_classes if src else None,
                  "kwargs": src.kwargs if src else {}},
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "converted": False,
        "folded": folded,
        "stochastic_depth": None,
    }
    ctrl = model.__dict__.get(CONTROLLER_ATTR)
    trained = ctrl if ctrl is not None else model.__dict__.get(FOLDED_FROM_ATTR)
    if trained is not None:
        meta["converted"] = ctrl is not None
        meta["stochastic_depth"] = {
            "drop_rate": trained.drop_rate, "mode": trained.mode, "scaling": trained.scaling,
            "seed": trained.seed, **trained.settings,
            "gates": [g.name for g in trained.gates],
            "folded": ctrl is None,  # the settings the weights were trained with, gates removed
        }
    if preprocessing is not None:
        meta["preprocessing"] = dict(preprocessing)
    try:
        json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"the model's factory arguments cannot be stored as JSON ({e}); "
                              f"use plain numbers, strings and lists") from e
    return meta


def save(model: nn.Module, path: str | Path, *, spec: str | None = None,
         preprocessing: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (converted, folded or plain) to ``path`` (``.safetensors``), atomically:
    a failed save leaves no partial file and does not touch an existing one. ``preprocessing``:
    see :func:`describe`."""
    from safetensors.torch import save_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path {str(path)!r} must end in .safetensors")
    meta = describe(model, spec, preprocessing)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"cannot write {path}: directory {str(directory)!r} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_model(model, tmp, metadata={META_KEY: json.dumps(meta)})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    except Exception as e:  # disk full, permissions; safetensors raises its own error type
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {first_line(e, with_type=True)}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The sdsurgery metadata of a checkpoint, validated (raises CheckpointError for other files
    and for metadata that does not fit the schema)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file "
                              f"({first_line(e, with_type=True)})") from e
    if META_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file without sdsurgery metadata; load its "
                              f"tensors into a model with --weights {path} instead")
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: the sdsurgery metadata is corrupt (not JSON: {e})") from e
    try:
        return _validated(meta)
    except _Newer as e:
        raise CheckpointError(f"{path} was written by a newer sdsurgery ({e}); upgrade "
                              f"sdsurgery to read it") from None
    except _Invalid as e:
        raise CheckpointError(f"{path}: the sdsurgery metadata is corrupt ({e}); write the "
                              f"checkpoint again with sdsurgery.save") from None


# ------------------------------------------------------------------------ metadata schema
class _Invalid(ValueError):
    pass


class _Newer(_Invalid):
    pass


# Factory arguments that make timm / torchvision read files or fetch weights: a checkpoint's
# metadata must not choose them (load() always builds with random weights, then loads the file).
_FILE_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                          "checkpoint_path", "cache_dir", "weights", "weights_backbone"})
_MAX_EXAMPLE_ELEMENTS = 1 << 26   # 256 MB of float32: an example batch, never more
_MAX_CLASSES = 1 << 20


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` if it is JSON made of plain values (no objects that could name code)."""
    if depth > 8:
        raise _Invalid(f"{where} is nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _Invalid(f"{where} is {value}")
        return value
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise _Invalid(f"{where} must be a plain JSON value, got {type(value).__name__}")


def _typed(meta: dict, key: str, types: type | tuple, where: str, default: Any = ...) -> Any:
    if key not in meta:
        if default is ...:
            raise _Invalid(f"{where}{key} is missing")
        return default
    value = meta[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,))):
        names = " or ".join(t.__name__ if t is not type(None) else "null"
                            for t in (types if isinstance(types, tuple) else (types,)))
        raise _Invalid(f"{where}{key} must be {names}, got {type(value).__name__} {value!r:.40}")
    return value


def _strings(value: Any, where: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _Invalid(f"{where} must be a string or a list of strings")


def _validated(meta: Any) -> dict[str, Any]:
    """``meta`` checked against the metadata ``describe`` writes: types, choices and bounds."""
    if not isinstance(meta, dict):
        raise _Invalid(f"it must be a JSON object, got {type(meta).__name__}")
    fmt = _typed(meta, "format", int, "", 0)
    if fmt > FORMAT:
        raise _Newer(f"format {fmt}")
    for key in ("converted", "folded"):
        _typed(meta, key, bool, "", False)
    model = _typed(meta, "model", dict, "")
    spec = _typed(model, "spec", str, "model.")
    if not spec.strip():
        raise _Invalid("model.spec is empty")
    n = _typed(model, "num_classes", (int, type(None)), "model.", None)
    if n is not None and not 1 <= n <= _MAX_CLASSES:
        raise _Invalid(f"model.num_classes must be in [1, {_MAX_CLASSES}], got {n}")
    kwargs = _plain(_typed(model, "kwargs", (dict, type(None)), "model.", None) or {}, "model.kwargs")
    for key in kwargs:
        if not key.isidentifier():
            raise _Invalid(f"model.kwargs key {key!r} is not a Python identifier")
        if key in _FILE_KWARGS:
            raise _Invalid(f"model.kwargs.{key} would make the factory read or fetch files")
    pre = _typed(meta, "preprocessing", (dict, type(None)), "", None)
    if pre is not None:
        w = "preprocessing."
        _typed(pre, "dataset", str, w)
        size = _typed(pre, "image_size", int, w)
        if not 1 <= size <= 1 << 14:
            raise _Invalid(f"{w}image_size must be in [1, {1 << 14}], got {size}")
        for key in ("mean", "std"):
            v = _typed(pre, key, list, w)
            if not (len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                        and math.isfinite(x) for x in v)) or (key == "std" and min(v) <= 0):
                raise _Invalid(f"{w}{key} must be 3 finite numbers{' > 0' if key == 'std' else ''}")
        if _typed(pre, "interpolation", str, w, "bilinear") not in ("bilinear", "bicubic", "nearest"):
            raise _Invalid(f"{w}interpolation must be bilinear, bicubic or nearest")
        crop = _typed(pre, "crop_pct", (int, float, type(None)), w, None)
        if crop is not None and not 0 < crop <= 1:
            raise _Invalid(f"{w}crop_pct must be in (0, 1], got {crop}")
        n = _typed(pre, "num_classes", (int, type(None)), w, None)
        if n is not None and not 1 <= n <= _MAX_CLASSES:
            raise _Invalid(f"{w}num_classes must be in [1, {_MAX_CLASSES}], got {n}")
    sd = _typed(meta, "stochastic_depth", (dict, type(None)), "", None)
    if sd is not None:
        w = "stochastic_depth."
        rate = _typed(sd, "drop_rate", (int, float), w)
        if not 0.0 <= rate < 1.0:
            raise _Invalid(f"{w}drop_rate must be in [0, 1), got {rate}")
        for key, allowed in (("mode", MODES), ("scaling", SCALINGS)):
            if _typed(sd, key, str, w) not in allowed:
                raise _Invalid(f"{w}{key} must be one of {', '.join(allowed)}, got {sd[key]!r:.40}")
        schedule = _typed(sd, "schedule", (str, list), w, "linear")
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise _Invalid(f"{w}schedule must be one of {', '.join(SCHEDULES)} or a list of "
                           f"probabilities, got {schedule!r:.40}")
        if isinstance(schedule, list) and not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1 for p in schedule):
            raise _Invalid(f"{w}schedule must hold probabilities in [0, 1)")
        _typed(sd, "seed", (int, type(None)), w, None)
        _typed(sd, "gate_projection", bool, w, True)
        _typed(sd, "folded", bool, w, False)
        for key in ("include", "exclude"):
            _strings(sd.get(key), w + key)
        leaves = _typed(sd, "leaf_modules", (list, type(None)), w, None) or []
        if not all(x is None or isinstance(x, str) for x in leaves):
            raise _Invalid(f"{w}leaf_modules must be a list of strings")
        shape = _typed(sd, "example_shape", (list, type(None)), w, None)
        if shape is not None:
            if not (1 <= len(shape) <= 8 and all(isinstance(d, int) and not isinstance(d, bool)
                                                 and 1 <= d for d in shape)):
                raise _Invalid(f"{w}example_shape must be a list of 1 to 8 positive sizes, got "
                               f"{shape!r:.60}")
            if math.prod(shape) > _MAX_EXAMPLE_ELEMENTS:
                raise _Invalid(f"{w}example_shape {shape} is larger than any example input "
                               f"({math.prod(shape)} elements, at most {_MAX_EXAMPLE_ELEMENTS})")
        _example_inputs(sd.get("example_inputs"), w + "example_inputs")
    return meta


_EXAMPLE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def _example_inputs(value: Any, where: str) -> None:
    """``example_inputs``: None, or up to 16 inputs (by keyword name or position), each
    ``{"shape": [sizes], "dtype": name}``."""
    if value is None:
        return
    if isinstance(value, dict):
        if not all(isinstance(k, str) and k.isidentifier() for k in value):
            raise _Invalid(f"{where} names must be Python identifiers")
        items = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        raise _Invalid(f"{where} must be a dict, a list or null, got {type(value).__name__}")
    if not 1 <= len(items) <= 16:
        raise _Invalid(f"{where} must hold 1 to 16 inputs, got {len(items)}")
    total = 0
    for item in items:
        if not (isinstance(item, dict) and set(item) == {"shape", "dtype"}):
            raise _Invalid(f"{where} entries must be {{shape, dtype}}, got {item!r:.60}")
        shape = item["shape"]
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise _Invalid(f"{where} shapes must be lists of 1 to 8 positive sizes, got {shape!r:.60}")
        if item["dtype"] not in _EXAMPLE_DTYPES:
            raise _Invalid(f"{where} dtype must be one of {', '.join(_EXAMPLE_DTYPES)}, got "
                           f"{item['dtype']!r:.30}")
        total += math.prod(shape)
    if total > _MAX_EXAMPLE_ELEMENTS:
        raise _Invalid(f"{where} is larger than any example input ({total} elements, at most "
                       f"{_MAX_EXAMPLE_ELEMENTS})")


def _example_of(sd: dict) -> Any:
    """An example input like the one the model was converted with (sizes and dtypes; integer
    inputs are ones: token ids and masks that every vocabulary has)."""
    def tensor(item: dict) -> torch.Tensor:
        dtype = getattr(torch, item["dtype"])
        if dtype.is_floating_point:
            return torch.randn(*item["shape"], dtype=dtype)
        return torch.ones(*item["shape"], dtype=dtype)
    inputs = sd.get("example_inputs")
    if isinstance(inputs, dict):
        return {k: tensor(v) for k, v in inputs.items()}
    if isinstance(inputs, list):
        return tuple(tensor(v) for v in inputs)
    return torch.randn(*sd["example_shape"]) if sd.get("example_shape") else None


# --------------------------------------------------------------------- rebuilding models
# Sources whose models are built from names alone: no code named by a file is imported or run.
SAFE_SOURCES = ("sdsurgery", "timm", "torchvision", "hf-hub")

Factory = Union[str, Callable[..., nn.Module]]


def _refuse_code(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} names {what}, which would import and run code the file chooses; if you trust "
        f"it, pass the factory yourself: load(path, factory='pkg.module:fn') / --factory "
        f"pkg.module:fn (or trust_code=True / --trust-code)")


def build(meta: dict[str, Any], path: str | Path, *, factory: Factory | None = None,
          trust_code: bool = False) -> nn.Module:
    """The architecture ``meta`` describes, unconverted, with random weights (no download).

    Only sdsurgery's registry, timm and torchvision (names, never code) are used unless the
    caller passes ``factory`` (a ``'pkg.module:fn'`` / ``'file.py:fn'`` spec or a callable) or
    ``trust_code=True`` (then a ``module:factory`` spec in the file is imported and called).
    """
    path = Path(path)
    m = meta["model"]
    kwargs = dict(m.get("kwargs") or {})
    num_classes = m.get("num_classes")
    if callable(factory):
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        name = getattr(factory, "__qualname__", type(factory).__name__)
        model = call_factory(factory, name, kwargs)
        model.__dict__[SOURCE_ATTR] = ModelSource(spec=m["spec"], num_classes=num_classes,
                                                  kwargs=dict(m.get("kwargs") or {}))
        return model
    spec = factory or m["spec"]
    if factory is None and not trust_code and split_spec(spec)[0] not in (None, *SAFE_SOURCES):
        raise _refuse_code(path, f"its model factory {spec!r}")
    return create_model(spec, pretrained=False, num_classes=num_classes, **kwargs)


def _leaf(entry: str, path: Path, trust_code: bool):
    """A leaf_modules entry from a file: a qualified module name, or ``module:Class`` of an
    ``nn.Module`` subclass from a module already imported (imported only with trust_code)."""
    if ":" not in entry:
        return entry
    module, _, name = entry.partition(":")
    if not all(p.isidentifier() for p in [*module.split("."), *name.split(".")]):
        raise CheckpointError(f"{path}: leaf module {entry!r} is not 'package.module:Class'")
    mod = sys.modules.get(module)
    if mod is None:
        if not trust_code:
            raise _refuse_code(path, f"the leaf module class {entry!r} from a module that is not "
                                     f"imported ({module})")
        mod = importlib.import_module(module)
    obj: Any = mod
    for part in name.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise CheckpointError(f"{path}: leaf module {entry!r} is not an nn.Module class here")
    return obj


def load(path: str | Path, *, factory: Factory | None = None, trust_code: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint describes (no download) and load its tensors strictly.

    Opening a file never runs code it names: the architecture comes from sdsurgery's registry,
    timm or torchvision. A checkpoint of your own model (``module:factory``) loads when you
    pass ``factory`` (``'pkg.module:fn'``, ``'file.py:fn'`` or the callable itself), or with
    ``trust_code=True`` for a file you trust.

    >>> model = sdsurgery.load("resnet50_sd.safetensors")                  # doctest: +SKIP
    >>> mine = sdsurgery.load("mine.safetensors", factory=my_models.build)  # doctest: +SKIP
    """
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_metadata(path)
    model = build(meta, path, factory=factory, trust_code=trust_code)
    sd = meta.get("stochastic_depth")
    if meta.get("converted") and sd:
        schedule = sd.get("schedule", "linear")
        leaves = [_leaf(x, path, trust_code) for x in sd.get("leaf_modules") or [] if x]
        model = convert(model, drop_rate=sd["drop_rate"] if isinstance(schedule, str) else 0.0,
                        schedule=schedule, mode=sd["mode"], scaling=sd["scaling"],
                        gate_projection=sd.get("gate_projection", True), include=sd.get("include"),
                        exclude=sd.get("exclude"), seed=sd.get("seed"), leaf_modules=leaves,
                        example=_example_of(sd),
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
        model.__dict__[FOLDED_ATTR] = True
    return model
