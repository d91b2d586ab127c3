"""The paper's three claims (Huang, Sun et al. 2016, "Deep Networks with Stochastic Depth"),
measured with sdsurgery's own fine-tuning loop: constant depth vs stochastic depth (linear decay
to 0.5, block mode) on the paper's CIFAR ResNets, several seeds each.

    python benchmarks/paper.py                      # digits (bundled, offline): ResNet-56 and -110, 5 seeds
    python benchmarks/paper.py --quick              # the plumbing in seconds (the test suite runs it)
    python benchmarks/paper.py --dataset cifar10 --data-dir data   # the paper's recipe on real data

Per run (a normal `sdsurgery finetune` run directory under OUT/runs): test error of the folded
model, per-epoch training time (evaluation excluded), and the mean absolute gradient of the first
convolution's weight at every step. Settings of one seed run back to back, alternating which goes
first, so the time ratio compares runs under the same machine conditions. Writes OUT/results.json,
OUT/summary.md (printed) and OUT/{error,epoch_time,gradients}.png.

On digits the paper's CIFAR-10 optimiser settings are scaled to the data: SGD with Nesterov
momentum 0.9, weight decay 1e-4, lr 0.1 (after a 1-epoch warm-up) divided by 10 at 50% and 75%
of training, batch 64 on 1,293 training images (144 held out for validation, 360 test) at 16 px.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sdsurgery
from sdsurgery.flops import flop_report
from sdsurgery.train.loop import finetune
from sdsurgery.train.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PAPER = {  # test error (%) the paper reports: (constant depth, stochastic depth)
    ("cifar10", 110): (6.41, 5.25), ("cifar100", 110): (27.22, 24.58), ("cifar10", 1202): (None, 4.91),
    ("svhn", 152): (None, 1.75),
}
PAPER_RECIPE = {"cifar10": "cifar10_resnet110", "cifar100": "cifar100_resnet110", "svhn": "svhn_resnet152",
                "digits": "cifar10_resnet110"}
GRADS: list[float] = []  # |grad| of the first convolution's weight, one entry per backward


def _probe(depth: int, dataset: str):
    """A factory for the paper's ResNet of ``depth`` that records its first convolution's mean
    absolute gradient at every backward (registered under a name the recipe can use)."""
    base = "svhn_resnet" if dataset == "svhn" else "cifar_resnet"

    def build(num_classes: int = 10, **kwargs):
        model = sdsurgery.create_model(f"{base}{depth}", pretrained=False, num_classes=num_classes, **kwargs)
        model.conv1.weight.register_hook(lambda g: GRADS.append(float(g.abs().mean())))
        return model
    name = f"paper_probe_{base}{depth}"
    sdsurgery.register_model(build, name=name)
    return name


def _recipe(args, depth: int, setting: str, seed: int, out: Path):
    """The paper's recipe for the dataset, scaled to digits where it runs on them."""
    r = load_recipe(ROOT / "recipes" / "paper" / f"{PAPER_RECIPE[args.dataset]}.yaml")
    r.model.name = _probe(depth, args.dataset)
    r.stochastic_depth.enabled = setting == "stochastic depth"
    r.stochastic_depth.drop_rate = args.drop_rate
    r.train.seed, r.train.output_dir = seed, str(out / "runs" / f"resnet{depth}_{setting.replace(' ', '_')}_seed{seed}")
    r.train.checkpoint_every, r.train.keep_checkpoints, r.train.mixed_precision = 0, 1, "no"
    r.data.data_dir, r.data.download = args.data_dir, args.download
    if args.dataset == "digits":
        r.data.dataset, r.data.image_size, r.data.val_split = "digits", args.image_size, 144
        r.train.batch_size, r.train.epochs = 64, args.epochs
        r.schedule.decay_milestones = [args.epochs * 0.5, args.epochs * 0.75]
        r.schedule.warmup_epochs = min(1.0, args.epochs * 0.1) if args.warmup_epochs is None else args.warmup_epochs
    if args.warmup_lr is not None:
        r.schedule.warmup_lr = args.warmup_lr
    elif args.epochs:
        scale = args.epochs / r.train.epochs
        r.train.epochs, r.schedule.decay_milestones = args.epochs, [m * scale for m in r.schedule.decay_milestones]
    if args.quick:
        r.train.max_steps_per_epoch = 3
    return r


def _one(args, depth: int, setting: str, seed: int, out: Path) -> dict:
    recipe = _recipe(args, depth, setting, seed, out)
    GRADS.clear()
    from rich.console import Console
    result = finetune(recipe, console=Console(file=io.StringIO()))
    run = Path(result.run_dir)
    epochs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(GRADS) // recipe.train.epochs
    grads = [statistics.fmean(GRADS[i * per_epoch:(i + 1) * per_epoch]) for i in range(recipe.train.epochs)]
    return {"depth": depth, "setting": setting, "seed": seed, "test_error": 100.0 - result.folded["top1"],
            "test_top1": result.folded["top1"], "epoch_seconds": [e["epoch_seconds"] for e in epochs],
            "val_top1": [e.get("val_top1") for e in epochs], "grad_first_conv": grads,
            "train_seconds": result.train_seconds, "run_dir": str(run)}


def _theory(args, depth: int) -> float:
    """Expected share of a training step's FLOPs with the gates at the drop rate (inspect's number)."""
    base = "svhn_resnet" if args.dataset == "svhn" else "cifar_resnet"
    model = sdsurgery.convert(sdsurgery.create_model(f"{base}{depth}", pretrained=False), drop_rate=args.drop_rate)
    size = args.image_size if args.dataset == "digits" else 32
    return flop_report(model, torch.zeros(1, 3, size, size)).expected_fraction


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarise(args, runs: list[dict], theory: dict[int, float]) -> str:
    lines = ["| depth | constant depth: test error % | stochastic depth: test error % | paper (CIFAR-10 / dataset) "
             "| epoch time SD / constant | FLOPs theory | paper |", "|---|---|---|---|---|---|---|"]
    for depth in args.depths:
        const = [r for r in runs if r["depth"] == depth and r["setting"] == "constant depth"]
        sd = [r for r in runs if r["depth"] == depth and r["setting"] == "stochastic depth"]
        ratios = [statistics.fmean(s["epoch_seconds"]) / statistics.fmean(c["epoch_seconds"])
                  for c, s in zip(const, sd)]
        paper = PAPER.get((args.dataset if args.dataset != "digits" else "cifar10", depth))
        paper_txt = f"{paper[0] or '-'} vs {paper[1]}" if paper else "-"
        lines.append(f"| ResNet-{depth} | {_mean_std([r['test_error'] for r in const])} "
                     f"| {_mean_std([r['test_error'] for r in sd])} | {paper_txt} | {_mean_std(ratios)} "
                     f"| {theory[depth]:.3f} | ~0.75 |")
    n = {len([r for r in runs if r['depth'] == d and r['setting'] == s]) for d in args.depths
         for s in ("constant depth", "stochastic depth")}
    lines.append("")
    lines.append(f"{max(n)} seeds per setting; test error of the folded model on {args.dataset}'s test split; "
                 f"epoch time excludes evaluation; the ratio is per seed, SD run beside its constant-depth twin.")
    return "\n".join(lines)


def plot(args, runs: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"constant depth": "#1f77b4", "stochastic depth": "#d62728"}
    written = []
    fig, axes = plt.subplots(1, len(args.depths), figsize=(5 * len(args.depths), 4), squeeze=False)
    for ax, depth in zip(axes[0], args.depths):
        for i, setting in enumerate(colours):
            errs = [r["test_error"] for r in runs if r["depth"] == depth and r["setting"] == setting]
            ax.scatter([i] * len(errs), errs, color=colours[setting], alpha=0.7)
            if errs:
                ax.hlines(statistics.fmean(errs), i - 0.2, i + 0.2, color=colours[setting])
        ax.set_xticks([0, 1], list(colours))
        ax.set_title(f"ResNet-{depth}: test error per seed")
        ax.set_ylabel("test error (%)")
        ax.set_xlim(-0.6, 1.6)
    fig.tight_layout()
    written.append(out / "error.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    for key, name, ylabel, log in (("epoch_seconds", "epoch_time", "training time per epoch (s)", False),
                                   ("grad_first_conv", "gradients", "mean |gradient| of the first conv", True)):
        fig, axes = plt.subplots(1, len(args.depths), figsize=(5 * len(args.depths), 4), squeeze=False)
        for ax, depth in zip(axes[0], args.depths):
            for setting, colour in colours.items():
                curves = [r[key] for r in runs if r["depth"] == depth and r["setting"] == setting]
                for c in curves:
                    ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.25, linewidth=0.8)
                if curves:
                    ax.plot(range(1, len(curves[0]) + 1), [statistics.fmean(v) for v in zip(*curves)],
                            color=colour, linewidth=2, label=f"{setting} (mean of {len(curves)})")
            ax.set_title(f"ResNet-{depth}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=sorted(PAPER_RECIPE))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true", help="let torchvision fetch a missing dataset")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="default: 56 110 (svhn: 152)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="digits: 30; real data: the recipe's")
    p.add_argument("--image-size", type=int, default=16, help="digits only (8x8 images upsampled)")
    p.add_argument("--drop-rate", type=float, default=0.5)
    p.add_argument("--warmup-epochs", type=float, default=None, help="digits: 1 (of 30)")
    p.add_argument("--warmup-lr", type=float, default=None,
                   help="lr the warm-up starts at (default 1e-5; He et al. warm ResNet-110 up at 0.01)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "paper")
    p.add_argument("--quick", action="store_true", help="ResNet-20, 2 seeds, 2 epochs of 3 steps: the plumbing")
    args = p.parse_args(argv)
    args.depths = args.depths or ([152] if args.dataset == "svhn" else [56, 110])
    if args.quick:
        args.depths, args.seeds, args.epochs = [20], 2, 2
    if args.dataset == "digits" and args.epochs is None:
        args.epochs = 30
    args.out.mkdir(parents=True, exist_ok=True)
    theory = {d: _theory(args, d) for d in args.depths}
    runs, start = [], time.perf_counter()
    order = ("constant depth", "stochastic depth")
    for seed in range(args.seeds):
        for depth in args.depths:
            for setting in (order if seed % 2 == 0 else order[::-1]):
                runs.append(_one(args, depth, setting, seed, args.out))
                r = runs[-1]
                print(f"[{time.perf_counter() - start:6.0f} s] ResNet-{depth} {setting:16s} seed {seed}: test error "
                      f"{r['test_error']:.2f}%, {statistics.fmean(r['epoch_seconds']):.2f} s/epoch", flush=True)
    summary = summarise(args, runs, theory)
    versions = {"torch": torch.__version__, "sdsurgery": sdsurgery.__version__, "python": sys.version.split()[0],
                "threads": torch.get_num_threads()}
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                                 for k, v in vars(args).items()},
                                                        "versions": versions, "theory": theory, "runs": runs,
                                                        "seconds": time.perf_counter() - start}, indent=1))
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    for path in plot(args, runs, args.out):
        print(f"wrote {path}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with a bad input (missing data, a depth with no model) as one line and exit 2."""
    from sdsurgery.errors import SurgeryError
    try:
        return main(argv)
    except (SurgeryError, KeyError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
