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
           "MixupConfig", "EmaConfig",
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
    image_size: Optional[int] = None       # default: the dataset's native size (transforms: timm: the model's input size)
    val_split: int = 0                     # training images held out for validation
    train_split: str = "train"             # svhn: train | train+extra
    normalize: str = "dataset"             # dataset | model (the pretrained model's mean/std)
    mean: Optional[list] = None            # explicit mean/std override both
    std: Optional[list] = None
    augment: bool = True
    workers: Optional[int] = None          # data-loading processes (default: min(8, CPU cores - 1) on a GPU, 0 on the CPU); results do not depend on it
    # dataset: the dataset's own pipeline (resize to image_size; train: pad-and-crop and flips,
    # the paper's CIFAR augmentation). timm: timm's create_transform with the model's pretrained
    # data config (resolve_model_data_config: input size, interpolation, crop_pct, mean/std) and
    # the keys below, named as in timm's train.py.
    transforms: str = "dataset"
    interpolation: Optional[str] = None    # bilinear | bicubic | ... (default: the model's; dataset: bilinear)
    crop_pct: Optional[float] = None       # eval: resize to image_size / crop_pct, centre crop (default: the model's)
    scale: Optional[list] = None           # RandomResizedCrop area range (timm's default [0.08, 1.0])
    ratio: Optional[list] = None           # RandomResizedCrop aspect-ratio range (timm's default [3/4, 4/3])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = 0.4    # off when auto_augment is set (timm's rule)
    auto_augment: Optional[str] = None     # timm's: rand-m9-mstd0.5-inc1 (RandAugment), rand-m10-n1-mstd101 (TrivialAugment-like), augmix-m5-w4-d2, original, v0
    re_prob: float = 0.0                   # random erasing probability
    re_mode: str = "pixel"                 # const | rand | pixel
    re_count: int = 1


@dataclass
class OptimizerConfig:
    # timm's create_optimizer_v2: any name in timm.optim.list_optimizers() (sgd is Nesterov SGD,
    # momentum plain momentum SGD; adamw, lamb, lion, ...); no weight decay on biases, norms and
    # the model's no_weight_decay() parameters.
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: Optional[list] = None           # adam family: [beta1, beta2] (default: the optimizer's)
    eps: Optional[float] = None            # default: the optimizer's
    layer_decay: Optional[float] = None    # layer-wise lr decay (timm models with a group_matcher; ViT fine-tuning: 0.65)


@dataclass
class ScheduleConfig:
    # timm's create_scheduler_v2, stepped after every optimizer update (plateau: every epoch, on
    # the validation top-1)
    name: str = "multistep"                # cosine | multistep | step | plateau | tanh | poly | constant | none
    decay_milestones: list = field(default_factory=list)  # multistep: epochs at which lr is multiplied by decay_rate
    decay_epochs: Optional[float] = None   # step: every this many epochs
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5                # lr at the start of the warm-up
    min_lr: float = 0.0                    # cosine / tanh / poly / plateau floor
    patience_epochs: int = 10              # plateau


@dataclass
class MixupConfig:
    # timm's Mixup (mixup / cutmix, with train.label_smoothing) and SoftTargetCrossEntropy; on
    # when mixup_alpha or cutmix_alpha is above 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: Optional[list] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"                    # batch | pair | elem
    off_epoch: Optional[int] = None        # timm's mixup_off_epoch: no mixing once this many epochs are done


@dataclass
class EmaConfig:
    # timm's ModelEmaV3 of the converted model, updated every optimizer step, evaluated every
    # epoch on the validation split and folded at the end; the better of model and EMA on
    # validation is exported
    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = False                   # timm's use_warmup: the decay ramps up early in training


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
    channels_last: bool = False            # the model and its inputs in channels_last memory format
    grad_checkpointing: bool = False       # timm's set_grad_checkpointing (dropped branches are still skipped)
    log_with: list = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive; csv (sdsurgery's)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    stochastic_depth: StochasticDepthConfig = field(default_factory=StochasticDepthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    paper: dict = field(default_factory=dict)  # what the paper reports for this setting

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("data", "dataset"): ("cifar10", "cifar100", "svhn", "digits", "fake", "imagefolder"),
    ("data", "normalize"): ("dataset", "model"),
    ("data", "transforms"): ("dataset", "timm"),
    ("data", "interpolation"): ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"),
    ("data", "re_mode"): ("const", "rand", "pixel"),
    ("optimizer", "name"): lambda: _timm_optimizers(),
    ("schedule", "name"): ("cosine", "multistep", "step", "plateau", "tanh", "poly", "constant", "none"),
    ("mixup", "mode"): ("batch", "pair", "elem"),
    ("stochastic_depth", "schedule"): ("linear", "uniform"),
    ("stochastic_depth", "mode"): ("block", "sample"),
    ("stochastic_depth", "scaling"): ("expectation", "inverted"),
    ("train", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
    # accelerate's DynamoBackend names (its TorchDynamoPlugin takes them)
    ("train", "compile_backend"): ("inductor", "eager", "aot_eager", "cudagraphs", "onnxrt", "tensorrt",
                                   "tvm", "ofi", "fx2trt", "aot_ts_nvfuser", "nvprims_nvfuser"),
}


# accelerate's tracker names (LoggerType), and sdsurgery's own csv tracker
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio",
            "csv")

# keys that were renamed or removed: what to write instead
_RENAMED = {
    ("optimizer", "nesterov"): "optimizer.name picks it (timm's names): sgd is Nesterov SGD, momentum is "
                               "plain momentum SGD",
    ("schedule", "milestones"): "it is schedule.decay_milestones now (timm's name), with schedule.name: multistep",
    ("schedule", "gamma"): "it is schedule.decay_rate now (timm's name)",
}


def _timm_optimizers() -> tuple[str, ...]:
    from timm.optim import list_optimizers
    return tuple(list_optimizers())


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
    ("optimizer", "eps"): (0, None, False, True),
    ("optimizer", "layer_decay"): (0, 1, False, True),
    ("data", "crop_pct"): (0, 1, False, True),
    ("data", "hflip"): (0, 1, True, True),
    ("data", "vflip"): (0, 1, True, True),
    ("data", "color_jitter"): (0, None, True, True),
    ("data", "re_prob"): (0, 1, True, True),
    ("data", "re_count"): (1, None, True, True),
    ("schedule", "decay_rate"): (0, None, False, True),
    ("schedule", "decay_epochs"): (0, None, False, True),
    ("schedule", "warmup_lr"): (0, None, True, True),
    ("schedule", "min_lr"): (0, None, True, True),
    ("schedule", "patience_epochs"): (0, None, True, True),
    ("mixup", "mixup_alpha"): (0, None, True, True),
    ("mixup", "cutmix_alpha"): (0, None, True, True),
    ("mixup", "prob"): (0, 1, True, True),
    ("mixup", "switch_prob"): (0, 1, True, True),
    ("mixup", "off_epoch"): (1, None, True, True),
    ("ema", "decay"): (0, 1, False, False),
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


# (section, key): (length, lowest, highest): a list of numbers in [lowest, highest]
_PAIRS = {
    ("data", "scale"): (2, 0, 1),
    ("data", "ratio"): (2, 0, None),
    ("optimizer", "betas"): (2, 0, 1),
    ("mixup", "cutmix_minmax"): (2, 0, 1),
}


def _check_pair(where: str, value: list, spec: tuple) -> None:
    n, lo, hi = spec
    numbers = all(not isinstance(v, bool) and isinstance(v, (int, float)) for v in value)
    if len(value) != n or not numbers or not all(lo <= v and (hi is None or v <= hi) for v in value):
        within = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise RecipeError(f"{where} must be {n} numbers {within}, got {value!r}")


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
        if (section, key) in _RENAMED:
            raise RecipeError(f"recipe key {where!r} is gone: {_RENAMED[(section, key)]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown recipe key {where!r}{hint}; valid keys"
                              f"{' in ' + path if path else ''}: {', '.join(names)}")
        tp = hints[key]
        allowed = _CHOICES.get((section, key))
        if callable(allowed):
            allowed = allowed()
        if isinstance(value, bool) and allowed and ("no" if value is False else "yes") in allowed:
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as false
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, where)
        else:
            kwargs[key] = _check_type(where, value, tp)
            if allowed and kwargs[key] is not None and kwargs[key] not in allowed:
                if len(allowed) > 12:
                    close = difflib.get_close_matches(str(kwargs[key]), allowed, n=3)
                    raise RecipeError(f"{where} {kwargs[key]!r} is not one of the {len(allowed)} choices"
                                      + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                                      + (" (timm.optim.list_optimizers() lists them)" if key == "name" else ""))
                raise RecipeError(f"{where} must be one of {', '.join(allowed)}, got {kwargs[key]!r}")
            if (section, key) in _RANGES and kwargs[key] is not None:
                _check_range(where, kwargs[key], _RANGES[(section, key)])
            if (section, key) in (("schedule", "decay_milestones"), ("data", "mean"), ("data", "std")) \
                    and kwargs[key] is not None:
                _check_list(where, kwargs[key], positive=key == "std")
            if (section, key) in _PAIRS and kwargs[key] is not None:
                _check_pair(where, kwargs[key], _PAIRS[(section, key)])
            if (section, key) == ("train", "log_with"):
                for name in kwargs[key]:
                    if name not in TRACKERS:
                        raise RecipeError(f"{where} must list trackers among {', '.join(TRACKERS)}, "
                                          f"got {name!r}")
    return cls(**kwargs)


_TIMM_ONLY = ("crop_pct", "scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "re_prob",
              "re_mode", "re_count")


def _check_together(r: Recipe) -> None:
    """What one key alone cannot say: keys that need another's value."""
    defaults = DataConfig()
    if r.data.transforms == "dataset":
        for key in _TIMM_ONLY:
            if getattr(r.data, key) != getattr(defaults, key):
                raise RecipeError(f"data.{key} is an option of timm's transforms; set data.transforms: timm "
                                  f"(or drop data.{key})")
    mix = r.mixup
    if (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0 or mix.cutmix_minmax) and r.train.batch_size % 2:
        raise RecipeError(f"mixup / cutmix mix the batch with its reverse and need an even "
                          f"train.batch_size, got {r.train.batch_size}")
    if r.optimizer.layer_decay is not None and r.schedule.name == "none":
        raise RecipeError("optimizer.layer_decay is applied by the schedule (timm's lr_scale); with "
                          "schedule.name: none it would do nothing: use schedule.name: constant")
    if r.schedule.name == "plateau" and not r.data.val_split:
        raise RecipeError("schedule.name: plateau follows the validation top-1; set data.val_split "
                          "(e.g. 10% of the training images)")


def parse_recipe(data: dict) -> Recipe:
    recipe = _build(Recipe, data or {}, "")
    _check_together(recipe)
    return recipe


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
