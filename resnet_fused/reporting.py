"""What a result file means, for every script that writes or reads one: the throughput rows' best baseline and
ratios (bench/throughput.py writes them, scripts/render_tables.py renders them), whole-run parity and the mean and
spread of a group of runs (the experiments), and the atomic JSON write they all use."""
from __future__ import annotations

import json
import statistics

from .checkpoint import atomic_write_text

IMPLS = ["eager", "eager-channels-last", "eager-graph", "compile", "compile-max-autotune-no-cudagraphs",
         "compile-max-autotune", "compile-reduce-overhead", "fused-triton", "fused-triton-no-cudagraphs",
         "fused-triton-graph", "fused-triton-per-element-graph", "fused-triton-net", "fused-cuda",
         "fused-cuda-no-cudagraphs", "fused-cuda-graph", "fused-cpu", "compile-freezing", "onnxruntime", "openvino"]
# (the last three: CPU inference engines, bench/engines.py)
# the fused rows: FusedResNet with this backend, used as the README shows (its own CUDA graphs on); "-no-cudagraphs":
# FusedResNet(cuda_graphs=False); "-graph": the whole step (optimizer included) captured by hand in one CUDA graph;
# "fused-triton-net": inference as one launch for the whole network (model.whole_network_inference, own graphs on);
# "fused-triton-per-element-graph": fused-triton-graph with the implicit GEMM's per-tap gathers off (the A/B of
# implicit_gemm.TAP_BLOCKS)
FUSED_BACKEND = {"fused-triton": "triton", "fused-triton-no-cudagraphs": "triton", "fused-triton-graph": "triton",
                 "fused-triton-per-element-graph": "triton", "fused-triton-net": "triton",
                 "fused-cuda": "cuda", "fused-cuda-no-cudagraphs": "cuda", "fused-cuda-graph": "cuda",
                 "fused-cpu": "cpu"}
# PyTorch as a user can run it at its best: every fused row is compared with the best of these in the same run
BASELINES = [i for i in IMPLS if i not in FUSED_BACKEND]


def summarize(result):
    """The run-level figures, recomputed from the rows (after every row and at the end):

    - roofline: the peaks are the best rates this machine was seen to reach in this run, by the start-up matmul /
      copy or by any row (a Winograd convolution does fewer multiplies than the direct-convolution FLOP count, so
      its effective rate can pass the matmul's); so fraction_of_roofline <= 1 by construction.
    - CPU runs: fraction_of_fma_peak = the row's FLOP/s, counted as direct convolutions (gflop_per_step), over
      the CPU's measured multiply-add peak in its precision on all threads (``fma_peaks``, bench/throughput.py).
      Rows that run Winograd convolutions (fused-cpu inference) do fewer multiplies than that count and can pass 1.
    - best baseline of each (model, mode, precision, batch): the fastest of BASELINES (PyTorch at its best), and
      every row's ratio to it (speedup_vs_best_baseline), beside the ratio to that group's eager row.
    """
    rows, peaks = result["rows"], result["peaks"]
    ok = [r for r in rows if r["status"] == "ok"]
    eff = dict(peaks)
    for r in ok:
        sec = r["step_ms"] / 1e3
        eff[r["precision"]] = max(eff[r["precision"]], r["gflop_per_step"] * 1e9 / sec)
        eff["bandwidth"] = max(eff["bandwidth"], r["mb_per_step"] * 1e6 / sec)
    result["roofline_peaks"] = eff
    fma = result.get("fma_peaks") or {}
    for r in ok:
        r["achieved_gflops"] = r["gflop_per_step"] / (r["step_ms"] / 1e3)
        peak = fma.get(r["precision"])
        r["fraction_of_fma_peak"] = r["achieved_gflops"] * 1e9 / peak if peak else None
    best, eager = {}, {}
    for r in ok:
        key = (r["model"], r["mode"], r["precision"], r["batch"])
        bound = max(r["gflop_per_step"] * 1e9 / eff[r["precision"]], r["mb_per_step"] * 1e6 / eff["bandwidth"])
        r["roofline_ms"] = bound * 1e3
        r["fraction_of_roofline"] = bound / (r["step_ms"] / 1e3)
        if r["impl"] in BASELINES and r["images_per_s"] > best.get(key, {}).get("images_per_s", 0):
            best[key] = r
        if r["impl"] == "eager":
            eager[key] = r
    for r in ok:
        key = (r["model"], r["mode"], r["precision"], r["batch"])
        b, e = best.get(key), eager.get(key)
        r["best_baseline"] = b["impl"] if b else None
        r["speedup_vs_best_baseline"] = r["images_per_s"] / b["images_per_s"] if b else None
        r["speedup_vs_eager"] = r["images_per_s"] / e["images_per_s"] if e else None
    result["best_baselines"] = [dict(model=k[0], mode=k[1], precision=k[2], batch=k[3], impl=b["impl"],
                                     images_per_s=b["images_per_s"],
                                     fused={r["impl"]: r["speedup_vs_best_baseline"] for r in ok
                                            if r["impl"] in FUSED_BACKEND
                                            and (r["model"], r["mode"], r["precision"], r["batch"]) == k})
                                for k, b in sorted(best.items())]
    # and over both precisions: a user at their best also picks the precision
    overall = {}
    for k, b in best.items():
        k2 = (k[0], k[1], k[3])
        if b["images_per_s"] > overall.get(k2, {}).get("images_per_s", 0):
            overall[k2] = b
    result["best_baselines_any_precision"] = [
        dict(model=k[0], mode=k[1], batch=k[2], impl=b["impl"], precision=b["precision"],
             images_per_s=b["images_per_s"],
             fused={f"{r['impl']}@{r['precision']}": r["images_per_s"] / b["images_per_s"] for r in ok
                    if r["impl"] in FUSED_BACKEND and (r["model"], r["mode"], r["batch"]) == k})
        for k, b in sorted(overall.items())]
    return result


def parity(results, a="fused", b="reference"):
    """Per seed that both ran: the largest relative difference of the per-epoch training loss and the final test
    accuracy difference (a - b, points), the issue's whole-run parity measures."""
    rows = []
    for ra in (r for r in results if r["impl"] == a):
        rb = next((r for r in results if r["impl"] == b and r["seed"] == ra["seed"]), None)
        if rb is None:
            continue
        rel = [abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"])
               for x, y in zip(ra["history"], rb["history"])]
        rows.append(dict(seed=ra["seed"], max_rel_train_loss_diff=max(rel),
                         final_acc_diff_points=100 * (ra["final_test_acc"] - rb["final_test_acc"])))
    return rows


def mean_spread(values):
    """{mean, min, max, n} of a list of numbers."""
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values), n=len(values))


def write_json(result, path):
    """``result`` as indented JSON at ``path``, atomically (a temp file renamed over it, fsynced)."""
    atomic_write_text(json.dumps(result, indent=1), path)
