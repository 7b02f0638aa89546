"""What the shipped Triton kernels compile to on an H100 (sm_90), without a GPU.

    python bench/kernel_report.py                    # ResNet-20 (A and B), batch 512, 28x28: train + eval (per
                                                     # layer, and the whole-network kernel), fp32 + bf16
    python bench/kernel_report.py --batch 64 --json bench/results/kernel_report-....json
    python bench/kernel_report.py --model tv-resnet18,tv-resnet50 --size 224 --batch 64 --precisions fp32,bf16
                                                     # torchvision's ResNets (train + per-layer inference)

The FusedResNet step runs on CPU tensors of the real shapes with every Triton launch turned into a compile for
``GPUTarget("cuda", 90, 32)`` (Triton's own binder picks the specialisations it would pick on the GPU: dtypes,
16-byte alignment, integers divisible by 16), so exactly the configurations the workloads launch are compiled —
nothing runs. For each distinct compiled kernel it reports, from the cubin and PTX Triton produced:

  regs / spill   registers per thread and spill stores+loads (bytes), from ptxas -v on the PTX (the bundled ptxas,
                 sm_90a); ``regs_cubin`` is the register count in the cubin itself (cuobjdump), what the driver
                 reports as n_regs on a GPU
  smem           shared memory per block (bytes, Triton's metadata)
  mul64          64-bit integer multiplies in the PTX (mul.lo/mad.lo/mul.hi on .s64/.u64: several IMADs each);
                 ``mulwide`` counts 32x32->64 mul.wide (one IMAD.WIDE)
  ldg.v / stg.v  vectorised global loads/stores in the SASS (LDG/STG .64 and .128) against all LDG/STG
  mma            tensor-core instructions in the SASS (HMMA, HGMMA/wgmma)
  sass           SASS instructions in the kernel

Run it before and after a kernel change and commit the JSON beside the benchmark results. On a GPU machine
``--check-driver`` compiles for that GPU instead (the real driver), loads every kernel and records the driver's
register and spill counts beside ptxas's (``driver_regs``, ``driver_spills``); the run fails if they disagree.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target; nothing is run

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


from resnet_fused import backends as fused_backends  # noqa: E402
from resnet_fused import build_model  # noqa: E402
from resnet_fused.ops import launch  # noqa: E402

from common import git_commit  # noqa: E402
from resnet_fused.ops.resnet_infer import ctas_per_sm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _CompileOnlyDriver:
    """Triton's driver as far as compiling needs it: the sm_90 target, device 0, stream 0."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


def _tool(name):
    path = os.path.join(NV_BIN, name)
    return path if os.path.exists(path) else name


def _run(cmd, data=None):
    return subprocess.run(cmd, capture_output=True, text=True, input=data, check=False)


def analyse(kernel, workdir):
    """The metrics above for one CompiledKernel."""
    md, ptx, cubin = kernel.metadata, kernel.asm["ptx"], kernel.asm["cubin"]
    name = md.name
    ptx_path = os.path.join(workdir, f"{name}.ptx")
    cubin_path = os.path.join(workdir, f"{name}.cubin")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    with open(cubin_path, "wb") as f:
        f.write(cubin)
    res = dict(kernel=name, num_warps=md.num_warps, num_stages=md.num_stages, smem=md.shared)
    v = _run([_tool("ptxas"), "-arch=sm_90a", "-v", ptx_path, "-o", os.path.join(workdir, "v.cubin")]).stderr
    regs = re.search(r"Used (\d+) registers", v)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", v)
    res.update(regs=int(regs.group(1)) if regs else None,
               spill_bytes=(int(st.group(1)) + int(st.group(2))) if st else None)
    # blocks an SM holds at once (registers, shared memory, threads): what sizes resnet_infer's persistent grid
    res["ctas_per_sm"] = ctas_per_sm(res["regs"], md.shared, md.num_warps) if res["regs"] else None
    usage = _run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path]).stdout
    reg = re.search(r"REG:(\d+)", usage)
    res["regs_cubin"] = int(reg.group(1)) if reg else None
    res["mul64"] = len(re.findall(r"\b(?:mul|mad)\.(?:lo|hi)\.[su]64\b", ptx))
    res["mulwide"] = len(re.findall(r"\bmul\.wide\.[su]32\b", ptx))
    sass = _run([_tool("cuobjdump"), "-sass", cubin_path]).stdout
    ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass)  # predicate, opcode
    ops = collections.Counter(i for i in ins)
    ldg = [k for k in ops if k.startswith("LDG")]
    stg = [k for k in ops if k.startswith("STG")]
    res.update(sass=len(ins),
               ldg=sum(ops[k] for k in ldg), ldg_vec=sum(ops[k] for k in ldg if ".64" in k or ".128" in k),
               stg=sum(ops[k] for k in stg), stg_vec=sum(ops[k] for k in stg if ".64" in k or ".128" in k),
               mma=sum(n for k, n in ops.items() if k.startswith(("HMMA", "HGMMA", "IMMA", "DMMA"))),
               imad_wide=sum(n for k, n in ops.items() if k.startswith("IMAD.WIDE")))
    return res


def run_heads(heads, precisions, current):
    """pool_linear's forward and backward at each (channels, classes) head: the extreme sizes fits() admits."""
    from resnet_fused.ops import pool_linear as pl
    for c, k in heads:
        for prec in precisions:
            dt = torch.bfloat16 if prec == "bf16" else torch.float32
            current[0] = f"head {c}x{k}/{prec}"
            f = torch.randn(32, c, 4, 4, dtype=dt).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(k, c, dtype=dt), torch.randn(k, dtype=dt)
            _, pooled = pl.pool_linear(f, w, b, dt)
            pl.pool_linear_backward(torch.randn(32, k, dtype=dt), pooled, f, w, True)


def _workload_model(name, shortcut, batch, size):
    """(model, x) of one workload: a FusedResNet on 28x28x1 digits, or a torchvision ResNet (tv-NAME) on
    size x size x 3 images, on the triton backend."""
    torch.manual_seed(0)
    if name.startswith("tv-"):
        model, shape = build_model(name, impl="fused", backend="triton"), (batch, 3, size, size)
    else:
        model = build_model(name, impl="fused", backend="triton", shortcut=shortcut, cuda_graphs=False)
        shape = (batch, 1, 28, 28)
    return (model.to(memory_format=torch.channels_last),
            torch.randn(*shape).contiguous(memory_format=torch.channels_last))


def collect(workloads, batch, real_driver=False, heads=(), index64=False, size=224):
    """{(kernel name, specialisation key): (CompiledKernel, {constexprs}, [workloads])} for the given workloads
    (and pool_linear's ``heads``); ``real_driver``: compile for the GPU of this machine (the tensors stay on the
    CPU: nothing is launched); ``index64``: every launcher takes its 64-bit index variant (INDEX64); ``size``: the
    torchvision models' image side."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    if not real_driver:
        driver.set_active(_CompileOnlyDriver())
    seen = {}
    current = [None]
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        consts = {k: v for k, v in kwargs.items() if isinstance(v, (int, bool, str)) and k.isupper()}
        key = (kernel.metadata.name, kernel.hash)
        if key not in seen:
            seen[key] = (kernel, consts, [])
        if current[0] not in seen[key][2]:
            seen[key][2].append(current[0])
        return kernel

    JITFunction.run = compile_only
    fused_backends.triton_interpreting = lambda: True  # backend "triton" takes the CPU tensors
    # the launchers choose tiles, TF32 and split counts for the GPU compiled for, not for the CPU tensors
    launch.COMPILE_FOR_GPU_SMS = launch_sms(real_driver)
    int32_limit = launch.INT32_LIMIT
    if index64:
        launch.INT32_LIMIT = 0  # every offset "too large": the INDEX64 variants
    try:
        for name, shortcut, mode, prec in workloads:
            current[0] = _workload_name((name, shortcut, mode, prec))
            model, x = _workload_model(name, shortcut, batch, size)
            y = torch.randint(0, 10, (batch,))
            model.train(mode == "train")
            model.whole_network_inference = mode == "inference-net"
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                if mode == "train":
                    F.cross_entropy(model(x).float(), y).backward()
                else:
                    with torch.no_grad():
                        model(x)
        run_heads(heads, sorted({w[3] for w in workloads}), current)
    finally:
        JITFunction.run = original
        launch.COMPILE_FOR_GPU_SMS = None
        launch.INT32_LIMIT = int32_limit
    return seen


def _workload_name(w):
    """"A/train/fp32" for FusedResNet's own models (the model is the report's), "tv-resnet18/train/fp32"."""
    name, shortcut, mode, prec = w
    return "/".join((name if name.startswith("tv-") else shortcut, mode, prec))


H100_SXM_SMS = 132


def launch_sms(real_driver):
    """The SM count the launch choices are made for: this machine's GPU with --check-driver, else an H100 SXM."""
    if real_driver:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return H100_SXM_SMS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20",
                   help="one or more, comma-separated: resnet20, ..., or torchvision's tv-resnet18, tv-resnet50, ...")
    p.add_argument("--size", type=int, default=224, help="image side of the torchvision models (tv-NAME) [224]")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--modes", default="train,inference,inference-net",
                   help="train, inference (per layer), inference-net (the whole-network kernel)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--shortcuts", default="A,B")
    p.add_argument("--json", default=None)
    p.add_argument("--check-driver", action="store_true",
                   help="on a GPU machine: compile for its GPU and compare ptxas's counts with the driver's")
    p.add_argument("--tf32", choices=["on", "off"], default="on",
                   help="fp32 convolutions as with torch.backends.cudnn.allow_tf32 = True (PyTorch's default: TF32 "
                        "tensor cores) or False (IEEE fp32) [on]")
    p.add_argument("--index64", action="store_true",
                   help="compile the 64-bit index variants (INDEX64) of every launch instead of the 32-bit ones")
    p.add_argument("--heads", default="",
                   help="pool_linear heads to compile too, CxK,... ('extremes': the largest that fits() admits)")
    args = p.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    from resnet_fused.ops import pool_linear
    heads = (pool_linear.EXTREME_HEADS if args.heads == "extremes" else
             [tuple(int(v) for v in h.split("x")) for h in args.heads.split(",") if h])
    if args.check_driver and not torch.cuda.is_available():
        raise SystemExit("error: --check-driver needs a CUDA GPU (it loads every kernel through the driver)")
    models = args.model.split(",")
    for name in models:
        if name.startswith("tv-") and "inference-net" in args.modes.split(","):
            raise SystemExit(f"error: {name}: the whole-network kernel (inference-net) runs FusedResNet's own "
                             f"networks only; pass --modes train,inference")
    workloads = [(name, "" if name.startswith("tv-") else s, m, pr) for name in models
                 for s in (args.shortcuts.split(",") if not name.startswith("tv-") else [""])
                 for m in args.modes.split(",") for pr in args.precisions.split(",")]
    t0 = time.perf_counter()
    seen = collect(workloads, args.batch, real_driver=args.check_driver, heads=heads, index64=args.index64,
                   size=args.size)
    rows, disagree = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for (name, h), (kernel, consts, used) in sorted(seen.items(), key=lambda kv: kv[0][0]):
            r = analyse(kernel, tmp)
            r.update(hash=h[:12], constexprs=consts, workloads=used)
            if args.check_driver:
                kernel._init_handles()  # cuModuleLoadData + the function's attributes, as a first launch does
                r.update(driver_regs=kernel.n_regs, driver_spills=kernel.n_spills)
                if kernel.n_regs != r["regs_cubin"] or (kernel.n_spills > 0) != ((r["spill_bytes"] or 0) > 0):
                    disagree.append(f"{name} {h[:12]}: driver {kernel.n_regs} regs / {kernel.n_spills} spills, "
                                    f"cubin {r['regs_cubin']} regs, ptxas {r['spill_bytes']} spill bytes")
            rows.append(r)
    cols = ["regs", "regs_cubin", "spill_bytes", "smem", "num_warps", "ctas_per_sm", "mul64", "mulwide", "ldg_vec", "ldg",
            "stg_vec", "stg", "mma", "sass"]
    target = (f"sm_{torch.cuda.get_device_capability()[0]}{torch.cuda.get_device_capability()[1]} "
              f"({torch.cuda.get_device_name()})") if args.check_driver else "sm_90"
    launch = dict(sms=launch_sms(args.check_driver), tf32=bool(torch.backends.cudnn.allow_tf32))
    print(f"{len(rows)} kernel configurations compiled for {target} in {time.perf_counter() - t0:.0f} s "
          f"(Triton {triton.__version__}, {args.model}, batch {args.batch}, shortcuts {args.shortcuts}, torchvision "
          f"models at {args.size}x{args.size}; launch "
          f"choices of a {launch['sms']}-SM GPU, fp32 convolutions in {'TF32' if launch['tf32'] else 'IEEE fp32'} "
          f"as cudnn.allow_tf32)")
    print(f"{'kernel':26s} {'tile (BLOCK_*)':14s} {'workloads':>9s} " + " ".join(f"{c[:8]:>8s}" for c in cols))
    for r in rows:
        tile = "x".join(str(v) for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        print(f"{r['kernel'][:26]:26s} {tile[:14]:14s} {len(r['workloads']):9d} "
              + " ".join(f"{str(r[c]):>8s}" for c in cols))
    tot = {c: sum((r[c] or 0) for r in rows) for c in ("spill_bytes", "mul64", "mma")}
    print(f"totals: spill bytes {tot['spill_bytes']}, 64-bit multiplies {tot['mul64']}, tensor-core instructions "
          f"{tot['mma']}")
    if disagree:
        print("driver and compiler disagree:\n  " + "\n  ".join(disagree))
    res = dict(target=target, driver_checked=args.check_driver, driver_disagreements=disagree,
               triton=triton.__version__, torch=torch.__version__, model=args.model,
               batch=args.batch, size=args.size, workloads=[_workload_name(w) for w in workloads],
               launch_choices=launch,
               index64=args.index64, heads=[list(h) for h in heads],
               kernels=rows, totals=tot,
               git_commit=git_commit(short=True)[0] or "unknown")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if disagree:
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
