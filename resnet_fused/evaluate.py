"""Evaluate a checkpoint from resnet_fused.train: ``python -m resnet_fused.evaluate CHECKPOINT``.

Prints test accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted);
``--json FILE`` writes them too, ``--plots DIR`` the confusion matrix and the misclassified digits as PNG images.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .checkpoint import (UserError, atomic_write_bytes, atomic_write_text, check_output_file, check_writable_dir,
                         load_checkpoint, load_model_state, run_cli)
from .data import DeviceLoader, load_splits
from .train import autocast_ctx, evaluate_split, make_model, pick_device


def build_parser():
    p = argparse.ArgumentParser(prog="python -m resnet_fused.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a last.pt / best.pt written by resnet_fused.train")
    p.add_argument("--model", default=None, help="expected architecture (checked against the checkpoint)")
    p.add_argument("--impl", choices=["reference", "fused"], default=None, help="[the checkpoint's]")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--weights", choices=["ema", "trained"], default=None,
                   help="a run with --ema saved two sets of weights: the average (what the run reported) or the "
                        "trained ones [ema where the checkpoint has it]")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also write DIR/confusion_matrix.png and DIR/misclassified.png (up to 64 misclassified "
                        "images, true -> predicted)")
    return p


@torch.no_grad()
def misclassified(model, split, loader, device, amp, limit=64):
    """(uint8 images, true labels, predicted labels) of the first ``limit`` misclassified images, in split order."""
    model.eval()
    imgs, true, pred, seen = [], [], [], 0
    for x, y in loader:
        with autocast_ctx(device, amp):
            p = model(x).float().argmax(1)
        wrong = (p != y).nonzero().flatten()
        for i in wrong.tolist():
            if len(imgs) < limit:
                imgs.append(split.images[seen + i, 0].cpu())
                true.append(int(y[i]))
                pred.append(int(p[i]))
        seen += y.numel()
    return imgs, true, pred


def write_plots(folder, conf, classes, wrong, title):
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = conf.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1.0 + 0.45 * k))
    shade = conf.double().log1p()
    ax.imshow(shade.numpy(), cmap="Blues")
    for i in range(k):
        for j in range(k):
            if conf[i, j]:  # white on the dark cells, black on the light ones
                ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=6,
                        color="white" if shade[i, j] > 0.6 * shade.max() else "black")
    ax.set_xticks(range(k), [str(c)[:8] for c in classes], rotation=90, fontsize=6)
    ax.set_yticks(range(k), [str(c)[:8] for c in classes], fontsize=6)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title, fontsize=8)
    _save(fig, os.path.join(folder, "confusion_matrix.png"), plt, io)
    imgs, true, pred = wrong
    cols = 8
    rows = max(1, -(-len(imgs) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for n, ax in enumerate(axes.flat):
        ax.axis("off")
        if n < len(imgs):
            ax.imshow(imgs[n].numpy(), cmap="gray_r")
            ax.set_title(f"{true[n]} -> {pred[n]}", fontsize=7)
    fig.suptitle(f"{len(imgs)} misclassified (true -> predicted) — {title}", fontsize=8)
    _save(fig, os.path.join(folder, "misclassified.png"), plt, io)


def _save(fig, path, plt, io):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def evaluate(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.json:
        check_output_file(args.json, "--json")
    if args.plots:
        check_writable_dir(args.plots)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = dict(ckpt["config"])
    if args.model is not None and args.model != cfg.get("model"):
        raise UserError(f"checkpoint {args.checkpoint!r} holds a {cfg.get('model')}, not a {args.model}")
    if args.impl:
        cfg["impl"] = args.impl
    device = pick_device(args.device)
    data = load_splits(cfg["dataset"], args.data_root, args.download, val_size=cfg.get("val_size", 0),
                       subset=cfg.get("subset") or None, seed=cfg.get("seed", 0), device=device)
    model = make_model(cfg, cfg["in_channels"], cfg["num_classes"], device)
    weights = args.weights or ("ema" if "ema" in ckpt else "trained")
    if weights == "ema" and "ema" not in ckpt:
        raise UserError(f"checkpoint {args.checkpoint!r} has no weight EMA (the run had no --ema): use "
                        f"--weights trained")
    state = ckpt["ema"]["model"] if weights == "ema" else ckpt["model"]
    load_model_state(model, state, f"checkpoint {args.checkpoint!r}" + (" (EMA)" if weights == "ema" else ""))
    loader = DeviceLoader(data[args.split], args.batch_size, cfg["mean"], cfg["std"],
                          channels_last=cfg.get("channels_last", False))
    loss, acc, conf = evaluate_split(model, loader, device, args.amp, cfg["num_classes"])
    classes = data["classes"]
    per_class = (conf.diag().double() / conf.sum(1).clamp_min(1).double()).tolist()
    print(f"{cfg['model']} ({cfg['impl']}, {weights} weights) from {args.checkpoint}, epoch {ckpt['epoch']}, "
          f"{cfg['dataset']} "
          f"{args.split}: accuracy {100 * acc:.2f}% ({int(conf.diag().sum())}/{int(conf.sum())}), loss {loss:.4f}")
    print("per-class accuracy:")
    for name, a, n in zip(classes, per_class, conf.sum(1).tolist()):
        print(f"  {str(name):>12s}  {100 * a:6.2f}%  (n={n})")
    w = max(5, len(str(int(conf.max()))) + 1)
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * 6 + "".join(f"{i:>{w}d}" for i in range(conf.shape[1])))
    for i, row in enumerate(conf.tolist()):
        print(f"{i:>5d} " + "".join(f"{v:>{w}d}" for v in row))
    result = dict(checkpoint=args.checkpoint, model=cfg["model"], recipe=cfg.get("recipe", "default"),
                  weights=weights, dataset=cfg["dataset"], split=args.split,
                  accuracy=acc, loss=loss, per_class_accuracy=dict(zip(map(str, classes), per_class)),
                  confusion_matrix=conf.tolist())
    if args.plots:
        wrong = misclassified(model, data[args.split], loader, device, args.amp)
        write_plots(args.plots, conf, classes, wrong, f"{cfg['model']} on {cfg['dataset']} {args.split}, "
                                                      f"accuracy {100 * acc:.2f}%")
        result["misclassified_shown"] = len(wrong[0])
    if args.json:
        atomic_write_text(json.dumps(result, indent=1), args.json)
    return result


def main(argv=None):
    run_cli(evaluate, argv)


if __name__ == "__main__":
    main()
