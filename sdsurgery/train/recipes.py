"""Fine-tuning recipes: YAML files validated against a typed schema.

Every section is a dataclass; an unknown or misspelled key is an error naming it and the valid
ones, and ``--set section.key=value`` overrides any field with the same type checking.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import SurgeryError
from ..io.models import split_spec

__all__ = ["RecipeError", "ModelConfig", "DataConfig", "OptimizerConfig", "ScheduleConfig",
           "StochasticDepthConfig", "TrainConfig", "Recipe", "parse_recipe", "apply_overrides",
           "difference", "load_recipe"]


class RecipeError(SurgeryError, ValueError):
    """A recipe (or an override) does not fit the schema."""


@dataclass
class ModelConfig:
    # Relative paths in a recipe (model.weights, data.data_dir, train.output_dir) are relative
    # to the working directory the command runs in; the run prints its resolved directory.
    name: str = "cifar_resnet20"          # any spec create_model accepts
    pretrained: bool = False
    weights: Optional[str] = None          # local weights file
    num_classes: Optional[int] = None      # default: the dataset's
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "digits"                # cifar10 | cifar100 | svhn | digits | fake | imagefolder
    data_dir: str = "data"
    download: bool = False
    image_size: Optional[int] = None       # default: the dataset's native size
    val_split: int = 0                     # training images held out for validation
    train_split: str = "train"             # svhn: train | train+extra
    normalize: str = "dataset"             # dataset | model (the pretrained model's mean/std)
    mean: Optional[list] = None            # explicit mean/std override both
    std: Optional[list] = None
    augment: bool = True
    workers: Optional[int] = None          # data-loading processes (default: min(8, CPU cores - 1) on a GPU, 0 on the CPU); results do not depend on it


@dataclass
class OptimizerConfig:
    name: str = "sgd"                      # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    name: str = "step"                     # step | cosine | constant
    milestones: list = field(default_factory=list)  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass
class StochasticDepthConfig:
    enabled: bool = True
    drop_rate: float = 0.5
    schedule: str = "linear"
    mode: str = "block"
    scaling: str = "expectation"
    warmup_epochs: float = 0.0             # ramp the drop rate linearly from 0 over these epochs
    include: Optional[list] = None
    exclude: Optional[list] = None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128                  # per device
    grad_accum: int = 1
    clip_grad: Optional[float] = None
    label_smoothing: float = 0.0
    mixed_precision: str = "auto"          # auto (the launcher's: accelerate launch / config) | no | bf16 | fp16
    seed: int = 0
    output_dir: str = "runs/run"
    checkpoint_every: int = 1              # epochs (0: only mid-epoch / none)
    checkpoint_every_steps: Optional[int] = None  # also save mid-epoch, every N optimizer steps
    keep_checkpoints: int = 2
    eval_batch_size: int = 256
    cpu: bool = False                      # force CPU even where CUDA is available
    max_steps_per_epoch: Optional[int] = None  # for smoke tests
    require_top1: Optional[float] = None   # fail the run if the test top-1 (%) ends below this
    skip_nonfinite: int = 0                # skip up to N steps with a non-finite loss/gradient, then stop
    log_every_steps: Optional[int] = None  # a steps.jsonl line every N optimizer steps (default: ~10% of an epoch); without a terminal also a console line (at most one per 10 s)
    compile: bool = False                  # torch.compile the model (through accelerate's dynamo plugin); dropped branches still skipped
    compile_backend: str = "inductor"      # torch.compile backend for compile: true


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stochastic_depth: StochasticDepthConfig = field(default_factory=StochasticDepthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    paper: dict = field(default_factory=dict)  # what the paper reports for this setting

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("data", "dataset"): ("cifar10", "cifar100", "svhn", "digits", "fake", "imagefolder"),
    ("data", "normalize"): ("dataset", "model"),
    ("optimizer", "name"): ("sgd", "adamw"),
    ("schedule", "name"): ("step", "cosine", "constant"),
    ("stochastic_depth", "schedule"): ("linear", "uniform"),
    ("stochastic_depth", "mode"): ("block", "sample"),
    ("stochastic_depth", "scaling"): ("expectation", "inverted"),
    ("train", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
    # accelerate's DynamoBackend names (its TorchDynamoPlugin takes them)
    ("train", "compile_backend"): ("inductor", "eager", "aot_eager", "cudagraphs", "onnxrt", "tensorrt",
                                   "tvm", "ofi", "fx2trt", "aot_ts_nvfuser", "nvprims_nvfuser"),
}


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


# (section, key): (lowest, highest, lowest allowed, highest allowed); None: no bound
_RANGES = {
    ("model", "num_classes"): (1, None, True, True),
    ("data", "image_size"): (1, None, True, True),
    ("data", "val_split"): (0, None, True, True),
    ("data", "workers"): (0, None, True, True),
    ("optimizer", "lr"): (0, None, False, True),
    ("optimizer", "momentum"): (0, 1, True, False),
    ("optimizer", "weight_decay"): (0, None, True, True),
    ("schedule", "gamma"): (0, None, False, True),
    ("schedule", "warmup_epochs"): (0, None, True, True),
    ("stochastic_depth", "drop_rate"): (0, 1, True, False),
    ("stochastic_depth", "warmup_epochs"): (0, None, True, True),
    ("train", "epochs"): (1, None, True, True),
    ("train", "batch_size"): (1, None, True, True),
    ("train", "grad_accum"): (1, None, True, True),
    ("train", "clip_grad"): (0, None, False, True),
    ("train", "label_smoothing"): (0, 1, True, False),
    ("train", "checkpoint_every"): (0, None, True, True),
    ("train", "checkpoint_every_steps"): (1, None, True, True),
    ("train", "keep_checkpoints"): (1, None, True, True),
    ("train", "eval_batch_size"): (1, None, True, True),
    ("train", "max_steps_per_epoch"): (1, None, True, True),
    ("train", "require_top1"): (0, 100, True, True),
    ("train", "skip_nonfinite"): (0, None, True, True),
    ("train", "log_every_steps"): (1, None, True, True),
}


def _check_range(where: str, value: Any, bounds: tuple) -> None:
    lo, hi, lo_ok, hi_ok = bounds
    fits = ((lo is None or value > lo or (lo_ok and value == lo))
            and (hi is None or value < hi or (hi_ok and value == hi)))
    if not fits:  # NaN fits nothing
        low = "" if lo is None else f"{'>=' if lo_ok else '>'} {lo}"
        high = "" if hi is None else f"{'<=' if hi_ok else '<'} {hi}"
        raise RecipeError(f"{where} must be {' and '.join(x for x in (low, high) if x)}, got {value!r}")


def _check_list(where: str, value: list, positive: bool) -> None:
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if positive else v >= 0):
            raise RecipeError(f"{where} must hold {'positive' if positive else 'non-negative'} "
                              f"numbers, got {v!r}")


def _check_type(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(path, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    expected = origin or tp
    if expected is float and isinstance(value, float):
        return value
    if expected in (int, str, bool, list, dict) and isinstance(value, expected) and not (
            expected is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{path} must be {getattr(expected, '__name__', expected)}, got "
                      f"{type(value).__name__} {value!r}")


def _build(cls: type, data: Any, path: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'the recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    section = path.split(".")[-1] if path else ""
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown recipe key {where!r}{hint}; valid keys"
                              f"{' in ' + path if path else ''}: {', '.join(names)}")
        tp = hints[key]
        allowed = _CHOICES.get((section, key))
        if isinstance(value, bool) and allowed and ("no" if value is False else "yes") in allowed:
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as false
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, where)
        else:
            kwargs[key] = _check_type(where, value, tp)
            if allowed and kwargs[key] not in allowed:
                raise RecipeError(f"{where} must be one of {', '.join(allowed)}, got {kwargs[key]!r}")
            if (section, key) in _RANGES and kwargs[key] is not None:
                _check_range(where, kwargs[key], _RANGES[(section, key)])
            if (section, key) in (("schedule", "milestones"), ("data", "mean"), ("data", "std")) \
                    and kwargs[key] is not None:
                _check_list(where, kwargs[key], positive=key == "std")
    return cls(**kwargs)


def parse_recipe(data: dict) -> Recipe:
    return _build(Recipe, data or {}, "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        value = yaml.safe_load(raw) if raw else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def difference(a: Recipe, b: Recipe) -> str:
    """The first field where two recipes differ, as ``section.key: a vs b`` ('' if none)."""
    da, db = a.to_dict(), b.to_dict()
    for section in da:
        if isinstance(da[section], dict):
            for key in da[section]:
                if da[section][key] != db[section][key]:
                    return f"{section}.{key}: {da[section][key]!r} vs {db[section][key]!r}"
        elif da[section] != db[section]:
            return f"{section}: {da[section]!r} vs {db[section]!r}"
    return ""


def load_recipe(path: str | Path, overrides: list[str] | None = None, *,
                trust_code: bool = False) -> Recipe:
    """Read and validate a recipe file, then apply ``--set`` overrides.

    A recipe is data: a ``model.name`` that is code (``pkg.module:fn``, ``file.py:fn``) is
    refused unless ``trust_code`` or the override names it (the command line is yours; a
    recipe file may come from anywhere).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not data:
        raise RecipeError(f"recipe {path} is empty; start from one in recipes/ (e.g. recipes/demo.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections (model:, data:, train: ...), "
                          f"got {type(data).__name__}")
    recipe = parse_recipe(apply_overrides(data, overrides or []))
    named = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
    if not trust_code and recipe.model.name == named and split_spec(named)[0] == "factory":
        raise RecipeError(f"recipe {path} names model {named!r}, code the file chooses; if you trust "
                          f"the recipe run with --trust-code (or --set model.name={named})")
    return recipe
