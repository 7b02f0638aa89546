"""Is a fused-vs-reference training difference a bug or chaos? Two measurements, CPU or GPU.

    python -m resnet_fused.experiments.lockstep --seed 1 --steps 470 --json out.json     # lockstep run (the fast recipe's batches)
    python -m resnet_fused.experiments.lockstep --seed 1 --fp64-check                    # one step's error against float64

Lockstep: FusedResNet, the reference and the reference with its initial weights perturbed by a relative 1e-6
(--eps) start from the same weights and train on the same batches with train.py's recipe pieces; every step logs
their losses and every 5th the relative parameter distance ||fused - ref|| / ||ref|| beside ||perturbed - ref|| /
||ref||. Where the two distances grow alike, the fused run differs from the reference no more than the reference
differs from itself under a rounding-sized change: chaos, not a bug.

--fp64-check: the output and every parameter gradient of one training step on a batch of 256 at initialisation,
for FusedResNet and the reference in float32, against the reference in float64 (relative norms of the errors).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from .. import build_model
from ..data import load_splits
from ..run_config import RECIPES, recipe
from ..train import lr_factor, make_optimizer, make_train_loader


def rel_dist(a, b):
    num = sum(((x - y).double() ** 2).sum() for x, y in zip(a.parameters(), b.parameters()))
    den = sum((y.double() ** 2).sum() for y in b.parameters())
    return (num / den).sqrt().item()


def models(cfg, seed, dev, eps):
    torch.manual_seed(seed)
    fused = build_model(cfg.model, impl="fused").to(dev).to(memory_format=torch.channels_last)
    ref = build_model(cfg.model, impl="reference").to(dev).to(memory_format=torch.channels_last)
    ref.load_state_dict(fused.state_dict())
    pert = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in pert.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g).to(dev))
    return fused, ref, pert


def lockstep(cfg, data, dev, seed, steps_max, eps, path):
    fused, ref, pert = models(cfg, seed, dev, eps)
    runs = dict(fused=fused, reference=ref, perturbed=pert)
    train = make_train_loader(data, cfg, cfg.batch_size)
    steps = len(train)
    opts = {k: make_optimizer(m, cfg) for k, m in runs.items()}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps, cfg)) for k, o in opts.items()}
    log, i, t0 = [], 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        train.set_epoch(epoch)
        for x, y in train:
            row = dict(step=i)
            for k, m in runs.items():
                m.train()
                loss = F.cross_entropy(m(x).float(), y, label_smoothing=cfg.label_smoothing)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                scheds[k].step()
                row[k] = loss.item()
            if i % 5 == 0:
                row["d_fused_ref"], row["d_pert_ref"] = rel_dist(fused, ref), rel_dist(pert, ref)
            log.append(row)
            if i % 10 == 0:
                print(json.dumps(row), f"{time.perf_counter() - t0:.0f} s", flush=True)
            i += 1
            if i >= steps_max:
                break
        if i >= steps_max:
            break
    if path:
        with open(path, "w") as f:
            json.dump(dict(seed=seed, eps=eps, recipe_config=cfg.as_dict(), log=log), f, indent=0)
    return log


def fp64_check(cfg, data, dev, seed):
    fused, ref, _ = models(cfg, seed, dev, 0.0)
    r64 = copy.deepcopy(ref).double()
    imgs = data["train"].images[:256].to(dev).float() / 255
    x = ((imgs - data["mean"]) / data["std"]).contiguous(memory_format=torch.channels_last)
    y = data["train"].labels[:256].to(dev)

    def grads(m, inp):
        m.train()
        m.zero_grad()
        out = m(inp)
        F.cross_entropy(out.double(), y, label_smoothing=cfg.label_smoothing).backward()
        return out.double(), [p.grad.double() for p in m.parameters()]

    o64, g64 = grads(r64, x.double())
    res = {}
    for name, m in (("fused", fused), ("reference", ref)):
        o, g = grads(m, x)
        per = sorted(((a - c).norm() / c.norm()).item() for a, c in zip(g, g64))
        res[name] = dict(output=((o - o64).norm() / o64.norm()).item(),
                         gradients=(sum(((a - c) ** 2).sum() for a, c in zip(g, g64))
                                    / sum((c ** 2).sum() for c in g64)).sqrt().item(),
                         worst_parameter=per[-1], median_parameter=per[len(per) // 2])
        print(f"{name:10s} relative error vs float64: output {res[name]['output']:.2e}, all gradients "
              f"{res[name]['gradients']:.2e}, per parameter median {res[name]['median_parameter']:.2e} / worst "
              f"{res[name]['worst_parameter']:.2e}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="fast", choices=list(RECIPES))
    p.add_argument("--lr", type=float, default=None, help="[the recipe's]")
    p.add_argument("--batch-size", type=int, default=None, help="[the recipe's]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10**9, help="stop after this many steps [the recipe's whole run]")
    p.add_argument("--eps", type=float, default=1e-6, help="relative perturbation of the third run's weights")
    p.add_argument("--fp64-check", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = recipe(args.recipe, lr=args.lr, batch_size=args.batch_size, seed=args.seed, channels_last=True)
    dev = torch.device(args.device)
    data = load_splits("mnist", args.data_root, device=dev)
    if args.fp64_check:
        return fp64_check(cfg, data, dev, args.seed)
    return lockstep(cfg, data, dev, args.seed, args.steps, args.eps, args.json)


if __name__ == "__main__":
    main()
