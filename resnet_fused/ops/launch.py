"""Host-side launch helpers shared by the fused ops: grid arithmetic, the device guard, 32- or 64-bit index math,
NHWC strides and allocation, the GPU a launch is chosen for, and the dot precision (TF32 or IEEE) of fp32 inputs.
No kernels here (tl_helpers.py), no semaphores (semaphores.py)."""
from __future__ import annotations

import contextlib
import functools

import torch

from ..capture_state import conv_tf32, note_choice


def cdiv(a, b):
    """ceil(a / b) for host-side launch math. (triton.cdiv / next_power_of_2 are constexpr functions in Triton 3.8,
    ~14 us per host call: a few hundred of them per training step cost milliseconds.)"""
    return -(-a // b)


def next_pow2(n):
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def device_guard(t):
    """Make t's device current (Triton launches on the current device and its current stream)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Kernels index with 32-bit integers when every element offset of every operand is below this (index64()).
INT32_LIMIT = 2**31 - 1


def index64(*tensors) -> bool:
    """Whether a kernel over these tensors needs 64-bit index math: some element offset passes INT32_LIMIT. A
    tensor's furthest element is sum((size - 1) * stride); masked-off lanes of a tile may compute addresses up to
    one step past the outermost index and a tile beyond the end: two of the largest stride plus 2**16 allow for
    both. Quick bound first (a few hundred launches per step call this): a view lies inside its storage, so its
    offsets stay below the storage's element count E; with every stride <= E the reach is below 3 E + 2**16."""
    def reach(t):
        if t.numel() == 0:
            return 0
        return sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 2 * max(t.stride(), default=0) + 2**16
    bound = INT32_LIMIT - 2**16  # read at each call: tests lower the module's limit
    seen = set()  # launchers pass one tensor in several roles (dummies): check each once
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        elems = t.untyped_storage().nbytes() // t.element_size()
        if 3 * elems <= bound and max(t.stride(), default=0) <= elems:
            continue
        if reach(t) > INT32_LIMIT:
            note_choice("index64", True)
            return True
    note_choice("index64", False)
    return False


def nhwc_strides(t):
    """(n, h, w, c) element strides of a logical NCHW tensor, whatever its memory format."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


# The GPU whose launch choices (tile configs, TF32, program counts) are made for CPU tensors: None, except while
# bench/kernel_report.py compiles the kernels for sm_90 on a CPU machine (then the SM count of an H100 SXM, 132),
# so that it compiles the configurations a GPU launches, not the interpreter's.
COMPILE_FOR_GPU_SMS = None


def gpu_target(device) -> bool:
    """Whether launches on this device are chosen for a GPU (a CUDA device, or kernel_report's compile target)."""
    return device.type == "cuda" or COMPILE_FOR_GPU_SMS is not None


def sm_count(device) -> int:
    """Streaming multiprocessors of the GPU the launch is chosen for (gpu_target(device) must hold)."""
    if device.type != "cuda":
        return COMPILE_FOR_GPU_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype, device) -> str:
    """IEEE fp32 products unless PyTorch's own convolutions would use TF32 here."""
    if dtype == torch.float32:
        tf32 = conv_tf32()
        note_choice("tf32", tf32)  # read on every launch: a graph bakes it in (graphs.GraphKey.tf32)
        return "tf32" if tf32 and gpu_target(device) else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def empty_nhwc(n, c, h, w, dtype, device):
    return torch.empty((n, c, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count
