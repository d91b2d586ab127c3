"""Markdown tables from the JSON files `sdsurgery bench --json` writes (benchmarks/gpu.sh).

    python benchmarks/table.py DIR > DIR/gpu.md

Reads every DIR/*.json (data only: json.load), one row per model and eager / compiled run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _ratio(run: dict, key: str) -> str:
    r = run["train_ratio"].get(key)
    return "" if r is None else f"{r:.3f}"


def _row(run: dict) -> str:
    label = f"sdsurgery {run['mode']} {run['drop_rate']:g}"
    native = next((k for k in run["train_ratio"] if k.startswith(("drop_path_rate", "stochastic_depth_prob"))), None)
    how = f"compiled ({run['compile']})" if run.get("compile") else "eager"
    peak = run.get("peak_mb") or {}
    cells = [
        run["model"], how, f"{run['train_ms']['original']:.1f}",
        _ratio(run, "original (A/A copy)"), _ratio(run, "sdsurgery p=0"), _ratio(run, label),
        f"{run['theory']:.3f}", _ratio(run, native) if native else "",
        _ratio(run, f"{label} (eager)") if run.get("compile") else "",
        f"{run['saved_ratio'][label]:.3f}",
        f"{peak['original']:.0f} / {peak[label]:.0f}" if peak else "",
        ", ".join(f"{run['warmup_s'][k]:.0f}" for k in ("original", label)) if run.get("compile") else "",
        str(sum(run.get("graphs_after_warmup", {}).values())) if run.get("compile") else "",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | run | original ms/step | A/A | p=0 | linear 0.5 | theory (FLOPs) | native drop-path 0.5 "
          "| linear 0.5 eager | saved activations | peak MB original / 0.5 | warm-up s original, 0.5 "
          "| graphs after warm-up |")


def table(directory: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    if not runs:
        raise SystemExit(f"benchmarks/table.py: no *.json in {directory} (run sdsurgery bench --json first)")
    first = runs[0]
    v = first.get("versions", {})
    lines = [
        f"Training step time as a ratio of the original model's, side by side in one process "
        f"({first['device']}{', ' + v['gpu'] if 'gpu' in v else ''}; {first['dtype']}, batch "
        f"{first['batch_size']}, {first['image_size']} px, median of {first['steps']} steps; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k != "gpu") + ").",
        "",
        HEADER,
        "|" + "---|" * HEADER.count(" | ") + "---|",
    ]
    lines += [_row(run) for run in runs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/table.py DIR")
    sys.stdout.write(table(Path(sys.argv[1])))
