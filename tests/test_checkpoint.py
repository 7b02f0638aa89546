"""resnet_fused.checkpoint on its own: the content checksum, the durable atomic write, and what a crash in the
middle of a save leaves on disk."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_fused import checkpoint
from resnet_fused.checkpoint import atomic_save, checksum, clean_stale_temp_files


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
