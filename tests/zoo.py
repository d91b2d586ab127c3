"""The architecture-coverage harness (issue 5): oracles nobody here wrote.

* timm: each residual branch has a drop-path slot (``drop_path``, ``drop_path1``, ``mlp_drop_path``
  ...: ``DropPath`` when the rate is > 0, ``Identity`` or ``None`` at 0). The model is built with
  ``drop_path_rate=0.1``, ``None`` slots get a counting identity, and in one eval forward pass each
  slot call's output is followed through the ops after it (a ``TorchFunctionMode``): the call
  counts when that value meets, in an add, a value it does not flow into (the shortcut). Blocks
  that call a slot but have no skip are not counted. The slots' parents are the blocks that
  must own the residuals found.
* Residual blocks timm leaves without a slot in otherwise slotted families (``UNSLOTTED``:
  block class -> adds per call, from their model code; e.g. GCViT's ``MbConvBlock``,
  ``x + conv_pw(se(act(conv_dw(x))))``) are added to the slot count, and the row says so.
* timm families built without ``drop_path_rate``: the residual blocks their model code documents
  (``STRUCTURAL``: block class -> adds per call), counted by forward hooks; 0 for families with
  no residual block (then ``convert`` must raise ``NoResidualsError``).
* torchvision: the blocks each architecture documents (``TV_BLOCKS``), or calls of its
  ``stochastic_depth`` / ``stochastic_dropout`` slots where it has them.

A row is ``ok`` (exact) when ``find_residuals`` finds exactly as many residuals as the oracle, in the
same blocks, a block-mode training step at drop rate 0.9 runs forward and backward, and the
folded model reproduces the gated model's eval output (relative error <= 1e-4, with layer
scales, norms and heads randomised so that every branch counts). ``foldable`` is how many
branches fold into existing weights with no leftover scale. ``masked`` is how many are gated by
masking their value (their block needs it anyway, or the block's forward cannot be rewritten):
they are dropped as the others, but a drop saves no compute. ``skip verified`` is counted, not
trusted: at drop rate 0.99, over three training forwards, the modules with parameters on each
other gate's branch that the gate says it skips (``gate.skips``: the part of the branch its block
does not need otherwise; those that run once per forward when every branch runs) must not run in
a forward where that gate dropped (module calls counted
with hooks, each gate's decisions recorded as it makes them); ``n/m`` = n of the m gates not
marked masked, and any gate that fails makes the row ``skip``. ``no oracle`` rows (NASNet,
PNASNet) have no reference count; they check that what is found gates and folds.

* transformers (tiny random configs of each family, the model object converted with a dict of
  keyword inputs): expected = the residuals its config implies (two per transformer layer, one
  per ResNet / ConvNeXt block).
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

import sdsurgery

SLOT = re.compile(r"^(\w+_)?drop_path\d*$")  # drop_path, drop_path1, mlp_drop_path (nextvit)
PREFERENCE = ["atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "18", "b0", "mini", "s"]


class _CountingSlot(nn.Identity):
    """Stands where a block keeps ``None`` for a drop-path slot at rate 0."""


def smallest_variant(names: list[str]) -> str:
    """A small model of a family, by name (building them all to compare sizes is too slow)."""
    for p in PREFERENCE:
        found = [n for n in names if re.search(rf"(^|_){p}(\d|_|$)", n)]
        if found:
            return sorted(found, key=len)[0]
    return sorted(names, key=len)[0]


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}


class _SlotFlow(torch.overrides.TorchFunctionMode):
    """Follows each slot call's output through the ops after it: the slot guards a residual
    branch when that value meets, in an add, a value it does not flow into (the shortcut).
    A block that calls its slot but has no skip (timm's BottleneckBlock when the shape changes)
    does not count."""

    def __init__(self):
        super().__init__()
        self.labels: dict[int, frozenset] = {}
        self.keep: list[torch.Tensor] = []  # ids stay unique while the labels are in use
        self.used: set[int] = set()

    def _of(self, value) -> frozenset:
        out = frozenset()
        if isinstance(value, torch.Tensor):
            return self.labels.get(id(value), out)
        if isinstance(value, (list, tuple)):
            for v in value:
                out |= self._of(v)
        elif isinstance(value, dict):
            for v in value.values():
                out |= self._of(v)
        return out

    def label(self, tensor: torch.Tensor, mark: int) -> None:
        self.labels[id(tensor)] = self._of(tensor) | {mark}
        self.keep.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        labels = self._of(args) | self._of(kwargs)
        if func in _ADDS and len(args) >= 2:
            a, b = self._of(args[0]), self._of(args[1])
            met = a ^ b
            self.used |= met
            labels -= met
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor) and labels:
                self.labels[id(t)] = labels
                self.keep.append(t)
        return out


def oracle(name: str, x: torch.Tensor, **kwargs) -> tuple[int, set[str]]:
    """Drop-path slot calls that guard a residual add, in one eval forward pass of timm model
    ``name``, and the qualified names of the modules holding those slots."""
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.1, **kwargs).eval()
    for module in list(model.modules()):
        for attr in [a for a in vars(module) if SLOT.match(a) and getattr(module, a) is None]:
            setattr(module, attr, _CountingSlot())
    flow = _SlotFlow()
    owners: dict[int, str] = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if SLOT.match(child_name):
                def hook(module, inputs, output, owner=parent_name):
                    out = output.clone()  # a value of its own, even where the slot is an identity
                    mark = len(owners)
                    owners[mark] = owner
                    flow.label(out, mark)
                    return out
                child.register_forward_hook(hook)
    with torch.no_grad(), flow:
        model(x)
    return len(flow.used), {owners[m] for m in flow.used}


# timm families built without a drop-path argument: their residual blocks as the model code
# documents them (block class -> residual adds per call; 0 = the family has none).
STRUCTURAL: dict[str, dict[str, object]] = {
    "convmixer": {"Residual": lambda m: 1},                      # fn(x) + x
    "dla": {"DlaBasic": lambda m: 1, "DlaBottleneck": lambda m: 1, "DlaBottle2neck": lambda m: 1,
            "DlaRoot": lambda m: int(bool(m.shortcut))},
    "dpn": {"DualPathBlock": lambda m: 1},                       # resid = x_s1 + out1
    "efficientvit_mit": {"ResidualBlock": lambda m: int(m.shortcut is not None and m.main is not None)},
    "efficientvit_msra": {"ResidualDrop": lambda m: 1},
    "ghostnet": {"GhostBottleneck": lambda m: 1},                # x += shortcut(shortcut)
    "hrnet": {"BasicBlock": lambda m: 1, "Bottleneck": lambda m: 1},
    "inception_resnet_v2": {"Block35": lambda m: 1, "Block17": lambda m: 1, "Block8": lambda m: 1},
    "lcnetv2": {"RepDepthwiseSeparable": lambda m: int(m.use_shortcut)},
    "repghost": {"RepGhostBottleneck": lambda m: 1},
    "repvit": {"RepViTBlock": lambda m: 1, "RepVitDownsample": lambda m: 1},  # identity + mlp(x)
    "senet": {"SEBottleneck": lambda m: 1, "SEResNetBottleneck": lambda m: 1,
              "SEResNeXtBottleneck": lambda m: 1, "SEResNetBlock": lambda m: 1},
    "shvit": {"Residual": lambda m: 1},
    "xception": {"Block": lambda m: 1},                           # x += skip
    "densenet": {}, "inception_v3": {}, "inception_v4": {}, "vgg": {}, "selecsls": {},
}


# Residual blocks without a drop-path slot in families that slot the others (block class ->
# residual adds per call), read from their model code.
UNSLOTTED: dict[str, dict[str, object]] = {
    "gcvit": {"MbConvBlock": lambda m: 1},                          # x = x + shortcut
    "efficientformer_v2": {"Downsample": lambda m: int(m.attn is not None)},  # conv(x) + attn(x)
    "efficientvim": {"PatchMerging": lambda m: 2},                 # x + dwconv1(x), x + dwconv2(x)
}


def count_calls(model: nn.Module, x: torch.Tensor, blocks: dict[str, object],
                slot: re.Pattern | None = None) -> tuple[int, set[str]]:
    """Residual branches in one eval forward pass: per call of a block class in ``blocks``
    (class name -> branches per call), plus one per call of a child named like ``slot``; and
    the modules that own them."""
    calls, owners, handles = [0], set(), []
    for name, module in model.named_modules():
        count = blocks.get(type(module).__name__)
        if count is not None:
            def block_hook(m, *_, owner=name, count=count):
                if count(m):
                    calls[0] += count(m)
                    owners.add(owner)
            handles.append(module.register_forward_hook(block_hook))
        for child_name, child in module.named_children() if slot is not None else ():
            if slot.match(child_name):
                def slot_hook(*_, owner=name):
                    calls[0] += 1
                    owners.add(owner)
                handles.append(child.register_forward_hook(slot_hook))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return calls[0], owners


@dataclass
class ZooRow:
    family: str
    model: str
    found: int
    expected: int
    foldable: int
    status: str
    reason: str
    seconds: float
    masked: int = 0
    skip: str = ""  # "verified / checked" gates (see _skip_verified)


# Families with no reference count: their cells sum pairs of operations (NASNet, PNASNet). timm
# has no drop-path slot for them, and the papers' ScheduledDropPath drops every operation of
# every sum, a different regulariser from dropping residual branches. Their rows say what
# sdsurgery finds and check that it gates and folds; they do not count as exact.
NO_ORACLE = {
    "nasnet": "NAS cells sum pairs of operations; no reference says which sums are residuals",
    "pnasnet": "NAS cells sum pairs of operations; no reference says which sums are residuals",
}

# Families whose default input is too large for a CPU train step (gemma4_vit: 768 px).
ZOO_INPUT = {"gemma4_vit": (3, 224, 224)}


def check(family: str, name: str, tolerance: float = 1e-4) -> ZooRow:
    """Count, convert, train-step in block mode at a high rate, fold: one row of the table."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    size = ZOO_INPUT.get(family) or timm.create_model(name, pretrained=False).pretrained_cfg.get(
        "input_size", (3, 224, 224))
    x = torch.randn(2, *size)
    note = ""
    if family in NO_ORACLE:
        model = timm.create_model(name, pretrained=False).eval()
        expected, owners, what = None, set(), ""
    elif family in STRUCTURAL:
        model = timm.create_model(name, pretrained=False).eval()
        expected, owners = count_calls(model, x, STRUCTURAL[family])
        what = f"timm has {expected} residual blocks in its model code"
    else:
        expected, owners = oracle(name, x)
        model = timm.create_model(name, pretrained=False, drop_path_rate=0.1).eval()
        what = f"timm has {expected} drop-path slots"
        if family in UNSLOTTED:
            more, unslotted = count_calls(model, x, UNSLOTTED[family])
            expected, owners = expected + more, owners | unslotted
            what += f" + {more} unslotted residual blocks"
            note = f"expected includes residual blocks timm leaves unslotted ({', '.join(UNSLOTTED[family])})"
    row = judge(family, name, model, x, expected, owners, what, tolerance)
    if expected is None:
        row.status, row.reason = ("no oracle" if row.status == "ok" else row.status), \
            "; ".join(filter(None, [NO_ORACLE[family], row.reason]))
    elif note:
        row.reason = "; ".join(filter(None, [note, row.reason]))
    row.seconds = time.perf_counter() - t0
    return row


def judge(family: str, name: str, model: nn.Module, x: torch.Tensor, expected: int | None,
          owners: set[str], what: str, tolerance: float) -> ZooRow:
    """The row of ``model`` against an oracle (``expected`` residuals owned by ``owners``;
    None: no oracle, only gate and fold are checked)."""
    _randomize(model)
    residuals = sdsurgery.find_residuals(model, example=x)
    found = {_adder(r, owners) for r in residuals}
    row = ZooRow(family, name, len(residuals), -1 if expected is None else expected,
                 sum(r.fold_target is not None for r in residuals), "ok", "", 0.0)
    if expected == 0:
        if residuals:
            row.status, row.reason = "count", f"found {len(residuals)}, the model has no residual block"
        else:
            try:
                sdsurgery.convert(model)
                row.status, row.reason = "count", "converted a model with no residual block"
            except sdsurgery.NoResidualsError:
                pass
    elif expected is not None and len(residuals) != expected:
        row.status, row.reason = "count", f"found {len(residuals)}, {what}"
        modules = dict(model.named_modules())
        extra = Counter(type(modules[r.owner]).__name__ for r in residuals if _adder(r, owners) not in owners)
        if extra:
            row.reason += "; found in blocks without one: " + ", ".join(f"{k} x{v}" for k, v in extra.items())
        missing = Counter(type(modules[o]).__name__ for o in owners - found)
        if missing:
            row.reason += "; none found in: " + ", ".join(f"{k} x{v}" for k, v in missing.items())
    elif expected is not None and found != owners:
        row.status, row.reason = "owners", "the residuals found are not the blocks the oracle names"
    else:
        _step_and_fold(model, x, row, tolerance, residuals)
    return row


def _adder(r, owners: set[str]) -> str:
    """The module that performs the add: the owner, or for a lifted owner (the gate sits one
    module up, see Residual.inline) the inline child the oracle names."""
    inline = [f"{r.owner}.{p}" if r.owner else p for p in r.inline]
    return next((o for o in inline if o in owners), r.owner)


# ------------------------------------------------------------------------------ torchvision
# torchvision's residual blocks, as its model code documents them: residual branches per call.
# Blocks with a ``stochastic_depth`` slot (EfficientNet MBConv/FusedMBConv, ConvNeXt CNBlock,
# Swin blocks, MaxViT MBConv and partition-attention layers; ``stochastic_dropout`` there) are
# counted by slot calls instead,
# as for timm: only blocks with a skip call theirs.
TV_BLOCKS = {
    "BasicBlock": lambda m: 1, "Bottleneck": lambda m: 1,          # resnet, resnext, wide_resnet
    "ResBottleneckBlock": lambda m: 1,                              # regnet
    # mobilenet_v2, mobilenet_v3; shufflenet_v2's InvertedResidual concatenates (no attribute)
    "InvertedResidual": lambda m: int(getattr(m, "use_res_connect", False)),
    "_InvertedResidual": lambda m: int(m.apply_residual),           # mnasnet
    "EncoderBlock": lambda m: 2,                                    # vit: attention + MLP
}
TV_SLOT = re.compile(r"^stochastic_(depth|dropout)$")  # maxvit's attention layers: "dropout"
TV_INPUT = {"vit": 224, "maxvit": 224, "swin": 64, "inception": 96}


def tv_input(name: str) -> torch.Tensor:
    size = next((s for prefix, s in TV_INPUT.items() if name.startswith(prefix)), 64)
    return torch.randn(2, 3, size, size)


def check_torchvision(name: str, tolerance: float = 1e-4) -> ZooRow:
    """One torchvision classification model: count and owners against its blocks; a model
    with no residual block must raise NoResidualsError; then a block-mode step and fold."""
    import torchvision

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = tv_input(name)
    expected, owners = count_calls(model, x, TV_BLOCKS, TV_SLOT)
    row = judge("torchvision", name, model, x, expected, owners,
                f"the architecture has {expected}", tolerance)
    row.seconds = time.perf_counter() - t0
    return row


def _randomize(model: nn.Module) -> None:
    """Layer scales start at 1e-6 and heads at 0: make every branch count in the outputs."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    for p in model.parameters():
        if p.dim() <= 1:
            with torch.no_grad():
                p.uniform_(0.5, 1.5)


def _call(model: nn.Module, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def _skip_verified(converted: nn.Module, residuals, x, row: ZooRow, steps: int = 3) -> None:
    """At drop rate 0.99, over ``steps`` train forwards, the modules with parameters on each
    gate's branch must not run in a forward where its gate dropped it (each gate's decisions
    are recorded as it makes them). A gate marked masked is honest about running them; any
    other gate that runs them is a failure (status ``skip``)."""
    modules = dict(converted.named_modules())
    # Watch only modules that run once per forward when every branch runs (a module called in
    # two places would count calls that are not its branch's).
    once: Counter = Counter()
    handles = [mod.register_forward_hook(lambda mod, a, o, m=m: once.update([m]))
               for m, mod in modules.items() if any(True for _ in mod.parameters())]
    sdsurgery.set_drop_rate(converted, 0.0)
    converted.train()
    with torch.no_grad():
        _call(converted, x)
    for h in handles:
        h.remove()
    sdsurgery.set_drop_rate(converted, 0.99)
    gates = {g.name: g for g in sdsurgery.gates(converted)}
    decisions: dict[str, list] = {}
    for g in gates.values():
        def record(n, computed=False, g=g, own=type(g)._decide):
            d = own(g, n, computed)
            decisions.setdefault(g.name, []).append(d.keep)
            return d
        g._decide = record
    # What each gate says a drop skips must be on its residual's branch, and must not run.
    def skipped(m: str, skips) -> bool:  # skips name the block's children (block traces stop there)
        return any(m == k or m.startswith(k + ".") for k in skips)
    watch = {r.name: [m for m in r.modules if once.get(m) == 1 and skipped(m, gates[r.name].skips)]
             for r in residuals if r.name in gates and not gates[r.name].masked}
    calls: Counter = Counter()
    handles = [modules[m].register_forward_hook(lambda mod, a, o, m=m: calls.update([m]))
               for ms in watch.values() for m in set(ms)]
    bad: set[str] = set()
    converted.train()
    try:
        for _ in range(steps):
            calls.clear()
            decisions.clear()
            _call(converted, x)
            for name, ms in watch.items():
                dropped = decisions.get(name) and all(k is False for k in decisions[name])
                if dropped and any(calls[m] for m in ms):
                    bad.add(name)
    finally:
        for h in handles:
            h.remove()
        for g in gates.values():
            del g._decide
    checked = [n for n, ms in watch.items() if ms]
    row.skip = f"{len(checked) - len(bad & set(checked))}/{len(checked)}"
    if bad and row.status == "ok":
        first = sorted(bad)[0]
        row.status, row.reason = "skip", (f"{len(bad)} gates not marked masked still run their branch "
                                          f"when dropped (first: {first})")


def _step_and_fold(model: nn.Module, x, row: ZooRow, tolerance: float, residuals=()) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = sdsurgery.convert(model, drop_rate=0.9, schedule="uniform", seed=0, example=x)
    gated = len(sdsurgery.gates(converted))
    row.masked = sum(bool(g.masked) for g in sdsurgery.gates(converted))
    if gated != row.found:
        first = next((str(w.message) for w in caught if "sdsurgery" in str(w.message)), "")
        row.status, row.reason = "gated", f"{gated} of {row.found} gated; {first[:200]}".replace("|", "/")
    converted.train()
    _first(_call(converted, x)).float().mean().backward()
    converted.eval()
    folded = sdsurgery.fold(converted, keep_scale=True).eval()
    with torch.no_grad():
        a, b = _first(_call(converted, x)), _first(_call(folded, x))
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if rel > tolerance:
        row.status, row.reason = "fold", f"folded differs by {rel:.1e}"
    if residuals:
        _skip_verified(converted, residuals, x, row)


def families() -> dict[str, str]:
    """One small variant per timm model module."""
    out = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            out[module] = smallest_variant(names)
    return out


# ------------------------------------------------------------------------------ transformers
def _hf_cases() -> dict:
    """name -> (model factory, example inputs, expected residuals from the config)."""
    import transformers as T

    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    ids = {"input_ids": torch.randint(0, 50, (2, 8))}
    vit = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32)
    text = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16)
    return {
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**vit, num_labels=3)), x, 4),
        "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**vit, num_labels=3)), x, 4),
        "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**vit, num_labels=3, drop_path_rate=0.1)), x, 4),
        "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**{k: v for k, v in vit.items() if k != "intermediate_size"},
                                                         drop_path_rate=0.1)), x, 4),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, drop_path_rate=0.2, num_labels=3)), x, 3),
        "convnextv2": (lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(
            hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, drop_path_rate=0.2, num_labels=3)), x, 3),
        "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_labels=3)), x, 3),
        "swinv2": (lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
            num_labels=3, drop_path_rate=0.1)), x, 4),
        "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**text, num_labels=3)), ids, 4),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                                        n_head=2, use_cache=False)), ids, 4),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=16, use_cache=False)), ids, 4),
        "roberta": (lambda: T.RobertaForMaskedLM(T.RobertaConfig(**text, pad_token_id=1)), ids, 4),
    }


def check_transformers(name: str, tolerance: float = 1e-4) -> ZooRow:
    """One transformers family: the model object, converted with a dict of keyword inputs."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    make, x, expected = _hf_cases()[name]
    model = make().eval()
    _randomize(model)
    residuals = sdsurgery.find_residuals(model, example=x)
    row = ZooRow("transformers", type(model).__name__, len(residuals), expected,
                 sum(r.fold_target is not None for r in residuals), "ok", "", 0.0)
    if len(residuals) != expected:
        row.status, row.reason = "count", f"found {len(residuals)}, the config implies {expected}"
    else:
        _step_and_fold(model, x, row, tolerance, residuals)
    row.seconds = time.perf_counter() - t0
    return row
