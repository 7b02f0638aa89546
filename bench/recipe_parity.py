"""Whole-run parity of FusedResNet and the reference from ``python -m resnet_fused.train`` runs (issue: per-epoch
training loss within 1%, final test accuracy within 0.05 points, same recipe and seed).

    python bench/recipe_parity.py --pair 0:results/parity-default/seed0-fused:results/parity-default/seed0-reference \
        [--pair 1:...:...] [--json out.json]

Each ``--pair SEED:FUSED_DIR:REFERENCE_DIR`` names two run directories (their metrics.json, written after every
epoch). Prints the per-epoch table and, per seed, the largest relative training-loss difference and the final
accuracy difference; then the mean and spread (min, max) of the final accuracies over the seeds. Runs that have not
finished are compared over the epochs both have, and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from time_to_accuracy import parity  # noqa: E402


def load_run(path):
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)


def compare(pairs):
    """{seeds: [...], summary: {...}} from [(seed, fused metrics, reference metrics)]."""
    results, seeds = [], []
    for seed, fused, ref in pairs:
        n = min(len(fused), len(ref))
        if n == 0:
            raise ValueError(f"seed {seed}: a run has no finished epoch")
        for impl, hist in (("fused", fused[:n]), ("reference", ref[:n])):
            results.append(dict(impl=impl, seed=seed, history=hist, final_test_acc=hist[-1]["test_acc"]))
        p = parity(results[-2:])[0]
        seeds.append(dict(seed=seed, epochs_compared=n, finished=(len(fused) == len(ref) == n),
                          fused_final_acc=fused[n - 1]["test_acc"], reference_final_acc=ref[n - 1]["test_acc"],
                          **{k: v for k, v in p.items() if k != "seed"},
                          loss_within_1pct=p["max_rel_train_loss_diff"] <= 0.01,
                          acc_within_0_05=abs(p["final_acc_diff_points"]) <= 0.05 + 1e-9,
                          epochs=[dict(epoch=a["epoch"], fused_train_loss=a["train_loss"],
                                       reference_train_loss=b["train_loss"], fused_test_acc=a["test_acc"],
                                       reference_test_acc=b["test_acc"]) for a, b in zip(fused[:n], ref[:n])]))

    def spread(key):
        v = [100 * s[key] for s in seeds]
        return dict(mean=statistics.fmean(v), min=min(v), max=max(v), n=len(v))
    return dict(seeds=seeds, summary=dict(fused_acc=spread("fused_final_acc"),
                                          reference_acc=spread("reference_final_acc")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="append", required=True, metavar="SEED:FUSED_DIR:REFERENCE_DIR")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pairs = []
    for spec in args.pair:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[0].isdigit():
            raise SystemExit(f"error: --pair takes SEED:FUSED_DIR:REFERENCE_DIR, got {spec!r}")
        pairs.append((int(parts[0]), load_run(parts[1]), load_run(parts[2])))
    out = compare(pairs)
    for s in out["seeds"]:
        print(f"seed {s['seed']} ({s['epochs_compared']} epochs{'' if s['finished'] else ', not finished'}):")
        print("  epoch  train loss fused / reference   rel diff   test acc fused / reference")
        for e in s["epochs"]:
            rel = abs(e["fused_train_loss"] - e["reference_train_loss"]) / e["reference_train_loss"]
            print(f"  {e['epoch']:5d}  {e['fused_train_loss']:.5f} / {e['reference_train_loss']:.5f}   "
                  f"{100 * rel:6.2f}%   {100 * e['fused_test_acc']:.2f}% / {100 * e['reference_test_acc']:.2f}%")
        print(f"  largest per-epoch training-loss difference {100 * s['max_rel_train_loss_diff']:.2f}% "
              f"({'within' if s['loss_within_1pct'] else 'NOT within'} 1%), final accuracy difference "
              f"{s['final_acc_diff_points']:+.2f} points ({'within' if s['acc_within_0_05'] else 'NOT within'} 0.05)")
    f, r = out["summary"]["fused_acc"], out["summary"]["reference_acc"]
    print(f"final test accuracy over {f['n']} seed(s): fused {f['mean']:.2f}% ({f['min']:.2f}-{f['max']:.2f}), "
          f"reference {r['mean']:.2f}% ({r['min']:.2f}-{r['max']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
