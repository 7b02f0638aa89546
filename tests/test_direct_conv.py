"""conv2d_direct (the CPU inference convolution of stems, strided and small-batch convolutions) against F.conv2d in
fp64 on both of its instruction-set paths (AVX2, AVX-512: forced with RESNET_FUSED_CPU_ISA), and FusedResNet's CPU
inference path that picks it."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused.backends.extension as extension
from resnet_fused import FusedResNet, ext

from cpu_kernels import force_isa, make, reference_net, require_cpu_kernels

require_cpu_kernels()
ops = torch.ops.resnet_fused


def reference(x, w, b, stride, padding, relu, r=None):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    y = y if r is None else y + r.double()
    return y.relu() if relu else y


# (N, C_in, C_out, H, W, kernel, stride, padding): the MNIST stem, the CIFAR/torchvision stems, strided 3x3s, batch 1,
# odd sizes (a partial 6-pixel tile, 7 columns), 8/24 output channels (a last 8-channel block), no padding, 1x1;
# for the AVX-512 tiles: 29 and 31 columns (rows split into 15 + 14 and 11 + 11 + 9 pixels), 40 and 72 output
# channels (32-channel chunks with a masked last vector: 32 + 8, 32 + 32 + 8), 48 (32 + 16)
SHAPES = [(2, 1, 16, 28, 28, 3, 1, 1), (1, 3, 64, 37, 41, 7, 2, 3), (3, 3, 16, 9, 7, 3, 1, 1),
          (2, 16, 32, 13, 14, 3, 2, 1), (1, 32, 24, 7, 7, 3, 2, 1), (2, 5, 8, 6, 11, 3, 1, 0),
          (1, 12, 40, 5, 5, 1, 1, 0), (4, 2, 8, 3, 3, 5, 3, 2), (1, 1, 16, 3, 29, 3, 1, 1),
          (1, 4, 32, 5, 31, 3, 1, 1), (2, 9, 72, 4, 31, 3, 1, 1), (1, 8, 48, 6, 5, 1, 2, 0)]
ISAS = ["avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("relu,bias,shortcut", [(True, True, False), (False, True, False), (True, False, False),
                                                (True, True, True), (False, False, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_direct_conv_matches_conv2d(shape, relu, bias, shortcut, layout, isa, monkeypatch):
    force_isa(monkeypatch, isa)
    n, c, k, h, w, ks, stride, padding = shape
    x = make((n, c, h, w), layout)
    wt = make((k, c, ks, ks), "nchw", 1, scale=(2 / (c * ks * ks)) ** 0.5)
    b = make((k,), "nchw", 2) if bias else None
    oh, ow = (h + 2 * padding - ks) // stride + 1, (w + 2 * padding - ks) // stride + 1
    r = make((n, k, oh, ow), layout, 3) if shortcut else None
    out = ops.conv2d_direct(x, ext.direct_weight(wt), b, stride, padding, relu, r)
    want = reference(x, wt, b, stride, padding, relu, r)
    assert out.shape == want.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6 * (want.abs().max().item() + 1))


@pytest.mark.parametrize("isa", ISAS)
def test_direct_conv_keeps_nan_and_inf_as_pytorch(isa, monkeypatch):
    force_isa(monkeypatch, isa)
    x = make((1, 3, 8, 9))
    x[0, 1, 4, 4] = float("nan")
    x[0, 0, 0, 8] = float("inf")
    wt = make((16, 3, 3, 3), "nchw", 1)
    r = make((1, 16, 8, 9), "cl", 2)
    r[0, 3, 0, 0] = float("nan")
    r[0, 5, 7, 1] = -float("inf")
    for res in (None, r):
        out = ops.conv2d_direct(x, ext.direct_weight(wt), None, 1, 1, True, res)
        want = torch.relu(F.conv2d(x, wt, padding=1) + (0 if res is None else res))
        assert want.isnan().any() and torch.equal(out.isnan(), want.isnan())
        fin = ~want.isnan()
        torch.testing.assert_close(out[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_opcheck_direct_conv():
    x = make((2, 3, 9, 10))
    wp = ext.direct_weight(make((16, 3, 3, 3), "nchw", 1))
    torch.library.opcheck(ops.conv2d_direct.default, (x, wp, make((16,), "nchw", 2), 1, 1, True))
    torch.library.opcheck(ops.conv2d_direct.default, (x, wp, None, 2, 0, False))
    torch.library.opcheck(ops.conv2d_direct.default, (x, wp, None, 1, 1, True, make((2, 16, 9, 10), "cl", 3)))


def test_direct_conv_bad_operands_are_clear_errors():
    x = make((2, 3, 6, 6))
    wp = ext.direct_weight(make((16, 3, 3, 3), "nchw", 1))
    with pytest.raises(RuntimeError, match="float32"):
        ops.conv2d_direct(x.double(), wp, None, 1, 1, True)
    with pytest.raises(RuntimeError, match=r"\(C_out/8, KH, KW, C_in=3, 8\)"):
        ops.conv2d_direct(x, ext.direct_weight(make((16, 4, 3, 3), "nchw")), None, 1, 1, True)
    with pytest.raises(RuntimeError, match=r"\(C_out/8, KH, KW, C_in=3, 8\)"):
        ops.conv2d_direct(x, make((3, 3, 3, 16)), None, 1, 1, True)  # the 4-D packing of earlier versions
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        ext.direct_weight(make((12, 3, 3, 3), "nchw"))
    with pytest.raises(RuntimeError, match="one value per output channel"):
        ops.conv2d_direct(x, wp, torch.zeros(8), 1, 1, True)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        ops.conv2d_direct(x, wp, None, 0, 1, True)
    with pytest.raises(RuntimeError, match=r"residual must be a float32 tensor shaped like the output \(2, 16, 6, 6\)"):
        ops.conv2d_direct(x, wp, None, 1, 1, True, make((2, 16, 3, 3)))
    with pytest.raises(RuntimeError, match="residual must be a float32"):
        ops.conv2d_direct(x, wp, None, 1, 1, True, make((2, 16, 6, 6)).double())
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        ops.conv2d_direct(make((1, 3, 2, 2)), wp, None, 1, 0, True)
    with pytest.raises(ValueError, match="C_out, C_in, KH, KW"):
        ext.direct_weight(torch.zeros(3, 3, 3))


@pytest.mark.parametrize("batch", [1, extension.DIRECT_MAX_BATCH + 3])
def test_cpu_inference_picks_direct_conv_for_stem_and_small_batches(monkeypatch, batch):
    """The stem always, the strided 3x3 convolutions up to DIRECT_MAX_BATCH images (at any batch with the AVX-512
    path): the reference's numbers."""
    ref = reference_net(depth=8)
    fused = FusedResNet.from_reference(ref, backend="cpu").eval()
    calls = []
    real = extension._DIRECT_OP

    def spy(x, *args):
        calls.append(x.shape[1])
        return real(x, *args)
    monkeypatch.setattr(extension, "_DIRECT_OP", spy)
    x = make((batch, 1, 12, 11), "nchw", 3)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
    small = batch <= extension.DIRECT_MAX_BATCH or extension._DIRECT_WIDE
    assert calls == ([1, 16, 32] if small else [1])  # the stem, then the two stride-2 3x3 convolutions


@pytest.mark.parametrize("wide", [False, True])
def test_direct_conv_takes_what_it_was_measured_faster_at(wide, monkeypatch):
    """AVX2: stems, and the small 3x3s up to DIRECT_MAX_BATCH images, never with a shortcut. AVX-512: every
    convolution (shortcut included) up to DIRECT_MAX_BATCH images; past it the stems and the small 3x3s."""
    monkeypatch.setattr(extension, "_DIRECT_WIDE", wide)
    conv = torch.nn.Conv2d
    stem, small3, big3, big1 = conv(3, 64, 7, 2, 3), conv(32, 64, 3, 2, 1), conv(64, 128, 3, 2, 1), conv(512, 2048, 1)
    big = extension.DIRECT_MAX_BATCH + 1
    assert extension._direct_takes(stem, big, False) and extension._direct_takes(small3, 1, False)
    assert extension._direct_takes(small3, big, False) == wide
    assert not extension._direct_takes(big3, big, False) and not extension._direct_takes(big1, big, False)
    assert extension._direct_takes(big3, 1, False) == wide and extension._direct_takes(big1, 1, True) == wide
    assert not extension._direct_takes(stem, big, True)
    assert extension._direct_fits(stem) and extension._direct_fits(conv(1, 16, 3, padding=1))  # the MNIST stem
    assert extension._direct_fits(small3)
    assert extension._direct_fits(big3) == wide  # AVX2: weights too large to stream per tile
    assert extension._direct_fits(conv(16, 32, 1, stride=2)) == wide  # AVX2: 1x1s are oneDNN's GEMM
    assert not extension._direct_fits(conv(16, 12, 3, padding=1))  # 12 output channels: not a multiple of 8
    assert not extension._direct_fits(conv(16, 16, 3, padding=1, groups=2))
