"""pool_linear: the ResNet head, global average pool + linear classifier, one launch each way.

Forward, for features f [N, C, H, W] (NHWC in memory), weight W [K, C], bias b [K]:
    pooled[n, c] = mean_{h,w} f[n, c, h, w]                  (fp32)
    logits[n, k] = sum_c pooled[n, c] * W[k, c] + b[k]       (fp32 products and sums, written in out_dtype)
Written as PyTorch ops this is mean + addmm forward and mm, mm, sum, div backward (plus the weight and bias casts
under autocast, four more kernels): here the weights are read in their own dtype and cast on load. Saved for
backward: pooled (fp32 [N, C]).

Backward, from g = dL/dlogits [N, K]:
    dL/df[n, c, h, w] = (sum_k g[n, k] * W[k, c]) / (H * W)
    dL/dW[k, c] = sum_n g[n, k] * pooled[n, c],    dL/db[k] = sum_n g[n, k]
Each program takes a block of images: it writes their dL/df and fp32 partials of dL/dW, dL/db; the last program to
finish sums the partials in block order into dL/dW, dL/db (deterministic, no float atomics, one launch).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager import custom_op, ops, register_autograd
from .launch import cdiv, device_guard, next_pow2, nhwc_strides
from .semaphores import semaphores
from .tl_helpers import last_to_finish

BLOCK_N = 16
MAX_C, MAX_K = 512, 256  # the widest head the kernels take (the model falls back to PyTorch ops beyond)
# One program holds a [BLOCK_C, BLOCK_K] tile of the weight in fp32 (the dot's operand, staged through shared
# memory). Compiled for sm_90 (bench/kernel_report.py --heads): a 256 x 256 tile needs 273 KB of shared memory,
# more than the 227 KB a block may have (the launch fails), 512 x 256 545 KB; 128 x 128 spills ~4.8 KB of
# registers in fp32. Tiles up to 8,192 elements (64 KB of shared memory) are what the kernels take.
MAX_TILE = 8192
EXTREME_HEADS = [(512, 16), (256, 32), (128, 64), (64, 128), (32, 256)]  # the corners fits() admits


def fits(channels: int, classes: int) -> bool:
    """Whether the kernels take a head of this size (see MAX_TILE); the model runs PyTorch's ops otherwise."""
    if not (1 <= channels <= MAX_C and 1 <= classes <= MAX_K):
        return False
    bc, bk = _blocks(channels, classes)
    return bc * bk <= MAX_TILE


@triton.jit
def pool_linear_fwd_kernel(out_ptr, pooled_ptr,               # out: logits [N, K] (out dtype), pooled fp32 [N, C]
                           f_ptr, w_ptr, b_ptr,               # features (NHWC strides), weight [K, C], bias [K]
                           N, C, HW, K, f_n, f_hw, f_c, w_k, w_c,
                           HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, c_ok, k_ok = offs_n < N, offs_c < C, offs_k < K
    fmask = n_ok[:, None] & c_ok[None, :]
    src = f_ptr + offs_n.to(tl.int64)[:, None] * f_n + offs_c[None, :] * f_c
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for _ in range(0, HW):
        acc += tl.load(src, mask=fmask, other=0.0).to(tl.float32)
        src += f_hw
    pooled = acc / HW
    tl.store(pooled_ptr + offs_n[:, None] * C + offs_c[None, :], pooled, mask=fmask)
    wt = tl.load(w_ptr + offs_c[:, None] * w_c + offs_k[None, :] * w_k, mask=c_ok[:, None] & k_ok[None, :],
                 other=0.0).to(tl.float32)                                   # W^T [C, K]
    logits = tl.dot(pooled, wt, input_precision="ieee")
    if HAS_B:
        logits += tl.load(b_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], logits.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def pool_linear_bwd_kernel(gf_ptr, gw_ptr, gb_ptr,             # out: dL/df (NHWC), dL/dW [K, C], dL/db [K]
                           part_ptr, cnt_ptr,                  # fp32 [T, K, C + 1] partials; int32 counter
                           g_ptr, pooled_ptr, w_ptr,           # dL/dlogits [N, K], pooled fp32 [N, C], weight
                           N, C, HW, K, g_n, g_k, f_n, f_hw, f_c, w_k, w_c, gw_k, gw_c,
                           HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, c_ok, k_ok = offs_n < N, offs_c < C, offs_k < K
    g = tl.load(g_ptr + offs_n[:, None] * g_n + offs_k[None, :] * g_k, mask=n_ok[:, None] & k_ok[None, :],
                other=0.0).to(tl.float32)                                    # [BN, BK]
    w = tl.load(w_ptr + offs_k[:, None] * w_k + offs_c[None, :] * w_c, mask=k_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)                                    # [BK, BC]
    gp = tl.dot(g, w, input_precision="ieee") / HW                           # dL/dpooled / HW
    fmask = n_ok[:, None] & c_ok[None, :]
    dst = gf_ptr + offs_n.to(tl.int64)[:, None] * f_n + offs_c[None, :] * f_c
    val = gp.to(gf_ptr.dtype.element_ty)
    for _ in range(0, HW):
        tl.store(dst, val, mask=fmask)
        dst += f_hw
    pooled = tl.load(pooled_ptr + offs_n[:, None] * C + offs_c[None, :], mask=fmask, other=0.0)
    kc = offs_k[:, None] * (C + 1) + offs_c[None, :]
    kc_ok = k_ok[:, None] & c_ok[None, :]
    tile = part_ptr + pid.to(tl.int64) * K * (C + 1)
    tl.store(tile + kc, tl.dot(tl.trans(g), pooled, input_precision="ieee"), mask=kc_ok)
    tl.store(tile + offs_k * (C + 1) + C, tl.sum(g, axis=0), mask=k_ok)
    if last_to_finish(cnt_ptr, tl.num_programs(0)):
        dw = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
        db = tl.zeros((BLOCK_K,), tl.float32)
        src = part_ptr
        for _ in range(0, tl.num_programs(0)):
            dw += tl.load(src + kc, mask=kc_ok, other=0.0, cache_modifier=".cg")
            db += tl.load(src + offs_k * (C + 1) + C, mask=k_ok, other=0.0, cache_modifier=".cg")
            src += K * (C + 1)
        tl.store(gw_ptr + offs_k[:, None] * gw_k + offs_c[None, :] * gw_c, dw.to(gw_ptr.dtype.element_ty),
                 mask=kc_ok)
        if HAS_B:
            tl.store(gb_ptr + offs_k, db.to(gb_ptr.dtype.element_ty), mask=k_ok)


def _blocks(c, k):
    return max(16, next_pow2(c)), max(16, next_pow2(k))


def _hw_strides(f):
    """(n, hw, c) strides: the kernels walk the h*w positions one stride apart (NHWC or NCHW memory)."""
    s_n, s_h, s_w, s_c = nhwc_strides(f)
    if f.shape[2] > 1 and s_h != f.shape[3] * s_w:
        raise ValueError(f"pool_linear: the features' (h, w) positions must lie evenly strided in memory "
                         f"(channels_last or contiguous), got shape {tuple(f.shape)} with strides {f.stride()}")
    return s_n, s_w, s_c


def _check(feats, weight, bias):
    n, c, h, w = feats.shape
    if weight.dim() != 2 or weight.shape[1] != c or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"pool_linear: features {tuple(feats.shape)} need a weight [K, {c}] and bias [K], got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    if not fits(c, weight.shape[0]):
        raise ValueError(f"pool_linear: takes up to {MAX_C} channels, {MAX_K} classes and a weight tile of "
                         f"{MAX_TILE} elements (channels x classes, each rounded up to a power of two >= 16), got "
                         f"{c} and {weight.shape[0]}")


@custom_op("resnet_fused::pool_linear", mutates_args=())
def pool_linear(feats: Tensor, weight: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> tuple[Tensor,
                                                                                                       Tensor]:
    """(logits [N, K] in out_dtype, pooled fp32 [N, C]): linear(mean_{h,w} feats, weight, bias)."""
    _check(feats, weight, bias)
    n, c, h, w = feats.shape
    k = weight.shape[0]
    out = torch.empty((n, k), dtype=out_dtype, device=feats.device)
    pooled = torch.empty((n, c), dtype=torch.float32, device=feats.device)
    if n:
        bc, bk = _blocks(c, k)
        with device_guard(feats):
            pool_linear_fwd_kernel[(cdiv(n, BLOCK_N),)](
                out, pooled, feats, weight, bias if bias is not None else weight, n, c, h * w, k, *_hw_strides(feats),
                *weight.stride(), HAS_B=bias is not None, BLOCK_N=BLOCK_N, BLOCK_C=bc, BLOCK_K=bk)
    return out, pooled


@pool_linear.register_fake
def _(feats, weight, bias, out_dtype):
    _check(feats, weight, bias)
    return (feats.new_empty((feats.shape[0], weight.shape[0]), dtype=out_dtype),
            feats.new_empty((feats.shape[0], feats.shape[1]), dtype=torch.float32))


@custom_op("resnet_fused::pool_linear_backward", mutates_args=())
def pool_linear_backward(grad: Tensor, pooled: Tensor, feats: Tensor, weight: Tensor,
                         has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dfeats like feats, dL/dweight like weight, dL/dbias (empty without a bias))."""
    n, c, h, w = feats.shape
    k = weight.shape[0]
    gf = torch.empty_like(feats, memory_format=torch.channels_last)
    gw = torch.empty_like(weight)
    gb = torch.empty(k if has_bias else 0, dtype=weight.dtype, device=weight.device)
    if n == 0:
        return gf, gw.zero_(), gb.zero_()
    bc, bk = _blocks(c, k)
    tiles = cdiv(n, BLOCK_N)
    part = torch.empty((tiles, k, c + 1), dtype=torch.float32, device=feats.device)
    with device_guard(feats):
        pool_linear_bwd_kernel[(tiles,)](
            gf, gw, gb if has_bias else gw, part, semaphores(feats.device, 1), grad, pooled, weight,
            n, c, h * w, k, *grad.stride(), *_hw_strides(gf), *weight.stride(), *gw.stride(),
            HAS_B=has_bias, BLOCK_N=BLOCK_N, BLOCK_C=bc, BLOCK_K=bk)
    return gf, gw, gb


@pool_linear_backward.register_fake
def _(grad, pooled, feats, weight, has_bias):
    return (torch.empty_like(feats, memory_format=torch.channels_last), torch.empty_like(weight),
            weight.new_empty((weight.shape[0] if has_bias else 0,)))


def _setup_context(ctx, inputs, output):
    feats, weight, bias, _ = inputs
    ctx.save_for_backward(output[1], feats, weight)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_pooled):
    pooled, feats, weight = ctx.saved_tensors
    if grad is None:
        return None, None, None, None
    gf, gw, gb = ops.pool_linear_backward(grad, pooled, feats, weight, ctx.has_bias)
    need = ctx.needs_input_grad
    return (gf if need[0] else None, gw if need[1] else None, gb if ctx.has_bias and need[2] else None, None)


register_autograd(pool_linear, _backward, setup_context=_setup_context)
