"""Where the time of one un-graphed FusedResNet training step goes: top operators by host (CPU) time, and per
Triton kernel its device time, FLOP/s and bytes/s against the machine's measured peaks.

    python bench/host_profile.py --json host_profile.json

The ordinary training loop (no CUDA graph) is bound by the host on a GPU: this profiles one step after warm-up
with torch.profiler (CPU activity only) and lists the operators with the most self host time, with their call
counts, beside the step's wall time and the reference eager step's.

Per kernel (``kernels``): every Triton launch of one step is logged with its work — FLOPs of the GEMM kernels
(2 x rows x columns x reduction: conv_kernel 2*M*N*KTOT plus option B's projection, conv_wgrad_kernel
2*P*COUT*KTOT), and the bytes of the distinct tensors it is handed (each read or written once: the compulsory
traffic, an estimate that leaves out re-reads through L2) — and, on a GPU, a second profiled step (CUDA activity)
gives each kernel's device time; achieved TFLOP/s and GB/s are set against the matmul and copy peaks measured at
the start (bench/throughput.py's measure_peaks). ``--dry-run``: tiny shapes on CPU (Triton interpreter), to
exercise the tool without a GPU (no device times there).
"""
from __future__ import annotations

import argparse
import os
import time
from common import write_json  # noqa: E402



def _flops(name, a):
    """FLOPs of one launch of a GEMM kernel from its bound arguments, None for the others."""
    if name == "conv_kernel":
        return 2 * a["M"] * a["N"] * (a["KTOT"] + (a["C2"] if a.get("DUAL") else 0))
    if name == "conv_wgrad_kernel":
        return 2 * a["P"] * a["COUT"] * a["KTOT"]
    return None


class LaunchLog:
    """Within the block, every Triton launch as (kernel name, FLOPs or None, bytes of its distinct tensors)."""

    def __init__(self, interpreted):
        import inspect

        import triton
        import triton.runtime.interpreter  # noqa: F401
        self.cls = triton.runtime.interpreter.InterpretedFunction if interpreted else triton.runtime.jit.JITFunction
        self.inspect, self.launches = inspect, []

    def __enter__(self):
        import torch
        self.run = run = self.cls.run
        log = self

        def logged(kernel, *args, **kwargs):
            names = list(log.inspect.signature(kernel.fn).parameters)
            bound = dict(zip(names, args))
            bound.update((k, v) for k, v in kwargs.items() if k in names)
            tensors = {t.data_ptr(): t.numel() * t.element_size()  # a tensor passed twice (a placeholder) once
                       for t in bound.values() if isinstance(t, torch.Tensor)}
            log.launches.append((kernel.fn.__name__, _flops(kernel.fn.__name__, bound), sum(tensors.values())))
            return run(kernel, *args, **kwargs)
        self.cls.run = logged
        return self

    def __exit__(self, *exc):
        self.cls.run = self.run


def kernel_table(launches, device_us=None, peaks=None):
    """Per kernel name: launches, FLOPs and bytes per step, and with device times (us per step, from the
    profiler) the achieved TFLOP/s and GB/s, and with peaks their fractions."""
    rows = {}
    for name, flops, nbytes in launches:
        r = rows.setdefault(name, dict(kernel=name, launches=0, gflop=None, mbytes=0.0))
        r["launches"] += 1
        r["mbytes"] += nbytes / 1e6
        if flops is not None:
            r["gflop"] = (r["gflop"] or 0.0) + flops / 1e9
    for r in rows.values():
        us = (device_us or {}).get(r["kernel"])
        r["device_us"] = us
        if us:
            r["tflops"] = r["gflop"] / us * 1e3 if r["gflop"] is not None else None
            r["gbps"] = r["mbytes"] / us * 1e3
            if peaks:
                r["frac_peak_flops"] = r["tflops"] * 1e12 / peaks["flops"] if r["tflops"] is not None else None
                r["frac_peak_bw"] = r["gbps"] * 1e9 / peaks["bandwidth"]
    return sorted(rows.values(), key=lambda r: -(r["device_us"] or r["mbytes"]))


def device_times(prof):
    """{kernel name: device microseconds} of a profile with CUDA activity (one step)."""
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us:
            out[e.key] = out.get(e.key, 0.0) + us
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from resnet_fused import build_model
    dev = torch.device("cpu" if args.dry_run else "cuda")
    model_name, batch, size = ("resnet8", 2, 8) if args.dry_run else (args.model, args.batch, 28)
    bf16 = args.precision == "bf16" and not args.dry_run

    def make(impl):
        torch.manual_seed(0)
        kw = dict(backend="triton", cuda_graphs=False) if impl == "fused" else {}  # the un-graphed step
        m = build_model(model_name, impl=impl, **kw).to(dev)
        return m.to(memory_format=torch.channels_last) if bf16 else m

    x = torch.randn(batch, 1, size, size, device=dev)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)

    def stepper(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    out = dict(model=model_name, batch=batch, precision=args.precision, device=str(dev))
    for impl in ("reference", "fused"):
        step = stepper(make(impl))
        warm = 1 if args.dry_run else 3
        for i in range(warm):
            if impl == "fused" and i == warm - 1:  # the last warm-up step logs the launches (untimed)
                with LaunchLog(interpreted=args.dry_run) as log:
                    step()
            else:
                step()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        out[f"{impl}_step_ms"] = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        sync()
    device_us, peaks = None, None
    if dev.type == "cuda":
        from throughput import measure_peaks
        measured = measure_peaks(dev)
        peaks = dict(flops=measured["bf16" if bf16 else "fp32"], bandwidth=measured["bandwidth"])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as dprof:
            step()
            sync()
        device_us = device_times(dprof)
    out["peaks"] = peaks
    out["kernels"] = kernel_table(log.launches, device_us, peaks)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    out["profiled_host_ms"] = total_us / 1e3
    out["top"] = [dict(op=e.key, calls=e.count, self_host_us=e.self_cpu_time_total,
                       share=e.self_cpu_time_total / total_us if total_us else 0.0) for e in events[:args.top]]
    print(f"host profile: {model_name} batch {batch} {args.precision} on {dev}: fused step {out['fused_step_ms']:.1f} "
          f"ms, reference {out['reference_step_ms']:.1f} ms, profiled host time {out['profiled_host_ms']:.1f} ms")
    print(f"{'self host us':>12s} {'share':>6s} {'calls':>6s}  operator")
    for t in out["top"]:
        print(f"{t['self_host_us']:12.0f} {100 * t['share']:5.1f}% {t['calls']:6d}  {t['op']}")
    print(f"{'kernel':28s} {'launches':>8s} {'GFLOP':>8s} {'MB':>8s} {'dev us':>8s} {'TFLOP/s':>8s} {'GB/s':>8s}"
          f" {'%flops':>6s} {'%bw':>5s}")

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"
    for r in out["kernels"]:
        print(f"{r['kernel'][:28]:28s} {r['launches']:8d} {fmt(r['gflop'], '8.2f'):>8s} {r['mbytes']:8.1f} "
              f"{fmt(r['device_us'], '8.0f'):>8s} {fmt(r.get('tflops'), '8.1f'):>8s} {fmt(r.get('gbps'), '8.0f'):>8s} "
              f"{fmt(r.get('frac_peak_flops') and 100 * r['frac_peak_flops'], '5.1f'):>6s} "
              f"{fmt(r.get('frac_peak_bw') and 100 * r['frac_peak_bw'], '4.1f'):>5s}")
    if args.json:
        write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
