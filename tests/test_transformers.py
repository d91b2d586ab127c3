"""HF transformers models, used the HF way: the model object itself, keyword example inputs.

Tiny random configs. For each: every residual found (2 per layer, 1 per ResNet/ConvNeXt
block), the class and ``ModelOutput`` kept, state_dict keys unchanged, no gate masked, dropped
branches not computed (counted module calls against the gates' own decisions), fold exact,
and ``save_pretrained`` / ``from_pretrained`` of the folded model round-trip.
"""
import collections
import warnings

import pytest
import torch
import torch.nn as nn

import sdsurgery
from conftest import replay_keeps

import transformers as T  # a test dependency (pyproject [test]); for users the [hf] extra


def _x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _ids():
    return torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


_VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32)
_TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=16)
CASES = {
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**_VIT, num_labels=3)), "pixel_values", 4),
    "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**_VIT, num_labels=3, drop_path_rate=0.1,
                                                               layer_scale_init_value=0.1)), "pixel_values", 4),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**{k: v for k, v in _VIT.items() if k != "intermediate_size"},
                                                     drop_path_rate=0.1)), "pixel_values", 4),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, drop_path_rate=0.2, num_labels=3)), "pixel_values", 3),
    "convnextv2": (lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(
        hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, drop_path_rate=0.2, num_labels=3)), "pixel_values", 3),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_labels=3)), "pixel_values", 3),
    "swinv2": (lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
        num_labels=3, drop_path_rate=0.1)), "pixel_values", 4),
    # post-norm encoders: the adds sit in BertSelfOutput / BertOutput, the branches start in
    # their callers (the owner is lifted, the child traced inline)
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**_TEXT, num_labels=3)), "input_ids", 4),
    "roberta": (lambda: T.RobertaForMaskedLM(T.RobertaConfig(**_TEXT, pad_token_id=1)), "input_ids", 4),
    # LayerDrop (Fan et al. 2019) on decoder LMs, trained without a KV cache
    "gpt2": (lambda: _gpt2(use_cache=False), "input_ids", 4),
    "llama": (lambda: _llama(use_cache=False), "input_ids", 4),
}


def _gpt2(use_cache):
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                          use_cache=use_cache, bos_token_id=0, eos_token_id=0))


def _llama(use_cache):
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, use_cache=use_cache))


def _example(key):
    return {key: _x() if key == "pixel_values" else _ids()}


def _counted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, T.pytorch_utils.Conv1D))


def _module_calls(model: nn.Module, example: dict, steps: int) -> collections.Counter:
    """Calls of every conv / linear module over ``steps`` train forwards."""
    counts = collections.Counter()
    handles = [mod.register_forward_hook(lambda m, a, o, name=name: counts.update([name]))
               for name, mod in model.named_modules() if _counted(mod)]
    model.train()
    for _ in range(steps):
        model(**example)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_models_convert_skip_and_fold(name, tmp_path):
    make, key, expected = CASES[name]
    model = make().eval()
    example = _example(key)
    with torch.no_grad():
        ref = model(**example)
    keys = list(model.state_dict())
    residuals = sdsurgery.find_residuals(model, example=example)
    assert len(residuals) == expected, residuals
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left ungated or masked
        conv = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform", example=example, seed=0)
    gates = sdsurgery.gates(conv)
    assert type(conv) is type(model) and len(gates) == expected and not any(g.masked for g in gates)
    assert list(conv.state_dict()) == keys
    with torch.no_grad():  # at drop rate 0 the converted model is the original
        sdsurgery.set_drop_rate(conv, 0.0)
        torch.testing.assert_close(conv.eval()(**example)[0], ref[0], rtol=1e-5, atol=1e-6)
        sdsurgery.set_drop_rate(conv, 0.5)
    # Skipping, counted: every conv / linear of a branch runs exactly when its gate keeps it.
    kept = replay_keeps(conv, 8)
    counts = _module_calls(conv, example, steps=8)
    assert 0 < sum(kept.values()) < 8 * len(gates)
    checked = 0
    for r in residuals:
        # the branch's modules (GPT-2's Conv1D layers are traced through: those under its name)
        under = {n for n, _ in conv.named_modules()
                 if any(n.startswith(p + ".") for p in (r.name, *r.modules))} - set(r.shortcut_modules)
        for m in set(r.modules) | under:
            if _counted(conv.get_submodule(m)):
                assert counts[m] == kept[r.name], (r.name, m, counts[m], kept[r.name])
                checked += 1
    assert checked >= len(residuals)
    # eval: the converted model's output type; fold exact; save_pretrained round-trip
    conv.eval()
    with torch.no_grad():
        out = conv(**example)
        assert type(out) is type(ref)
        folded = sdsurgery.fold(conv)
        torch.testing.assert_close(folded(**example)[0], out[0], rtol=1e-5, atol=1e-6)
    assert type(folded) is type(model) and not sdsurgery.is_converted(folded)
    drops = {n: m.drop_prob for n, m in model.named_modules() if type(m).__name__.endswith("DropPath")}
    assert {n: m.drop_prob for n, m in conv.named_modules() if n in drops} == dict.fromkeys(drops, 0.0)
    assert {n: m.drop_prob for n, m in folded.named_modules() if n in drops} == drops  # restored
    folded.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**example)[0], folded(**example)[0])


def test_bert_post_norm_branches_are_lifted_to_the_module_that_runs_them_whole():
    """BertOutput adds ``dense(h)`` to its input inside the child, ``h = intermediate(x)``
    computed by BertLayer; BertAttention returns its attention weights beside the output
    (BertLayer throws them away). The owners are lifted (BertLayer, with BertOutput and
    BertAttention traced inline), so a drop skips the whole branch, attention included. Names
    stay those of the modules that add."""
    model = T.BertForSequenceClassification(T.BertConfig(**_TEXT, num_labels=3)).eval()
    example = _example("input_ids")
    residuals = sdsurgery.find_residuals(model, example=example)
    assert [r.name for r in residuals] == [f"bert.encoder.layer.{i}.{m}" for i in (0, 1)
                                           for m in ("attention.output", "output")]
    assert {r.name: (r.owner, r.inline, r.outside) for r in residuals}["bert.encoder.layer.0.output"] == \
        ("bert.encoder.layer.0", ("output",), ())
    conv = sdsurgery.convert(model, drop_rate=0.5, example=example, seed=0)
    gates = {g.name: g for g in sdsurgery.gates(conv)}
    assert not any(g.masked for g in gates.values())
    assert "bert.encoder.layer.0.attention.self" in gates["bert.encoder.layer.0.attention.output"].skips
    assert "bert.encoder.layer.0.intermediate" in gates["bert.encoder.layer.0.output"].skips
    layer = conv.bert.encoder.layer[0]
    assert {n for n, m in layer.named_children() if isinstance(m, sdsurgery.StochasticDepthGate)} == \
        {"sd_gate_0", "sd_gate_1"}  # both gates in BertLayer, BertAttention traced inline


def test_swinv2_at_other_sizes_gates_through_its_shared_drop_path():
    """Swinv2Layer branches on sizes and takes them as a tuple argument; one drop_path module
    ends both of its branches. Rewritten for the example's sizes (fx flattens the tuple into
    asserted leaves, which get the example's values); at another size the layer runs its own
    forward and each gate takes its own call of the shared drop_path (the first call is the
    attention branch, the second the MLP): eval exact against the folded model, training
    masks with a warning."""
    model = CASES["swinv2"][0]().eval()
    an = sdsurgery.analyse(model, example=_example("pixel_values"))
    assert [(r.tail, r.tail_call) for r in an.residuals][:2] == [
        ("swinv2.encoder.layers.0.blocks.0.drop_path", (0, 2)), ("swinv2.encoder.layers.0.blocks.0.drop_path", (1, 2))]
    assert {r.code for r in an.rejected} == {"pos-embedding"}
    conv = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform", example=_example("pixel_values"), seed=0)
    other = {"pixel_values": torch.randn(2, 3, 48, 48)}
    with torch.no_grad():
        folded = sdsurgery.fold(conv.eval())
        torch.testing.assert_close(folded(**other).logits, conv(**other).logits, rtol=1e-5, atol=1e-6)
        sdsurgery.set_drop_rate(conv, 0.0)
        torch.testing.assert_close(conv(**other).logits, model(**other).logits, rtol=1e-5, atol=1e-6)
    sdsurgery.set_drop_rate(conv, 0.5)
    conv.train()
    with pytest.warns(UserWarning, match=r"Swinv2Layer called with hidden_states of size \(2, 144, 8\) \(converted for \(B, \*\(64, 8\)\)\).*masked, not skipped"):
        conv(**other).logits.sum().backward()


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_decoder_lms_called_with_a_kv_cache_fall_back_to_masking(make):
    """With the default ``use_cache=True`` the decoder layers are converted for calls without a
    cache (how they are trained); a call with one (generation, or training with the cache on)
    runs the layer's own forward with its gates at the branch tails: eval stays exact and
    ``generate`` gives the folded model's tokens; training masks and says why."""
    ids = _example("input_ids")
    model = make(True).eval()
    conv = sdsurgery.convert(model, drop_rate=0.5, example=ids, seed=0)
    gates = sdsurgery.gates(conv)
    assert len(gates) == 4 and not any(g.masked for g in gates)
    conv.train()
    with pytest.warns(UserWarning, match=r"called with (cache|past_key_values)=<DynamicCache>.*masked, not skipped.*use_cache=False"):
        conv(**ids).logits.sum().backward()
    conv.eval()
    with torch.no_grad():
        folded = sdsurgery.fold(conv)
        torch.testing.assert_close(folded(**ids).logits, conv(**ids).logits, rtol=1e-5, atol=1e-6)
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(conv.generate(ids["input_ids"], **kw), folded.generate(ids["input_ids"], **kw))


def test_decoder_lm_with_padding_mask_skips_for_padded_and_unpadded_batches():
    """Converted on a padded batch (the layers get a 4-d mask tensor: an input, not a
    constant), calls with that mask, with none, and at another length all run the rewritten
    layers (no masking fallback) and skip dropped branches."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    conv = sdsurgery.convert(_llama(False), drop_rate=0.5, schedule="uniform",
                             example={"input_ids": ids, "attention_mask": mask}, seed=0)
    for call in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}, {"input_ids": ids[:, :5]}):
        kept = replay_keeps(conv, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            counts = _module_calls(conv, call, steps=4)
        assert 0 < sum(kept.values()) < 4 * 4  # some dropped, some kept
        for layer in ("model.layers.0", "model.layers.1"):
            assert counts[f"{layer}.self_attn.q_proj"] == kept[f"{layer}.self_attn"], (call.keys(), layer)
            assert counts[f"{layer}.mlp.down_proj"] == kept[f"{layer}.mlp"], (call.keys(), layer)


def test_a_converted_lm_checkpoint_rebuilds_its_token_example(tmp_path):
    """The example's keyword inputs (shapes and dtypes) are in the checkpoint's metadata, so
    load() converts the rebuilt model as it was converted (layers rewritten for token inputs,
    not masked), and the weights load into it."""
    ids = _example("input_ids")
    torch.manual_seed(0)
    conv = sdsurgery.convert(_llama(False), drop_rate=0.2, example=ids, seed=0).eval()
    path = sdsurgery.save(conv, tmp_path / "lm.safetensors", spec="my_lms:llama")
    meta = sdsurgery.read_metadata(path)["stochastic_depth"]
    assert meta["example_inputs"] == {"input_ids": {"shape": [2, 8], "dtype": "int64"}}
    loaded = sdsurgery.load(path, factory=lambda **kw: _llama(False)).eval()
    gates = sdsurgery.gates(loaded)
    assert [g.name for g in gates] == [g.name for g in sdsurgery.gates(conv)] and not any(g.masked for g in gates)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, conv(**ids).logits)


def test_bad_example_inputs_metadata_is_one_clear_error(tmp_path):
    import json

    from safetensors.torch import load_file, save_file
    conv = sdsurgery.convert(_llama(False), example=_example("input_ids"), seed=0)
    path = sdsurgery.save(conv, tmp_path / "lm.safetensors", spec="my_lms:llama")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    meta = json.loads(header["sdsurgery"])
    meta["stochastic_depth"]["example_inputs"] = {"input_ids": {"shape": [2, 8], "dtype": "object"}}
    save_file(load_file(str(path)), str(path), metadata={"sdsurgery": json.dumps(meta)})
    with pytest.raises(sdsurgery.CheckpointError, match="metadata is corrupt .*example_inputs dtype must be one of") as e:
        sdsurgery.load(path, factory=lambda **kw: _llama(False))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_a_compiled_decoder_lm_trains_like_the_eager_one(build):
    """torch.compile (dynamo, eager backend) of a converted decoder LM: the same losses as the
    eager model for the same draws, step by step, and no recompile-limit fallback."""
    import copy
    import logging

    torch.manual_seed(0)
    ids = _ids()
    model = build(False)
    for m in model.modules():  # GPT-2's dropouts draw from the global RNG, differently compiled
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    eager = sdsurgery.convert(model, drop_rate=0.5, schedule="uniform", seed=3, example={"input_ids": ids})
    twin = copy.deepcopy(eager)
    torch.compiler.reset()
    compiled = torch.compile(twin, backend="eager")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        losses = {"eager": [], "compiled": []}
        for _ in range(6):
            for name, m in (("eager", eager), ("compiled", compiled)):
                m.train()
                out = m(input_ids=ids, labels=ids)
                out.loss.backward()
                losses[name].append(out.loss.item())
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch.compiler.reset()
    torch.testing.assert_close(losses["compiled"], losses["eager"])
    assert len(set(round(v, 6) for v in losses["eager"])) > 1
    assert not [m for m in messages if "recompile" in m], messages
