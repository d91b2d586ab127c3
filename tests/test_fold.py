"""fold: the original architecture, the converted model's eval function, no gates left."""
import re

import pytest
import torch
import torch.nn as nn

import sdsurgery
from conftest import built


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fold_reproduces_the_converted_eval_output(case):
    model = built(case)
    converted = sdsurgery.convert(model, drop_rate=0.5).eval()
    folded = sdsurgery.fold(converted).eval()
    x = torch.randn(case.input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = converted(x)
        got = folded(x)
        original = model(x)
    assert _rel(got, expected) <= 1e-5
    assert _rel(original, expected) > 1e-3  # the scaling is real: folding had work to do
    # the plain original architecture: same class, no gates, no rewritten forwards
    assert type(folded) is type(model)
    assert not sdsurgery.is_converted(folded)
    assert not any("forward" in m.__dict__ for m in folded.modules())
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in model.named_modules()]
    # its state_dict loads strictly into a freshly built model of the original architecture
    fresh = case.build().eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(fresh(x), expected) <= 1e-5
    # and the converted model was not touched (fold works on a copy by default)
    with torch.no_grad():
        assert torch.equal(converted(x), expected)


def test_inverted_scaling_folds_to_the_unchanged_weights():
    from models import CustomNet
    model = CustomNet()
    folded = sdsurgery.fold(sdsurgery.convert(model, scaling="inverted"))
    for (k, a), b in zip(model.state_dict().items(), folded.state_dict().values()):
        assert torch.equal(a, b), k


class _GeluBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.fc(x))


class _SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))  # SE after the last norm
        return x + y


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


@pytest.mark.parametrize("model_cls, inputs, reason", [
    (_GeluBranch, (3, 8), "function gelu|module 'act'"),
    (_SqueezeExcite, (2, 4, 6, 6), "squeeze-excite"),
    (_Tied, (3, 8), "shared with another layer"),
])
def test_unfoldable_branches_are_named_and_can_keep_a_scale(model_cls, inputs, reason):
    model = model_cls().eval()
    residuals = sdsurgery.find_residuals(model)
    blocked = [r for r in residuals if r.fold_target is None]
    assert blocked and all(r.fold_blocker for r in blocked)
    converted = sdsurgery.convert(model, drop_rate=0.5).eval()
    with pytest.raises(sdsurgery.FoldError, match=f"cannot fold branch '{blocked[0].name}'.*keep_scale=True"):
        sdsurgery.fold(converted)
    assert any(re.search(reason, r.fold_blocker) for r in blocked), [r.fold_blocker for r in blocked]
    kept = sdsurgery.fold(converted, keep_scale=True).eval()
    x = torch.randn(*inputs)
    with torch.no_grad():
        assert _rel(kept(x), converted(x)) <= 1e-5
    left = sdsurgery.gates(kept)
    assert {g.name for g in left} >= {r.name for r in blocked}
    assert all(g.frozen for g in left if g.name in {r.name for r in blocked})


def test_fold_inplace_and_drop_rate_zero():
    from models import CustomNet
    model = CustomNet().eval()
    converted = sdsurgery.convert(model, drop_rate=0.0)
    folded = sdsurgery.fold(converted, inplace=True)
    assert folded is converted and not sdsurgery.is_converted(folded)
    for (k, a), b in zip(model.state_dict().items(), folded.state_dict().values()):
        assert torch.equal(a, b), k


class _RmsSandwich(nn.Module):
    """Branches ending in an RMSNorm (Gemma's sandwich norms): torch's and timm's."""

    def __init__(self, c=8):
        super().__init__()
        from timm.layers import RmsNorm
        self.f1, self.n1 = nn.Linear(c, c), nn.RMSNorm(c)
        self.f2, self.n2 = nn.Linear(c, c), RmsNorm(c)

    def forward(self, x):
        x = x + self.n1(self.f1(x))
        return x + self.n2(self.f2(x))


def test_branches_ending_in_rms_norm_fold_into_its_weight():
    model = _RmsSandwich().eval()
    with torch.no_grad():
        for n in (model.n1, model.n2):
            n.weight.uniform_(0.5, 1.5)
    assert [r.fold_target for r in sdsurgery.find_residuals(model)] == ["n1", "n2"]
    converted = sdsurgery.convert(model, drop_rate=0.5).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert _rel(sdsurgery.fold(converted)(x), converted(x)) <= 1e-5


class _FunctionalLinear(nn.Module):
    """Branches ending in ``F.linear`` and ``torch.addmm`` (GPT-2's Conv1D): builtins without a
    Python signature, read through their documented ones."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
        self.w2, self.b2 = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = x + torch.nn.functional.linear(torch.relu(x), self.w, self.b)
        return x + torch.addmm(self.b2, torch.tanh(x), self.w2)


def test_branches_ending_in_functional_linear_and_addmm_fold_into_their_parameters():
    model = _FunctionalLinear().eval()
    targets = [(r.fold_target, r.fold_params) for r in sdsurgery.find_residuals(model)]
    assert targets == [("w", ("w", "b")), ("b2", ("b2", "w2"))]
    conv = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform").eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        folded = sdsurgery.fold(conv)
        torch.testing.assert_close(folded(x), conv(x))
        torch.testing.assert_close(folded.w, model.w * 0.5)
        torch.testing.assert_close(folded.w2, model.w2 * 0.5)
