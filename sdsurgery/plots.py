"""PNG plots (matplotlib, the ``plot`` extra) of a run directory and of a model's gates.

:func:`plot_run` reads a run's ``steps.jsonl`` and ``metrics.jsonl`` (JSON only: nothing in a run
directory is executed) and draws loss, top-1, learning rate, drop rate and epoch time;
:func:`plot_gates` draws the per-branch drop probability over depth (the paper's p(l)) beside
each branch's share of the model's FLOPs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import SurgeryError

__all__ = ["PlotError", "plot_run", "plot_gates"]


class PlotError(SurgeryError):
    """Nothing to plot, or matplotlib is missing."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError("plots need matplotlib: pip install matplotlib (or sdsurgery[plot])") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _read(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The JSON lines of ``path``, each an object with integer ``keys`` (a one-line error else)."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{n} is not JSON ({e.msg})") from e
        if not isinstance(row, dict) or not all(isinstance(row.get(k), int) for k in keys):
            raise PlotError(f"{path}:{n} is not a line sdsurgery wrote (an object with {', '.join(keys)})")
        out.append({k: v for k, v in row.items() if k in keys or isinstance(v, (int, float))})
    return out


def _series(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _panel(ax, title: str, xlabel: str, lines: Sequence[tuple[str, list, list]], ylim=None) -> bool:
    drawn = False
    for label, xs, ys in lines:
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if drawn and len(lines) > 1:
        ax.legend()
    return drawn


def _panels(steps: list[dict], epochs: list[dict]) -> dict[str, tuple[str, str, list, Any]]:
    """name -> (title, x label, [(label, xs, ys)], y limits or None)."""
    steps_per_epoch = max((s["step"] for s in steps), default=1)
    as_step = [dict(e, global_step=e["epoch"] * steps_per_epoch) for e in epochs]
    return {
        "loss": ("training loss", "optimizer step", [
            ("per logging window", *_series(steps, "global_step", "loss")),
            ("epoch mean", *_series(as_step, "global_step", "train_loss"))], None),
        "top1": ("validation top-1 (%)", "epoch", [
            ("model", *_series(epochs, "epoch", "val_top1")),
            ("EMA", *_series(epochs, "epoch", "val_ema_top1"))], None),
        "lr": ("learning rate", "optimizer step", [("lr", *_series(steps, "global_step", "lr"))], None),
        "drop_rate": ("stochastic depth", "optimizer step", [
            ("drop rate (last block)", *_series(steps, "global_step", "drop_rate")),
            ("share of branches run", *_series(steps, "global_step", "branches_run"))], (0, 1.02)),
        "epoch_time": ("epoch time (s)", "epoch", [("seconds", *_series(epochs, "epoch", "epoch_seconds"))],
                       (0, None)),
    }


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """PNGs of a run (``loss``, ``top1``, ``lr``, ``drop_rate``, ``epoch_time`` and ``summary``
    with those that have data) in ``out_dir`` (default: ``RUN/plots``); returns the files written. A
    panel with no data (no validation split: top-1) is left out."""
    run_dir = Path(run_dir)
    steps = _read(run_dir / "steps.jsonl", ("step", "global_step"))
    epochs = _read(run_dir / "metrics.jsonl", ("epoch",))
    if not steps and not epochs:
        raise PlotError(f"{run_dir} has no steps.jsonl or metrics.jsonl to plot (is it a run directory?)")
    plt = _pyplot()
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    panels = _panels(steps, epochs)
    written, filled = [], []  # the panels with data (no stochastic depth: no drop-rate panel)
    for name, panel in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        if _panel(ax, *panel):
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=100)
            written.append(out / f"{name}.png")
            filled.append(panel)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (title, xlabel, lines, ylim) in zip(axes.flat, filled):
        _panel(ax, title, xlabel, lines, ylim)
    for ax in list(axes.flat)[len(filled):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)
    return written + [out / "summary.png"]


def plot_gates(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """The per-branch drop probability over depth and each branch's FLOPs share, from
    ``inspect``'s report (its ``residuals`` rows and ``summary``)."""
    rows = report["residuals"]
    if not rows:
        raise PlotError("the model has no gated residual branches to plot")
    plt = _pyplot()
    s = report["summary"]
    idx = [r["index"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(idx, [100 * r["flops_share"] for r in rows], color="#c6dbef", label="FLOPs share of the model (%)")
    ax.set_xlabel("residual branch (depth order)")
    ax.set_ylabel("FLOPs share (%)")
    ax2 = ax.twinx()
    ax2.plot(idx, [r["drop_prob"] for r in rows], color="#d62728", marker="o", markersize=3,
             label="drop probability p(l)")
    ax2.set_ylabel("drop probability p(l)")
    ax2.set_ylim(0, max(0.55, max(r["drop_prob"] for r in rows) * 1.1))
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.set_title(f"{title}{': ' if title else ''}{s['gated']} gated branches, {s['mode']} mode; expected "
                 f"training compute {100 * s['expected_training_compute']:.1f}% at {s['image_size']} px")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
