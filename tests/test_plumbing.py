"""Configuration plumbing, not kernel math: BatchNorm hyper-parameters reach every backend, non-square inputs count
their values right, a resumed run keeps its best score, the weight gradient's split reduction is exercised.

Each test here was written against a planted bug that the rest of the suite let through: BatchNorm folding with eps
hard-coded to 1e-5, the running update with momentum hard-coded to 0.1, the running-variance count computed as
N*H*H, a resumed run forgetting its best score, a bug in the split weight-gradient reduction."""
import os

import pytest
import torch

from resnet_fused import FusedResNet, ResNet, ext, train
from resnet_fused.checkpoint import load_checkpoint, seal
from resnet_fused.ops import implicit_gemm as ig
from resnet_fused.ops import launch

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


def test_resume_keeps_the_best_score_and_best_pt(mnist_root, tmp_path):
    args = ["--data-root", mnist_root, "--device", "cpu", "--subset", "300", "--batch-size", "100", "--model",
            "resnet8", "--epochs", "3", "--no-progress", "--no-plot"]
    train.train(args + ["--out", str(tmp_path / "full")])
    train.train(args + ["--out", str(tmp_path / "split"), "--stop-after-epoch", "1"])
    train.train(args + ["--out", str(tmp_path / "split"), "--resume"])
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(str(tmp_path / "full" / name))
        b = load_checkpoint(str(tmp_path / "split" / name))
        assert (b["epoch"], b["best"]) == (a["epoch"], a["best"]), name
        for k, v in a["model"].items():
            torch.testing.assert_close(b["model"][k], v, msg=lambda m: f"{name} {k}: {m}")
    # a resumed run compares with the best score it was saved with, not with nothing: a checkpoint that claims an
    # unbeatable best keeps best.pt untouched through the epochs after it
    ckpt = load_checkpoint(str(tmp_path / "split" / "last.pt"))
    ckpt["epoch"], ckpt["best"] = 1, 2.0
    ckpt["history"] = ckpt["history"][:1]
    out = tmp_path / "claimed"
    out.mkdir()
    torch.save(seal(ckpt), out / "last.pt")
    (out / "best.pt").write_bytes((tmp_path / "split" / "best.pt").read_bytes())
    before = (out / "best.pt").read_bytes()
    train.train(args + ["--out", str(out), "--resume"])
    assert (out / "best.pt").read_bytes() == before
    assert load_checkpoint(str(out / "last.pt"))["best"] == 2.0


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
