"""Reliability: NaN/Inf honesty on every backend, safe checkpoints, no silent data loss, every bad input a clear
one-line error that changes nothing (docs/GUIDE.md's "bad input -> what happens" table, case by case)."""
import os

import pytest
import torch

from resnet_fused import FusedResNet, evaluate, ext, train

from cli_helpers import base_args, cli_error, snapshot, trained_checkpoint
from test_fused_model import perturbed_reference

WIDTHS = [8, 8, 16]


# ---- 1. NaN and Inf propagate as in PyTorch ------------------------------------------------------------------

def _model_pair(backend, dev, shortcut="A"):
    ref = perturbed_reference(8, shortcut, False, dev, widths=WIDTHS)
    return ref, FusedResNet.from_reference(ref, backend=backend)


def _poison(x, value, image=1):
    x = x.clone()
    x[image, 0, 3, 4] = value
    return x


def _backend_device(backend, dev):
    return torch.device("cpu") if backend == "cpu" else dev


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_non_finite_input_in_eval_gives_what_pytorch_gives(dev, backend, value, shortcut):
    if backend == "cpu" and not ext.available():
        pytest.skip("extension not built")
    d = _backend_device(backend, dev)
    ref, fused = _model_pair(backend, d, shortcut)
    ref.eval(), fused.eval()
    x = _poison(torch.randn(3, 1, 12, 12, device=d), value)
    with torch.no_grad():
        r, f = ref(x), fused(x)
    assert r[1].isnan().all()  # the poisoned image's logits are NaN in PyTorch ...
    assert torch.equal(f.isnan(), r.isnan()) and torch.equal(f.isinf(), r.isinf())  # ... and here, nowhere else
    finite = r.isfinite()
    torch.testing.assert_close(f[finite], r[finite], rtol=1e-4, atol=1e-5)


def test_finite_input_whose_sum_overflows_gives_what_pytorch_gives():
    """The CPU fast path checks its input with one sum (backends/extension.py _surely_finite): finite inputs whose
    sum overflows, and +inf beside -inf (a NaN sum), take the exact path: PyTorch's numbers and non-finite pattern."""
    if not ext.available():
        pytest.skip("extension not built")
    ref, fused = _model_pair("cpu", torch.device("cpu"))
    ref.eval(), fused.eval()
    x = torch.randn(3, 1, 12, 12).abs() * 2e36
    x2 = torch.randn(3, 1, 12, 12)
    x2[0, 0, 1, 1], x2[0, 0, 5, 7] = float("inf"), float("-inf")
    from resnet_fused.backends.extension import _surely_finite
    assert not _surely_finite(x) and not _surely_finite(x2) and _surely_finite(x2[1:])
    for inp in (x, x2):
        with torch.no_grad():
            r, f = ref(inp), fused(inp)
        assert torch.equal(f.isnan(), r.isnan()) and torch.equal(f.isinf(), r.isinf())
        finite = r.isfinite()
        assert finite.any()
        torch.testing.assert_close(f[finite], r[finite], rtol=1e-4, atol=1e-5 * r[finite].abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_nan_weight_in_eval_gives_what_pytorch_gives(dev, backend):
    if backend == "cpu" and not ext.available():
        pytest.skip("extension not built")
    d = _backend_device(backend, dev)
    ref, fused = _model_pair(backend, d)
    ref.eval(), fused.eval()
    x = torch.randn(2, 1, 12, 12, device=d)
    with torch.no_grad():
        fused(x)  # a cached fold of the finite weights must not survive the change below
        for m in (ref, fused):
            m.layer2[0].conv1.weight[3, 0, 1, 1] = float("nan")
        r, f = ref(x), fused(x)
    assert r.isnan().all() and torch.equal(f.isnan(), r.isnan())


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_in_training_gives_what_pytorch_gives(dev, backend, value):
    """Training: the batch statistics spread the NaN to every image, the loss and every gradient, as in PyTorch
    (the Triton ReLU used to turn NaN into 0: a finite loss of ln 10 and NaN running statistics)."""
    if backend == "cpu" and not ext.available():
        pytest.skip("extension not built")
    d = _backend_device(backend, dev)
    ref, fused = _model_pair(backend, d)
    x = _poison(torch.randn(3, 1, 12, 12, device=d), value)
    y = torch.tensor([1, 2, 3], device=d)
    losses = []
    for m in (ref, fused):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss)
    assert losses[0].isnan() and losses[1].isnan()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert torch.equal(b.grad.isnan(), a.grad.isnan()), name
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        if a.is_floating_point():
            assert torch.equal(b.isnan(), a.isnan()), name


def test_ext_operators_keep_nan_through_relu():
    if not ext.available():
        pytest.skip("extension not built")
    y = torch.tensor([[-1.0, float("nan"), 2.0, float("-inf"), float("inf")]]).reshape(1, 5, 1, 1)
    out = torch.ops.resnet_fused.scale_shift_add_relu(y, None, None, None, None, None, 0, 1, 0, True)
    torch.testing.assert_close(out, torch.relu(y), equal_nan=True)
    # the backward mask is threshold_backward's: a NaN output passes its gradient
    g = torch.ones_like(y)
    dy = torch.ops.resnet_fused.scale_shift_add_relu_backward(g, out, y, None, None, None, 0, 1, 0, True)[0]
    yr = y.clone().requires_grad_()
    torch.relu(yr).backward(g)
    torch.testing.assert_close(dy, yr.grad, equal_nan=True)


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_relu_keeps_nan(tile):
    """NaN in -> NaN out. F(2x2, 3x3) gives exactly PyTorch's NaN pattern here; F(4x4, 3x3)'s transforms spread a NaN
    over (part of) the 4x4 output tiles whose input patch holds it (a superset of PyTorch's; FusedResNet runs Winograd only on
    finite inputs and weights, so its outputs keep PyTorch's pattern)."""
    if not ext.winograd_supported():
        pytest.skip("conv3x3_winograd needs an x86-64 CPU with AVX2 and FMA")
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 2, 3, 3] = float("nan")
    w = torch.randn(8, 8, 3, 3)
    out = torch.ops.resnet_fused.conv3x3_winograd(x, ext.winograd_weight(w, tile), None, None, 0, 1, 0, True)
    ref = torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
    assert ref.isnan().any()
    if tile == 2:
        assert torch.equal(out.isnan(), ref.isnan())
    else:  # every NaN of PyTorch's, and more in the two 4x4 tiles per axis whose patch holds input row/col 3
        assert out.isnan()[ref.isnan()].all() and out.isnan().sum() > ref.isnan().sum()
    torch.testing.assert_close(out[~out.isnan()], ref[~out.isnan()], rtol=1e-4, atol=1e-4)


def test_training_cli_stops_at_the_first_non_finite_loss(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(capsys, train.main, base_args(mnist_root, out, "--lr", "1e30", "--warmup-epochs", "0",
                                                  "--epochs", "2"))
    assert "non-finite loss at epoch 1, step " in err and "--lr" in err
    assert not os.path.exists(out / "last.pt") and not os.path.exists(out / "metrics.csv")


# ---- 2. --resume never overwrites another run ----------------------------------------------------------------

def test_resume_into_another_runs_folder_is_refused(mnist_root, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        train.train(base_args(mnist_root, out, "--epochs", "1", "--subset", "200"))
    before = snapshot(b)
    err = cli_error(capsys, train.main, base_args(mnist_root, b, "--epochs", "2", "--subset", "200", "--resume",
                                                  str(a / "last.pt")))
    assert str(b / "last.pt") in err and "--overwrite" in err
    assert snapshot(b) == before
    # into an empty folder it continues run A there, and run A's folder is untouched
    a_before = snapshot(a)
    hist = train.train(base_args(mnist_root, tmp_path / "c", "--epochs", "2", "--subset", "200", "--resume",
                                 str(a / "last.pt")))
    assert [h["epoch"] for h in hist] == [1, 2] and snapshot(a) == a_before


# ---- 3. checkpoints: tests/test_checkpoint.py ------------------------------------------------------------------


# ---- 4. the inference cache sees every change ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_inference_cache_sees_eps_data_edits_and_momentum(dev, backend):
    if backend == "cpu" and not ext.available():
        pytest.skip("extension not built")
    d = _backend_device(backend, dev)
    ref, fused = _model_pair(backend, d, "B")
    ref.eval(), fused.eval()
    x = torch.randn(2, 1, 12, 12, device=d)

    def same():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)

    same()
    for m in (ref, fused):  # eps is part of the cache key
        m.layer2[0].bn1.eps = 0.3
        m.layer2[0].shortcut.bn.eps = 0.5
    same()
    for m in (ref, fused):  # .data edits bypass the version counter: invalidate_caches() is the documented way
        m.layer1[0].conv1.weight.data.mul_(-2)
        m.bn1.running_var.data.fill_(4.0)
    fused.invalidate_caches()
    same()
    for m in (ref, fused):  # in-place edits without .data are seen by themselves
        with torch.no_grad():
            m.layer3[0].conv2.weight.mul_(0.5)
    same()
    ref.train(), fused.train()
    for m in (ref, fused):  # momentum is read at every training step
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = 0.7
    ref(x), fused(x)
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    ref.eval(), fused.eval()
    same()


# ---- 5. every flag and every dataset file validated up front -------------------------------------------------

BAD_FLAGS = [
    (("--lr", "-1"), "--lr must be greater than 0"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--momentum", "-0.5"), "--momentum must be at least 0"),
    (("--momentum", "1.5"), "--momentum must be below 1"),
    (("--wd", "-0.001"), "--wd must be at least 0"),
    (("--val-size", "100000"), "--val-size"),
    (("--max-shift", "-2"), "--max-shift must be at least 0"),
    (("--max-shift", "28"), "smaller than the 28x28 images"),
    (("--warmup-epochs", "nan"), "--warmup-epochs must be a finite number"),
    (("--warmup-epochs", "9"), "longer than the run"),
    (("--label-smoothing", "2"), "--label-smoothing must be at least 0.0 and at most 1.0"),
    (("--subset", "-5"), "--subset must be at least 0"),
    (("--subset", "-59000"), "--subset must be at least 0"),
    (("--subset", "70000"), "more than the 60000 training images"),
    (("--epochs", "0"), "--epochs must be at least 1"),
    (("--batch-size", "0"), "--batch-size must be at least 1"),
    (("--seed", "-1"), "--seed must be at least 0"),
    (("--stop-after-epoch", "0"), "--stop-after-epoch must be at least 1"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_training_flags_are_one_line_errors_that_write_nothing(mnist_root, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    argv = base_args(mnist_root, out, "--epochs", "2", *flags)
    if "--subset" in flags:  # the flag under test, not base_args's
        i = argv.index("--subset")
        del argv[i:i + 2]
    assert message in cli_error(capsys, train.main, argv)
    assert not out.exists()


def test_bad_evaluate_flags_are_one_line_errors(mnist_root, tmp_path, capsys):
    path = trained_checkpoint(mnist_root, tmp_path)
    assert "--batch-size must be positive" in cli_error(capsys, evaluate.main, [str(path), "--batch-size", "0"])
    assert "does not exist" in cli_error(capsys, evaluate.main, [str(path), "--json", str(tmp_path / "no" / "r.json")])
    assert "is a directory" in cli_error(capsys, evaluate.main, [str(path), "--json", str(tmp_path)])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert "not writable" in cli_error(capsys, evaluate.main, [str(path), "--json", str(ro / "r.json")])


def test_empty_training_batch_says_so():
    model = FusedResNet(8, widths=WIDTHS, backend="cpu" if ext.available() else "auto")
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 1, 12, 12))
    with pytest.raises(ValueError, match="with batch 1\\)"):
        model(torch.randn(1, 1, 1, 1))


# dataset files: a root that we build from MNIST's real files, then damage


def test_ext_operators_refuse_zero_channels_instead_of_dividing_by_zero():
    """numel / C with C == 0 crashed the process (a division by zero in the C++ and CUDA operators)."""
    if not ext.available():
        pytest.skip("extension not built")
    y = torch.empty(2, 0, 3, 3)
    ops = torch.ops.resnet_fused
    for call in (lambda: ops.bn_stats(y),
                 lambda: ops.bn_stats_backward(None, None, y, torch.empty(0)),
                 lambda: ops.scale_shift_add_relu(y, None, None, None, None, None, 0, 1, 0, True),
                 lambda: ops.scale_shift_add_relu_backward(y, y, y, None, None, None, 0, 1, 0, True)):
        with pytest.raises(RuntimeError, match="at least one channel"):
            call()
