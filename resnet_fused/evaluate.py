"""Evaluate a checkpoint from resnet_fused.train: ``python -m resnet_fused.evaluate CHECKPOINT [CHECKPOINT ...]``.

Prints test accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted);
``--json FILE`` writes them too, ``--plots DIR`` the confusion matrix and the misclassified digits as PNG images.
Several checkpoints are evaluated as an ensemble: the average of their softmax probabilities, each member's own
accuracy printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import NamedTuple

import torch
from torch import nn

from .checkpoint import (UserError, atomic_write_bytes, atomic_write_text, check_output_file, check_writable_dir,
                         load_checkpoint, load_model_state, run_cli)
from .data import DeviceLoader, load_splits
from .train import autocast_ctx, evaluate_split, make_model, pick_device


def build_parser():
    p = argparse.ArgumentParser(prog="python -m resnet_fused.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="+",
                   help="a last.pt / best.pt written by resnet_fused.train; several: their ensemble (the mean of "
                        "the members' softmax probabilities), the members may differ in architecture")
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


class Ensemble(nn.Module):
    """The members' mean softmax probability, returned as its log: argmax is the ensemble's prediction and
    cross-entropy of the output is the negative log-likelihood of the averaged probabilities."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        p = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()


# what must agree between the members of an ensemble: the data they are evaluated on, and how it is normalized
_SHARED = ("dataset", "subset", "in_channels", "num_classes", "mean", "std")


class Member(NamedTuple):
    path: str
    model: nn.Module
    cfg: dict
    weights: str  # "ema" or "trained"
    epoch: int


def _load_member(path, args, device):
    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["config"])
    if args.model is not None and args.model != cfg.get("model"):
        raise UserError(f"checkpoint {path!r} holds a {cfg.get('model')}, not a {args.model}")
    if args.impl:
        cfg["impl"] = args.impl
    model = make_model(cfg, cfg["in_channels"], cfg["num_classes"], device)
    weights = args.weights or ("ema" if "ema" in ckpt else "trained")
    if weights == "ema" and "ema" not in ckpt:
        raise UserError(f"checkpoint {path!r} has no weight EMA (the run had no --ema): use --weights trained")
    state = ckpt["ema"]["model"] if weights == "ema" else ckpt["model"]
    load_model_state(model, state, f"checkpoint {path!r}" + (" (EMA)" if weights == "ema" else ""))
    return Member(path, model, cfg, weights, ckpt["epoch"])


def _data_key(cfg, split):
    """The fields that decide which images a member is evaluated on (val_size and seed carve train only)."""
    key = {k: cfg.get(k) or None for k in _SHARED}
    if split == "train":
        key["val_size"] = cfg.get("val_size") or 0
        key["seed"] = cfg.get("seed", 0) if key["val_size"] else None
    return key


def evaluate(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if len({os.path.realpath(p) for p in args.checkpoint}) != len(args.checkpoint):
        raise UserError("the same checkpoint is given twice: an ensemble's members must be distinct files")
    if args.json:
        check_output_file(args.json, "--json")
    if args.plots:
        check_writable_dir(args.plots)
    device = pick_device(args.device)
    members = [_load_member(path, args, device) for path in args.checkpoint]
    cfg = members[0].cfg
    for other in members[1:]:
        a, b = _data_key(cfg, args.split), _data_key(other.cfg, args.split)
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            raise UserError(f"checkpoints {members[0].path!r} and {other.path!r} cannot form an ensemble: their "
                            + ", ".join(f"{k} differ ({a[k]} vs {b[k]})" for k in diff))
    data = load_splits(cfg["dataset"], args.data_root, args.download, val_size=cfg.get("val_size", 0),
                       subset=cfg.get("subset") or None, seed=cfg.get("seed", 0), device=device)
    loader = DeviceLoader(data[args.split], args.batch_size, cfg["mean"], cfg["std"],
                          channels_last=cfg.get("channels_last", False))
    classes = data["classes"]
    weights = members[0].weights if len({m.weights for m in members}) == 1 else "mixed"
    results = []
    if len(members) > 1:
        for m in members:
            loss, acc, _ = evaluate_split(m.model, loader, device, args.amp, cfg["num_classes"])
            results.append(dict(checkpoint=m.path, model=m.cfg["model"], recipe=m.cfg.get("recipe", "default"),
                                weights=m.weights, epoch=m.epoch, accuracy=acc, loss=loss))
            print(f"member {m.cfg['model']} ({m.cfg['impl']}, {m.weights} weights) from {m.path}, epoch {m.epoch}: "
                  f"accuracy {100 * acc:.2f}%, loss {loss:.4f}")
        model = Ensemble([m.model for m in members])
        name = f"ensemble of {len(members)}"
        source = f"{len(members)} checkpoints"
    else:
        model, name, source = members[0].model, cfg["model"], f"{members[0].path}, epoch {members[0].epoch}"
    loss, acc, conf = evaluate_split(model, loader, device, args.amp, cfg["num_classes"])
    per_class = (conf.diag().double() / conf.sum(1).clamp_min(1).double()).tolist()
    impl = cfg["impl"] if len({m.cfg["impl"] for m in members}) == 1 else "mixed"
    print(f"{name} ({impl}, {weights} weights) from {source}, {cfg['dataset']} "
          f"{args.split}: accuracy {100 * acc:.2f}% ({int(conf.diag().sum())}/{int(conf.sum())}), loss {loss:.4f}")
    print("per-class accuracy:")
    for cname, a, n in zip(classes, per_class, conf.sum(1).tolist()):
        print(f"  {str(cname):>12s}  {100 * a:6.2f}%  (n={n})")
    w = max(5, len(str(int(conf.max()))) + 1)
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * 6 + "".join(f"{i:>{w}d}" for i in range(conf.shape[1])))
    for i, row in enumerate(conf.tolist()):
        print(f"{i:>5d} " + "".join(f"{v:>{w}d}" for v in row))
    result = dict(checkpoint=args.checkpoint[0] if len(members) == 1 else list(args.checkpoint),
                  model=name, recipe=cfg.get("recipe", "default"),
                  weights=weights, dataset=cfg["dataset"], split=args.split,
                  accuracy=acc, loss=loss, per_class_accuracy=dict(zip(map(str, classes), per_class)),
                  confusion_matrix=conf.tolist())
    if results:
        result["members"] = results
    if args.plots:
        wrong = misclassified(model, data[args.split], loader, device, args.amp)
        write_plots(args.plots, conf, classes, wrong, f"{name} on {cfg['dataset']} {args.split}, "
                                                      f"accuracy {100 * acc:.2f}%")
        result["misclassified_shown"] = len(wrong[0])
    if args.json:
        atomic_write_text(json.dumps(result, indent=1), args.json)
    return result


def main(argv=None):
    run_cli(evaluate, argv)


if __name__ == "__main__":
    main()
