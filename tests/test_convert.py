"""convert: same class, same state_dict, same function where it must be, clear errors."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import sdsurgery
from conftest import built
from models import CustomNet


def _input(case, seed=1):
    return torch.randn(case.input_size, generator=torch.Generator().manual_seed(seed))


def _disable_drop_paths(model):
    for m in model.modules():
        if sdsurgery.ops.is_drop_module(m):
            setattr(m, "drop_prob" if hasattr(m, "drop_prob") else "p", 0.0)
    return model


def test_state_dict_and_class_are_kept(case):
    model = built(case)
    converted = sdsurgery.convert(model)
    assert type(converted) is type(model)
    original, after = model.state_dict(), converted.state_dict()
    assert list(original) == list(after)
    for k in original:
        assert torch.equal(original[k], after[k]), k
    # an original checkpoint loads into the converted model
    converted.load_state_dict(original, strict=True)
    assert len(sdsurgery.gates(converted)) == case.residuals


def test_inverted_scaling_eval_is_the_original(case):
    model = built(case)
    converted = sdsurgery.convert(model, scaling="inverted").eval()
    x = _input(case)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max().item() <= 1e-6


def test_drop_rate_zero_is_the_original_in_train_and_eval(case):
    model = _disable_drop_paths(built(case))
    converted = sdsurgery.convert(model, drop_rate=0.0)
    x = _input(case)
    for train in (False, True):
        model.train(train)
        converted.train(train)
        torch.manual_seed(3)  # dropout in heads draws from the global RNG: same draws
        expected = model(x)
        torch.manual_seed(3)
        got = converted(x)
        assert (got - expected).abs().max().item() <= 1e-6, f"train={train}"


def test_training_step_runs_in_both_modes(case):
    n, c, h, w = case.input_size
    if not any(k in case.id for k in ("vit", "swin")):
        # sample mode runs BatchNorm on the kept samples: keep more than one value per channel
        h, w = 2 * h, 2 * w
    x = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(0))
    for mode in ("block", "sample"):
        converted = sdsurgery.convert(built(case), drop_rate=0.5, mode=mode, seed=0).train()
        for _ in range(2):
            converted(x).float().square().mean().backward()
        grads = [p.grad for p in converted.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_convert_copies_by_default_and_inplace_on_request():
    model = CustomNet()
    converted = sdsurgery.convert(model)
    assert converted is not model and not sdsurgery.is_converted(model)
    assert "forward" not in model.stage[0].__dict__
    same = sdsurgery.convert(model, inplace=True)
    assert same is model and sdsurgery.is_converted(model)


def test_converting_twice_is_refused():
    converted = sdsurgery.convert(CustomNet())
    with pytest.raises(ValueError, match="already converted"):
        sdsurgery.convert(converted)


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_rate=1.0), "drop_rate must be in \\[0, 1\\)"),
    (dict(drop_rate=-0.1), "drop_rate must be in \\[0, 1\\)"),
    (dict(drop_rate="high"), "drop_rate must be a number"),
    (dict(schedule="cosine"), "schedule must be one of 'linear', 'uniform'"),
    (dict(schedule=[0.1, 0.2]), "schedule has 2 probabilities but the model has 4 residual branches"),
    (dict(schedule=[0.1, 0.2, 0.3, 1.5]), "schedule\\[3\\] must be in \\[0, 1\\)"),
    (dict(mode="row"), "mode must be one of 'block', 'sample'"),
    (dict(scaling="linear"), "scaling must be one of 'expectation', 'inverted'"),
])
def test_bad_arguments_name_the_argument_and_leave_the_model_untouched(kwargs, message):
    model = CustomNet().eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    with pytest.raises(ValueError, match=message):
        sdsurgery.convert(model, inplace=True, **kwargs)
    assert not sdsurgery.is_converted(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), before)


def test_include_exclude_and_gate_projection_keep_schedule_positions():
    model = torchvision.models.resnet18()
    all_gates = sdsurgery.gates(sdsurgery.convert(model, drop_rate=0.4))
    by_name = {g.name: g.drop_prob for g in all_gates}
    some = sdsurgery.gates(sdsurgery.convert(model, drop_rate=0.4, exclude="layer1.*"))
    assert [g.name for g in some] == [n for n in by_name if not n.startswith("layer1.")]
    assert all(g.drop_prob == by_name[g.name] for g in some)
    only = sdsurgery.gates(sdsurgery.convert(model, include=["layer4.*", "layer3.1"]))
    assert [g.name for g in only] == ["layer3.1", "layer4.0", "layer4.1"]
    no_proj = sdsurgery.gates(sdsurgery.convert(model, gate_projection=False))
    assert {g.shortcut for g in no_proj} == {"identity"} and len(no_proj) == 5
    with pytest.raises(sdsurgery.NoResidualsError, match="leave none of the 8"):
        sdsurgery.convert(model, include="nothing*")


def test_schedules_and_set_drop_rate():
    model = CustomNet()
    gates = sdsurgery.gates(sdsurgery.convert(model, drop_rate=0.5))
    assert [g.drop_prob for g in gates] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert [g.survival_prob for g in gates] == pytest.approx([0.875, 0.75, 0.625, 0.5])
    uniform = sdsurgery.convert(model, drop_rate=0.3, schedule="uniform")
    assert [g.drop_prob for g in sdsurgery.gates(uniform)] == pytest.approx([0.3] * 4)
    sdsurgery.set_drop_rate(uniform, 0.1)
    assert [g.drop_prob for g in sdsurgery.gates(uniform)] == pytest.approx([0.1] * 4)
    custom = sdsurgery.convert(model, schedule=[0.0, 0.2, 0.1, 0.4])
    assert [g.drop_prob for g in sdsurgery.gates(custom)] == pytest.approx([0.0, 0.2, 0.1, 0.4])
    sdsurgery.set_drop_rate(custom, 0.2)
    assert [g.drop_prob for g in sdsurgery.gates(custom)] == pytest.approx([0.0, 0.1, 0.05, 0.2])
    fn = sdsurgery.convert(model, schedule=lambda l, L: 0.1 * l)
    assert [g.drop_prob for g in sdsurgery.gates(fn)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    linear = sdsurgery.convert(model)
    sdsurgery.set_drop_rate(linear, 0.2)
    assert [g.drop_prob for g in sdsurgery.gates(linear)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    with pytest.raises(ValueError, match="drop_rate must be in"):
        sdsurgery.set_drop_rate(linear, 1.2)


def test_existing_drop_paths_are_neutralised_and_reported():
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.2)
    residuals = sdsurgery.find_residuals(model)
    # timm spreads linspace(0, rate): the first block has no DropPath, the other seven do
    assert [r.drop_modules for r in residuals] == [()] + [(f"{r.name}.drop_path",) for r in residuals[1:]]
    converted = sdsurgery.convert(model)
    assert [bool(g.drop_modules) for g in sdsurgery.gates(converted)] == [False] + [True] * 7
    assert all(m.drop_prob == 0.0 for m in converted.modules() if type(m).__name__ == "DropPath")
    assert len(sdsurgery.controller(converted).neutralised) == 7
    folded = sdsurgery.fold(converted)  # the original rates come back with the original model
    rates = [m.drop_prob for m in folded.modules() if type(m).__name__ == "DropPath"]
    assert rates == [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert max(rates) > 0

    tv = torchvision.models.efficientnet_b0(stochastic_depth_prob=0.2)
    converted = sdsurgery.convert(tv)
    sds = [m for m in converted.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    gated_drop_modules = {n for g in sdsurgery.gates(converted) for n in g.drop_modules}
    assert len(gated_drop_modules) == 9
    names = {m: n for n, m in converted.named_modules()}
    assert all(m.p == 0.0 for m in sds if names[m] in gated_drop_modules)


def test_deepcopy_of_a_converted_model_is_independent():
    converted = sdsurgery.convert(CustomNet(), seed=5)
    twin = copy.deepcopy(converted)
    assert sdsurgery.controller(twin) is not sdsurgery.controller(converted)
    assert all(g.controller is sdsurgery.controller(twin) for g in sdsurgery.gates(twin))
    twin.stage[0].conv1.weight.data.zero_()
    assert converted.stage[0].conv1.weight.abs().sum() > 0
    x = torch.randn(2, 3, 16, 16)
    converted.eval(), twin.eval()
    assert twin(x).shape == converted(x).shape


def test_block_keyword_arguments_still_work():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    converted = sdsurgery.convert(model, scaling="inverted").eval()
    x = torch.randn(1, 5, 192)
    block, original = converted.blocks[0], model.blocks[0]
    assert torch.allclose(block(x, attn_mask=None), original(x, attn_mask=None), atol=1e-6)
    assert torch.allclose(block(x), original(x), atol=1e-6)


class _InplaceAdds(nn.Module):
    """`y.add_(s)` (fx records it with no users) and `s.add_(y)` (mutates the shortcut)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        y = self.a(x)
        y.add_(x)
        x2 = y.clone()
        x2.add_(self.b(x2))
        return x2 * 2


def test_inplace_residual_adds_are_gated():
    model = _InplaceAdds().eval()
    assert [r.name for r in sdsurgery.find_residuals(model)] == ["a", "b"]
    x = torch.randn(4, 6)
    inverted = sdsurgery.convert(model, scaling="inverted").eval()
    with torch.no_grad():
        assert torch.allclose(inverted(x), model(x), atol=1e-6)
    converted = sdsurgery.convert(model, drop_rate=0.5, seed=0)
    folded = sdsurgery.fold(converted).eval()
    with torch.no_grad():
        assert torch.allclose(folded(x), converted.eval()(x), atol=1e-5)
    converted.train()(x).sum().backward()


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x + self.fc(x)


class _Nested(nn.Module):
    """A residual whose branch is itself two residual blocks."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(_Inner(), _Inner(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(x + self.stage(x))


def test_nested_residuals_gate_inner_and_outer():
    model = _Nested().eval()
    residuals = sdsurgery.find_residuals(model)
    assert [r.name for r in residuals] == ["stage.0", "stage.1", "stage"]
    converted = sdsurgery.convert(model, drop_rate=0.5, seed=1)
    x = torch.randn(3, 6)
    with torch.no_grad():
        folded = sdsurgery.fold(converted).eval()
        assert torch.allclose(folded(x), converted.eval()(x), atol=1e-5)
    calls = []
    converted.stage[0].fc.register_forward_hook(lambda *a: calls.append(1))
    converted.train()
    with torch.no_grad():
        for _ in range(200):
            converted(x)
    # the inner block runs only when the outer branch is kept and then when itself is kept
    p_outer, p_inner = sdsurgery.gates(converted)[2].survival_prob, sdsurgery.gates(converted)[0].survival_prob
    assert abs(len(calls) / 200 - p_outer * p_inner) < 0.15


class _HoistedSize(nn.Module):
    """The batch size is read once on the full batch and used in and after the branch."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):                      # (N, 4, 8)
        n = x.shape[0]
        x = x + self.fc(self.norm(x)).reshape(n, 4, 8)
        return x.reshape(n, 32)


def test_sample_mode_falls_back_to_masking_when_the_branch_reads_batch_sizes():
    model = _HoistedSize().eval()
    converted = sdsurgery.convert(model, drop_rate=0.5, mode="sample", seed=2)
    (gate,) = sdsurgery.gates(converted)
    assert gate.sample_fallback
    x = torch.randn(10, 4, 8)
    with torch.no_grad():
        out = converted.train()(x).reshape(10, 4, 8)
        keep = torch.rand(10, generator=torch.Generator().manual_seed(2)) >= gate.drop_prob
        full = model(x).reshape(10, 4, 8)
    assert 0 < keep.sum() < 10
    assert torch.allclose(out[keep], full[keep], atol=1e-6)
    assert torch.allclose(out[~keep], x[~keep])


class _SizedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, size):
        h, w = size
        return x + self.fc(x.reshape(x.shape[0], h * w, 4)).reshape(x.shape)


class _PassesTuples(nn.Module):
    """A block called with a constant tuple (timm CoaT passes its grid size): traced with that
    tuple as a concrete argument, fx emits pytree code reading specs a GraphModule would hold."""

    def __init__(self):
        super().__init__()
        self.block = _SizedBlock()

    def forward(self, x):  # (N, H, W, 4)
        return self.block(x, (3, 5))


def test_blocks_called_with_tuples_are_gated():
    model = _PassesTuples().eval()
    x = torch.randn(2, 3, 5, 4)
    converted = sdsurgery.convert(model, scaling="inverted").eval()
    assert len(sdsurgery.gates(converted)) == 1
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
        assert converted.train()(x).shape == x.shape


class _OneBranchReused(nn.Module):
    """Two residuals in one block; the first branch's output is used again after its add."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.f1(x).relu()
        x = x + h
        x = x + self.f2(x).relu()
        return x * h.sigmoid()


class _Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _OneBranchReused()

    def forward(self, x):
        return self.block(x)


def test_a_branch_the_block_needs_anyway_is_masked_not_skipped():
    model = _Wrap().eval()
    assert len(sdsurgery.find_residuals(model)) == 2
    with pytest.warns(UserWarning, match="1 residual branches are gated by masking.*'block.f1'.*also used outside"):
        converted = sdsurgery.convert(model, drop_rate=0.5, seed=0)
    g1, g2 = sdsurgery.gates(converted)
    assert (g1.name, g2.name) == ("block.f1", "block.f2")
    assert "also used outside" in g1.masked and g2.masked is None
    x = torch.randn(3, 6)
    block = converted.block
    # dropped in training: h leaves the add but is still computed for the product
    g1.drop_prob, g2.drop_prob = 0.999999, 0.0
    calls = []
    block.f1.register_forward_hook(lambda *_: calls.append("f1"))
    with torch.no_grad():
        h = block.f1(x).relu()
        expected = (x + block.f2(x).relu()) * h.sigmoid()
        calls.clear()
        assert torch.allclose(converted.train()(x), expected, atol=1e-6)
        assert calls == ["f1"]
        g1.drop_prob = 0.25
        eval_out = converted.eval()(x)
        y = x + 0.75 * h
        assert torch.allclose(eval_out, (y + block.f2(y).relu()) * h.sigmoid(), atol=1e-6)
        # its scale cannot go into f1 (h is used again): fold keeps it explicit
        with pytest.raises(sdsurgery.FoldError, match="block.f1"):
            sdsurgery.fold(converted)
        assert torch.allclose(sdsurgery.fold(converted, keep_scale=True).eval()(x), eval_out, atol=1e-6)
    # per-sample decisions: the masked branch's value is gathered for the kept samples
    with pytest.warns(UserWarning, match="masking"):
        sampled = sdsurgery.convert(model, drop_rate=0.6, mode="sample", seed=0).train()
    out = sampled(torch.randn(16, 6, requires_grad=True))
    out.sum().backward()
    assert out.shape == (16, 6) and sampled.block.f1.weight.grad is not None


class _SliceAdd(nn.Module):
    """ReXNet's block: the branch widens the channels, the shortcut is added to the first ones:
    cat([y[:, :C] + x, y[:, C:]])."""

    def __init__(self, c=4, out=6):
        super().__init__()
        self.c = c
        self.conv = nn.Sequential(nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, :self.c] + x, y[:, self.c:]], dim=1)


def test_a_slice_add_masks_the_whole_branch_as_a_drop_path_would():
    model = nn.Sequential(_SliceAdd()).eval()
    with pytest.warns(UserWarning, match="masking.*concatenated back"):
        converted = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform", seed=0)
    gate, = sdsurgery.gates(converted)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = model[0].conv(x)
        padded = torch.cat([x, torch.zeros(2, 2, 5, 5)], 1)
        assert torch.allclose(converted.eval()(x), padded + 0.5 * y, atol=1e-6)
        gate.drop_prob = 0.999999
        assert torch.equal(converted[0].train()(x), padded)  # dropped: shortcut, zero new channels
        gate.drop_prob = 0.5
        ref = converted.eval()(x)  # BatchNorm statistics moved in the training call
        assert torch.allclose(sdsurgery.fold(converted, keep_scale=True)(x), ref, atol=1e-6)


def test_a_detector_with_a_converted_backbone_answers_for_it():
    """The pattern for detectors and segmenters: convert the backbone in place. The outer model
    then answers gates / set_drop_rate / controller / fold for it, and trains."""
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    assert not sdsurgery.is_converted(det)
    with pytest.raises(sdsurgery.NotConvertedError, match="carries no stochastic-depth gates"):
        sdsurgery.gates(det)
    n = len(sdsurgery.find_residuals(det.backbone.body))
    sdsurgery.convert(det.backbone.body, drop_rate=0.3, inplace=True, seed=0)
    assert sdsurgery.is_converted(det) and len(sdsurgery.gates(det)) == n > 0
    assert sdsurgery.controller(det) is sdsurgery.controller(det.backbone.body)
    sdsurgery.set_drop_rate(det, 0.2)
    assert max(g.drop_prob for g in sdsurgery.gates(det)) == pytest.approx(0.2)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = det.backbone(x)
        folded = sdsurgery.fold(det)
        assert type(folded) is type(det) and not sdsurgery.is_converted(folded)
        assert sdsurgery.is_converted(det)  # fold works on a copy
        for k, v in folded.backbone(x).items():
            torch.testing.assert_close(v, feats[k])
    det.train()
    losses = det([x[0]], [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    with pytest.raises(sdsurgery.CheckpointError, match=r"holds converted submodules \(backbone.body\): fold it first"):
        sdsurgery.save(det, "unused.safetensors", spec="torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")


class _TwoNets(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = CustomNet(), CustomNet()

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_several_converted_submodules_are_each_answered_for():
    model = _TwoNets()
    for part in (model.a, model.b):
        sdsurgery.convert(part, drop_rate=0.5, inplace=True)
    assert len(sdsurgery.gates(model)) == 2 * len(sdsurgery.gates(model.a))
    sdsurgery.set_drop_rate(model, 0.1)
    assert all(g.drop_prob <= 0.1 + 1e-9 for g in sdsurgery.gates(model))
    with pytest.raises(sdsurgery.NotConvertedError, match="holds 2 converted submodules"):
        sdsurgery.controller(model)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sdsurgery.fold(model)(x), model(x))
