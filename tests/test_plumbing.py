"""Configuration plumbing, not kernel math: BatchNorm hyper-parameters reach every backend, non-square inputs count
their values right.

Each test here was written against a planted bug that the rest of the suite let through: BatchNorm folding with eps
hard-coded to 1e-5, the running update with momentum hard-coded to 0.1, the running-variance count computed as
N*H*H. (Two more such tests moved beside what they test: a resumed run forgetting its best score,
test_checkpoint.py; a bug in the split weight-gradient reduction, test_ops.py.)"""

import pytest
import torch

from resnet_fused import FusedResNet, ResNet, ext

WIDTHS = [8, 8, 16]


def _backends():
    return ["triton", pytest.param("cpu", marks=pytest.mark.skipif(not ext.available(), reason="no extension"))]


def _pair(backend, dev, eps, momentum, shortcut="B"):
    """Reference and fused models with the given BatchNorm settings, small conv weights (so the batch variance is
    of the order of eps and eps matters) and small running variances (so eps matters in eval too)."""
    d = torch.device("cpu") if backend == "cpu" else dev
    torch.manual_seed(0)
    ref = ResNet(8, shortcut=shortcut, widths=WIDTHS).to(d)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(0.05)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.eps, m.momentum = eps, momentum
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.01, 0.01)
                m.running_var.uniform_(0.002, 0.01)
    fused = FusedResNet.from_reference(ref, backend=backend)
    for a, b in zip(ref.modules(), fused.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert b.eps == a.eps and b.momentum == a.momentum
    return ref, fused, d


def _same_buffers(ref, fused, rtol=1e-5, atol=1e-6):
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(b, a), f"{name}: {b} != {a}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("eps,momentum", [(1e-3, 0.3), (1e-3, None), (0.05, 0.1)], ids=str)
def test_batchnorm_settings_reach_train_and_eval(dev, backend, eps, momentum):
    ref, fused, d = _pair(backend, dev, eps, momentum)
    for step in range(2):
        x = torch.randn(3, 1, 9, 9, device=d)
        out_r, out_f = ref(x), fused(x)
        torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(out_r)
        out_r.backward(g), out_f.backward(g)
        for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
            scale = a.grad.abs().max().item() + 1e-6
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
        _same_buffers(ref, fused)
    ref.eval(), fused.eval()
    x = torch.randn(2, 1, 9, 9, device=d)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_non_square_training_step_updates_every_buffer_exactly(dev, backend, shortcut):
    """11x14 input, momentum 1 (the running statistics are the last batch's, unbiased with the count N*H*W): a
    count taken from the wrong side (N*H*H) is off by several percent in the last stage."""
    ref, fused, d = _pair(backend, dev, 1e-5, 1.0, shortcut)
    x = torch.randn(2, 1, 11, 14, device=d)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    _same_buffers(ref, fused)


