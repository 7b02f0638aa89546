"""What the benchmarks share: device sync, timed windows and their quantiles, the environment of a run (versions,
device, git commit) and an atomic JSON write."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time

import torch

from resnet_fused.reporting import write_json  # noqa: F401 - re-exported

HERE = os.path.dirname(os.path.abspath(__file__))


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_windows(fn, dev, iters, repeats):
    """Seconds per call for each of ``repeats`` windows of ``iters`` calls."""
    out = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) / iters)
    return out


def quantile(xs, q):
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def git_commit(short=False):
    """(commit, dirty) of the tree the benchmarks run from; the caller's RESNET_FUSED_GIT_COMMIT where the tree has no
    .git (the device machine's copy); dirty is None when unknown."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    if not commit or len(commit) != 40:  # no .git here (a copied tree): the caller may name the commit
        commit, dirty = os.environ.get("RESNET_FUSED_GIT_COMMIT"), None
    return (commit[:7] if short and commit else commit), dirty


def environment(dev):
    """Versions, device and commit of a run, as every benchmark JSON records them."""
    commit, dirty = git_commit()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    engines = {}
    for pkg in ("onnxruntime", "openvino"):
        try:
            engines[pkg] = __import__(pkg).__version__
        except ImportError:
            engines[pkg] = None
    return dict(device=str(dev), device_name=name, torch=torch.__version__, triton=triton_version, **engines,
                cuda=torch.version.cuda, python=platform.python_version(), git_commit=commit, git_dirty=dirty,
                cpu_threads=torch.get_num_threads(), date=datetime.datetime.now().isoformat(timespec="seconds"))
