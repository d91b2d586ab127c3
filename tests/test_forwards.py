"""Forwards written the way other libraries write them: decorated, with ``**kwargs``.

Each model is converted and trained a few steps; module calls are counted to prove dropped
branches are skipped (not computed and masked), and the folded model is checked exact.
"""
import copy
import collections
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


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder_is_gated_skipped_and_folded(norm_first, batch_first):
    """nn.TransformerEncoder(Layer): torch.fx sees them as leaves and cannot follow their fast
    path; sdsurgery traces their slow path (sdsurgery.find.standins). 2 residuals per layer,
    skipped when dropped (counted), exact at drop 0 and after fold; the folded model has its
    own forward (and fast path) back."""
    from conftest import replay_keeps
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
    residuals = sdsurgery.find_residuals(enc, example=x)
    assert [(r.name, r.fold_target) for r in residuals] == [
        (f"layers.{i}.{a}", f"layers.{i}.{b}") for i in range(3)
        for a, b in (("self_attn", "self_attn.out_proj"), ("linear1", "linear2"))]
    conv = sdsurgery.convert(enc, drop_rate=0.0, example=x, seed=0)
    assert len(sdsurgery.gates(conv)) == 6 and not any(g.masked for g in sdsurgery.gates(conv))
    with torch.no_grad():
        torch.testing.assert_close(conv(x, src_key_padding_mask=pad), ref)
    sdsurgery.set_drop_rate(conv, 0.5)
    calls = collections.Counter()
    for name, m in conv.named_modules():
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
            m.register_forward_hook(lambda m, a, o, name=name: calls.update([name]))
    kept = replay_keeps(conv, 12)
    conv.train()
    for _ in range(12):
        conv(x, src_key_padding_mask=pad).sum().backward()
    for r in residuals:
        for m in r.modules:
            if isinstance(conv.get_submodule(m), (nn.Linear, nn.MultiheadAttention)):
                assert calls[m] == kept[r.name], (r.name, m, calls[m], kept[r.name])
    assert sum(kept.values()) < 12 * 6
    conv.eval()
    with torch.no_grad():
        out = conv(x, src_key_padding_mask=pad)
        folded = sdsurgery.fold(conv)
        torch.testing.assert_close(folded(x, src_key_padding_mask=pad), out, rtol=1e-5, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in folded.modules())


class _ConstantBlock(nn.Module):
    """A forward that makes a tensor: fx keeps it as ``_tensor_constant0`` of the module traced."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x) * torch.tensor(0.5)


def test_tensors_a_forward_makes_are_held_by_the_code_not_left_on_the_modules():
    model = nn.Sequential(_ConstantBlock(), _ConstantBlock()).eval()
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    sdsurgery.analyse(model)
    conv = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform", seed=0)
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs  # analysis left nothing
    assert not any(k.startswith("_tensor_constant") for m in conv.modules() for k in vars(m))
    assert len(sdsurgery.gates(conv)) == 2  # the two blocks share one rewrite, constant included
    x = torch.randn(3, 8)
    with torch.no_grad():
        sdsurgery.set_drop_rate(conv, 0.0)
        torch.testing.assert_close(conv.eval()(x), model(x))
    copy.deepcopy(conv)


class _TokenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x).relu()


class _SizeBranchingRoot(nn.Module):
    """A model whose own forward branches on the input's size (keeps at most 4 tokens) and
    holds a residual of its own: traceable on an example only."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_TokenBlock(), _TokenBlock()])
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[1] > 4:
            x = x[:, :4]
        for b in self.blocks:
            x = b(x)
        x = x + self.mix(x)
        return self.head(x.mean(1))


def test_a_root_forward_that_branches_on_sizes_is_traced_on_the_example():
    model = _SizeBranchingRoot().eval()
    with pytest.raises(sdsurgery.TraceError):
        sdsurgery.find_residuals(model)  # no example: the root's control flow cannot be traced
    x = torch.randn(2, 6, 8)
    residuals = sdsurgery.find_residuals(model, example=x)
    assert [(r.name, r.specialised) for r in residuals] == [("blocks.0", False), ("blocks.1", False), ("mix", True)]
    conv = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform", example=x, seed=0)
    gates = sdsurgery.gates(conv)
    assert len(gates) == 3 and not any(g.masked for g in gates)
    with torch.no_grad():
        for inp in (x, torch.randn(3, 6, 8), torch.randn(2, 3, 8)):  # example sizes, batch, another length
            folded = sdsurgery.fold(conv.eval())
            torch.testing.assert_close(folded(inp), conv(inp))
    # training at the example's sizes: a dropped block is not run
    calls = collections.Counter()
    for name in ("blocks.0.fc", "blocks.1.fc", "mix"):
        conv.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: calls.update([n]))
    from conftest import replay_keeps
    kept = replay_keeps(conv, 6)
    conv.train()
    for _ in range(6):
        conv(x)
    assert calls["blocks.0.fc"] == kept["blocks.0"] and calls["mix"] == kept["mix"]
