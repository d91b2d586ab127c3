"""`sdsurgery` command line: a thin typer layer over the library (parsing, rich output, exit codes).

Every user error exits with code 2 and one line on stderr; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

import sdsurgery
from sdsurgery_cli import interrupted, reported

__all__ = ["app", "main"]

app = typer.Typer(help="Give residual networks stochastic depth that really skips compute, "
                       "fine-tune them, fold the scaling back into the weights.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
console = Console(soft_wrap=True)  # one-line messages stay one line (logs, grep)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"sdsurgery {sdsurgery.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    """sdsurgery command line. Every command has --help with examples."""
    _state["debug"] = debug


def user_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as e:  # Ctrl-C: 130 as a shell would, one line saying what was saved
            if _state["debug"]:
                raise
            from sdsurgery.train import Interrupted
            err.print(str(e) if isinstance(e, Interrupted) else "interrupted; nothing was written",
                      markup=False)
            reported()
            raise typer.Exit(130)
        except Exception as e:
            if _state["debug"]:
                raise
            if interrupted():  # an import cut short by Ctrl-C fails in its own way
                err.print("interrupted; what was saved before it is kept", markup=False)
                reported()
                raise typer.Exit(130)
            if not isinstance(e, (sdsurgery.SurgeryError, ValueError, OSError)):
                raise
            message = " ".join(str(e).split()) or type(e).__name__
            if isinstance(e, sdsurgery.TraceError) and e.module:
                message += f" (on the command line: --leaf {e.module})"
            err.print(f"error: {message}", markup=False)
            raise typer.Exit(2)
    return wrapper


# ----------------------------------------------------------------------- shared options
def _parse_args(pairs: List[str]) -> dict[str, Any]:
    import yaml
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--arg {pair!r}: expected key=value with a Python identifier as key")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _build(model: str, pretrained: bool, weights: Optional[Path], num_classes: Optional[int],
           args: List[str]):
    return sdsurgery.create_model(model, pretrained=pretrained, weights=weights,
                                  num_classes=num_classes, **_parse_args(args))


def _default_image_size(model) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    size = getattr(model, "image_size", None)
    return int(size) if isinstance(size, int) else 224


def _example(model, image_size: int | None):
    """An input for tracing modules whose forward branches on sizes."""
    import torch

    size = image_size or _default_image_size(model)
    return torch.randn(2, 3, size, size)


def _submodule(model, name: str):
    """``model.get_submodule(name)``, or a one-line error naming its children."""
    module, path = model, []
    for part in name.split("."):
        child = dict(module.named_children()).get(part) if part else None
        if child is None:
            where = ".".join(path) or type(model).__name__
            children = ", ".join(n for n, _ in module.named_children()) or "none"
            raise ValueError(f"--submodule {name!r}: {where} has no submodule {part!r} (its "
                             f"children: {children})")
        module, path = child, path + [part]
    return module


def _checks(drop_rate: float, schedule: str, mode: str, scaling: str) -> None:
    sdsurgery.gate.schedules.check_rate(drop_rate, "--drop-rate")
    for opt, value, allowed in (("--schedule", schedule, ("linear", "uniform")),
                                ("--mode", mode, ("block", "sample")),
                                ("--scaling", scaling, ("expectation", "inverted"))):
        if value not in allowed:
            raise ValueError(f"{opt} must be one of {', '.join(allowed)}, got {value!r}")


FACTORY_HELP = ("For a checkpoint of your own model: the factory that builds it "
                "(package.module:fn or path/to/file.py:fn). A file never chooses code to run.")
TRUST_HELP = "Build the model with the module:factory the checkpoint names (only for files you trust)."

def _positive(**options: Optional[int]) -> None:
    """One-line errors for sizes and counts below 1 (``image_size=0`` -> ``--image-size``)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: sdsurgery runs on cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here "
                         f"(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")


MODEL_HELP = ("Model: a name (timm, torchvision or sdsurgery), timm:NAME[.TAG], torchvision:NAME, "
              "hf-hub:REPO, package.module:factory or path/to/file.py:factory.")


# -------------------------------------------------------------------------- reporting
def _report(model, image_size: int) -> dict[str, Any]:
    """Gates, per-branch FLOPs and the summary for a converted model."""
    import torch
    from sdsurgery.flops import flop_report

    gates = sdsurgery.gates(model)
    flops = flop_report(model, torch.randn(1, 3, image_size, image_size))
    ctrl = sdsurgery.controller(model)
    rows = [{"index": g.index, "name": g.name, "shortcut": g.shortcut, "drop_prob": g.drop_prob,
             "flops": flops.branches.get(g.name, 0),
             "flops_share": flops.branches.get(g.name, 0) / flops.total if flops.total else 0.0,
             "fold_target": g.fold_target, "fold_blocker": g.fold_blocker,
             "neutralised": list(g.drop_modules), "masked": g.masked} for g in gates]
    found = ctrl.count
    return {
        "residuals": rows,
        "skipped": [{"name": n, "reason": why} for n, why in ctrl.skipped],
        "summary": {
            "residual_branches": found, "gated": len(gates),
            "expected_branches_per_step": sum(g.survival_prob for g in gates) + (found - len(gates)),
            "flops_per_image": flops.total, "image_size": image_size,
            "expected_training_compute": flops.expected_fraction,
            "expected_saving": 1.0 - flops.expected_fraction,
            "drop_rate": ctrl.drop_rate, "mode": ctrl.mode, "scaling": ctrl.scaling,
        },
    }


def _print_report(title: str, report: dict[str, Any], fold_column: bool) -> None:
    table = Table(title=title)
    for col, just in (("#", "right"), ("branch", "left"), ("shortcut", "left"),
                      ("drop prob", "right"), ("FLOPs", "right")):
        table.add_column(col, justify=just)
    if fold_column:
        table.add_column("folds into")
    for r in report["residuals"]:
        row = [str(r["index"]), r["name"], r["shortcut"], f"{r['drop_prob']:.3f}",
               f"{100 * r['flops_share']:.1f}%"]
        if fold_column:
            row.append(r["fold_target"] or f"- ({r['fold_blocker']})")
        table.add_row(*row)
    console.print(table)
    s = report["summary"]
    console.print(f"{s['gated']} of {s['residual_branches']} residual branches gated "
                  f"({s['mode']} mode, {s['scaling']} scaling, drop rate {s['drop_rate']:g}); "
                  f"expected depth {s['expected_branches_per_step']:.1f} of "
                  f"{s['residual_branches']} branches per step; expected training compute "
                  f"{100 * s['expected_training_compute']:.1f}% of the full model "
                  f"(saving {100 * s['expected_saving']:.1f}%, FLOPs at {s['image_size']} px)",
                  markup=False)
    masked = [r for r in report["residuals"] if r["masked"]]
    if masked:
        names = ", ".join(r["name"] for r in masked[:3]) + (f" and {len(masked) - 3} more"
                                                            if len(masked) > 3 else "")
        console.print(f"{len(masked)} masked (a drop saves no compute): {names}; "
                      f"{masked[0]['name']}: {masked[0]['masked']}", markup=False)
    for sk in report["skipped"]:
        console.print(f"not gated: {sk['name']}: {sk['reason']}", markup=False)


# ---------------------------------------------------------------------------- commands
@app.command()
@user_errors
def convert(model: str = typer.Argument(..., help=MODEL_HELP),
            output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
            pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                            help="Load the source's pretrained weights."),
            weights: Optional[Path] = typer.Option(None, help="Weights file (.safetensors or PyTorch checkpoint)."),
            num_classes: Optional[int] = typer.Option(None, help="Reset the classifier to N classes."),
            arg: List[str] = typer.Option([], "--arg", help="Factory keyword argument key=value (repeatable)."),
            drop_rate: float = typer.Option(0.5, help="Drop probability of the deepest branch, in [0, 1)."),
            schedule: str = typer.Option("linear", help="linear | uniform"),
            mode: str = typer.Option("block", help="block | sample"),
            scaling: str = typer.Option("expectation", help="expectation | inverted"),
            include: List[str] = typer.Option([], help="Glob over branch names to gate (repeatable)."),
            exclude: List[str] = typer.Option([], help="Glob over branch names not to gate (repeatable)."),
            gate_projection: bool = typer.Option(True, "--gate-projection/--no-gate-projection",
                                                 help="Also gate branches with a projection shortcut."),
            seed: Optional[int] = typer.Option(None, help="Seed of the gates' generator."),
            leaf: List[str] = typer.Option([], help="Module (qualified name) fx must not trace into (repeatable)."),
            image_size: Optional[int] = typer.Option(None, help="Input size for the FLOPs table (default: the model's)."),
            ) -> None:
    """Give MODEL stochastic depth and save it as one .safetensors checkpoint.

    Example: sdsurgery convert resnet152 --no-pretrained --drop-rate 0.5 -o resnet152_sd.safetensors
    """
    _checks(drop_rate, schedule, mode, scaling)
    _positive(num_classes=num_classes, image_size=image_size)
    if output.suffix != ".safetensors":
        raise ValueError(f"-o {output}: the output must end in .safetensors")
    net = _build(model, pretrained, weights, num_classes, arg)
    converted = sdsurgery.convert(net, drop_rate=drop_rate, schedule=schedule, mode=mode,
                                  scaling=scaling, include=include or None, exclude=exclude or None,
                                  gate_projection=gate_projection, seed=seed, leaf_modules=leaf,
                                  example=_example(net, image_size), inplace=True)
    sdsurgery.save(converted, output)
    report = _report(converted, image_size or _default_image_size(converted))
    _print_report(f"{model}: stochastic depth", report, fold_column=False)
    console.print(f"saved {output}", markup=False)


@app.command()
@user_errors
def inspect(target: str = typer.Argument(..., help=MODEL_HELP + " Or a .safetensors checkpoint."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
            pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained",
                                            help="Load pretrained weights (not needed to inspect)."),
            weights: Optional[Path] = typer.Option(None, help="Weights file to load."),
            num_classes: Optional[int] = typer.Option(None, help="Reset the classifier to N classes."),
            arg: List[str] = typer.Option([], "--arg", help="Factory keyword argument key=value (repeatable)."),
            drop_rate: float = typer.Option(0.5, help="Drop rate to show probabilities and savings for."),
            schedule: str = typer.Option("linear", help="linear | uniform"),
            mode: str = typer.Option("block", help="block | sample"),
            leaf: List[str] = typer.Option([], help="Module (qualified name) fx must not trace into (repeatable)."),
            image_size: Optional[int] = typer.Option(None, help="Input size for FLOPs (default: the model's)."),
            factory: Optional[str] = typer.Option(None, help=FACTORY_HELP),
            trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
            submodule: Optional[str] = typer.Option(
                None, help="Inspect this submodule (qualified name) instead of the whole model: a "
                           "detector's backbone, e.g. backbone.body."),
            plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the drop probability "
                                                "over depth and each branch's FLOPs share into this PNG."),
            ) -> None:
    """Show a model's residual branches, their FLOPs, fold targets and the adds that are not
    residuals. Writes nothing.

    Examples: sdsurgery inspect torchvision:resnet152 | sdsurgery inspect x.safetensors --json |
    sdsurgery inspect torchvision:fasterrcnn_resnet50_fpn --submodule backbone.body
    """
    _checks(drop_rate, schedule, mode, "expectation")
    _positive(num_classes=num_classes, image_size=image_size)
    net = None
    if target.endswith(".safetensors"):
        meta = sdsurgery.read_metadata(target)
        plain = sdsurgery.io.checkpoint.build(meta, target, factory=factory, trust_code=trust_code)
        if meta.get("converted"):
            net = sdsurgery.load(target, factory=factory, trust_code=trust_code)
    else:
        plain = _build(target, pretrained, weights, num_classes, arg)
    if target.endswith(".safetensors") and image_size is None and meta.get("preprocessing"):
        image_size = meta["preprocessing"]["image_size"]  # FLOPs at the size it was trained at
    example = _example(plain, image_size)
    if submodule:
        if net is not None:
            raise ValueError("--submodule applies to models, not to converted checkpoints")
        image_size = image_size or _default_image_size(plain)
        plain = _submodule(plain, submodule)
    analysis = sdsurgery.analyse(plain, leaf_modules=leaf, example=example)
    converted = net if net is not None else sdsurgery.convert(
        plain, drop_rate=drop_rate, schedule=schedule, mode=mode, seed=0, leaf_modules=leaf,
        example=example)
    report = _report(converted, image_size or _default_image_size(converted))
    report["rejected"] = [{"owner": r.owner, "code": r.code, "reason": r.reason} for r in analysis.rejected]
    report["model"] = target
    report["converted"] = net is not None
    report["preprocessing"] = meta.get("preprocessing") if target.endswith(".safetensors") else None
    if plot is not None:
        from sdsurgery.plots import plot_gates
        plot_gates(report, plot, title=target)
        err.print(f"wrote {plot}", markup=False)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(f"{target}: residual branches", report, fold_column=True)
    pre = report["preprocessing"]
    if pre:
        crop = f", centre crop {pre['crop_pct']:g}" if pre.get("crop_pct") else ""
        console.print(f"trained on {pre['dataset']} ({pre.get('num_classes')} classes) at "
                      f"{pre['image_size']} px, {pre.get('interpolation', 'bilinear')} resize{crop}, "
                      f"mean {pre['mean']}, std {pre['std']} (eval uses this)", markup=False)
    for r in report["rejected"]:
        console.print(f"not a residual ({r['code']}): add in '{r['owner'] or '<model>'}': {r['reason']}",
                      markup=False)


@app.command()
@user_errors
def fold(checkpoint: Path = typer.Argument(..., help="A converted .safetensors checkpoint."),
         output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
         keep_scale: bool = typer.Option(False, help="Keep an explicit scale on branches that cannot fold."),
         force: bool = typer.Option(False, "--force", help="Allow -o to be the input file (replaces it)."),
         factory: Optional[str] = typer.Option(None, help=FACTORY_HELP),
         trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
         ) -> None:
    """Fold the survival scaling into the weights: the original architecture, no gates.

    Example: sdsurgery fold resnet152_sd.safetensors -o resnet152_folded.safetensors
    """
    if output.suffix != ".safetensors":
        raise ValueError(f"-o {output}: the output must end in .safetensors")
    if not force and output.exists() and checkpoint.exists() and output.resolve() == checkpoint.resolve():
        raise ValueError(f"-o {output} is the input checkpoint: folding would replace the converted "
                         f"model; write to another file, or pass --force to replace it")
    net = sdsurgery.load(checkpoint, factory=factory, trust_code=trust_code)
    if not sdsurgery.is_converted(net):
        raise ValueError(f"{checkpoint} holds no stochastic-depth gates (it is already folded or "
                         f"was never converted); nothing to fold")
    gates = sdsurgery.gates(net)
    folded = sdsurgery.fold(net, keep_scale=keep_scale, inplace=True)
    sdsurgery.save(folded, output)
    scaled = sum(1 for g in gates if g.needs_scale() and not g.fold_blocker)
    console.print(f"folded {scaled} of {len(gates)} branch scales into the weights; "
                  f"{type(folded).__module__}.{type(folded).__name__} saved to {output}", markup=False)


@app.command()
@user_errors
def bench(model: str = typer.Argument(..., help=MODEL_HELP),
          batch_size: int = typer.Option(16, help="Images per training step."),
          image_size: int = typer.Option(64, help="Input size in pixels."),
          steps: int = typer.Option(20, help="Timed steps per variant (after 3 warm-up steps)."),
          drop_rate: float = typer.Option(0.5, help="Drop rate of the converted model."),
          mode: str = typer.Option("block", help="block | sample"),
          device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
          dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (autocast)"),
          arg: List[str] = typer.Option([], "--arg", help="Factory keyword argument key=value (repeatable)."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
          compile_: bool = typer.Option(False, "--compile", help="Time the training steps under torch.compile (beside the converted model eager)."),
          compile_backend: str = typer.Option("inductor", help="torch.compile backend for --compile."),
          channels_last: bool = typer.Option(False, "--channels-last", help="Models and inputs in channels_last memory format."),
          ) -> None:
    """Training-step time of the converted model against the original (and the architecture's
    own drop-path at the same rate), side by side in one process; eval latency of the folded
    model. Random weights: speed does not depend on them.

    Example: sdsurgery bench resnet50 --batch-size 16 --image-size 64 --steps 20
    """
    import torch

    from sdsurgery.bench import DTYPES, run_bench

    _checks(drop_rate, "linear", mode, "expectation")
    _positive(batch_size=batch_size, image_size=image_size, steps=steps)
    _check_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compile_ and compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"--compile-backend {compile_backend!r} is not a torch.compile backend; "
                         f"choose one of {', '.join(torch.compiler.list_backends())}")
    kwargs = _parse_args(arg)
    probe = sdsurgery.create_model(model, pretrained=False, num_classes=10, **kwargs)
    spec = sdsurgery.io.models.source_of(probe).spec
    native = (("drop_path_rate", drop_rate) if spec.startswith(("timm:", "hf-hub:")) else
              ("stochastic_depth_prob", drop_rate) if spec.startswith("torchvision:") else None)

    def build(**extra):
        return sdsurgery.create_model(model, pretrained=False, num_classes=10, **kwargs, **extra)

    result = run_bench(build, name=spec, native=native, drop_rate=drop_rate, mode=mode,
                       batch_size=batch_size, image_size=image_size, steps=steps, device=device,
                       dtype=dtype, compile=compile_backend if compile_ else None, channels_last=channels_last)
    _print_bench(result)
    if json_out is not None:
        tmp = json_out.with_name(f".{json_out.name}.tmp")
        tmp.write_text(json.dumps(result.to_dict(), indent=2))
        tmp.replace(json_out)  # never a truncated file
        console.print(f"wrote {json_out}", markup=False)


def _print_bench(result) -> None:
    spec, mode, drop_rate = result.model, result.mode, result.drop_rate
    extra = (f", compiled ({result.compile})" if result.compile else "") + (", channels_last" if result.channels_last else "")
    table = Table(title=f"{spec}: {result.batch_size} x {result.image_size} px, {result.dtype}, "
                        f"{result.device}{extra}, median of {result.steps} steps")
    columns = ["training step", "ms", "IQR", "ratio", "saved MB", "ratio"]
    columns += ["peak MB"] if result.peak_mb else []
    columns += ["warm-up s", "graphs", "after warm-up"] if result.compile else []
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for k, ms in result.train_ms.items():
        q1, q3 = result.train_iqr_ms[k]
        row = [k, f"{ms:.1f}", f"{q1:.1f}-{q3:.1f}", f"{result.train_ratio[k]:.3f}",
               f"{result.saved_mb[k]:.1f}", f"{result.saved_ratio[k]:.3f}"]
        row += [f"{result.peak_mb[k]:.0f}"] if result.peak_mb else []
        if result.compile:
            compiled = k in result.graphs
            row += [f"{result.warmup_s[k]:.1f}" if compiled else "", str(result.graphs[k]) if compiled else "eager",
                    str(result.graphs_after_warmup[k]) if compiled else ""]
        table.add_row(*row)
    table.add_row(f"theory for sdsurgery {mode} {drop_rate:g}", "", "", f"{result.theory:.3f}", "",
                  f"{result.saved_theory:.3f}", *[""] * (len(columns) - 6))
    console.print(table)
    console.print(f"eval latency: folded {result.eval_ms['folded']:.1f} ms, original "
                  f"{result.eval_ms['original']:.1f} ms, ratio {result.eval_ratio['folded']:.3f}",
                  markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)


@app.command()
@user_errors
def models(pattern: str = typer.Argument("*", help="Glob over model names, e.g. 'resnet*'.")) -> None:
    """List resolvable model names (sdsurgery, timm, torchvision) matching PATTERN.

    Example: sdsurgery models 'convnext*'
    """
    names = sdsurgery.list_models(pattern)
    for n in names:
        typer.echo(n)
    if not names:
        err.print(f"no model matches {pattern!r}", markup=False)
        raise typer.Exit(1)


@app.command()
@user_errors
def finetune(recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (see recipes/); not needed with --resume."),
             set_: List[str] = typer.Option([], "--set", help="Override a recipe field: section.key=value (repeatable)."),
             resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
             trust_code: bool = typer.Option(False, "--trust-code", help="Allow the recipe's model.name to be code (package.module:fn)."),
             ) -> None:
    """Fine-tune with stochastic depth (HF accelerate), fold, export model.safetensors.

    Examples: sdsurgery finetune recipes/demo.yaml --set train.epochs=5 |
    sdsurgery finetune --resume runs/demo --set train.epochs=30 |
    torchrun --nproc_per_node 2 -m sdsurgery finetune recipes/demo.yaml --set train.cpu=true
    """
    from sdsurgery.train.recipes import difference, load_recipe
    from sdsurgery.train import finetune as run

    overrides = list(set_)
    if resume is not None:
        saved = resume / "recipe.yaml"
        if not saved.is_file():
            raise ValueError(f"--resume {resume}: no recipe.yaml there (not a run directory)")
        recipe_obj = load_recipe(saved, overrides, trust_code=trust_code)
        if recipe is not None and not overrides:
            diff = difference(load_recipe(recipe, trust_code=trust_code), recipe_obj)
            if diff:
                raise ValueError(f"{recipe} differs from {saved} ({diff}); --resume continues the "
                                 f"run's own recipe: leave RECIPE out, and change settings with --set")
    elif recipe is None:
        raise ValueError("give a RECIPE (e.g. recipes/demo.yaml), or --resume RUN_DIR to continue a run")
    else:
        recipe_obj = load_recipe(recipe, overrides, trust_code=trust_code)
    result = run(recipe_obj, resume=resume, console=console)
    import os
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title=f"{recipe_obj.model.name} on {recipe_obj.data.dataset}")
    for col in ("model", "split", "top-1 %", "top-5 %", "loss"):
        table.add_column(col, justify="left" if col in ("model", "split") else "right")
    sd = recipe_obj.stochastic_depth.enabled  # without it, nothing is gated or folded
    rows = ([("gated (eval mode)", result.gated), ("folded (plain architecture)", result.folded)] if sd
            else [("model (no stochastic depth)", result.folded)])
    if result.ema_folded is not None:
        rows.append(("EMA folded" if sd else "EMA", result.ema_folded))
    for name, m in rows:
        table.add_row(name, "test", f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['loss']:.4f}")
    console.print(table)
    folded, which = (", folded" if sd else ""), ("EMA" if result.exported == "ema" else "model")
    if result.best_val_top1 is not None:
        console.print(f"best validation top-1 {result.best_val_top1:.2f}% at epoch {result.best_epoch} "
                      f"(checkpoints/best); the exported model is the last epoch's {which}{folded}", markup=False)
    if result.ema_folded is not None:
        console.print(f"exported: the {which}{folded} ({result.exported_because})", markup=False)
    console.print(f"training time {result.train_seconds:.0f} s; model saved to {result.model_path}",
                  markup=False)


@app.command()
@user_errors
def plot(run_dir: Path = typer.Argument(..., help="A run directory (sdsurgery finetune's output_dir)."),
         out: Optional[Path] = typer.Option(None, "-o", "--out", help="Directory for the PNGs (default: RUN_DIR/plots)."),
         ) -> None:
    """Plot a run: loss, validation top-1 (and EMA), lr, drop rate and the share of branches
    that ran, epoch time; one PNG each and a summary.png with all.

    Example: sdsurgery plot runs/demo
    """
    from sdsurgery.plots import plot_run
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory; give a run directory (train.output_dir)")
    for path in plot_run(run_dir, out):
        console.print(f"wrote {path}", markup=False)


@app.command(name="eval")
@user_errors
def eval_(checkpoint: Path = typer.Argument(..., help="A .safetensors checkpoint, a run directory or a "
                                                     "checkpoint directory (RUN/checkpoints/best)."),
          dataset: Optional[str] = typer.Option(None, help="cifar10 | cifar100 | svhn | digits | fake | "
                                                           "imagefolder (default: the one it was trained on)."),
          data_dir: Path = typer.Option(Path("data"), help="Where the dataset lives."),
          download: bool = typer.Option(False, "--download", help="Fetch the dataset if it is missing."),
          image_size: Optional[int] = typer.Option(None, help="Input size (default: the one it was trained at)."),
          batch_size: int = typer.Option(256, help="Images per batch."),
          device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: a GPU when present)."),
          factory: Optional[str] = typer.Option(None, help=FACTORY_HELP),
          trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
          ) -> None:
    """Top-1 / top-5 accuracy and loss of a checkpoint on a dataset's test split, with the
    preprocessing recorded in the checkpoint (dataset, image size, mean/std, crop).

    Examples: sdsurgery eval runs/demo | sdsurgery eval runs/demo/checkpoints/best
    """
    from sdsurgery.train import evaluate_checkpoint

    _positive(image_size=image_size, batch_size=batch_size)
    if device is not None:
        _check_device(device)
    r = evaluate_checkpoint(checkpoint, dataset=dataset, data_dir=data_dir, image_size=image_size,
                            batch_size=batch_size, device=device, download=download, factory=factory,
                            trust_code=trust_code)
    for note in r.notes:
        err.print(f"warning: {note}", markup=False)
    m, p = r.metrics, r.preprocessing
    console.print(f"{r.checkpoint} on {r.dataset} test ({m['images']} images, {p['image_size']} px): "
                  f"top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%, loss {m['loss']:.4f}", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
