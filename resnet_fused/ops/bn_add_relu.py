"""bn_add_relu: the end of a training-mode residual block in one pass over the activation.

Forward (per channel c, scale = gamma * invstd, shift = beta - mean * scale computed by the caller, so that
autograd carries their gradients back to gamma, beta and the batch statistics):
    out = relu(y * scale[c] + shift[c] + shortcut)
    shortcut = 0                                             mode 0 (plain nets, the stem)
             = r                                             mode 1 (identity)
             = r[n, c - pad_front, h * s, w * s] or 0       mode 2 (option A: subsample + zero channel padding,
                                                                     by index math; nothing materialised)
             = r * res_scale[c] + res_shift[c]               mode 3 (option B: r is the projection conv's output,
                                                                     normalised by its own BatchNorm here)
Saved for backward: out (its sign is the ReLU mask), y, r.

Backward, g = dL/dout * [out > 0]:
    dL/dy = g * scale,  dL/dscale = sum g*y,  dL/dshift = sum g
    mode 1: dL/dr = g;  mode 2: dL/dr[n, c, h*s, w*s] = g[n, c + pad_front, h, w], zero elsewhere (the kernel
            writes the s x s block of dL/dr under each output position: every element once, no zero-fill launch)
    mode 3: dL/dr = g * res_scale,  dL/dres_scale = sum g*r,  dL/dres_shift = sum g
One kernel writes the elementwise gradients and per-tile fp32 partial sums; the last tile of each channel block
to finish sums the partials in tile order (deterministic, no float atomics) in the same launch.
Index math: 32-bit when every element offset of every operand fits (checked by the launcher: ``index64``), so the
row -> (n, h, w) divisions and the address products are 32-bit; 64-bit otherwise (INDEX64, tested by lowering the
limit).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager import custom_op, ops, register_autograd
from .launch import cdiv, device_guard, empty_nhwc, index64, next_pow2, nhwc_strides
from .semaphores import semaphores
from .tl_helpers import last_to_finish, relu, tile_sums


@triton.jit
def _tile_coords(P, C, H, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    """Rows (image, h, w) and channels of this program's [BLOCK_P, BLOCK_C] tile of the NHWC activation; 64-bit
    indices only when INDEX64 (an operand with element offsets past 2**31 - 1)."""
    if INDEX64:
        offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    else:
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_p < P)[:, None] & c_ok[None, :]
    hw = H * W
    n = offs_p // hw
    rem = offs_p - n * hw
    h = rem // W
    w = rem - h * W
    if INDEX64:
        c_idx = offs_c.to(tl.int64)[None, :]
    else:
        c_idx = offs_c[None, :]
    return offs_p, offs_c, c_ok, mask, n, h, w, c_idx


@triton.jit
def _load_tile(ptr, n, h, w, c64, s_n, s_h, s_w, s_c, mask):
    return tl.load(ptr + n[:, None] * s_n + h[:, None] * s_h + w[:, None] * s_w + c64 * s_c, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def bn_add_relu_fwd_kernel(out_ptr,                                 # [P, C] rows of NHWC output
                           y_ptr, scale_ptr, shift_ptr,             # conv output and its BN scale/shift
                           r_ptr, rs_ptr, rt_ptr,                   # shortcut source (+ its BN for mode 3)
                           P, C, H, W, RC,                          # rows, channels, out spatial, r channels
                           y_n, y_h, y_w, y_c, r_n, r_h, r_w, r_c, PAD_FRONT,
                           MODE: tl.constexpr, RES_STRIDE: tl.constexpr, RELU: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    offs_p, offs_c, c_ok, mask, n, h, w, c64 = _tile_coords(P, C, H, W, BLOCK_P, BLOCK_C, INDEX64)
    y = _load_tile(y_ptr, n, h, w, c64, y_n, y_h, y_w, y_c, mask)
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    v = y * scale[None, :] + shift[None, :]
    if MODE == 1:
        v += tl.load(r_ptr + n[:, None] * r_n + h[:, None] * r_h + w[:, None] * r_w + c64 * r_c, mask=mask,
                     other=0.0).to(tl.float32)
    elif MODE == 2:
        rc = offs_c - PAD_FRONT
        rmask = mask & ((rc >= 0) & (rc < RC))[None, :]
        rc_idx = rc.to(tl.int64) if INDEX64 else rc
        v += tl.load(r_ptr + n[:, None] * r_n + (h * RES_STRIDE)[:, None] * r_h + (w * RES_STRIDE)[:, None] * r_w
                     + rc_idx[None, :] * r_c, mask=rmask, other=0.0).to(tl.float32)
    elif MODE == 3:
        r = tl.load(r_ptr + n[:, None] * r_n + h[:, None] * r_h + w[:, None] * r_w + c64 * r_c, mask=mask,
                    other=0.0).to(tl.float32)
        rs = tl.load(rs_ptr + offs_c, mask=c_ok, other=0.0)
        rt = tl.load(rt_ptr + offs_c, mask=c_ok, other=0.0)
        v += r * rs[None, :] + rt[None, :]
    if RELU:
        v = relu(v)
    tl.store(out_ptr + offs_p[:, None] * C + offs_c[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_add_relu_bwd_kernel(gy_ptr, gr_ptr, part_ptr,               # dL/dy, dL/d(shortcut) [P, C]; fp32 [T, 3, C]
                           gs_ptr, gt_ptr, grs_ptr, grt_ptr,       # fp32 [C]: dL/dscale, dshift, dres_scale, dres_shift
                           cnt_ptr,                                # int32 counters (last_to_finish)
                           go_ptr, out_ptr, y_ptr, scale_ptr,      # dL/dout, out (mask), y, scale
                           r_ptr, rs_ptr,                          # projection output and its scale (mode 3)
                           P, C, H, W,
                           g_n, g_h, g_w, g_c, o_n, o_h, o_w, o_c, y_n, y_h, y_w, y_c, r_n, r_h, r_w, r_c,
                           RC, RH, RW, e_n, e_h, e_w, e_c, PAD_FRONT,  # mode 2: the block input's size, dL/dr strides
                           MODE: tl.constexpr, RELU: tl.constexpr, RES_STRIDE: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    if INDEX64:
        pid_p = tl.program_id(0).to(tl.int64)
    else:
        pid_p = tl.program_id(0)
    offs_p, offs_c, c_ok, mask, n, h, w, c64 = _tile_coords(P, C, H, W, BLOCK_P, BLOCK_C, INDEX64)
    go = _load_tile(go_ptr, n, h, w, c64, g_n, g_h, g_w, g_c, mask)
    if RELU:
        o = tl.load(out_ptr + n[:, None] * o_n + h[:, None] * o_h + w[:, None] * o_w + c64 * o_c, mask=mask,
                    other=0.0).to(tl.float32)
        go = tl.where(o <= 0, 0.0, go)  # torch's threshold_backward: a NaN output passes its gradient
    g = tl.where(mask, go, 0.0)
    y = tl.load(y_ptr + n[:, None] * y_n + h[:, None] * y_h + w[:, None] * y_w + c64 * y_c, mask=mask,
                other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    rows = offs_p[:, None] * C + offs_c[None, :]
    tl.store(gy_ptr + rows, (g * scale[None, :]).to(gy_ptr.dtype.element_ty), mask=mask)
    base = part_ptr + pid_p * 3 * C + offs_c
    tl.store(base, tl.sum(g * y, axis=0), mask=c_ok)
    tl.store(base + C, tl.sum(g, axis=0), mask=c_ok)
    if MODE == 1:
        tl.store(gr_ptr + rows, g.to(gr_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:  # every element of dL/dr written once: g on the strided positions, zeros between them
        rc = offs_c - PAD_FRONT
        rc_ok = c_ok & (rc >= 0) & (rc < RC)
        if INDEX64:
            rc_idx = rc.to(tl.int64)[None, :]
        else:
            rc_idx = rc[None, :]
        gv = g.to(gr_ptr.dtype.element_ty)
        hs = h * RES_STRIDE
        ws = w * RES_STRIDE
        base = gr_ptr + (n * e_n + hs * e_h + ws * e_w)[:, None] + rc_idx * e_c  # one address, then offsets
        p_ok = offs_p < P
        for i in tl.static_range(RES_STRIDE):
            for j in tl.static_range(RES_STRIDE):
                rmask = (p_ok & (hs + i < RH) & (ws + j < RW))[:, None] & rc_ok[None, :]
                if i + j == 0:
                    val = gv
                else:
                    val = tl.zeros_like(gv)
                tl.store(base + (i * e_h + j * e_w), val, mask=rmask)
    elif MODE == 3:
        r = tl.load(r_ptr + n[:, None] * r_n + h[:, None] * r_h + w[:, None] * r_w + c64 * r_c, mask=mask,
                    other=0.0).to(tl.float32)
        rs = tl.load(rs_ptr + offs_c, mask=c_ok, other=0.0)
        tl.store(gr_ptr + rows, (g * rs[None, :]).to(gr_ptr.dtype.element_ty), mask=mask)
        tl.store(base + 2 * C, tl.sum(g * r, axis=0), mask=c_ok)
    if last_to_finish(cnt_ptr + tl.program_id(1), tl.num_programs(0)):  # the channel sums, tiles in order
        s_gy, s_g, s_gr = tile_sums(part_ptr, C, tl.num_programs(0), offs_c, c_ok, 3, 3 if MODE == 3 else 2,
                                    2048 // BLOCK_C)
        tl.store(gs_ptr + offs_c, s_gy, mask=c_ok)
        tl.store(gt_ptr + offs_c, s_g, mask=c_ok)
        if MODE == 3:
            tl.store(grs_ptr + offs_c, s_gr, mask=c_ok)
            tl.store(grt_ptr + offs_c, s_g, mask=c_ok)


def _blocks(c):
    block_c = max(16, min(64, next_pow2(c)))
    return max(16, 4096 // block_c), block_c


def bn_add_relu_forward(y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front, relu):
    nb, c, h, w = y.shape
    out = empty_nhwc(nb, c, h, w, y.dtype, y.device)
    r = residual if residual is not None else y
    p = nb * h * w
    bp, bc = _blocks(c)
    with device_guard(y):
        bn_add_relu_fwd_kernel[(cdiv(p, bp), cdiv(c, bc))](
            out, y, scale, shift, r, res_scale if res_scale is not None else scale,
            res_shift if res_shift is not None else shift, p, c, h, w, r.shape[1],
            *nhwc_strides(y), *nhwc_strides(r), pad_front,
            MODE=mode, RES_STRIDE=res_stride, RELU=relu, BLOCK_P=bp, BLOCK_C=bc, INDEX64=index64(out, y, r))
    return out


def bn_add_relu_backward_impl(grad_out, out, y, scale, residual, res_scale, mode, res_stride, pad_front, relu):
    nb, c, h, w = y.shape
    p = nb * h * w
    bp, bc = _blocks(c)
    if mode == 2:  # res_stride**2 stores per element: fewer rows per tile keep the registers in check (sm_90 report)
        bp = max(16, bp // res_stride ** 2)
    tiles = cdiv(p, bp)
    gy = empty_nhwc(nb, c, h, w, y.dtype, y.device)
    if mode == 2:  # option A: the gradient of the (wider, strided-from) block input itself
        gr = empty_nhwc(*residual.shape, residual.dtype, y.device)
    else:
        gr = empty_nhwc(nb, c, h, w, residual.dtype, y.device) if mode else gy
    rc, rh, rw = residual.shape[1:] if mode == 2 else (0, 0, 0)
    part = torch.empty((tiles, 3, c), dtype=torch.float32, device=y.device)
    r = residual if mode == 3 else y
    # [sum g*y, sum g (, sum g*r, sum g)]: separate tensors (outputs may not alias), each written by the kernel
    sums = [torch.empty(c if mode == 3 or i < 2 else 0, dtype=torch.float32, device=y.device) for i in range(4)]
    grid = (tiles, cdiv(c, bc))
    with device_guard(y):
        bn_add_relu_bwd_kernel[grid](
            gy, gr, part, *sums, semaphores(y.device, grid[1]), grad_out, out, y, scale, r,
            res_scale if res_scale is not None else scale,
            p, c, h, w, *nhwc_strides(grad_out), *nhwc_strides(out), *nhwc_strides(y), *nhwc_strides(r),
            rc, rh, rw, *nhwc_strides(gr), pad_front,
            MODE=mode, RELU=relu, RES_STRIDE=res_stride if mode == 2 else 1, BLOCK_P=bp, BLOCK_C=bc,
            INDEX64=index64(gy, gr, part, grad_out, out, y, r))
    g_res = gr if mode else y.new_empty((0,), dtype=torch.float32)
    return gy, sums[0], sums[1], g_res, sums[2], sums[3]


# ---- op registration ---------------------------------------------------------------------------------------

@custom_op("resnet_fused::bn_add_relu", mutates_args=())
def bn_add_relu(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], res_scale: Optional[Tensor],
                res_shift: Optional[Tensor], mode: int, res_stride: int, pad_front: int, relu: bool) -> Tensor:
    """relu(y*scale + shift + shortcut) with the shortcut by ``mode`` (0 none, 1 identity, 2 option A, 3 B)."""
    return bn_add_relu_forward(y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front, relu)


@bn_add_relu.register_fake
def _(y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front, relu):
    return empty_nhwc(*y.shape, y.dtype, y.device)


@custom_op("resnet_fused::bn_add_relu_backward", mutates_args=())
def bn_add_relu_backward(grad_out: Tensor, out: Tensor, y: Tensor, scale: Tensor, residual: Optional[Tensor],
                         res_scale: Optional[Tensor], mode: int, res_stride: int, pad_front: int,
                         relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dy, dscale, dshift, dresidual, dres_scale, dres_shift); empty tensors where the mode has none."""
    return bn_add_relu_backward_impl(grad_out, out, y, scale, residual, res_scale, mode, res_stride, pad_front,
                                     relu)


@bn_add_relu_backward.register_fake
def _(grad_out, out, y, scale, residual, res_scale, mode, res_stride, pad_front, relu):
    c = y.shape[1]
    vec = [y.new_empty((c if mode == 3 or i < 2 else 0,), dtype=torch.float32) for i in range(4)]
    g_res = empty_nhwc(*residual.shape, residual.dtype, y.device) if mode else y.new_empty((0,), dtype=torch.float32)
    return empty_nhwc(*y.shape, y.dtype, y.device), vec[0], vec[1], g_res, vec[2], vec[3]


def _setup_context(ctx, inputs, output):
    y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front, relu = inputs
    ctx.save_for_backward(output, y, scale, residual, res_scale)
    ctx.mode, ctx.res_stride, ctx.pad_front, ctx.relu = mode, res_stride, pad_front, relu


def _backward(ctx, grad_out):
    out, y, scale, residual, res_scale = ctx.saved_tensors
    gy, gs, gt, gr, grs, grt = ops.bn_add_relu_backward(
        grad_out, out, y, scale, residual, res_scale, mode=ctx.mode, res_stride=ctx.res_stride,
        pad_front=ctx.pad_front, relu=ctx.relu)
    m = ctx.mode
    return (gy, gs, gt, gr if m else None, grs if m == 3 else None, grt if m == 3 else None, None, None, None,
            None)


register_autograd(bn_add_relu, _backward, setup_context=_setup_context)
