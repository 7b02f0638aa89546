"""bn_scale_shift: BatchNorm's per-channel affine from the batch statistics, in one launch (and one for its VJP).

Forward, per channel (fp32):
    invstd = 1 / sqrt(var + eps)
    scale  = weight * invstd                 (invstd when there is no weight)
    shift  = bias - mean * scale             (- mean * scale when there is no bias)
FusedResNet's training path feeds (scale, shift) to the next kernel's prologue or to bn_add_relu. Written as
PyTorch ops this is five tiny kernels forward and about ten in autograd's backward per BatchNorm; here it is one
launch each way. Saved for backward: mean, var, weight.

Backward, from (dL/dscale, dL/dshift) (either may be absent: zeros):
    dL/dbias   = dL/dshift
    dL/dmean   = -scale * dL/dshift
    g          = dL/dscale - mean * dL/dshift            (the total derivative through scale)
    dL/dweight = g * invstd
    dL/dvar    = -0.5 * g * weight * invstd^3
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager import custom_op, ops, register_autograd
from .bn_formulas import bn_affine, bn_affine_vjp
from .launch import cdiv, device_guard, next_pow2


@triton.jit(do_not_specialize=["C", "EPS"])
def bn_scale_shift_fwd_kernel(scale_ptr, shift_ptr,        # out: fp32 [C]
                              mean_ptr, var_ptr, w_ptr, b_ptr, C, EPS,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    scale, shift = bn_affine(mean, var, w_ptr, b_ptr, offs, ok, EPS, HAS_W, HAS_B)
    tl.store(scale_ptr + offs, scale, mask=ok)
    tl.store(shift_ptr + offs, shift, mask=ok)


@triton.jit(do_not_specialize=["C", "EPS"])
def bn_scale_shift_bwd_kernel(gmean_ptr, gvar_ptr, gw_ptr, gb_ptr,   # out: [C] each (gw, gb in the param dtype)
                              gs_ptr, gt_ptr, mean_ptr, var_ptr, w_ptr, C, EPS,
                              HAS_GS: tl.constexpr, HAS_GT: tl.constexpr, HAS_W: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gs = tl.zeros((BLOCK_C,), tl.float32)
    gt = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_GS:
        gs = tl.load(gs_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_GT:
        gt = tl.load(gt_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gmean, gvar, gw, gb = bn_affine_vjp(gs, gt, mean, var, w_ptr, offs, ok, EPS, HAS_W)
    tl.store(gmean_ptr + offs, gmean, mask=ok)
    tl.store(gvar_ptr + offs, gvar, mask=ok)
    if HAS_W:
        tl.store(gw_ptr + offs, gw.to(gw_ptr.dtype.element_ty), mask=ok)
    tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=ok)


def _block(c):
    return max(16, min(1024, next_pow2(c)))


def _check(mean, var, weight, bias):
    c = mean.shape[0]
    for name, t in (("var", var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != mean.device):
            raise ValueError(f"bn_scale_shift: {name} must be a [{c}] tensor on {mean.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


@custom_op("resnet_fused::bn_scale_shift", mutates_args=())
def bn_scale_shift(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) = (weight / sqrt(var + eps), bias - mean * scale), fp32."""
    _check(mean, var, weight, bias)
    c = mean.shape[0]
    scale = torch.empty(c, dtype=torch.float32, device=mean.device)
    shift = torch.empty_like(scale)
    if c:
        bc = _block(c)
        with device_guard(mean):
            bn_scale_shift_fwd_kernel[(cdiv(c, bc),)](
                scale, shift, mean.contiguous(), var.contiguous(),
                weight.contiguous() if weight is not None else scale,
                bias.contiguous() if bias is not None else scale, c, float(eps),
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=bc)
    return scale, shift


@bn_scale_shift.register_fake
def _(mean, var, weight, bias, eps):
    _check(mean, var, weight, bias)
    scale = mean.new_empty(mean.shape, dtype=torch.float32)
    return scale, torch.empty_like(scale)


@custom_op("resnet_fused::bn_scale_shift_backward", mutates_args=())
def bn_scale_shift_backward(grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], mean: Tensor, var: Tensor,
                            weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d mean, d var, d weight, d bias); d weight is empty when there is no weight."""
    c = mean.shape[0]
    gmean = torch.empty(c, dtype=torch.float32, device=mean.device)
    gvar = torch.empty_like(gmean)
    pdt = weight.dtype if weight is not None else torch.float32
    gw = torch.empty(c if weight is not None else 0, dtype=pdt, device=mean.device)
    gb = torch.empty(c, dtype=pdt, device=mean.device)
    if c:
        bc = _block(c)
        with device_guard(mean):
            bn_scale_shift_bwd_kernel[(cdiv(c, bc),)](
                gmean, gvar, gw if weight is not None else gmean, gb,
                grad_scale.contiguous() if grad_scale is not None else gmean,
                grad_shift.contiguous() if grad_shift is not None else gmean,
                mean.contiguous(), var.contiguous(), weight.contiguous() if weight is not None else gmean,
                c, float(eps), HAS_GS=grad_scale is not None, HAS_GT=grad_shift is not None,
                HAS_W=weight is not None, BLOCK_C=bc)
    return gmean, gvar, gw, gb


@bn_scale_shift_backward.register_fake
def _(grad_scale, grad_shift, mean, var, weight, eps):
    c = mean.shape[0]
    pdt = weight.dtype if weight is not None else torch.float32
    gmean = mean.new_empty((c,), dtype=torch.float32)
    return (gmean, torch.empty_like(gmean), mean.new_empty((c if weight is not None else 0,), dtype=pdt),
            mean.new_empty((c,), dtype=pdt))


def _setup_context(ctx, inputs, output):
    mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(mean, var, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward(ctx, grad_scale, grad_shift):
    mean, var, weight = ctx.saved_tensors
    gmean, gvar, gw, gb = ops.bn_scale_shift_backward(grad_scale, grad_shift, mean, var, weight,
                                                                        eps=ctx.eps)
    need = ctx.needs_input_grad
    return (gmean if need[0] else None, gvar if need[1] else None, gw if weight is not None and need[2] else None,
            gb if ctx.has_bias and need[3] else None, None)


register_autograd(bn_scale_shift, _backward, setup_context=_setup_context)
