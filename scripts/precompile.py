"""Compile the Triton kernels of the headline workloads ahead of time, in parallel processes, into one cache.

    TRITON_CACHE_DIR=/tmp/tc python scripts/precompile.py --jobs 8

A fresh GPU machine spends most of a device check compiling Triton kernels, one variant after another, inside
whichever stage first launches them. Here every workload the next stages run (FusedResNet ResNet-20, batch 512,
training step and inference (per layer and the whole-network kernel), fp32 and bf16-autocast + channels_last: the throughput rows, their CUDA-graph
variants and the time-to-accuracy run use the same kernel variants) runs one step in a process of its own, all at
once, so the variants compile side by side into the shared ``TRITON_CACHE_DIR``; later processes load them from
there. What each worker compiled (its Triton launches, by kernel) and how long it took is printed and written to
``--json``. ``--dry-run``: tiny shapes on CPU (Triton interpreter), to exercise the schedule without a GPU.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def workloads(args):
    """(model, batch, size, mode, precision) of every workload whose kernels the next stages need."""
    model, batch, size = ("resnet8", 2, 8) if args.dry_run else (args.model, args.batch, args.size)
    return [(model, batch, size, mode, prec) for mode in ("train", "inference", "inference-net")
            for prec in ("fp32", "bf16")]


def run_workload(spec, dry_run):
    """One step of a workload in this (fresh) process; returns its Triton launches by kernel and the seconds."""
    import torch
    import torch.nn.functional as F
    import triton
    import triton.runtime.interpreter  # noqa: F401

    from resnet_fused import build_model
    name, batch, size, mode, prec = spec
    dev = torch.device("cpu" if dry_run else "cuda")
    launches = collections.Counter()
    kernel_class = triton.runtime.interpreter.InterpretedFunction if dry_run else triton.runtime.jit.JITFunction
    run = kernel_class.run

    def counting_run(self, *a, **k):
        launches[self.fn.__name__] += 1
        return run(self, *a, **k)
    kernel_class.run = counting_run
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(name, impl="fused", backend="triton").to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    model.train(mode == "train")
    model.whole_network_inference = mode == "inference-net"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16" and not dry_run)
    with autocast:
        if mode == "train":
            F.cross_entropy(model(x).float(), y).backward()
        else:
            with torch.no_grad():
                model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return dict(workload="/".join(map(str, spec)), seconds=time.perf_counter() - t0, launches=dict(launches))


def test_shards(paths, jobs):
    """The node ids of the tests under ``paths``, dealt round-robin into ``jobs`` shards (a test file's kernels are
    spread over the shards, so that its compiles run side by side)."""
    import subprocess
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                       capture_output=True, text=True, cwd=os.path.dirname(HERE))
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    return [ids[i::jobs] for i in range(jobs) if ids[i::jobs]]


def start_test_shards(paths, jobs):
    """The tests' own Triton specialisations, compiled by running them with RESNET_FUSED_COMPILE_ONLY=1 (see
    tests/conftest.py: each launch compiles and runs nothing) in ``jobs`` processes at once."""
    import subprocess
    env = dict(os.environ, RESNET_FUSED_COMPILE_ONLY="1")
    return [(len(ids), time.perf_counter(), subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *ids],
        cwd=os.path.dirname(HERE), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for ids in test_shards(paths, jobs)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--json", default=None)
    p.add_argument("--tests", nargs="*", default=[],
                   help="test files whose Triton specialisations to compile too (run compile-only, in --jobs shards)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    print(f"precompile: Triton cache {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}", flush=True)
    t0 = time.perf_counter()
    shards = start_test_shards(args.tests, args.jobs) if args.tests else []
    results = []
    # spawned workers: CUDA cannot be used in forked children, and each worker must compile on its own
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_workload, w, args.dry_run): w for w in workloads(args)}
        for f in cf.as_completed(futures):
            try:
                r = f.result()
            except Exception as e:  # a failing workload is reported; the others still warm the cache
                r = dict(workload="/".join(map(str, futures[f])), error=f"{type(e).__name__}: {e}"[:300])
            results.append(r)
            kernels = sum(r.get("launches", {}).values())
            print(f"precompile: {r['workload']}: " + (f"{r['seconds']:.1f}s, {kernels} Triton launches of "
                                                      f"{len(r['launches'])} kernels" if "error" not in r
                                                      else r["error"]), flush=True)
    for tests, started, proc in shards:  # their pass/fail is meaningless: only what they compiled counts
        proc.wait()
        results.append(dict(workload=f"tests shard ({tests} tests)", seconds=time.perf_counter() - started,
                            launches={}))
        print(f"precompile: a shard of {tests} tests compiled in {results[-1]['seconds']:.1f}s", flush=True)
    out = dict(seconds=time.perf_counter() - t0, workloads=results)
    print(f"precompile: {len(results)} workloads in {out['seconds']:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
