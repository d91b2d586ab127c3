"""find_residuals: what counts as a residual connection, and what does not."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import sdsurgery
from conftest import built
from models import Block, CustomNet, SizeBranching, SizeNet


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
    assert [r.code for r in analysis.rejected] == ["pos-embedding", "rotary", "sum-of-branches"], reasons
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


def test_an_untraceable_module_is_left_as_a_leaf_and_named():
    an = sdsurgery.analyse(_HasUntraceable())
    assert [r.name for r in an.residuals] == ["block"]
    odd, = [x for x in an.rejected if x.node == "leaf odd"]
    assert "'odd' (_Untraceable) were not searched" in odd.reason and odd.code == "not-traced"
    assert odd.reason.endswith("its submodules were searched one by one") or "submodules" not in odd.reason
    assert "control flow" in odd.reason and "pass example=" in odd.reason
    with pytest.warns(UserWarning, match="module 'odd' left as it is: .*not searched"):
        converted = sdsurgery.convert(_HasUntraceable())
    assert [g.name for g in sdsurgery.gates(converted)] == ["block"]
    # named as a leaf, it is not searched and not reported
    an = sdsurgery.analyse(_HasUntraceable(), leaf_modules=["odd"])
    assert [r.name for r in an.residuals] == ["block"] and not any(x.owner == "odd" for x in an.rejected)


class _RootUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(3, 3)

    def forward(self, x):
        return self.block(x) if x.sum() > 0 else x


def test_an_untraceable_root_forward_is_a_trace_error():
    with pytest.raises(sdsurgery.TraceError, match="the model's own forward") as info:
        sdsurgery.find_residuals(_RootUntraceable())
    assert info.value.module == ""
    message = str(info.value)
    assert "\n" not in message
    line = _RootUntraceable.forward.__code__.co_firstlineno + 1
    assert f"control flow (at test_residuals.py:{line})" in message, message
    assert "convert the submodule that holds the blocks" in message and "leaf" not in message


def _size_net_eval(model, x, p):
    """SizeNet's eval output with branch l scaled by 1 - p[l], computed by hand."""
    h = model.stem(x).permute(0, 2, 3, 1)
    for k, b in enumerate(model.blocks):
        n, H, W, C = h.shape
        a = b.attn(h.reshape(n, H * W, C)).view(n, H, W, C) if H == b.window else b.attn(h)
        h = h + (1 - p[2 * k]) * a
        h = h + (1 - p[2 * k + 1]) * b.mlp(h)
    return h.mean((1, 2))


def test_size_branching_blocks_are_rewritten_for_the_example_sizes():
    model = SizeNet().eval()
    x = torch.randn(2, 3, 4, 4)
    an = sdsurgery.analyse(model, example=x)
    assert [r.name for r in an.residuals] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert [r.tail for r in an.residuals][:2] == ["blocks.0.drop_path1", "blocks.0.drop_path2"]
    converted = sdsurgery.convert(model, drop_rate=0.5, seed=0, example=x)
    gates = sdsurgery.gates(converted)
    assert len(gates) == 4 and not any(g.masked for g in gates)
    p = [g.drop_prob for g in gates]
    calls = []
    converted.blocks[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        for inp in (x, torch.randn(5, 3, 4, 4)):  # the example's sizes, any batch size
            assert torch.allclose(converted.eval()(inp), _size_net_eval(model, inp, p), atol=1e-5)
        # another size takes the block's own forward (its other path), gates act on the slots
        other = torch.randn(3, 3, 6, 6)
        assert torch.allclose(converted(other), _size_net_eval(model, other, p), atol=1e-5)
        # training at the example's sizes: a dropped branch is not computed
        gates[3].drop_prob = 0.999999
        for g in gates[:3]:
            g.drop_prob = 0.0
        calls.clear()
        assert torch.allclose(converted.train()(x), _size_net_eval(model, x, [0, 0, 0, 1]), atol=1e-5)
        assert calls == []
        # at another size the branch runs and its output is masked (with a warning in training)
        with pytest.warns(UserWarning, match=r"called with x of size \(3, 6, 6, 8\) \(converted for \(B, \*\(4, 4, 8\)\)\)"):
            out = converted(other)
        assert torch.allclose(out, _size_net_eval(model, other, [0, 0, 0, 1]), atol=1e-5)
        assert calls == [1]
    gates[3].drop_prob = 0.3
    folded = sdsurgery.fold(converted).eval()
    assert type(folded.blocks[0]) is SizeBranching and not sdsurgery.is_converted(folded)
    assert not folded.blocks[1].drop_path2._forward_hooks and "forward" not in folded.blocks[1].__dict__
    with torch.no_grad():
        for inp in (x, other):
            assert torch.allclose(folded(inp), converted.eval()(inp), atol=1e-5)


def test_no_residuals_is_an_error():
    vgg_like = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    assert sdsurgery.find_residuals(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) == []
    with pytest.raises(sdsurgery.NoResidualsError, match="no residual connection"):
        sdsurgery.convert(vgg_like)


def test_unknown_leaf_name_is_a_value_error():
    with pytest.raises(ValueError, match="leaf_modules: no submodule named 'nope'"):
        sdsurgery.find_residuals(CustomNet(), leaf_modules=["nope"])


# ---- adds shaped like a residual that are not a block around one (issue 5: match timm's slots)
class _Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _ConvPosEncBlock(nn.Module):
    """CPE (CoaT, DaViT, Twins) before real residuals: x + bn(dwconv(x)) (a token mixer in
    SHViT, iFormer), x + linear(x); both stay residuals."""

    def __init__(self, c=8):
        super().__init__()
        self.cpe = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.mixer = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
        self.mlp = _Mlp(c)
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        x = x + self.cpe(x)
        x = x + self.mixer(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mlp(t)
        return t + self.lin(t)


class _DepthwiseSums(nn.Module):
    """RepViT's RepVggDw (x + [bn(dw3(x)) + dw1(x)]) and FastViT's RepMixer
    (x + s * (bn(dw(x)) - bn(x))) are one re-parameterisable layer each; EfficientViM's
    x + a * (bn(dw(x)) - x) is a token-mixing block."""

    def __init__(self, c=8):
        super().__init__()
        dw = lambda k: nn.Conv2d(c, c, k, padding=k // 2, groups=c)  # noqa: E731
        self.rep = nn.Sequential(dw(3), nn.BatchNorm2d(c))
        self.rep1 = dw(1)
        self.mixer, self.norm = nn.Sequential(dw(3), nn.BatchNorm2d(c)), nn.BatchNorm2d(c)
        self.scale = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.vim = nn.Sequential(dw(3), nn.BatchNorm2d(c))
        self.alpha = nn.Parameter(torch.ones(2))

    def forward(self, x):
        x = x + (self.rep(x) + self.rep1(x))
        x = x + self.scale * (self.mixer(x) - self.norm(x))
        return x + self.alpha.softmax(0)[0] * (self.vim(x) - x)


class _RepBranches(nn.Module):
    """RepVGG's training-time form: two linear convs of one input summed, then the identity."""

    def __init__(self, c=8):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k1(x) + self.k3(x) + self.identity(x))


class _SplitSum(nn.Module):
    """Res2Net's hierarchical split: sp = conv(sp + split[i]) is not a residual."""

    def __init__(self, c=8, scale=4):
        super().__init__()
        self.w = c // scale
        self.convs = nn.ModuleList(nn.Conv2d(self.w, self.w, 3, padding=1) for _ in range(scale - 1))

    def forward(self, x):
        parts = torch.split(x, self.w, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = parts[i] if i == 0 else sp + parts[i]
            sp = torch.relu(conv(sp))
            out.append(sp)
        return torch.cat(out + [parts[-1]], 1)


class _SizedPosEmbed(nn.Module):
    """A position embedding computed from the input's size only (XCiT, Hiera)."""

    def __init__(self, c=8):
        super().__init__()
        self.proj = nn.Linear(2, c)

    def forward(self, x):
        n = x.shape[1]
        grid = torch.arange(n, dtype=x.dtype, device=x.device)
        return x + self.proj(torch.stack([grid, grid * 0.5], -1))


class _PoolingAttention(nn.Module):
    """MViTv2's attention: x = attn @ v + q inside the attention, around no block."""

    def __init__(self, c=8):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.norm_q, self.norm_k = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = self.norm_q(q), self.norm_k(k)
        attn = (q @ k.transpose(-2, -1) * mask).softmax(-1)
        return self.proj(attn @ v + q)


class _MaskedBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.attn = _PoolingAttention(c)

    def forward(self, x, mask):
        return x + self.attn(x, mask)


class _MaskedBlocks(nn.Module):
    """Blocks that all read a side input (an attention mask) computed from the model's input."""

    def __init__(self, c=8):
        super().__init__()
        self.blocks = nn.ModuleList(_MaskedBlock(c) for _ in range(2))

    def forward(self, x):
        mask = torch.sigmoid(x.mean(-1, keepdim=True))
        for b in self.blocks:
            x = b(x, mask)
        return x


class _GRN(nn.Module):
    """ConvNeXt-V2's global response norm: x + w * (x * nx) + b, a norm, not a block."""

    def __init__(self, c=8):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        nx = x.norm(dim=1, keepdim=True)
        x = x + torch.addcmul(self.bias, self.weight, x * nx)
        return x + self.fc(x).relu()


class _MobileOne(nn.Module):
    """MobileOne's training form: out = 0; out = out + bn(x); out += conv(x): one conv."""

    def __init__(self, c=8):
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = 0
        out = out + self.identity(x)
        out += self.conv(x)
        return torch.relu(out)


class _BlockWithInnerResidual(nn.Module):
    """A block whose branch holds a small residual block of its own (CSATv2's spatial gate)."""

    def __init__(self, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.gate = _ConvPosEncBlock(c).mlp.__class__(c)  # an MLP
        self.inner = nn.Linear(c, c)

    def forward(self, x):
        g = self.fc(x)
        g = g + self.gate(g)
        return x + self.inner(torch.sigmoid(g) * x)


class _Blocks(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.blocks = nn.Sequential(_BlockWithInnerResidual(c), _BlockWithInnerResidual(c))

    def forward(self, x):
        return self.blocks(x)


@pytest.mark.parametrize("model, inp, expected, code, reason", [
    (_ConvPosEncBlock(), (1, 8, 4, 4), 3, "cpe", "conv position encoding"),
    (_DepthwiseSums(), (1, 8, 4, 4), 1, "reparam-dw-sum", "sum of depthwise linear maps"),
    (_RepBranches(), (1, 8, 4, 4), 1, "reparam-conv", "multi-branch conv"),
    (_SplitSum(), (1, 8, 4, 4), 0, "split-and-sum", "split-and-sum"),
    (_SizedPosEmbed(), (1, 5, 8), 0, "pos-embedding", "share no input"),
    (_MaskedBlocks(), (1, 5, 8), 2, "inner-add", "inside a larger computation"),
    (_GRN(), (2, 8), 1, "elementwise-norm", "a normalisation"),
    (_MobileOne(), (1, 8, 4, 4), 0, "reparam-conv", "e.g. MobileOne"),
    (_Blocks(), (2, 8), 2, "nested", "nested inside the branch of the residual in 'blocks.0'"),
])
def test_residual_shaped_adds_that_are_not_blocks(model, inp, expected, code, reason):
    model.eval()
    an = sdsurgery.analyse(model)
    assert len(an.residuals) == expected, an.residuals
    assert any(r.code == code and reason in r.reason for r in an.rejected), an.rejected
    if expected:  # the blocks that are found still gate and fold
        x = torch.randn(*inp)
        conv = sdsurgery.convert(model, drop_rate=0.5, seed=0).eval()
        with torch.no_grad():
            ref = conv(x)
            assert torch.allclose(sdsurgery.fold(conv, keep_scale=True)(x), ref, atol=1e-5)


def test_side_input_blocks_are_the_two_root_adds():
    assert [r.owner for r in sdsurgery.find_residuals(_MaskedBlocks().eval())] == ["blocks.0", "blocks.1"]


def test_repvgg_sum_keeps_the_block_residual():
    r, = sdsurgery.find_residuals(_RepBranches().eval())
    assert r.shortcut_modules == ("identity",) and {"k1.0", "k3.0"} <= set(r.modules)


def test_full_linear_branch_is_still_a_residual():
    names = [r.name for r in sdsurgery.find_residuals(_ConvPosEncBlock().eval())]
    assert names == ["mixer", "mlp", "lin"]


def test_residuals_inside_timm_leaves_are_found_gated_and_folded():
    model = timm.create_model("nf_regnet_b0", pretrained=False).eval()  # NormFreeBlock is a leaf
    residuals = sdsurgery.find_residuals(model)
    assert len(residuals) == 16 and residuals[0].owner == "stages.0.0"
    assert [r.index for r in residuals] == list(range(16))
    for p in model.parameters():
        if p.dim() <= 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    conv = sdsurgery.convert(model, drop_rate=0.5, seed=0)
    assert len(sdsurgery.gates(conv)) == 16
    conv.train()
    conv(x).mean().backward()
    conv.eval()
    with torch.no_grad():
        ref = conv(x)
        out = sdsurgery.fold(conv, keep_scale=True)(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_hooked_gates_keep_their_scale_where_it_cannot_be_folded():
    # a forward that also branches on the batch size cannot be rewritten: gates on hooks only
    model = nn.Sequential(SizeBranching(gelu_last=True, batch_check=True)).eval()
    x = torch.randn(2, 4, 4, 8)
    with pytest.warns(UserWarning, match="masking"):
        converted = sdsurgery.convert(model, drop_rate=0.5, seed=0, example=x).eval()
    with pytest.raises(sdsurgery.FoldError, match="'0.mlp'"):
        sdsurgery.fold(converted)
    folded = sdsurgery.fold(converted, keep_scale=True)
    assert [g.name for g in sdsurgery.gates(folded)] == ["0.mlp"] and sdsurgery.gates(folded)[0].frozen
    assert not folded[0].drop_path1._forward_hooks and len(folded[0].drop_path2._forward_hooks) == 1
    with torch.no_grad():
        assert torch.allclose(folded.train()(x), converted(x), atol=1e-6)  # frozen: eval behaviour


def test_rewritten_size_branching_block_keeps_an_unfoldable_scale_at_every_size():
    model = nn.Sequential(SizeBranching(gelu_last=True)).eval()
    x, other = torch.randn(2, 4, 4, 8), torch.randn(3, 6, 6, 8)
    converted = sdsurgery.convert(model, drop_rate=0.5, seed=0, example=x).eval()
    folded = sdsurgery.fold(converted, keep_scale=True).eval()
    assert "forward" in folded[0].__dict__ and len(folded[0].drop_path2._forward_hooks) == 1
    assert [(g.name, g.frozen) for g in sdsurgery.gates(folded) if g.drop_prob] == [("0.mlp", True)]
    with torch.no_grad():
        for inp in (x, other):
            assert torch.allclose(folded(inp), converted(inp), atol=1e-6)


def test_timm_leaves_that_branch_on_sizes_are_traced_on_an_example():
    model = timm.create_model("tiny_vit_5m_224", pretrained=False).eval()  # TinyVitBlock: a leaf
    x = torch.randn(1, 3, 224, 224)
    an = sdsurgery.analyse(model, example=x)
    assert not [r for r in an.rejected if "were not searched" in r.reason]
    assert len(an.residuals) == 22  # 2 MBConv blocks + 10 TinyVitBlocks x (attention, MLP)
    tails = [r.tail for r in an.residuals if r.owner == "stages.1.blocks.0"]
    assert tails == ["stages.1.blocks.0.drop_path1", "stages.1.blocks.0.drop_path2"]
    conv = sdsurgery.convert(model, drop_rate=0.5, seed=0, example=x)
    assert len(sdsurgery.gates(conv)) == 22 and not any(g.masked for g in sdsurgery.gates(conv))
    conv.train()(x).mean().backward()
    with torch.no_grad():
        ref = conv.eval()(x)
        out = sdsurgery.fold(conv)(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("name, kwargs, residuals, codes", [
    ("eva02_tiny_patch14_224", dict(img_size=56), 24, {"pos-embedding", "rotary"}),
    ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1)), 8, {"cpe"}),
    ("res2net50_14w_8s", {}, 16, {"split-and-sum"}),
    ("convnextv2_atto", {}, 12, {"elementwise-norm"}),
    ("mobileone_s0", {}, 18, {"reparam-conv"}),
    ("fastvit_t8", {}, 10, {"reparam-conv", "reparam-dw-sum"}),
])
def test_timm_adds_that_are_not_blocks_carry_their_codes(name, kwargs, residuals, codes):
    """Models written by others: each pattern the rules name is recognised where timm has it
    (rotary in EVA-02, CPE in Twins, split-and-sum in Res2Net, GRN in ConvNeXt-V2,
    re-parameterisable branches in MobileOne / FastViT), and no other code appears."""
    an = sdsurgery.analyse(timm.create_model(name, pretrained=False, **kwargs).eval())
    assert len(an.residuals) == residuals
    assert {r.code for r in an.rejected} == codes, [(r.code, r.reason) for r in an.rejected][:5]


class _AddUNet(nn.Module):
    """A U-Net whose skips are adds: ``lateral(enc) + upsample(deeper)``."""

    def __init__(self, c=8):
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.lat = nn.Conv2d(c, c, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        e1 = torch.relu(self.enc1(x))
        e2 = torch.relu(self.enc2(e1))
        d = self.lat(e1) + self.up(e2)
        return d + self.block(d)  # the one residual block


def test_fpn_and_unet_top_down_adds_are_not_residuals():
    fpn = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
    an = sdsurgery.analyse(fpn.eval(), example=torch.randn(1, 3, 64, 64))
    assert len(an.residuals) == 16 and all(r.owner.startswith("body.") for r in an.residuals)
    assert [r.code for r in an.rejected] == ["top-down"] * 3
    an = sdsurgery.analyse(_AddUNet().eval())
    assert [r.name for r in an.residuals] == ["block"]
    assert [r.code for r in an.rejected] == ["top-down"]
