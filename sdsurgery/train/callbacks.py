"""Things the training loop does at fixed points of every step, each in one object.

The loop calls ``before_batch(epoch, step, micro)`` on each callback before every micro-batch
(``step``: optimizer steps done this epoch; ``micro``: the micro-batch's index in the epoch).
Stochastic depth's own schedule lives here rather than inside the loop.
"""
from __future__ import annotations

import torch.nn as nn

from ..gate.gates import GateController
from ..gate.surgery import controller, set_drop_rate

__all__ = ["Callback", "DropRateWarmup", "OneDrawPerStep", "stochastic_depth_callbacks"]


class Callback:
    """A no-op callback; subclasses override what they need."""

    def before_batch(self, epoch: int, step: int, micro: int) -> None:
        pass


class DropRateWarmup(Callback):
    """Ramp the drop rate linearly from 0 to ``target`` over ``epochs`` (fractional) epochs,
    as a function of the global optimizer step, so any number of processes and any
    ``grad_accum`` with the same global batch see the same rates."""

    def __init__(self, model: nn.Module, target: float, epochs: float, steps_per_epoch: int):
        self.model, self.target, self.epochs, self.steps_per_epoch = model, target, epochs, steps_per_epoch

    def before_batch(self, epoch: int, step: int, micro: int) -> None:
        frac = min(1.0, (epoch + step / self.steps_per_epoch) / self.epochs)
        set_drop_rate(self.model, self.target * frac)


class OneDrawPerStep(Callback):
    """With gradient accumulation, every micro-batch of one optimizer step replays the same gate
    draws: one decision per optimizer step, as for one large batch (and as data-parallel ranks
    share theirs)."""

    def __init__(self, ctrl: GateController, grad_accum: int):
        self.ctrl, self.grad_accum = ctrl, grad_accum
        self.draws = None

    def before_batch(self, epoch: int, step: int, micro: int) -> None:
        if micro % self.grad_accum == 0:
            self.draws = self.ctrl.generator.get_state()
        else:
            self.ctrl.generator.set_state(self.draws)


def stochastic_depth_callbacks(recipe, model: nn.Module, steps_per_epoch: int) -> list[Callback]:
    """Stochastic depth's per-step schedule for a run of ``recipe`` on the converted ``model``:
    the drop-rate warm-up, one draw per optimizer step."""
    t, sd = recipe.train, recipe.stochastic_depth
    if not sd.enabled:
        return []
    out: list[Callback] = []
    if sd.warmup_epochs > 0:
        out.append(DropRateWarmup(model, sd.drop_rate, sd.warmup_epochs, steps_per_epoch))
    if t.grad_accum > 1:
        out.append(OneDrawPerStep(controller(model), t.grad_accum))
    return out
