"""The README's and docs/RESULTS.md's tables, rendered from the committed JSON so the text cannot drift from it.

    python scripts/render_tables.py bench/results/throughput-....json     # markdown on stdout
    python scripts/render_tables.py --readme README.md --readme docs/RESULTS.md          # rewrite every block
    python scripts/render_tables.py --readme README.md --readme docs/RESULTS.md --check  # exit 1 if one is stale

Accuracy blocks, ``<!-- accuracy-table: PATH[,PATH] -->`` ... ``<!-- end accuracy-table -->``, list the groups of
runs in resnet_fused.experiments.recipe_runs / recipe_parity JSON files (seeds, mean and spread of the final accuracy).

A block in the README is the lines between ``<!-- throughput-table: PATH -->`` and ``<!-- end throughput-table
-->``; PATH is a JSON written by bench/throughput.py (relative to the repository root). Each table names its JSON,
its commit and its machine; a row is one (model, mode, precision, batch) with images/s per implementation, the
best baseline (the fastest PyTorch row: eager, channels_last, CUDA graph, torch.compile modes) and each fused row's
ratio to it. The run-level figures are recomputed from the rows (resnet_fused.reporting.summarize), so older JSON files render
the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from resnet_fused.reporting import BASELINES, IMPLS, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK = re.compile(r"(<!-- throughput-table: (\S+) -->\n)(.*?)(<!-- end throughput-table -->)", re.S)
ACCURACY = re.compile(r"(<!-- accuracy-table: (\S+) -->\n)(.*?)(<!-- end accuracy-table -->)", re.S)


def _fmt(v):
    return f"{v:,.0f}"


def render(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        result = summarize(json.load(f))
    env, settings = result["environment"], result.get("settings", {})
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in ok)]
    fused = [i for i in impls if i not in BASELINES]
    cudnn = settings.get("cudnn_benchmark")
    commit = (env.get("git_commit") or "unknown")[:7]
    timing = ("rows of a group in processes of their own, round-robin"
              + (", each window on quiet CPUs" if settings.get("quiet_start") else "") if settings.get("isolate") else
              "rows of a group round-robin in one process" if settings.get("interleave") else "rows one after another")
    lines = [f"`{path}` — {env.get('device_name')}, torch {env.get('torch')}, Triton {env.get('triton')}, commit "
             f"{commit}, {env.get('date', '')[:10]}; cudnn.benchmark "
             f"{'on' if cudnn else 'off' if cudnn is False or env.get('device', '').startswith('cuda') else 'n/a'}"
             f"; {timing}; median of {settings.get('repeats', '?')} windows of {settings.get('iters', '?')} steps", ""]
    head = ["model", "mode", "prec.", "batch"] + impls + ["best baseline"] + [f"{i} ÷ best" for i in fused]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| " + " | ".join(["---"] * 4 + ["---:"] * len(impls) + ["---"] + ["---:"] * len(fused)) + " |")
    groups = {}
    for r in ok:
        groups.setdefault((r["model"], r["mode"], r["precision"], r["batch"]), {})[r["impl"]] = r
    for key in sorted(groups, key=lambda k: (k[0], k[1] != "train", k[2], k[3])):
        g = groups[key]
        best = next(iter(g.values()))["best_baseline"]
        cells = [_fmt(g[i]["images_per_s"]) if i in g else "–" for i in impls]
        ratios = [f"**{g[i]['speedup_vs_best_baseline']:.2f}×**" if i in g and g[i]["speedup_vs_best_baseline"]
                  else "–" for i in fused]
        lines.append("| " + " | ".join([key[0], key[1], key[2], str(key[3])] + cells + [best or "–"] + ratios)
                     + " |")
    best_any = result["best_baselines_any_precision"]
    if len({r["precision"] for r in ok}) > 1 and best_any:
        lines.append("")
        for b in best_any:
            fused_txt = ", ".join(f"`{k}` **{v:.2f}×**" for k, v in b["fused"].items()) or "no fused row"
            lines.append(f"Best baseline of any precision, {b['model']} {b['mode']} batch {b['batch']}: "
                         f"`{b['impl']}` {b['precision']} ({_fmt(b['images_per_s'])} img/s); the fused rows "
                         f"against it: {fused_txt}.")
    missing = sorted({r["impl"] for r in result["rows"] if r["status"] != "ok"} - set(impls))
    if missing:
        lines += ["", "Not measured in this run (skipped or failed): " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines) + "\n"


def _groups(path):
    """(label, {mean, min, max, n}) of each group in a recipe_runs or recipe_parity JSON."""
    with open(os.path.join(ROOT, path)) as f:
        d = json.load(f)
    if "groups" in d:  # recipe_runs: final test accuracy of the weights each run reports
        return [(g["label"], g["final_acc"]) for g in d["groups"]]
    names = dict(fused_acc="FusedResNet", reference_acc="reference")  # recipe_parity: the default recipe's pairs
    return [(f"{names.get(k, k)}, default recipe", v) for k, v in d["summary"].items()]


def render_accuracy(paths: str) -> str:
    """One row per group of runs in the comma-separated JSON files: seeds, mean and spread of the final MNIST
    test accuracy, and the file it comes from."""
    lines = ["| runs | seeds | MNIST test accuracy, mean (min-max) | from |", "| --- | ---: | ---: | --- |"]
    for path in paths.split(","):
        for label, acc in _groups(path):
            lines.append(f"| {label} | {acc['n']} | **{acc['mean']:.2f}%** ({acc['min']:.2f}-{acc['max']:.2f}) "
                         f"| `{path}` |")
    return "\n".join(lines) + "\n"


def rendered(text: str) -> str:
    text = BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)
    return ACCURACY.sub(lambda m: m.group(1) + render_accuracy(m.group(2)) + m.group(4), text)


def update_readme(readme: str, check: bool) -> int:
    with open(readme) as f:
        text = f.read()
    new = rendered(text)
    if check:
        if new != text:
            print(f"{readme}: a rendered table is out of date: run python scripts/render_tables.py --readme {readme}")
            return 1
        return 0
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="*", help="throughput JSON files (paths relative to the repository root)")
    p.add_argument("--readme", action="append", default=[],
                   help="rewrite the table blocks of this markdown file (repeatable: README.md, docs/RESULTS.md)")
    p.add_argument("--check", action="store_true", help="with --readme: only report whether it is up to date")
    args = p.parse_args(argv)
    for path in args.json:
        print(render(os.path.relpath(os.path.abspath(path), ROOT)))
    return max([update_readme(r, args.check) for r in args.readme], default=0)


if __name__ == "__main__":
    sys.exit(main())
