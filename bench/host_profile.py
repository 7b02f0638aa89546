"""Where the host time of one un-graphed FusedResNet training step goes: top operators by host (CPU) time.

    python bench/host_profile.py --json host_profile.json

The ordinary training loop (no CUDA graph) is bound by the host on a GPU: this profiles one step after warm-up
with torch.profiler (CPU activity only) and lists the operators with the most self host time, with their call
counts, beside the step's wall time and the reference eager step's. ``--dry-run``: tiny shapes on CPU (Triton
interpreter), to exercise the tool without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


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
        for _ in range(1 if args.dry_run else 3):
            step()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        out[f"{impl}_step_ms"] = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        sync()
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
