"""torch.compile of converted models: real skipping, fresh decisions every step, and a bounded
set of compiled graphs (no recompiling per drop pattern, no recompile-limit fallbacks).

Graphs are counted by a backend of our own (dynamo hands every graph it compiles to the
backend); dynamo's warnings (recompile limit) are caught from its logger. The backend runs the
graphs as traced (like ``backend="eager"``), which keeps the tests fast on CPU.
"""
import logging

import pytest
import timm
import torch
import torch.nn as nn

import sdsurgery
from sdsurgery.zoo.cifar_resnet import CifarResNet


class _Graphs:
    """A torch.compile backend that counts the graphs dynamo compiles."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        return gm.forward


class _DynamoWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def dynamo_warnings():
    torch.compiler.reset()
    handler = _DynamoWarnings()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    torch.compiler.reset()


def _resnet(blocks: int = 2):
    torch.manual_seed(0)
    return CifarResNet(blocks, num_classes=10)  # 3 stages


def _vit(depth: int = 4):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=8, depth=depth, embed_dim=48, num_heads=2)


def _step(model, x, y, *, train: bool, grad: bool):
    model.train(train)
    with torch.set_grad_enabled(grad):
        out = model(x)
        if grad:
            nn.functional.cross_entropy(out, y).backward()
    return out


def _warm(build, depth):
    """A converted model compiled and run through every combination a fine-tune meets
    (train / eval, grad / no_grad, every branch kept, every branch dropped)."""
    torch.compiler.reset()
    model = sdsurgery.convert(build(depth), drop_rate=0.5, schedule="uniform", seed=1)
    graphs = _Graphs()
    compiled = torch.compile(model, backend=graphs)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    for rate in (0.0, 0.999):  # uniform: every gate keeps, then every gate drops
        sdsurgery.set_drop_rate(model, rate)
        for train in (True, False):
            for grad in (True, False):
                _step(compiled, x, y, train=train, grad=grad)
    sdsurgery.set_drop_rate(model, 0.5)
    return model, compiled, graphs, (x, y)


@pytest.mark.parametrize("build, depths", [(_resnet, (2, 4)), (_vit, (3, 6))],
                         ids=["cifar-resnet", "timm-vit"])
def test_compiled_block_mode_settles_after_warm_up(build, depths, dynamo_warnings):
    """As many graphs for a deep model as for a shallow one of the same blocks (graphs per
    block structure, not per block), none after warm-up however the gates draw, fresh
    draws every step, no recompile-limit warning."""
    shallow = _warm(build, depths[0])[2].count
    model, compiled, graphs, (x, y) = _warm(build, depths[1])
    warm = graphs.count
    assert warm == shallow > 0, (shallow, warm)
    patterns = set()
    for step in range(12):
        drops = _counting_decisions(model)
        _step(compiled, x, y, train=True, grad=True)
        patterns.add(tuple(drops))
        if step % 4 == 3:
            _step(compiled, x, y, train=False, grad=False)
    assert graphs.count == warm, "new graphs after warm-up"
    assert len(patterns) > 1  # decisions drawn afresh every step, not frozen at trace time
    assert not [m for m in dynamo_warnings if "recompile" in m or "cache_size" in m], dynamo_warnings


def _counting_decisions(model):
    """Record each gate's keep/drop for the next forward (the draw stays eager under compile)."""
    seen: list = []
    for gate in sdsurgery.gates(model):
        own = type(gate)._decide

        @torch.compiler.disable
        def record(n, gate=gate, own=own):
            d = own(gate, n)
            seen.append(d.keep if isinstance(d.keep, bool) else tuple(d.keep.tolist()))
            return d

        gate._decide = record
    return seen


@pytest.mark.parametrize("mode", ["block", "sample"])
def test_compiled_model_skips_what_it_drops_and_matches_eager(mode):
    """Counted module calls: a branch the gate drops is not run by the compiled model either;
    the compiled model's training outputs equal the eager model's for the same draws, and
    its eval outputs too."""
    import copy

    torch.compiler.reset()
    model = sdsurgery.convert(_resnet(), drop_rate=0.5, mode=mode, seed=2)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="eager")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    calls = {"eager": 0, "compiled": 0}
    for name, m in (("eager", model), ("compiled", twin)):
        for gate in sdsurgery.gates(m):
            conv = m.get_submodule(gate.skips[0])  # the branch's first conv
            conv.register_forward_hook(lambda mod, a, o, name=name: calls.__setitem__(name, calls[name] + a[0].shape[0]))
    ran = 0
    for _ in range(5):
        calls.update(eager=0, compiled=0)
        expected = _step(model, x, y, train=True, grad=True)
        got = _step(compiled, x, y, train=True, grad=True)
        torch.testing.assert_close(got, expected)
        assert calls["compiled"] == calls["eager"]  # samples that went through a branch
        ran += calls["compiled"]
    assert ran < 5 * 8 * len(sdsurgery.gates(model))  # fewer than all: dropped ones skipped
    torch.testing.assert_close(_step(compiled, x, y, train=False, grad=False),
                               _step(model, x, y, train=False, grad=False))
    torch.compiler.reset()
