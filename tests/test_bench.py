"""Measurements of sdsurgery.bench that are exact (bytes saved for backward), not timings."""
import torch
import torch.nn as nn

import sdsurgery
from sdsurgery.bench import quartiles, saved_activation_bytes


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[_Block(8) for _ in range(6)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_saved_activation_bytes_are_exact_and_shrink_with_dropped_branches():
    model = _net()
    base = saved_activation_bytes(model, _batch)
    assert base == saved_activation_bytes(model, _batch)  # exact: no allocator noise
    assert saved_activation_bytes(sdsurgery.convert(model, drop_rate=0.0), _batch) == base  # gates save nothing
    per_block = []
    for rate in (0.3, 0.6, 0.9):
        conv = sdsurgery.convert(model, drop_rate=rate, schedule="uniform", seed=0)
        per_block.append(saved_activation_bytes(conv, _batch, steps=20) / base)
    assert per_block[0] > per_block[1] > per_block[2]  # more drops, less kept for backward
    dropped = sdsurgery.convert(model, drop_rate=0.999999, schedule="uniform", seed=0)
    # every branch dropped: what is left is the stem, the shortcut ReLUs and the head
    assert saved_activation_bytes(dropped, _batch) < 0.3 * base


def test_quartiles_bracket_the_median():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quartiles(xs) == (2.0, 4.0) and quartiles([7.0]) == (7.0, 7.0)


def test_a_compiled_converted_model_draws_new_decisions_every_step():
    """torch.compile (dynamo; the eager backend keeps the test fast) runs the gates' draws
    outside the graph: the compiled model makes the same decisions as the eager one, step by
    step, from the same generator, and they vary (not frozen at trace time)."""
    import copy

    model = _net()
    eager = sdsurgery.convert(model, drop_rate=0.6, schedule="uniform", seed=3).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="eager")
    x, y = _batch()
    losses = {"eager": [], "compiled": []}
    for _ in range(6):
        for name, m in (("eager", eager), ("compiled", compiled)):
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["compiled"], losses["eager"])
    assert len(set(round(v, 6) for v in losses["eager"])) > 1  # decisions vary step to step
    assert torch.equal(sdsurgery.controller(compiled_model).generator.get_state(),
                       sdsurgery.controller(eager).generator.get_state())


def test_run_bench_under_torch_compile_and_channels_last():
    """The bench's compiled path (dynamo, eager backend: fast) and channels_last: every variant
    timed, the converted model also eager, warm-up time and graphs counted per variant (the
    forced keep-all / drop-all warm-up leaves nothing to compile later), ratios against the
    original, exact saved bytes unchanged."""
    from sdsurgery.bench import run_bench

    result = run_bench(lambda **kw: _net(), name="test", native=None, batch_size=2, image_size=16,
                       steps=4, warmup=2, compile="eager", channels_last=True)
    assert result.compile == "eager" and result.channels_last
    compiled = {"original", "original (A/A copy)", "sdsurgery p=0", "sdsurgery block 0.5"}
    assert set(result.train_ms) == set(result.warmup_s) == compiled | {"sdsurgery block 0.5 (eager)"}
    assert set(result.graphs) == compiled and result.graphs["original"] == 1  # one whole graph
    assert result.graphs["sdsurgery block 0.5"] > 1  # broken at the gates' draws
    assert result.graphs_after_warmup == dict.fromkeys(compiled, 0)
    assert all(s > 0 for s in result.warmup_s.values()) and result.train_ratio["original"] == 1.0
    assert result.saved_ratio["sdsurgery p=0"] == 1.0
    assert result.peak_mb == {}  # CUDA only
    assert result.versions["torch"] == torch.__version__


def test_forced_drop_prob_keeps_or_drops_every_branch_then_restores():
    from sdsurgery.bench import forced_drop_prob

    model = sdsurgery.convert(_net(), drop_rate=0.3).train()
    before = [g.drop_prob for g in sdsurgery.gates(model)]
    calls = []
    model[1].conv1.register_forward_hook(lambda *a: calls.append(1))  # the first branch's conv
    x, _ = _batch()
    with forced_drop_prob(model, 1.0):
        for _ in range(5):
            model(x)
    assert calls == []
    with forced_drop_prob(model, 0.0):
        for _ in range(5):
            model(x)
    assert len(calls) == 5 and [g.drop_prob for g in sdsurgery.gates(model)] == before


def test_saved_theory_matches_the_bytes_of_all_kept_and_all_dropped_steps():
    """The per-branch theory, checked against two exact measurements: with every branch
    dropped a step keeps ``1 - share`` of what it keeps with every branch on, so at a uniform
    drop probability p the expectation is ``1 - p * share``."""
    from sdsurgery.bench import forced_drop_prob, saved_theory

    model = sdsurgery.convert(_net(), drop_rate=0.4, schedule="uniform")
    with forced_drop_prob(model, 0.0):
        kept = saved_activation_bytes(model, _batch)
    with forced_drop_prob(model, 1.0):
        dropped = saved_activation_bytes(model, _batch)
    share = 1 - dropped / kept
    assert 0.3 < share < 1
    assert abs(saved_theory(model, _batch) - (1 - 0.4 * share)) < 1e-9
    assert saved_theory(sdsurgery.convert(_net(), drop_rate=0.0), _batch) == 1.0


def test_sample_mode_regathers_inputs_autograd_keeps_anyway():
    """Sample mode runs a branch on the kept samples: the gathered input its first layer
    saves is not kept when the full input is saved anyway (after a ReLU): fewer bytes at the
    same decisions, and exactly the gradients of keeping the gathered copy."""
    import copy

    import sdsurgery.gate.gates as gates

    model = sdsurgery.convert(_net(), drop_rate=0.5, mode="sample", schedule="uniform", seed=1)
    twin = copy.deepcopy(model)
    x, y = _batch()
    nn.functional.cross_entropy(model.train()(x), y).backward()
    saved = gates._saved_anyway
    gates._saved_anyway = lambda t: False
    try:
        nn.functional.cross_entropy(twin.train()(x), y).backward()
        torch.manual_seed(0)
        without = saved_activation_bytes(copy.deepcopy(twin), _batch, steps=6)
    finally:
        gates._saved_anyway = saved
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    torch.manual_seed(0)
    with_regather = saved_activation_bytes(copy.deepcopy(twin), _batch, steps=6)
    assert with_regather < without
    original = saved_activation_bytes(_net(), _batch)
    assert with_regather < original  # less than the unconverted model keeps, as block mode
