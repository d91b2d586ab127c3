"""Gates: dropped branches are not computed, decisions follow the gates' own generator."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import sdsurgery
from models import CustomNet


class AffineResNet(nn.Module):
    """BatchNorm-free, with affine branches: E[train output] equals the eval output exactly."""

    def __init__(self, width=6, depth=4):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        with torch.no_grad():
            for b in self.branches:
                b.weight.mul_(1.5)

    def forward(self, x):
        for b in self.branches:
            x = x + b(x)
        return x


def _count_calls(model, module_names):
    counts = dict.fromkeys(module_names, 0)
    named = dict(model.named_modules())

    def hook(name):
        def fn(*_):
            counts[name] += 1
        return fn

    for n in module_names:
        named[n].register_forward_hook(hook(n))
    return counts


def test_dropped_branches_are_not_called_and_follow_the_generator():
    model = torchvision.models.resnet18()
    converted = sdsurgery.convert(model, drop_rate=0.5, seed=11).train()
    gates = sdsurgery.gates(converted)
    residuals = sdsurgery.find_residuals(model)
    named = dict(model.named_modules())
    # BasicBlock calls its one ReLU inside the branch and after the add: watch the layers
    # with parameters, which belong to the branch alone
    branch = {r.name: [m for m in r.modules if any(True for _ in named[m].parameters())]
              for r in residuals}
    counts = _count_calls(converted, [m for ms in branch.values() for m in ms])
    steps = 12
    x = torch.randn(2, 3, 32, 32)
    for _ in range(steps):
        converted(x).sum().backward()
    # Replay the decisions: one draw per gate per step, in depth order, from seed 11.
    g = torch.Generator().manual_seed(11)
    kept = [0] * len(gates)
    for _ in range(steps):
        for i, gate in enumerate(gates):
            kept[i] += torch.rand((), generator=g).item() >= gate.drop_prob
    for r, k in zip(residuals, kept):
        assert len(branch[r.name]) == 4  # conv1 bn1 conv2 bn2
        assert all(counts[m] == k for m in branch[r.name]), (r.name, k, [counts[m] for m in branch[r.name]])
    assert 0 < sum(kept) < steps * len(gates)  # some dropped, some kept


def test_drop_frequencies_match_drop_probabilities():
    converted = sdsurgery.convert(AffineResNet(depth=4), drop_rate=0.5, seed=0).train()
    gates = sdsurgery.gates(converted)
    counts = _count_calls(converted, [f"branches.{i}" for i in range(4)])
    steps = 4000
    x = torch.randn(1, 6)
    with torch.no_grad():
        for _ in range(steps):
            converted(x)
    for i, gate in enumerate(gates):
        observed = 1 - counts[f"branches.{i}"] / steps
        sigma = math.sqrt(gate.drop_prob * (1 - gate.drop_prob) / steps)
        # 6 sigma: a false failure has probability ~2e-9 (and the seed is fixed anyway)
        assert abs(observed - gate.drop_prob) < 6 * sigma, (gate.name, observed, gate.drop_prob)


def test_global_rng_is_never_used():
    models = [sdsurgery.convert(AffineResNet(), seed=1, mode=mode).train() for mode in ("block", "sample")]
    state = torch.get_rng_state()
    for mode_model in models:
        for _ in range(20):
            mode_model(torch.ones(8, 6))
    assert torch.equal(torch.get_rng_state(), state)


def _train_outputs(model, steps, x):
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(steps)])


def test_same_seed_same_decisions_other_seed_other_decisions():
    base = AffineResNet()
    x = torch.randn(3, 6)
    a = _train_outputs(sdsurgery.convert(base, seed=7).train(), 30, x)
    b = _train_outputs(sdsurgery.convert(base, seed=7).train(), 30, x)
    c = _train_outputs(sdsurgery.convert(base, seed=8).train(), 30, x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_state_saves_and_restores():
    model = sdsurgery.convert(AffineResNet(), seed=3, mode="sample").train()
    x = torch.randn(5, 6)
    _train_outputs(model, 4, x)
    state = sdsurgery.controller(model).state_dict()
    first = _train_outputs(model, 10, x)
    sdsurgery.set_drop_rate(model, 0.1)
    sdsurgery.controller(model).load_state_dict(state)
    assert sdsurgery.gates(model)[-1].drop_prob == pytest.approx(0.5)  # rate restored too
    assert torch.equal(_train_outputs(model, 10, x), first)


def test_custom_schedule_survives_a_state_round_trip():
    model = sdsurgery.convert(AffineResNet(), schedule=[0.0, 0.2, 0.1, 0.4])
    ctrl = sdsurgery.controller(model)
    assert ctrl.drop_rate == pytest.approx(0.4)
    ctrl.load_state_dict(ctrl.state_dict())
    assert [g.drop_prob for g in sdsurgery.gates(model)] == pytest.approx([0.0, 0.2, 0.1, 0.4])


def test_eval_does_not_consume_decisions():
    x = torch.randn(2, 6)
    a = sdsurgery.convert(AffineResNet(), seed=4)
    b = sdsurgery.convert(AffineResNet(), seed=4)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.eval()(x)
    assert torch.equal(_train_outputs(a.train(), 5, x), _train_outputs(b.train(), 5, x))


@pytest.mark.parametrize("mode", ["block", "sample"])
def test_expectation_scaling_train_average_approaches_eval(mode):
    torch.manual_seed(0)
    model = sdsurgery.convert(AffineResNet(depth=4), drop_rate=0.5, seed=0, mode=mode)
    x = torch.randn(1, 6).expand(64, 6).contiguous() if mode == "sample" else torch.randn(1, 6)
    samples = _train_outputs(model.train(), 3000, x).reshape(-1, 6)
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    with torch.no_grad():
        expected = model.eval()(x[:1])[0]
        unscaled = sdsurgery.convert(AffineResNet(depth=4), drop_rate=0.0)
        unscaled.load_state_dict(model.state_dict())
        unscaled_out = unscaled.eval()(x[:1])[0]
    assert ((mean - expected).abs() <= 5 * stderr + 1e-5).all(), (mean, expected, stderr)
    # and the test can tell: the unscaled network is far outside that band
    assert ((mean - unscaled_out).abs() > 10 * stderr).any()


def test_inverted_scaling_train_average_approaches_the_original():
    base = AffineResNet(depth=3)
    model = sdsurgery.convert(base, drop_rate=0.4, seed=0, scaling="inverted")
    x = torch.randn(1, 6)
    samples = _train_outputs(model.train(), 4000, x).reshape(-1, 6)
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    with torch.no_grad():
        expected = base.eval()(x)[0]
    assert ((mean - expected).abs() <= 5 * stderr + 1e-5).all()


def test_sample_mode_runs_the_branch_on_kept_samples_only():
    model = AffineResNet(depth=1)
    converted = sdsurgery.convert(model, drop_rate=0.5, mode="sample", seed=21).train()
    sizes = []
    converted.branches[0].register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    x = torch.randn(16, 6)
    with torch.no_grad():
        out = converted(x)
    keep = torch.rand(16, generator=torch.Generator().manual_seed(21)) >= 0.5
    assert sizes == [int(keep.sum())] and 0 < sizes[0] < 16
    with torch.no_grad():
        full = model(x)
    assert torch.allclose(out[keep], full[keep], atol=1e-6)
    assert torch.equal(out[~keep], x[~keep])


def test_dropped_block_survives_a_following_inplace_relu():
    # torchvision BasicBlock: out += identity; relu(inplace=True). Dropping must not hand the
    # in-place ReLU a tensor autograd saved.
    converted = sdsurgery.convert(torchvision.models.resnet18(), drop_rate=0.9, schedule="uniform",
                                  seed=0).train()
    for _ in range(3):
        converted(torch.randn(2, 3, 32, 32)).sum().backward()


def test_gates_report_names_and_probabilities():
    gates = sdsurgery.gates(sdsurgery.convert(CustomNet(), drop_rate=0.5))
    assert [(g.name, g.shortcut) for g in gates] == [
        ("stage.0", "identity"), ("stage.1", "projection"), ("stage.2", "identity"), ("mix", "identity")]
    assert all(math.isclose(g.drop_prob + g.survival_prob, 1.0) for g in gates)
    assert "drop_prob=0.5" in repr(gates[-1])


def test_not_converted_models_are_refused():
    with pytest.raises(sdsurgery.NotConvertedError, match="convert it first"):
        sdsurgery.gates(CustomNet())
    with pytest.raises(sdsurgery.NotConvertedError):
        sdsurgery.fold(CustomNet())


def test_one_decision_function_for_every_gate():
    from sdsurgery.gate.gates import decide
    g = torch.Generator().manual_seed(0)
    assert decide(0.0, "block", "expectation", 4, g, True).keep is None
    assert decide(0.3, "block", "expectation", 4, g, False) == decide(0.3, "sample", "expectation", 4, g, False)
    assert decide(0.3, "block", "expectation", 4, g, False).scale == pytest.approx(0.7)
    assert decide(0.3, "block", "inverted", 4, g, False).scale == 1.0
    assert decide(0.25, "block", "inverted", 4, g, True).scale == pytest.approx(4 / 3)
    before = g.get_state()
    keeps = [decide(0.3, "block", "expectation", 4, g, True).keep for _ in range(4000)]
    assert all(k in (True, False) for k in keeps) and abs(sum(keeps) / 4000 - 0.7) < 0.03
    g.set_state(before)  # the same draws as torch.rand((), generator) < p would have made
    assert keeps[:50] == [not torch.rand((), generator=g).item() < 0.3 for _ in range(50)]
    sample = decide(0.5, "sample", "expectation", 6, g, True).keep
    assert sample.dtype == torch.bool and sample.shape == (6,)


def test_a_gate_says_which_modules_a_drop_skips():
    """``gate.skips``: the modules its branch function calls (what a drop does not run); the
    coverage harness checks them against counted calls. A masked gate skips nothing."""
    model = sdsurgery.convert(CustomNet(), drop_rate=0.5)
    skips = {g.name: g.skips for g in sdsurgery.gates(model)}
    assert skips["stage.0"] == ("stage.0.conv1", "stage.0.bn1", "stage.0.conv2", "stage.0.bn2")
    assert skips["mix"] == ("mix",)


def test_sample_mode_scatter_add_has_index_adds_gradients_and_saves_only_indices():
    from sdsurgery.gate.gates import _IndexAdd

    g = torch.Generator().manual_seed(0)
    shortcut = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([0, 2, 5])
    assert torch.autograd.gradcheck(lambda s, o: _IndexAdd.apply(s, idx, o), (shortcut, out))
    torch.testing.assert_close(_IndexAdd.apply(shortcut, idx, out), shortcut.index_add(0, idx, out))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _IndexAdd.apply(shortcut, idx, out * 2)
    assert len(saved) == 1 and saved[0] is idx
