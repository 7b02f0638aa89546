"""The C++/CUDA operators of ``resnet_fused._C`` (csrc/): fake implementations and autograd.

The operators are defined in C++ with TORCH_LIBRARY (schemas and math: csrc/*.cpp); importing ``resnet_fused._C``
registers them as ``torch.ops.resnet_fused.{bn_stats, bn_stats_backward, bn_finalize, scale_shift_add_relu,
scale_shift_add_relu_backward, batch_norm_add_relu, batch_norm_add_relu_backward, conv3x3_winograd,
conv2d_direct}``. Here they get fake (meta) implementations for torch.compile and autograd formulas made of the
registered backward operators (conv3x3_winograd and conv2d_direct are inference-only: no autograd; their weight
operands are ``winograd_weight`` and ``direct_weight``).

The package works without the extension: ``available()`` says whether it was built, ``has_cuda()`` whether the
build includes the CUDA kernels, and ``require(backend)`` raises an error naming what is missing.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the operators)
    EXT_IMPORT_ERROR = None
except ImportError as e:  # not built (pure-Python install) or built against another torch
    EXT_IMPORT_ERROR = e


def available() -> bool:
    return EXT_IMPORT_ERROR is None


def has_cuda() -> bool:
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::bn_stats", "CUDA")


def require(backend: str):
    if not available():
        raise RuntimeError(f"backend {backend!r} needs the compiled extension resnet_fused._C, which is not "
                           f"available ({EXT_IMPORT_ERROR}); reinstall with `pip install --no-build-isolation -e .` "
                           f"(a C++ compiler, and nvcc for 'cuda'), or use backend='triton' / 'auto'")
    if backend == "cuda" and not has_cuda():
        raise RuntimeError("backend 'cuda' needs resnet_fused._C built with its CUDA kernels, but this build has "
                           "only the CPU ones: reinstall with nvcc available (RESNET_FUSED_BUILD_CUDA=1)")


def _layout(t):
    """The memory format ATen's suggest_memory_format picks for the tensors these operators return."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


if available():
    ops = torch.ops.resnet_fused

    @torch.library.register_fake("resnet_fused::bn_stats")
    def _(x):
        torch._check(x.dim() == 4, lambda: f"bn_stats expects a 4-D tensor, got {x.dim()}-D")
        c = x.shape[1]
        return x.new_empty((c,), dtype=_acc_dtype(x)), x.new_empty((c,), dtype=_acc_dtype(x))

    @torch.library.register_fake("resnet_fused::bn_stats_backward")
    def _(grad_mean, grad_var, x, mean):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))

    @torch.library.register_fake("resnet_fused::bn_finalize")
    def _(mean, var, running_mean, running_var, num_batches_tracked, count, momentum, cumulative, eps):
        return torch.empty_like(var, dtype=_acc_dtype(var))

    @torch.library.register_fake("resnet_fused::scale_shift_add_relu")
    def _(y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front, relu):
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_layout(y))

    @torch.library.register_fake("resnet_fused::scale_shift_add_relu_backward")
    def _(grad_out, out, y, scale, residual, res_scale, mode, res_stride, pad_front, relu):
        c, acc = y.shape[1], _acc_dtype(y)
        gy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_layout(y))
        if mode == 0:
            g_res = y.new_empty((0,), dtype=acc)
        else:
            g_res = torch.empty(residual.shape, dtype=residual.dtype, device=y.device,
                                memory_format=_layout(residual))
        n3 = c if mode == 3 else 0
        return (gy, y.new_empty((c,), dtype=acc), y.new_empty((c,), dtype=acc), g_res,
                y.new_empty((n3,), dtype=acc), y.new_empty((n3,), dtype=acc))

    # -- autograd: the VJPs are the registered backward operators ------------------------------------------------

    def _stats_setup(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x, output[0])

    def _stats_backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        return ops.bn_stats_backward(grad_mean, grad_var, x, mean)

    torch.library.register_autograd("resnet_fused::bn_stats", _stats_backward, setup_context=_stats_setup)

    def _ssar_setup(ctx, inputs, output):
        y, scale, shift, residual, res_scale, res_shift, mode, res_stride, pad_front, relu = inputs
        ctx.save_for_backward(output, y, scale, residual, res_scale)
        ctx.args = dict(mode=mode, res_stride=res_stride, pad_front=pad_front, relu=relu)
        ctx.has_scale = scale is not None

    def _ssar_backward(ctx, grad_out):
        out, y, scale, residual, res_scale = ctx.saved_tensors
        mode = ctx.args["mode"]
        gy, gs, gt, gr, grs, grt = ops.scale_shift_add_relu_backward(grad_out, out, y, scale, residual, res_scale,
                                                                     **ctx.args)
        s = ctx.has_scale
        return (gy, gs if s else None, gt if s else None, gr if mode else None, grs if mode == 3 else None,
                grt if mode == 3 else None, None, None, None, None)

    torch.library.register_autograd("resnet_fused::scale_shift_add_relu", _ssar_backward,
                                    setup_context=_ssar_setup)

    # -- batch_norm_add_relu: BN from batch statistics + shortcut + ReLU; its VJP includes the statistics' ---------

    @torch.library.register_fake("resnet_fused::batch_norm_add_relu")
    def _(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias, mode, res_stride,
          pad_front, relu):
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_layout(y))

    @torch.library.register_fake("resnet_fused::batch_norm_add_relu_backward")
    def _(grad_out, out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight, mode, res_stride,
          pad_front, relu):
        c, acc = y.shape[1], _acc_dtype(y)
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_layout(y))
        if mode == 0:
            dr = y.new_empty((0,), dtype=acc)
        else:
            dr = torch.empty(residual.shape, dtype=residual.dtype, device=y.device, memory_format=_layout(residual))
        dw = y.new_empty((c,), dtype=weight.dtype) if weight is not None else y.new_empty((0,), dtype=acc)
        proj = mode == 3
        drw = y.new_empty((c,), dtype=res_weight.dtype) if proj and res_weight is not None else y.new_empty(
            (0,), dtype=acc)
        return dy, dw, y.new_empty((c,), dtype=acc), dr, drw, y.new_empty((c if proj else 0,), dtype=acc)

    def _bnar_setup(ctx, inputs, output):
        (y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias, mode, res_stride,
         pad_front, relu) = inputs
        for name, t in (("mean", mean), ("invstd", invstd), ("res_mean", res_mean), ("res_invstd", res_invstd)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"batch_norm_add_relu: {name} requires grad, but its gradient is folded into the "
                                   f"input's (it must be the batch statistic of y, computed under no_grad)")
        ctx.save_for_backward(output, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight)
        ctx.args = dict(mode=mode, res_stride=res_stride, pad_front=pad_front, relu=relu)
        ctx.has = (weight is not None, bias is not None, res_weight is not None, res_bias is not None)

    def _bnar_backward(ctx, grad_out):
        out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight = ctx.saved_tensors
        mode = ctx.args["mode"]
        dy, dw, db, dr, drw, drb = ops.batch_norm_add_relu_backward(grad_out, out, y, mean, invstd, weight, residual,
                                                                    res_mean, res_invstd, res_weight, **ctx.args)
        hw, hb, hrw, hrb = ctx.has
        proj = mode == 3
        return (dy, None, None, dw if hw else None, db if hb else None, dr if mode else None, None, None,
                drw if proj and hrw else None, drb if proj and hrb else None, None, None, None, None)

    torch.library.register_autograd("resnet_fused::batch_norm_add_relu", _bnar_backward, setup_context=_bnar_setup)

    # -- conv3x3_winograd: inference-only 3x3 convolution (Winograd F(2x2 or 4x4, 3x3)) + bias + shortcut + ReLU ----

    @torch.library.register_fake("resnet_fused::conv3x3_winograd")
    def _(x, weight_t, bias, residual, mode, res_stride, pad_front, relu):
        n, _, h, w = x.shape
        return torch.empty((n, weight_t.shape[2], h, w), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    # -- conv2d_direct: inference-only direct convolution (stems, small batches) + bias + shortcut + ReLU ----------

    @torch.library.register_fake("resnet_fused::conv2d_direct")
    def _(x, weight_p, bias, stride, padding, relu, residual=None):
        n, _, h, w = x.shape
        kb, kh, kw, _, _ = weight_p.shape
        k = kb * 8
        return torch.empty((n, k, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1),
                           dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def winograd_supported() -> bool:
    """Whether conv3x3_winograd runs here: the extension built for x86-64 and a CPU with AVX2 and FMA."""
    return (available() and hasattr(torch.ops.resnet_fused, "conv3x3_winograd")
            and bool(torch.ops.resnet_fused.conv3x3_winograd_supported()))


def winograd_bf16_supported() -> bool:
    """Whether conv3x3_winograd runs on bfloat16 here: a CPU with AVX512_BF16 (vdpbf16ps), not lowered by
    RESNET_FUSED_CPU_ISA."""
    return winograd_supported() and bool(torch.ops.resnet_fused.conv3x3_winograd_bf16_supported())


# Winograd filter transforms G ((m + 2) x 3): U = G w G^T per (output, input) channel pair. F(2x2, 3x3) uses the
# points 0, 1, -1, inf; F(4x4, 3x3) 0, 1, -1, 2, -2, inf (csrc/winograd_conv.cpp has the matching B^T and A^T)
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_G4 = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))
WINOGRAD_TILES = {2: _WINOGRAD_G, 4: _WINOGRAD_G4}


def winograd_weight(weight: torch.Tensor, tile: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ((tile + 2)^2, C_in, C_out) fp32 operand of conv3x3_winograd for a (C_out, C_in, 3, 3) weight: G w G^T
    computed in fp64, position-major so that each position is one (C_in x C_out) GEMM operand. ``tile`` is the
    output tile's side: 2 for F(2x2, 3x3) (16 positions), 4 for F(4x4, 3x3) (36 positions: 2.25x fewer multiplies
    than 2x2's 4 per output, ~4x larger rounding errors: see tests/test_winograd.py). ``dtype=torch.bfloat16``
    gives the operand of bfloat16 activations: ((tile + 2)^2, C_in / 2, C_out, 2), the input channels 2j and 2j + 1
    of each output channel side by side (the pair vdpbf16ps multiplies), rounded from fp64 once."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight expects a (C_out, C_in, 3, 3) weight, got shape {tuple(weight.shape)}")
    if tile not in WINOGRAD_TILES:
        raise ValueError(f"winograd_weight: tile must be one of {sorted(WINOGRAD_TILES)}, got {tile!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"winograd_weight: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and weight.shape[1] % 2:
        raise ValueError(f"winograd_weight: the bfloat16 operand pairs input channels; got {weight.shape[1]}")
    g = torch.tensor(WINOGRAD_TILES[tile], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,kcab,jb->ijck", g, weight.detach().to(torch.float64), g)
    u = u.reshape(g.shape[0] ** 2, weight.shape[1], weight.shape[0])
    if dtype == torch.bfloat16:  # (P, C, K) -> (P, C/2, K, 2)
        u = u.reshape(u.shape[0], u.shape[1] // 2, 2, u.shape[2]).transpose(2, 3)
    return u.to(dtype).contiguous()


def direct_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (C_out/8, KH, KW, C_in, 8) fp32 packing of a (C_out, C_in, KH, KW) weight that conv2d_direct reads: per
    block of 8 output channels, the taps in the order one output row reads them (C_out a multiple of 8)."""
    if weight.dim() != 4:
        raise ValueError(f"direct_weight expects a (C_out, C_in, KH, KW) weight, got shape {tuple(weight.shape)}")
    k, c, kh, kw = weight.shape
    if k % 8 or k == 0:
        raise ValueError(f"direct_weight: conv2d_direct needs output channels that are a multiple of 8, got {k}")
    return weight.detach().to(torch.float32).reshape(k // 8, 8, c, kh, kw).permute(0, 3, 4, 2, 1).contiguous()
