"""The C++/CUDA operators (resnet_fused._C) against plain PyTorch, and the "cpu"/"cuda" FusedResNet backends."""
import copy

import pytest
import torch
import torch.nn.functional as F

from resnet_fused import FusedResNet, ResNet, ext

if not ext.available():
    pytest.skip(f"resnet_fused._C is not built: {ext.EXT_IMPORT_ERROR}", allow_module_level=True)

ops = torch.ops.resnet_fused
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.param == "cuda" and not ext.has_cuda():
        pytest.skip("resnet_fused._C was built without CUDA kernels")
    return torch.device(request.param)


def make(shape, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t


SHAPES = [(1, 3, 7, 7), (2, 5, 4, 6), (4, 13, 3, 3), (3, 16, 9, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_stats_and_its_gradient(device, dtype, layout, shape):
    x = make(shape, dtype, device, layout).requires_grad_()
    mean, var = ops.bn_stats(x)
    rm, rv = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, rm, **TOL[dtype])
    torch.testing.assert_close(var, rv, **TOL[dtype])
    gm, gv = torch.randn_like(mean), torch.randn_like(var)
    got = torch.autograd.grad((mean, var), x, (gm, gv))[0]
    want = torch.autograd.grad((rm, rv), x, (gm, gv))[0]
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "cl" and shape[1] > 1
                             else torch.contiguous_format)


def test_bn_stats_is_deterministic_and_stable(device):
    x = (torch.randn(64, 8, 28, 28, device=device) + 1000.0).contiguous(memory_format=torch.channels_last)
    a, b = ops.bn_stats(x), ops.bn_stats(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref = x.double().var((0, 2, 3), unbiased=False).float()
    torch.testing.assert_close(a[1], ref, rtol=1e-3, atol=1e-4)  # no E[x^2]-E[x]^2 cancellation at mean 1000


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_finalize_matches_batchnorm(device, momentum, dtype):
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).to(device, dtype)
    mine = copy.deepcopy(bn)
    for step in range(3):
        x = make((4, 5, 3, 3), dtype, device, "nchw", seed=step)
        bn(x)
        mean, var = ops.bn_stats(x)
        invstd = ops.bn_finalize(mean, var, mine.running_mean, mine.running_var, mine.num_batches_tracked, 36,
                                 0.0 if momentum is None else momentum, momentum is None, 1e-5)
        torch.testing.assert_close(invstd, (x.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(), **TOL[dtype])
    torch.testing.assert_close(mine.running_mean, bn.running_mean, **TOL[dtype])
    torch.testing.assert_close(mine.running_var, bn.running_var, **TOL[dtype])
    assert mine.num_batches_tracked.item() == 3


def ref_ssar(y, s, t, r, rs, rt, mode, stride, pf, relu=True):
    v = y * s[:, None, None] + t[:, None, None] if s is not None else y
    if mode in (1, 3):
        v = v + (r * rs[:, None, None] + rt[:, None, None] if mode == 3 else r)
    elif mode == 2:
        sub = r[:, :, ::stride, ::stride]
        v = v + F.pad(sub, (0, 0, 0, 0, pf, y.shape[1] - sub.shape[1] - pf))
    return torch.relu(v) if relu else v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("mode,cin,stride,scaled", [(0, 13, 1, True), (1, 13, 1, True), (1, 13, 1, False),
                                                    (2, 5, 2, True), (2, 6, 2, False), (3, 13, 1, True)])
def test_scale_shift_add_relu(device, dtype, layout, mode, cin, stride, scaled):
    c, n, h, w = 13, 3, 7, 5
    y = make((n, c, h, w), dtype, device, layout, 1).requires_grad_()
    s = (torch.rand(c, dtype=dtype, device=device) + 0.5).requires_grad_() if scaled else None
    t = torch.randn(c, dtype=dtype, device=device).requires_grad_() if scaled else None
    r = rs = rt = None
    pf = (c - cin) // 2 if mode == 2 else 0
    if mode == 2:
        r = make((n, cin, h * 2 - 1, w * 2), dtype, device, layout, 2).requires_grad_()  # odd height: ceil(13/2)=7
    elif mode:
        r = make((n, c, h, w), dtype, device, layout, 3).requires_grad_()
    if mode == 3:
        rs = (torch.rand(c, dtype=dtype, device=device) + 0.5).requires_grad_()
        rt = torch.randn(c, dtype=dtype, device=device).requires_grad_()
    out = ops.scale_shift_add_relu(y, s, t, r, rs, rt, mode, stride, pf, True)
    ref = ref_ssar(y, s, t, r, rs, rt, mode, stride, pf)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn_like(ref)
    inputs = [v for v in (y, s, t, r, rs, rt) if v is not None]
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def _bnar_inputs(device, dtype, layout, mode, cin, stride, affine=True):
    c, n, h, w = 13, 3, 7, 5
    y = make((n, c, h, w), dtype, device, layout, 1).requires_grad_()
    wb = [(torch.rand(c, dtype=dtype, device=device) + 0.5).requires_grad_(),
          torch.randn(c, dtype=dtype, device=device).requires_grad_()] if affine else [None, None]
    r, rwb, pf = None, [None, None], (c - cin) // 2 if mode == 2 else 0
    if mode == 2:
        r = make((n, cin, h * 2 - 1, w * 2), dtype, device, layout, 2).requires_grad_()
    elif mode:
        r = make((n, c, h, w), dtype, device, layout, 3).requires_grad_()
    if mode == 3 and affine:
        rwb = [(torch.rand(c, dtype=dtype, device=device) + 0.5).requires_grad_(),
               torch.randn(c, dtype=dtype, device=device).requires_grad_()]
    return y, wb, r, rwb, pf


def _stats(t, eps=1e-5):
    with torch.no_grad():
        mean, var = ops.bn_stats(t)
        return mean, (var + eps).rsqrt()


@pytest.mark.parametrize("composite", [False, True], ids=["device-kernel", "composite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("mode,cin,stride,affine", [(0, 13, 1, True), (0, 13, 1, False), (1, 13, 1, True),
                                                    (2, 5, 2, True), (2, 6, 2, True), (3, 13, 1, True),
                                                    (3, 13, 1, False)])
def test_batch_norm_add_relu_matches_batchnorm(device, dtype, layout, mode, cin, stride, affine, composite):
    """relu(BN_train(y) + shortcut) against F.batch_norm: output and the gradients of y, weight, bias, the residual
    and (option B) the projection's weight and bias; the statistics' gradient is carried inside the op's VJP.
    ``composite`` runs the backward's device-independent kernel (the one the CUDA backend uses) on this device."""
    y, (w, b), r, (rw, rb), pf = _bnar_inputs(device, dtype, layout, mode, cin, stride, affine)
    mean, invstd = _stats(y)
    rmean, rinvstd = _stats(r) if mode == 3 else (None, None)
    out = ops.batch_norm_add_relu(y, mean, invstd, w, b, r, rmean, rinvstd, rw, rb, mode, stride, pf, True)
    ref_sc = F.batch_norm(r, None, None, rw, rb, True, 0.0, 1e-5) if mode == 3 else r
    ref = ref_ssar(F.batch_norm(y, None, None, w, b, True, 0.0, 1e-5), None, None, ref_sc,
                   torch.ones_like(mean) if mode == 3 else None, torch.zeros_like(mean) if mode == 3 else None,
                   mode, stride, pf)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    g = torch.randn_like(ref)
    inputs = [v for v in (y, w, b, r, rw, rb) if v is not None]
    want = torch.autograd.grad(ref, inputs, g)
    if composite:
        bw = ops.batch_norm_add_relu_backward.default._op_dk
        dy, dw, db, dr, drw, drb = bw("CompositeExplicitAutograd", g, out.detach(), y.detach(), mean, invstd,
                                      w, r, rmean, rinvstd, rw, mode, stride, pf, True)
        got = [dy] + ([dw, db] if affine else []) + ([dr] if mode else []) + ([drw, drb] if mode == 3 and affine
                                                                              else [])
    else:
        got = torch.autograd.grad(out, inputs, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[dtype])


def test_batch_norm_add_relu_rejects_statistics_with_grad(device):
    y = make((2, 6, 4, 4), torch.float32, device, "cl").requires_grad_()
    mean, var = ops.bn_stats(y)  # with autograd: their gradient would be dropped silently
    with pytest.raises(RuntimeError, match="mean requires grad"):
        ops.batch_norm_add_relu(y, mean, (var + 1e-5).rsqrt(), None, None, None, None, None, None, None, 0, 1, 0,
                                True)
    with pytest.raises(RuntimeError, match="option-B shortcut needs res_mean and res_invstd"):
        m, i = _stats(y)
        ops.batch_norm_add_relu(y, m, i, None, None, y, None, None, None, None, 3, 1, 0, True)


def test_opcheck_every_operator(device):
    y = make((2, 6, 4, 4), torch.float32, device, "cl").requires_grad_()
    r = make((2, 6, 4, 4), torch.float32, device, "cl", 1)
    rA = make((2, 4, 8, 8), torch.float32, device, "cl", 2)
    v = torch.rand(6, device=device) + 0.5
    torch.library.opcheck(ops.bn_stats.default, (y,))
    torch.library.opcheck(ops.bn_stats_backward.default, (v, v, y.detach(), v))
    torch.library.opcheck(ops.bn_finalize.default, (v, v, torch.zeros(6, device=device), torch.ones(6, device=device),
                                                    torch.zeros((), dtype=torch.long, device=device), 32, 0.1, False,
                                                    1e-5))
    torch.library.opcheck(ops.scale_shift_add_relu.default, (y, v.requires_grad_(), v, r, None, None, 1, 1, 0, True))
    torch.library.opcheck(ops.scale_shift_add_relu.default, (y, None, None, rA, None, None, 2, 2, 1, True))
    torch.library.opcheck(ops.scale_shift_add_relu.default, (y, v, v, r, v, v, 3, 1, 0, True))
    out = ops.scale_shift_add_relu(y.detach(), v.detach(), v.detach(), r, v.detach(), v.detach(), 3, 1, 0, True)
    v = v.detach()
    torch.library.opcheck(ops.scale_shift_add_relu_backward.default, (torch.randn_like(out), out, y.detach(), v, r,
                                                                       v, 3, 1, 0, True))
    outA = ops.scale_shift_add_relu(y.detach(), v, v, rA, None, None, 2, 2, 1, True)
    torch.library.opcheck(ops.scale_shift_add_relu_backward.default, (torch.randn_like(outA), outA, y.detach(), v,
                                                                       rA, None, 2, 2, 1, True))
    m, i = _stats(y)
    w = (torch.rand(6, device=device) + 0.5).requires_grad_()
    for mode, res, stride, pf in ((0, None, 1, 0), (1, r, 1, 0), (2, rA, 2, 1), (3, r, 1, 0)):
        rm, ri = _stats(res) if mode == 3 else (None, None)
        rw = w if mode == 3 else None
        res = res.detach().requires_grad_() if res is not None else None
        torch.library.opcheck(ops.batch_norm_add_relu.default, (y, m, i, w, w, res, rm, ri, rw, rw, mode, stride, pf,
                                                                True))
        out = ops.batch_norm_add_relu(y, m, i, w, w, res, rm, ri, rw, rw, mode, stride, pf, True).detach()
        torch.library.opcheck(ops.batch_norm_add_relu_backward.default,
                              (torch.randn_like(out), out, y.detach(), m, i, w.detach(),
                               res.detach() if res is not None else None, rm, ri,
                               rw.detach() if rw is not None else None, mode, stride, pf, True))


def test_bad_operands_are_clear_errors(device):
    y = make((2, 6, 4, 4), torch.float32, device, "cl")
    v = torch.ones(6, device=device)
    with pytest.raises(RuntimeError, match="identity shortcut must have the shape of y"):
        ops.scale_shift_add_relu(y, v, v, torch.zeros(2, 6, 3, 4, device=device), None, None, 1, 1, 0, True)
    with pytest.raises(RuntimeError, match="residual dtype"):
        ops.scale_shift_add_relu(y, v, v, y.double(), None, None, 1, 1, 0, True)
    with pytest.raises(RuntimeError, match="one value per channel"):
        ops.scale_shift_add_relu(y, torch.ones(5, device=device), v, None, None, None, 0, 1, 0, True)
    with pytest.raises(RuntimeError, match="option-A shortcut"):
        ops.scale_shift_add_relu(y, v, v, torch.zeros(2, 6, 8, 8, device=device), None, None, 2, 2, 3, True)
    with pytest.raises(RuntimeError, match="option-B shortcut needs"):
        ops.scale_shift_add_relu(y, v, v, y, None, None, 3, 1, 0, True)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.bn_stats(torch.zeros(3, 4, device=device))
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.bn_stats(torch.zeros(2, 3, 4, 4, dtype=torch.long, device=device))
    rm, rv, nbt = torch.zeros(6, device=device), torch.ones(6, device=device), torch.zeros((), dtype=torch.long,
                                                                                          device=device)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.bn_finalize(v, v, rm, rv, nbt, 1, 0.1, False, 1e-5)
    assert nbt.item() == 0 and torch.equal(rm, torch.zeros(6, device=device))  # untouched on error


def _reference(depth, shortcut, plain, device, dtype, widths=(4, 8, 16)):
    torch.manual_seed(0)
    ref = ResNet(depth, shortcut=shortcut, widths=list(widths), plain=plain).to(device, dtype)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shortcut,plain", [("A", False), ("B", False), ("A", True)])
def test_fused_resnet_ext_backend_matches_reference(device, dtype, shortcut, plain):
    ref = _reference(14, shortcut, plain, device, dtype)
    fused = FusedResNet.from_reference(ref, backend=device.type)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    for step in range(2):
        x = make((3, 1, 11, 11), dtype, device, "cl" if step else "nchw", step)
        out_r, out_f = ref(x), fused(x)
        torch.testing.assert_close(out_f, out_r, **tol)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_f.backward(g)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * (
            p.grad.abs().max().item() + 1), msg=lambda m: f"grad {name}: {m}")
    for (name, b), c in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, **tol, msg=lambda m: f"{name}: {m}")
    ref.eval(), fused.eval()
    with torch.no_grad():
        for b in (1, 3):
            x = make((b, 1, 7, 7), dtype, device, "nchw", 9)
            torch.testing.assert_close(fused(x), ref(x), **tol)


@pytest.mark.parametrize("hw", [10, 12])
def test_strided_projection_weight_grad(device, hw):
    """Option B's stride-2 1x1 projection on an even-sized map with 4 input channels: oneDNN's channels_last weight
    gradient is wrong there (PyTorch 2.14.1, AVX2); the backend must still match the reference, run after run."""
    ref = _reference(8, "B", False, device, torch.float32)
    fused = FusedResNet.from_reference(ref, backend=device.type)
    x = make((4, 1, hw, hw), torch.float32, device, "nchw", 1)
    g = torch.randn(4, 10, generator=torch.Generator().manual_seed(1)).to(device)
    ref(x).backward(g)
    for _ in range(2):
        fused.zero_grad()
        fused(x).backward(g)
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_ext_backend_under_bf16_autocast(device, shortcut):
    """Under torch.autocast(bfloat16) the fused backend's error against an fp32 reference stays within twice
    PyTorch's own bf16 error (+ atol): train-mode output and every parameter gradient, eval output."""
    ref32 = _reference(14, shortcut, False, device, torch.float32, widths=(8, 16, 32))
    ref16 = copy.deepcopy(ref32)
    fused = FusedResNet.from_reference(ref32, backend=device.type)
    x = make((8, 1, 12, 12), torch.float32, device, "nchw", 4)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0)).to(device)

    def run(m, amp):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = m(x)
        F.cross_entropy(out.float(), y).backward()
        return out.float().detach()

    o32, o16, of = run(ref32, False), run(ref16, True), run(fused, True)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(of, o32) <= 2 * rel(o16, o32) + 1e-2
    for (name, p32), p16, pf in zip(ref32.named_parameters(), ref16.parameters(), fused.parameters()):
        assert rel(pf.grad, p32.grad) <= 2 * rel(p16.grad, p32.grad) + 2e-2, name
    for m in (ref32, ref16, fused):
        m.eval()
    with torch.no_grad():
        e32 = ref32(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            e16, ef = ref16(x).float(), fused(x).float()
    assert rel(ef, e32) <= 2 * rel(e16, e32) + 1e-2


def test_backend_errors_name_what_is_missing():
    m = FusedResNet(8, widths=[4, 8, 16], backend="cpu")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="runs on CPU tensors"):
            m.cuda()(torch.randn(2, 1, 7, 7, device="cuda"))
    m = FusedResNet(8, widths=[4, 8, 16], backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        m(torch.randn(2, 1, 7, 7))


def test_torch_compile_fullgraph_cpu_backend():
    ref = _reference(8, "B", False, torch.device("cpu"), torch.float32)
    fused = FusedResNet.from_reference(ref, backend="cpu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 9, 9)
    out, out_r = compiled(x), ref(x)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    out_r.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    for (name, b), c in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    fused.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)
