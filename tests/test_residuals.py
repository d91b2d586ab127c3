"""find_residuals: what counts as a residual connection, and what does not."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import sdsurgery
from conftest import built
from models import Block, CustomNet


def test_finds_the_architectures_real_count(case):
    residuals = sdsurgery.find_residuals(built(case))
    assert len(residuals) == case.residuals
    assert [r.index for r in residuals] == list(range(case.residuals))
    assert len({r.name for r in residuals}) == len(residuals), "names must be unique"
    for r in residuals:
        assert r.shortcut in ("identity", "projection")
        assert r.modules and r.params > 0
        assert r.fold_target is not None, f"{r.name}: {r.fold_blocker}"


def test_resnet50_names_shortcuts_and_fold_targets():
    residuals = sdsurgery.find_residuals(torchvision.models.resnet50())
    names = [r.name for r in residuals]
    assert names[:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert "layer3.5" in names and names[-1] == "layer4.2"
    projections = [r.name for r in residuals if r.shortcut == "projection"]
    assert projections == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    r = residuals[names.index("layer3.5")]
    assert r.fold_target == "layer3.5.bn3"
    assert r.fold_params == ("layer3.5.bn3.weight", "layer3.5.bn3.bias")
    assert r.modules[0] == "layer3.5.conv1" and "layer3.5.bn3" in r.modules
    assert residuals[0].shortcut_modules == ("layer1.0.downsample.0", "layer1.0.downsample.1")


def test_transformer_branches_are_named_after_their_module():
    names = [r.name for r in sdsurgery.find_residuals(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32))]
    assert names[:4] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    tv = sdsurgery.find_residuals(torchvision.models.vit_b_16(image_size=32))
    assert tv[0].name == "encoder.layers.encoder_layer_0.self_attention"
    assert tv[0].fold_target == "encoder.layers.encoder_layer_0.self_attention.out_proj"


def test_layer_scale_and_identity_modules():
    timm_cnx = sdsurgery.find_residuals(timm.create_model("convnext_atto", pretrained=False))
    # timm wraps identity shortcuts in nn.Identity modules: still an identity shortcut
    assert {r.shortcut for r in timm_cnx} == {"identity"}
    assert timm_cnx[0].fold_params == ("stages.0.blocks.0.gamma",)
    tv_cnx = sdsurgery.find_residuals(torchvision.models.convnext_tiny())
    assert tv_cnx[0].fold_params == ("features.1.0.layer_scale",)


def test_custom_model_identity_projection_and_root_residual():
    residuals = sdsurgery.find_residuals(CustomNet())
    assert [(r.name, r.shortcut) for r in residuals] == [
        ("stage.0", "identity"), ("stage.1", "projection"), ("stage.2", "identity"), ("mix", "identity")]
    assert residuals[1].shortcut_modules == ("stage.1.proj.0", "stage.1.proj.1")


class _TwoSided(nn.Module):
    """A projection block with conv+BN on both sides, in either operand order."""

    def __init__(self, shortcut_first: bool):
        super().__init__()
        self.shortcut_first = shortcut_first
        self.proj = nn.Conv2d(4, 8, 1, bias=False)
        self.pb = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)

    def forward(self, x):
        s = self.pb(self.proj(x))
        f = self.b2(self.c2(torch.relu(self.c1(x))))
        return s + f if self.shortcut_first else f + s


@pytest.mark.parametrize("shortcut_first", [True, False])
def test_branch_side_is_found_in_either_operand_order(shortcut_first):
    (r,) = sdsurgery.find_residuals(_TwoSided(shortcut_first))
    assert r.shortcut == "projection"
    assert r.shortcut_modules == ("proj", "pb")
    assert r.modules == ("c1", "c2", "b2")
    assert r.branch_operand == (1 if shortcut_first else 0)


class _NotResiduals(nn.Module):
    """Adds that are not residual connections, around one real one."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 8))
        self.register_buffer("cos", torch.randn(4, 8))
        self.register_buffer("sin", torch.randn(4, 8))
        self.a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.real = nn.Linear(8, 8)

    def forward(self, x):                       # x: (N, 4, 8)
        x = x + self.pos                        # position embedding
        shape = x.shape[:1] + (4, 8)            # tuple concatenation
        n = x.shape[0] + 1                      # int arithmetic
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
        x = x * self.cos + rot * self.sin       # rotary embedding
        x = self.a(x) + self.b(x)               # sum of two branches, no shortcut
        x = x + self.real(x)                    # the only residual connection
        return x.reshape(shape) * (n - n + 1)


def test_non_residual_adds_are_left_alone():
    analysis = sdsurgery.analyse(_NotResiduals())
    assert [r.name for r in analysis.residuals] == ["real"]
    reasons = " | ".join(r.reason for r in analysis.rejected)
    assert len(analysis.rejected) == 3, reasons  # pos-embed, rotary, two branches
    assert "share no input" in reasons
    model = sdsurgery.convert(_NotResiduals())
    assert [g.name for g in sdsurgery.gates(model)] == ["real"]


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.conv(x)
        return x


class _HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(3, 3)
        self.odd = _Untraceable()

    def forward(self, x):
        return self.odd(self.block(x))


def test_untraceable_module_is_named_with_the_leaf_fix():
    with pytest.raises(sdsurgery.TraceError) as info:
        sdsurgery.find_residuals(_HasUntraceable())
    assert info.value.module == "odd"
    assert "'odd' (_Untraceable)" in str(info.value) and "leaf_modules=['odd']" in str(info.value)
    assert [r.name for r in sdsurgery.find_residuals(_HasUntraceable(), leaf_modules=["odd"])] == ["block"]
    assert len(sdsurgery.find_residuals(_HasUntraceable(), leaf_modules=[_Untraceable])) == 1


def test_no_residuals_is_an_error():
    vgg_like = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    assert sdsurgery.find_residuals(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) == []
    with pytest.raises(sdsurgery.NoResidualsError, match="no residual connection"):
        sdsurgery.convert(vgg_like)


def test_unknown_leaf_name_is_a_value_error():
    with pytest.raises(ValueError, match="leaf_modules: no submodule named 'nope'"):
        sdsurgery.find_residuals(CustomNet(), leaf_modules=["nope"])
