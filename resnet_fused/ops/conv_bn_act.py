"""conv_bn_act: the inference-mode conv of FusedResNet, BatchNorm folded in, shortcut and ReLU in the epilogue.

With BN folded by the caller (W' = W * s[co], b = beta - running_mean * s, s = gamma / sqrt(running_var + eps)):
    out = relu(conv2d(x, W') + b + shortcut)
    shortcut = 0 | x_res (identity) | x_res[n, c - pad_front, h*s, w*s] or 0 (option A, by index math)
             | conv1x1_s(x2, W2')  (option B: a second implicit GEMM accumulating into the same tile; its folded
                                    shift is added to b by the caller)
One kernel, one write of the output. No gradient: FusedResNet uses it only when no gradient is needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .eager import custom_op
from .implicit_gemm import conv_launch, conv_out_hw
from .launch import empty_nhwc


@custom_op("resnet_fused::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], x2: Optional[Tensor],
                weight2: Optional[Tensor], stride: int, padding: int, res_mode: int, res_stride: int,
                pad_front: int, relu: bool) -> Tensor:
    """relu(conv2d(x, weight) + bias + shortcut); res_mode (plan.ShortcutMode) 0 none, 1 identity (residual),
    2 option A (residual), 3 option B: conv2d(x2, weight2, stride=res_stride) as a second GEMM in the same tile."""
    if (res_mode == 3) != (x2 is not None and weight2 is not None):
        raise ValueError(f"conv_bn_act: option B (res_mode 3) takes x2 and weight2, and only it; got res_mode "
                         f"{res_mode} with x2 {'set' if x2 is not None else 'None'}")
    kh, kw = weight.shape[2], weight.shape[3]
    out_hw = conv_out_hw(x.shape[2], x.shape[3], kh, stride, padding)
    out, _ = conv_launch(x, weight, kh, kw, stride, padding, out_hw, bias=bias, residual=residual,
                         res_mode=0 if res_mode == 3 else res_mode, res_stride=res_stride, pad_front=pad_front,
                         x2=x2, w2=weight2, stride2=res_stride, relu=relu, out_dtype=x.dtype)
    return out


@conv_bn_act.register_fake
def _(x, weight, bias, residual, x2, weight2, stride, padding, res_mode, res_stride, pad_front, relu):
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], weight.shape[2], stride, padding)
    return empty_nhwc(x.shape[0], weight.shape[0], oh, ow, x.dtype, x.device)
