"""conv_bn_stats: a convolution (with the previous BatchNorm + ReLU applied to its input on load) whose epilogue
also produces the BatchNorm batch statistics of its output. The training-mode conv of FusedResNet.

Forward, for input x (NHWC), weight W and optional per-channel (scale, shift) of the previous layer's BN:
    a    = relu(x * scale + shift)      if scale is given, else x        (on load: never written)
    y    = conv2d(a, W, stride, padding)                                 (implicit GEMM, fp32 accumulation)
    mean = mean_{n,h,w} y,   var = mean_{n,h,w} (y - mean)^2             (biased; what BN normalises with)
The epilogue writes y and, per output tile, the channel mean and M2 of its rows; the last tile of the launch to
finish combines the tiles with Chan's parallel formula (fixed order, fp32: deterministic and free of the
E[y^2]-E[y]^2 cancellation), in the same launch. Saved for backward: x, W, scale, shift, y, mean.

Backward. The consumer of (y, mean, var) (the next conv's prologue or bn_add_relu) returns dL/dy, dL/dmean and
dL/dvar; with M = N*H*W rows,
    dy_total = dL/dy + dL/dmean / M + dL/dvar * 2 (y - mean) / M = dL/dy + c2 * y + c1,
    c2 = 2 dL/dvar / M,   c1 = dL/dmean / M - c2 * mean
which is the whole BatchNorm backward once autograd has pushed the consumer's gradients through
mean/var -> invstd -> scale/shift. dy_total is never materialised: it is the A-operand prologue (PRO 2) of
    dA = conv_transpose(dy_total, W)     (input gradient, implicit GEMM with the transposed gather)
    dW = dy_total^T @ im2col(a)          (weight gradient, split over rows, fp32 partials)
and when the input went through relu(x*scale+shift), the input-gradient's epilogue applies the ReLU mask and
returns dL/dx = g * scale and the sums of g*x and g, i.e. dL/dscale and dL/dshift (STATS 2, finished in-launch).

conv_bn_stats_proj: the last conv of an option-B block and its 1x1 projection shortcut in one launch. Each output
tile runs both implicit GEMMs (the 3x3 conv of relu(h*scale+shift), and the 1x1 stride-s conv of the block input x)
into two accumulators and writes both outputs with their tile statistics (DUAL 2 in implicit_gemm.py):
    y  = conv2d(relu(h*scale + shift), W),  (mean, var) of y
    ys = conv2d(x, Ws, stride=s),           (mean_s, var_s) of ys
Its backward is the two conv_bn_stats backwards (the branches share no operand).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .eager import custom_op, ops, register_autograd
from .implicit_gemm import conv_launch, conv_out_hw, wgrad_launch
from .launch import empty_nhwc
from .bn_grad_coeffs import GradCoeffs, launch_grad_coeffs


# ---- launchers ---------------------------------------------------------------------------------------------

def conv_bn_stats_forward(x, weight, in_scale, in_shift, stride, padding, affine=None):
    """(y, mean, var), and with ``affine=(bn_weight, bn_bias, eps)`` BatchNorm's (scale, shift) after them."""
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], kh, stride, padding)
    pro = 1 if in_scale is not None else 0
    y, st = conv_launch(x, weight, kh, kw, stride, padding, (oh, ow), pro=pro, pa=in_scale, pb=in_shift, stats=1,
                        affine=affine, out_dtype=x.dtype)
    return (y, *st)


def conv_bn_stats_proj_forward(h, weight, in_scale, in_shift, x, proj_weight, proj_stride):
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = conv_out_hw(h.shape[2], h.shape[3], kh, 1, kh // 2)
    ohs, ows = conv_out_hw(x.shape[2], x.shape[3], 1, proj_stride, 0)
    if (oh, ow) != (ohs, ows) or weight.shape[0] != proj_weight.shape[0] or h.shape[0] != x.shape[0]:
        raise ValueError(f"conv_bn_stats_proj: the conv of {tuple(h.shape)} by {tuple(weight.shape)} and the "
                         f"projection of {tuple(x.shape)} by {tuple(proj_weight.shape)} (stride {proj_stride}) "
                         f"must give outputs of one shape")
    (y, ys), st = conv_launch(h, weight, kh, kw, 1, kh // 2, (oh, ow), pro=1, pa=in_scale, pb=in_shift, x2=x,
                              w2=proj_weight, stride2=proj_stride, dual_out=True, stats=1, out_dtype=h.dtype)
    return y, st.mean, st.var, ys, st.mean_proj, st.var_proj


def conv_bn_stats_backward_impl(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride,
                                padding, need_x, need_w, affine=None):
    """(grad_x, grad_weight, grad_in_scale, grad_in_shift); with ``affine=(grad_scale, grad_shift, var, bn_weight,
    eps, param_dtype)`` (conv_bn_train) also (grad_bn_weight, grad_bn_bias). Two launches: the weight gradient
    (which computes BatchNorm's gradient coefficients and writes them out), then the input gradient."""
    kh, kw = weight.shape[2], weight.shape[3]
    m = y.shape[0] * y.shape[2] * y.shape[3]
    f32 = dict(dtype=torch.float32, device=y.device)
    co = GradCoeffs(grad_mean, grad_var, mean, m, affine)
    gx = gs = gt = gw = None
    if need_w and weight.numel() and m:  # first: it computes the coefficients, writes them for the input gradient
        gw = wgrad_launch(grad_y, x, kh, kw, stride, padding, y=y, coeffs=co, xs=in_scale, xt=in_shift,
                          dtype=weight.dtype, like=weight)
    else:
        launch_grad_coeffs(co)
    c1, c2, *bn_grads = co.outputs()
    if need_x:
        stats = 2 if in_scale is not None else 0
        gx, grads = conv_launch(grad_y, weight, kh, kw, stride, padding, (x.shape[2], x.shape[3]), transposed=True,
                               pro=2, a2=y, pa=c1, pb=c2, stats=stats, ex=x, es=in_scale, et=in_shift,
                               out_dtype=x.dtype)
        if stats:
            gs, gt = grads.d_scale, grads.d_shift
    # what was not asked for: empty, distinct tensors (op outputs may not alias)
    gx, gw, gs, gt = (torch.empty(0, **f32) if g is None else g for g in (gx, gw, gs, gt))
    return (gx, gw, gs, gt, *bn_grads)


# ---- op registration ---------------------------------------------------------------------------------------

@custom_op("resnet_fused::conv_bn_stats", mutates_args=())
def conv_bn_stats(x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                  stride: int, padding: int) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = conv2d(relu(x*in_scale+in_shift) or x, weight); biased batch mean/var of y (fp32)."""
    return conv_bn_stats_forward(x, weight, in_scale, in_shift, stride, padding)


@conv_bn_stats.register_fake
def _(x, weight, in_scale, in_shift, stride, padding):
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], weight.shape[2], stride, padding)
    y = empty_nhwc(x.shape[0], weight.shape[0], oh, ow, x.dtype, x.device)
    mean = x.new_empty((weight.shape[0],), dtype=torch.float32)
    return y, mean, torch.empty_like(mean)


@custom_op("resnet_fused::conv_bn_stats_backward", mutates_args=())
def conv_bn_stats_backward(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                           weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor], y: Tensor,
                           mean: Tensor, stride: int, padding: int, need_x: bool,
                           need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_in_scale, grad_in_shift); empty tensors for what was not asked for."""
    return conv_bn_stats_backward_impl(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean,
                                       stride, padding, need_x, need_w)


def _fake_conv_grads(grad_y, x, weight, in_scale, need_x, need_w):
    def empty():
        return grad_y.new_empty((0,), dtype=torch.float32)
    gx = empty_nhwc(*x.shape, x.dtype, x.device) if need_x else empty()
    gw = torch.empty_like(weight) if need_w else empty()  # the weight's layout (wgrad_launch's like=)
    has = in_scale is not None and need_x
    gs = x.new_empty((x.shape[1],), dtype=torch.float32) if has else empty()
    gt = x.new_empty((x.shape[1],), dtype=torch.float32) if has else empty()
    return gx, gw, gs, gt


@conv_bn_stats_backward.register_fake
def _(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride, padding, need_x, need_w):
    return _fake_conv_grads(grad_y, x, weight, in_scale, need_x, need_w)


def _setup_context(ctx, inputs, output):
    x, weight, in_scale, in_shift, stride, padding = inputs
    y, mean, _ = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, y, mean)
    ctx.stride, ctx.padding = stride, padding


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0] or (in_scale is not None and any(ctx.needs_input_grad[2:4]))
    need_w = ctx.needs_input_grad[1]
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    gx, gw, gs, gt = ops.conv_bn_stats_backward(
        grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride=ctx.stride, padding=ctx.padding,
        need_x=need_x, need_w=need_w)
    return (gx if ctx.needs_input_grad[0] else None, gw if need_w else None,
            gs if in_scale is not None and ctx.needs_input_grad[2] else None,
            gt if in_shift is not None and ctx.needs_input_grad[3] else None, None, None)


register_autograd(conv_bn_stats, _backward, setup_context=_setup_context)


# ---- conv_bn_train: conv_bn_stats with BatchNorm's (scale, shift) from the statistics' finish ------------------
#
# The training conv of FusedResNet when the statistics need no collective (no sync_bn): bn_scale_shift's forward
# rides in the conv's statistics finish and its backward in bn_grad_coeffs_kernel, two launches fewer per BatchNorm
# and step. Same formulas, same order: the results equal conv_bn_stats followed by bn_scale_shift.

def _bn_param_dtype(bn_weight, bn_bias):
    return bn_weight.dtype if bn_weight is not None else bn_bias.dtype if bn_bias is not None else torch.float32


def _check_bn(weight, bn_weight, bn_bias):
    c = weight.shape[0]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if t is not None and (t.shape != (c,) or t.device != weight.device):
            raise ValueError(f"conv_bn_train: {name} must be a [{c}] tensor on {weight.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


@custom_op("resnet_fused::conv_bn_train", mutates_args=())
def conv_bn_train(x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float, stride: int,
                  padding: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, scale, shift): conv_bn_stats, and (scale, shift) = (bn_weight / sqrt(var + eps),
    bn_bias - mean * scale) in fp32 (bn_scale_shift's)."""
    _check_bn(weight, bn_weight, bn_bias)
    return conv_bn_stats_forward(x, weight, in_scale, in_shift, stride, padding, affine=(bn_weight, bn_bias, eps))


@conv_bn_train.register_fake
def _(x, weight, in_scale, in_shift, bn_weight, bn_bias, eps, stride, padding):
    _check_bn(weight, bn_weight, bn_bias)
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], weight.shape[2], stride, padding)
    y = empty_nhwc(x.shape[0], weight.shape[0], oh, ow, x.dtype, x.device)
    stat = x.new_empty((weight.shape[0],), dtype=torch.float32)
    return y, stat, torch.empty_like(stat), torch.empty_like(stat), torch.empty_like(stat)


@custom_op("resnet_fused::conv_bn_train_backward", mutates_args=())
def conv_bn_train_backward(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
                           grad_scale: Tensor, grad_shift: Tensor, x: Tensor, weight: Tensor,
                           in_scale: Optional[Tensor], in_shift: Optional[Tensor], y: Tensor, mean: Tensor,
                           var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                           stride: int, padding: int, need_x: bool,
                           need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_in_scale, grad_in_shift, grad_bn_weight, grad_bn_bias); empty tensors for what
    was not asked for (grad_bn_weight: when there is no bn_weight)."""
    return conv_bn_stats_backward_impl(
        grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride, padding, need_x, need_w,
        affine=(grad_scale, grad_shift, var, bn_weight, eps, _bn_param_dtype(bn_weight, bn_bias)))


@conv_bn_train_backward.register_fake
def _(grad_y, grad_mean, grad_var, grad_scale, grad_shift, x, weight, in_scale, in_shift, y, mean, var, bn_weight,
      bn_bias, eps, stride, padding, need_x, need_w):
    gx, gw, gs, gt = _fake_conv_grads(grad_y, x, weight, in_scale, need_x, need_w)
    pdt = _bn_param_dtype(bn_weight, bn_bias)
    c = weight.shape[0]
    return (gx, gw, gs, gt, mean.new_empty((c if bn_weight is not None else 0,), dtype=pdt),
            mean.new_empty((c,), dtype=pdt))


def _train_setup_context(ctx, inputs, output):
    x, weight, in_scale, in_shift, bn_weight, bn_bias, eps, stride, padding = inputs
    y, mean, var, _, _ = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, y, mean, var, bn_weight, bn_bias)
    ctx.stride, ctx.padding, ctx.eps = stride, padding, eps
    ctx.set_materialize_grads(False)  # mean/var feed only the (detached) running update: no zero-filled grads


def _train_backward(ctx, grad_y, grad_mean, grad_var, grad_scale, grad_shift):
    x, weight, in_scale, in_shift, y, mean, var, bn_weight, bn_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x = need[0] or (in_scale is not None and any(need[2:4]))
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_scale is None:
        grad_scale = torch.zeros_like(mean)
    if grad_shift is None:
        grad_shift = torch.zeros_like(mean)
    gx, gw, gs, gt, gbw, gbb = ops.conv_bn_train_backward(
        grad_y, grad_mean, grad_var, grad_scale, grad_shift, x, weight, in_scale, in_shift, y, mean, var,
        bn_weight, bn_bias, eps=ctx.eps, stride=ctx.stride, padding=ctx.padding, need_x=need_x, need_w=need[1])
    return (gx if need[0] else None, gw if need[1] else None,
            gs if in_scale is not None and need[2] else None, gt if in_shift is not None and need[3] else None,
            gbw if bn_weight is not None and need[4] else None, gbb if bn_bias is not None and need[5] else None,
            None, None, None)


register_autograd(conv_bn_train, _train_backward, setup_context=_train_setup_context)


@custom_op("resnet_fused::conv_bn_stats_proj", mutates_args=())
def conv_bn_stats_proj(h: Tensor, weight: Tensor, in_scale: Tensor, in_shift: Tensor, x: Tensor, proj_weight: Tensor,
                       proj_stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, ys, mean_s, var_s): y = conv2d(relu(h*in_scale+in_shift), weight, padding k//2) and the
    option-B projection ys = conv2d(x, proj_weight, stride=proj_stride), both with batch statistics, one launch."""
    return conv_bn_stats_proj_forward(h, weight, in_scale, in_shift, x, proj_weight, proj_stride)


@conv_bn_stats_proj.register_fake
def _(h, weight, in_scale, in_shift, x, proj_weight, proj_stride):
    oh, ow = conv_out_hw(h.shape[2], h.shape[3], weight.shape[2], 1, weight.shape[2] // 2)
    y = empty_nhwc(h.shape[0], weight.shape[0], oh, ow, h.dtype, h.device)
    stat = h.new_empty((weight.shape[0],), dtype=torch.float32)
    return y, stat, torch.empty_like(stat), torch.empty_like(y), torch.empty_like(stat), torch.empty_like(stat)


def _proj_setup_context(ctx, inputs, output):
    h, weight, in_scale, in_shift, x, proj_weight, proj_stride = inputs
    y, mean, _, ys, mean_s, _ = output
    ctx.save_for_backward(h, weight, in_scale, in_shift, y, mean, x, proj_weight, ys, mean_s)
    ctx.proj_stride = proj_stride


def _proj_backward(ctx, grad_y, grad_mean, grad_var, grad_ys, grad_mean_s, grad_var_s):
    h, weight, in_scale, in_shift, y, mean, x, proj_weight, ys, mean_s = ctx.saved_tensors
    need = ctx.needs_input_grad
    bwd = ops.conv_bn_stats_backward
    k = weight.shape[2]
    gh, gw, gs, gt = bwd(grad_y if grad_y is not None else torch.zeros_like(y), grad_mean, grad_var, h, weight,
                         in_scale, in_shift, y, mean, 1, k // 2, any(need[0:1] + need[2:4]), need[1])
    gx, gpw, _, _ = bwd(grad_ys if grad_ys is not None else torch.zeros_like(ys), grad_mean_s, grad_var_s, x,
                        proj_weight, None, None, ys, mean_s, ctx.proj_stride, 0, need[4], need[5])
    return (gh if need[0] else None, gw if need[1] else None, gs if need[2] else None, gt if need[3] else None,
            gx if need[4] else None, gpw if need[5] else None, None)


register_autograd(conv_bn_stats_proj, _proj_backward, setup_context=_proj_setup_context)
