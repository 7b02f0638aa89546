"""The small finishing kernels of the training backward: each replaces a chain of 3-5 tiny ATen ops (one GPU kernel
each) with one launch. Reductions run over the partials in a fixed order (deterministic, no atomics).

    sum_partials(part [T, K, C]) -> K separate [C] sums          (was part.sum(0) + one clone per output)
    wgrad_finish(part [S, Co, kh*kw*Ci]) -> dW [Co, Ci, kh, kw]  (was sum(0) + reshape/permute/contiguous copy
                                                                   + cast to the weight's dtype)
    bn_grad_coeffs(dL/dmean, dL/dvar, mean, M) -> (c1, c2)       (was 4-5 per-channel ops; see conv_bn_stats)
        c2 = 2 dL/dvar / M,   c1 = dL/dmean / M - c2 * mean       (a missing gradient counts as zeros)
        with affine=: bn_scale_shift's backward folded in (conv_bn_train: one launch instead of two)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .bn_scale_shift import bn_affine_vjp
from .implicit_gemm import cdiv, device_guard, next_pow2


@triton.jit(do_not_specialize=["T", "C"])
def sum_partials_kernel(o0_ptr, o1_ptr, o2_ptr, part_ptr, T, C, ROWS: tl.constexpr, K: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s0 = tl.zeros((BLOCK_C,), tl.float32)
    s1 = tl.zeros((BLOCK_C,), tl.float32)
    s2 = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (offs_t < T)[:, None] & c_ok[None, :]
        base = part_ptr + offs_t[:, None] * (ROWS * C) + offs_c[None, :]
        s0 += tl.sum(tl.load(base, mask=mask, other=0.0), axis=0)
        if K > 1:
            s1 += tl.sum(tl.load(base + C, mask=mask, other=0.0), axis=0)
        if K > 2:
            s2 += tl.sum(tl.load(base + 2 * C, mask=mask, other=0.0), axis=0)
    tl.store(o0_ptr + offs_c, s0, mask=c_ok)
    if K > 1:
        tl.store(o1_ptr + offs_c, s1, mask=c_ok)
    if K > 2:
        tl.store(o2_ptr + offs_c, s2, mask=c_ok)


def sum_partials(part: torch.Tensor, k: Optional[int] = None):
    """The first k (default all) rows of part [T, R, C] (contiguous fp32) summed over T, as k separate fp32 [C]
    tensors."""
    t, rows, c = part.shape
    k = rows if k is None else k
    if not 1 <= k <= min(rows, 3) or not part.is_contiguous():
        raise ValueError(f"sum_partials: k must be 1..3 rows of a contiguous [T, R, C] tensor, got k={k} and "
                         f"{tuple(part.shape)}")
    outs = [torch.empty(c, dtype=torch.float32, device=part.device) for _ in range(k)]
    if c:
        block_c = max(16, min(64, next_pow2(c)))
        with device_guard(part):
            # three [BLOCK_T, BLOCK_C] tiles in flight at k = 3: 16 rows keep them in registers (32 spilled 8 bytes
            # at 64 channels: bench/kernel_report.py)
            sum_partials_kernel[(cdiv(c, block_c),)](outs[0], outs[min(1, k - 1)], outs[k - 1], part, t, c,
                                                     ROWS=rows, K=k, BLOCK_T=16 if k == 3 else 32, BLOCK_C=block_c)
    return outs


@triton.jit(do_not_specialize=["S"])
def wgrad_finish_kernel(dw_ptr, part_ptr, S, CO, CI, d_co, d_ci, d_h, d_w, KW: tl.constexpr, KHW: tl.constexpr,
                        BLOCK_CO: tl.constexpr, BLOCK_R: tl.constexpr):
    """dw[co, ci, kh, kw] = sum_s part[s, co, (kh * KW + kw) * CI + ci] (dw through its strides: the weight's
    layout); tile over (co, r = tap * CI + ci)."""
    offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ktot = KHW * CI
    mask = (offs_co < CO)[:, None] & (offs_r < ktot)[None, :]
    src = offs_co.to(tl.int64)[:, None] * ktot + offs_r[None, :]
    acc = tl.zeros((BLOCK_CO, BLOCK_R), tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * CO * ktot + src, mask=mask, other=0.0)
    tap = offs_r // CI
    ci = offs_r - tap * CI
    dst = offs_co.to(tl.int64)[:, None] * d_co + (ci * d_ci + (tap // KW) * d_h + (tap % KW) * d_w)[None, :]
    tl.store(dw_ptr + dst, acc.to(dw_ptr.dtype.element_ty), mask=mask)


def wgrad_finish(part: torch.Tensor, kh: int, kw: int, cin: int, dtype, like=None) -> torch.Tensor:
    """The weight gradient [C_out, C_in, kh, kw] in ``dtype`` from the split partials [S, C_out, kh*kw*C_in], laid
    out like the weight ``like`` (so that autograd accumulates it into .grad without a copy), else contiguous."""
    s, cout, ktot = part.shape
    if ktot != kh * kw * cin:
        raise ValueError(f"wgrad_finish: partials {tuple(part.shape)} do not hold {kh}x{kw}x{cin} columns")
    if like is not None and tuple(like.shape) == (cout, cin, kh, kw):
        dw = torch.empty_like(like, dtype=dtype)
    else:
        dw = torch.empty((cout, cin, kh, kw), dtype=dtype, device=part.device)
    if dw.numel():
        bco, br = max(16, min(32, next_pow2(cout))), 64
        with device_guard(part):
            wgrad_finish_kernel[(cdiv(cout, bco), cdiv(ktot, br))](dw, part.contiguous(), s, cout, cin, *dw.stride(),
                                                                   KW=kw, KHW=kh * kw, BLOCK_CO=bco, BLOCK_R=br)
    return dw


@triton.jit(do_not_specialize=["C", "INV_M", "EPS"])
def bn_grad_coeffs_kernel(c1_ptr, c2_ptr, gw_ptr, gb_ptr, gm_ptr, gv_ptr, mean_ptr, C, INV_M,
                          gs_ptr, gt_ptr, var_ptr, w_ptr, EPS,
                          HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, AFFINE: tl.constexpr, HAS_W: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    gv = tl.zeros((BLOCK_C,), tl.float32)
    gm = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_GV:
        gv = tl.load(gv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_GM:
        gm = tl.load(gm_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if AFFINE:  # bn_scale_shift's backward (its formulas, in its order), its mean/var gradients added to gm, gv
        var = tl.load(var_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gs = tl.load(gs_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gt = tl.load(gt_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gm_affine, gv_affine, gw, gb = bn_affine_vjp(gs, gt, mean, var, w_ptr, offs, ok, EPS, HAS_W)
        gm += gm_affine
        gv += gv_affine
        if HAS_W:
            tl.store(gw_ptr + offs, gw.to(gw_ptr.dtype.element_ty), mask=ok)
        tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=ok)
    c2 = 2.0 * INV_M * gv
    c1 = INV_M * gm - c2 * mean
    tl.store(c1_ptr + offs, c1, mask=ok)
    tl.store(c2_ptr + offs, c2, mask=ok)


def bn_grad_coeffs(grad_mean: Optional[torch.Tensor], grad_var: Optional[torch.Tensor], mean: torch.Tensor,
                   m: int, affine=None):
    """(c1, c2), fp32 [C]: dL/dy_total = dL/dy + c2 * y + c1 for statistics over m values per channel.

    ``affine=(grad_scale, grad_shift, var, weight, eps, param_dtype)``: the statistics also fed BatchNorm's
    (scale, shift) = (weight / sqrt(var + eps), bias - mean * scale) (conv_bn_train); their gradients join dL/dmean
    and dL/dvar in the same launch, which then also returns (dL/dweight (empty without a weight), dL/dbias):
    (c1, c2, gw, gb)."""
    c = mean.shape[0]
    c1 = torch.empty(c, dtype=torch.float32, device=mean.device)
    c2 = torch.empty_like(c1)
    if affine is not None:
        gs, gt, var, weight, eps, pdt = affine
        gw = torch.empty(c if weight is not None else 0, dtype=pdt, device=mean.device)
        gb = torch.empty(c, dtype=pdt, device=mean.device)
    if c:
        block = max(16, min(1024, next_pow2(c)))
        if affine is not None:
            extra = (gs.contiguous(), gt.contiguous(), var.contiguous(),
                     weight.contiguous() if weight is not None else c1, float(eps))
            outs = (gw if weight is not None else c1, gb)
        else:
            extra, outs = (c1, c1, c1, c1, 0.0), (c1, c1)
        with device_guard(mean):
            bn_grad_coeffs_kernel[(cdiv(c, block),)](
                c1, c2, *outs, grad_mean if grad_mean is not None else c1,
                grad_var if grad_var is not None else c1, mean, c, 1.0 / m, *extra,
                HAS_GM=grad_mean is not None, HAS_GV=grad_var is not None, AFFINE=affine is not None,
                HAS_W=affine is not None and weight is not None, BLOCK_C=block)
    return (c1, c2) if affine is None else (c1, c2, gw, gb)
