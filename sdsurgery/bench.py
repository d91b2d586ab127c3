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

from ._compat import compiler_backend
from .flops import flop_report
from .fold import fold
from .gate.gates import installed_gates, is_converted
from .gate.surgery import convert

__all__ = ["time_train_steps", "forced_drop_prob", "CountingBackend", "peak_memory_bytes", "time_eval",
           "median", "quartiles", "saved_activation_bytes", "saved_theory", "DTYPES", "BenchResult", "run_bench"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


def time_train_steps(variants: dict[str, nn.Module], make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     steps: int = 20, warmup: int = 3,
                     warmup_s: dict[str, float] | None = None,
                     warm_context: Callable[[str, int], contextlib.AbstractContextManager] | None = None
                     ) -> dict[str, list[float]]:
    """Seconds per SGD training step (forward, cross-entropy, backward, update) of each
    variant, measured round-robin: step i of every variant runs before step i+1 of any. The
    warm-up steps' total per variant goes into ``warmup_s`` (compile time, for compiled ones);
    warm-up step ``i`` of variant ``name`` runs inside ``warm_context(name, i)`` if given."""
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
            ctx = warm_context(name, i) if warm_context is not None and i < warmup else contextlib.nullcontext()
            _sync(x)
            t0 = time.perf_counter()
            with ctx:
                opts[name].zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opts[name].step()
            _sync(x)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            elif warmup_s is not None:
                warmup_s[name] += time.perf_counter() - t0
    return times


@contextlib.contextmanager
def forced_drop_prob(model: nn.Module, p: float):
    """Every gate of a converted ``model`` at drop probability ``p`` for the duration (0: all
    kept, 1: all dropped in training): a compiled model's warm-up then meets both paths of
    every gate, whatever the schedule."""
    gates = installed_gates(model)
    before = [g.drop_prob for g in gates]
    for g in gates:
        g.drop_prob = p
    try:
        yield
    finally:
        for g, q in zip(gates, before):
            g.drop_prob = q


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it, then compiles them with
    the backend named ``name``."""

    def __init__(self, name: str):
        self.name, self.backend, self.graphs = name, compiler_backend(name), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def peak_memory_bytes(model: nn.Module, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """CUDA memory a training step needs above what was allocated before it (peak of
    ``torch.cuda.max_memory_allocated``); None off CUDA."""
    x, y = make_batch()
    if not x.is_cuda:
        return None
    torch.cuda.synchronize(x.device)
    base = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device) - base
    model.zero_grad(set_to_none=True)
    return float(peak)


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


def _saved_storages(model: nn.Module, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                    current: list[str] | None = None) -> tuple[dict[int, int], dict[int, str]]:
    """One training step (forward, cross-entropy, backward): the storages of the tensors
    autograd saved (``torch.autograd.graph.saved_tensors_hooks``), bytes by storage, each once,
    parameters left out; with ``current`` (a stack of gate names kept by the caller's hooks),
    also the gate inside whose call each storage was first saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    owner: dict[int, str] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in storages:
            storages[ptr] = t.untyped_storage().nbytes()
            if current:
                owner[ptr] = current[-1]
        return t

    x, y = make_batch()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return storages, owner


def saved_activation_bytes(model: nn.Module, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                           steps: int = 1) -> float:
    """Bytes a training step keeps for backward, exactly (no allocator noise): the storages
    of the tensors autograd saves, each once, parameters left out (:func:`_saved_storages`);
    the mean over ``steps`` forward/backward passes (a stochastic-depth model saves less when
    it drops more)."""
    return sum(sum(_saved_storages(model, make_batch)[0].values()) for _ in range(steps)) / steps


def saved_theory(model: nn.Module, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The expected fraction of the activations a training step keeps for backward, from the
    gates' drop probabilities and what each branch keeps when it runs (one step with every
    branch on): ``1 - sum(p_l * branch_l) / total`` (the analogue of the FLOPs theory)."""
    gates = installed_gates(model)
    current: list[str] = []

    def enter(gate: nn.Module, args: tuple) -> None:
        current.append(gate.name)

    def leave(gate: nn.Module, args: tuple, out: torch.Tensor) -> None:
        current.pop()

    handles = [h for g in gates for h in (g.register_forward_pre_hook(enter), g.register_forward_hook(leave))]
    try:
        with forced_drop_prob(model, 0.0):
            storages, owner = _saved_storages(model, make_batch, current)
    finally:
        for h in handles:
            h.remove()
    total = sum(storages.values())
    branch = {g.name: 0 for g in gates}
    for ptr, name in owner.items():
        branch[name] += storages[ptr]
    return 1.0 - sum(g.drop_prob * branch[g.name] for g in gates) / total if total else 1.0


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
    saved_theory: float = 1.0  # expected saved-activation fraction from per-branch bytes
    peak_mb: dict[str, float] = field(default_factory=dict)  # CUDA: a training step's peak
    compile: str | None = None  # torch.compile backend the training steps ran under
    channels_last: bool = False
    warmup_s: dict[str, float] = field(default_factory=dict)  # warm-up steps (compiling)
    graphs: dict[str, int] = field(default_factory=dict)  # compiled during warm-up
    graphs_after_warmup: dict[str, int] = field(default_factory=dict)  # recompiles: should be 0
    eval_ms: dict[str, float] = field(default_factory=dict)
    eval_ratio: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _variants(build: Callable[..., nn.Module], native: tuple[str, float] | None, drop_rate: float,
              mode: str, seed: int, dev: torch.device, compiled: bool,
              notes: list[str]) -> tuple[dict[str, nn.Module], str]:
    torch.manual_seed(seed)
    original = build().to(dev)
    # A/A: a second copy of the original, timed like the others: its ratio is the noise
    variants: dict[str, nn.Module] = {"original": original, "original (A/A copy)": copy.deepcopy(original)}
    variants["sdsurgery p=0"] = convert(original, drop_rate=0.0, seed=seed)
    label = f"sdsurgery {mode} {drop_rate:g}"
    variants[label] = convert(original, drop_rate=drop_rate, mode=mode, seed=seed)
    if native is not None:
        kw, rate = native
        try:
            variants[f"{kw}={rate:g}"] = build(**{kw: rate}).to(dev)
        except Exception as e:  # the architecture has no such argument
            notes.append(f"{kw} not supported by this architecture ({type(e).__name__})")
    if compiled:  # the converted model uncompiled beside the compiled ones
        variants[f"{label} (eager)"] = copy.deepcopy(variants[label])
    return variants, label


def run_bench(build: Callable[..., nn.Module], *, name: str, native: tuple[str, float] | None,
              drop_rate: float = 0.5, mode: str = "block", batch_size: int = 16,
              image_size: int = 64, steps: int = 20, warmup: int = 3, device: str = "cpu",
              dtype: str = "fp32", num_classes: int = 10, seed: int = 0,
              compile: str | None = None, channels_last: bool = False) -> BenchResult:
    """Time training steps of the original model, the converted one at ``drop_rate`` and at 0
    (gate overhead), and the architecture's own drop-path (``native = (kwarg, rate)``, e.g.
    ``("drop_path_rate", 0.5)``) when it has one; then eval of the folded model against the
    original. ``build(**kwargs)`` returns a fresh randomly initialised model. With ``compile``
    (a torch.compile backend name) every variant's training steps run compiled, beside the
    converted model eager; its first two warm-up steps keep, then drop, every branch."""
    dev = torch.device(device)
    notes: list[str] = []
    variants, label = _variants(build, native, drop_rate, mode, seed, dev, bool(compile), notes)
    theory = flop_report(variants[label], torch.randn(1, 3, image_size, image_size, device=dev)).expected_fraction
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in variants.values():
        m.to(memory_format=fmt)
    backends = {k: CountingBackend(compile) for k in variants if compile and not k.endswith("(eager)")}
    timed = {k: torch.compile(m, backend=backends[k]) if k in backends else m for k, m in variants.items()}
    autocast = (torch.autocast(device_type=dev.type, dtype=DTYPES[dtype]) if DTYPES[dtype] is not None
                else contextlib.nullcontext())

    def batch():
        return (torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=fmt),
                torch.randint(0, num_classes, (batch_size,), device=dev))

    def warm_context(k: str, i: int):
        forced = k in backends and i < 2 and is_converted(variants[k])
        return forced_drop_prob(variants[k], float(i)) if forced else contextlib.nullcontext()

    warm: dict[str, float] = {}
    with autocast:
        time_train_steps(timed, batch, steps=0, warmup=warmup, warmup_s=warm, warm_context=warm_context)
        graphs = {k: b.graphs for k, b in backends.items()}
        train = time_train_steps(timed, batch, steps=steps, warmup=0)
        after = {k: b.graphs - graphs[k] for k, b in backends.items()}
        torch.manual_seed(seed + 1)
        saved = {k: saved_activation_bytes(m, batch, steps=min(steps, 8)) for k, m in variants.items()}
        theory_saved = saved_theory(variants[label], batch)
        peak = {k: peak_memory_bytes(m, batch) for k, m in timed.items()}
        folded = fold(variants[label])
        evals = time_eval({"original": variants["original"], "folded": folded},
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
        saved_ratio={k: b / saved["original"] for k, b in saved.items()}, saved_theory=theory_saved,
        peak_mb={k: b / 2**20 for k, b in peak.items() if b is not None},
        compile=compile, channels_last=channels_last, warmup_s=warm, graphs=graphs,
        graphs_after_warmup=after,
        eval_ms={k: median(v) * 1e3 for k, v in evals.items()},
        eval_ratio={k: median(v) / ebase for k, v in evals.items()},
        versions=_versions(dev), notes=notes)


def _versions(dev: torch.device) -> dict[str, str]:
    import platform

    import timm
    import torchvision

    from .version import __version__

    out = {"sdsurgery": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "python": platform.python_version(),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out
