"""User registries: shortcut ops, foldable layers, drop-path modules, residual rules.

Each test builds a model sdsurgery cannot handle with its closed tables, checks that it
indeed does not, registers the missing piece, and checks the result changes as it should
(found / folded / neutralised / rejected with the user's code). Registrations are undone.
"""
import importlib

import pytest
import torch
import torch.nn as nn

import sdsurgery
from sdsurgery import ops
from sdsurgery.find import rules

fold_module = importlib.import_module("sdsurgery.fold")  # sdsurgery.fold is also the function


@pytest.fixture
def restore_registries():
    saved = (dict(ops._USER_MODULE_ROLES), dict(ops._USER_FUNCTION_ROLES), dict(ops._USER_METHOD_ROLES),
             dict(ops._DROP_MODULES), dict(fold_module._USER_AFFINE), dict(rules.RULES))
    yield
    for table, old in zip((ops._USER_MODULE_ROLES, ops._USER_FUNCTION_ROLES, ops._USER_METHOD_ROLES,
                           ops._DROP_MODULES, fold_module._USER_AFFINE, rules.RULES), saved):
        table.clear()
        table.update(old)


class MyNorm(nn.Module):
    """A norm sdsurgery does not know: x / rms(x) * gamma."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma


class ProjBlock(nn.Module):
    """A projection shortcut through MyNorm, a branch ending in MyNorm."""

    def __init__(self):
        super().__init__()
        self.short = MyNorm(8)
        self.fc = nn.Linear(8, 8)
        self.norm = MyNorm(8)

    def forward(self, x):
        return self.short(x) + self.norm(torch.relu(self.fc(x)))


class RandomSkip(nn.Module):
    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = (torch.rand(x.shape[0], 1) >= self.rate).to(x.dtype)
        return x * keep / (1 - self.rate)


class DropBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = RandomSkip(0.3)

    def forward(self, x):
        return x + self.drop(self.fc(x))


def test_a_registered_shortcut_module_makes_a_projection_shortcut(restore_registries):
    m = ProjBlock().eval()
    leaves = [MyNorm]  # a leaf, as a library layer fx cannot trace would be
    assert sdsurgery.find_residuals(m, leaf_modules=leaves) == []
    sdsurgery.register_shortcut_op(MyNorm, role="projection")
    r, = sdsurgery.find_residuals(m, leaf_modules=leaves)
    assert r.shortcut == "projection" and r.shortcut_modules == ("short",) and r.modules == ("fc", "norm")


def test_registered_method_and_function_roles(restore_registries):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.tanh(x).sigmoid() + self.fc2(torch.relu(self.fc1(x)))

    an = sdsurgery.analyse(M())
    assert an.residuals == [] and "passes through method .sigmoid()" in an.rejected[0].reason, an.rejected
    sdsurgery.register_shortcut_op("sigmoid", role="projection")
    assert "tanh" in sdsurgery.analyse(M()).rejected[0].reason  # one step further
    sdsurgery.register_shortcut_op(torch.tanh, role="projection")
    r, = sdsurgery.find_residuals(M())
    assert r.modules == ("fc1", "fc2") and r.shortcut == "projection"
    with pytest.raises(ValueError, match="role must be one of"):
        sdsurgery.register_shortcut_op(torch.tanh, role="shortcut")
    with pytest.raises(TypeError, match="nn.Module subclass, a function or a method name"):
        sdsurgery.register_shortcut_op(3)


def test_a_registered_foldable_layer_folds_exactly(restore_registries):
    m = ProjBlock().eval()
    leaves = [MyNorm]  # a leaf, as a library layer fx cannot trace would be
    sdsurgery.register_shortcut_op(MyNorm)
    r, = sdsurgery.find_residuals(m, leaf_modules=leaves)
    assert r.fold_target is None and "opaque" in r.fold_blocker
    sdsurgery.register_foldable(MyNorm, params=("gamma",))
    r, = sdsurgery.find_residuals(m, leaf_modules=leaves)
    assert (r.fold_target, r.fold_params) == ("norm", ("norm.gamma",))
    conv = sdsurgery.convert(m, drop_rate=0.4, leaf_modules=leaves).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = conv(x)
        folded = sdsurgery.fold(conv)
        assert type(folded) is ProjBlock and not sdsurgery.is_converted(folded)
        torch.testing.assert_close(folded(x), ref)
        assert torch.allclose(folded.norm.gamma, m.norm.gamma * (1 - 0.4))
    with pytest.raises(TypeError, match="params must be attribute names"):
        sdsurgery.register_foldable(MyNorm, params="gamma")


def test_a_registered_drop_module_is_neutralised(restore_registries):
    m = DropBlock()
    r, = sdsurgery.find_residuals(m)
    assert r.drop_modules == ()
    sdsurgery.register_drop_module(RandomSkip, attr="rate")
    r, = sdsurgery.find_residuals(m)
    assert r.drop_modules == ("drop",) and r.fold_target == "fc"
    conv = sdsurgery.convert(m, drop_rate=0.5)
    assert conv.drop.rate == 0.0  # else the branch would be dropped twice
    with pytest.raises(TypeError, match="nn.Module subclass"):
        sdsurgery.register_drop_module(object)


def test_a_user_rule_rejects_with_its_code(restore_registries):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = x + self.a(x)
            return x + self.b(x)

    assert len(sdsurgery.find_residuals(Two())) == 2

    @rules.rule("no-b")
    def _no_b(facts, cand):
        return "b is not a block here" if any(n.target == "b" for n in cand.branch) else None

    an = sdsurgery.analyse(Two())
    assert [r.name for r in an.residuals] == ["a"]
    assert [(r.code, r.reason) for r in an.rejected] == [("no-b", "b is not a block here")]
    with pytest.raises(ValueError, match="taken by the structural checks"):
        rules.rule("shortcut-op")


class LibraryDropPath(nn.Module):
    """A drop-path module as other libraries write them (HF transformers' ConvNextDropPath):
    a plain function call fx would trace through (in eval it vanishes from the graph)."""

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob is None or self.drop_prob == 0.0 or not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1) >= self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


def test_drop_path_modules_of_other_libraries_are_recognised_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.dp1, self.dp2 = LibraryDropPath(0.2), LibraryDropPath(None)

        def forward(self, x):
            x = x + self.dp1(self.fc1(x))
            return x + self.dp2(self.fc2(x))

    assert ops.drop_attr(LibraryDropPath(0.1)) == "drop_prob" and ops.drop_attr(RandomSkip(0.1)) is None
    rs = sdsurgery.find_residuals(Net())
    assert [r.drop_modules for r in rs] == [("dp1",), ("dp2",)]
    conv = sdsurgery.convert(Net(), drop_rate=0.5)
    assert conv.dp1.drop_prob == 0.0 and conv.dp2.drop_prob is None  # nothing drops twice
    calls = []
    conv.fc1.register_forward_hook(lambda *a: calls.append(1))
    conv.train()
    for _ in range(40):
        conv(torch.randn(2, 8))
    assert 0 < len(calls) < 40  # the gate drops fc1's branch; it is skipped, not computed
    plain = sdsurgery.fold(conv)
    assert plain.dp1.drop_prob == 0.2  # restored
