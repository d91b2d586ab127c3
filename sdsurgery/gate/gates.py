"""The stochastic-depth gate that replaces a residual add, and the state the gates share.

A gate is called by its block's rewritten forward as ``gate(branch, shortcut, *inputs)``:
``branch`` is the residual branch as a function of ``inputs``; the gate decides whether to run
it. That is what makes a dropped branch free: its modules are never called, forward or
backward.
"""
from __future__ import annotations

import collections
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .._compat import graph_task, saved_tensors_hooks_now, version_of
from ..errors import NotConvertedError
from .schedules import Schedule, check_rate, rescale, spread

__all__ = ["MODES", "SCALINGS", "CONTROLLER_ATTR", "FOLDED_ATTR", "FOLDED_FROM_ATTR", "Decision", "decide",
           "GateController", "GateSpec", "StochasticDepthGate", "GateHook", "gate_caller", "own_code",
           "converted_parts", "controller_of", "is_converted", "installed_gates"]

MODES = ("block", "sample")
SCALINGS = ("expectation", "inverted")
CONTROLLER_ATTR = "_sdsurgery"
FOLDED_ATTR = "_sdsurgery_folded"  # set on a folded model (recorded in checkpoints)
FOLDED_FROM_ATTR = "_sdsurgery_folded_from"  # the controller a folded model was trained with


_REPLAYS = 64  # training decisions a gate keeps for activation checkpointing to replay


@dataclass(frozen=True)
class Decision:
    """What a gate does with its branch at one forward.

    ``keep``: None (every branch on: eval, frozen, or p = 0), True / False (block mode: the
    whole branch), or a bool tensor ``(n,)`` (sample mode: per sample). ``scale``: what a kept
    branch is multiplied by (``1 - p`` at eval with expectation scaling, ``1 / (1 - p)`` in
    training with inverted scaling, else 1).
    """

    keep: "bool | torch.Tensor | None"
    scale: float
    index: "torch.Tensor | None" = None  # sample mode, some samples kept: their indices


def decide(p: float, mode: str, scaling: str, n: int, generator: torch.Generator,
           training: bool) -> Decision:
    """The keep/drop decision of a gate, in one place: drop probability ``p``, ``mode``
    (``"block"``: one draw, ``"sample"``: ``n`` draws), ``scaling`` (``"expectation"`` |
    ``"inverted"``); draws come from ``generator`` only (never the global RNG)."""
    if p == 0.0:
        return Decision(None, 1.0)
    expectation = scaling == "expectation"
    if not training:
        return Decision(None, (1.0 - p) if expectation else 1.0)
    scale = 1.0 if expectation else 1.0 / (1.0 - p)
    if mode == "block":
        return Decision(not torch.rand((), generator=generator).item() < p, scale)
    return Decision(torch.rand(n, generator=generator) >= p, scale)


class GateController:
    """What all gates of one converted model share: settings and the random generator.

    Decisions come from ``generator`` (a CPU ``torch.Generator``), never from the global RNG:
    the same seed reproduces them exactly, and data-parallel ranks with the same seed drop
    the same branches at the same step. ``state_dict`` / ``load_state_dict`` save and restore
    it (accelerate's ``register_for_checkpointing`` accepts this object as it is).
    """

    def __init__(self, *, seed: int, schedule: Schedule, drop_rate: float, count: int,
                 mode: str, scaling: str):
        self.seed = int(seed)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self.schedule = schedule
        self.drop_rate = float(drop_rate)
        self.count = count  # residual branches found, gated or not (the schedule spans all)
        self.mode = mode
        self.scaling = scaling
        self.gates: list[StochasticDepthGate] = []
        self.installs: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []  # owner, gates, branch fns
        self.hooks: list[tuple[str, int, str]] = []  # hooked module, hook id, gate name
        self.neutralised: list[tuple[str, str, Any]] = []  # module, attribute, original value
        self.skipped: list[tuple[str, str]] = []  # residual name, reason
        self.settings: dict[str, Any] = {}  # the other convert() arguments, for checkpoints
        self._custom_probs: list[float] | None = None
        # training calls of the gates, and how many of them ran their branch (sample mode: the
        # kept share of the batch; masked gates always compute theirs): what really ran
        self.calls = 0
        self.ran = 0.0

    def probabilities(self, drop_rate: float) -> list[float]:
        if isinstance(self.schedule, str):
            return spread(self.schedule, drop_rate, self.count)
        if self._custom_probs is None:
            self._custom_probs = spread(self.schedule, drop_rate, self.count)
            return list(self._custom_probs)
        return rescale(self._custom_probs, drop_rate)

    def set_drop_rate(self, drop_rate: float) -> None:
        probs = self.probabilities(check_rate(drop_rate))
        for g in self.gates:
            g.drop_prob = probs[g.index]
        self.drop_rate = float(drop_rate)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drop_rate": self.drop_rate,
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.seed = int(state.get("seed", self.seed))
        if "drop_rate" in state:
            self.set_drop_rate(state["drop_rate"])

    def __repr__(self) -> str:
        return (f"GateController(gates={len(self.gates)}, drop_rate={self.drop_rate}, "
                f"schedule={self.schedule!r}, mode={self.mode!r}, scaling={self.scaling!r}, "
                f"seed={self.seed})")


@dataclass(frozen=True)
class GateSpec:
    """What a gate knows about its residual connection: the :class:`~sdsurgery.Residual`'s
    name, depth index, shortcut kind and fold plan, and how the branch was cut out of its block.

    Attributes:
        batched: per branch input, whether it has the batch dimension (sample mode gathers those).
        sample_fallback: sample mode runs the branch on every sample and masks (its inputs
            include sizes read from the full batch).
        masked: why the branch is masked rather than skipped (its block computes it anyway),
            or None: a dropped branch is not computed.
        skips: the modules a drop does not run (the branch's part its block does not need
            otherwise); empty for masked gates.
    """

    name: str
    index: int
    shortcut: str
    fold_target: str | None
    fold_params: tuple[str, ...]
    fold_blocker: str | None
    drop_modules: tuple[str, ...] = ()
    batched: tuple[bool, ...] = ()
    sample_fallback: bool = True
    masked: str | None = None
    skips: tuple[str, ...] = ()
    tail_call: tuple[int, int] | None = None  # see Residual.tail_call

    @classmethod
    def of(cls, residual: Any, **cut: Any) -> "GateSpec":
        """The spec of a :class:`~sdsurgery.Residual`, with ``cut`` (batched, sample_fallback,
        masked) from the rewrite."""
        return cls(name=residual.name, index=residual.index, shortcut=residual.shortcut,
                   fold_target=residual.fold_target, fold_params=residual.fold_params,
                   fold_blocker=residual.fold_blocker, drop_modules=residual.drop_modules,
                   tail_call=getattr(residual, "tail_call", None), **cut)


class StochasticDepthGate(nn.Module):
    """Replaces ``shortcut + branch`` of one residual connection.

    Training (``drop_prob = p > 0``):

    * ``mode="block"``: one draw per call; with probability ``p`` the branch is not run and the
      output is (a copy of) the shortcut.
    * ``mode="sample"``: one draw per sample; the branch runs on the kept samples only
      (gather, compute, ``index_add``). Branches whose inputs include sizes read from the
      full batch fall back to running on every sample and masking (``sample_fallback``).
    * ``scaling="expectation"``: kept branches are added as they are; ``"inverted"``: they are
      multiplied by ``1 / (1 - p)``.

    Eval: ``shortcut + (1 - p) * branch`` with expectation scaling, ``shortcut + branch`` with
    inverted scaling (the unmodified network). With ``p == 0`` the gate is a plain add.

    Shapes: ``shortcut`` and the branch output have the same shape ``(N, ...)``, batch first.
    """

    def __init__(self, spec: GateSpec, *, drop_prob: float, controller: GateController):
        super().__init__()
        self.spec = spec
        self.drop_prob = float(drop_prob)
        self.controller = controller
        self.frozen = False  # set by fold(keep_scale=True): always on, eval behaviour
        self.hook_bypass = False  # see GateHook
        self.tail_seen = 0  # calls of a tail called several times per forward (see GateHook)
        # grad-mode training decisions (the newest _REPLAYS) and the backward passes that replayed them
        self._recent: collections.deque[tuple[Decision, set]] = collections.deque(maxlen=_REPLAYS)

    # What the gate knows about its residual, read-only (see GateSpec).
    name = property(lambda self: self.spec.name)
    index = property(lambda self: self.spec.index)
    shortcut = property(lambda self: self.spec.shortcut)
    fold_target = property(lambda self: self.spec.fold_target)
    fold_params = property(lambda self: self.spec.fold_params)
    fold_blocker = property(lambda self: self.spec.fold_blocker)
    drop_modules = property(lambda self: self.spec.drop_modules)
    batched = property(lambda self: self.spec.batched)
    sample_fallback = property(lambda self: self.spec.sample_fallback)
    masked = property(lambda self: self.spec.masked)
    skips = property(lambda self: self.spec.skips)

    @property
    def survival_prob(self) -> float:
        return 1.0 - self.drop_prob

    @property
    def mode(self) -> str:
        return self.controller.mode

    @property
    def scaling(self) -> str:
        return self.controller.scaling

    def needs_scale(self) -> bool:
        """Whether eval mode scales the branch (what ``fold`` must put into the weights)."""
        return self.controller.scaling == "expectation" and self.drop_prob > 0.0

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, drop_prob={self.drop_prob:.4g}, mode={self.mode}, "
                f"scaling={self.scaling}" + (", masked" if self.masked else "")
                + (", frozen" if self.frozen else ""))

    @torch.compiler.disable  # drawn eagerly every step; compiled graphs never see the probability
    def _decide(self, n: int, computed: bool = False) -> "Decision":
        training = self.training and not self.frozen
        task = graph_task() if training else None
        if task is not None:
            return self._replay(task)
        d = decide(self.drop_prob, self.controller.mode, self.controller.scaling, n,
                   self.controller.generator, training)
        if d.keep is None:  # all on: the keep path (one compiled graph for both)
            d = Decision(True, d.scale)
        elif isinstance(d.keep, torch.Tensor):
            # Sample mode, resolved here (eagerly) so that what follows has no data-dependent
            # Python: no sample kept is a block drop, every sample kept a block keep.
            kept = int(d.keep.sum())
            d = (Decision(kept == n, d.scale) if kept in (0, n)
                 else Decision(d.keep, d.scale, d.keep.nonzero().squeeze(1)))
        if training:
            self.controller.calls += 1
            self.controller.ran += 1.0 if computed or d.keep is True else (
                0.0 if d.keep is False else len(d.index) / n)
            if torch.is_grad_enabled():  # a forward backward may recompute (checkpointing)
                self._recent.append((d, set()))
        return d

    def _replay(self, task: int) -> "Decision":
        """Activation checkpointing recomputes this block inside backward ``task``: it must make
        its forward's decision again, or the recomputed graph differs (and a dropped branch
        runs). The newest decision this backward has not replayed yet: backward recomputes the
        latest forward first, and a second backward of a retained graph replays it again."""
        for d, used in reversed(self._recent):
            if task not in used:
                used.add(task)
                return d
        raise RuntimeError(f"gate {self.name!r} is recomputed in backward without a forward decision "
                           f"to replay: activation checkpointing is supported in its non-reentrant form "
                           f"(timm's default; torch.utils.checkpoint(..., use_reentrant=False))")

    def forward(self, branch: Callable[..., torch.Tensor], shortcut: torch.Tensor | None,
                *inputs: Any) -> torch.Tensor:
        if shortcut is None:  # a value the block adds in parts (ReXNet's slices): masked
            return self.mask(branch(*inputs))
        return self._through(self._decide(shortcut.shape[0]), branch, shortcut, inputs)

    def _through(self, d: Decision, branch: Callable[..., torch.Tensor], shortcut: torch.Tensor,
                 inputs: tuple) -> torch.Tensor:
        """``shortcut`` plus the branch as decision ``d`` lets it through."""
        if d.keep is True:
            out = branch(*inputs)
            return shortcut + (out if d.scale == 1.0 else out * d.scale)
        return (_dropped if d.keep is False else _some_kept)(self, d, branch, shortcut, inputs)

    def mask(self, out: torch.Tensor) -> torch.Tensor:
        """The branch value ``out``, computed already, as the gate lets it through: zeros when
        dropped (block mode), zeroed on dropped samples (sample mode), scaled as ``forward``
        scales it. For branches gated at a module's output (a hook), where nothing is skipped."""
        return _masked(self, self._decide(out.shape[0] if out.dim() else 1, computed=True), out)


# What a gate does after its decision, one function per kind of decision (see gate_caller).
def _kept(gate: StochasticDepthGate, d: Decision, branch: Callable[..., torch.Tensor],
          shortcut: torch.Tensor, inputs: tuple) -> torch.Tensor:
    return shortcut + branch(*inputs) * d.scale  # compiled: one graph whatever the scale


def _dropped(gate: StochasticDepthGate, d: Decision, branch: Callable[..., torch.Tensor],
             shortcut: torch.Tensor, inputs: tuple) -> torch.Tensor:
    # A fresh tensor: the next op may be in-place (ReLU(inplace=True)) and the shortcut may
    # be saved for backward.
    return shortcut.clone()


def _some_kept(gate: StochasticDepthGate, d: Decision, branch: Callable[..., torch.Tensor],
               shortcut: torch.Tensor, inputs: tuple) -> torch.Tensor:
    n = shortcut.shape[0]
    if gate.sample_fallback:
        mask = d.keep.to(device=shortcut.device, dtype=shortcut.dtype)
        mask = mask.view(n, *([1] * (shortcut.dim() - 1))) * d.scale
        return shortcut + branch(*inputs) * mask
    idx = d.index.to(shortcut.device, non_blocking=True)
    pairs = [(x, x.index_select(0, idx)) if b and isinstance(x, torch.Tensor) and x.dim() > 0
             and x.shape[0] == n else (x, x) for x, b in zip(inputs, gate.batched)]
    sub = [s for _, s in pairs]
    regather = [(x, s) for x, s in pairs if s is not x and _saved_anyway(x)]
    if regather and not torch.compiler.is_compiling():
        with _Regathering(regather, idx):
            out = branch(*sub)
    else:
        out = branch(*sub)
    if d.scale != 1.0:
        out = out * d.scale
    return _IndexAdd.apply(shortcut, idx, out.to(shortcut.dtype))


class _IndexAdd(torch.autograd.Function):
    """``shortcut.index_add(0, idx, out)`` that saves only ``idx`` for backward (torch's own
    saves ``out`` too, though its gradient needs only the indices: a kept-size copy of every
    branch's output per step)."""

    @staticmethod
    def forward(ctx: Any, shortcut: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return shortcut.index_add(0, idx, out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (idx,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, idx)


_SAVES_RESULT: dict[type, bool] = {}


def _saved_anyway(x: torch.Tensor) -> bool:
    """Whether autograd keeps ``x`` for backward whatever the branch does: the op that made it
    saves its result (ReLU, sigmoid...; read from the node's attributes, not unpacked)."""
    fn = x.grad_fn
    if fn is None:  # (a view's node is a view op's, which saves no result)
        return False
    kind = type(fn)
    if kind not in _SAVES_RESULT:
        _SAVES_RESULT[kind] = "_saved_result" in dir(fn)
    return _SAVES_RESULT[kind]


class _Regathered:
    __slots__ = ("packed", "idx", "version")

    def __init__(self, packed: Any, idx: torch.Tensor, version: int):
        self.packed, self.idx, self.version = packed, idx, version


class _Regathering(torch.autograd.graph.saved_tensors_hooks):
    """While a branch runs on the kept samples: a gathered input that a layer saves for backward
    is not kept; the full input it came from is (autograd keeps that one anyway, see
    :func:`_saved_anyway`), and backward gathers it again. Hooks in force outside (activation
    offloading, the bench's byte counter) still see every tensor: they pack the full input."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], idx: torch.Tensor):
        outer = saved_tensors_hooks_now()
        opack, ounpack = outer if outer is not None else (None, None)

        def pack(t: torch.Tensor) -> Any:
            for x, s in pairs:
                if (t.data_ptr() == s.data_ptr() and t.shape == s.shape and t.dtype == s.dtype
                        and t.stride() == s.stride()):
                    return _Regathered(opack(x) if opack else x, idx, version_of(x))
            return opack(t) if opack else t

        def unpack(p: Any) -> torch.Tensor:
            if not isinstance(p, _Regathered):
                return ounpack(p) if ounpack else p
            x = ounpack(p.packed) if ounpack else p.packed
            if version_of(x) != p.version:
                raise RuntimeError("sdsurgery: a branch input saved for backward was modified "
                                   "in place after the forward (sample mode); do not change a "
                                   "block's input in place")
            return x.index_select(0, p.idx)

        super().__init__(pack, unpack)


def _masked(gate: StochasticDepthGate, d: Decision, out: torch.Tensor) -> torch.Tensor:
    if d.keep is True:
        return out if d.scale == 1.0 else out * d.scale
    if d.keep is False:
        return torch.zeros_like(out)
    n = out.shape[0]
    keep = d.keep.to(device=out.device, dtype=out.dtype)
    return out * (keep.view(n, *([1] * (out.dim() - 1))) * d.scale)


_PATHS = {True: _kept, False: _dropped, None: _some_kept}


def gate_caller(label: str) -> Callable[..., torch.Tensor]:
    """The function a rewritten block calls its gate through, ``call(gate, branch, shortcut,
    *inputs)``, for one block structure (``label``: an identifier).

    Eager, it is the module call ``gate(branch, shortcut, *inputs)`` (its hooks run). Under
    torch.compile the decision is drawn eagerly (a graph break at ``_decide``) and dynamo
    resumes in this function to trace the path the decision takes (kept / dropped / some
    samples kept). Every block structure has its own copy of this code: dynamo caches
    compiled frames, and counts recompiles, per code object, so a structure's graphs are one
    per path and grad / train mode, whichever block and step they come from (at most 6 in
    block mode: kept in train / eval, with / without grad; dropped in training), and no drop
    pattern recompiles anything.
    """
    def call(gate: StochasticDepthGate, branch: Callable[..., torch.Tensor],
             shortcut: torch.Tensor | None, *inputs: Any) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return gate(branch, shortcut, *inputs)
        if shortcut is None:  # a value the block adds in parts: masked
            out = branch(*inputs)
            return _masked(gate, gate._decide(out.shape[0] if out.dim() else 1), out)
        d = gate._decide(shortcut.shape[0])
        return _PATHS[d.keep if isinstance(d.keep, bool) else None](gate, d, branch, shortcut, inputs)

    return own_code(call, label)


def own_code(fn: Callable, label: str) -> Callable:
    """``fn`` with a code object of its own, named ``label`` (an identifier): torch.compile
    caches compiled frames on code objects, so copies do not share caches or recompile limits."""
    code = fn.__code__.replace(co_name=label, co_qualname=label)
    copy = types.FunctionType(code, fn.__globals__, label, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__doc__ = fn.__doc__
    return copy


class GateHook:
    """A forward hook that passes a module's output through ``gate.mask``. A plain object
    holding the gate, so that deep copies of the model hook their own copy of the gate."""

    def __init__(self, gate: StochasticDepthGate):
        self.gate = gate

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.gate.hook_bypass:  # the block's rewritten forward gates this branch itself
            return output
        call = self.gate.spec.tail_call
        if call is not None:  # a module ending several branches: the gate's call of it only
            i, n = call
            seen, self.gate.tail_seen = self.gate.tail_seen, self.gate.tail_seen + 1
            if seen % n != i:
                return output
        return self.gate.mask(output)


# ------------------------------------------------------------------------- model helpers
def converted_parts(model: nn.Module, *, required: bool = False) -> list[tuple[str, nn.Module]]:
    """The converted modules of ``model`` by path: ``[("", model)]`` when ``model`` itself was
    converted, else the submodules ``convert(..., inplace=True)`` was called on (a detector's
    ``backbone.body``). With ``required``, none is a :class:`NotConvertedError`."""
    if CONTROLLER_ATTR in model.__dict__:
        return [("", model)]
    parts = [(n, m) for n, m in model.named_modules() if CONTROLLER_ATTR in m.__dict__]
    if required and not parts:
        raise NotConvertedError(f"{type(model).__name__} carries no stochastic-depth gates; "
                                f"convert it first with sdsurgery.convert(model)")
    return parts


def controller_of(model: nn.Module) -> GateController:
    """The controller of ``model``, or of the one converted submodule it holds."""
    parts = converted_parts(model, required=True)
    if len(parts) == 1:
        return parts[0][1].__dict__[CONTROLLER_ATTR]
    raise NotConvertedError(f"{type(model).__name__} holds {len(parts)} converted submodules "
                            f"({', '.join(repr(n) for n, _ in parts)}), each with its own "
                            f"controller; ask each of them")


def is_converted(model: nn.Module) -> bool:
    return CONTROLLER_ATTR in model.__dict__ or any(
        isinstance(m, StochasticDepthGate) for m in model.modules())


def installed_gates(model: nn.Module) -> list[StochasticDepthGate]:
    """The gates of a converted model (or of the converted submodules it holds), in depth
    order within each."""
    return [g for _, part in converted_parts(model, required=True)
            for g in sorted((m for m in part.modules() if isinstance(m, StochasticDepthGate)),
                            key=lambda g: g.index)]
