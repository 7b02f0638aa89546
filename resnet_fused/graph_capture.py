"""The capture objects of resnet_fused.graphs: the real CUDA-graph capture, and a strict CPU stand-in for it.

``EmulatedCapture`` lets GraphRunner's keying, warm-up, invalidation and gradient plumbing be tested without a
GPU, and it is built to fail where a real capture would fail or silently go wrong:

* **a replay runs what was recorded, not the Python**: while capturing, a TorchDispatchMode records every operator
  with the very tensors it read and wrote; a replay re-runs those operators on those tensors and writes each result
  into the tensor recorded as its output (outputs that alias an input are written in place already; ``empty``
  runs no kernel). So a graph kept after a parameter was replaced reads the old parameter, as a CUDA graph reads
  the old address: a stale graph shows in the values;
* **a capture runs no kernels**: memory that existed before the capture and that it wrote (running statistics,
  gradient buffers) is restored afterwards, and floating-point tensors made in the capture hold NaN until a replay
  writes them;
* **what a capture refuses is refused** (CaptureError, which GraphRunner turns into its eager fallback): reading a
  value on the host (``.item()``, ``bool()``, ``.tolist()``, ``.numpy()``, printing, ``.cpu()`` of a CUDA tensor,
  ``nonzero`` and other ops whose output depends on the data), tensors made from host data (``torch.tensor``,
  ``from_numpy``: a pageable host-to-device copy on a GPU), copies from a CPU tensor to a CUDA capture device,
  random numbers (a replay would repeat the capture's draws), and what library code declares forbidden
  (``capture_state.forbid_in_capture``: semaphores, folded and packed weights); writing an inference tensor
  outside inference mode fails as in PyTorch;
* **one level deep**: the dispatch mode sees each custom op as one operator and is not active inside its
  implementation, so a launcher's own host code is held to these rules by ``forbid_in_capture`` and the choice
  notes, not by the mode (the launchers read shapes, strides and storage sizes, never values);
* **host choices are compared**: the ``capture_state.note_choice`` notes (TF32, 64-bit indexing, tile configs,
  split counts, the semaphore buffer) made while capturing must be made again, equal, by each replay; a replay
  under changed conditions raises, since a real graph would run the captured choice without a word.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .capture_state import CaptureError, capture_region, recording_choices


class Captured:
    """A captured computation: ``outputs`` are static tensors that ``replay()`` rewrites in place; ``live`` are the
    outputs that carry the autograd graph of the latest execution (what a backward capture differentiates)."""

    def __init__(self, replay, outputs, live):
        self.replay, self.outputs, self.live = replay, outputs, live


class CudaCapture:
    """torch.cuda.CUDAGraph capture into one private memory pool shared by every graph of the model."""

    device_types = ("cuda",)

    def __init__(self):
        self._pool = None

    def capture(self, fn, module) -> Captured:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA while we capture
        with capture_region(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        return Captured(graph.replay, out, out)


# ---- the strict stand-in -------------------------------------------------------------------------------------------

_aten = torch.ops.aten
_HOST_READS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.nonzero.default,
               _aten.equal.default}
_HOST_DATA = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_NO_KERNEL = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
              _aten.new_empty.default, _aten.new_empty_strided.default}
_HOST_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__repr__, torch.Tensor.__format__,
                 torch.Tensor.__str__, torch.Tensor.item}


def _tensors(tree):
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage(t):
    return t.untyped_storage().data_ptr() if t.numel() else None


def _written(func, args, kwargs):
    """The tensors an operator writes in place (its schema's ``Tensor(a!)`` arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += _tensors(value)
    return out


class _NoHostReads(TorchFunctionMode):
    """Tensor methods that read values on the host without an operator the dispatch mode would see."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_METHODS:
            raise CaptureError(f"{getattr(func, '__name__', func)}() reads a tensor's values on the host (a device "
                               f"sync) inside a CUDA-graph capture")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    """Records the operators of a capture with their tensors; refuses what a real capture refuses."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type = device_type
        self.calls = []     # (op, args, kwargs, outputs)
        self.made = set()   # storages allocated inside the capture
        self.saved = {}     # storage -> (a uint8 alias of it, its bytes before the capture first wrote it)
        self.choices = []   # the note_choice notes the operators made (what their replays must make again)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._refuse(func, args, kwargs)
        for t in _written(func, args, kwargs):
            self._save(t)
        inputs = {_storage(t) for t in _tensors((args, kwargs))}
        with recording_choices() as choices:
            out = func(*args, **kwargs)
        self.choices += choices
        self.made.update(_storage(t) for t in _tensors(out) if _storage(t) not in inputs)
        self.calls.append((func, args, kwargs, out))
        return out

    def _refuse(self, func, args, kwargs):
        name = func.name()
        if func in _HOST_READS or torch.Tag.data_dependent_output in func.tags \
                or torch.Tag.dynamic_output_shape in func.tags:
            raise CaptureError(f"{name} reads a tensor's values on the host (a device sync) inside a CUDA-graph "
                               f"capture")
        if func in _HOST_DATA:
            raise CaptureError(f"a tensor made from host data ({name}: torch.tensor, from_numpy) inside a CUDA-graph "
                               f"capture: a real capture refuses its pageable host-to-device copy; make it before "
                               f"capturing")
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise CaptureError(f"random numbers ({name}) drawn inside a CUDA-graph capture: every replay would "
                               f"repeat the capture's draws unless the generator is registered with the graph")
        if self.device_type == "cuda" and func in (_aten._to_copy.default, _aten.copy_.default):
            src = args[1] if func is _aten.copy_.default else args[0]
            dst = args[0].device if func is _aten.copy_.default else kwargs.get("device", src.device)
            if src.device.type == "cpu" and torch.device(dst).type == "cuda":
                raise CaptureError(f"a copy from a CPU tensor to {dst} ({name}) inside a CUDA-graph capture")
            if src.device.type == "cuda" and torch.device(dst).type == "cpu":
                raise CaptureError(f"a copy from {src.device} to the host ({name}: .cpu(), .to('cpu')) reads a "
                                   f"tensor's values on the host (a device sync) inside a CUDA-graph capture")

    def _save(self, t):
        key = _storage(t)
        if key is None or key in self.made or key in self.saved:
            return
        alias = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        self.saved[key] = (alias, alias.clone())

    def undo_writes(self):
        """Pre-existing memory back as before the capture (no version counter moves: uint8 aliases)."""
        with torch.no_grad():
            for alias, before in self.saved.values():
                alias.copy_(before)

    def poison_made(self):
        """Tensors made in the capture to NaN (floating point): a capture leaves them undefined."""
        with torch.no_grad():
            for _, _, _, out in self.calls:
                for t in _tensors(out):
                    if t.is_floating_point() and _storage(t) in self.made:
                        t.data.fill_(float("nan"))


class EmulatedCapture:
    """The strict CPU stand-in for CudaCapture (see the module docstring). Tests read ``captures``; ``fail`` set to
    an exception makes the next capture raise it."""

    device_types = ("cpu", "cuda")

    def __init__(self):
        self.captures = 0
        self.fail = None

    def capture(self, fn, module) -> Captured:
        if self.fail is not None:
            e, self.fail = self.fail, None
            raise e
        device = next(module.parameters()).device
        inference = torch.is_inference_mode_enabled()
        recorder = _Recorder(device.type)
        try:
            with capture_region(), recording_choices(), _NoHostReads(), recorder:
                out = fn()
        finally:
            recorder.undo_writes()
        recorder.poison_made()
        self.captures += 1
        choices = recorder.choices

        def replay():
            # below autograd, where the recorder saw the operators: no autograd graph is built and, below
            # ADInplaceOrView, no version counter moves (a real replay runs kernels only)
            with torch.inference_mode(inference), torch._C._AutoDispatchBelowADInplaceOrView(), \
                    recording_choices() as now:
                for func, args, kwargs, rec in recorder.calls:
                    if func in _NO_KERNEL:
                        continue
                    for r, n in zip(_tensors(rec), _tensors(func(*args, **kwargs))):
                        if r.data_ptr() != n.data_ptr():
                            r.copy_(n)
            if now != choices:
                changed = sorted({k for k, v in now if (k, v) not in choices}
                                 | {k for k, v in choices if (k, v) not in now})
                raise CaptureError(f"a CUDA graph replayed under host choices other than its capture's "
                                   f"({', '.join(changed)}): a real graph would run the captured ones; the graph "
                                   f"key must change with them")
        return Captured(replay, out, out)
