"""Whole-run parity of FusedResNet and the reference from ``python -m resnet_fused.train`` runs (issue: per-epoch
training loss within 1%, final test accuracy within 0.05 points, same recipe and seed).

    python -m resnet_fused.experiments.recipe_parity --pair 0:results/parity-default/seed0-fused:results/parity-default/seed0-reference \
        [--pair 1:...:...] [--json out.json]

Each ``--pair SEED:FUSED_DIR:REFERENCE_DIR[:CONTROL_DIR]`` names the run directories (their metrics.json, written
after every epoch). Prints the per-epoch table and, per seed, the largest relative training-loss difference and the
final accuracy difference; then the mean and spread (min, max) of the final accuracies over the seeds. Runs that
have not finished are compared over the epochs all have, and say so.

CONTROL_DIR: the reference run again with its initial weights perturbed by a relative 1e-6 (``train.py
--init-noise 1e-6``, same seed): how far the reference drifts from itself under a change far below any kernel's
rounding. Its differences from the reference are reported beside the fused run's (the chaos floor of the recipe:
a fused run cannot be expected to track the reference more closely than the reference tracks itself).
"""
from __future__ import annotations

import argparse
import json
import os

from ..reporting import mean_spread, parity, write_json


def load_run(path):
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)


def _rel(a, b):
    return abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"])


def compare(pairs):
    """{seeds: [...], summary: {...}} from [(seed, fused metrics, reference metrics[, control metrics])]."""
    results, seeds = [], []
    for seed, fused, ref, *control in pairs:
        control = control[0] if control else None
        runs = [fused, ref] + ([control] if control is not None else [])
        n = min(len(r) for r in runs)
        if n == 0:
            raise ValueError(f"seed {seed}: a run has no finished epoch")
        for impl, hist in (("fused", fused[:n]), ("reference", ref[:n])):
            results.append(dict(impl=impl, seed=seed, history=hist, final_test_acc=hist[-1]["test_acc"]))
        p = parity(results[-2:])[0]
        epochs = [dict(epoch=a["epoch"], fused_train_loss=a["train_loss"], reference_train_loss=b["train_loss"],
                       fused_test_acc=a["test_acc"], reference_test_acc=b["test_acc"], rel_train_loss_diff=_rel(a, b))
                  for a, b in zip(fused[:n], ref[:n])]
        row = dict(seed=seed, epochs_compared=n, finished=all(len(r) == n for r in runs),
                   fused_final_acc=fused[n - 1]["test_acc"], reference_final_acc=ref[n - 1]["test_acc"],
                   **{k: v for k, v in p.items() if k != "seed"},
                   mean_rel_train_loss_diff=sum(e["rel_train_loss_diff"] for e in epochs) / n,
                   loss_within_1pct=p["max_rel_train_loss_diff"] <= 0.01,
                   acc_within_0_05=abs(p["final_acc_diff_points"]) <= 0.05 + 1e-9, epochs=epochs)
        if control is not None:
            for e, c, b in zip(epochs, control[:n], ref[:n]):
                e.update(control_train_loss=c["train_loss"], control_test_acc=c["test_acc"],
                         control_rel_train_loss_diff=_rel(c, b))
            crel = [e["control_rel_train_loss_diff"] for e in epochs]
            row.update(control_final_acc=control[n - 1]["test_acc"], control_max_rel_train_loss_diff=max(crel),
                       control_mean_rel_train_loss_diff=sum(crel) / n,
                       control_final_acc_diff_points=100 * (control[n - 1]["test_acc"] - ref[n - 1]["test_acc"]),
                       control_loss_within_1pct=max(crel) <= 0.01)
        seeds.append(row)

    def spread(key):
        return mean_spread([100 * s[key] for s in seeds])
    return dict(seeds=seeds, summary=dict(fused_acc=spread("fused_final_acc"),
                                          reference_acc=spread("reference_final_acc")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="append", required=True, metavar="SEED:FUSED_DIR:REFERENCE_DIR[:CONTROL_DIR]")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pairs = []
    for spec in args.pair:
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not parts[0].isdigit():
            raise SystemExit(f"error: --pair takes SEED:FUSED_DIR:REFERENCE_DIR[:CONTROL_DIR], got {spec!r}")
        pairs.append((int(parts[0]), *(load_run(d) for d in parts[1:])))
    out = compare(pairs)
    for s in out["seeds"]:
        ctl = "control_final_acc" in s
        print(f"seed {s['seed']} ({s['epochs_compared']} epochs{'' if s['finished'] else ', not finished'}):")
        print("  epoch  train loss fused / reference   rel diff   test acc fused / reference"
              + ("   control: train loss, rel diff, test acc" if ctl else ""))
        for e in s["epochs"]:
            print(f"  {e['epoch']:5d}  {e['fused_train_loss']:.5f} / {e['reference_train_loss']:.5f}   "
                  f"{100 * e['rel_train_loss_diff']:6.2f}%   {100 * e['fused_test_acc']:.2f}% / "
                  f"{100 * e['reference_test_acc']:.2f}%"
                  + (f"   {e['control_train_loss']:.5f} {100 * e['control_rel_train_loss_diff']:6.2f}% "
                     f"{100 * e['control_test_acc']:.2f}%" if ctl else ""))
        print(f"  largest per-epoch training-loss difference {100 * s['max_rel_train_loss_diff']:.2f}% "
              f"(mean {100 * s['mean_rel_train_loss_diff']:.2f}%; {'within' if s['loss_within_1pct'] else 'NOT within'}"
              f" 1%), final accuracy difference {s['final_acc_diff_points']:+.2f} points "
              f"({'within' if s['acc_within_0_05'] else 'NOT within'} 0.05)")
        if ctl:
            print(f"  control (the reference, initial weights perturbed by 1e-6) against the reference: largest "
                  f"{100 * s['control_max_rel_train_loss_diff']:.2f}% (mean "
                  f"{100 * s['control_mean_rel_train_loss_diff']:.2f}%), final accuracy "
                  f"{s['control_final_acc_diff_points']:+.2f} points")
    f, r = out["summary"]["fused_acc"], out["summary"]["reference_acc"]
    print(f"final test accuracy over {f['n']} seed(s): fused {f['mean']:.2f}% ({f['min']:.2f}-{f['max']:.2f}), "
          f"reference {r['mean']:.2f}% ({r['min']:.2f}-{r['max']:.2f})")
    if args.json:
        write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
