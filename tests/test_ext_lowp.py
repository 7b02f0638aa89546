"""The C++/CUDA operators in bfloat16 and float16 (fp32 accumulation): every output and gradient within twice
PyTorch's own low-precision error, plus an atol, of the exact result (fp64 math on the same rounded inputs)."""
import pytest
import torch
import torch.nn.functional as F

from resnet_fused import ext

if not ext.available():
    pytest.skip(f"resnet_fused._C is not built: {ext.EXT_IMPORT_ERROR}", allow_module_level=True)

from test_ext import ref_ssar  # noqa: E402

ops = torch.ops.resnet_fused
LOWP = [torch.bfloat16, torch.float16]
ATOL = {torch.bfloat16: 2e-3, torch.float16: 3e-4}  # relative to the largest exact value


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not (torch.cuda.is_available() and ext.has_cuda()):
        pytest.skip("needs a CUDA device and the CUDA kernels")
    return torch.device(request.param)


def lowp(shape, dtype, device, seed, cl=True):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def check(name, ours, torch_own, exact, dtype):
    """max|ours - exact| <= 2 max|torch_own - exact| + atol * max|exact|"""
    exact = exact.double()
    err = (ours.double() - exact).abs().max().item()
    err_torch = (torch_own.double() - exact).abs().max().item()
    bound = 2 * err_torch + ATOL[dtype] * (exact.abs().max().item() + 1e-12)
    assert err <= bound, f"{name}: error {err:.3g} > 2 x PyTorch's {err_torch:.3g} + atol ({bound:.3g})"


def operands(dtype, device, mode, cin, c=13, n=3, h=7, w=5):
    """((y, a, b, r, ra, rb), pad_front): a low-precision activation y [n, c, h, w], its per-channel pair (scale,
    shift or weight, bias: fp32, as BatchNorm's are), the shortcut input r for the mode (option A: cin channels at
    twice the resolution, odd height) and option B's per-channel pair."""
    y = lowp((n, c, h, w), dtype, device, 1)
    a, b = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    r = ra = rb = None
    if mode == 2:
        r = lowp((n, cin, h * 2 - 1, w * 2), dtype, device, 2)
    elif mode:
        r = lowp((n, c, h, w), dtype, device, 3)
    if mode == 3:
        ra, rb = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    return (y, a, b, r, ra, rb), (c - cin) // 2 if mode == 2 else 0


def output_and_grads(fn, args, cast):
    """[fn(*inputs), the gradient of every given input] with the inputs cast (None stays None), for a fixed,
    non-uniform output gradient."""
    ins = [None if v is None else cast(v).detach().requires_grad_() for v in args]
    out = fn(*ins)
    g = torch.ones_like(out) * 0.5 + torch.arange(out.numel(), device=out.device).reshape(out.shape) % 3
    return [out] + list(torch.autograd.grad(out, [v for v in ins if v is not None], g.to(out.dtype)))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_bn_stats_low_precision(device, dtype):
    x = lowp((3, 13, 9, 7), dtype, device, 0)
    mean, var = ops.bn_stats(x)
    assert mean.dtype == var.dtype == torch.float32  # fp32 accumulation and results
    v_t, m_t = torch.var_mean(x, (0, 2, 3), correction=0)
    v_e, m_e = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    check("mean", mean, m_t, m_e, dtype)
    check("var", var, v_t, v_e, dtype)
    gm, gv = torch.randn(13, device=device), torch.randn(13, device=device)
    dx = ops.bn_stats_backward(gm, gv, x, mean)
    xe = x.double().requires_grad_()
    ve, me = torch.var_mean(xe, (0, 2, 3), correction=0)
    want = torch.autograd.grad((me * gm.double()).sum() + (ve * gv.double()).sum(), xe)[0]
    xt = x.clone().requires_grad_()
    vt, mt = torch.var_mean(xt, (0, 2, 3), correction=0)
    own = torch.autograd.grad((mt * gm.to(dtype)).sum() + (vt * gv.to(dtype)).sum(), xt)[0]
    assert dx.dtype == dtype
    check("d x", dx, own, want, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("mode,cin,stride", [(0, 13, 1), (1, 13, 1), (2, 6, 2), (3, 13, 1)])
def test_scale_shift_add_relu_low_precision(device, dtype, mode, cin, stride):
    args, pf = operands(dtype, device, mode, cin)
    ours = output_and_grads(lambda *a: ops.scale_shift_add_relu(*a, mode, stride, pf, True), args, lambda v: v)
    own = output_and_grads(lambda *a: ref_ssar(*a, mode, stride, pf), args, lambda v: v.to(dtype))
    exact = output_and_grads(lambda *a: ref_ssar(*a, mode, stride, pf), args, lambda v: v.double())
    assert ours[0].dtype == dtype
    for name, a, b, e in zip(["out", "d y", "d scale", "d shift", "d residual", "d res_scale", "d res_shift"],
                             ours, own, exact):
        check(name, a, b, e, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("mode,cin,stride", [(0, 13, 1), (1, 13, 1), (2, 6, 2), (3, 13, 1)])
def test_batch_norm_add_relu_low_precision(device, dtype, mode, cin, stride):
    """Training BatchNorm from the batch statistics + shortcut + ReLU, forward and every gradient (through the
    statistics too), against F.batch_norm in the same low precision and in fp64."""
    args, pf = operands(dtype, device, mode, cin)
    c = args[0].shape[1]

    def reference(y, wt, b, r, rw, rb):
        v = F.batch_norm(y, None, None, wt, b, True, 0.0, 1e-5)
        sc = F.batch_norm(r, None, None, rw, rb, True, 0.0, 1e-5) if mode == 3 else r
        one = torch.ones(c, dtype=y.dtype, device=y.device)
        return ref_ssar(v, None, None, sc, one if mode == 3 else None, one * 0 if mode == 3 else None, mode, stride,
                        pf)

    def fused(y, wt, b, r, rw, rb):
        with torch.no_grad():
            m, v = ops.bn_stats(y)
            rm, rv = ops.bn_stats(r) if mode == 3 else (None, None)
        invstd = (v + 1e-5).rsqrt()
        rinv = (rv + 1e-5).rsqrt() if mode == 3 else None
        return ops.batch_norm_add_relu(y, m, invstd, wt, b, r, rm, rinv, rw, rb, mode, stride, pf, True)

    ours = output_and_grads(fused, args, lambda v: v)
    own = output_and_grads(reference, args, lambda v: v.to(dtype))
    exact = output_and_grads(reference, args, lambda v: v.double())
    assert ours[0].dtype == dtype
    for name, a, b_, e in zip(["out", "d y", "d weight", "d bias", "d residual", "d res_weight", "d res_bias"],
                              ours, own, exact):
        check(name, a, b_, e, dtype)
