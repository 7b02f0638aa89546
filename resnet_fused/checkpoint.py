"""Checkpoints written atomically and read back with errors a user can act on."""
from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["UserError", "atomic_save", "atomic_write_bytes", "atomic_write_text", "clean_state_dict", "load_checkpoint",
           "check_writable_dir", "run_cli"]


class UserError(Exception):
    """A problem with the user's input (flags, files): printed as one line, exit status 2."""


def run_cli(main_fn, argv=None):
    """Run a CLI main; UserError and missing data become one-line errors with exit status 2."""
    import sys

    from .data import DataNotFoundError
    try:
        return main_fn(argv)
    except (UserError, DataNotFoundError) as e:
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


def _atomic(path: str, write):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by resnet_fused.train; UserError if missing, corrupt or not ours."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # pickle, zip and torch errors all mean the same thing to the user
        raise UserError(f"checkpoint {path!r} is corrupt or unreadable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path!r} was not written by resnet_fused.train (no 'model'/'config' entries)")
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
