"""`sdsurgery` command line: a thin typer layer over the library."""
from __future__ import annotations

import typer

app = typer.Typer(help="Give residual networks stochastic depth, fine-tune them, fold it back in.",
                  no_args_is_help=True, add_completion=False)


def main() -> None:
    app()
