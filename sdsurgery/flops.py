"""How much compute each gated branch holds, and what stochastic depth saves in expectation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .gate.gates import installed_gates

__all__ = ["FlopReport", "flop_report"]


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass (matmuls, convolutions, attention; as torch counts them).

    ``branches`` maps gate names to the FLOPs of their branch; ``expected_fraction`` is the
    expected share of the full model's compute a training step performs with the gates'
    current drop probabilities (the theoretical training-time ratio, compute-bound).
    """

    total: int
    branches: dict[str, int]
    expected_fraction: float


def flop_report(model: nn.Module, example: torch.Tensor) -> FlopReport:
    """Count the FLOPs of a converted ``model`` on ``example``, branch by branch (eval mode, so
    every branch runs)."""
    gates = installed_gates(model)
    counts: dict[str, int] = {}
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        def pre(gate, _args):
            counts[gate.name] = -counter.get_total_flops()

        def post(gate, _args, _out):
            counts[gate.name] += counter.get_total_flops()

        handles = [h for g in gates for h in (g.register_forward_pre_hook(pre),
                                                g.register_forward_hook(post))]
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    total = counter.get_total_flops()
    saved = sum(g.drop_prob * counts.get(g.name, 0) for g in gates)
    return FlopReport(total=total, branches=counts,
                      expected_fraction=(total - saved) / total if total else 1.0)
