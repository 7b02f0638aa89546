"""bn_grad_coeffs: the per-channel coefficients of BatchNorm's input gradient, in one launch (was 4-5 tiny ATen
ops, one GPU kernel each):

    c2 = 2 dL/dvar / M,   c1 = dL/dmean / M - c2 * mean       (a missing gradient counts as zeros)
    so that dL/dy_total = dL/dy + c2 * y + c1 (see conv_bn_stats), applied on load by the conv kernels.
With affine= bn_scale_shift's backward is folded in (conv_bn_train: one launch instead of two). In the training
backward the weight-gradient kernel computes them itself and writes them for the input gradient (GradCoeffs): this
launch is then only needed when the conv weight takes no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .bn_formulas import bn_grad_coeffs_tile
from .launch import cdiv, device_guard, next_pow2


@triton.jit(do_not_specialize=["C", "INV_M", "EPS"])
def bn_grad_coeffs_kernel(c1_ptr, c2_ptr, gw_ptr, gb_ptr, gm_ptr, gv_ptr, mean_ptr, INV_M,
                          gs_ptr, gt_ptr, var_ptr, w_ptr, EPS, C,
                          HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, AFFINE: tl.constexpr, HAS_W: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    bn_grad_coeffs_tile(c1_ptr, c2_ptr, gw_ptr, gb_ptr, gm_ptr, gv_ptr, mean_ptr, INV_M, gs_ptr, gt_ptr, var_ptr,
                        w_ptr, EPS, offs, offs < C, True, HAS_GM, HAS_GV, AFFINE, HAS_W)


class GradCoeffs:
    """The operands of one BatchNorm's gradient coefficients, outputs allocated: launched on their own
    (bn_grad_coeffs) or computed inside the weight-gradient kernel, which writes them for the input gradient
    (implicit_gemm.wgrad_launch(coeffs=)). ``args`` follow bn_grad_coeffs_tile's pointer/scalar order."""

    def __init__(self, grad_mean, grad_var, mean, m, affine=None):
        c = mean.shape[0]
        self.c = c
        self.c1, self.c2 = torch.empty((2, c), dtype=torch.float32, device=mean.device)  # never op outputs
        c1 = self.c1
        self.gw = self.gb = None
        if affine is not None:
            gs, gt, var, weight, eps, pdt = affine
            self.gw = torch.empty(c if weight is not None else 0, dtype=pdt, device=mean.device)
            self.gb = torch.empty(c, dtype=pdt, device=mean.device)
            extra = (gs.contiguous(), gt.contiguous(), var.contiguous(),
                     weight.contiguous() if weight is not None else c1, float(eps))
            outs = (self.gw if weight is not None else c1, self.gb)
        else:
            weight = None
            extra, outs = (c1, c1, c1, c1, 0.0), (c1, c1)
        self.args = (c1, self.c2, *outs, grad_mean.contiguous() if grad_mean is not None else c1,
                     grad_var.contiguous() if grad_var is not None else c1, mean, 1.0 / m, *extra)
        self.flags = dict(HAS_GM=grad_mean is not None, HAS_GV=grad_var is not None, AFFINE=affine is not None,
                          HAS_W=affine is not None and weight is not None)

    def outputs(self):
        return (self.c1, self.c2) if self.gb is None else (self.c1, self.c2, self.gw, self.gb)


def launch_grad_coeffs(co: GradCoeffs):
    if co.c:
        block = max(16, min(1024, next_pow2(co.c)))
        with device_guard(co.c1):
            bn_grad_coeffs_kernel[(cdiv(co.c, block),)](*co.args, co.c, **co.flags, BLOCK_C=block)
    return co.outputs()


def bn_grad_coeffs(grad_mean: Optional[torch.Tensor], grad_var: Optional[torch.Tensor], mean: torch.Tensor,
                   m: int, affine=None):
    """(c1, c2), fp32 [C]: dL/dy_total = dL/dy + c2 * y + c1 for statistics over m values per channel.

    ``affine=(grad_scale, grad_shift, var, weight, eps, param_dtype)``: the statistics also fed BatchNorm's
    (scale, shift) = (weight / sqrt(var + eps), bias - mean * scale) (conv_bn_train); their gradients join dL/dmean
    and dL/dvar in the same launch, which then also returns (dL/dweight (empty without a weight), dL/dbias):
    (c1, c2, gw, gb)."""
    return launch_grad_coeffs(GradCoeffs(grad_mean, grad_var, mean, m, affine))
