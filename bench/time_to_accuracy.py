"""Seconds of training to reach 99.0% and 99.5% MNIST test accuracy, reference vs FusedResNet, same recipe.

    python bench/time_to_accuracy.py --impls reference,fused --epochs 8

The data is on the device before the clock starts; compile / autotune / first-launch time is measured on a
throw-away copy of the model and reported separately (warmup_s); evaluation after each epoch is excluded from the
clock (the clock is synchronised before and after it). Output: a table and a JSON file.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from resnet_fused import build_model  # noqa: E402
from resnet_fused.data import DeviceLoader, load_splits  # noqa: E402
from resnet_fused.train import autocast_ctx, evaluate_split, lr_factor  # noqa: E402

sys.path.insert(0, HERE)
from throughput import environment, write_json  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_one(impl, data, args, dev):
    cfg = dict(epochs=args.epochs, schedule=args.schedule, warmup_epochs=args.warmup_epochs)
    torch.manual_seed(args.seed)
    model = build_model(args.model, impl=impl).to(dev)
    cl = args.channels_last or impl == "fused"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    kw = dict(mean=data["mean"], std=data["std"], channels_last=cl)
    train = DeviceLoader(data["train"], args.batch_size, shuffle=True, max_shift=2, seed=args.seed, drop_last=True,
                         **kw)
    test = DeviceLoader(data["test"], 2000, **kw)
    steps = len(train)

    def make(m):
        decay = [p for p in m.parameters() if p.ndim > 1]
        rest = [p for p in m.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([dict(params=decay, weight_decay=args.wd), dict(params=rest, weight_decay=0)],
                              lr=args.lr, momentum=0.9, nesterov=True)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg))

    run = torch.compile(model) if args.compile else model

    def step(m, opt, sched, x, y):
        with autocast_ctx(dev, args.amp):
            loss = F.cross_entropy(run(x).float() if m is model else m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    # warm-up on a copy: compilation, autotuning, first launches; the timed model starts from the same weights
    t0 = time.perf_counter()
    scratch = copy.deepcopy(model)
    opt_s, sched_s = make(scratch)
    srun = torch.compile(scratch) if args.compile else scratch
    x, y = next(iter(train))
    for _ in range(3):
        with autocast_ctx(dev, args.amp):
            loss = F.cross_entropy(srun(x).float(), y)
        opt_s.zero_grad()
        loss.backward()
        opt_s.step()
    scratch.eval()
    with torch.no_grad():
        srun(x)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    del scratch, srun

    opt, sched = make(model)
    clock, history, reached = 0.0, [], {}
    for epoch in range(args.epochs):
        model.train()
        train.set_epoch(epoch)
        sync(dev)
        t = time.perf_counter()
        for x, y in train:
            step(model, opt, sched, x, y)
        sync(dev)
        clock += time.perf_counter() - t
        _, acc, _ = evaluate_split(run, test, dev, args.amp)
        history.append(dict(epoch=epoch + 1, train_seconds=clock, test_acc=acc))
        print(f"  {impl:9s} epoch {epoch + 1}: {clock:7.2f} s  test acc {100 * acc:.2f}%", flush=True)
        for target in args.targets:
            if acc >= target and target not in reached:
                reached[target] = clock
    return dict(impl=impl, warmup_s=warmup_s, history=history,
                seconds_to={f"{100 * t:.1f}%": reached.get(t) for t in args.targets},
                final_test_acc=history[-1]["test_acc"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="reference,fused")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--schedule", default="onecycle", choices=["multistep", "cosine", "onecycle"])
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="0.99,0.995")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_splits("mnist", args.data_root, subset=args.subset or None, device=dev)
    env = environment(dev)
    print(f"# {env['device_name']} | torch {env['torch']} | {args.model}, batch {args.batch_size}, amp {args.amp}, "
          f"{args.schedule} lr {args.lr}, {args.epochs} epochs")
    tag = "".join(c if c.isalnum() else "-" for c in env["device_name"].lower()).strip("-")[:40]
    path = args.json or os.path.join(HERE, "results", f"time-to-accuracy-{datetime.date.today()}-{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    results = []
    out = dict(environment=env, settings={k: v for k, v in vars(args).items()}, results=results, complete=False)
    for impl in args.impls.split(","):
        results.append(run_one(impl, data, args, dev))
        write_json(out, path)  # after every implementation: a run cut short keeps what it measured
    out["complete"] = True
    print(f"{'impl':10s} {'warmup s':>9s} " + " ".join(f"{'to ' + k:>10s}" for k in results[0]["seconds_to"])
          + f" {'final acc':>9s}")
    for r in results:
        cells = " ".join(f"{v:10.2f}" if v is not None else f"{'not reached':>10s}" for v in r["seconds_to"].values())
        print(f"{r['impl']:10s} {r['warmup_s']:9.1f} {cells} {100 * r['final_test_acc']:8.2f}%")
    write_json(out, path)
    print(f"# wrote {path}")
    return out


if __name__ == "__main__":
    main()
