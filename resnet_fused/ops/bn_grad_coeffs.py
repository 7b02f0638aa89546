"""bn_grad_coeffs: the per-channel coefficients of BatchNorm's input gradient, in one launch (was 4-5 tiny ATen
ops, one GPU kernel each):

    c2 = 2 dL/dvar / M,   c1 = dL/dmean / M - c2 * mean       (a missing gradient counts as zeros)
    so that dL/dy_total = dL/dy + c2 * y + c1 (see conv_bn_stats), applied on load by the conv kernels.
With affine= bn_scale_shift's backward is folded in (conv_bn_train: one launch instead of two).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .bn_affine import bn_affine_vjp
from .implicit_gemm import cdiv, device_guard, next_pow2


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
