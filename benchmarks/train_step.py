"""Training-step time of converted models against the originals, in one process.

    .venv/bin/python benchmarks/train_step.py [--size 64] [--batch 16] [--steps 20]

Variants per architecture: the original; converted with drop_rate 0 (gate overhead);
converted, block mode, linear schedule to 0.5 (the paper); and, for timm models, timm's own
drop_path_rate=0.5 (which computes every branch). Prints median step times, ratios to the
original, and the FLOPs theory for the converted model.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
import torchvision

import sdsurgery
from sdsurgery.bench import median, time_eval, time_train_steps
from sdsurgery.flops import flop_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="torchvision:resnet50,timm:resnet50")
    ap.add_argument("--mode", default="block")
    args = ap.parse_args()
    torch.manual_seed(0)
    for spec in args.models.split(","):
        source, name = spec.split(":")
        build = (lambda **kw: timm.create_model(name, pretrained=False, num_classes=10, **kw)) \
            if source == "timm" else (lambda **kw: torchvision.models.get_model(name, weights=None, num_classes=10, **kw))
        original = build()
        variants = {
            "original": original,
            "gates p=0": sdsurgery.convert(original, drop_rate=0.0, seed=0),
            f"sdsurgery {args.mode} 0.5": sdsurgery.convert(original, drop_rate=0.5, mode=args.mode, seed=0),
        }
        if source == "timm":
            variants["timm drop_path 0.5"] = build(drop_path_rate=0.5)
        elif name.startswith(("convnext", "efficientnet", "swin")):
            variants["tv stochastic_depth 0.5"] = build(stochastic_depth_prob=0.5)
        x0 = torch.randn(1, 3, args.size, args.size)
        theory = flop_report(variants[f"sdsurgery {args.mode} 0.5"], x0).expected_fraction

        def batch():
            return torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))

        times = time_train_steps(variants, batch, steps=args.steps)
        base = median(times["original"])
        print(f"\n{spec}  {args.size}px batch {args.batch}, {args.steps} steps, "
              f"{torch.get_num_threads()} threads; theory (FLOPs) {theory:.3f}")
        for k, t in times.items():
            print(f"  {k:24s} {median(t) * 1e3:8.1f} ms/step  ratio {median(t) / base:.3f}")
        folded = sdsurgery.fold(variants[f"sdsurgery {args.mode} 0.5"])
        ev = time_eval({"original": copy.deepcopy(original), "folded": folded},
                       torch.randn(args.batch, 3, args.size, args.size), steps=args.steps)
        print(f"  eval: folded/original {median(ev['folded']) / median(ev['original']):.3f}")


if __name__ == "__main__":
    main()
