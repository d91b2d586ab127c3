"""Each private torch API sdsurgery uses (all in sdsurgery/_compat.py) still does what it relies on."""
import copy
import re
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from sdsurgery import _compat


def test_private_base_classes_cover_the_public_layers():
    assert all(issubclass(c, _compat.BATCH_NORM) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm))
    assert issubclass(nn.InstanceNorm2d, _compat.INSTANCE_NORM)
    assert all(issubclass(c, _compat.CONV) for c in (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d))
    assert all(issubclass(c, _compat.POOLS) for c in (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d))
    assert _compat.BATCH_NORM.forward is nn.BatchNorm2d.forward  # fold matches BatchNorm by its forward


def test_slots_include_the_ones_set_to_none():
    lin = nn.Linear(2, 2, bias=False)
    lin.register_buffer("stat", None)
    lin.add_module("gone", None)
    assert list(_compat.parameters_of(lin)) == ["weight", "bias"] and _compat.parameters_of(lin)["bias"] is None
    assert list(_compat.buffers_of(lin)) == ["stat"]
    assert list(_compat.children_of(lin)) == ["gone"]


def test_forward_hooks_are_removed_by_key_after_a_deepcopy():
    calls = []
    m = nn.Linear(2, 2)
    key = m.register_forward_hook(lambda *a: calls.append(1)).id
    twin = copy.deepcopy(m)
    _compat.remove_forward_hook(twin, key)
    twin(torch.zeros(1, 2))
    m(torch.zeros(1, 2))
    assert calls == [1]


def test_pytree_specs_of_a_graph_traced_on_a_tuple_input():
    class Pair(nn.Module):
        def forward(self, xy):
            return xy[0] + xy[1]

    gm = fx.symbolic_trace(Pair(), concrete_args={"xy": (fx.PH, fx.PH)})
    assert _compat.pytree_info(gm.graph) is not None
    src = gm.graph.python_code(root_module="self").src
    assert _compat.SPEC_ATTRS[0] in src
    assert _compat.pytree_info(fx.symbolic_trace(nn.Linear(2, 2)).graph) is None


def test_fx_patches_are_undone_inside_a_trace():
    original = nn.Module.__call__
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["patched"] = nn.Module.__call__ is not original
            with _compat.without_fx_patches():
                seen["undone"] = nn.Module.__call__ is original
            seen["again"] = nn.Module.__call__ is not original
            return x + 1

    fx.symbolic_trace(Probe())
    assert seen == {"patched": True, "undone": True, "again": True}


def test_no_private_torch_name_outside_compat():
    private = re.compile(r"\._(BatchNorm|InstanceNorm|ConvNd|AvgPoolNd|MaxPoolNd|AdaptiveAvgPoolNd|modules|"
                         r"parameters|buffers|forward_hooks|forward_pre_hooks|codegen|in_spec|out_spec|canonical_mask|"
                         r"none_or_dtype|detect_is_causal_mask|version|top_saved_tensors_default_hooks)\b|"
                         r"_maybe_revert_all_patches|timm\.layers\._fx|layers import _fx")
    package = Path(_compat.__file__).parent
    found = [f"{p.name}:{i}" for p in package.rglob("*.py") if p.name != "_compat.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not found


def test_transformer_mask_helpers():
    """What nn.TransformerEncoder(Layer) canonicalise masks with: a bool key-padding mask
    becomes an additive float mask; a square causal mask is detected."""
    pad = torch.tensor([[False, True]])
    out = _compat.canonical_mask(mask=pad, mask_name="m", other_type=_compat.none_or_dtype(None),
                                 other_name="o", target_type=torch.float32)
    assert out.dtype == torch.float32 and out[0, 0] == 0 and out[0, 1] == float("-inf")
    causal = nn.Transformer.generate_square_subsequent_mask(3)
    assert _compat.detect_is_causal_mask(causal, None, 3) is True
    assert _compat.detect_is_causal_mask(None, None, 3) is False


def test_compiler_backends_by_name_are_callables_dynamo_accepts():
    seen = []
    eager = _compat.compiler_backend("eager")

    def counting(gm, example_inputs):
        seen.append(gm)
        return eager(gm, example_inputs)

    torch.compiler.reset()
    f = torch.compile(lambda x: torch.relu(x) + 1, backend=counting)
    torch.testing.assert_close(f(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 3.0]))
    assert len(seen) == 1 and callable(_compat.compiler_backend("inductor"))
    torch.compiler.reset()


def test_the_saved_tensor_hooks_in_force_and_version_counters():
    assert _compat.saved_tensors_hooks_now() is None

    def pack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, pack):
        assert _compat.saved_tensors_hooks_now() == (pack, pack)
    assert _compat.saved_tensors_hooks_now() is None
    t = torch.zeros(2)
    v = _compat.version_of(t)
    t.add_(1)
    assert _compat.version_of(t) == v + 1


def test_graph_task_is_an_id_only_while_autograd_runs_backward():
    from sdsurgery._compat import graph_task
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(graph_task())
            return g

    x = torch.ones(2, requires_grad=True)
    assert graph_task() is None
    Probe.apply(x).sum().backward()
    Probe.apply(x).sum().backward()
    assert all(isinstance(t, int) for t in seen) and seen[0] != seen[1] and graph_task() is None
