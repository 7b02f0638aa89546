"""bn_running_update: BatchNorm's running-statistics update, exactly as torch.nn.BatchNorm2d does it in training.

    num_batches_tracked += 1
    f = 1 / num_batches_tracked   if momentum is None (cumulative moving average)   else momentum
    running_mean = (1 - f) * running_mean + f * mean
    running_var  = (1 - f) * running_var  + f * var * count / (count - 1)     (unbiased batch variance)

mean/var are the biased batch statistics from conv_bn_stats. One program does every channel, so reading and
bumping num_batches_tracked needs no cross-program ordering; nothing is read back on the host (graph-capturable).
The op only mutates buffers and has no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .implicit_gemm import device_guard, next_pow2


@triton.jit(do_not_specialize=["C", "COUNT", "MOMENTUM"])
def bn_running_update_kernel(rm_ptr, rv_ptr, nbt_ptr,       # mutated: running mean / var, num_batches_tracked
                             mean_ptr, var_ptr,             # fp32 batch mean and biased variance
                             C, COUNT, MOMENTUM,            # channels, values per channel, momentum
                             CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    nbt = tl.load(nbt_ptr) + 1
    if CUMULATIVE:
        f = 1.0 / nbt.to(tl.float32)
    else:
        f = MOMENTUM
    unbias = COUNT / (COUNT - 1.0)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        ok = offs < C
        rm = tl.load(rm_ptr + offs, mask=ok)
        rv = tl.load(rv_ptr + offs, mask=ok)
        mean = tl.load(mean_ptr + offs, mask=ok)
        var = tl.load(var_ptr + offs, mask=ok)
        new_rm = rm.to(tl.float32) * (1.0 - f) + f * mean
        new_rv = rv.to(tl.float32) * (1.0 - f) + f * var * unbias
        tl.store(rm_ptr + offs, new_rm.to(rm_ptr.dtype.element_ty), mask=ok)
        tl.store(rv_ptr + offs, new_rv.to(rv_ptr.dtype.element_ty), mask=ok)
    tl.store(nbt_ptr, nbt)


@torch.library.custom_op("resnet_fused::bn_running_update",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_running_update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, mean: Tensor,
                      var: Tensor, count: int, momentum: float, cumulative: bool) -> None:
    """In-place BatchNorm2d running-statistics update from this batch's biased mean/var over ``count`` values."""
    c = running_mean.numel()
    with device_guard(running_mean):
        bn_running_update_kernel[(1,)](running_mean, running_var, num_batches_tracked, mean, var, c, count,
                                       float(momentum), CUMULATIVE=cumulative,
                                       BLOCK_C=max(16, min(1024, next_pow2(c))))


@bn_running_update.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, cumulative):
    return None
