"""The extension's BatchNorm operators alone: per operator, activation shape and dtype, the median time per call,
the compulsory bytes (each operand read once, each result written once), the achieved GB/s, and the time of a
device-to-device copy moving the same bytes (read + write) in the same run.

    python bench/ext_ops.py --device cuda --json ext_ops.json      # ResNet-20's BatchNorm shapes at batch 512
    python bench/ext_ops.py --device cpu --dry-run                 # tiny shapes, to exercise the tool

On a GPU each timed window is N calls captured in one CUDA graph and replayed, so the figure is the operators'
device time, not the host's launch cost (the operators are capturable: no host syncs); where capture fails the
window is N plain calls and the row says so. ``vs_copy`` = operator time / copy time (1.0: as fast as moving its
bytes can be; the issue's target is <= 2). Compulsory bytes leave out re-reads: batch_norm_add_relu_backward reads
its three inputs twice (two passes) and is still charged once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


import torch  # noqa: E402
from common import write_json  # noqa: E402

IDENTITY = 1


def operators(shape, dtype, dev):
    """(name, fn, compulsory bytes) for one activation shape (N, C, H, W), channels_last."""
    ops = torch.ops.resnet_fused
    gen = torch.Generator(device="cpu").manual_seed(0)

    def act():
        return torch.randn(shape, generator=gen).to(dev, dtype).contiguous(memory_format=torch.channels_last)

    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vec = lambda: torch.randn(c, generator=gen).to(dev, acc)  # noqa: E731
    x, r, go = act(), act(), act()
    mean, var = ops.bn_stats(x)
    invstd = (var + 1e-5).rsqrt()
    w, b = vec(), vec()
    out = ops.batch_norm_add_relu(x, mean, invstd, w, b, r, None, None, None, None, IDENTITY, 1, 0, True)
    a = x.numel() * x.element_size()  # one activation's bytes
    return [
        ("bn_stats", lambda: ops.bn_stats(x), a),
        ("bn_stats_backward", lambda: ops.bn_stats_backward(mean, var, x, mean), 2 * a),
        ("scale_shift_add_relu", lambda: ops.scale_shift_add_relu(x, w, b, r, None, None, IDENTITY, 1, 0, True), 3 * a),
        ("scale_shift_add_relu_backward",
         lambda: ops.scale_shift_add_relu_backward(go, out, x, w, r, None, IDENTITY, 1, 0, True), 5 * a),
        ("batch_norm_add_relu",
         lambda: ops.batch_norm_add_relu(x, mean, invstd, w, b, r, None, None, None, None, IDENTITY, 1, 0, True), 3 * a),
        ("batch_norm_add_relu_backward",
         lambda: ops.batch_norm_add_relu_backward(go, out, x, mean, invstd, w, r, None, None, None, IDENTITY, 1, 0,
                                                  True), 5 * a),
    ]


def timer(fn, dev, calls):
    """A function returning seconds per call of one window of `calls` calls, and whether it replays a graph."""
    if dev.type == "cuda":
        try:
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            run, graphed = graph.replay, True
        except Exception as e:  # not capturable: plain calls (host-bound for small tensors)
            print(f"# capture failed ({type(e).__name__}: {e}); timing plain calls", flush=True)
            run, graphed = (lambda: [fn() for _ in range(calls)]), False

        def window():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        return window, graphed

    def window():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    return window, False


def median_time(fn, dev, calls, repeats):
    window, graphed = timer(fn, dev, calls)
    window()  # warm-up
    return statistics.median(window() for _ in range(repeats)), graphed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--calls", type=int, default=20, help="calls per timed window (one CUDA graph on a GPU)")
    p.add_argument("--repeats", type=int, default=7, help="timed windows; the median is reported")
    p.add_argument("--dry-run", action="store_true", help="batch 2, one dtype, 2 calls x 2 windows")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import resnet_fused.ext as ext
    ext.require(args.device)
    dev = torch.device(args.device)
    if args.dry_run:
        args.batch, args.dtypes, args.calls, args.repeats = 2, "fp32", 2, 2
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    shapes = [(args.batch, 16, 28, 28), (args.batch, 32, 14, 14), (args.batch, 64, 7, 7)]
    rows = []
    print(f"{'operator':30s} {'dtype':5s} {'shape':>18s} {'us':>9s} {'MB':>8s} {'GB/s':>8s} {'copy us':>8s} "
          f"{'vs copy':>7s}", flush=True)
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        for shape in shapes:
            for name, fn, nbytes in operators(shape, dtype, dev):
                src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=dev)
                dst = torch.empty_like(src)
                copy_s, _ = median_time(lambda: dst.copy_(src), dev, args.calls, args.repeats)
                sec, graphed = median_time(fn, dev, args.calls, args.repeats)
                row = dict(operator=name, dtype=dname, shape=list(shape), us=sec * 1e6, mbytes=nbytes / 1e6,
                           gb_per_s=nbytes / sec / 1e9, copy_us=copy_s * 1e6, vs_copy=sec / copy_s, graphed=graphed)
                rows.append(row)
                print(f"{name:30s} {dname:5s} {'x'.join(map(str, shape)):>18s} {row['us']:9.1f} {row['mbytes']:8.2f} "
                      f"{row['gb_per_s']:8.1f} {row['copy_us']:8.1f} {row['vs_copy']:7.2f}", flush=True)
    result = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                  git_commit=os.environ.get("RESNET_FUSED_GIT_COMMIT"), calls=args.calls, repeats=args.repeats,
                  rows=rows)
    if args.json:
        write_json(result, args.json)
        print(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
