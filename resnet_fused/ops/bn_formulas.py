"""BatchNorm's per-channel formulas as @triton.jit helpers for the kernels that compute them: one set of formulas,
fp32, wherever they run (bn_scale_shift, conv_kernel's statistics finish, bn_grad_coeffs, conv_wgrad_kernel).

Affine from the batch statistics, and its VJP:
    invstd = 1 / sqrt(var + eps),  scale = weight * invstd (invstd without a weight),  shift = bias - mean * scale
    from (dL/dscale, dL/dshift):  g = dL/dscale - mean * dL/dshift,  dL/dweight = g * invstd,  dL/dbias = dL/dshift,
                                  dL/dmean = -scale * dL/dshift,  dL/dvar = -0.5 * g * weight * invstd^3
The input gradient's coefficients (conv_bn_stats' backward) over M values per channel:
    c2 = 2 dL/dvar / M,  c1 = dL/dmean / M - c2 * mean     so that dL/dy_total = dL/dy + c2 * y + c1
"""
import triton
import triton.language as tl


@triton.jit
def bn_affine(mean, var, w_ptr, b_ptr, offs, ok, EPS, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(scale, shift) of channels offs from fp32 mean/var (the formulas above)."""
    scale = 1.0 / tl.sqrt(var + EPS)
    if HAS_W:
        scale = scale * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def bn_affine_vjp(gs, gt, mean, var, w_ptr, offs, ok, EPS, HAS_W: tl.constexpr):
    """(dL/dmean, dL/dvar, dL/dweight, dL/dbias) from (dL/dscale, dL/dshift) (the formulas above)."""
    invstd = 1.0 / tl.sqrt(var + EPS)
    w = tl.full(mean.shape, 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = gs - mean * gt
    return -(w * invstd) * gt, -0.5 * g * w * invstd * invstd * invstd, g * invstd, gt


@triton.jit
def bn_grad_coeffs_tile(c1_ptr, c2_ptr, gw_ptr, gb_ptr,         # out: fp32 c1, c2; dL/dweight, dL/dbias
                        gm_ptr, gv_ptr, mean_ptr, INV_M,        # dL/dmean, dL/dvar (either may be absent), mean
                        gs_ptr, gt_ptr, var_ptr, w_ptr, EPS,    # AFFINE: dL/dscale, dL/dshift, var, weight
                        offs, ok, store,
                        HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, AFFINE: tl.constexpr, HAS_W: tl.constexpr):
    """(c1, c2) of channels offs (the formula above), with the affine's VJP folded into dL/dmean and dL/dvar when
    AFFINE; where ``store``, also written out with dL/dweight and dL/dbias."""
    gv = tl.zeros(offs.shape, tl.float32)
    gm = tl.zeros(offs.shape, tl.float32)
    if HAS_GV:
        gv = tl.load(gv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_GM:
        gm = tl.load(gm_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if AFFINE:
        var = tl.load(var_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gs = tl.load(gs_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gt = tl.load(gt_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gm_affine, gv_affine, gw, gb = bn_affine_vjp(gs, gt, mean, var, w_ptr, offs, ok, EPS, HAS_W)
        gm += gm_affine
        gv += gv_affine
        if store:
            if HAS_W:
                tl.store(gw_ptr + offs, gw.to(gw_ptr.dtype.element_ty), mask=ok)
            tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=ok)
    c2 = 2.0 * INV_M * gv
    c1 = INV_M * gm - c2 * mean
    if store:
        tl.store(c1_ptr + offs, c1, mask=ok)
        tl.store(c2_ptr + offs, c2, mask=ok)
    return c1, c2
