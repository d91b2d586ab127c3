"""Training-step timing, several models side by side in one process.

Machines are noisy, so variants are interleaved step by step and compared by their medians:
ratios measured this way hold even when absolute times drift.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn


def time_train_steps(variants: dict[str, nn.Module], make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     steps: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per SGD training step (forward, cross-entropy, backward, update) of each
    variant, measured round-robin: step i of every variant runs before step i+1 of any."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
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


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
