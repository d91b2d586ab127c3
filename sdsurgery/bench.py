"""Training-step timing, several models side by side in one process.

Machines are noisy, so variants are interleaved step by step and compared by their medians:
ratios measured this way hold even when absolute times drift.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .flops import flop_report
from .fold import fold
from .gate.surgery import convert

__all__ = ["time_train_steps", "time_eval", "median", "quartiles", "saved_activation_bytes",
           "BenchResult", "run_bench"]


def time_train_steps(variants: dict[str, nn.Module], make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     steps: int = 20, warmup: int = 3,
                     warmup_s: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Seconds per SGD training step (forward, cross-entropy, backward, update) of each
    variant, measured round-robin: step i of every variant runs before step i+1 of any. The
    warm-up steps' total per variant goes into ``warmup_s`` (compile time, for compiled ones)."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    if warmup_s is not None:
        warmup_s.update(dict.fromkeys(variants, 0.0))
    loss_fn = nn.CrossEntropyLoss()
    for m in variants.values():
        m.train()
    for i in range(warmup + steps):
        x, y = make_batch()
        for name, model in variants.items():
            _sync(x)
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opts[name].step()
            _sync(x)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            elif warmup_s is not None:
                warmup_s[name] += time.perf_counter() - t0
    return times


def time_eval(variants: dict[str, nn.Module], x: torch.Tensor, steps: int = 20,
              warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per no-grad eval forward of each variant, round-robin."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for m in variants.values():
        m.eval()
    with torch.no_grad():
        for i in range(warmup + steps):
            for name, model in variants.items():
                _sync(x)
                t0 = time.perf_counter()
                model(x)
                _sync(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: list[float]) -> tuple[float, float]:
    """The first and third quartiles (the interquartile range's ends) of ``xs``."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def saved_activation_bytes(model: nn.Module, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                           steps: int = 1) -> float:
    """Bytes a training step keeps for backward, exactly (no allocator noise): the storages
    of the tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``), each once,
    parameters left out; the mean over ``steps`` forward/backward passes (a stochastic-depth
    model saves less when it drops more)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss_fn = nn.CrossEntropyLoss()
    total = 0
    model.train()
    for _ in range(steps):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        x, y = make_batch()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        total += sum(storages.values())
    return total / steps


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


# ------------------------------------------------------------------------ the full bench


@dataclass
class BenchResult:
    """What ``sdsurgery bench`` measures. Times in milliseconds (medians); ratios against the
    original model measured in the same run."""

    model: str
    device: str
    dtype: str
    batch_size: int
    image_size: int
    steps: int
    drop_rate: float
    mode: str
    theory: float  # expected training-compute fraction from per-branch FLOPs
    train_ms: dict[str, float] = field(default_factory=dict)
    train_iqr_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # quartiles
    train_ratio: dict[str, float] = field(default_factory=dict)
    saved_mb: dict[str, float] = field(default_factory=dict)  # activations kept for backward
    saved_ratio: dict[str, float] = field(default_factory=dict)
    compile: str | None = None  # torch.compile backend the training steps ran under
    channels_last: bool = False
    warmup_s: dict[str, float] = field(default_factory=dict)  # warm-up steps (compiling)
    eval_ms: dict[str, float] = field(default_factory=dict)
    eval_ratio: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_bench(build: Callable[..., nn.Module], *, name: str, native: tuple[str, float] | None,
              drop_rate: float = 0.5, mode: str = "block", batch_size: int = 16,
              image_size: int = 64, steps: int = 20, warmup: int = 3, device: str = "cpu",
              dtype: str = "fp32", num_classes: int = 10, seed: int = 0,
              compile: str | None = None, channels_last: bool = False) -> BenchResult:
    """Time training steps of the original model, the converted one at ``drop_rate`` and at 0
    (gate overhead), and the architecture's own drop-path (``native = (kwarg, rate)``, e.g.
    ``("drop_path_rate", 0.5)``) when it has one; then eval of the folded model against the
    original. ``build(**kwargs)`` returns a fresh randomly initialised model."""

    torch.manual_seed(seed)
    dev = torch.device(device)
    original = build().to(dev)
    # A/A: a second copy of the original, timed like the others: its ratio is the noise
    variants: dict[str, nn.Module] = {"original": original, "original (A/A copy)": copy.deepcopy(original)}
    variants["sdsurgery p=0"] = convert(original, drop_rate=0.0, seed=seed)
    label = f"sdsurgery {mode} {drop_rate:g}"
    variants[label] = convert(original, drop_rate=drop_rate, mode=mode, seed=seed)
    notes: list[str] = []
    if native is not None:
        kw, rate = native
        try:
            variants[f"{kw}={rate:g}"] = build(**{kw: rate}).to(dev)
        except Exception as e:  # the architecture has no such argument
            notes.append(f"{kw} not supported by this architecture ({type(e).__name__})")
    x0 = torch.randn(1, 3, image_size, image_size, device=dev)
    theory = flop_report(variants[label], x0).expected_fraction
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in variants.values():
        m.to(memory_format=fmt)
    # the training steps of every variant under torch.compile (backend ``compile``), if asked
    timed = {k: torch.compile(m, backend=compile) if compile else m for k, m in variants.items()}
    autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def batch():
        return (torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=fmt),
                torch.randint(0, num_classes, (batch_size,), device=dev))

    warm: dict[str, float] = {}
    with autocast:
        train = time_train_steps(timed, batch, steps=steps, warmup=warmup, warmup_s=warm)
        torch.manual_seed(seed + 1)
        saved = {k: saved_activation_bytes(m, batch, steps=min(steps, 8)) for k, m in variants.items()}
        folded = fold(variants[label])
        evals = time_eval({"original": original, "folded": folded},
                          torch.randn(batch_size, 3, image_size, image_size, device=dev),
                          steps=steps, warmup=warmup)
    base, ebase = median(train["original"]), median(evals["original"])
    return BenchResult(
        model=name, device=str(dev), dtype=dtype, batch_size=batch_size, image_size=image_size,
        steps=steps, drop_rate=drop_rate, mode=mode, theory=theory,
        train_ms={k: median(v) * 1e3 for k, v in train.items()},
        train_iqr_ms={k: tuple(q * 1e3 for q in quartiles(v)) for k, v in train.items()},
        train_ratio={k: median(v) / base for k, v in train.items()},
        saved_mb={k: b / 2**20 for k, b in saved.items()},
        saved_ratio={k: b / saved["original"] for k, b in saved.items()},
        compile=compile, channels_last=channels_last, warmup_s=warm,
        eval_ms={k: median(v) * 1e3 for k, v in evals.items()},
        eval_ratio={k: median(v) / ebase for k, v in evals.items()}, notes=notes)
