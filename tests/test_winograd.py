"""conv3x3_winograd (the CPU inference convolution) against F.conv2d in fp64, and FusedResNet's CPU inference path
that uses it (Winograd convolutions + batch slicing) against the reference."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused.backends.extension as extension
from resnet_fused.plan import to_channels_last
from resnet_fused import FusedResNet, ext

from cpu_kernels import make, reference_net, require_cpu_kernels

require_cpu_kernels()
ops = torch.ops.resnet_fused


def reference(x, w, b, r, mode, stride, pad_front, relu):
    """relu?(conv2d(x, w, b, padding=1) + shortcut) in fp64, the shortcut built the way the reference ResNet does."""
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    if mode == 1:
        y = y + r.double()
    elif mode == 2:
        sub = r.double()[:, :, ::stride, ::stride]
        y = y + F.pad(sub, (0, 0, 0, 0, pad_front, y.shape[1] - sub.shape[1] - pad_front))
    return y.relu() if relu else y


# fp32 Winograd vs an fp64 direct convolution: errors scale with the output's magnitude. F(2x2, 3x3) is about as
# accurate as PyTorch's fp32 direct convolution; F(4x4, 3x3)'s larger transform coefficients (up to 8 in A^T, 5 in
# B^T) cost ~4-10x more rounding (measured: 1e-6 .. 1e-5 of the largest output at 8-256 channels, fp32 direct
# 2e-7 .. 2e-6)
SCALED_ATOL = {2: 2e-6, 4: 1.2e-5}
TILES = [2, 4]


def assert_close_scaled(got, want, tile=2):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=SCALED_ATOL[tile] * (want.abs().max().item() + 1))


# (N, C_in, C_out, H, W): batch 1, 7x7, odd sizes (partial 2x2 tiles), 1x1 and 2x3 images, channels 8/24/40
SHAPES = [(1, 8, 8, 7, 7), (2, 16, 24, 5, 9), (3, 24, 8, 1, 1), (2, 8, 16, 2, 3), (1, 40, 16, 28, 28),
          (4, 16, 16, 14, 14)]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_winograd_conv_matches_conv2d(shape, bias, relu, layout, tile):
    n, c, k, h, w = shape
    x = make((n, c, h, w), layout)
    wt = make((k, c, 3, 3), "nchw", 1, scale=0.3)
    b = make((k,), "nchw", 2) if bias else None
    out = ops.conv3x3_winograd(x, ext.winograd_weight(wt, tile), b, None, 0, 1, 0, relu)
    assert out.shape == (n, k, h, w) and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(out, reference(x, wt, b, None, 0, 1, 0, relu), tile)


@pytest.mark.parametrize("tile", TILES)
def test_winograd_conv_many_blocks_and_64_channels(tile):
    """Enough tiles for several blocks per thread (a block boundary inside an image) at 64 channels."""
    x = make((6, 64, 13, 18), seed=4)
    wt = make((64, 64, 3, 3), "nchw", 5, scale=0.1)
    b = make((64,), "nchw", 6)
    out = ops.conv3x3_winograd(x, ext.winograd_weight(wt, tile), b, None, 0, 1, 0, True)
    assert_close_scaled(out, reference(x, wt, b, None, 0, 1, 0, True), tile)


@pytest.mark.parametrize("mode,cr,stride,pad_front", [(1, None, 1, 0), (2, 8, 2, 4), (2, 16, 2, 8), (2, 8, 1, 3),
                                                      (2, 24, 2, 0), (2, 8, 3, 8)])
@pytest.mark.parametrize("hw", [(7, 7), (6, 10)], ids=str)
@pytest.mark.parametrize("tile", TILES)
def test_winograd_conv_shortcuts(mode, cr, stride, pad_front, hw, tile):
    """Identity and option A (subsample + zero channel padding, aligned and unaligned to 8 channels) in the epilogue."""
    n, c, k = 3, 16, 32 if mode == 2 else 16
    h, w = hw
    x = make((n, c, h, w))
    wt = make((k, c, 3, 3), "nchw", 1, scale=0.3)
    b = make((k,), "nchw", 2)
    r = make((n, k, h, w), "cl", 3) if mode == 1 else make((n, cr, (h - 1) * stride + 1, (w - 1) * stride + 1), "nchw",
                                                           3)
    out = ops.conv3x3_winograd(x, ext.winograd_weight(wt, tile), b, r, mode, stride, pad_front, True)
    assert_close_scaled(out, reference(x, wt, b, r, mode, stride, pad_front, True), tile)


@pytest.mark.parametrize("tile", TILES)
def test_winograd_weight_transform(tile):
    """G w G^T: the transform of a filter with a single 1 at (a, b) is the outer product of G's columns a and b."""
    g = torch.tensor(ext.WINOGRAD_TILES[tile], dtype=torch.float64)
    alpha = tile + 2
    w = torch.zeros(2, 3, 3, 3)
    w[1, 2, 0, 2] = 1.0
    u = ext.winograd_weight(w, tile)
    assert u.shape == (alpha * alpha, 3, 2) and u.dtype == torch.float32 and u.is_contiguous()
    torch.testing.assert_close(u[:, 2, 1].double().reshape(alpha, alpha), torch.outer(g[:, 0], g[:, 2]))
    assert u[:, :2].abs().sum() == 0 and u[:, 2, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="3, 3"):
        ext.winograd_weight(torch.zeros(4, 4, 5, 5), tile)


def test_winograd_weight_transform_refuses_other_tiles():
    with pytest.raises(ValueError, match=r"tile must be one of \[2, 4\], got 3"):
        ext.winograd_weight(torch.zeros(4, 4, 3, 3), 3)


def test_opcheck_winograd_conv():
    x = make((2, 8, 5, 6))
    u = ext.winograd_weight(make((16, 8, 3, 3), "nchw", 1))
    b = make((16,), "nchw", 2)
    torch.library.opcheck(ops.conv3x3_winograd.default, (x, u, b, None, 0, 1, 0, True))
    torch.library.opcheck(ops.conv3x3_winograd.default, (x, u, b, make((2, 16, 5, 6), "cl", 3), 1, 1, 0, False))
    torch.library.opcheck(ops.conv3x3_winograd.default, (x, u, None, make((2, 8, 9, 11), "cl", 3), 2, 2, 4, True))
    u4 = ext.winograd_weight(make((16, 8, 3, 3), "nchw", 1), 4)
    torch.library.opcheck(ops.conv3x3_winograd.default, (x, u4, b, make((2, 16, 5, 6), "cl", 3), 1, 1, 0, True))


def test_winograd_conv_bad_operands_are_clear_errors():
    x = make((2, 8, 5, 5))
    u = ext.winograd_weight(make((16, 8, 3, 3), "nchw", 1))
    with pytest.raises(RuntimeError, match="multiples of 8"):
        ops.conv3x3_winograd(make((2, 4, 5, 5)), ext.winograd_weight(make((16, 4, 3, 3), "nchw")), None, None, 0, 1,
                             0, True)
    with pytest.raises(RuntimeError, match="float32"):
        ops.conv3x3_winograd(x.double(), u, None, None, 0, 1, 0, True)
    with pytest.raises(RuntimeError, match=r"\(16 or 36, C_in=8, C_out\)"):
        ops.conv3x3_winograd(x, u[:, :4], None, None, 0, 1, 0, True)
    with pytest.raises(RuntimeError, match="identity shortcut must have the shape"):
        ops.conv3x3_winograd(x, u, None, make((2, 8, 5, 5)), 1, 1, 0, True)
    with pytest.raises(RuntimeError, match="one value per channel"):
        ops.conv3x3_winograd(x, u, torch.zeros(8), None, 0, 1, 0, True)
    with pytest.raises(RuntimeError, match="shortcut mode"):
        ops.conv3x3_winograd(x, u, None, make((2, 16, 5, 5)), 3, 1, 0, True)
    with pytest.raises(RuntimeError, match="option-A shortcut"):
        ops.conv3x3_winograd(x, u, None, make((2, 16, 9, 9)), 2, 2, 4, True)


@pytest.mark.parametrize("widths,shortcut,plain", [((8, 16, 32), "A", False), ((16, 32, 64), "A", False),
                                                   ((8, 16, 32), "B", False), ((8, 16, 24), "A", True)])
def test_cpu_inference_with_winograd_and_batch_slices(monkeypatch, widths, shortcut, plain):
    """FusedResNet's CPU eval path (Winograd convs, batch slices) == the reference, and the cache follows weights."""
    ref = reference_net(widths, shortcut, plain)
    fused = FusedResNet.from_reference(ref, backend="cpu").eval()
    x = make((11, 1, 10, 9), "nchw", 5)
    # slices of 4 images (4, 4, 3): each slice's first activation (10*9*width*4 bytes) is over a quarter of this
    monkeypatch.setattr(extension, "CPU_EVAL_SLICE_BYTES", 4 * 10 * 9 * widths[0] * 4)
    assert [c.shape[0] for c in extension.ExtensionBackend._eval_slices(fused, to_channels_last(x))] == [4, 4, 3]
    tol = dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), **tol)
        wino = fused.fold_cache.derived("winograd", lambda folded: pytest.fail("no Winograd transforms were made"))
        used = [id(fc) in wino for fc in fused.folded(torch.float32).convs()]
        assert all(w.f4 is not None for w in wino.values())  # <= 128x128 channels: both transforms
        assert used[0] is False and sum(used) >= len(used) - 3  # the 1-channel stem and stride-2 convs are not 3x3/s1
        for p in list(ref.parameters()) + list(fused.parameters()):
            p.mul_(1.1)  # in place: the folded weights and their transforms must be refreshed
        torch.testing.assert_close(fused(x), ref(x), **tol)
        torch.testing.assert_close(fused(x[:1]), ref(x[:1]), **tol)  # batch 1, one slice


def test_winograd_tile_follows_the_input_and_the_channels():
    """F(4x4) where the weights have it and the input has >= WINOGRAD_F4_MIN_TILES 4x4 tiles, else F(2x2); layers
    over WINOGRAD_F4_MAX_CHANNEL_PRODUCT channels get no F(4x4) transform."""
    f2, f4 = torch.zeros(16, 8, 8), torch.zeros(36, 8, 8)
    ww = extension.WinogradWeights(f2, f4, torch.zeros(8))
    assert ww.pick(torch.zeros(1, 8, 28, 28)) is f4  # 49 tiles
    assert ww.pick(torch.zeros(1, 8, 7, 7)) is f2  # 4 tiles
    assert ww.pick(torch.zeros(4, 8, 7, 7)) is f4  # 16 tiles
    assert extension.WinogradWeights(f2, None, torch.zeros(8)).pick(torch.zeros(4, 8, 28, 28)) is f2
    big = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    folded = type("Folded", (), {"convs": lambda self: [fc]})()
    fc = type("FC", (), {"module": big, "weight": big.weight.detach(), "bias": torch.zeros(256)})()
    (w,) = extension._winograd_weights(folded).values()
    assert w.f2.shape == (16, 256, 256) and w.f4 is None
    (w,) = extension._winograd_weights_bf16(folded).values()  # F(2x2) in bf16 (pair-packed), F(4x4) never in bf16
    assert w.f2.shape == (16, 128, 256, 2) and w.f2.dtype == torch.bfloat16 and w.f4 is None


def test_winograd_off_gives_the_same_numbers(monkeypatch):
    """The Winograd path and the oneDNN direct convolutions agree (FusedResNet picks Winograd where it can)."""
    ref = reference_net((16, 32, 64), "B", depth=8)
    fused = FusedResNet.from_reference(ref, backend="cpu").eval()
    x = make((5, 1, 12, 12), "nchw", 6)
    with torch.no_grad():
        a = fused(x)
        monkeypatch.setattr(extension, "_WINOGRAD", False)
        b = fused(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_winograd_output_buffers_are_reused_only_when_nobody_holds_them():
    """The operator recycles its output buffers (no page faults on fresh memory), but never one still referenced,
    through the returned tensor or a view of it."""
    x = make((2, 8, 6, 6))
    x2 = make((2, 8, 6, 6), seed=1)
    u = ext.winograd_weight(make((8, 8, 3, 3), "nchw", 1))

    def run(inp):
        return ops.conv3x3_winograd(inp, u, None, None, 0, 1, 0, False)
    a = run(x)
    a_before = a.clone()
    b = run(x2)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, a_before)  # a is held: not overwritten
    freed = b.data_ptr()
    del b
    c = run(x2)
    assert c.data_ptr() == freed  # b's buffer, free again, is reused
    view = c[:, :4]
    del c
    d = run(x)
    assert d.data_ptr() not in (freed, a.data_ptr())  # a view keeps the buffer alive
    torch.testing.assert_close(view, run(x2)[:, :4])
    torch.testing.assert_close(a, a_before)
    torch.testing.assert_close(d, a_before)


def test_cpu_inference_alternating_inference_mode_and_no_grad(monkeypatch):
    """Recycled buffers cross inference_mode / no_grad boundaries without errors or wrong numbers."""
    ref = reference_net((8, 16, 32), "A", depth=8)
    fused = FusedResNet.from_reference(ref, backend="cpu").eval()
    x = make((9, 1, 8, 8), "nchw", 7)
    monkeypatch.setattr(extension, "CPU_EVAL_SLICE_BYTES", 3 * 8 * 8 * 8 * 4)  # slices of 3
    with torch.no_grad():
        want = ref(x)
    for ctx in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with ctx():
            got = fused(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got.add_(1)  # a no_grad output is an ordinary tensor
