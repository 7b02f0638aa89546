"""bn_running_update: BatchNorm's running-statistics update, exactly as torch.nn.BatchNorm2d does it in training,
for every BatchNorm of a training step in one launch.

Per BatchNorm i (its momentum m_i, or the cumulative average when its momentum is None):
    num_batches_tracked += 1
    f = 1 / num_batches_tracked   if cumulative   else m_i
    running_mean = (1 - f) * running_mean + f * mean
    running_var  = (1 - f) * running_var  + f * var * count / (count - 1)     (unbiased batch variance)

mean/var are the biased batch statistics of the step's convs (conv_bn_train / conv_bn_stats), fp32. The backend
collects them over the forward and updates every running buffer after the last layer: one launch instead of one
per BatchNorm (and a forward that fails half way leaves every running statistic as it was). One program walks the
layers (a tuple of pointers, unrolled: the kernel is specialised on the layer count) and every channel, so
reading and bumping num_batches_tracked needs no cross-program ordering; nothing is read back on the host
(graph-capturable). The op only mutates buffers and has no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager import custom_op
from .launch import device_guard, next_pow2


@triton.jit
def bn_running_update_kernel(rms, rvs, nbts,                 # mutated, tuples: running mean / var, num_batches_tracked
                             means, vars,                    # tuples: fp32 batch mean and biased variance
                             chans, counts, momenta,         # tuples: channels, values per channel, momentum
                             CUMULATIVE: tl.constexpr,       # bit i set: layer i's momentum is None
                             LAYERS: tl.constexpr, BLOCK_C: tl.constexpr):
    for i in tl.static_range(LAYERS):
        nbt = tl.load(nbts[i]) + 1
        if (CUMULATIVE >> i) & 1:
            f = 1.0 / nbt.to(tl.float32)
        else:
            f = momenta[i]
        unbias = counts[i] / (counts[i] - 1.0)
        for c0 in range(0, chans[i], BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            ok = offs < chans[i]
            rm = tl.load(rms[i] + offs, mask=ok)
            rv = tl.load(rvs[i] + offs, mask=ok)
            mean = tl.load(means[i] + offs, mask=ok)
            var = tl.load(vars[i] + offs, mask=ok)
            new_rm = rm.to(tl.float32) * (1.0 - f) + f * mean
            new_rv = rv.to(tl.float32) * (1.0 - f) + f * var * unbias
            tl.store(rms[i] + offs, new_rm.to(rms[i].dtype.element_ty), mask=ok)
            tl.store(rvs[i] + offs, new_rv.to(rvs[i].dtype.element_ty), mask=ok)
        tl.store(nbts[i], nbt)


@custom_op("resnet_fused::bn_running_update",
                         mutates_args=("running_means", "running_vars", "nums_batches_tracked"))
def bn_running_update(running_means: list[Tensor], running_vars: list[Tensor], nums_batches_tracked: list[Tensor],
                      means: list[Tensor], vars: list[Tensor], counts: list[int], momenta: list[float],
                      cumulative: list[bool]) -> None:
    """In-place BatchNorm2d running-statistics updates, layer i from its batch's biased means[i]/vars[i] over
    counts[i] values, momentum momenta[i] (ignored where cumulative[i]: momentum None)."""
    n = len(running_means)
    lists = (running_vars, nums_batches_tracked, means, vars, counts, momenta, cumulative)
    if any(len(v) != n for v in lists):
        raise ValueError(f"bn_running_update: one entry per BatchNorm in every list, got lengths "
                         f"{[n] + [len(v) for v in lists]}")
    for i in range(n):
        c = running_means[i].numel()
        if running_vars[i].numel() != c or means[i].numel() != c or vars[i].numel() != c:
            raise ValueError(f"bn_running_update: BatchNorm {i} has {c} running means but "
                             f"{running_vars[i].numel()} running vars, {means[i].numel()} batch means and "
                             f"{vars[i].numel()} batch vars")
        if counts[i] < 2:
            raise ValueError(f"bn_running_update: BatchNorm {i} has {counts[i]} values per channel; the unbiased "
                             f"variance needs at least 2")
    if n == 0:
        return
    block = max(16, min(1024, next_pow2(max(t.numel() for t in running_means))))
    with device_guard(running_means[0]):
        bn_running_update_kernel[(1,)](tuple(running_means), tuple(running_vars), tuple(nums_batches_tracked),
                                       tuple(means), tuple(vars), tuple(t.numel() for t in running_means),
                                       tuple(counts), tuple(float(m) for m in momenta),
                                       CUMULATIVE=sum(1 << i for i, c in enumerate(cumulative) if c), LAYERS=n,
                                       BLOCK_C=block)


@bn_running_update.register_fake
def _(running_means, running_vars, nums_batches_tracked, means, vars, counts, momenta, cumulative):
    return None
