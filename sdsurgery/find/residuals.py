"""Finding the residual connections of a model: :func:`analyse` and :func:`find_residuals`.

The model is traced flat with torch.fx (:mod:`.tracing`) and its adds classified
(:mod:`.classify`). Modules fx cannot trace (timm's not-traceable modules, and any whose trace
fails) stay leaves of that trace; each is then traced and classified on its own, as it was
called, specialised to an example input's sizes when its forward branches on them, or searched
through its children; what stays unsearched is said in ``Analysis.rejected`` (code
``not-traced``).
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Union

import torch
import torch.nn as nn

from ..errors import TraceError
from ..gate.gates import is_converted
from .classify import Analysis, RejectedAdd, Residual, classify, require_residuals, residual_name, select
from .tracing import (FlatTrace, LeafSpec, notrace_module_types, resolve_leaves, trace_model,
                      trace_with_example, traceable)

__all__ = ["Residual", "RejectedAdd", "Analysis", "Example", "find_residuals", "analyse", "select",
           "require_residuals"]

_MAX_AUTO_LEAVES = 64
# An example input: the first input as a tensor, positional inputs, or keyword inputs by name.
Example = Union[torch.Tensor, tuple, list, dict]


def find_residuals(model: nn.Module, *, leaf_modules: LeafSpec = (),
                   example: "Example | None" = None) -> list[Residual]:
    """The residual connections of ``model``, in depth order.

    Args:
        model: any ``nn.Module`` torch.fx can trace (timm, torchvision, custom).
        leaf_modules: module classes, qualified names or module objects fx must not trace into.
        example: an input for ``model``: a tensor (the first input), a tuple of positional
            inputs, or a dict of keyword inputs (``{"pixel_values": x}``, ``{"input_ids": ids,
            "attention_mask": m}`` for transformers models). Used only to trace modules whose
            forward branches on tensor sizes (timm's TinyViT blocks, transformers' encoders),
            specialised to its sizes; by default a random batch of the model's
            ``pretrained_cfg["input_size"]``.

    Raises:
        TraceError: fx cannot trace the model; the message names the module and how to mark it
            a leaf.
    """
    return analyse(model, leaf_modules=leaf_modules, example=example).residuals


def analyse(model: nn.Module, *, leaf_modules: LeafSpec = (),
            example: "Example | None" = None) -> Analysis:
    """Trace ``model`` and classify every tensor add (see the module docstring and
    :func:`find_residuals`)."""
    if is_converted(model):
        raise ValueError("the model is already converted (it carries stochastic-depth gates); "
                         "call sdsurgery.fold(model) first, or use sdsurgery.gates(model)")
    examples = _Examples(model, example)
    try:
        analysis = _analyse_with(model, leaf_modules, None, examples)
    except TraceError as e:
        analysis = _analyse_root_on_example(model, leaf_modules, examples, e)
    analysis.examples = examples
    return analysis


def _analyse_root_on_example(model: nn.Module, leaf_modules: LeafSpec, examples: "_Examples",
                             error: TraceError) -> Analysis:
    """The model's own forward fails to trace (it branches on sizes): trace it on the example
    call. Its own residuals, and blocks it calls with what may be sizes, hold for the example's
    sizes only (``specialised``: gated by a size-guarded rewrite)."""
    call = examples.of(model) if not error.module and examples.example is not None else None
    if call is None:
        raise error
    try:
        analysis = _analyse_with(model, leaf_modules, None, examples, example_call=call)
    except TraceError:
        raise error from None
    analysis.residuals = [r if r.specialised or (r.owner and _size_free(analysis.trace, r.owner))
                          else replace(r, specialised=True) for r in analysis.residuals]
    return analysis


class _Recorded(Exception):
    """Every module asked for has been called: the example forward stops there."""


class _Examples:
    """How modules are called on an example input, recorded in one eval forward pass of the
    model the first time it is asked (only modules that fx cannot trace need it)."""

    def __init__(self, root: nn.Module, example: Example | None):
        if example is not None and not isinstance(example, (torch.Tensor, tuple, list, dict)):
            raise TypeError(f"example must be a tensor (the first input), a tuple of positional "
                            f"inputs or a dict of keyword inputs, got {type(example).__name__}")
        self.root, self.example = root, example
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.wanted: set[int] = set()
        self.error = ""

    def of(self, module: nn.Module) -> tuple[tuple, dict] | None:
        """The first call of ``module``. One forward pass records it along with every module
        of its class (the blocks of a stage are asked one after another) and, the first time,
        timm's not-traceable modules and what they hold. Not the modules inside ``module``:
        their inputs would keep a large model's activations alive (gemma4_vit_167m at 768 px:
        9.4 GiB, where the forward itself peaks at 2 GiB); asking for one of them costs
        another pass."""
        if id(module) not in self.wanted:
            if not self.wanted:
                notrace = notrace_module_types()
                self.wanted = {id(m) for leaf in self.root.modules() if isinstance(leaf, notrace)
                               for m in leaf.modules()}
            self.wanted |= {id(m) for m in self.root.modules() if type(m) is type(module)}
            self.wanted.add(id(module))
            self._record()
        return self.calls.get(id(module))

    def input_names(self, module: nn.Module) -> set[str]:
        """The keyword inputs the example gives ``module`` (the root only)."""
        return set(self.example) if module is self.root and isinstance(self.example, dict) else set()

    def _record(self) -> None:
        self.calls = {}
        x = self.example
        if x is None:
            cfg = getattr(self.root, "pretrained_cfg", None) or getattr(self.root, "default_cfg", None) or {}
            size = cfg.get("input_size") if isinstance(cfg, dict) else None
            if not size:
                self.error = "no example input (pass example=... with an input for the model)"
                return
            x = torch.randn(1, *size)  # batch 1: the example is for sizes, not statistics
        watched = {id(m): m for m in self.root.modules() if id(m) in self.wanted}
        calls = self.calls

        def record(module, args, kwargs):
            calls.setdefault(id(module), (args, kwargs))
            if len(calls) == len(watched):  # all there: the rest of the forward is not needed
                raise _Recorded

        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in watched.values()]
        try:
            with torch.no_grad(), traceable(self.root):
                if isinstance(x, dict):
                    self.root(**x)
                elif isinstance(x, (tuple, list)):
                    self.root(*x)
                else:
                    self.root(x)
        except _Recorded:
            pass
        except Exception as e:
            self.calls.clear()
            self.error = f"the example input failed: {type(e).__name__}: {str(e)[:120]}"
        finally:
            for h in handles:
                h.remove()


def _search_leaves(analysis: Analysis, leaf_modules: LeafSpec, examples: "_Examples",
                   auto: set[int] = frozenset()) -> None:
    """Residuals inside modules timm registers as not traceable (NormFreeBlock, MobileVitBlock,
    ...) and those fx failed on (``auto``): trace each such leaf on its own, as it was called,
    and lift what it holds into ``analysis``. A leaf whose own forward cannot be traced (it
    branches on tensor sizes) is traced on an example call, or else searched through its
    children; what stays unsearched is said in ``analysis.rejected``."""
    ft = analysis.trace
    user_types, user_ids = resolve_leaves(ft.root, leaf_modules)
    user_leaves = list(user_types) + [m for m in ft.modules.values() if id(m) in user_ids]
    notrace = notrace_module_types()
    found: list[tuple[int, Residual]] = list(zip(analysis.order, analysis.residuals))
    for pos, node in enumerate(ft.graph.nodes):
        if node.op != "call_module":
            continue
        path, leaf = node.target, ft.modules[node.target]
        if id(leaf) not in auto and (id(leaf) in user_ids or isinstance(leaf, user_types)
                                     or not isinstance(leaf, notrace)):
            continue
        calls = ft.calls.get(path, [])
        concrete = calls[0].concrete_args(leaf) if len(calls) == 1 else None
        _search_module(analysis, path, leaf, concrete, user_leaves, pos, found, examples)
    found.sort(key=lambda kr: kr[0])  # depth order: leaves sit where they are called
    analysis.residuals = [replace(r, index=i) for i, (_, r) in enumerate(found)]
    analysis.order = [k for k, _ in found]


def _search_module(analysis: Analysis, path: str, module: nn.Module, concrete: dict | None,
                   user_leaves: list, pos: int, found: list[tuple[int, Residual]],
                   examples: _Examples) -> None:
    ft = analysis.trace
    specialised = False
    try:
        sub = _analyse_with(module, user_leaves, concrete, examples)
    except TraceError as e:
        why = _trace_why(e)
        call = _without_cache(module, examples.of(module))
        sub = None
        if call is not None:  # its forward branches on sizes: specialise to the example's
            try:
                sub = _analyse_with(module, user_leaves, None, examples, example_call=call)
                specialised = True
            except TraceError as e2:
                why2 = _trace_why(e2)
                why += ", also on an example input" if why2 == why else f"; on an example input: {why2}"
        elif examples.error:
            why += f"; {examples.error}"
        if sub is None:
            children = [(name, child) for name, child in module.named_children()
                        if any(True for _ in child.parameters()) and len(list(child.modules())) > 1]
            analysis.rejected.append(RejectedAdd(path, f"leaf {path}", (
                f"adds in the forward of '{path}' ({type(module).__name__}) were not searched: "
                f"torch.fx cannot trace it ({why})" + ("; its submodules were searched one by one"
                                                        if children else "")),
                "not-traced"))
            for name, child in children:
                _search_module(analysis, f"{path}.{name}", child, None, user_leaves, pos, found, examples)
            return
    prefix = path + "."
    for owner, count in sub.add_counts.items():
        analysis.add_counts[prefix + owner if owner else path] = count
    for name, c in sub.trace.calls.items():
        if name:
            ft.calls.setdefault(prefix + name, c)
    per_owner: dict[str, int] = {}
    for r in sub.residuals:
        per_owner[r.owner] = per_owner.get(r.owner, 0) + 1
    for r in sub.residuals:
        owner = prefix + r.owner if r.owner else path
        mods = tuple(prefix + m for m in r.modules)
        # In a specialised trace, a block inside the module was called with arguments that may
        # be sizes of the example: rewriting it would bake them in. The module itself was
        # called from the unspecialised trace around it.
        fixed = specialised and bool(r.owner) and not _size_free(sub.trace, r.owner)
        found.append((pos, replace(
            r, owner=owner, modules=mods,
            name=(prefix + r.name if r.inline and r.name else
                  residual_name(owner, mods, ft.modules, per_owner[r.owner] > 1, r.add_position)),
            shortcut_modules=tuple(prefix + m for m in r.shortcut_modules),
            fold_target=prefix + r.fold_target if r.fold_target else None,
            fold_params=tuple(prefix + p for p in r.fold_params),
            drop_modules=tuple(prefix + m for m in r.drop_modules),
            tail=prefix + r.tail if r.tail else None,
            outside=tuple(prefix + m for m in r.outside),
            specialised=r.specialised or fixed)))
    analysis.rejected.extend(replace(x, owner=prefix + x.owner if x.owner else path)
                             for x in sub.rejected)


def _without_cache(module: nn.Module, call: tuple[tuple, dict] | None) -> tuple[tuple, dict] | None:
    """The example call with ``use_cache=False`` when the forward takes ``use_cache``
    (transformers' decoders): a key-value cache is for generation, training runs without one,
    and a cache object cannot be traced."""
    if call is None:
        return None
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*call[0], **call[1])
    except (TypeError, ValueError):
        return call
    if "use_cache" not in sig.parameters or bound.arguments.get("use_cache") is False:
        return call
    bound.arguments["use_cache"] = False
    return bound.args, bound.kwargs


def _trace_why(e: TraceError) -> str:
    """What fx said in a :class:`TraceError`, without the module name and the hint."""
    return e.reason[:160]


def _size_free(ft: FlatTrace, owner: str) -> bool:
    """The one call of ``owner`` passed no constant that could be a size (only tensors, None,
    bools, strings)."""
    calls = ft.calls.get(owner, [])
    concrete = calls[0].concrete_args(ft.modules[owner]) if len(calls) == 1 else None
    return concrete is not None and all(v is None or isinstance(v, (bool, str)) for v in concrete.values())


def _optional_defaults(module: nn.Module, inputs: set[str]) -> dict[str, Any]:
    """The forward's parameters with defaults, at their defaults, but for the first one and
    those named in ``inputs`` (the example's keyword inputs)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[1:]
            if p.default is not p.empty and p.name not in inputs
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _analyse_with(module: nn.Module, leaf_modules: LeafSpec, concrete: dict | None,
                  examples: _Examples, example_call: tuple[tuple, dict] | None = None) -> Analysis:
    """Trace ``module`` (specialised on ``concrete`` arguments, or on the sizes of
    ``example_call``), classify its adds, search its not-traceable leaves.

    A submodule fx cannot trace becomes a leaf, and the trace is made again; such leaves are
    then searched like timm's not-traceable ones (on their own, on an example, or through
    their children)."""
    leaves = list(leaf_modules)
    auto: list[nn.Module] = []
    while True:
        try:
            if example_call is None:
                ft = trace_model(module, leaves + auto, concrete_args=concrete)
            else:
                ft = trace_with_example(module, leaves + auto, *example_call)
            break
        except TraceError as e:
            if not e.module and concrete is None and example_call is None:
                # The forward's own code fails on its optional arguments as placeholders
                # (transformers: `labels`, `return_dict`...): specialise them to their defaults.
                concrete = _optional_defaults(module, examples.input_names(module))
                if concrete:
                    continue
                concrete = None
            failed = module.get_submodule(e.module) if e.module else None
            if failed is None or any(failed is m for m in auto) or len(auto) >= _MAX_AUTO_LEAVES:
                raise
            auto.append(failed)
    analysis = classify(ft)
    _search_leaves(analysis, leaf_modules, examples, {id(m) for m in auto})
    return analysis
