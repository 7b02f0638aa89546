"""Reliability: NaN/Inf honesty on every backend, safe checkpoints, no silent data loss, every bad input a clear
one-line error that changes nothing (docs/GUIDE.md's "bad input -> what happens" table, case by case)."""
import gzip
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from resnet_fused import FusedResNet, evaluate, ext, train
from resnet_fused.checkpoint import UserError, atomic_save, checksum, load_checkpoint, seal
from resnet_fused.data import DataFormatError, load_dataset, load_splits, read_idx

from test_fused_model import perturbed_reference

WIDTHS = [8, 8, 16]


def cli_error(capsys, fn, argv):
    """fn(argv) exits with status 2 and one line 'error: ...' (no traceback); returns that line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and "\n" not in err, err
    return err


def base_args(root, out, *extra):
    return ["--data-root", root, "--out", str(out), "--device", "cpu", "--subset", "300", "--batch-size", "100",
            "--model", "resnet8", "--no-progress", "--no-plot", *extra]


def snapshot(folder):
    """Every file in a folder and its bytes (what 'nothing written' is checked against)."""
    if not os.path.isdir(folder):
        return None
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


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


def test_winograd_relu_keeps_nan():
    if not ext.winograd_supported():
        pytest.skip("conv3x3_winograd needs an x86-64 CPU with AVX2 and FMA")
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 2, 3, 3] = float("nan")
    w = torch.randn(8, 8, 3, 3)
    out = torch.ops.resnet_fused.conv3x3_winograd(x, ext.winograd_weight(w), None, None, 0, 1, 0, True)
    ref = torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())


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


# ---- 3. checkpoints: no code execution, checksum, permissions, temp files, order ------------------------------

class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_loading_a_crafted_checkpoint_runs_no_code(tmp_path, capsys):
    _Exploit.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Exploit()}, path)
    err = cli_error(capsys, evaluate.main, [str(path), "--device", "cpu"])
    assert "refused" in err
    assert not os.path.exists(_Exploit.marker)


def _trained_checkpoint(mnist_root, tmp_path):
    out = tmp_path / "run"
    train.train(base_args(mnist_root, out, "--epochs", "1", "--subset", "200"))
    return out / "last.pt"


def test_a_flipped_byte_is_an_error(mnist_root, tmp_path, capsys):
    path = _trained_checkpoint(mnist_root, tmp_path)
    ckpt = load_checkpoint(str(path))
    assert ckpt["checksum"] == checksum(ckpt)
    raw = bytearray(path.read_bytes())
    # a byte inside the first conv's weight storage: the file still unpickles, only the checksum can tell
    w = ckpt["model"]["conv1.weight"].contiguous().numpy().tobytes()
    at = bytes(raw).find(w[:16])
    assert at > 0
    raw[at + 5] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match its checksum"):
        load_checkpoint(str(bad))
    # a changed value in the pickled data (the epoch), re-saved without a new seal
    ckpt["epoch"] = 7
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(UserError, match="does not match its checksum"):
        load_checkpoint(str(tmp_path / "edited.pt"))
    torch.save(seal(ckpt), tmp_path / "resealed.pt")  # a tool that edits a checkpoint seals it again
    assert load_checkpoint(str(tmp_path / "resealed.pt"))["epoch"] == 7
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "unsealed.pt")
    assert "no content checksum" in cli_error(capsys, evaluate.main, [str(tmp_path / "unsealed.pt")])


def test_checkpoint_files_have_ordinary_permissions(mnist_root, tmp_path):
    path = _trained_checkpoint(mnist_root, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("last.pt", "best.pt", "metrics.csv"):
        assert stat.S_IMODE(os.stat(path.parent / name).st_mode) == 0o666 & ~mask, name


def test_stale_temp_files_are_cleaned_and_renames_are_fsynced(mnist_root, tmp_path, monkeypatch):
    from resnet_fused import checkpoint
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".last.pt.abc123.tmp", out / ".metrics.csv.x.tmp"]
    keep = out / ".unrelated.tmp"
    for p in stale + [keep]:
        p.write_bytes(b"half a checkpoint")
    synced = []
    real = checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: (synced.append(d), real(d)))
    train.train(base_args(mnist_root, out, "--epochs", "1", "--subset", "200"))
    assert not any(p.exists() for p in stale) and keep.exists()
    assert synced and all(d == str(out) for d in synced)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") and f != keep.name]


def test_metrics_never_show_an_epoch_no_checkpoint_holds(mnist_root, tmp_path, monkeypatch, capsys):
    """A full disk while saving epoch 2: a one-line error, last.pt still holds epoch 1, metrics end at epoch 1."""
    from resnet_fused import checkpoint
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk_on_second_epoch(obj, f):
        if obj["epoch"] == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_on_second_epoch)
    err = cli_error(capsys, train.main, base_args(mnist_root, out, "--epochs", "2", "--subset", "200"))
    monkeypatch.undo()
    assert "No space left on device" in err and "last.pt" in err
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
    assert (out / "metrics.csv").read_text().strip().splitlines()[-1].startswith("1,")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_atomic_save_failure_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, str(path))
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(UserError, match="could not write"):
        atomic_save({"a": torch.zeros(2)}, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.pt"]


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
    path = _trained_checkpoint(mnist_root, tmp_path)
    assert "--batch-size must be positive" in cli_error(capsys, evaluate.main, [str(path), "--batch-size", "0"])
    assert "does not exist" in cli_error(capsys, evaluate.main, [str(path), "--json", str(tmp_path / "no" / "r.json")])
    assert "is a directory" in cli_error(capsys, evaluate.main, [str(path), "--json", str(tmp_path)])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert "not writable" in cli_error(capsys, evaluate.main, [str(path), "--json", str(ro / "r.json")])


def test_resume_errors_name_the_checkpoint_path(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"garbage")
    err = cli_error(capsys, train.main, base_args(mnist_root, out, "--resume"))
    assert str(out / "last.pt") in err and "'auto'" not in err


def test_empty_training_batch_says_so():
    model = FusedResNet(8, widths=WIDTHS, backend="cpu" if ext.available() else "auto")
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 1, 12, 12))
    with pytest.raises(ValueError, match="with batch 1\\)"):
        model(torch.randn(1, 1, 1, 1))


# dataset files: a root that we build from MNIST's real files, then damage

def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _small_root(tmp_path, mnist_root, n=200, gz=False):
    """A MNIST root with the first n images of each split, uncompressed or as .gz only."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = os.path.join(mnist_root, "MNIST", "raw")
    for stem in ("train", "t10k"):
        imgs = read_idx(os.path.join(src, f"{stem}-images-idx3-ubyte"))[:n]
        lbls = read_idx(os.path.join(src, f"{stem}-labels-idx1-ubyte"))[:n]
        for name, arr in ((f"{stem}-images-idx3-ubyte", imgs), (f"{stem}-labels-idx1-ubyte", lbls)):
            data = _idx_bytes(np.ascontiguousarray(arr), 0x08)
            if gz:
                with gzip.open(raw / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (raw / name).write_bytes(data)
    return tmp_path / "data", raw


def test_a_root_of_gzip_files_alone_loads_without_writing(mnist_root, tmp_path):
    root, raw = _small_root(tmp_path, mnist_root, gz=True)
    plain_root, _ = _small_root(tmp_path / "plain", mnist_root)
    for p in raw.iterdir():
        p.chmod(0o444)
    raw.chmod(0o555)  # read-only: nothing may be extracted next to the files
    try:
        before = sorted(os.listdir(raw))
        a = load_splits("mnist", str(root))
        b = load_splits("mnist", str(plain_root))
        assert sorted(os.listdir(raw)) == before
    finally:
        raw.chmod(0o755)
    assert torch.equal(a["train"].images, b["train"].images) and torch.equal(a["test"].labels, b["test"].labels)
    assert a["train"].images.shape == (200, 1, 28, 28)
    # and the real MNIST files, gz against uncompressed
    full = load_dataset("mnist", False, mnist_root)[0]
    shutil.copy(os.path.join(mnist_root, "MNIST", "raw", "t10k-images-idx3-ubyte.gz"), tmp_path / "t.gz")
    assert torch.equal(torch.from_numpy(read_idx(str(tmp_path / "t"))[:, None].copy()), full.images)


DAMAGE = [
    ("bad magic", lambda b: b"\x08\x03\x00\x00" + b[4:], "bad magic number"),
    ("empty", lambda b: b"", "is empty"),
    ("truncated", lambda b: b[:-100], "is truncated"),
    ("header only", lambda b: b[:10], "is truncated"),
    ("trailing bytes", lambda b: b + b"\0" * 7, "longer than its header says"),
]


@pytest.mark.parametrize("which", ["images", "labels"])
@pytest.mark.parametrize("damage", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_idx_files_are_named(mnist_root, tmp_path, capsys, which, damage):
    _, how, message = damage
    root, raw = _small_root(tmp_path, mnist_root)
    f = raw / f"train-{which}-idx{3 if which == 'images' else 1}-ubyte"
    f.write_bytes(how(f.read_bytes()))
    with pytest.raises(DataFormatError, match=message) as e:
        load_splits("mnist", str(root))
    assert str(f) in str(e.value)
    out = tmp_path / "run"
    err = cli_error(capsys, train.main, base_args(str(root), out, "--subset", "0"))
    assert message in err and not out.exists()


def test_image_and_label_counts_must_agree(mnist_root, tmp_path, capsys):
    root, raw = _small_root(tmp_path, mnist_root)
    lbl = raw / "train-labels-idx1-ubyte"
    lbl.write_bytes(_idx_bytes(read_idx(str(lbl))[:150].copy(), 0x08))
    err = cli_error(capsys, train.main, base_args(str(root), tmp_path / "run", "--subset", "0"))
    assert "has 200 images but" in err and "150 labels" in err


def test_labels_out_of_range_are_refused_at_load(mnist_root, tmp_path, capsys):
    root, raw = _small_root(tmp_path, mnist_root)
    lbl = raw / "t10k-labels-idx1-ubyte"
    arr = read_idx(str(lbl)).copy()
    arr[17] = 200
    lbl.write_bytes(_idx_bytes(arr, 0x08))
    err = cli_error(capsys, train.main, base_args(str(root), tmp_path / "run", "--subset", "0"))
    assert "label 200" in err and "0..9" in err and str(lbl) in err


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
