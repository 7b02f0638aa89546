"""FusedResNet against the reference ResNet: outputs, every gradient, running statistics, and the contract."""
import copy
import os

import pytest
import torch

from resnet_fused import FusedResNet, ResNet, resnet20

WIDTHS = [4, 8, 16]


def perturbed_reference(depth, shortcut, plain, dev, widths=WIDTHS, seed=0):
    torch.manual_seed(seed)
    ref = ResNet(depth, shortcut=shortcut, widths=widths, plain=plain).to(dev)
    for m in ref.modules():  # BN params away from (1, 0) so that their gradients and the folding matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return ref


def assert_same_state(ref, fused, rtol=1e-4, atol=1e-5):
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


def assert_same_grads(ref, fused, rtol=1e-4, atol=1e-5):
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        scale = a.grad.abs().max().item() + 1e-6
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol * scale + 1e-6,
                                   msg=lambda m: f"grad {name}: {m}")


CASES = [(8, "A", False, 28, 2), (8, "B", False, 11, 3), (8, "A", True, 7, 4), (14, "A", False, 11, 2),
         (14, "B", False, 7, 2)]


def check_train_step(ref, fused, x):
    """One training step of both on x: outputs, every gradient, running_mean/var and num_batches_tracked."""
    out_r, out_f = ref(x), fused(x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    assert_same_grads(ref, fused)
    assert_same_state(ref, fused)


@pytest.mark.parametrize("depth,shortcut,plain,size,batch", CASES, ids=str)
def test_train_step_matches_reference(dev, depth, shortcut, plain, size, batch):
    ref = perturbed_reference(depth, shortcut, plain, dev)
    fused = FusedResNet.from_reference(ref, backend="triton")
    check_train_step(ref, fused, torch.randn(batch, 1, size, size, device=dev))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_64bit_index_path_matches_reference(dev, shortcut, monkeypatch):
    """Every Triton kernel's INDEX64 path (what tensors with offsets past 2**31 - 1 take; the limit lowered to 0
    here): a training step (outputs, every gradient, running statistics) and inference against the reference."""
    from resnet_fused.ops import launch
    monkeypatch.setattr(launch, "INT32_LIMIT", 0)
    assert launch.index64(torch.zeros(1))
    ref = perturbed_reference(8, shortcut, False, dev)
    fused = FusedResNet.from_reference(ref, backend="triton")
    x = torch.randn(2, 1, 9, 9, device=dev)
    check_train_step(ref, fused, x)
    ref.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth,shortcut,plain,size,batch", CASES[:3], ids=str)
def test_inference_matches_reference(dev, depth, shortcut, plain, size, batch):
    ref = perturbed_reference(depth, shortcut, plain, dev).eval()
    fused = FusedResNet.from_reference(ref, backend="triton").eval()
    for b in (1, batch):
        x = torch.randn(b, 1, size, size, device=dev)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_inference_cache_follows_parameter_changes(dev):
    ref = perturbed_reference(8, "B", False, dev).eval()
    fused = FusedResNet.from_reference(ref, backend="triton").eval()
    x = torch.randn(2, 1, 7, 7, device=dev)
    with torch.no_grad():
        fused(x)
        for m in (ref, fused):
            m.layer2[0].shortcut.bn.running_var.mul_(3)
            m.layer1[0].conv2.weight.add_(0.1)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_eval_mode_gradients_fall_back_to_reference_math(dev):
    ref = perturbed_reference(8, "A", False, dev).eval()
    fused = FusedResNet.from_reference(ref, backend="triton").eval()
    x = torch.randn(2, 1, 7, 7, device=dev, requires_grad=True)
    g_r = torch.autograd.grad(ref(x).sum(), x)[0]
    g_f = torch.autograd.grad(fused(x).sum(), x)[0]
    torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-6)


def test_momentum_none_cumulative_average(dev):
    ref = perturbed_reference(8, "A", False, dev)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    fused = FusedResNet.from_reference(ref, backend="triton")
    for m in fused.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    for _ in range(2):
        x = torch.randn(2, 1, 7, 7, device=dev)
        ref(x), fused(x)
    assert_same_state(ref, fused)


def test_channels_last_and_non_contiguous_inputs(dev):
    ref = perturbed_reference(8, "A", False, dev)
    fused = FusedResNet.from_reference(ref, backend="triton")
    big = torch.randn(2, 1, 22, 14, device=dev)
    x = big[:, :, ::2, :]  # 11x14 view with a row stride of 2
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    xc = torch.randn(2, 1, 9, 9, device=dev).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(xc), ref(xc), rtol=1e-4, atol=1e-5)


def test_state_dict_both_ways_and_conversions():
    ref = ResNet(14, shortcut="B", widths=WIDTHS)
    fused = FusedResNet(14, shortcut="B", widths=WIDTHS, backend="cpu")
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)
    back = FusedResNet.from_reference(ref).to_reference()
    assert type(back) is ResNet
    assert_same_state(ref, back, rtol=0, atol=0)
    assert isinstance(resnet20(impl="fused"), FusedResNet)


def test_auto_backend_on_cpu_tensors_matches_reference():
    ref = perturbed_reference(8, "B", False, "cpu")
    fused = FusedResNet.from_reference(ref, backend="auto")
    x = torch.randn(3, 1, 9, 9)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_backend_choice_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        FusedResNet(8, backend="tpu")
    monkeypatch.setenv("RESNET_FUSED_BACKEND", "cpu")
    assert FusedResNet(8).backend == "cpu"
    m = FusedResNet(8, widths=WIDTHS, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):  # CPU tensors, or no CUDA kernels in this build
        m(torch.randn(2, 1, 7, 7))


def test_an_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    """Triton < 3.7's interpreter with NumPy >= 2.4 fails every kernel with an opaque InterpreterError: the backend
    says what is wrong before launching, and the state is untouched."""
    import numpy
    import triton

    from resnet_fused.backends import interpreter_problem
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for tv, nv, bad in (("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.8.0", "2.4.6", False),
                        ("3.7.0+git1a2b", "2.5.0", False), ("3.5.1", "2.4.0rc1", True)):
        monkeypatch.setattr(triton, "__version__", tv)
        monkeypatch.setattr(numpy, "__version__", nv)
        assert (interpreter_problem() is not None) == bad, (tv, nv)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    fused = FusedResNet(8, widths=WIDTHS, backend="triton")
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(RuntimeError, match=r"NumPy 2\.4\.6.*numpy<2\.4"):
        fused(torch.randn(2, 1, 7, 7))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_inputs_are_clear_and_leave_running_stats_alone(dev):
    fused = FusedResNet(8, widths=WIDTHS, backend="triton").to(dev)
    before = copy.deepcopy(fused.state_dict())
    bad = [
        (torch.randn(2, 3, 7, 7, device=dev), ValueError, "input channels"),
        (torch.randn(1, 7, 7, device=dev), ValueError, "4-D"),
        (torch.randint(0, 255, (2, 1, 7, 7), device=dev), TypeError, "floating-point"),
        (torch.randn(2, 1, 7, 7, device=dev, dtype=torch.float64), RuntimeError, "dtype"),
        (torch.randn(1, 1, 1, 1, device=dev), ValueError, "more than 1 value per channel"),
    ]
    for x, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fused(x)
    if dev.type == "cpu":
        with pytest.raises(RuntimeError, match="on"):
            FusedResNet(8, widths=WIDTHS, backend="triton").to("meta")(torch.randn(2, 1, 7, 7))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torch_compile_fullgraph(dev):
    ref = perturbed_reference(8, "B", False, dev)
    fused = FusedResNet.from_reference(ref, backend="triton")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager" if dev.type == "cpu" else "inductor")
    x = torch.randn(2, 1, 7, 7, device=dev)
    out = compiled(x)
    out_r = ref(x)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    out_r.sum().backward()
    assert_same_grads(ref, fused)
    assert_same_state(ref, fused)
    fused.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)


def test_training_parity_sgd_steps(dev):
    """Reference and fused ResNet from the same weights and batches: per-step losses agree over 8 steps."""
    torch.manual_seed(0)
    ref = ResNet(8, widths=WIDTHS).to(dev)
    fused = FusedResNet.from_reference(ref, backend="triton")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fused)]
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        x = torch.randn(4, 1, 11, 11, generator=gen).to(dev)
        y = torch.randint(0, 10, (4,), generator=gen).to(dev)
        losses = []
        for m, opt in zip((ref, fused), opts):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[0]), (step, losses)


# ---- parity that fails only when the kernels are wrong (tests/parity.py; the same checks at full size on a GPU in
# test_gpu.py) ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,shortcut", [("cpu", "A"), ("cpu", "B"), ("triton", "A")])
def test_one_step_error_against_float64_is_within_twice_pytorch_fp32(backend, shortcut):
    from parity import assert_within_twice_pytorch, one_step_errors
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    ref = perturbed_reference(8, shortcut, False, "cpu")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 9, 9, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    assert_within_twice_pytorch(one_step_errors(ref, x, y, backend, cuda_graphs=False))


def test_loss_trajectory_stays_in_the_band_of_the_perturbed_reference():
    from parity import assert_inside_band, loss_band, losses
    ref = perturbed_reference(8, "A", False, "cpu")
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 1, 10, 10, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(12)]
    band = loss_band(ref, batches)
    assert_inside_band(losses(FusedResNet.from_reference(ref, backend="cpu"), batches), band)
