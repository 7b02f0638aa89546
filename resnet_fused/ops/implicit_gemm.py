"""Implicit-GEMM convolution kernels shared by the fused conv ops, and their launchers (no op registration here;
the host helpers they share with the other ops are in launch.py, the @triton.jit ones in tl_helpers.py).

Activations are NHWC in memory (channels_last tensors, any strides accepted); a convolution is the GEMM
    out[m, n] = sum_k A[m, k] * B[k, n]
with m = (image, oh, ow) an output pixel, n an output channel and k = (kh, kw, c) a filter tap and input channel.
A is never materialised (no im2col): each [BLOCK_M, BLOCK_K] tile is gathered from the input with the index math
    ih = oh * stride - pad + kh,  iw = ow * stride - pad + kw     (zero outside the image)
B is the weight seen as a [KH*KW*C_in, C_out] matrix, read in place through its strides and cast on load (no copy).

The same kernel computes the input gradient (``TRANSPOSED``): m = (image, ih, iw) of the input, k = (kh, kw, c_out),
    A[m, k] = dy[image, (ih + pad - kh) / stride, (iw + pad - kw) / stride, c_out]   where the division is exact
    B[k, c_in] = W[c_out, c_in, kh, kw]                                              (the weight's strides again)
so stride-2 convolutions need no zero-dilated copy of dy.

Prologues applied to A as it is loaded (fp32 math, then cast to the dot's dtype), so that no normalised copy of an
activation is ever written:
    PRO == 1:  a = relu(x * scale[c] + shift[c])         BatchNorm + ReLU of the previous layer, applied on load
    PRO == 2:  a = dy + y * c2[c] + c1[c]                 the full BatchNorm input-gradient of the layer's own
                                                          statistics (see conv_bn_stats.py), applied on load
Padding positions are zero *after* the prologue (the conv pads the activated tensor).

Accumulation is fp32 (``tl.dot`` with fp32 accumulators); fp32 inputs use IEEE fp32 products unless the caller asks
for TF32 (the launchers follow PyTorch's own fp32 convolutions: capture_state.conv_tf32(), which reads the legacy
``allow_tf32`` flag or the ``fp32_precision`` API).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .bn_formulas import bn_affine, bn_grad_coeffs_tile
from .tl_helpers import ix, last_to_finish, relu, tile_stats_merge, tile_sums


@triton.jit
def _gather_a(a_ptr, a2_ptr, pa_ptr, pb_ptr,               # source, second source (PRO 2), prologue vectors
              n_img, dh, dw, m_ok, kk,                      # [BM] row coords, [BK] reduction indices
              SH, SW, C,                                    # source spatial size and channels
              s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c,       # strides of source and second source
              KTOT, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
              TRANSPOSED: tl.constexpr, PRO: tl.constexpr, INDEX64: tl.constexpr):
    """One [BM, BK] tile of the implicit im2col matrix A, prologue applied, zero outside the image (fp32)."""
    tap = kk // C
    c = kk % C
    kh = tap // KW
    kw = tap % KW
    if TRANSPOSED:
        th = dh[:, None] + PAD - kh[None, :]
        tw = dw[:, None] + PAD - kw[None, :]
        sh = th // STRIDE
        sw = tw // STRIDE
        ok = (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0) & (sh < SH) & (sw < SW)
    else:
        sh = dh[:, None] * STRIDE - PAD + kh[None, :]
        sw = dw[:, None] * STRIDE - PAD + kw[None, :]
        ok = (sh >= 0) & (sh < SH) & (sw >= 0) & (sw < SW)
    ok = ok & m_ok[:, None] & (kk < KTOT)[None, :]
    # inline rather than ix(): a nested jit call per tile costs ~2x under the interpreter (CI runs it)
    if INDEX64:
        sh64 = sh.to(tl.int64)
        sw64 = sw.to(tl.int64)
        c64 = c.to(tl.int64)[None, :]
        n64 = n_img.to(tl.int64)[:, None]
    else:
        sh64 = sh
        sw64 = sw
        c64 = c[None, :]
        n64 = n_img[:, None]
    a = tl.load(a_ptr + n64 * s_n + sh64 * s_h + sw64 * s_w + c64 * s_c, mask=ok, other=0.0).to(tl.float32)
    if PRO == 1:
        scale = tl.load(pa_ptr + c, mask=kk < KTOT, other=0.0)
        shift = tl.load(pb_ptr + c, mask=kk < KTOT, other=0.0)
        a = relu(a * scale[None, :] + shift[None, :])
        a = tl.where(ok, a, 0.0)
    elif PRO == 2:
        y = tl.load(a2_ptr + n64 * t_n + sh64 * t_h + sw64 * t_w + c64 * t_c, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(pa_ptr + c, mask=kk < KTOT, other=0.0)
        c2 = tl.load(pb_ptr + c, mask=kk < KTOT, other=0.0)
        a = tl.where(ok, a + y * c2[None, :] + c1[None, :], 0.0)
    return a


@triton.jit
def _gather_a_tap(a_ptr, a2_ptr, pa_ptr, pb_ptr,           # as _gather_a, for a K block inside one tap (kh, kw):
                  n_img, dh, dw, m_ok, c, kh, kw, SH, SW,   # c [BK] the block's channels (all < C)
                  s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c,
                  STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr, PRO: tl.constexpr,
                  INDEX64: tl.constexpr):
    """One [BM, BK] tile of A whose columns share the tap (kh, kw): bounds and base offsets per row."""
    if TRANSPOSED:
        th = dh + PAD - kh
        tw = dw + PAD - kw
        sh = th // STRIDE
        sw = tw // STRIDE
        ok = (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0) & (sh < SH) & (sw < SW)
    else:
        sh = dh * STRIDE - PAD + kh
        sw = dw * STRIDE - PAD + kw
        ok = (sh >= 0) & (sh < SH) & (sw >= 0) & (sw < SW)
    ok = ok & m_ok
    if INDEX64:
        sh = sh.to(tl.int64)
        sw = sw.to(tl.int64)
        n_img = n_img.to(tl.int64)
        c = c.to(tl.int64)
    mask = tl.broadcast_to(ok[:, None], (ok.shape[0], c.shape[0]))  # no per-column mask: vector loads
    a = tl.load(a_ptr + (n_img * s_n + sh * s_h + sw * s_w)[:, None] + c[None, :] * s_c, mask=mask,
                other=0.0).to(tl.float32)
    if PRO == 1:
        scale = tl.load(pa_ptr + c)
        shift = tl.load(pb_ptr + c)
        a = tl.where(mask, relu(a * scale[None, :] + shift[None, :]), 0.0)
    elif PRO == 2:
        y = tl.load(a2_ptr + (n_img * t_n + sh * t_h + sw * t_w)[:, None] + c[None, :] * t_c, mask=mask,
                    other=0.0).to(tl.float32)
        c1 = tl.load(pa_ptr + c)
        c2 = tl.load(pb_ptr + c)
        a = tl.where(mask, a + y * c2[None, :] + c1[None, :], 0.0)
    return a


@triton.jit
def _implicit_gemm_acc(acc, a_ptr, a2_ptr, pa_ptr, pb_ptr, w_ptr,
                       n_img, dh, dw, m_ok, offs_n, N,
                       SH, SW, C, s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c, w_n, w_c, w_h, w_w, KTOT,
                       KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
                       PRO: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INDEX64: tl.constexpr,
                       TAPS: tl.constexpr):
    """acc[BM, BN] += A[rows, :] @ B[:, offs_n] over the whole reduction (KTOT = KH*KW*C). B is read from the conv
    weight where it lies: B[(kh*KW + kw)*C + c, n] = w[n*w_n + c*w_c + kh*w_h + kw*w_w] (forward: n = out channel,
    c = in channel; input gradient: the two swapped), no permuted copy per step.

    TAPS (C a multiple of BLOCK_K, checked by the launcher): every K block lies in one tap, so the tap and its
    source row, bounds mask and base offset are per row ([BM]) and the channels a contiguous run c0 .. c0+BLOCK_K
    (vector loads along NHWC channels) instead of a div/mod and a 2-D index per element."""
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    if INDEX64:
        cols = offs_n.to(tl.int64)[None, :] * w_n
    else:
        cols = offs_n[None, :] * w_n
    for k0 in range(0, KTOT, BLOCK_K):
        if TAPS:
            tap = k0 // C
            kh = tap // KW
            kw = tap - kh * KW
            c = tl.max_contiguous(tl.multiple_of(k0 - tap * C + offs_k, BLOCK_K), BLOCK_K)
            a = _gather_a_tap(a_ptr, a2_ptr, pa_ptr, pb_ptr, n_img, dh, dw, m_ok, c, kh, kw, SH, SW,
                              s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c, STRIDE, PAD, TRANSPOSED, PRO, INDEX64)
            if INDEX64:
                rows = c.to(tl.int64) * w_c + (kh.to(tl.int64) * w_h + kw.to(tl.int64) * w_w)
            else:
                rows = c * w_c + (kh * w_h + kw * w_w)
            b = tl.load(w_ptr + rows[:, None] + cols, mask=n_ok[None, :], other=0.0)
        else:
            kk = k0 + offs_k
            a = _gather_a(a_ptr, a2_ptr, pa_ptr, pb_ptr, n_img, dh, dw, m_ok, kk, SH, SW, C,
                          s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c, KTOT, KW, STRIDE, PAD, TRANSPOSED, PRO, INDEX64)
            tap = kk // C
            if INDEX64:
                rows = ((kk % C).to(tl.int64) * w_c + (tap // KW).to(tl.int64) * w_h
                        + (tap % KW).to(tl.int64) * w_w)
            else:
                rows = (kk % C) * w_c + (tap // KW) * w_h + (tap % KW) * w_w
            b = tl.load(w_ptr + rows[:, None] + cols, mask=(kk < KTOT)[:, None] & n_ok[None, :], other=0.0)
        # the dot runs in the activations' dtype (fp32, or bf16/fp16 under autocast: fp32 weights are cast on
        # load, so autocast needs no per-step weight copy), accumulating in fp32
        dt = a_ptr.dtype.element_ty
        acc = tl.dot(a.to(dt), b.to(dt), acc, input_precision=PRECISION)
    return acc


# ---- the forward / input-gradient kernel ------------------------------------------------------------------
#
# out[m, n] = epilogue(sum_k A[m, k] B[k, n] (+ sum_k A2[m, k] B2[k, n]))
# Epilogues (all on the fp32 accumulator, before the single store):
#   BIAS       + bias[n]                           (eval: BatchNorm folded into the weights and this bias)
#   RES == 1   + res[m, n]                         identity shortcut
#   RES == 2   + x[img, n - pad_front, oh*s, ow*s] option A: strided subsample + zero channel padding, by index
#   DUAL == 1  + second implicit GEMM              option B (eval): the 1x1 projection, BN folded, same tile
#   DUAL == 2  second implicit GEMM into its own   option B (train): the 1x1 projection of the block input, from
#              accumulator, written to out2        the same launch as conv2; with STATS == 1 its tile statistics go
#                                                  to the second half of the partials ([2, tiles, 2, N])
#   RELU
#   STATS == 1 per-tile channel mean and M2 of the output (train: BatchNorm statistics; the tile count is
#              min(BLOCK_M, M - tile * BLOCK_M)). The last row tile of each column block to finish merges the
#              column's tiles in order (tile_stats_merge) into s0 = mean, s1 = biased var, and with AFFINE
#              BatchNorm's s2 = scale, s3 = shift (bn_affine); with DUAL 2 s2, s3 = the projection's mean, var.
#   STATS == 2 input-gradient of a layer whose input went through PRO 1 (relu(x*scale+shift)):
#              g = acc * [x*scale+shift > 0];  out = g * scale;  per-tile sums of g*x and g, finished by the last
#              tile as STATS 1 into s0 = dL/dscale, s1 = dL/dshift of that prologue.
# The finishing reductions run in fixed order (deterministic, no float atomics) inside the one launch.

# Integer arguments stay specialised (Triton's ==1 / divisible-by-16 variants): with C and the strides known to be
# multiples of 16 the gathers and stores vectorise along channels (turning that off costs far more than the extra
# compiled variants; bench/results/README.md, H100 run 2).
@triton.jit
def conv_kernel(out_ptr, stats_ptr, out2_ptr,                # out [M, N] rows of NHWC; fp32 partials [tiles, 2, N]
                s0_ptr, s1_ptr, s2_ptr, s3_ptr, cnt_ptr,     # STATS: fp32 [N] results (see below); int32 counters
                a_ptr, a2_ptr, pa_ptr, pb_ptr, w_ptr,        # A source(s), prologue vectors, conv weight (B)
                bias_ptr, res_ptr, x2_ptr, w2_ptr, ex_ptr, es_ptr, et_ptr,  # epilogue operands
                bw_ptr, bb_ptr, EPS,                         # AFFINE: BatchNorm weight, bias, eps
                M, N, DH, DW, SH, SW, C,                     # rows, cols, dest / source spatial, source channels
                s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c,      # strides: source, second source
                w_n, w_c, w_h, w_w, v_n, v_c,                # strides: weight (B), DUAL's 1x1 weight
                r_n, r_c, r_h, r_w, RC, RH, RW, PAD_FRONT,   # residual strides / channels / spatial / pad
                x_n, x_h, x_w, x_c, SH2, SW2, C2,            # DUAL: the projection's source
                e_n, e_h, e_w, e_c,                          # STATS 2: strides of the saved layer input x
                KTOT,
                KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, STRIDE2: tl.constexpr,
                TRANSPOSED: tl.constexpr, PRO: tl.constexpr, BIAS: tl.constexpr, RES: tl.constexpr,
                DUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
                AFFINE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, FIN_T: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX64: tl.constexpr,
                TAPS: tl.constexpr, TAPS2: tl.constexpr):
    pid_m = ix(tl.program_id(0), INDEX64)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    hw = DH * DW
    n_img = offs_m // hw
    rem = offs_m % hw
    dh = rem // DW
    dw = rem % DW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _implicit_gemm_acc(acc, a_ptr, a2_ptr, pa_ptr, pb_ptr, w_ptr, n_img, dh, dw, m_ok, offs_n, N,
                             SH, SW, C, s_n, s_h, s_w, s_c, t_n, t_h, t_w, t_c, w_n, w_c, w_h, w_w, KTOT,
                             KW, STRIDE, PAD, TRANSPOSED, PRO, BLOCK_K, PRECISION, INDEX64, TAPS)
    if DUAL == 1:
        acc = _implicit_gemm_acc(acc, x2_ptr, x2_ptr, pa_ptr, pb_ptr, w2_ptr, n_img, dh, dw, m_ok, offs_n, N,
                                 SH2, SW2, C2, x_n, x_h, x_w, x_c, x_n, x_h, x_w, x_c, v_n, v_c, 0, 0, C2,
                                 1, STRIDE2, 0, False, 0, BLOCK_K, PRECISION, INDEX64, TAPS2)
    mask = m_ok[:, None] & n_ok[None, :]
    if DUAL == 2:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = _implicit_gemm_acc(acc2, x2_ptr, x2_ptr, pa_ptr, pb_ptr, w2_ptr, n_img, dh, dw, m_ok, offs_n, N,
                                  SH2, SW2, C2, x_n, x_h, x_w, x_c, x_n, x_h, x_w, x_c, v_n, v_c, 0, 0, C2,
                                  1, STRIDE2, 0, False, 0, BLOCK_K, PRECISION, INDEX64, TAPS2)
        if STATS == 1:
            cnt2 = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
            mean2 = tl.sum(tl.where(mask, acc2, 0.0), axis=0) / cnt2
            d2 = tl.where(mask, acc2 - mean2[None, :], 0.0)
            sbase2 = stats_ptr + (tl.num_programs(0) + pid_m) * 2 * N + offs_n
            tl.store(sbase2, mean2, mask=n_ok)
            tl.store(sbase2 + N, tl.sum(d2 * d2, axis=0), mask=n_ok)
        tl.store(out2_ptr + offs_m[:, None] * N + offs_n[None, :], acc2.to(out2_ptr.dtype.element_ty), mask=mask)
    if BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RES == 1:
        r = tl.load(res_ptr + n_img[:, None] * r_n + dh[:, None] * r_h + dw[:, None] * r_w
                    + ix(offs_n, INDEX64)[None, :] * r_c, mask=mask, other=0.0)
        acc += r.to(tl.float32)
    elif RES == 2:
        rc = offs_n - PAD_FRONT
        rmask = mask & ((rc >= 0) & (rc < RC))[None, :]
        r = tl.load(res_ptr + n_img[:, None] * r_n + (dh * STRIDE2)[:, None] * r_h + (dw * STRIDE2)[:, None] * r_w
                    + ix(rc, INDEX64)[None, :] * r_c, mask=rmask, other=0.0)
        acc += r.to(tl.float32)
    if RELU:
        acc = relu(acc)
    if STATS == 1:
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean_t = tl.sum(tl.where(mask, acc, 0.0), axis=0) / cnt
        d = tl.where(mask, acc - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        sbase = stats_ptr + pid_m * 2 * N + offs_n
        tl.store(sbase, mean_t, mask=n_ok)
        tl.store(sbase + N, m2_t, mask=n_ok)
    elif STATS == 2:
        x = tl.load(ex_ptr + n_img[:, None] * e_n + dh[:, None] * e_h + dw[:, None] * e_w
                    + ix(offs_n, INDEX64)[None, :] * e_c, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(es_ptr + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(et_ptr + offs_n, mask=n_ok, other=0.0)
        g = tl.where(mask & ~(x * scale[None, :] + shift[None, :] <= 0), acc, 0.0)  # as threshold_backward
        sbase = stats_ptr + pid_m * 2 * N + offs_n
        tl.store(sbase, tl.sum(g * x, axis=0), mask=n_ok)
        tl.store(sbase + N, tl.sum(g, axis=0), mask=n_ok)
        acc = g * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    if STATS != 0:  # the last of the column's row tiles finishes the reduction over all of them
        if last_to_finish(cnt_ptr + pid_n, tl.num_programs(0)):
            T = tl.num_programs(0)
            if STATS == 1:
                mean, var = tile_stats_merge(stats_ptr, M, N, T, BLOCK_M, offs_n, n_ok, FIN_T)
                tl.store(s0_ptr + offs_n, mean, mask=n_ok)
                tl.store(s1_ptr + offs_n, var, mask=n_ok)
                if AFFINE:
                    scale, shift = bn_affine(mean, var, bw_ptr, bb_ptr, offs_n, n_ok, EPS, HAS_W, HAS_B)
                    tl.store(s2_ptr + offs_n, scale, mask=n_ok)
                    tl.store(s3_ptr + offs_n, shift, mask=n_ok)
                if DUAL == 2:
                    mean2, var2 = tile_stats_merge(stats_ptr + T * 2 * N, M, N, T, BLOCK_M, offs_n, n_ok, FIN_T)
                    tl.store(s2_ptr + offs_n, mean2, mask=n_ok)
                    tl.store(s3_ptr + offs_n, var2, mask=n_ok)
            else:
                gs, gt, _ = tile_sums(stats_ptr, N, T, offs_n, n_ok, 2, 2, FIN_T)
                tl.store(s0_ptr + offs_n, gs, mask=n_ok)
                tl.store(s1_ptr + offs_n, gt, mask=n_ok)


# ---- the weight-gradient kernel ---------------------------------------------------------------------------
#
# dW[co, (kh, kw, c)] = sum_p dY[p, co] * A[p, (kh, kw, c)]       p = (image, oh, ow), A the layer's input im2col
# dY goes through PRO 2 (the BatchNorm input-gradient, on load; its per-channel coefficients c1, c2 computed here
# from the BN's statistics and upstream gradients, and written out for the input-gradient launch that follows,
# with dL/dgamma and dL/dbeta) and A through PRO 1 when the layer's input was relu(x*scale+shift). The p-range is split over SPLIT programs writing fp32 partials [SPLIT, C_out, KTOT]; the
# last of the SPLIT programs of an output tile to finish sums them in split order into dW (its strides: the
# weight's layout, its dtype): a fixed-order reduction (deterministic, no float atomics) without a second launch.

@triton.jit
def conv_wgrad_kernel(part_ptr, dw_ptr, cnt_ptr,              # fp32 [SPLIT, COUT, KTOT]; dW; int32 counters
                      dy_ptr, y_ptr,                          # dY source, y (PRO 2)
                      c1_ptr, c2_ptr, gw_ptr, gb_ptr,         # PRO 2, out: the BN-gradient coefficients, dL/dgamma,
                      gm_ptr, gv_ptr, mean_ptr, INV_M,        #   dL/dbeta; in: bn_grad_coeffs_tile's operands
                      gs_ptr, gt_ptr, var_ptr, bw_ptr, EPS,
                      x_ptr, xs_ptr, xt_ptr,                  # layer input, its prologue scale / shift
                      P, COUT, OH, OW, H, W, CIN, KTOT, P_PER_SPLIT,
                      d_n, d_h, d_w, d_c, y_n, y_h, y_w, y_c, x_n, x_h, x_w, x_c,
                      w_co, w_ci, w_h, w_w,                   # dW strides
                      KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                      DY_PRO: tl.constexpr, X_PRO: tl.constexpr, PRECISION: tl.constexpr,
                      HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, AFFINE: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK_CO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, INDEX64: tl.constexpr,
                      TAP: tl.constexpr):
    pid_co = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = ix(tl.program_id(2), INDEX64)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    co_ok = offs_co < COUT
    r_ok = offs_r < KTOT
    if TAP:  # CIN a multiple of BLOCK_R (the launcher checks): the program's columns share one tap
        tap = (pid_r * BLOCK_R) // CIN
        kh = tap // KW
        kw = tap - kh * KW
        c = tl.max_contiguous(tl.multiple_of(pid_r * BLOCK_R - tap * CIN + tl.arange(0, BLOCK_R), BLOCK_R),
                              BLOCK_R)
    else:
        tap = offs_r // CIN
        c = offs_r % CIN
        kh = tap // KW
        kw = tap % KW
    if DY_PRO == 2:  # the coefficients of this program's channels; the (co, 0, 0) programs write them out
        c1, c2 = bn_grad_coeffs_tile(c1_ptr, c2_ptr, gw_ptr, gb_ptr, gm_ptr, gv_ptr, mean_ptr, INV_M, gs_ptr, gt_ptr,
                                     var_ptr, bw_ptr, EPS, offs_co, co_ok, (pid_r == 0) & (pid_s == 0),
                                     HAS_GM, HAS_GV, AFFINE, HAS_W)
    if X_PRO == 1:
        xs = tl.load(xs_ptr + c, mask=r_ok, other=0.0)
        xt = tl.load(xt_ptr + c, mask=r_ok, other=0.0)
    co_idx = ix(offs_co, INDEX64)[None, :]  # hoisted out of the loop
    c64w = ix(c, INDEX64)[None, :]
    acc = tl.zeros((BLOCK_CO, BLOCK_R), dtype=tl.float32)
    ohw = OH * OW
    p_start = pid_s * P_PER_SPLIT
    for p0 in range(0, P_PER_SPLIT, BLOCK_P):
        offs_p = p_start + p0 + tl.arange(0, BLOCK_P)
        p_ok = (offs_p < P) & (p0 + tl.arange(0, BLOCK_P) < P_PER_SPLIT)
        n_img = offs_p // ohw
        rem = offs_p % ohw
        oh = rem // OW
        ow = rem % OW
        dmask = p_ok[:, None] & co_ok[None, :]
        dy = tl.load(dy_ptr + n_img[:, None] * d_n + oh[:, None] * d_h + ow[:, None] * d_w
                     + co_idx * d_c, mask=dmask, other=0.0).to(tl.float32)
        if DY_PRO == 2:
            y = tl.load(y_ptr + n_img[:, None] * y_n + oh[:, None] * y_h + ow[:, None] * y_w
                        + co_idx * y_c, mask=dmask, other=0.0).to(tl.float32)
            dy = tl.where(dmask, dy + y * c2[None, :] + c1[None, :], 0.0)
        if TAP:  # bounds and base offsets per row
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + kw
            rok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xmask = tl.broadcast_to(rok[:, None], (BLOCK_P, BLOCK_R))
            if INDEX64:
                x_row = n_img * x_n + ih.to(tl.int64) * x_h + iw.to(tl.int64) * x_w
            else:
                x_row = n_img * x_n + ih * x_h + iw * x_w
            x_off = x_row[:, None] + c64w * x_c
        else:
            ih = oh[:, None] * STRIDE - PAD + kh[None, :]
            iw = ow[:, None] * STRIDE - PAD + kw[None, :]
            xmask = p_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if INDEX64:
                x_off = n_img[:, None] * x_n + ih.to(tl.int64) * x_h + iw.to(tl.int64) * x_w + c64w * x_c
            else:
                x_off = n_img[:, None] * x_n + ih * x_h + iw * x_w + c[None, :] * x_c
        a = tl.load(x_ptr + x_off, mask=xmask, other=0.0).to(tl.float32)
        if X_PRO == 1:
            a = tl.where(xmask, relu(a * xs[None, :] + xt[None, :]), 0.0)
        dt = x_ptr.dtype.element_ty  # the layer's compute dtype
        acc = tl.dot(tl.trans(dy.to(dt)), a.to(dt), acc, input_precision=PRECISION)
    tile_off = ix(offs_co, INDEX64)[:, None] * KTOT + offs_r[None, :]
    tmask = co_ok[:, None] & r_ok[None, :]
    tl.store(part_ptr + pid_s * COUT * KTOT + tile_off, acc, mask=tmask)
    if last_to_finish(cnt_ptr + pid_co * tl.num_programs(1) + pid_r, tl.num_programs(2)):
        tot = tl.zeros((BLOCK_CO, BLOCK_R), dtype=tl.float32)
        src = part_ptr + tile_off  # stepping the pointer: 64-bit addresses whatever the split count
        for _ in range(0, tl.num_programs(2)):
            tot += tl.load(src, mask=tmask, other=0.0, cache_modifier=".cg")
            src += COUT * KTOT
        dst = ix(offs_co, INDEX64)[:, None] * w_co + (c * w_ci + kh * w_h + kw * w_w)[None, :]
        tl.store(dw_ptr + dst, tot.to(dw_ptr.dtype.element_ty), mask=tmask)


# ---- launchers (allocate, pick a config, launch; no autograd) ---------------------------------------------

import os  # noqa: E402

import torch  # noqa: E402

from ..capture_state import note_choice  # noqa: E402
from .launch import (cdiv, device_guard, dot_precision, empty_nhwc, gpu_target, index64, next_pow2,  # noqa: E402
                     nhwc_strides, sm_count)
from .semaphores import semaphores  # noqa: E402
from typing import NamedTuple  # noqa: E402


# What conv_kernel's four fp32 [N] result pointers (s0..s3) hold, by mode: conv_launch returns one of these.
class Moments(NamedTuple):          # STATS 1: the output's BatchNorm statistics
    mean: torch.Tensor
    var: torch.Tensor               # biased


class AffineMoments(NamedTuple):    # STATS 1 with AFFINE: and BatchNorm's folded scale and shift
    mean: torch.Tensor
    var: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class DualMoments(NamedTuple):      # STATS 1 with DUAL 2: the conv's and the projection's statistics
    mean: torch.Tensor
    var: torch.Tensor
    mean_proj: torch.Tensor
    var_proj: torch.Tensor


class PrologueGrads(NamedTuple):    # STATS 2: the gradients of the input prologue relu(x*scale+shift)
    d_scale: torch.Tensor
    d_shift: torch.Tensor

# (BLOCK_M, BLOCK_N cap, BLOCK_K, num_warps, num_stages) candidates; conv_config picks one per shape. Tests run
# every entry (tests/test_ops.py) so that no shipped config goes unexercised.
CONV_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=2, num_stages=2),
    # [1]'s tile on 8 warps, for the kernel with the most live state per thread (the input gradient with BN's
    # backward applied on load, PRO 2, and the prologue's gradient sums, STATS 2): fp32/TF32 at 64 output channels
    # it spilled 80 bytes on 4 warps (255 registers; torchvision's ResNets at 224x224, batch 64,
    # bench/kernel_report.py)
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
]
WGRAD_CONFIGS = [
    dict(BLOCK_CO=64, BLOCK_R=64, BLOCK_P=64, num_warps=4, num_stages=2),
    dict(BLOCK_CO=32, BLOCK_R=32, BLOCK_P=32, num_warps=2, num_stages=2),
    dict(BLOCK_CO=64, BLOCK_R=128, BLOCK_P=64, num_warps=8, num_stages=3),
]


def _pow2_clamp(n, lo, hi):
    return max(lo, min(hi, next_pow2(max(1, int(n)))))


def conv_config(M, N, ktot, device, config=None, heavy=False):
    """Block sizes for an implicit GEMM of M rows, N columns, reduction ktot (every dim >= 16 for tl.dot).
    ``heavy``: the kernel variant with the most live state (PRO 2 with STATS 2): its 128x64 tile on 8 warps (at
    16-32 output channels, ResNet-20's, 4 warps do not spill)."""
    if config is None:
        if not gpu_target(device):
            config = CONV_CONFIGS[3]
        elif M >= 2 * 128 * sm_count(device):  # two waves of 128-row tiles fill the GPU
            config = CONV_CONFIGS[2] if N > 64 else CONV_CONFIGS[4] if heavy and N > 32 else CONV_CONFIGS[1]
        else:
            config = CONV_CONFIGS[0]
    cfg = dict(config)
    cfg["BLOCK_N"] = _pow2_clamp(N, 16, cfg["BLOCK_N"])
    cfg["BLOCK_K"] = _pow2_clamp(ktot, 16, cfg["BLOCK_K"])
    note_choice("conv_config", tuple(cfg.values()))
    return cfg


# The per-tap gathers (conv_kernel's TAPS/TAPS2 via tap_blocks(); conv_wgrad_kernel's TAP where C_in is already a
# multiple of BLOCK_R — its tile is not shrunk, which would re-read dY once more per extra column tile): on unless
# RESNET_FUSED_TAP_BLOCKS=0 (an A/B switch for the benchmarks; tests flip the attribute to check both paths).
TAP_BLOCKS = os.environ.get("RESNET_FUSED_TAP_BLOCKS", "1") != "0"


def tap_blocks(cfg, *channels):
    """(BLOCK_K, TAPS flags) for reductions over these channel counts (the main GEMM's, then the 1x1 projection's):
    where a count is a multiple of 16, BLOCK_K drops to the largest power of two that divides it (at least 16), so
    that every K block lies inside one 3x3 tap and the gather runs per tap (TAPS); other counts keep the
    per-element path."""
    bk = cfg["BLOCK_K"]
    if TAP_BLOCKS:
        for c in channels:
            if c % 16 == 0:
                bk = min(bk, c & -c)
    return bk, tuple(TAP_BLOCKS and c % bk == 0 for c in channels)


def conv_launch(src, w, kh, kw, stride, pad, dest_hw, *, transposed=False, pro=0, pa=None, pb=None, a2=None,
                bias=None, residual=None, res_mode=0, res_stride=1, pad_front=0, x2=None, w2=None,
                stride2=1, dual_out=False, relu=False, stats=0, ex=None, es=None, et=None, affine=None,
                out_dtype=None, config=None):
    """Run conv_kernel. src is the gathered tensor (NCHW logical, any strides), w the conv weight [C_out, C_in,
    kh, kw] (any strides and float dtype: read in place, cast to src's dtype on load); transposed: the input
    gradient (src = the output gradient, N = C_in).

    Returns (out [NB, N, DH, DW] channels_last, the finished statistics: fp32 [N] tensors, or None without
    ``stats``): stats=1 ``Moments``, with ``affine=(bn_weight, bn_bias, eps)`` ``AffineMoments``; stats=2
    ``PrologueGrads`` of the prologue es/et. With x2 the 1x1 projection GEMM (x2, w2 [N, C_x2, 1, 1], stride2)
    is added into the same tile (eval), or with ``dual_out`` written as a second output: then out is a pair and
    stats=1 gives ``DualMoments`` (conv, projection).
    """
    nb, c_src, sh, sw = src.shape
    dh, dw = dest_hw
    n_out = w.shape[1] if transposed else w.shape[0]
    if (w.shape[0] if transposed else w.shape[1]) != c_src or tuple(w.shape[2:]) != (kh, kw):
        raise ValueError(f"conv_launch: weight {tuple(w.shape)} does not fit a {kh}x{kw} conv of {c_src}-channel "
                         f"{'gradients' if transposed else 'input'}")
    w_n, w_c = (w.stride(1), w.stride(0)) if transposed else (w.stride(0), w.stride(1))
    ktot = kh * kw * c_src
    m = nb * dh * dw
    dev = src.device
    cfg = conv_config(m, n_out, ktot, dev, config, heavy=pro == 2 and stats == 2)
    out = empty_nhwc(nb, n_out, dh, dw, out_dtype or src.dtype, dev)
    tiles = cdiv(m, cfg["BLOCK_M"])
    out2 = empty_nhwc(nb, n_out, dh, dw, out_dtype or src.dtype, dev) if dual_out else None
    part = torch.empty(((2,) if dual_out else ()) + (tiles, 2, n_out), dtype=torch.float32, device=dev) \
        if stats else None
    n_res = (4 if affine is not None or dual_out else 2) if stats else 0
    res_stats = tuple(torch.empty(n_out, dtype=torch.float32, device=dev) for _ in range(n_res))
    bw, bb, eps = affine if affine is not None else (None, None, 0.0)
    dummy = out
    a2 = a2 if a2 is not None else src
    res = residual if residual is not None else dummy
    x2_ = x2 if x2 is not None else src
    ex_ = ex if ex is not None else dummy
    r_n, r_c, r_h, r_w = res.stride() if res.dim() == 4 else (0, 0, 0, 0)
    rc, rh, rw = (res.shape[1], res.shape[2], res.shape[3]) if res.dim() == 4 else (0, 0, 0)
    c2_, sh2, sw2 = (x2_.shape[1], x2_.shape[2], x2_.shape[3])
    grid = (tiles, cdiv(n_out, cfg["BLOCK_N"]))
    block_k, taps = tap_blocks(cfg, c_src, *((c2_,) if x2 is not None else ()))
    taps, taps2 = taps[0], len(taps) > 1 and taps[1]
    sv = res_stats + (part,) * (4 - n_res) if stats else (dummy,) * 4
    with device_guard(src):
        conv_kernel[grid](
            out, part if part is not None else dummy, out2 if out2 is not None else dummy,
            *sv, semaphores(dev, grid[1]) if stats else dummy,
            src, a2, pa if pa is not None else dummy, pb if pb is not None else dummy, w,
            bias if bias is not None else dummy, res, x2_, w2 if w2 is not None else w,
            ex_, es if es is not None else dummy, et if et is not None else dummy,
            bw if bw is not None else dummy, bb if bb is not None else dummy, float(eps),
            m, n_out, dh, dw, sh, sw, c_src,
            *nhwc_strides(src), *nhwc_strides(a2),
            w_n, w_c, w.stride(2), w.stride(3), *((w2.stride(0), w2.stride(1)) if w2 is not None else (0, 0)),
            r_n, r_c, r_h, r_w, rc, rh, rw, pad_front,
            *nhwc_strides(x2_), sh2, sw2, c2_,
            *nhwc_strides(ex_),
            ktot,
            KW=kw, STRIDE=stride, PAD=pad, STRIDE2=stride2 if x2 is not None else res_stride,
            TRANSPOSED=transposed, PRO=pro, BIAS=bias is not None, RES=res_mode,
            DUAL=(2 if dual_out else 1) if x2 is not None else 0,
            RELU=relu, STATS=stats, PRECISION=dot_precision(src.dtype, dev),
            AFFINE=affine is not None, HAS_W=bw is not None, HAS_B=bb is not None,
            FIN_T=max(8, 2048 // cfg["BLOCK_N"]),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
            INDEX64=index64(*(t for t in (out, out2, part, src, a2, w, w2, res, x2_, ex_) if t is not None)),
            TAPS=taps, TAPS2=taps2, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return ((out, out2) if dual_out else out), _named_stats(stats, affine is not None, dual_out, res_stats)


def _named_stats(stats, affine, dual, results):
    if not stats:
        return None
    if stats == 2:
        return PrologueGrads(*results[:2])
    return (AffineMoments if affine else DualMoments if dual else Moments)(*results)





def wgrad_launch(dy, x, kh, kw, stride, pad, *, y=None, coeffs=None, xs=None, xt=None, dtype=torch.float32,
                 like=None, config=None):
    """The weight gradient dW [C_out, C_in, kh, kw] of a conv with input x (prologue relu(x*xs+xt) when xs is
    given) and output gradient dy, in ``dtype``, laid out like the weight ``like`` when given (autograd then
    accumulates it into .grad without a copy), else contiguous. With ``coeffs`` (a bn_grad_coeffs.GradCoeffs) dy
    goes through BatchNorm's input gradient dy + y*c2 + c1 (PRO 2), c1 and c2 computed in the kernel and written to
    coeffs' outputs (with dL/dgamma, dL/dbeta) for the input-gradient launch. One launch: the GEMM's rows are split
    over programs writing fp32 partials [split, C_out, kh*kw*C_in], summed in split order by the last program of
    each output tile."""
    nb, cout, oh, ow = dy.shape
    _, cin, h, w = x.shape
    ktot = kh * kw * cin
    p = nb * oh * ow
    dev = dy.device
    if config is None:
        config = WGRAD_CONFIGS[0] if gpu_target(dev) else WGRAD_CONFIGS[1]
    if like is not None and tuple(like.shape) == (cout, cin, kh, kw):
        dw = torch.empty_like(like, dtype=dtype)
    else:
        dw = torch.empty((cout, cin, kh, kw), dtype=dtype, device=dev)
    if dw.numel() == 0 or p == 0:
        return dw.zero_()
    cfg = _wgrad_tile(cout, ktot, config)
    split, per = wgrad_split(p, cout, ktot, config, dev)
    part = torch.empty((split, cout, ktot), dtype=torch.float32, device=dev)
    y_ = y if y is not None else dy
    grid = (cdiv(cout, cfg["BLOCK_CO"]), cdiv(ktot, cfg["BLOCK_R"]), split)
    co_args = coeffs.args if coeffs is not None else (part,) * 7 + (1.0,) + (part,) * 4 + (0.0,)
    co_flags = coeffs.flags if coeffs is not None else dict(HAS_GM=False, HAS_GV=False, AFFINE=False, HAS_W=False)
    with device_guard(dy):
        conv_wgrad_kernel[grid](
            part, dw, semaphores(dev, grid[0] * grid[1]), dy, y_, *co_args,
            x, xs if xs is not None else part, xt if xt is not None else part,
            p, cout, oh, ow, h, w, cin, ktot, per,
            *nhwc_strides(dy), *nhwc_strides(y_), *nhwc_strides(x), *dw.stride(),
            KW=kw, STRIDE=stride, PAD=pad, DY_PRO=2 if coeffs is not None else 0, X_PRO=1 if xs is not None else 0,
            PRECISION=dot_precision(x.dtype, dev), **co_flags,
            BLOCK_CO=cfg["BLOCK_CO"], BLOCK_R=cfg["BLOCK_R"], BLOCK_P=cfg["BLOCK_P"],
            INDEX64=index64(part, dy, y_, x, dw), TAP=TAP_BLOCKS and cin % cfg["BLOCK_R"] == 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw


def conv_out_hw(h, w, k, stride, padding):
    """The output size of a k x k convolution over an h x w input."""
    return (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


def _wgrad_tile(cout, ktot, config):
    cfg = dict(config)
    cfg["BLOCK_CO"] = _pow2_clamp(cout, 16, cfg["BLOCK_CO"])
    cfg["BLOCK_R"] = _pow2_clamp(ktot, 16, cfg["BLOCK_R"])
    return cfg


def wgrad_split(p, cout, ktot, config, dev):
    """(split, rows per split) of the weight gradient's reduction over p rows: enough programs to fill the GPU
    (about 4 waves), each with at least a few BLOCK_P steps."""
    cfg = _wgrad_tile(cout, ktot, config)
    tiles = cdiv(cout, cfg["BLOCK_CO"]) * cdiv(ktot, cfg["BLOCK_R"])
    target = 4 * (sm_count(dev) if gpu_target(dev) else 2)
    split = max(1, min(cdiv(p, 4 * cfg["BLOCK_P"]), cdiv(target, tiles)))
    per = cdiv(cdiv(p, split), cfg["BLOCK_P"]) * cfg["BLOCK_P"]
    note_choice("wgrad_split", (cdiv(p, per), per))
    return cdiv(p, per), per
