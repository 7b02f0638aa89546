"""Each fused op against plain PyTorch: outputs, every gradient, running statistics; opcheck; every config."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused.backends.triton  # noqa: F401  (importing the Triton backend registers the ops)
from resnet_fused.ops import implicit_gemm as ig
from resnet_fused.ops import launch

ops = torch.ops.resnet_fused


def close(a, b, rtol=1e-4, atol=1e-5, msg=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def ref_conv_bn_stats(x, w, s, t, stride, pad):
    a = torch.relu(x * s[None, :, None, None] + t[None, :, None, None]) if s is not None else x
    y = F.conv2d(a, w, stride=stride, padding=pad)
    return y, y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)


# (batch, c_in, c_out, h, w, kernel, stride, pad)
CONV_SHAPES = [(2, 1, 16, 7, 7, 3, 1, 1), (1, 5, 12, 9, 7, 3, 2, 1), (3, 4, 6, 11, 11, 1, 2, 0),
               (2, 16, 16, 8, 8, 3, 1, 1), (1, 32, 12, 6, 5, 3, 2, 1)]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
@pytest.mark.parametrize("prologue", [False, True])
def test_conv_bn_stats_forward_and_backward(dev, shape, prologue):
    torch.manual_seed(0)
    nb, ci, co, h, w, k, s, p = shape
    x = nhwc(torch.randn(nb, ci, h, w, device=dev)).requires_grad_()
    wt = torch.randn(co, ci, k, k, device=dev, requires_grad=True)
    sc = (torch.rand(ci, device=dev) + 0.5).requires_grad_() if prologue else None
    sh = (torch.randn(ci, device=dev) * 0.5).requires_grad_() if prologue else None
    y, mean, var = ops.conv_bn_stats(x, wt, sc, sh, s, p)
    ry, rmean, rvar = ref_conv_bn_stats(x, wt, sc, sh, s, p)
    close(y, ry, msg="y"), close(mean, rmean, msg="mean"), close(var, rvar, msg="var")
    assert y.is_contiguous(memory_format=torch.channels_last)
    gy, gm, gv = torch.randn_like(ry), torch.randn_like(rmean), torch.randn_like(rvar)
    inputs = [x, wt] + ([sc, sh] if prologue else [])
    got = torch.autograd.grad((y, mean, var), inputs, (gy, gm, gv))
    want = torch.autograd.grad((ry, rmean, rvar), inputs, (gy, gm, gv))
    for name, g, r in zip(["x", "w", "scale", "shift"], got, want):
        close(g, r, rtol=2e-4, atol=1e-4, msg=f"grad {name}")


@pytest.mark.parametrize("prologue,affine", [(False, "both"), (True, "both"), (True, "bias"), (False, "none")],
                         ids=str)
def test_conv_bn_train_is_conv_bn_stats_then_bn_scale_shift(dev, prologue, affine):
    """conv_bn_train (the BN affine from the statistics' finalize launch, its backward from the coefficient launch)
    gives what conv_bn_stats followed by bn_scale_shift gives: every output, and every input's gradient (bn
    weight/bias too), with and without an upstream gradient of the statistics themselves."""
    torch.manual_seed(1)
    nb, ci, co, h, w = 2, 5, 12, 7, 7
    x = nhwc(torch.randn(nb, ci, h, w, device=dev)).requires_grad_()
    wt = torch.randn(co, ci, 3, 3, device=dev, requires_grad=True)
    sc = (torch.rand(ci, device=dev) + 0.5).requires_grad_() if prologue else None
    sh = (torch.randn(ci, device=dev) * 0.5).requires_grad_() if prologue else None
    g = (torch.rand(co, device=dev) + 0.5).requires_grad_() if affine == "both" else None
    b = torch.randn(co, device=dev, requires_grad=True) if affine in ("both", "bias") else None
    got = ops.conv_bn_train(x, wt, sc, sh, g, b, eps=1e-5, stride=2, padding=1)
    y, mean, var = ops.conv_bn_stats(x, wt, sc, sh, 2, 1)
    want = (y, mean, var, *ops.bn_scale_shift(mean, var, g, b, eps=1e-5))
    for name, a, r in zip(["y", "mean", "var", "scale", "shift"], got, want):
        close(a, r, rtol=1e-6, atol=1e-6, msg=name)
    inputs = [t for t in (x, wt, sc, sh, g, b) if t is not None]
    for stats_grads in (False, True):
        outs = [torch.randn_like(t) for t in want]
        if not stats_grads:  # FusedResNet's case: mean/var go only to the running update (detached)
            outs[1] = outs[2] = None
        pick = [i for i in range(5) if outs[i] is not None]
        ga = torch.autograd.grad([got[i] for i in pick], inputs, [outs[i] for i in pick], retain_graph=True)
        gr = torch.autograd.grad([want[i] for i in pick], inputs, [outs[i] for i in pick], retain_graph=True)
        for i, (a, r) in enumerate(zip(ga, gr)):
            close(a, r, rtol=1e-5, atol=1e-6, msg=f"grad {i} (stats grads {stats_grads})")
    with pytest.raises(ValueError, match="bn_weight must be a \\[12\\]"):
        ops.conv_bn_train(x, wt, sc, sh, torch.ones(5, device=dev), b, eps=1e-5, stride=2, padding=1)


# (batch, c_in of the block, c_out, h, w of the block input, stride)
PROJ_SHAPES = [(2, 4, 8, 9, 9, 2), (1, 5, 12, 7, 7, 1), (3, 16, 16, 8, 6, 2)]


@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=str)
def test_conv_bn_stats_proj_forward_and_backward(dev, shape):
    """conv2 (3x3 on relu(h*s+t)) and the option-B projection (1x1, stride) of x from one launch, each with its
    statistics, against two separate PyTorch convolutions; every input's gradient."""
    torch.manual_seed(0)
    nb, ci, co, hh, ww, st = shape
    x = nhwc(torch.randn(nb, ci, hh, ww, device=dev)).requires_grad_()
    oh, ow = (hh - 1) // st + 1, (ww - 1) // st + 1
    h = nhwc(torch.randn(nb, co, oh, ow, device=dev)).requires_grad_()
    w2 = torch.randn(co, co, 3, 3, device=dev, requires_grad=True)
    wp = torch.randn(co, ci, 1, 1, device=dev, requires_grad=True)
    sc = (torch.rand(co, device=dev) + 0.5).requires_grad_()
    sh = (torch.randn(co, device=dev) * 0.5).requires_grad_()
    got = ops.conv_bn_stats_proj(h, w2, sc, sh, x, wp, st)
    want = ref_conv_bn_stats(h, w2, sc, sh, 1, 1) + ref_conv_bn_stats(x, wp, None, None, st, 0)
    for name, a, b in zip(["y", "mean", "var", "ys", "mean_s", "var_s"], got, want):
        close(a, b, msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[3].is_contiguous(memory_format=torch.channels_last)
    grads = [torch.randn_like(t) for t in want]
    inputs = [h, w2, sc, sh, x, wp]
    for name, a, b in zip(["h", "w2", "scale", "shift", "x", "w_proj"], torch.autograd.grad(got, inputs, grads),
                          torch.autograd.grad(want, inputs, grads)):
        close(a, b, rtol=2e-4, atol=1e-4, msg=f"grad {name}")


def test_conv_bn_stats_proj_rejects_mismatched_branches(dev):
    h = nhwc(torch.randn(2, 8, 5, 5, device=dev))
    x = nhwc(torch.randn(2, 4, 9, 9, device=dev))
    w2, wp = torch.randn(8, 8, 3, 3, device=dev), torch.randn(8, 4, 1, 1, device=dev)
    s = torch.ones(8, device=dev)
    with pytest.raises(ValueError, match="must give outputs of one shape"):
        ops.conv_bn_stats_proj(h, w2, s, s, x, wp, 1)  # stride 1 gives 9x9, not 5x5


def test_conv_bn_stats_non_contiguous_input(dev):
    torch.manual_seed(1)
    big = torch.randn(2, 6, 10, 12, device=dev)
    x = big[:, 1:5, 1:9, ::2]  # channel slice, spatial crop, stride-2 columns: no copy made by the op
    wt = torch.randn(8, 4, 3, 3, device=dev)
    y, mean, var = ops.conv_bn_stats(x, wt, None, None, 1, 1)
    ry, rmean, rvar = ref_conv_bn_stats(x, wt, None, None, 1, 1)
    close(y, ry), close(mean, rmean), close(var, rvar)


MODES = [(0, 8, 8, 1), (1, 8, 8, 1), (2, 4, 8, 2), (2, 3, 8, 2), (3, 8, 8, 1)]


@pytest.mark.parametrize("index64", [False, True], ids=["i32", "i64"])
@pytest.mark.parametrize("mode,cin,c,stride", MODES, ids=str)
def test_bn_add_relu(dev, mode, cin, c, stride, index64, monkeypatch):
    """Both index paths: 32-bit (these sizes) and the 64-bit one huge tensors take (the limit lowered to 0)."""
    if index64:
        monkeypatch.setattr(launch, "INT32_LIMIT", 0)
    torch.manual_seed(0)
    nb, h, w = 3, 5, 7
    y = nhwc(torch.randn(nb, c, h, w, device=dev)).requires_grad_()
    s = (torch.rand(c, device=dev) + 0.5).requires_grad_()
    t = torch.randn(c, device=dev).requires_grad_()
    res, rs, rt, pf = None, None, None, 0
    if mode == 1:
        res = nhwc(torch.randn(nb, c, h, w, device=dev)).requires_grad_()
    elif mode == 2:
        res = nhwc(torch.randn(nb, cin, h * stride, w * stride, device=dev)).requires_grad_()
        pf = (c - cin) // 2
    elif mode == 3:
        res = nhwc(torch.randn(nb, c, h, w, device=dev)).requires_grad_()
        rs = (torch.rand(c, device=dev) + 0.5).requires_grad_()
        rt = torch.randn(c, device=dev).requires_grad_()
    out = ops.bn_add_relu(y, s, t, res, rs, rt, mode, stride, pf, True)
    ref = y * s[:, None, None] + t[:, None, None]
    if mode == 1:
        ref = ref + res
    elif mode == 2:
        ref = ref + F.pad(res[:, :, ::stride, ::stride], (0, 0, 0, 0, pf, c - cin - pf))
    elif mode == 3:
        ref = ref + res * rs[:, None, None] + rt[:, None, None]
    ref = torch.relu(ref)
    close(out, ref)
    g = torch.randn_like(ref)
    inputs = [v for v in (y, s, t, res, rs, rt) if v is not None]
    for name, a, b in zip("y s t res rs rt".split(), torch.autograd.grad(out, inputs, g),
                          torch.autograd.grad(ref, inputs, g)):
        close(a, b, msg=f"grad {name}")


@pytest.mark.parametrize("c", [1, 13, 64, 1500])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_scale_shift_and_its_gradient(dev, c, affine):
    """(scale, shift) from the batch statistics, and the VJP to mean, var, weight and bias, against the PyTorch
    formula under autograd; c = 1500 spans two channel blocks."""
    torch.manual_seed(c)
    mean = torch.randn(c, device=dev, requires_grad=True)
    var = (torch.rand(c, device=dev) * 3).requires_grad_()
    w = (torch.rand(c, device=dev) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, device=dev, requires_grad=True) if affine else None
    scale, shift = ops.bn_scale_shift(mean, var, w, b, 1e-5)
    rs = torch.rsqrt(var + 1e-5) * (w if affine else 1.0)
    rt = (b if affine else 0.0) - mean * rs
    close(scale, rs, msg="scale"), close(shift, rt, msg="shift")
    inputs = [mean, var] + ([w, b] if affine else [])
    gs, gt = torch.randn(c, device=dev), torch.randn(c, device=dev)
    for outs, grads in (((scale, shift), (gs, gt)), ((scale,), (gs,)), ((shift,), (gt,))):
        ref_outs = (rs, rt) if len(outs) == 2 else ((rs,) if outs[0] is scale else (rt,))
        got = torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref_outs, inputs, grads, retain_graph=True, allow_unused=True)
        for name, a, r in zip(["mean", "var", "weight", "bias"], got, want):
            if r is None:
                assert a is None or not a.abs().any(), name
            else:
                close(a, r, msg=f"grad {name}")


def test_bn_running_update_matches_batchnorm(dev):
    """One launch updates several BatchNorms as nn.BatchNorm2d would: different widths (one past a block of
    channels), counts and momenta, the cumulative average (momentum None), a bf16 running buffer."""
    torch.manual_seed(0)
    specs = [(5, 0.1, torch.float32), (1030, None, torch.float32), (3, 0.3, torch.bfloat16), (16, None, torch.float32)]
    bns = [torch.nn.BatchNorm2d(c, momentum=m).to(dev) for c, m, _ in specs]
    mine = [torch.nn.BatchNorm2d(c, momentum=m).to(dev) for c, m, _ in specs]
    for (_, _, dt), b, bm in zip(specs, bns, mine):
        b.to(dt), bm.to(dt)
    for step in range(3):
        xs = [(torch.randn(4, c, 3 + i, 3, device=dev) * 3 + 1).to(dt) for i, (c, _, dt) in enumerate(specs)]
        for b, x in zip(bns, xs):
            b(x)
        ops.bn_running_update([b.running_mean for b in mine], [b.running_var for b in mine],
                              [b.num_batches_tracked for b in mine], [x.float().mean((0, 2, 3)) for x in xs],
                              [x.float().var((0, 2, 3), unbiased=False) for x in xs],
                              [x.shape[0] * x.shape[2] * x.shape[3] for x in xs],
                              [0.0 if m is None else m for _, m, _ in specs], [m is None for _, m, _ in specs])
    for (c, m, dt), b, bm in zip(specs, bns, mine):
        tol = {} if dt == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        close(bm.running_mean, b.running_mean, **tol), close(bm.running_var, b.running_var, **tol)
        assert bm.num_batches_tracked.item() == b.num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="one entry per BatchNorm"):
        ops.bn_running_update([bns[0].running_mean], [], [], [], [], [], [], [])


@pytest.mark.parametrize("n,c,hw,k,bias", [(1, 64, 7, 10, True), (37, 13, 3, 10, False), (16, 64, 1, 47, True),
                                           (2, 512, 1, 16, True), (3, 32, 2, 256, False)], ids=str)
def test_pool_linear_matches_pytorch(dev, n, c, hw, k, bias):
    """Global average pool + linear, forward and every gradient, against F.linear(x.mean((2, 3))): batch 1, 7x7,
    channels and classes not multiples of 8 or 16, no bias, a 1x1 map; the weight gradient in the weight's
    layout."""
    torch.manual_seed(0)
    f = nhwc(torch.randn(n, c, hw, hw, device=dev)).requires_grad_()
    w = torch.randn(k, c, device=dev).requires_grad_()
    b = torch.randn(k, device=dev).requires_grad_() if bias else None
    logits, pooled = ops.pool_linear(f, w, b, out_dtype=torch.float32)
    ref = F.linear(f.mean((2, 3)), w, b)
    close(logits, ref), close(pooled, f.detach().mean((2, 3)))
    g = torch.randn_like(ref)
    got = torch.autograd.grad(logits, [f, w] + ([b] if bias else []), g)
    want = torch.autograd.grad(ref, [f, w] + ([b] if bias else []), g)
    for name, a, r in zip(["feats", "weight", "bias"], got, want):
        close(a, r, msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert not ig.semaphores(f.device, 1).any()


def test_pool_linear_takes_only_heads_whose_tile_compiles():
    """fits(): the extreme heads it admits (each compiled for sm_90 by kernel_report --heads extremes) and nothing
    with a larger weight tile: 256 x 256 needs more shared memory than an sm_90 block may have."""
    from resnet_fused.ops import pool_linear as pl
    for c, k in pl.EXTREME_HEADS:
        assert pl.fits(c, k) and pl.fits(c - 3, k - 1)
        assert not pl.fits(2 * c, k) and not pl.fits(c, 2 * k) and not pl.fits(c + 1, k)
    assert pl.fits(64, 10) and pl.fits(64, 100) and not pl.fits(128, 128) and not pl.fits(512, 256)
    assert not pl.fits(0, 10) and not pl.fits(1024, 1)
    with pytest.raises(ValueError, match="weight tile"):
        ops.pool_linear(torch.randn(2, 256, 1, 1), torch.randn(256, 256), None, out_dtype=torch.float32)


def test_pool_linear_low_precision_and_its_errors(dev):
    """bf16 features with fp32 weights (autocast): logits in bf16 within 2x PyTorch's own bf16 error; gradients
    of the fp32 weights in fp32. Bad shapes are a clear error."""
    torch.manual_seed(1)
    f32 = nhwc(torch.randn(8, 24, 4, 4, device=dev))
    w = torch.randn(10, 24, device=dev).requires_grad_()
    b = torch.randn(10, device=dev)
    want = F.linear(f32.mean((2, 3)), w, b)
    logits, _ = ops.pool_linear(f32.bfloat16(), w, b, out_dtype=torch.bfloat16)
    pt = F.linear(f32.bfloat16().mean((2, 3)), w.bfloat16(), b.bfloat16())
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - want).abs().max() <= 2 * (pt.float() - want).abs().max() + 1e-2
    (gw,) = torch.autograd.grad(logits.float().sum(), [w])
    assert gw.dtype == torch.float32
    with pytest.raises(ValueError, match=r"weight \[K, 24\]"):
        ops.pool_linear(f32, torch.randn(10, 23, device=dev), None, out_dtype=torch.float32)
    nchw = torch.randn(2, 24, 4, 4, device=dev)  # contiguous NCHW features work too
    close(ops.pool_linear(nchw, w.detach(), b, out_dtype=torch.float32)[0], F.linear(nchw.mean((2, 3)), w, b))
    with pytest.raises(ValueError, match="evenly strided"):
        ops.pool_linear(torch.randn(2, 24, 8, 4, device=dev)[:, :, ::2], w.detach(), b, out_dtype=torch.float32)


@pytest.mark.parametrize("mode", ["none", "identity", "A", "B"])
def test_conv_bn_act_inference(dev, mode):
    torch.manual_seed(0)
    nb, c, h = 2, 8, 6
    stride = 2 if mode in ("A", "B") else 1
    cin = 4 if stride == 2 else c
    x = nhwc(torch.randn(nb, c, h, h, device=dev))
    xin = nhwc(torch.randn(nb, cin, h * stride, h * stride, device=dev))
    w, b = torch.randn(c, c, 3, 3, device=dev), torch.randn(c, device=dev)
    ref = F.conv2d(x, w, padding=1) + b[:, None, None]
    res, x2, w2, rm = None, None, None, 0
    if mode == "identity":
        res, rm = nhwc(torch.randn(nb, c, h, h, device=dev)), 1
        ref = ref + res
    elif mode == "A":
        res, rm = xin, 2
        ref = ref + F.pad(xin[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
    elif mode == "B":
        x2, w2, rm = xin, torch.randn(c, cin, 1, 1, device=dev), 3
        ref = ref + F.conv2d(xin, w2, stride=2)
    out = ops.conv_bn_act(x, w, b, res, x2, w2, 1, 1, rm, stride, 2, True)
    close(out, torch.relu(ref))


@pytest.mark.parametrize("cfg", range(len(ig.CONV_CONFIGS)))
def test_every_conv_config(dev, cfg):
    """Every shipped block-size config computes the same forward, input gradient and statistics."""
    torch.manual_seed(0)
    x = nhwc(torch.randn(2, 16, 9, 9, device=dev))
    w = torch.randn(24, 16, 3, 3, device=dev)
    config = ig.CONV_CONFIGS[cfg]
    y, (mean, var) = ig.conv_launch(x, w, 3, 3, 2, 1, (5, 5), stats=1, config=config)
    close(y, F.conv2d(x, w, stride=2, padding=1))
    close(mean, y.mean((0, 2, 3))), close(var, y.var((0, 2, 3), unbiased=False))
    dy = nhwc(torch.randn(2, 24, 5, 5, device=dev))
    gx, _ = ig.conv_launch(dy, w, 3, 3, 2, 1, (9, 9), transposed=True, config=config)
    close(gx, torch.nn.grad.conv2d_input(x.shape, w, dy, stride=2, padding=1))
    # the dual-output (option-B train) variant of the same kernel
    h = nhwc(torch.randn(2, 24, 5, 5, device=dev))
    w2 = torch.randn(24, 24, 3, 3, device=dev)
    wp = torch.randn(24, 16, 1, 1, device=dev)
    (y2, ys), (m2, v2, ms, vs) = ig.conv_launch(h, w2, 3, 3, 1, 1, (5, 5), x2=x, w2=wp, stride2=2, dual_out=True,
                                                stats=1, config=config)
    close(y2, F.conv2d(h, w2, padding=1)), close(ys, F.conv2d(x, wp, stride=2))
    close(m2, y2.mean((0, 2, 3))), close(v2, y2.var((0, 2, 3), unbiased=False))
    close(ms, ys.mean((0, 2, 3))), close(vs, ys.var((0, 2, 3), unbiased=False))
    assert not ig.semaphores(dev, 1).any()


@pytest.mark.parametrize("taps,index64", [(True, False), (True, True), (False, False)], ids=["taps", "taps-i64",
                                                                                          "per-element"])
@pytest.mark.parametrize("cin", [16, 32, 48])
def test_conv_per_tap_gather_matches_the_reference(dev, cin, taps, index64, monkeypatch):
    """The per-tap gather (channels a multiple of 16: every K block inside one 3x3 tap) and the per-element one,
    through every gather variant: plain and stride 2, the BN-ReLU prologue (PRO 1), the input gradient with BN's
    backward prologue (PRO 2, transposed, stride 2), the option-B projection beside it (DUAL), 32- and 64-bit
    indices."""
    monkeypatch.setattr(ig, "TAP_BLOCKS", taps)
    if index64:
        monkeypatch.setattr(launch, "INT32_LIMIT", 0)
    cfg = ig.CONV_CONFIGS[0]  # BLOCK_K 32: 16 and 48 channels drop it to 16, 32 keeps it
    bk, flags = ig.tap_blocks(cfg, cin, 24)
    assert flags == (taps, False) and bk == (min(32, cin & -cin) if taps else 32)
    torch.manual_seed(cin)
    x = nhwc(torch.randn(2, cin, 9, 7, device=dev))
    w = torch.randn(20, cin, 3, 3, device=dev)
    s, t = torch.rand(cin, device=dev) + 0.5, torch.randn(cin, device=dev) * 0.5
    a = torch.relu(x * s[None, :, None, None] + t[None, :, None, None])
    for stride in (1, 2):
        oh, ow = ig.conv_out_hw(9, 7, 3, stride, 1)
        y, (mean, var) = ig.conv_launch(x, w, 3, 3, stride, 1, (oh, ow), pro=1, pa=s, pb=t, stats=1, config=cfg)
        close(y, F.conv2d(a, w, stride=stride, padding=1), msg=f"forward stride {stride}")
        close(var, y.var((0, 2, 3), unbiased=False), msg="var")
    wt = torch.randn(cin, 20, 3, 3, device=dev)  # input gradient: the gathered operand has cin channels
    dy, yy = (nhwc(torch.randn(2, cin, 5, 4, device=dev)) for _ in range(2))
    c1, c2 = torch.randn(cin, device=dev), torch.randn(cin, device=dev)
    gx, _ = ig.conv_launch(dy, wt, 3, 3, 2, 1, (9, 7), transposed=True, pro=2, a2=yy, pa=c1, pb=c2, config=cfg)
    g = dy + yy * c2[None, :, None, None] + c1[None, :, None, None]
    close(gx, torch.nn.grad.conv2d_input((2, 20, 9, 7), wt, g, stride=2, padding=1), msg="input gradient")
    h = nhwc(torch.randn(2, cin, 5, 4, device=dev))
    w2 = torch.randn(cin, cin, 3, 3, device=dev)
    for c_x in (16, 24):
        xs = nhwc(torch.randn(2, c_x, 9, 7, device=dev))
        wp = torch.randn(cin, c_x, 1, 1, device=dev)
        (y2, ys), _ = ig.conv_launch(h, w2, 3, 3, 1, 1, (5, 4), x2=xs, w2=wp, stride2=2, dual_out=True, stats=1,
                                     config=cfg)
        close(y2, F.conv2d(h, w2, padding=1), msg="dual conv"), close(ys, F.conv2d(xs, wp, stride=2), msg="proj")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_conv_reads_the_weight_where_it_lies(dev, layout):
    """The implicit GEMM reads B from the conv weight in place through its strides (no permuted copy per step):
    forward, input gradient and the option-B 1x1 weight, whatever the weight's layout."""
    torch.manual_seed(3)
    w = torch.randn(12, 6, 3, 3, device=dev)
    wp = torch.randn(12, 5, 1, 1, device=dev)
    if layout == "channels_last":
        w, wp = (t.contiguous(memory_format=torch.channels_last) for t in (w, wp))
    elif layout == "strided":  # every other input channel of a wider weight, a transposed 1x1
        w = torch.randn(12, 12, 3, 3, device=dev)[:, ::2]
        wp = torch.randn(5, 12, 1, 1, device=dev).transpose(0, 1)
    x = nhwc(torch.randn(2, 6, 7, 7, device=dev))
    y, _ = ig.conv_launch(x, w, 3, 3, 1, 1, (7, 7))
    close(y, F.conv2d(x, w, padding=1))
    dy = nhwc(torch.randn(2, 12, 4, 4, device=dev))
    gx, _ = ig.conv_launch(dy, w, 3, 3, 2, 1, (7, 7), transposed=True)
    close(gx, torch.nn.grad.conv2d_input(x.shape, w, dy, stride=2, padding=1))
    h = nhwc(torch.randn(2, 6, 4, 4, device=dev))
    xs = nhwc(torch.randn(2, 5, 7, 7, device=dev))
    out, _ = ig.conv_launch(h, w, 3, 3, 1, 1, (4, 4), x2=xs, w2=wp, stride2=2)
    close(out, F.conv2d(h, w, padding=1) + F.conv2d(xs, wp, stride=2))
    with pytest.raises(ValueError, match="does not fit"):
        ig.conv_launch(x, w[:, :5], 3, 3, 1, 1, (7, 7))


def test_fp32_weights_with_half_activations(dev):
    """Under autocast the fp32 parameters go to the kernels as they are (cast on load, no per-step weight copy):
    the same output and statistics as with the weight cast first, and the weight gradient in fp32."""
    torch.manual_seed(4)
    x = nhwc(torch.randn(2, 8, 6, 6, device=dev)).half()
    w = torch.randn(8, 8, 3, 3, device=dev, requires_grad=True)
    w16 = w.detach().half().requires_grad_()
    outs = [ops.conv_bn_stats(x, wt, None, None, 1, 1) for wt in (w, w16)]
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for (y, m, v), wt in zip(outs, (w, w16)):
        (y.float().square().mean() + m.sum() + v.sum()).backward()
    assert w.grad.dtype == torch.float32 and w16.grad.dtype == torch.float16
    close(w.grad, w16.grad.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("cfg", range(len(ig.WGRAD_CONFIGS)))
def test_every_wgrad_config(dev, cfg):
    torch.manual_seed(0)
    x = nhwc(torch.randn(3, 16, 9, 9, device=dev))
    dy = nhwc(torch.randn(3, 24, 5, 5, device=dev))
    dw = ig.wgrad_launch(dy, x, 3, 3, 2, 1, config=ig.WGRAD_CONFIGS[cfg])
    ref = torch.nn.grad.conv2d_weight(x, (24, 16, 3, 3), dy, stride=2, padding=1)
    close(dw, ref, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("taps,index64", [(True, False), (True, True), (False, False)], ids=["taps", "taps-i64",
                                                                                          "per-element"])
@pytest.mark.parametrize("cfg", [0, 1])
def test_wgrad_per_tap_gather_matches_the_reference(dev, cfg, taps, index64, monkeypatch):
    """The weight gradient's per-tap gather (C_in a multiple of BLOCK_R: each program's columns inside one tap)
    and the per-element one, with the layer-input prologue relu(x*s+t), stride 2, 32- and 64-bit indices."""
    monkeypatch.setattr(ig, "TAP_BLOCKS", taps)
    if index64:
        monkeypatch.setattr(launch, "INT32_LIMIT", 0)
    torch.manual_seed(cfg)
    x = nhwc(torch.randn(2, 64, 9, 7, device=dev))
    s, t = torch.rand(64, device=dev) + 0.5, torch.randn(64, device=dev) * 0.5
    dy = nhwc(torch.randn(2, 20, 5, 4, device=dev))
    dw = ig.wgrad_launch(dy, x, 3, 3, 2, 1, xs=s, xt=t, config=ig.WGRAD_CONFIGS[cfg])
    a = torch.relu(x * s[None, :, None, None] + t[None, :, None, None])
    close(dw, torch.nn.grad.conv2d_weight(a, (20, 64, 3, 3), dy, stride=2, padding=1), rtol=2e-4, atol=1e-4)
    assert not ig.semaphores(dev, 1).any()


def _opcheck_cases(dev):
    torch.manual_seed(0)
    x = nhwc(torch.randn(2, 4, 6, 6, device=dev))
    w = torch.randn(8, 4, 3, 3, device=dev)
    s, t = torch.rand(4, device=dev) + 0.5, torch.randn(4, device=dev)
    y = nhwc(torch.randn(2, 8, 6, 6, device=dev))
    c8 = torch.rand(8, device=dev) + 0.5
    return [
        (ops.pool_linear.default, (y.detach().requires_grad_(), torch.randn(10, 8, device=dev, requires_grad=True),
                                   torch.randn(10, device=dev, requires_grad=True), torch.float32)),
        (ops.conv_bn_stats.default, (x.requires_grad_(), w.requires_grad_(), None, None, 1, 1)),
        (ops.conv_bn_stats.default, (x, w, s.requires_grad_(), t.requires_grad_(), 2, 1)),
        (ops.bn_add_relu.default, (y.requires_grad_(), c8.requires_grad_(), torch.randn(8, device=dev),
                                   x, None, None, 2, 1, 2, True)),
        (ops.bn_add_relu.default, (y, c8, c8, y.detach().clone(), c8, c8, 3, 1, 0, True)),
        (ops.conv_bn_act.default, (x.detach(), w.detach(), torch.randn(8, device=dev), None, None, None, 1, 1, 0, 1,
                                   0, True)),
        (ops.bn_running_update.default, ([torch.zeros(8, device=dev), torch.zeros(4, device=dev)],
                                         [torch.ones(8, device=dev), torch.ones(4, device=dev)],
                                         [torch.zeros((), dtype=torch.long, device=dev) for _ in range(2)],
                                         [c8, c8[:4] + 1], [c8, c8[:4]], [10, 3], [0.1, 0.0], [False, True])),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(dev, case):
    op, args = _opcheck_cases(dev)[case]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops(dev):
    torch.manual_seed(0)
    x = nhwc(torch.randn(2, 4, 6, 6, device=dev))
    w = torch.randn(8, 4, 3, 3, device=dev)
    s, t = torch.rand(4, device=dev) + 0.5, torch.randn(4, device=dev)
    y, mean, var = ops.conv_bn_stats(x, w, s, t, 1, 1)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.conv_bn_stats_backward.default,
                          (g, torch.randn(8, device=dev), torch.randn(8, device=dev), x, w, s, t, y, mean, 1, 1,
                           True, True))
    out = ops.bn_add_relu(y, mean, var, None, None, None, 0, 1, 0, True)
    torch.library.opcheck(ops.bn_add_relu_backward.default, (g, out, y, mean, None, None, 0, 1, 0, True))


def test_opcheck_bn_scale_shift(dev):
    m, v = torch.randn(6, device=dev).requires_grad_(), (torch.rand(6, device=dev) + 0.1).requires_grad_()
    w, b = (torch.rand(6, device=dev) + 0.5).requires_grad_(), torch.randn(6, device=dev).requires_grad_()
    torch.library.opcheck(ops.bn_scale_shift.default, (m, v, w, b, 1e-5))
    torch.library.opcheck(ops.bn_scale_shift.default, (m, v, None, None, 1e-3))
    g = torch.randn(6, device=dev)
    torch.library.opcheck(ops.bn_scale_shift_backward.default, (g, None, m.detach(), v.detach(), w.detach(), 1e-5))


def test_opcheck_conv_bn_stats_proj(dev):
    torch.manual_seed(0)
    x = nhwc(torch.randn(2, 4, 7, 7, device=dev)).requires_grad_()
    h = nhwc(torch.randn(2, 8, 4, 4, device=dev)).requires_grad_()
    w2 = torch.randn(8, 8, 3, 3, device=dev, requires_grad=True)
    wp = torch.randn(8, 4, 1, 1, device=dev, requires_grad=True)
    s, t = (torch.rand(8, device=dev) + 0.5).requires_grad_(), torch.randn(8, device=dev).requires_grad_()
    torch.library.opcheck(ops.conv_bn_stats_proj.default, (h, w2, s, t, x, wp, 2))


@pytest.mark.parametrize("cout,cin,k,stride,dtype", [(8, 3, 3, 1, torch.float32), (13, 5, 3, 2, torch.float32),
                                                    (16, 8, 1, 2, torch.bfloat16)], ids=str)
def test_wgrad_layout_and_dtype(dev, cout, cin, k, stride, dtype):
    """The weight gradient comes out in PyTorch's [Co, Ci, kh, kw] layout (or the weight's, ``like=``) and the
    weight's dtype, summed over the split row ranges inside the one launch; the counters it finishes with are left
    at zero for the next launch."""
    torch.manual_seed(0)
    x = nhwc(torch.randn(3, cin, 9, 9, device=dev))
    oh = (9 + 2 * (k // 2) - k) // stride + 1
    dy = nhwc(torch.randn(3, cout, oh, oh, device=dev))
    want = torch.nn.grad.conv2d_weight(x, (cout, cin, k, k), dy, stride=stride, padding=k // 2)
    dw = ig.wgrad_launch(dy, x, k, k, stride, k // 2, dtype=dtype)
    assert dw.dtype == dtype and dw.shape == (cout, cin, k, k) and dw.is_contiguous()
    tol = dict(rtol=2e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=2e-2)  # 1 bf16 ulp
    close(dw.float(), want, **tol)
    like = torch.empty(cout, cin, k, k, device=dev).contiguous(memory_format=torch.channels_last)
    dw_cl = ig.wgrad_launch(dy, x, k, k, stride, k // 2, dtype=dtype, like=like)
    assert dw_cl.stride() == like.stride() and torch.equal(dw_cl, dw)
    assert not ig.semaphores(dev, 1).any()


@pytest.mark.parametrize("has_gm,has_gv", [(True, True), (True, False), (False, True), (False, False)])
def test_bn_grad_coeffs(dev, has_gm, has_gv):
    from resnet_fused.ops.bn_grad_coeffs import bn_grad_coeffs
    c, m = 37, 96
    gm = torch.randn(c, device=dev) if has_gm else None
    gv = torch.randn(c, device=dev) if has_gv else None
    mean = torch.randn(c, device=dev)
    c1, c2 = bn_grad_coeffs(gm, gv, mean, m)
    want2 = 2 * gv / m if has_gv else torch.zeros(c, device=dev)
    want1 = (gm / m if has_gm else torch.zeros(c, device=dev)) - want2 * mean
    close(c1, want1), close(c2, want2)


def test_launch_choices_for_a_gpu_from_cpu_tensors(monkeypatch):
    """What kernel_report compiles: with COMPILE_FOR_GPU_SMS set, CPU tensors get a GPU's launch choices (tiles by
    the SM count, TF32 for fp32 as cudnn.allow_tf32, split counts); unset, the interpreter's."""
    cpu = torch.device("cpu")
    assert ig.conv_config(10**6, 16, 144, cpu) == dict(ig.CONV_CONFIGS[3], BLOCK_N=16, BLOCK_K=16)
    assert ig.dot_precision(torch.float32, cpu) == "ieee"
    monkeypatch.setattr(launch, "COMPILE_FOR_GPU_SMS", 132)
    big, small = 2 * 128 * 132, 2 * 128 * 132 - 1
    assert ig.conv_config(big, 64, 576, cpu)["BLOCK_M"] == ig.CONV_CONFIGS[1]["BLOCK_M"] == 128
    assert ig.conv_config(big, 128, 576, cpu)["BLOCK_N"] == ig.CONV_CONFIGS[2]["BLOCK_N"] == 128
    assert ig.conv_config(small, 64, 576, cpu) == dict(ig.CONV_CONFIGS[0], BLOCK_N=64, BLOCK_K=32)
    # the input gradient with BN's backward on load and the prologue's gradient sums: 8 warps at 64 channels
    assert ig.conv_config(big, 64, 576, cpu, heavy=True) == dict(ig.CONV_CONFIGS[4], BLOCK_N=64, BLOCK_K=32)
    assert ig.conv_config(big, 32, 288, cpu, heavy=True) == dict(ig.CONV_CONFIGS[1], BLOCK_N=32, BLOCK_K=32)
    assert ig.conv_config(big, 128, 576, cpu, heavy=True)["num_warps"] == 8
    monkeypatch.setattr(launch, "COMPILE_FOR_GPU_SMS", 66)  # a smaller GPU fills with fewer rows
    assert ig.conv_config(small, 64, 576, cpu)["BLOCK_M"] == 128
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert ig.dot_precision(torch.float32, cpu) == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert ig.dot_precision(torch.float32, cpu) == "ieee"
    splits = {}
    for sms in (66, 132):  # the weight gradient's row split fills the GPU it is chosen for
        monkeypatch.setattr(launch, "COMPILE_FOR_GPU_SMS", sms)
        splits[sms] = ig.wgrad_split(512 * 28 * 28, 16, 144, ig.WGRAD_CONFIGS[0], cpu)[0]
    assert splits[132] > splits[66] > 1


@pytest.mark.parametrize("cfg", range(len(ig.WGRAD_CONFIGS)))
def test_weight_gradient_with_a_split_reduction(dev, cfg):
    """A shape whose weight gradient is reduced over several row ranges (split > 1) on every config."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16, device=dev).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 8, 16, 16, device=dev).contiguous(memory_format=torch.channels_last)
    config = ig.WGRAD_CONFIGS[cfg]
    split, _ = ig.wgrad_split(2 * 16 * 16, 8, 36, config, x.device)
    assert split > 1
    dw = ig.wgrad_launch(dy, x, 3, 3, 1, 1, config=config)
    ref = torch.nn.grad.conv2d_weight(x, (8, 4, 3, 3), dy, stride=1, padding=1)
    torch.testing.assert_close(dw, ref, rtol=2e-4, atol=1e-4)
    # the split partials were summed by the last program of each tile, which left the counters at zero
    assert not ig.semaphores(x.device, 1).any()
    torch.testing.assert_close(ig.wgrad_launch(dy, x, 3, 3, 1, 1, config=config), ref, rtol=2e-4, atol=1e-4)


def test_index64_quick_bound_agrees_with_the_reach(monkeypatch):
    """index64's quick bound (storage size, largest stride) never answers 32-bit where the exact reach needs 64:
    a dense tensor, a small view of a large storage, a size-1 dimension with a huge stride, and a limit lowered
    below the tensors' reach."""
    def reach(t):
        return sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 2 * max(t.stride()) + 2**16

    base = torch.empty(4096)
    cases = [torch.empty(2, 16, 8, 8), base[::64], base.as_strided((1, 4), (10**10, 1)),
             torch.empty(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)]
    for limit in (launch.INT32_LIMIT, 70_000, 0):
        monkeypatch.setattr(launch, "INT32_LIMIT", limit)
        for t in cases:
            assert launch.index64(t) == (reach(t) > limit), (tuple(t.shape), t.stride(), limit)
