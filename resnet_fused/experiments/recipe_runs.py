"""Final test accuracy of ``python -m resnet_fused.train`` runs, grouped (a recipe over seeds, or one choice of a
recipe left out), as mean and spread; the README's recipe rows and the per-choice measurements come from it.

    python -m resnet_fused.experiments.recipe_runs --group best=results/best/seed0-fused,results/best/seed1-fused \
        [--group "best, no EMA"=...] [--json out.json]

Each ``--group LABEL=DIR[,DIR...]`` names run directories (their metrics.json, written after every epoch). Per run:
the epochs done, the last epoch's test accuracy (the EMA weights' where the run had ``--ema``: what the run
reported), the trained weights' test accuracy beside it (``test_acc_raw``, runs with ``--ema`` only), and the
training time. Per group: mean, min and max over its runs; every group after the first also as a difference of means
from the first (the baseline). The highest test accuracy any epoch reached is printed too, marked as what it is: an
epoch chosen by the test set, not a result.
"""
from __future__ import annotations

import argparse
import json
import os

from ..reporting import mean_spread, write_json


def load_run(path):
    with open(os.path.join(path, "metrics.json")) as f:
        history = json.load(f)
    if not history:
        raise ValueError(f"{path}: metrics.json has no finished epoch")
    return history


def summarize_run(path, history):
    last = history[-1]
    peak = max(history, key=lambda r: r["test_acc"])
    return dict(dir=path, epochs=last["epoch"], final_acc=100 * last["test_acc"],
                trained_weights_acc=100 * last["test_acc_raw"] if "test_acc_raw" in last else None,
                peak_acc_chosen_on_test=100 * peak["test_acc"], peak_epoch=peak["epoch"],
                train_time_s=sum(r.get("epoch_time_s", 0.0) for r in history))


def summarize(groups):
    """{groups: [...]} from [(label, [(dir, history), ...]), ...]; the first group is the baseline."""
    out = []
    for label, runs in groups:
        rows = [summarize_run(d, h) for d, h in runs]
        raw = [r["trained_weights_acc"] for r in rows if r["trained_weights_acc"] is not None]
        g = dict(label=label, runs=rows, final_acc=mean_spread([r["final_acc"] for r in rows]),
                 trained_weights_acc=mean_spread(raw) if len(raw) == len(rows) else None,
                 same_length=len({r["epochs"] for r in rows}) == 1)
        if out:
            g["diff_from_baseline_points"] = g["final_acc"]["mean"] - out[0]["final_acc"]["mean"]
        out.append(g)
    return dict(baseline=out[0]["label"], groups=out)


def _fmt(s):
    return f"{s['mean']:.2f}% ({s['min']:.2f}-{s['max']:.2f}, n={s['n']})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", action="append", required=True, metavar="LABEL=DIR[,DIR...]")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    groups = []
    for spec in args.group:
        label, sep, dirs = spec.partition("=")
        if not sep or not label or not dirs:
            raise SystemExit(f"error: --group takes LABEL=DIR[,DIR...], got {spec!r}")
        groups.append((label, [(d, load_run(d)) for d in dirs.split(",")]))
    out = summarize(groups)
    for g in out["groups"]:
        print(f"{g['label']}:")
        for r in g["runs"]:
            raw = (f", trained weights {r['trained_weights_acc']:.2f}%" if r["trained_weights_acc"] is not None
                   else "")
            print(f"  {r['dir']}: {r['epochs']} epochs, final test acc {r['final_acc']:.2f}%{raw}, "
                  f"{r['train_time_s']:.0f} s of training (highest epoch {r['peak_acc_chosen_on_test']:.2f}% at "
                  f"epoch {r['peak_epoch']}: chosen on the test set, not a result)")
        line = f"  final test accuracy {_fmt(g['final_acc'])}"
        if g["trained_weights_acc"] is not None:
            line += f"; trained weights {_fmt(g['trained_weights_acc'])}"
        if "diff_from_baseline_points" in g:
            line += f"; {g['diff_from_baseline_points']:+.2f} points from {out['baseline']}"
        if not g["same_length"]:
            line += "; NOTE: its runs have different lengths (one has not finished?)"
        print(line)
    if args.json:
        write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
