"""What an augmentation does to the digits and to a trained net: the numbers behind results/recipes/README.md's
elastic-distortion and precise-BatchNorm entries.

    python -m resnet_fused.experiments.augment_check stats [--json out.json]
    python -m resnet_fused.experiments.augment_check nets CHECKPOINT [CHECKPOINT ...] [--json out.json]

``stats``: pixel statistics (std, share of pixels above 200 and above 10, on the 0-255 scale) of 2,000 training
digits plain and under each augmentation the loader has, the rotation/zoom and the elastic field resampled once
(the loader) and twice (one after the other, as before ecf9aae), all from the same draws.

``nets``: each checkpoint's test accuracy (its EMA weights where it has them, and its trained weights) on the plain
test digits, on test digits under the elastic field (ALPHA 34) and under the best recipe's rotation/zoom, and on the
plain test digits again after its BatchNorm statistics are recomputed on the plain training digits (one pass in
training mode, cumulative average: "precise BN").
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from ..checkpoint import load_checkpoint, load_model_state
from ..data import (DeviceLoader, elastic_field, elastic_warp, load_splits, rotate_zoom,
                               rotate_zoom_theta)
from ..reporting import write_json
from ..train import evaluate_split, make_model


def pixel_stats(x):
    x = x.float()
    return dict(std=x.std().item(), above_200=(x > 200).float().mean().item(), above_10=(x > 10).float().mean().item())


def stats(data, n=2000, seed=0):
    x = data["train"].images[:n].float()
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(2, n, generator=g, dtype=torch.float64)
    turn = ((2 * u[0] - 1) * math.radians(10.0), 1 + (2 * u[1] - 1) * 0.1)  # the best recipe's ranges
    field = elastic_field(torch.rand(n, 2, *x.shape[-2:], generator=g), 34.0)
    rows = {"plain": x, "rotation/zoom": rotate_zoom(x, *turn), "elastic 34": elastic_warp(x, field),
            "rotation/zoom + elastic 34, one resample": elastic_warp(x, field, rotate_zoom_theta(*turn)),
            "rotation/zoom + elastic 34, two resamples": elastic_warp(rotate_zoom(x, *turn), field)}
    out = {k: pixel_stats(v) for k, v in rows.items()}
    for k, v in out.items():
        print(f"{k:42s} std {v['std']:6.2f}  >200 {100 * v['above_200']:5.2f}%  >10 {100 * v['above_10']:5.2f}%")
    return out


def recompute_bn(model, loader):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)


def nets(data, paths, device):
    out = {}
    for path in paths:
        ckpt = load_checkpoint(path)
        cfg = dict(ckpt["config"])
        for weights in (["ema"] if "ema" in ckpt else []) + ["trained"]:
            model = make_model(cfg, cfg["in_channels"], cfg["num_classes"], device)
            load_model_state(model, ckpt["ema"]["model"] if weights == "ema" else ckpt["model"], path)
            test = lambda **aug: DeviceLoader(data["test"], 1000, cfg["mean"], cfg["std"], **aug)  # noqa: E731
            row = {name: 100 * evaluate_split(model, test(**aug), device)[1]
                   for name, aug in [("plain", {}), ("elastic 34", dict(elastic=34.0)),
                                     ("rotation/zoom", dict(rotate=10.0, scale=0.1))]}
            recompute_bn(model, DeviceLoader(data["train"], 500, cfg["mean"], cfg["std"]))
            row["plain, BN recomputed on plain training digits"] = 100 * evaluate_split(model, test(), device)[1]
            out[f"{path} ({weights} weights)"] = row
            print(f"{path} ({weights} weights): " + ", ".join(f"{k} {v:.2f}%" for k, v in row.items()), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["stats", "nets"])
    p.add_argument("checkpoint", nargs="*")
    p.add_argument("--data-root", default=os.environ.get("RESNET_FUSED_DATA", "./data"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    if (args.what == "nets") != bool(args.checkpoint):
        p.error("nets takes one or more checkpoints, stats none")
    device = torch.device("cpu")
    data = load_splits("mnist", args.data_root, device=device)
    result = stats(data) if args.what == "stats" else nets(data, args.checkpoint, device)
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
