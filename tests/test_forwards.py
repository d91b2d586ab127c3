"""Forwards written the way other libraries write them: decorated, with ``**kwargs``.

Each model is converted and trained a few steps; module calls are counted to prove dropped
branches are skipped (not computed and masked), and the folded model is checked exact.
"""
import functools

import pytest
import torch
import torch.nn as nn

import sdsurgery


def passthrough(f):
    """A decorator as transformers 5 writes them (``can_return_tuple``, ``check_model_inputs``)."""
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return f(self, *args, **kwargs)
    return wrapper


class DecoratedRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    @passthrough
    def forward(self, x, **kwargs):
        return x + self.fc(x)


class DecoratedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    @passthrough
    def forward(self, x, scale: float = 1.0, **kwargs):
        return x + self.fc(x) * scale


class KwargsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, *args, **kwargs):
        return x + self.fc(x)


def _linear_calls(model: nn.Module, steps: int = 30) -> tuple[int, int]:
    calls = []
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        m.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    for _ in range(steps):
        model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    return len(calls), steps * len(linears)


@pytest.mark.parametrize("make", [DecoratedRoot, lambda: nn.Sequential(DecoratedBlock(), DecoratedBlock()),
                                  lambda: nn.Sequential(KwargsBlock(), KwargsBlock())],
                         ids=["decorated-root", "decorated-blocks", "kwargs-blocks"])
def test_decorated_and_kwargs_forwards_are_gated_and_skip(make):
    model = make().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
    residuals = sdsurgery.find_residuals(model)
    assert len(residuals) == len([m for m in model.modules() if isinstance(m, nn.Linear)])
    conv = sdsurgery.convert(model, drop_rate=0.9, schedule="uniform", seed=0)
    assert not any(g.masked for g in sdsurgery.gates(conv))
    assert type(conv) is type(model)
    with torch.no_grad():
        conv.eval()
        torch.testing.assert_close(sdsurgery.fold(conv)(x), conv(x))
        sdsurgery.set_drop_rate(conv, 0.0)
        torch.testing.assert_close(conv(x), ref)
    sdsurgery.set_drop_rate(conv, 0.9)
    ran, total = _linear_calls(conv)
    assert ran < 0.3 * total, (ran, total)  # ~10% kept: dropped branches are not computed
