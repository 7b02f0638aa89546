"""BatchNorm's per-channel affine from batch statistics and its VJP, as @triton.jit helpers for the kernels that
compute them (bn_scale_shift, conv_kernel's statistics finish, bn_grad_coeffs): one set of formulas, fp32.

    invstd = 1 / sqrt(var + eps),  scale = weight * invstd (invstd without a weight),  shift = bias - mean * scale
    from (dL/dscale, dL/dshift):  g = dL/dscale - mean * dL/dshift,  dL/dweight = g * invstd,  dL/dbias = dL/dshift,
                                  dL/dmean = -scale * dL/dshift,  dL/dvar = -0.5 * g * weight * invstd^3
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
