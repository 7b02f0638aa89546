"""Host-side cost of one FusedResNet (backend "triton") training step, measurable without a GPU.

    python bench/host_overhead.py [--model resnet20] [--steps 50] [--amp off|bf16] [--profile]

Without CUDA graphs the fused training step is bound by the host (H100 run 1: ~700 launches, 64 ms per step
against 9 ms with a graph). This tool measures that host work on any machine: every Triton kernel launch
(``kernel[grid](...)``) is replaced by a no-op and the step runs on tiny CPU tensors, so what is timed is the
Python launchers, the custom-op and autograd machinery and the small ATen ops around them (on tiny tensors, so
about their launch cost). The reference eager step on the same tiny tensors is timed beside it. It is a proxy:
Triton's own launch cost and the CUDA driver are not in it. ``--profile`` prints the top cProfile entries.

It also counts the GPU kernels of one step without a GPU: every Triton launch, plus every operator at the
dispatcher that launches a kernel (ATen ops, leaving out views, detach and dtype bookkeeping; SGD is foreach, as on
a GPU), both around the custom ops and inside their Python implementations (allocations, copies, partial sums):
each is at least one kernel on a GPU, CUDA-graph replays included. The reference eager step's count is beside it.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels are not run at all

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


import triton  # noqa: E402

from resnet_fused import build_model  # noqa: E402
from resnet_fused import backends as fused_backends  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402

import resnet_fused.ops  # noqa: E402
from common import write_json  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` does nothing; counts the launches."""

    launches = 0
    by_kernel = collections.Counter()

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.launches += 1
            _NoLaunch.by_kernel[self.name] += 1
        return launch


def mock_kernels():
    for info in pkgutil.iter_modules(resnet_fused.ops.__path__):  # every op module's @triton.jit kernels
        mod = importlib.import_module(f"resnet_fused.ops.{info.name}")
        for name in dir(mod):
            if isinstance(getattr(mod, name), triton.runtime.jit.JITFunction):
                setattr(mod, name, _NoLaunch(name))
    fused_backends.triton_interpreting = lambda: True  # backend "triton" accepts the CPU tensors


# ops that launch no kernel of their own: allocations, views, autograd bookkeeping, metadata
_NO_KERNEL = {"aten.detach", "aten.view", "aten._unsafe_view", "aten.t", "aten.as_strided", "aten.promote_types",
              "aten.squeeze", "aten.unsqueeze", "aten.expand", "aten.select", "aten.slice", "aten.permute",
              "aten.transpose", "aten.alias", "aten.as_strided_", "aten.split", "aten.unbind", "aten.narrow", "aten.view_as",
              "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
              "aten.lift_fresh", "aten.sym_size", "aten.sym_stride", "aten.is_same_size",
              "profiler._record_function_enter_new", "profiler._record_function_exit"}
# ops that copy (one kernel) only when their result does not share the input's storage
_MAYBE_COPY = {"aten.contiguous", "aten.to", "aten.reshape", "aten.flatten", "aten.clone"}


def _storage(t):
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


def _launches_kernel(name, args, out):
    if name in _NO_KERNEL:
        return False
    if name in _MAYBE_COPY and name != "aten.clone":
        return _storage(out) != _storage(args[0] if args else None)
    return True


def _python_custom_ops():
    """The qualified names of resnet_fused's torch.library.custom_op ops (Python bodies: Triton launchers)."""
    from torch._library.custom_ops import CustomOpDef
    names = set()
    for info in pkgutil.iter_modules(resnet_fused.ops.__path__):
        mod = importlib.import_module(f"resnet_fused.ops.{info.name}")
        names.update(v._qualname for v in vars(mod).values() if isinstance(v, CustomOpDef))
    return names


PYTHON_CUSTOM_OPS = _python_custom_ops()


def count_kernel_ops(step):
    """({op: calls} of the kernel-launching operators at the top level of one call of step, {op: calls} of the
    ATen operators run inside resnet_fused's Python custom ops). A custom op is opaque to a dispatch mode (its body
    runs with the mode off), so its Python implementation is called here directly, with the mode pushed again, and
    the ATen ops it runs (allocations, copies, partial sums around the Triton launches) are counted apart."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls, self.inner, self.depth, self.bodies = collections.Counter(), collections.Counter(), 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            kwargs = kwargs or {}
            if func.name() in PYTHON_CUSTOM_OPS:  # a Python custom op: look inside
                self.calls[name] += 1
                self.bodies += 1
                self.depth += 1
                try:
                    with self:
                        return func._op_dk("CompositeExplicitAutograd", *args, **kwargs)
                finally:
                    self.depth -= 1
            out = func(*args, **kwargs)
            if _launches_kernel(name, args, out):
                (self.inner if self.depth else self.calls)[name] += 1
            return out

    with Count() as c:
        step()
    count_kernel_ops.bodies = c.bodies
    return c.calls, c.inner


def train_step(model, x, y, amp="off"):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)

    def step():  # the ordinary loop of the README's usage (zero_grad's default: gradients set to None)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    return step


def per_step_ms(step, steps, repeats=5):
    """[(wall ms, this thread's CPU ms) per step] of each timed window. The CPU time counts only the work of the
    calling thread (the host work itself), so other processes on a busy machine move it far less than wall time."""
    for _ in range(3):
        step()
    out = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            step()
        out.append(((time.perf_counter() - t0) / steps * 1e3, (time.thread_time() - c0) / steps * 1e3))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (5 windows, round-robin)")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="the step under autocast (CPU autocast standing in for CUDA's: the same casts of conv and "
                        "linear operands)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while timing: 1 keeps every op's work on the timed thread (tiny "
                        "tensors gain nothing from more) [1]")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    mock_kernels()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,))
    fused = build_model(args.model, impl="fused", backend="triton", cuda_graphs=False).to(
        memory_format=torch.channels_last)
    ref = build_model(args.model).to(memory_format=torch.channels_last)
    sf, sr = train_step(fused, x, y, args.amp), train_step(ref, x, y, args.amp)
    tf, tr, cf, cr = [], [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for _ in range(5):  # round-robin windows: the machine's drift hits both alike
            (wf, uf), = per_step_ms(sf, args.steps, 1)
            (wr, ur), = per_step_ms(sr, args.steps, 1)
            tf.append(wf), cf.append(uf), tr.append(wr), cr.append(ur)
    finally:
        torch.set_num_threads(threads)
    _NoLaunch.launches = 0
    _NoLaunch.by_kernel.clear()
    sf()
    launches, by_kernel = _NoLaunch.launches, collections.Counter(_NoLaunch.by_kernel)
    ops, inner = count_kernel_ops(sf)
    bodies = count_kernel_ops.bodies
    ref_ops, _ = count_kernel_ops(sr)
    # GPU kernels of one step: every Triton launch, and every ATen op that launches one, at the top level (outside
    # the custom ops) or inside the Python custom ops; the custom ops themselves launch nothing of their own
    outer_aten = sum(v for k, v in ops.items() if not k.startswith("resnet_fused."))
    res = dict(model=args.model, amp=args.amp, fused_host_ms=statistics.median(tf), reference_host_ms=statistics.median(tr),
               fused_host_us=statistics.median(tf) * 1e3, reference_host_us=statistics.median(tr) * 1e3,
               fused_host_cpu_us=statistics.median(cf) * 1e3, reference_host_cpu_us=statistics.median(cr) * 1e3,
               host_cpu_ratio=statistics.median(cf) / statistics.median(cr), threads=args.threads,
               triton_launches_per_step=launches, triton_launches=dict(by_kernel.most_common()),
               kernel_ops_per_step=sum(ops.values()),
               kernel_ops=dict(ops.most_common()), aten_ops_inside_custom_ops=dict(inner.most_common()),
               custom_op_bodies_counted=bodies,
               gpu_kernels_per_step=launches + outer_aten + sum(inner.values()),
               reference_gpu_kernels_per_step=sum(ref_ops.values()),
               torch=torch.__version__, triton=triton.__version__)
    print(f"{args.model} ({'bf16 autocast' if args.amp == 'bf16' else 'fp32'}): fused host work "
          f"{res['fused_host_us']:,.0f} us/step, reference eager on tiny tensors {res['reference_host_us']:,.0f} us/step "
          f"(wall); the host thread's CPU time {res['fused_host_cpu_us']:,.0f} / {res['reference_host_cpu_us']:,.0f} "
          f"us/step, fused / reference {res['host_cpu_ratio']:.2f}")
    print(f"GPU kernels per training step: fused {res['gpu_kernels_per_step']} ({launches} Triton launches, "
          f"{outer_aten} ATen ops around the custom ops, {sum(inner.values())} inside them), reference "
          f"{res['reference_gpu_kernels_per_step']}")
    for k, v in by_kernel.most_common():
        print(f"  Triton launches:          {v:4d} x {k}")
    for k, v in ((k, v) for k, v in ops.most_common() if not k.startswith("resnet_fused.")):
        print(f"  around the custom ops:    {v:4d} x {k}")
    for k, v in inner.most_common(8):
        print(f"  inside the custom ops: {v:4d} x {k}")
    if args.json:
        write_json(res, args.json)
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            sf()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    return res


if __name__ == "__main__":
    main()
