"""Seconds of training to reach 99.0% / 99.5% MNIST test accuracy: reference eager, torch.compile and FusedResNet
side by side, the training recipe of ``python -m resnet_fused.train --recipe NAME`` (the fast one by default).

    python bench/time_to_accuracy.py                               # fused, reference, reference-compile; seed 0
    python bench/time_to_accuracy.py --impls fused --seeds 0,1,2   # the fast recipe's 3-seed check

The data is on the device before the clock starts. Compilation, autotuning and first launches are measured on a
throw-away copy of the model (warmup_s, reported apart); the timed model then starts from the same weights, so the
clock holds training alone (FusedResNet's self-captured CUDA graphs are captured inside it, as in a user's loop).
Evaluation after each epoch is off the clock (synchronised before and after) and reported as eval_s. Targets count
as reached at the first epoch end whose test accuracy (of the EMA weights where the recipe has --ema) is at or
above them. cudnn.benchmark is on for every row. Output: a table and a JSON file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))

from resnet_fused import build_model  # noqa: E402
from resnet_fused.data import DeviceLoader, load_splits  # noqa: E402
from resnet_fused.ema import WeightEMA  # noqa: E402
from resnet_fused.reporting import parity  # noqa: E402,F401 - re-exported
from resnet_fused.run_config import RECIPES, recipe  # noqa: E402
from resnet_fused.train import (autocast_ctx, evaluate_split, lr_factor,  # noqa: E402
                                make_optimizer, make_train_loader)

from common import environment, sync, write_json  # noqa: E402

IMPLS = {  # name -> (build_model impl, torch.compile it)
    "fused": ("fused", False),
    "reference": ("reference", False),
    "reference-compile": ("reference", True),
    "fused-compile": ("fused", True),
}


def recipe_config(args):
    """train.py's recipe (RECIPES[--recipe] with the flags given here)."""
    return recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, amp=args.amp,
                  model=args.model, channels_last=args.channels_last)


def run_one(name, seed, data, cfg, dev, targets):
    impl, compiled = IMPLS[name]
    cfg = dataclasses.replace(cfg, seed=seed, channels_last=cfg.channels_last or impl == "fused")
    torch.manual_seed(seed)
    model = build_model(cfg.model, impl=impl).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train = make_train_loader(data, cfg, cfg.batch_size)
    test = DeviceLoader(data["test"], 2000, data["mean"], data["std"], channels_last=cfg.channels_last)
    steps = len(train)
    amp, smoothing = cfg.amp, cfg.label_smoothing

    def make(m):
        opt = make_optimizer(m, cfg)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg))

    def step(run, opt, sched, x, y):
        with autocast_ctx(dev, amp):
            loss = F.cross_entropy(run(x).float(), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    # warm-up on a copy: compilation, autotuning, first launches (and the eval path's)
    t0 = time.perf_counter()
    scratch = copy.deepcopy(model)
    srun = torch.compile(scratch) if compiled else scratch
    opt_s, sched_s = make(scratch)
    x, y = next(iter(train))
    for _ in range(3):
        step(srun, opt_s, sched_s, x, y)
    scratch.eval()
    with torch.no_grad(), autocast_ctx(dev, amp):
        srun(x)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    del scratch, srun, opt_s, sched_s

    run = torch.compile(model) if compiled else model
    opt, sched = make(model)
    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None
    clock, eval_s, history, reached = 0.0, 0.0, [], {}
    for epoch in range(cfg.epochs):
        model.train()
        train.set_epoch(epoch)
        sync(dev)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)  # the epoch's mean loss (read after the clock)
        t = time.perf_counter()
        for x, y in train:
            loss_sum += step(run, opt, sched, x, y)
            if ema is not None:
                ema.update(model)
        sync(dev)
        clock += time.perf_counter() - t
        t = time.perf_counter()
        _, acc, _ = evaluate_split(ema.model if ema is not None else run, test, dev, amp)
        sync(dev)
        eval_s += time.perf_counter() - t
        images = (epoch + 1) * steps * cfg.batch_size
        history.append(dict(epoch=epoch + 1, images=images, train_seconds=clock, train_loss=loss_sum.item() / steps,
                            test_acc=acc))
        print(f"  {name:17s} seed {seed} epoch {epoch + 1}: {clock:8.2f} s  test acc {100 * acc:.2f}%", flush=True)
        for target in targets:
            if acc >= target and target not in reached:
                reached[target] = (clock, images)
    return dict(impl=name, seed=seed, warmup_s=warmup_s, eval_s=eval_s, history=history,
                seconds_to={f"{100 * t:.1f}%": reached[t][0] if t in reached else None for t in targets},
                images_to={f"{100 * t:.1f}%": reached[t][1] if t in reached else None for t in targets},
                final_test_acc=history[-1]["test_acc"])



def summarize(results):
    """Per implementation over its seeds: median seconds to each target (None unless every seed reached it), the
    final accuracy's mean, min and max."""
    rows = []
    for name in dict.fromkeys(r["impl"] for r in results):
        rs = [r for r in results if r["impl"] == name]
        accs = [r["final_test_acc"] for r in rs]
        row = dict(impl=name, seeds=[r["seed"] for r in rs], final_acc_mean=statistics.fmean(accs),
                   final_acc_min=min(accs), final_acc_max=max(accs),
                   warmup_s=statistics.median(r["warmup_s"] for r in rs))
        for key in rs[0]["seconds_to"]:
            got = [r["seconds_to"][key] for r in rs]
            row[f"reached_{key}"] = sum(v is not None for v in got)
            row[f"seconds_to_{key}"] = statistics.median(got) if all(v is not None for v in got) else None
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="fused,reference,reference-compile", help=f"of {', '.join(IMPLS)}")
    p.add_argument("--recipe", default="fast", choices=list(RECIPES), help="train.py's --recipe [fast]")
    p.add_argument("--seeds", default="0")
    p.add_argument("--model", default=None, help="[the recipe's]")
    p.add_argument("--epochs", type=int, default=None, help="[the recipe's]")
    p.add_argument("--batch-size", type=int, default=None, help="[the recipe's]")
    p.add_argument("--lr", type=float, default=None, help="[the recipe's]")
    p.add_argument("--amp", default=None, choices=["off", "bf16", "fp16"], help="[the recipe's: off]")
    p.add_argument("--channels-last", action="store_true", help="for the reference rows too (fused always is)")
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--targets", default="0.99,0.995")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bad = [n for n in args.impls.split(",") if n not in IMPLS]
    if bad:
        p.error(f"unknown --impls {', '.join(bad)}; choose from {', '.join(IMPLS)}")
    targets = tuple(float(t) for t in args.targets.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = recipe_config(args)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True
    data = load_splits("mnist", args.data_root, subset=args.subset or None, device=dev)
    env = environment(dev)
    print(f"# {env['device_name']} | torch {env['torch']} | recipe {args.recipe}: {cfg.model}, "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.schedule} lr {cfg.lr}, amp {cfg.amp}, "
          f"seeds {seeds}")
    tag = "".join(c if c.isalnum() else "-" for c in env["device_name"].lower()).strip("-")[:40]
    path = args.json or os.path.join(HERE, "results", f"time-to-accuracy-{datetime.date.today()}-{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    results = []
    out = dict(environment=env, settings=dict(vars(args), recipe_config=cfg.as_dict()), results=results, complete=False)
    for seed in seeds:  # seeds outermost: the implementations of one seed run side by side
        for name in args.impls.split(","):
            results.append(run_one(name, seed, data, cfg, dev, targets))
            out["summary"], out["parity"] = summarize(results), parity(results)
            write_json(out, path)  # after every run: a run cut short keeps what it measured
    out["complete"] = True
    keys = list(results[0]["seconds_to"])
    print(f"{'impl':17s} {'seeds':>5s} {'warmup s':>9s} " + " ".join(f"{'s to ' + k:>11s}" for k in keys)
          + f"  final test acc: mean (min-max)")
    for r in out["summary"]:
        cells = " ".join(f"{r['seconds_to_' + k]:11.2f}" if r["seconds_to_" + k] is not None
                         else f"{str(r['reached_' + k]) + '/' + str(len(r['seeds'])) + ' seeds':>11s}" for k in keys)
        print(f"{r['impl']:17s} {len(r['seeds']):5d} {r['warmup_s']:9.1f} {cells}  {100 * r['final_acc_mean']:.2f}% "
              f"({100 * r['final_acc_min']:.2f}-{100 * r['final_acc_max']:.2f})")
    for r in out["parity"]:
        print(f"parity fused vs reference, seed {r['seed']}: per-epoch training loss within "
              f"{100 * r['max_rel_train_loss_diff']:.2f}%, final accuracy {r['final_acc_diff_points']:+.2f} points")
    write_json(out, path)
    print(f"# wrote {path}")
    return out


if __name__ == "__main__":
    main()
