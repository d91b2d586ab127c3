"""`sdsurgery` command line: a thin typer layer over the library (parsing, rich output, exit codes)."""
from __future__ import annotations

import sys
import typer
from rich.console import Console
from rich.table import Table

import sdsurgery

app = typer.Typer(help="Give residual networks stochastic depth that really skips compute, "
                       "fine-tune them, fold the scaling back into the weights.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"sdsurgery {sdsurgery.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    """sdsurgery command line."""


@app.command()
def demo(model: str = typer.Option("resnet50", help="torchvision classification model to convert."),
         drop_rate: float = typer.Option(0.5, help="Drop probability of the deepest branch."),
         image_size: int = typer.Option(64, help="Input size of the check forward passes.")) -> None:
    """Convert a randomly initialised torchvision model offline, show its gates, fold it back.

    Example: sdsurgery demo --model resnet50 --drop-rate 0.5
    """
    import torch
    import torchvision

    try:
        net = torchvision.models.get_model(model, weights=None).eval()
    except ValueError as e:
        err.print(f"error: {e}")
        raise typer.Exit(2)
    converted = sdsurgery.convert(net, drop_rate=drop_rate, seed=0)
    gates = sdsurgery.gates(converted)
    table = Table(title=f"{model}: {len(gates)} residual branches gated (block mode, linear schedule)")
    for col in ("#", "branch", "shortcut", "drop prob", "folds into"):
        table.add_column(col, justify="right" if col in ("#", "drop prob") else "left")
    for g in gates:
        table.add_row(str(g.index), g.name, g.shortcut, f"{g.drop_prob:.3f}", g.fold_target or "-")
    console.print(table)
    x = torch.randn(2, 3, image_size, image_size)
    # Count calls of each branch's first layer over some training forward passes.
    modules = dict(converted.named_modules())
    first = {r.name: modules[r.modules[0]] for r in sdsurgery.find_residuals(net)}
    calls = dict.fromkeys(first, 0)
    hooks = [first[g.name].register_forward_hook(
        lambda m, i, o, n=g.name: calls.__setitem__(n, calls[n] + 1)) for g in gates]
    steps = 20
    converted.train()
    with torch.no_grad():
        for _ in range(steps):
            converted(x)
    for h in hooks:
        h.remove()
    expected = sum(g.survival_prob for g in gates) * steps
    console.print(f"training: {steps} forward passes ran {sum(calls.values())} of "
                  f"{steps * len(gates)} branches (expected {expected:.0f}); dropped branches "
                  f"are not computed")
    folded = sdsurgery.fold(converted).eval()
    converted.eval()
    with torch.no_grad():
        a, b = converted(x), folded(x)
    rel = float((a - b).abs().max() / a.abs().max())
    console.print(f"fold: {type(folded).__module__}.{type(folded).__name__} with no gates; "
                  f"eval output matches the gated model (max relative difference {rel:.1e})")


def main() -> None:
    try:
        app()
    except sdsurgery.SurgeryError as e:
        err.print(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
