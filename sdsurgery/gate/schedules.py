"""How a drop rate is spread over the residual branches of a network."""
from __future__ import annotations

from typing import Callable, Sequence, Union

__all__ = ["Schedule", "SCHEDULES", "check_rate", "spread", "rescale"]

Schedule = Union[str, Sequence[float], Callable[[int, int], float]]
SCHEDULES = ("linear", "uniform")


def check_rate(drop_rate: float, name: str = "drop_rate") -> float:
    try:
        rate = float(drop_rate)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {drop_rate!r}") from None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the drop probability of the deepest "
                         f"branch), got {drop_rate!r}")
    return rate


def spread(schedule: Schedule, drop_rate: float, count: int) -> list[float]:
    """Drop probability of each of ``count`` branches, in depth order.

    * ``"linear"``: branch ``l`` of ``L`` (1-based) drops with ``l / L * drop_rate``, as in the
      paper (the deepest branch gets ``drop_rate``, the first one a little more than 0).
    * ``"uniform"``: every branch drops with ``drop_rate``.
    * a sequence of ``count`` probabilities: used as given (``drop_rate`` is then ignored).
    * a callable ``f(l, L) -> p`` with ``l`` 1-based: e.g. ``lambda l, L: 0.5 * l / L``.
    """
    rate = check_rate(drop_rate)
    if isinstance(schedule, str):
        if schedule == "linear":
            probs = [rate * l / count for l in range(1, count + 1)]
        elif schedule == "uniform":
            probs = [rate] * count
        else:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, a "
                             f"sequence of {count} probabilities or a callable (l, L) -> p; "
                             f"got {schedule!r}")
    elif callable(schedule):
        probs = [schedule(l, count) for l in range(1, count + 1)]
    else:
        try:
            probs = list(schedule)
        except TypeError:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, a "
                             f"sequence of {count} probabilities or a callable (l, L) -> p; "
                             f"got {schedule!r}") from None
        if len(probs) != count:
            raise ValueError(f"schedule has {len(probs)} probabilities but the model has {count} "
                             f"residual branches; give exactly {count}")
    return [check_rate(p, f"schedule[{i}]") for i, p in enumerate(probs)]


def rescale(probs: Sequence[float], drop_rate: float) -> list[float]:
    """Scale custom probabilities so that the largest becomes ``drop_rate``."""
    rate = check_rate(drop_rate)
    top = max(probs, default=0.0)
    if top == 0.0:
        if rate > 0.0:
            raise ValueError("the custom schedule is all zeros, so it cannot be re-spread to "
                             f"drop_rate={drop_rate}; convert again with a new schedule")
        return list(probs)
    return [check_rate(p * rate / top, "drop_rate") for p in probs]
