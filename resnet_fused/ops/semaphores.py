"""The int32 counters behind ``last_to_finish`` (implicit_gemm.py): where a launch gets them.

A launch that finishes a reduction in its last program counts arrivals in one counter per output tile; the last
program resets its counter to 0, so a buffer stays all-zero between launches, and launches that share one must not
run concurrently. Two owners:

* **eager launches**: one buffer per (device, stream), made on first use by a real zero-fill kernel on that stream
  (launches on one stream run one after another);
* **a model's CUDA graphs** (resnet_fused.graphs): one ``SemaphorePool`` per model, entered with ``use_pool`` for
  its warm-up, its captures and its replays. Its buffer (POOL_COUNTERS at least) is made in the eager warm-up,
  before any capture needs it, so a capture never allocates (and never records a zeroing it does not run); graphs of one model replay one step at a
  time, and no two models share counters. A buffer a graph was captured with is kept while the pool lives.

Allocating inside a capture raises (capture_state.forbid_in_capture): the counters would start uninitialised.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..capture_state import forbid_in_capture, note_choice

MIN_COUNTERS = 1024
# A model's pool starts this large (256 KB): its graphs' backward launches ask for counters too, but the warm-up's
# backward runs outside the pool (in the user's loss.backward()), so only the forward sizes it before a capture.
# 65,536 tiles is more than any ResNet's launches use (torchvision's ResNet-152 weight gradient: ~2,300).
POOL_COUNTERS = 1 << 16
_EAGER = {}  # (device, stream) -> buffer
_local = threading.local()


def _zeros(n, device, least=MIN_COUNTERS):
    forbid_in_capture("allocating last_to_finish semaphores")
    return torch.zeros(max(n, least), dtype=torch.int32, device=device)


class SemaphorePool:
    """The counters of one model's graphs: a buffer per device, grown outside captures only."""

    def __init__(self):
        self._buffers = {}
        self._kept = []  # smaller buffers that earlier captures may still use

    def get(self, device, n):
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            new = _zeros(n, device, POOL_COUNTERS)
            if buf is not None:
                self._kept.append(buf)
            buf = self._buffers[device] = new
        return buf


@contextlib.contextmanager
def use_pool(pool: SemaphorePool):
    """Launches in the block take their counters from ``pool`` (a model's graphs; see the module docstring)."""
    outer = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        yield
    finally:
        _local.pool = outer


def semaphores(device, n):
    """n int32 counters for last_to_finish on device, all zero (see the module docstring for who owns them)."""
    pool = getattr(_local, "pool", None)
    if pool is not None:
        buf = pool.get(device, n)
    else:
        key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
        buf = _EAGER.get(key)
        if buf is None or buf.numel() < n:
            buf = _EAGER[key] = _zeros(n, device)
    note_choice("semaphores", buf.data_ptr())
    return buf
