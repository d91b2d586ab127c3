"""Where models come from: sdsurgery's own registry, timm, torchvision, or your own factory.

``create_model(spec)`` resolves ``spec`` as follows:

* ``timm:NAME[.TAG]``, ``torchvision:NAME``, ``sdsurgery:NAME``, ``hf-hub:REPO`` (through timm)
  force a source;
* ``package.module:factory`` or ``path/to/file.py:factory`` call your factory (a callable
  returning an ``nn.Module``) with the keyword arguments given;
* a bare name is looked up in sdsurgery's registry, then timm, then torchvision.

The model remembers how it was made (:func:`source_of`), so a checkpoint can rebuild it.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from . import registry
from ..errors import SurgeryError, first_line
from .registry import register_model  # noqa: F401  (re-exported: sdsurgery.register_model)
from ..zoo import cifar_resnet  # noqa: F401  (registers the paper's ResNets)

__all__ = ["SOURCE_ATTR", "ModelSourceError", "WeightsError", "ModelSource", "register_model", "list_models",
           "source_of", "create_model", "split_spec", "reset_classifier", "call_factory",
           "read_state_dict", "load_weights", "check_keys"]

SOURCE_ATTR = "_sdsurgery_source"


class ModelSourceError(SurgeryError, ValueError):
    """The model spec cannot be resolved or built."""


class WeightsError(SurgeryError):
    """Weights cannot be fetched or do not fit the model."""


@dataclass
class ModelSource:
    """How a model was built: enough to build the same architecture again."""

    spec: str
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def list_models(pattern: str = "*") -> list[str]:
    """Resolvable names matching a glob, each prefixed with its source
    (``sdsurgery:...``, ``timm:...``, ``torchvision:...``)."""
    out = [f"sdsurgery:{n}" for n in registry.names(pattern)]
    import timm
    import torchvision
    out += [f"timm:{n}" for n in timm.list_models(pattern)]
    out += [f"torchvision:{n}" for n in sorted(torchvision.models.list_models(module=torchvision.models))
            if fnmatch.fnmatchcase(n, pattern)]
    return out


def source_of(model: nn.Module) -> ModelSource | None:
    return model.__dict__.get(SOURCE_ATTR)


def create_model(spec: str, *, pretrained: bool = True, num_classes: int | None = None,
                 weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build the model ``spec`` names (see the module docstring).

    Args:
        spec: model name or ``source:name`` / ``module:factory`` / ``file.py:factory``.
        pretrained: load the source's pretrained weights (timm / torchvision). Failing to fetch
            them is an error, never a silent fallback to random weights.
        num_classes: reset the classifier to this many classes (as timm / torchvision do).
        weights: a ``.safetensors`` file or PyTorch checkpoint (loaded with
            ``weights_only=True``) to load into the built model (strictly).
        kwargs: passed to the factory.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSourceError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if weights is not None:
        pretrained = False
    source, name = split_spec(spec)
    if source is None:
        source = _resolve_bare(name)
        spec = f"{source}:{name}"
    if source == "sdsurgery":
        model = _build_registered(name, num_classes, kwargs)
    elif source in ("timm", "hf-hub"):
        model = _build_timm(name if source == "timm" else spec, pretrained, num_classes, kwargs)
    elif source == "torchvision":
        model = _build_torchvision(name, pretrained, num_classes, kwargs)
    else:
        model = _build_factory(spec, num_classes, kwargs)
    if weights is not None:
        load_weights(model, weights)
    model.__dict__[SOURCE_ATTR] = ModelSource(spec=spec, num_classes=num_classes,
                                              kwargs=dict(kwargs))
    return model


# ---------------------------------------------------------------------------- resolution
_PREFIXES = ("timm", "torchvision", "sdsurgery", "hf-hub")


def split_spec(spec: str) -> tuple[str | None, str]:
    """``(source, name)``: source is a known prefix, ``"factory"`` for ``module:fn`` /
    ``file.py:fn`` specs (code), or None for a bare name."""
    if ":" in spec:
        head, tail = spec.split(":", 1)
        if head in _PREFIXES:
            return head, tail
        return "factory", spec
    return None, spec


def _resolve_bare(name: str) -> str:
    """The source a bare name comes from: sdsurgery's registry, then timm, then torchvision."""
    import timm
    import torchvision
    if registry.registered(name):
        return "sdsurgery"
    if timm.is_model(name):
        return "timm"
    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"
    raise ModelSourceError(f"unknown model {name!r}{_suggest(name)}; "
                           f"`sdsurgery models PATTERN` lists the names")


def _suggest(name: str) -> str:
    import timm
    import torchvision
    base = name.split(".")[0]
    pool = list(dict.fromkeys(registry.names() + timm.list_models()
                              + torchvision.models.list_models(module=torchvision.models)))
    close = difflib.get_close_matches(base, pool, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _pretrained_failed(name: str, err: Exception) -> WeightsError:
    return WeightsError(f"cannot fetch pretrained weights for {name!r} "
                        f"({first_line(err, with_type=True)}); use --no-pretrained (pretrained=False) for random weights "
                        f"or --weights FILE (weights=...) for a local file")


def _with_classes(kwargs: dict, num_classes: int | None) -> dict:
    """The factory's keyword arguments, with ``num_classes`` when one is asked for (every source
    builds its classifier from it, as timm and torchvision do)."""
    return kwargs if num_classes is None else {**kwargs, "num_classes": num_classes}


def _build_registered(name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    if not registry.registered(name):
        raise ModelSourceError(f"unknown sdsurgery model {name!r}{_suggest(name)}")
    return call_factory(registry.get_factory(name), name, _with_classes(kwargs, num_classes))


def _build_timm(name: str, pretrained: bool, num_classes: int | None, kwargs: dict) -> nn.Module:
    import timm
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise ModelSourceError(f"unknown timm model {name!r}{_suggest(name)}")
    try:
        return timm.create_model(name, pretrained=pretrained, **_with_classes(kwargs, num_classes))
    except TypeError as e:
        raise ModelSourceError(f"cannot build timm model {name!r}: {e}") from e
    except RuntimeError as e:
        if "pretrained tag" in str(e):
            raise ModelSourceError(f"{e} `sdsurgery models '{name.split('.')[0]}*'` lists the "
                                   f"available tags") from e
        if pretrained:
            raise _pretrained_failed(name, e) from e
        raise ModelSourceError(f"cannot build timm model {name!r}: {e}") from e
    except Exception as e:  # network and hub errors come in many types
        if pretrained:
            raise _pretrained_failed(name, e) from e
        raise ModelSourceError(f"cannot build timm model {name!r}: {type(e).__name__}: {e}") from e


def _build_torchvision(name: str, pretrained: bool, num_classes: int | None, kwargs: dict) -> nn.Module:
    import torchvision
    if name not in torchvision.models.list_models(module=torchvision.models):
        tasks = (torchvision.models.detection, torchvision.models.segmentation)
        if not any(name in torchvision.models.list_models(module=m) for m in tasks):
            raise ModelSourceError(f"unknown torchvision model {name!r}{_suggest(name)}")
        # detection / segmentation: their backbone would fetch ImageNet weights by default
        kwargs = {"weights_backbone": "DEFAULT" if pretrained else None, **kwargs}
    if not pretrained:
        try:
            return torchvision.models.get_model(name, weights=None, **_with_classes(kwargs, num_classes))
        except (TypeError, ValueError) as e:
            raise ModelSourceError(f"cannot build torchvision model {name!r}: {e}") from e
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    except TypeError as e:
        raise ModelSourceError(f"cannot build torchvision model {name!r}: {e}") from e
    except Exception as e:
        raise _pretrained_failed(name, e) from e
    if num_classes is not None:
        reset_classifier(model, num_classes)
    return model


def reset_classifier(model: nn.Module, num_classes: int) -> None:
    """Replace the final classification layer of a torchvision-style model with a fresh one
    of ``num_classes`` outputs (timm models: ``model.reset_classifier``)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    last_name, last = None, None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last_name, last = name, m
    if last is None:
        raise ModelSourceError(f"cannot find the classifier of {type(model).__name__} to reset "
                               f"it to {num_classes} classes")
    if isinstance(last, nn.Linear):
        new: nn.Module = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    else:
        new = nn.Conv2d(last.in_channels, num_classes, last.kernel_size, last.stride,
                        last.padding, bias=last.bias is not None)
    parent_name, _, child = last_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _build_factory(spec: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    target, _, fn_name = spec.rpartition(":")
    if not fn_name.isidentifier():
        raise ModelSourceError(f"{spec!r}: expected 'package.module:factory' or "
                               f"'path/to/file.py:factory'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelSourceError(f"{spec!r}: no file {path}")
        mod_name = f"_sdsurgery_user_{abs(hash(str(path.resolve())))}"
        mod = sys.modules.get(mod_name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = mod
            try:
                loader_spec.loader.exec_module(mod)
            except Exception as e:
                del sys.modules[mod_name]
                raise ModelSourceError(f"{spec!r}: importing {path} failed: "
                                       f"{type(e).__name__}: {e}") from e
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise ModelSourceError(f"{spec!r}: cannot import {target!r} ({e}); is it on "
                                   f"PYTHONPATH?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelSourceError(f"{spec!r}: {target} has no callable {fn_name!r}")
    return call_factory(fn, spec, _with_classes(kwargs, num_classes))


def call_factory(fn: Callable[..., nn.Module], spec: str, kwargs: dict) -> nn.Module:
    """``fn(**kwargs)``, checked: arguments that do not fit its signature and results that are
    not modules are ModelSourceErrors naming ``spec``."""
    try:
        sig = inspect.signature(fn)
        sig.bind(**kwargs)
    except TypeError as e:
        raise ModelSourceError(f"{spec!r} does not take these arguments ({e}); its signature is "
                               f"{fn.__name__}{sig}") from e
    except ValueError:
        pass
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


# ------------------------------------------------------------------------------- weights
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a PyTorch checkpoint (``weights_only=True``;
    a ``state_dict`` / ``model`` entry is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                               f"{e})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint (loaded with "
                           f"weights_only=True: {first_line(e, with_type=True)})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into ``model`` strictly; a mismatch names the keys."""
    state = read_state_dict(path)
    check_keys(model, state, str(path))
    model.load_state_dict(state, strict=True)


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes ({k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(expected[k].shape)})")
        raise WeightsError(f"{what} does not fit {type(model).__name__}: keys " + "; ".join(parts))

