"""What library code may do while a CUDA graph is being captured, and the host-side choices a capture bakes in.

A CUDA graph records kernels; everything Python decides while it captures - a tile config, TF32 or IEEE products,
32- or 64-bit index math, the counters' buffer a reduction uses - is frozen into the graph. Two rules follow for
the code under a capture, and both are checked here rather than trusted:

* **no persistent allocation inside a capture**: state that outlives one call (``last_to_finish`` semaphores,
  folded or packed weights) is made before the capture, never inside it (a real capture records the zeroing
  kernel instead of running it, and puts the memory in the graph's private pool). Such code calls
  ``forbid_in_capture(what)``, which raises while either capture (``CudaCapture`` or the strict CPU stand-in,
  resnet_fused.graph_capture) is active on this thread;
* **host choices are declared**: a launcher that decides something from host state calls
  ``note_choice(kind, value)``. The emulated capture records the notes made while it captures and compares them
  with those made when it replays: a replay under changed choices (TF32 flipped after capture, another semaphore
  buffer) is an error, since a real graph would silently run the captured choice. The graph key must change
  instead (resnet_fused.graphs.GraphKey).
"""
from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


class CaptureError(RuntimeError):
    """What a CUDA-graph capture refuses, or would record wrongly, done inside one."""


def capturing() -> bool:
    """Whether a graph capture (real or emulated) is active on this thread."""
    if getattr(_state, "depth", 0) > 0:
        return True
    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def capture_region():
    """Marks this thread as capturing (entered by the capture objects of resnet_fused.graphs)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def forbid_in_capture(what: str):
    """Raise CaptureError when called inside a capture: ``what`` must happen before it (see the module docstring)."""
    if capturing():
        raise CaptureError(f"{what} inside a CUDA-graph capture: a capture records the kernels instead of running "
                           f"them and keeps the memory in the graph's pool; do it before capturing")


def note_choice(kind: str, value):
    """Declare a host-side choice a launch makes (recorded by an active ``recording_choices``)."""
    notes = getattr(_state, "notes", None)
    if notes is not None:
        notes.append((kind, value))


@contextlib.contextmanager
def recording_choices():
    """Collect the ``note_choice`` calls made inside the block into the yielded list (innermost block wins)."""
    outer = getattr(_state, "notes", None)
    _state.notes = notes = []
    try:
        yield notes
    finally:
        _state.notes = outer


def conv_tf32() -> bool:
    """Whether PyTorch's own fp32 convolutions use TF32 products, read so that it works on torch 2.11-2.14 with
    the legacy flag (``torch.backends.cudnn.allow_tf32``) or the ``fp32_precision`` API in use: reading the legacy
    flag raises once a program has mixed the two. The precision of the most specific setting that is not "none"
    (cudnn conv, then cuda, then generic) decides; all "none" means IEEE."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is not None:
        try:
            for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
                precision = getter(backend, op)
                if precision != "none":
                    return precision == "tf32"
            return False
        except RuntimeError:  # a torch whose fp32_precision API names its backends otherwise
            pass
    return bool(torch.backends.cudnn.allow_tf32)
