"""The degradation experiment (He et al. 2016, fig. 1 and 6) on MNIST.

``python -m resnet_fused.experiments.degradation`` trains plain-20, plain-56, ResNet-20 and ResNet-56 with the same
recipe and draws training and test error per epoch: plain nets get worse with depth, residual nets better.
Writes degradation.png and degradation.csv (one row per model and epoch) to --out; each model's own run (metrics,
checkpoints) lands in --out/<model>. ``--epochs`` and ``--subset`` shorten it for a quick look.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os

from ..checkpoint import atomic_write_bytes, atomic_write_text, check_writable_dir, run_cli
from ..train import train

MODELS = ("plain20", "plain56", "resnet20", "resnet56")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m resnet_fused.experiments.degradation",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--subset", type=int, default=0, help="first N training images only (0 = all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max-shift", type=int, default=0, help="augmentation (0: none, to expose optimisation)")
    p.add_argument("--impl", choices=["reference", "fused"], default="reference")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/degradation")
    p.add_argument("--resume", action="store_true", help="reuse finished runs under --out")
    return p


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = {"20": "-", "56": "-"}
    colors = {"plain20": "tab:orange", "plain56": "tab:red", "resnet20": "tab:cyan", "resnet56": "tab:blue"}
    for ax, family in zip(axes, ("plain", "resnet")):
        for model in sorted({r["model"] for r in rows}):
            if not model.startswith(family):
                continue
            rs = [r for r in rows if r["model"] == model]
            ep = [r["epoch"] for r in rs]
            c = colors.get(model)
            ax.plot(ep, [r["train_error"] for r in rs], styles.get(model[-2:], "-"), color=c, alpha=0.6,
                    label=f"{model} train")
            ax.plot(ep, [r["test_error"] for r in rs], "--", color=c, label=f"{model} test", linewidth=2)
        ax.set_title("plain networks" if family == "plain" else "residual networks")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle("MNIST: training (thin) and test (dashed) error, 20 vs 56 layers")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def run(argv=None):
    args = build_parser().parse_args(argv)
    out = check_writable_dir(args.out)
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        run_dir = os.path.join(out, model)
        done = os.path.join(run_dir, "metrics.json")
        if not (args.resume and os.path.exists(done)):
            flags = ["--model", model, "--impl", args.impl, "--epochs", str(args.epochs), "--batch-size",
                     str(args.batch_size), "--lr", str(args.lr), "--max-shift", str(args.max_shift), "--seed",
                     str(args.seed), "--out", run_dir, "--overwrite", "--no-plot"]
            if args.subset:
                flags += ["--subset", str(args.subset)]
            if args.data_root:
                flags += ["--data-root", args.data_root]
            if args.device:
                flags += ["--device", args.device]
            print(f"== {model}", flush=True)
            train(flags)
        with open(done) as f:
            for h in json.load(f):
                rows.append(dict(model=model, epoch=h["epoch"], train_error=100 * (1 - h["train_acc"]),
                                 test_error=100 * (1 - h["test_acc"]), train_loss=h["train_loss"],
                                 test_loss=h["test_loss"], epoch_time_s=h["epoch_time_s"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), os.path.join(out, "degradation.csv"))
    plot(rows, os.path.join(out, "degradation.png"))
    print(f"wrote {os.path.join(out, 'degradation.png')} and degradation.csv")
    return rows


def main(argv=None):
    run_cli(run, argv)


if __name__ == "__main__":
    main()
