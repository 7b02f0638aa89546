"""conv3x3_winograd's instruction-set paths: the AVX2 and AVX-512 fp32 GEMMs (forced with RESNET_FUSED_CPU_ISA),
bf16 activations with the fp32 GEMM, the vdpbf16ps GEMM on bf16 transforms (AVX512_BF16), and FusedResNet's bf16
CPU inference (torch.autocast or a bf16 model) that uses them."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused.backends.extension as extension
from resnet_fused import FusedResNet, ext

from cpu_kernels import force_isa, make, reference_net, require_cpu_kernels
from test_winograd import SHAPES, assert_close_scaled, reference

require_cpu_kernels()
ops = torch.ops.resnet_fused
NATIVE = ops.cpu_isa()
BF16 = ext.winograd_bf16_supported()
needs_bf16 = pytest.mark.skipif(not BF16, reason=f"needs a CPU with AVX512_BF16 (this one: {NATIVE})")


def winograd(x, wt, b, r=None, mode=0, stride=1, pad_front=0, relu=True, tile=2, dtype=torch.float32):
    return ops.conv3x3_winograd(x, ext.winograd_weight(wt, tile, dtype), b, r, mode, stride, pad_front, relu)


# C_out 8, 24, 40: the AVX-512 GEMM's masked column tails (8 of 16, 16 + 8, 32 + 8); batch 1, odd sizes, 1x1 images
ISA_SHAPES = SHAPES + [(1, 8, 40, 6, 6), (2, 64, 48, 9, 9)]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=str)
def test_fp32_gemm_paths_match_conv2d(shape, isa, tile, monkeypatch):
    force_isa(monkeypatch, isa)
    n, c, k, h, w = shape
    x, wt, b = make((n, c, h, w)), make((k, c, 3, 3), "nchw", 1, scale=0.3), make((k,), "nchw", 2)
    r = make((n, k, h, w), "cl", 3)
    assert_close_scaled(winograd(x, wt, b, r, 1, tile=tile), reference(x, wt, b, r, 1, 1, 0, True), tile)


@pytest.mark.parametrize("tile", [2, 4])
def test_fp32_gemm_paths_agree_over_many_blocks(tile, monkeypatch):
    """Several blocks per thread, an odd multiple of 6 tiles in the last block (the 12-row GEMM's 6-row tail)."""
    x, wt, b = make((5, 64, 13, 18), seed=4), make((56, 64, 3, 3), "nchw", 5, scale=0.1), make((56,), "nchw", 6)
    outs = {}
    for isa in ("avx2", "avx512"):
        force_isa(monkeypatch, isa)
        outs[isa] = winograd(x, wt, b, tile=tile)
    torch.testing.assert_close(outs["avx512"], outs["avx2"], rtol=1e-5, atol=1e-5 * outs["avx2"].abs().max().item())


def bf16_error(got, want):
    return (got.double() - want).abs().max().item() / (want.abs().max().item() + 1)


SHORTCUTS = [(0, None, 1, 0), (1, None, 1, 0), (2, None, 2, None)]  # option A: half of k's channels, k/4 in front


@needs_bf16
@pytest.mark.parametrize("mode,cr,stride,pad_front", SHORTCUTS, ids=["none", "identity", "option-A"])
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=str)
def test_bf16_gemm_as_accurate_as_a_bf16_convolution(shape, mode, cr, stride, pad_front):
    """vdpbf16ps on bf16 F(2x2) transforms: its error against fp64 within twice PyTorch's bf16 convolution's."""
    n, c, k, h, w = shape
    if mode == 2:
        cr, pad_front = k // 2, k // 4
    x = make((n, c, h, w)).bfloat16()
    wt, b = make((k, c, 3, 3), "nchw", 1, scale=0.3), make((k,), "nchw", 2)
    r = None if mode == 0 else (make((n, k, h, w), "cl", 3) if mode == 1 else
                                make((n, cr, (h - 1) * stride + 1, (w - 1) * stride + 1), "cl", 3)).bfloat16()
    got = winograd(x, wt, b, r, mode, stride, pad_front, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    want = reference(x, wt.bfloat16(), b, r, mode, stride, pad_front, True)  # from the same bf16 operands
    # PyTorch's bf16 convolution, then the shortcut added and the sum rounded to bf16 (as a bf16 add does)
    shortcut = reference(torch.zeros_like(x), wt, None, r, mode, stride, pad_front, False) if mode else 0
    torch_bf16 = (F.conv2d(x, wt.bfloat16(), b.bfloat16(), padding=1).double() + shortcut).bfloat16().relu()
    err, err_torch = bf16_error(got, want), bf16_error(torch_bf16, want)
    assert err <= 2 * err_torch + 2e-3, f"bf16 Winograd error {err:.2e}, PyTorch's bf16 convolution {err_torch:.2e}"


@needs_bf16
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("shape", ISA_SHAPES[:4], ids=str)
def test_bf16_activations_with_the_fp32_gemm_round_like_pytorch(shape, isa, tile, monkeypatch):
    """bf16 x, r and out with an fp32 operand: the fp32 computation on the same (exact) values, rounded to bf16 to
    nearest even bit for bit as Tensor.bfloat16() rounds."""
    force_isa(monkeypatch, isa)
    n, c, k, h, w = shape
    x, r = make((n, c, h, w)).bfloat16(), make((n, k, h, w), "cl", 3).bfloat16()
    wt, b = make((k, c, 3, 3), "nchw", 1, scale=0.3), make((k,), "nchw", 2)
    got = winograd(x, wt, b, r, 1, relu=False, tile=tile)
    want = winograd(x.float(), wt, b, r.float(), 1, relu=False, tile=tile)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), want.bfloat16().view(torch.int16))


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-gemm", "fp32-gemm"])
def test_bf16_nan_in_nan_out(dtype):
    x = make((2, 16, 9, 9)).bfloat16()
    x[1, 3, 4, 4] = float("nan")
    out = winograd(x, make((16, 16, 3, 3), "nchw", 1, scale=0.3), None, relu=True, dtype=dtype)
    assert out[1, :, 4, 4].isnan().all() and not out[0].isnan().any()


@needs_bf16
def test_bf16_gemm_refused_below_avx512_bf16(monkeypatch):
    x = make((1, 8, 5, 5)).bfloat16()
    wt = make((8, 8, 3, 3), "nchw", 1)
    force_isa(monkeypatch, "avx512")
    with pytest.raises(RuntimeError, match="AVX512_BF16"):
        winograd(x, wt, None, dtype=torch.bfloat16)
    assert not ext.winograd_bf16_supported()
    winograd(x, wt, None)  # bf16 activations with the fp32 GEMM still run


def test_bf16_operands_are_clear_errors():
    x = make((2, 8, 5, 5))
    wt = make((16, 8, 3, 3), "nchw", 1)
    u16 = ext.winograd_weight(wt, 2, torch.bfloat16)
    assert u16.shape == (16, 4, 16, 2) and u16.dtype == torch.bfloat16
    torch.testing.assert_close(u16.transpose(2, 3).reshape(16, 8, 16).float(),
                               ext.winograd_weight(wt, 2).bfloat16().float())
    with pytest.raises(RuntimeError, match="must be float32 .any x. or bfloat16 .bfloat16 x."):
        ops.conv3x3_winograd(x, u16, None, None, 0, 1, 0, True)
    with pytest.raises(RuntimeError, match=r"\(16 or 36, C_in/2=4, C_out, 2\)"):
        ops.conv3x3_winograd(x.bfloat16(), u16[:, :2], None, None, 0, 1, 0, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 activations"):
        ops.conv3x3_winograd(x.half(), u16, None, None, 0, 1, 0, True)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        ext.winograd_weight(wt, 2, torch.float16)
    with pytest.raises(ValueError, match="pairs input channels; got 3"):
        ext.winograd_weight(make((16, 3, 3, 3), "nchw"), 2, torch.bfloat16)


@needs_bf16
def test_opcheck_bf16_winograd_conv():
    x = make((2, 8, 5, 6)).bfloat16()
    wt, b = make((16, 8, 3, 3), "nchw", 1), make((16,), "nchw", 2)
    r = make((2, 16, 5, 6), "cl", 3).bfloat16()
    for dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(ops.conv3x3_winograd.default,
                              (x, ext.winograd_weight(wt, 2, dtype), b, r, 1, 1, 0, True))


@needs_bf16
@pytest.mark.parametrize("shortcut,widths", [("A", (16, 32, 64)), ("B", (8, 16, 24))])
@pytest.mark.parametrize("batch", [1, 7, 40])
@pytest.mark.parametrize("how", ["autocast", "bf16-model"])
def test_fused_resnet_bf16_inference(how, batch, shortcut, widths, monkeypatch):
    """FusedResNet in bf16 on a CPU (Winograd in bf16, oneDNN's bf16 primitives): its error against the fp64
    reference within twice PyTorch's under the same autocast (or bf16 model), batch slices included."""
    monkeypatch.setattr(extension, "CPU_EVAL_SLICE_BYTES", 16 * 12 * 12 * widths[0] * 4)  # slices of 16
    ref = reference_net(widths, shortcut, depth=14)
    x = make((batch, 1, 12, 12), "nchw", 5)
    with torch.no_grad():
        want = ref.double()(x.double())
        ref.float()
        fused = FusedResNet.from_reference(ref, backend="cpu").eval()
        if how == "autocast":
            with torch.autocast("cpu", torch.bfloat16):
                got, theirs = fused(x), ref(x)
        else:
            got, theirs = fused.bfloat16()(x.bfloat16()), ref.bfloat16()(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert fused.fold_cache.derived("winograd-bf16", lambda f: pytest.fail("the bf16 Winograd path did not run"))
    err, err_torch = bf16_error(got, want), bf16_error(theirs, want)
    assert err <= 2 * err_torch + 2e-3, f"FusedResNet bf16 error {err:.2e}, PyTorch's {err_torch:.2e}"


@needs_bf16
def test_fused_resnet_bf16_nan_in_nan_out():
    fused = FusedResNet.from_reference(reference_net((8, 16, 32), "A", depth=8), backend="cpu").eval()
    x = make((3, 1, 8, 8), "nchw", 1)
    x[1, 0, 2, 2] = float("nan")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = fused(x)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-gemm", "fp32-gemm"])
def test_bf16_stores_round_ties_to_even_like_pytorch(dtype):
    """x = 0, so out = bias: its fp32 values stored to bf16 bit for bit as Tensor.bfloat16() rounds them: exact ties
    to even, the largest finite value and the overflow past it, denormals, +-Inf; NaN stays NaN (-0 is left out:
    0 + (-0) is +0 before any rounding)."""
    special = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 + 2 ** -7, 3.3895314e38, 3.4028235e38, 1e-40,
               float("inf"), -float("inf"), float("nan"), 0.1, -7.3, 65504.0, 1.0000001, 2 ** -130, 0.0]
    bias = torch.tensor(special + [float(v) for v in torch.linspace(-3, 3, 16)], dtype=torch.float32)
    x = torch.zeros(1, 8, 3, 5).contiguous(memory_format=torch.channels_last).bfloat16()
    out = winograd(x, make((bias.numel(), 8, 3, 3), "nchw", 1), bias, relu=False, dtype=dtype)
    want = bias.bfloat16().view(1, -1, 1, 1).expand_as(out)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out.view(torch.int16)[~nan], want.contiguous().view(torch.int16)[~nan])
