"""Checkpoints: the content checksum, the durable atomic write and what a crash in the middle of a save leaves on
disk, no code execution on load, permissions, temp files, the order of checkpoints and metrics, resume and replace
rules."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_fused import checkpoint, evaluate, train
from resnet_fused.checkpoint import (UserError, atomic_save, checksum, clean_stale_temp_files, load_checkpoint,
                                     seal)

from cli_helpers import base_args, cli_error, trained_checkpoint
from test_train import base_args as train_args


def test_checksum_covers_each_tensors_dtype_and_shape_not_only_its_bytes():
    w = torch.arange(6, dtype=torch.float32)
    base = checksum({"w": w})
    assert checksum({"w": w.clone()}) == base
    assert checksum({"w": w.reshape(2, 3)}) != base       # the same bytes, another shape
    assert checksum({"w": w.view(torch.int32)}) != base   # the same bytes, another dtype
    assert checksum({"w": w[None]}) != base
    assert checksum({"w": [w]}) != checksum({"w": (w,)})  # containers are told apart too


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name file descriptors")
def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b)))
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, str(path))
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    tmp = events[1][1]
    assert events[0][1] == tmp and events[1][2] == str(path)  # the data of the file that is renamed
    assert events[2][1] == str(tmp_path)                      # then the folder that holds the new name


CRASH = textwrap.dedent("""
    import os, sys, torch
    from resnet_fused import checkpoint
    path = sys.argv[1]
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def dies_halfway(obj, f):
        f.write(b"PK\\x03\\x04 half of a checkpoint")
        f.flush()
        os._exit(9)  # killed mid-write: no cleanup, no rename
    checkpoint.torch.save = dies_halfway
    checkpoint.atomic_save({"epoch": 2, "w": torch.zeros(1000)}, path)
""")


def test_a_crash_in_the_middle_of_a_save_leaves_the_old_file_and_a_temp_file_the_next_run_removes(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    old = torch.load(path, weights_only=True)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(1000))
    temps = [f for f in os.listdir(tmp_path) if f.endswith(checkpoint.TEMP_SUFFIX)]
    assert len(temps) == 1 and temps[0].startswith(".last.pt.")
    removed = clean_stale_temp_files(str(tmp_path), ["last.pt"])
    assert [os.path.basename(p) for p in removed] == temps
    assert os.listdir(tmp_path) == ["last.pt"]


# ---- through the training and evaluation CLIs -----------------------------------------------------------------

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


def test_a_flipped_byte_is_an_error(mnist_root, tmp_path, capsys):
    path = trained_checkpoint(mnist_root, tmp_path)
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
    path = trained_checkpoint(mnist_root, tmp_path)
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


def test_resume_errors_name_the_checkpoint_path(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"garbage")
    err = cli_error(capsys, train.main, base_args(mnist_root, out, "--resume"))
    assert str(out / "last.pt") in err and "'auto'" not in err


def test_checkpoints_are_never_silently_replaced_or_mismatched(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train_args(mnist_root, out, "--model", "resnet8", "--epochs", "1", "--subset", "200", "--no-plot"))
    before = (out / "last.pt").read_bytes()
    err = cli_error(capsys, train.main, train_args(mnist_root, out, "--model", "resnet8", "--epochs", "1"))
    assert "exists" in err and "--resume" in err
    err = cli_error(capsys, train.main, train_args(mnist_root, out, "--model", "resnet14", "--resume"))
    assert "does not match" in err
    assert "holds a resnet8" in cli_error(capsys, evaluate.main, [str(out / "last.pt"), "--model", "resnet14"])
    # a checkpoint whose weights belong to another architecture than its config says
    ckpt = torch.load(out / "last.pt", weights_only=True)
    from resnet_fused import resnet14
    ckpt["model"] = resnet14().state_dict()
    torch.save(seal(ckpt), tmp_path / "other.pt")  # sealed again, as a tool that edits checkpoints would
    err = cli_error(capsys, evaluate.main, [str(tmp_path / "other.pt"), "--data-root", mnist_root, "--device", "cpu"])
    assert "does not match the model architecture" in err
    assert (out / "last.pt").read_bytes() == before


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
