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

from .implicit_gemm import conv_launch, empty_nhwc, weight_matrix


def _out_hw(x, weight, stride, padding):
    k = weight.shape[2]
    return (x.shape[2] + 2 * padding - k) // stride + 1, (x.shape[3] + 2 * padding - k) // stride + 1


@torch.library.custom_op("resnet_fused::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], x2: Optional[Tensor],
                weight2: Optional[Tensor], stride: int, padding: int, res_mode: int, res_stride: int,
                pad_front: int, relu: bool) -> Tensor:
    """relu(conv2d(x, weight) + bias + shortcut); res_mode 0 none, 1 identity, 2 option A; x2/weight2: option B."""
    kh, kw = weight.shape[2], weight.shape[3]
    out, _, _ = conv_launch(x, weight_matrix(weight), kh, kw, stride, padding, _out_hw(x, weight, stride, padding),
                         bias=bias, residual=residual, res_mode=res_mode, res_stride=res_stride,
                         pad_front=pad_front, x2=x2, w2_mat=weight_matrix(weight2) if weight2 is not None else None,
                         stride2=res_stride, relu=relu, out_dtype=x.dtype)
    return out


@conv_bn_act.register_fake
def _(x, weight, bias, residual, x2, weight2, stride, padding, res_mode, res_stride, pad_front, relu):
    oh, ow = _out_hw(x, weight, stride, padding)
    return empty_nhwc(x.shape[0], weight.shape[0], oh, ow, x.dtype, x.device)
