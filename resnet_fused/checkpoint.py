"""Checkpoints written atomically, sealed with a content checksum, and read back safely (weights_only) with errors a
user can act on."""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile

import torch

__all__ = ["UserError", "atomic_save", "atomic_write_bytes", "atomic_write_text", "checksum", "clean_state_dict",
           "clean_stale_temp_files", "load_checkpoint", "check_output_file", "check_writable_dir", "run_cli", "seal"]


class UserError(Exception):
    """A problem with the user's input (flags, files): printed as one line, exit status 2."""


def run_cli(main_fn, argv=None):
    """Run a CLI main; UserError and dataset errors become one-line errors with exit status 2."""
    import sys

    from .data import DatasetError
    try:
        return main_fn(argv)
    except (UserError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def check_writable_dir(path: str) -> str:
    """Create ``path`` if needed and prove it is writable (a probe file), else UserError."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output directory {path!r} is not writable: {e.strerror or e}") from None
    return path


# temp files of _atomic: ".<name>.<random>.tmp" beside the file they become
TEMP_SUFFIX = ".tmp"


def check_output_file(path: str, flag: str) -> str:
    """A file we will write later: its folder exists and is writable, and it is not a folder itself (UserError
    now, before the work whose result it holds)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a directory, not a file")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"{flag} {path!r}: the folder {d!r} does not exist")
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path!r} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: str):
    """Make a rename in ``d`` durable: without it a power cut can bring back the old file (or none)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str, write):
    """Write through a temp file in the same folder, fsync, rename, fsync the folder: a crash leaves either the old
    file or the new one, never a mix. The file gets the ordinary permissions (0666 less the umask; mkstemp's are
    0600). A failed write (a full disk) is a UserError and leaves the old file as it was."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=d)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(d)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous file (if any) is unchanged") \
            from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def clean_stale_temp_files(folder: str, names) -> list[str]:
    """Remove the temp files that a killed run left beside ``names`` in ``folder`` (call only for a folder this
    run owns); returns the paths removed."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    prefixes = tuple("." + n + "." for n in names)
    for e in entries:
        if e.startswith(prefixes) and e.endswith(TEMP_SUFFIX):
            path = os.path.join(folder, e)
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_save(obj, path: str):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str):
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str):
    atomic_write_bytes(text.encode(), path)


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ---- content checksum ----------------------------------------------------------------------------------------
# A checkpoint is a dict of tensors and plain values (dict, list, tuple, str, int, float, bool, None). Its checksum
# is a SHA-256 over a canonical walk of everything but the checksum entry itself: each tensor's dtype, shape and
# bytes, each plain value's type and repr, dicts in their (pickled) order. A flipped byte anywhere in the data - a
# weight, an optimizer moment, the epoch, the config - changes it; the zip container's own CRCs do not cover that.

CHECKSUM_KEY = "checksum"


def _digest(obj, h):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoints hold tensors and plain values only, got a {type(obj).__name__}")


def checksum(ckpt: dict) -> str:
    """'sha256:<hex>' of a checkpoint's content (all entries but the checksum itself)."""
    h = hashlib.sha256()
    _digest({k: v for k, v in ckpt.items() if k != CHECKSUM_KEY}, h)
    return "sha256:" + h.hexdigest()


def seal(ckpt: dict) -> dict:
    """The checkpoint with its checksum entry set: what resnet_fused.train saves, and what a tool that edits a
    checkpoint calls before saving it again."""
    ckpt = dict(ckpt)
    ckpt[CHECKSUM_KEY] = checksum(ckpt)
    return ckpt


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by resnet_fused.train; UserError if missing, corrupt, altered or not ours.

    Loading is ``weights_only``: tensors and plain values only, so a crafted file cannot run code; the content
    checksum is then verified."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only" in msg:
            raise UserError(f"checkpoint {path!r} holds Python objects other than tensors and plain values; it was "
                            f"not written by resnet_fused.train and is refused (loading it could run code)") \
                from None
        raise UserError(f"checkpoint {path!r} is corrupt or unreadable (UnpicklingError: "
                        f"{msg.splitlines()[0] if msg else 'no detail'})") from None
    except Exception as e:  # zip, torch and I/O errors all mean the same thing to the user
        raise UserError(f"checkpoint {path!r} is corrupt or unreadable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path!r} was not written by resnet_fused.train (no 'model'/'config' entries)")
    stored = ckpt.get(CHECKSUM_KEY)
    if stored is None:
        raise UserError(f"checkpoint {path!r} has no content checksum (written by an older resnet_fused, or "
                        f"edited without resnet_fused.checkpoint.seal); refused")
    try:
        actual = checksum(ckpt)
    except TypeError as e:
        raise UserError(f"checkpoint {path!r} is not a resnet_fused checkpoint: {e}") from None
    if actual != stored:
        raise UserError(f"checkpoint {path!r} is corrupt: its content does not match its checksum (a changed or "
                        f"damaged file); use another checkpoint (e.g. best.pt / last.pt) or retrain")
    return ckpt


def load_model_state(model: torch.nn.Module, state_dict: dict, what: str):
    """load_state_dict(strict=True) with a one-line UserError naming the first mismatches."""
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise UserError(f"{what} does not match the model architecture: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)
