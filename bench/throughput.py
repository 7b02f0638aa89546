"""Throughput of ResNets on MNIST-shaped inputs: reference eager vs torch.compile vs FusedResNet, side by side.

    python bench/throughput.py                   # the headline comparison on a GPU; a ~2 minute subset on a CPU
    python bench/throughput.py --models resnet20,resnet56 --batch-sizes 512 --modes train --impls eager,fused-triton

Each row is one (model, mode, precision, implementation, batch size): images/s from the median step time (and the
20th/80th percentiles), speed-up over the eager row and over the best baseline (the fastest PyTorch row: eager,
channels_last, CUDA graph, every torch.compile mode) of the same model/mode/precision/batch, peak memory, kernel
launches per step (profiler) and the fraction of a roofline bound reached. On CUDA every row runs with
torch.backends.cudnn.benchmark = True.

Timing: warm-up steps first (compile / autotune / graph capture time is reported separately as setup_s), then
``--repeats`` timed windows of ``--iters`` steps each, CUDA events on a GPU (perf_counter on a CPU); inputs rotate
over 4 distinct random buffers, never zeros. On a CPU the rows compared with each other (same model, mode,
precision and batch) are timed round-robin, one window each per repeat (``--interleave``), so that drifting load
on a shared machine does not favour whichever row ran in a quiet moment, and each row in a process of its own
(``--isolate``), so that no row runs beside another or inherits its allocator and thread-pool state. A train step is forward + cross-entropy +
backward + SGD(momentum) step.

Roofline model (documented, deliberately simple): FLOPs = 2*MACs of every conv and the head (forward), x3 for a train
step (forward, input gradient, weight gradient). Bytes = every conv reading its input and writing its output once
in the compute dtype (+ weights), x3 for a train step. Bound = max(FLOPs / peak matmul rate, bytes / peak bandwidth)
with the peaks the best rates seen in the run: a large matmul in the row's dtype and a large device copy at
start-up (best window), raised to any row's effective rate above them (Winograd convolutions do fewer multiplies
than the direct FLOP count). fraction_of_roofline = bound / measured step time, at most 1 by construction.
On a CPU the table's last column is instead FMA%: the row's FLOP/s (the same direct-convolution count) over the CPU's
multiply-add peak measured at start-up (csrc/fma_peak.cpp: independent FMA chains on every thread; fp32, and bf16
with AVX512_BF16), so it says how much of the machine a row uses; Winograd rows (marked *) can pass 100%. The JSON
keeps both (fraction_of_roofline, fraction_of_fma_peak, achieved_gflops; the peaks under fma_peaks).

Outputs: a table on stdout, ``--json`` (default bench/results/throughput-<date>-<device>.json) with the device,
torch/triton/CUDA versions and git commit, and ``--png`` a bar chart.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from resnet_fused import build_model
from resnet_fused.reporting import BASELINES, FUSED_BACKEND, IMPLS, summarize  # noqa: F401 - re-exported

from common import environment, quantile, sync, time_windows, write_json  # noqa: F401 - re-exported
import engines

HERE = os.path.dirname(os.path.abspath(__file__))

COMPILE_MODES = {"compile": "default", "compile-max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
                 "compile-max-autotune": "max-autotune", "compile-reduce-overhead": "reduce-overhead"}
# compile modes that replay CUDA graphs: a new step must be marked so the previous outputs may be overwritten
CUDAGRAPH_COMPILE = ("compile-max-autotune", "compile-reduce-overhead")


# ---- measurement helpers ----------------------------------------------------------------------------------

def measure_peaks(dev):
    """Peak matmul FLOP/s per dtype and copy bandwidth (bytes read + written per second), measured here."""
    peaks = {}
    n = 8192 if dev.type == "cuda" else 1024
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dev.type == "cpu" and dt == torch.bfloat16:
            peaks[name] = peaks["fp32"]
            continue
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        fn = lambda: a @ b  # noqa: E731
        fn(), sync(dev)
        t = min(time_windows(fn, dev, 3 if dev.type == "cuda" else 2, 3))  # a peak: the best window
        peaks[name] = 2 * n ** 3 / t
    nbytes = (1 << 30) if dev.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn(), sync(dev)
    peaks["bandwidth"] = 2 * nbytes / min(time_windows(fn, dev, 5, 3))
    return peaks


def measure_fma_peaks(threads):
    """This CPU's multiply-add peak in FLOP/s, measured by the extension's fma_peak (csrc/fma_peak.cpp): fp32 and
    bf16 (vdpbf16ps; None without AVX512_BF16), on one thread and on ``threads``; the best of 3 tries each. None
    without the extension."""
    from resnet_fused import ext
    if not ext.available() or not hasattr(torch.ops.resnet_fused, "fma_peak"):
        return None
    isa = torch.ops.resnet_fused.cpu_isa()
    if isa == "none":
        return None
    out = {"isa": isa}
    for prec in ("fp32", "bf16"):
        for name, n in ((f"{prec}_1t", 1), (prec, threads)):
            ok = prec == "fp32" or isa == "avx512_bf16"
            out[name] = max(torch.ops.resnet_fused.fma_peak(20_000_000, n, prec == "bf16") for _ in range(3)) if ok \
                else None
    return out


def work_model(model, shape, train, esize):
    """(FLOPs, bytes) of one step by the documented model above, counted with forward hooks."""
    flops, nbytes = [0], [0]

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            flops[0] += 2 * out.numel() * k
            nbytes[0] += (x.numel() + out.numel() + mod.weight.numel()) * esize
        elif isinstance(mod, torch.nn.Linear):
            flops[0] += 2 * x.shape[0] * mod.in_features * mod.out_features
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                       torch.nn.Linear))]
    with torch.no_grad():
        model.to("meta")(torch.empty(shape, device="meta"))
    for h in hooks:
        h.remove()
    mult = 3 if train else 1
    return flops[0] * mult, nbytes[0] * mult


def count_launches(fn, dev, steps=3):
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync(dev)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return round(len(kernels) / steps, 1)


# ---- one configuration ------------------------------------------------------------------------------------

def skip_reason(impl, dev, mode=None, prec="fp32", name=""):
    backend = FUSED_BACKEND.get(impl)
    if impl in engines.ENGINES:
        return engines.skip_reason(impl, dev, mode, prec)
    if impl == "fused-triton-net" and mode == "train":
        return "the whole-network kernel is inference only"
    if impl == "fused-triton-net" and name.startswith("tv-"):
        return "the whole-network kernel runs FusedResNet's own networks, not torchvision's"
    if backend == "triton" and dev.type != "cuda":
        return "needs a CUDA GPU (Triton)"
    if impl.endswith("-graph") and dev.type != "cuda":
        return "CUDA graphs need a GPU"
    if backend == "cuda":
        if dev.type != "cuda":
            return "needs a CUDA GPU"
        try:
            import resnet_fused._C  # noqa: F401
        except ImportError:
            return "extension resnet_fused._C not built"
    if backend == "cpu" and dev.type != "cpu":
        return "CPU backend row is run on the CPU benchmark"
    if impl in CUDAGRAPH_COMPILE and dev.type != "cuda":
        return f"{COMPILE_MODES[impl]} is CUDA graphs on a GPU"
    return None


def model_input(name, args):
    """(channels, side) of a model's input: --channels/--size, except torchvision's (tv-NAME): 3 channels and
    --tv-size."""
    return (3, args.tv_size) if name.startswith("tv-") else (args.channels, args.size)


TAP_BLOCKS_DEFAULT = os.environ.get("RESNET_FUSED_TAP_BLOCKS", "1") != "0"


def make_model(name, impl, in_ch, dev, cl):
    torch.manual_seed(0)
    if FUSED_BACKEND.get(impl) == "triton":
        from resnet_fused.ops import implicit_gemm
        implicit_gemm.TAP_BLOCKS = TAP_BLOCKS_DEFAULT and "-per-element" not in impl
    if impl in FUSED_BACKEND:
        own_graphs = not impl.endswith(("-no-cudagraphs", "-graph"))  # a hand-made graph captures the plain path
        model = build_model(name, impl="fused", in_channels=in_ch, backend=FUSED_BACKEND[impl],
                            cuda_graphs=own_graphs)
        model.whole_network_inference = impl == "fused-triton-net"
    else:
        model = build_model(name, in_channels=in_ch)
    model = model.to(dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_step(model, impl, mode, prec, dev, xs, ys):
    """A zero-argument callable running one step on rotating inputs, and the setup seconds it took."""
    amp = prec == "bf16"
    state = {"i": 0}
    t0 = time.perf_counter()
    run = model
    if impl in engines.ENGINES:
        run = engines.make(impl, model, xs[0], prec)
    elif impl.startswith("compile"):
        run = torch.compile(model, mode=COMPILE_MODES[impl])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if mode == "train" else None
    model.train(mode == "train")

    def step_on(x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if mode == "train":
                loss = F.cross_entropy(run(x).float(), y)
            else:
                with torch.no_grad():
                    return run(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        if impl in CUDAGRAPH_COMPILE:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay may be overwritten
        return step_on(xs[i], ys[i])

    if impl.endswith("-graph"):
        static_x, static_y = xs[0].clone(), ys[0].clone()
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(3):
                step_on(static_x, static_y)
        torch.cuda.current_stream(dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_on(static_x, static_y)

        def step():  # noqa: F811
            i = state["i"] = (state["i"] + 1) % len(xs)
            static_x.copy_(xs[i])
            static_y.copy_(ys[i])
            graph.replay()
    warm = 5 if dev.type == "cuda" else 2
    for _ in range(warm):
        step()
    sync(dev)
    return step, time.perf_counter() - t0


def prepare_one(name, mode, prec, impl, bs, dev, args):
    """(row, prepared): the row's identity and, when it can run, its step callable and setup time."""
    row = dict(model=name, mode=mode, precision=prec, impl=impl, batch=bs)
    reason = skip_reason(impl, dev, mode, prec, name)
    if reason:
        return dict(row, status="skipped", reason=reason), None
    cl = prec == "bf16" or impl in FUSED_BACKEND or impl == "eager-channels-last"
    in_ch, hw = model_input(name, args)
    try:
        model = make_model(name, impl, in_ch, dev, cl)
        g = torch.Generator(device="cpu").manual_seed(bs)
        xs = [torch.randn(bs, in_ch, hw, hw, generator=g).to(dev) for _ in range(4)]
        if cl:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        ys = [torch.randint(0, 10, (bs,), generator=g).to(dev) for _ in range(4)]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        step, setup_s = build_step(model, impl, mode, prec, dev, xs, ys)
    except Exception as e:  # a failing configuration is reported, not fatal
        return error_row(row, e), None
    return row, dict(step=step, setup_s=setup_s)


def error_row(row, e):
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return dict(row, status="error", reason=msg)


def finish_one(row, prep, times, dev, args):
    """The measured row from the timed windows (seconds per step) of a prepared configuration."""
    try:
        peak_mem = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        launches = count_launches(prep["step"], dev) if args.launches else None
    except Exception as e:
        return error_row(row, e)
    med = statistics.median(times)
    prec, bs = row["precision"], row["batch"]
    in_ch, hw = model_input(row["model"], args)
    esize = 2 if prec == "bf16" else 4
    flops, nbytes = work_model(build_model(row["model"], in_channels=in_ch), (bs, in_ch, hw, hw),
                               row["mode"] == "train", esize)
    return dict(row, status="ok", step_ms=med * 1e3, step_ms_p20=quantile(times, 0.2) * 1e3,
                step_ms_p80=quantile(times, 0.8) * 1e3, images_per_s=bs / med, setup_s=prep["setup_s"],
                peak_mem_mb=peak_mem / 2 ** 20 if peak_mem is not None else None, launches_per_step=launches,
                gflop_per_step=flops / 1e9, mb_per_step=nbytes / 1e6)


def bench_one(name, mode, prec, impl, bs, dev, args):
    """One configuration: prepare, time ``repeats`` windows back to back, finish."""
    row, prep = prepare_one(name, mode, prec, impl, bs, dev, args)
    if prep is None:
        return row
    try:
        times = time_windows(prep["step"], dev, args.iters, args.repeats)
    except Exception as e:
        return error_row(row, e)
    return finish_one(row, prep, times, dev, args)


def bench_interleaved(group, dev, args):
    """The configurations of one (model, mode, precision, batch) prepared together and timed round-robin, one
    window each per repeat: on a machine whose speed drifts (shared CPUs) every implementation sees the same
    conditions, so the ratios between rows stay honest."""
    preps = [prepare_one(*cfg, dev, args) for cfg in group]
    times = [[] for _ in preps]
    failed = {}
    for _ in range(args.repeats):
        for i, (row, prep) in enumerate(preps):
            if prep is None or i in failed:
                continue
            try:
                times[i] += time_windows(prep["step"], dev, args.iters, 1)
            except Exception as e:
                failed[i] = error_row(row, e)
    return [row if prep is None else failed.get(i) or finish_one(row, prep, times[i], dev, args)
            for i, (row, prep) in enumerate(preps)]


def _isolated_worker(conn, cfg, args):
    """One configuration in a process of its own: prepare it, then time one window per request from the parent."""
    dev = torch.device(args.device)
    row, prep = prepare_one(*cfg, dev, args)
    conn.send(row if prep is None else None)
    if prep is None:
        return
    times = []
    while True:
        msg = conn.recv()
        if msg == "time":
            try:
                times += time_windows(prep["step"], dev, args.iters, 1)
                conn.send(None)
            except Exception as e:
                conn.send(error_row(row, e))
                return
        else:  # "finish"
            conn.send(finish_one(row, prep, times, dev, args))
            return


def cpu_times():
    """(idle + iowait, all) CPU time of the machine since boot, in clock ticks (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:9]]
    return v[3] + v[4], sum(v)


def wait_until_quiet(max_s=3.0, busy=0.1, interval=0.05):
    """Wait (at most ``max_s``) until this machine's CPUs were at most ``busy`` in use over one ``interval``; the
    seconds waited. A row's process can keep its threads spinning after its window (ONNX Runtime's intra-op pool
    spins on for about a second after a run by default: timed beside it, fused-cpu's batch-1 step measured 0.90-0.95
    ms against 0.43-0.51 ms with that pool's spinning off, 2-core machine, 2026-12-03), which would be timed as the
    next row's. Linux (/proc/stat); elsewhere no wait."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    t0 = time.perf_counter()
    a = cpu_times()
    while time.perf_counter() - t0 < max_s:
        time.sleep(interval)
        b = cpu_times()
        total = b[1] - a[1]
        if total > 0 and 1 - (b[0] - a[0]) / total <= busy:
            break
        a = b
    return time.perf_counter() - t0


def bench_isolated(group, dev, args):
    """Like bench_interleaved, but each configuration lives in a process of its own (spawned, prepared one after
    the other) and the parent asks them in turn for one timed window per repeat, so only one runs at a time and none
    shares an allocator, thread pool or cache state with another; the order rotates every repeat. Each window
    starts once the CPUs are quiet (wait_until_quiet)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    wargs = argparse.Namespace(**dict(vars(args), device=str(dev)))
    workers, rows = [], [None] * len(group)
    for i, cfg in enumerate(group):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_isolated_worker, args=(child, cfg, wargs), daemon=True)
        proc.start()
        rows[i] = parent.recv()  # a skipped/failed row, or None once prepared
        workers.append((parent, proc))
    live = [i for i, r in enumerate(rows) if r is None]
    for rep in range(args.repeats):
        k = rep % max(1, len(live))
        for i in live[k:] + live[:k]:
            if rows[i] is None:
                wait_until_quiet()  # the previous window's process may still be spinning its threads
                workers[i][0].send("time")
                rows[i] = workers[i][0].recv()  # None, or an error row that ends this configuration
    for i in live:
        if rows[i] is None:
            workers[i][0].send("finish")
            rows[i] = workers[i][0].recv()
    for parent, proc in workers:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return rows


# ---- the run ------------------------------------------------------------------------------------------------

def defaults(dev):
    if dev.type == "cuda":
        return dict(models="resnet20,resnet56,resnet18", batch_sizes="128,512,2048", modes="train,inference",
                    precisions="fp32,bf16",
                    impls="eager,compile,compile-max-autotune,compile-reduce-overhead,fused-triton,"
                          "fused-triton-no-cudagraphs,fused-triton-graph,fused-cuda,fused-cuda-graph", iters=20,
                    repeats=7)
    return dict(models="resnet20", batch_sizes="64,256", modes="train,inference", precisions="fp32",
                impls="eager,eager-channels-last,fused-cpu,fused-triton,compile,compile-freezing,onnxruntime,openvino",
                iters=2, repeats=3)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated (resnet20,resnet56,resnet18 on a GPU; resnet20 on a CPU)")
    p.add_argument("--modes", help="train,inference")
    p.add_argument("--precisions", help="fp32 (NCHW for the reference) and/or bf16 (channels_last + autocast)")
    p.add_argument("--impls", help=f"comma-separated from {','.join(IMPLS)}; impl@fp32 / impl@bf16 limits one "
                                   f"to a precision")
    p.add_argument("--batch-sizes", help="128,512,2048 on a GPU; 64,256 on a CPU")
    p.add_argument("--size", type=int, default=28, help="image side (28 = MNIST; 32 with --channels 3)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--tv-size", type=int, default=224, help="image side of the torchvision models (tv-resnet18 ...)")
    p.add_argument("--iters", type=int, help="steps per timed window")
    p.add_argument("--repeats", type=int, help="timed windows (median and 20/80th percentiles over them)")
    p.add_argument("--device", default=None)
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the rows of one model/mode/precision/batch round-robin (default on a CPU, whose "
                        "speed drifts with other load; off on a GPU, where each row runs alone)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="with --interleave, each row in a process of its own, the processes asked in turn for one "
                        "window each (default on a CPU: rows in one process disturbed each other's timings)")
    p.add_argument("--no-launches", dest="launches", action="store_false", help="skip the profiler launch count")
    p.add_argument("--json", default=None, help="output JSON path")
    p.add_argument("--png", default=None, help="output bar chart path ('' to skip)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="measure nothing: draw the bar chart of a saved JSON (to --png, default beside it)")
    return p


def winograd_row(r):
    """Rows whose convolutions run as Winograd (FusedResNet's CPU inference)."""
    return r["impl"] == "fused-cpu" and r["mode"] == "inference"


def print_table(result):
    order = {k: i for i, k in enumerate(IMPLS)}
    rows = sorted(result["rows"], key=lambda r: (r["model"], r["mode"], r["precision"], r["batch"], order[r["impl"]]))
    cudnn = result["settings"].get("cudnn_benchmark")
    if cudnn is not None:
        print(f"# torch.backends.cudnn.benchmark = {cudnn} for every row")
    fma = bool(result.get("fma_peaks"))  # CPU: the share of the measured multiply-add peak, not the roofline
    hdr = (f"{'model':9s} {'mode':9s} {'prec':4s} {'impl':34s} {'batch':>5s} {'images/s':>10s} {'p20-p80 ms':>15s} "
           f"{'vs eager':>8s} {'vs best':>7s} {'setup s':>7s} {'mem MB':>7s} {'launch':>6s} "
           f"{'FMA%' if fma else 'roofl':>5s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        head = f"{r['model']:9s} {r['mode']:9s} {r['precision']:4s} {r['impl']:34s} {r['batch']:5d}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}: {r['reason']}")
            continue
        ratio = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        la = f"{r['launches_per_step']:.0f}" if r["launches_per_step"] is not None else "-"
        share = r["fraction_of_fma_peak"] if fma else r["fraction_of_roofline"]
        share = "-" if share is None else f"{100 * share:4.0f}%" + ("*" if fma and winograd_row(r) else "")
        print(f"{head} {r['images_per_s']:10,.0f} {r['step_ms_p20']:7.3f}-{r['step_ms_p80']:<7.3f} "
              f"{ratio(r['speedup_vs_eager']):>8s} {ratio(r['speedup_vs_best_baseline']):>7s} {r['setup_s']:7.1f} "
              f"{mem:>7s} {la:>6s} {share:>5s}")
    if fma:
        print("# FMA%: FLOP/s counted as direct convolutions over the CPU's measured multiply-add peak (all threads); "
              "* = Winograd convolutions (fewer multiplies than counted: can pass 100%)")
    for b in result["best_baselines"]:
        fused = ", ".join(f"{k} {v:.2f}x" for k, v in b["fused"].items()) or "no fused row"
        print(f"# best baseline {b['model']} {b['mode']} {b['precision']} b{b['batch']}: {b['impl']} "
              f"{b['images_per_s']:,.0f} img/s; vs it: {fused}")
    for b in result["best_baselines_any_precision"]:
        fused = ", ".join(f"{k} {v:.2f}x" for k, v in b["fused"].items()) or "no fused row"
        print(f"# best baseline of any precision {b['model']} {b['mode']} b{b['batch']}: {b['impl']}@"
              f"{b['precision']} {b['images_per_s']:,.0f} img/s; vs it: {fused}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(10, max(3, 1.0 + 0.28 * len(ok))))
    labels = [f"{r['model']} {r['mode']} b{r['batch']} {r['precision']} {r['impl']}" for r in ok]
    vals = [r["images_per_s"] for r in ok]
    colors = ["tab:red" if r["impl"] in FUSED_BACKEND else "tab:blue" if r["impl"].startswith("compile")
              else "tab:gray" for r in ok]
    ax.barh(range(len(ok)), vals, color=colors)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images / s (median)")
    ax.set_xscale("log")
    ax.set_title(f"throughput on {rows[0].get('device_name', '')}: gray eager, blue torch.compile, red fused")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close("all")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            saved = json.load(f)
        for r in saved["rows"]:
            r["device_name"] = saved["environment"]["device_name"]
        png_path = args.png or os.path.splitext(args.plot_only)[0] + ".png"
        plot(saved["rows"], png_path)
        print(f"# wrote {png_path}")
        return saved
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = defaults(dev)
    for k in ("models", "modes", "precisions", "impls", "batch_sizes", "iters", "repeats"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    lists = {k: [s.strip() for s in str(getattr(args, k)).split(",") if s.strip()]
             for k in ("models", "modes", "precisions", "impls", "batch_sizes")}
    bad = [i for i in lists["impls"] if i.split("@")[0] not in IMPLS]
    if bad:
        raise SystemExit(f"error: unknown impl(s) {bad}; choose from {', '.join(IMPLS)}")
    env = environment(dev)
    stamp = datetime.date.today().isoformat()
    tag = "".join(c if c.isalnum() else "-" for c in env["device_name"].lower()).strip("-")[:40] or dev.type
    json_path = args.json or os.path.join(HERE, "results", f"throughput-{stamp}-{tag}.json")
    png_path = args.png if args.png is not None else os.path.splitext(json_path)[0] + ".png"
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
          f"commit {(env['git_commit'] or '?')[:10]}", flush=True)
    if dev.type == "cuda":  # the baselines at their best: cuDNN picks its fastest algorithms (every row alike)
        torch.backends.cudnn.benchmark = True
    peaks = measure_peaks(dev)
    print(f"# measured peaks: fp32 matmul {peaks['fp32'] / 1e12:.1f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.1f} "
          f"TFLOP/s, copy {peaks['bandwidth'] / 1e9:.0f} GB/s", flush=True)
    fma = measure_fma_peaks(torch.get_num_threads()) if dev.type == "cpu" else None
    if fma:
        gf = lambda v: "-" if v is None else f"{v / 1e9:.0f}"  # noqa: E731
        print(f"# CPU multiply-add peak ({fma['isa']}), GFLOP/s: fp32 {gf(fma['fp32_1t'])} (1 thread) / "
              f"{gf(fma['fp32'])} ({torch.get_num_threads()} threads), bf16 {gf(fma['bf16_1t'])} / {gf(fma['bf16'])}",
              flush=True)
    # impls outermost: the cheap rows (eager, fused) of every model/mode come before the compile-heavy ones;
    # "impl@prec" limits an impl to one precision (e.g. compile@bf16)
    configs = [(m, mo, p, i.split("@")[0], int(b)) for i in lists["impls"] for m in lists["models"]
               for mo in lists["modes"] for p in lists["precisions"] for b in lists["batch_sizes"]
               if "@" not in i or i.split("@")[1] == p]
    from tqdm import tqdm
    rows = []
    interleave = args.interleave if args.interleave is not None else dev.type == "cpu"
    isolate = interleave and (args.isolate if args.isolate is not None else dev.type == "cpu")
    result = dict(environment=env, peaks=peaks, fma_peaks=fma, settings=dict(size=args.size, channels=args.channels, tv_size=args.tv_size,
                                                              iters=args.iters, repeats=args.repeats,
                                                              interleave=interleave, isolate=isolate,
                                                              quiet_start=isolate and os.path.exists("/proc/stat"),
                                                              cudnn_benchmark=torch.backends.cudnn.benchmark
                                                              if dev.type == "cuda" else None),
                  rows=rows, complete=False)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    if interleave:  # groups of rows that are compared with each other, timed round-robin
        groups = {}
        for cfg in configs:
            groups.setdefault((cfg[0], cfg[1], cfg[2], cfg[4]), []).append(cfg)
        for group in tqdm(list(groups.values()), disable=args.no_progress, desc="benchmark", file=sys.stderr):
            rows.extend((bench_isolated if isolate else bench_interleaved)(group, dev, args))
            write_json(summarize(result), json_path)
    else:
        for cfg in tqdm(configs, disable=args.no_progress, desc="benchmark", file=sys.stderr):
            rows.append(bench_one(*cfg, dev, args))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            write_json(summarize(result), json_path)  # after every row: a run cut short keeps its numbers
    summarize(result)
    print_table(result)
    result["complete"] = True
    write_json(result, json_path)
    print(f"# wrote {json_path}")
    if png_path:
        for r in rows:
            r["device_name"] = env["device_name"]
        plot(rows, png_path)
        print(f"# wrote {png_path}")
    return result


if __name__ == "__main__":
    main()
