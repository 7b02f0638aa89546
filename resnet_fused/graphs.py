"""Self-captured CUDA graphs for FusedResNet: the ordinary training loop at graph speed.

A fused ResNet-20 step is a few hundred small kernels; launched one by one from Python the GPU waits on the host.
``GraphRunner`` captures the model's forward (and, when gradients are needed, its backward) once per
``GraphKey`` and replays them through an autograd Function, as ``torch.cuda.make_graphed_callables`` does, with:

* **autocast**: the autocast dtype is part of the key and the capture runs under the same autocast with its cast
  cache off (a cached cast would be a tensor the graph reads after autocast freed it);
* **one real step per call**: the first call with a new key runs eagerly (the warm-up: Triton compiles, cuDNN and
  cuBLAS initialise), the second captures and then replays, so the running statistics and
  ``num_batches_tracked`` move exactly once per call, as without graphs (a capture runs no kernels);
* **outputs that stay**: the logits handed back are a copy of the graph's static output, and parameter gradients
  a copy of its static gradient buffer (one flat buffer per dtype, one copy), so the next replay overwrites
  nothing the user holds; gradient accumulation across calls works;
* **staleness**: every parameter and buffer's storage, each BatchNorm's momentum/eps/track_running_stats, the
  parameters' requires_grad and (in eval mode) the folded weights' generation are checked on every call; a change
  drops the graphs (``.to()``, ``load_state_dict`` and ``invalidate_caches()`` drop them too). Optimizer steps
  update parameters in place: the graphs keep reading them;
* **bounded**: at most ``max_graphs`` keys (least recently used dropped); all graphs share one memory pool;
* **safe interleaving**: graphs that share a pool must run one step at a time. While a replayed forward waits for
  its backward, any other call of the model runs eagerly (so ``loss = f(model(a)) + f(model(b))`` is right);
  a second backward through a replay that another replay has overwritten (``retain_graph=True``) raises;
* **no double capture**: under ``torch.compile`` tracing or inside a user's own CUDA graph capture the model runs
  as without graphs (the outer graph captures the kernels).

* **what a capture bakes in is in the key or kept**: the input's memory format, inference mode and TF32 are part of
  the key; packed weights are made before a capture (``Backend.prepare``), and the ``last_to_finish`` counters
  come from the model's own pool, sized and zeroed in the warm-up (ops/semaphores.py).

The capture itself is an object (resnet_fused.graph_capture: ``CudaCapture`` on a GPU): the strict
``EmulatedCapture`` stands in for it on CPU, replaying the recorded operators as a graph would and refusing what a
capture refuses, so that the keying, warm-up, invalidation and gradient plumbing above are tested without a GPU.
Off with ``FusedResNet(cuda_graphs=False)`` or ``RESNET_FUSED_CUDA_GRAPHS=0``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

from .capture_state import conv_tf32
from .graph_capture import Captured, CudaCapture, EmulatedCapture  # noqa: F401 - the capture objects, re-exported
from .ops.semaphores import SemaphorePool, use_pool

ENV_VAR = "RESNET_FUSED_CUDA_GRAPHS"
MAX_GRAPHS = 4  # keys kept: a training batch size, the epoch's last (smaller) batch, and the eval batch sizes


# Bumped whenever any module anywhere registers a parameter, buffer or submodule (assignments included): the
# runners rebuild their cached tensor lists then, so the per-call staleness check stays a few list comprehensions.
_registrations = [0]


def _bump(*args):
    _registrations[0] += 1


for _hook in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
              "register_module_module_registration_hook"):
    getattr(torch.nn.modules.module, _hook)(_bump)


def enabled_by_default() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


# ---- keys and entries --------------------------------------------------------------------------------------------

class GraphKey(NamedTuple):
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    x_requires_grad: bool
    autocast: Optional[torch.dtype]   # autocast's dtype for this device when it is on, else None
    training: bool
    needs_grad: bool                  # grad mode on and something (x or a parameter) requires grad
    inference: bool                   # torch.inference_mode: its static tensors are inference tensors
    tf32: bool                        # fp32 convolutions in TF32 (capture_state.conv_tf32): baked into the kernels
    backend: str


class _Entry:
    def __init__(self, key):
        self.key = key
        self.fwd = self.bwd = None
        self.static_x = self.static_grad_out = None
        self.inputs = ()          # what the backward differentiates: (static_x?,) + parameters requiring grad
        self.flat = {}            # dtype -> static flat gradient buffer
        self.slots = []           # per input: (dtype, offset, shape, stride) in the flat buffer
        self.fold_generation = None


def _dense(t):
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _slot_view(flat, offset, shape, stride):
    return flat.as_strided(shape, stride, flat.storage_offset() + offset)


class _Token:
    """Lives as long as a replayed forward's autograd node: while it does and its backward has not run, the
    activations that backward reads sit in the shared pool and no other graph may run."""
    __slots__ = ("done", "__weakref__")

    def __init__(self):
        self.done = False


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, module, entry, x, *params):
        out = runner._replay_forward(module, entry, x)
        ctx.runner, ctx.entry, ctx.generation = runner, entry, runner.generation
        ctx.token = _Token()
        runner._pending = weakref.ref(ctx.token)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        runner, entry = ctx.runner, ctx.entry
        if runner.generation != ctx.generation:
            raise RuntimeError("FusedResNet: this backward belongs to a CUDA-graph replay whose activations a later "
                               "forward has overwritten (a second backward with retain_graph=True after another "
                               "forward); run such code with FusedResNet(cuda_graphs=False)")
        grads = runner._replay_backward(entry, grad)
        ctx.token.done = True
        if not entry.key.x_requires_grad:
            grads = (None,) + grads
        return (None, None, None) + grads


# ---- the runner ----------------------------------------------------------------------------------------------------

class GraphRunner:
    """Captures and replays a FusedResNet's forward/backward per GraphKey (see the module docstring)."""

    def __init__(self, enabled: bool = True, max_graphs: int = MAX_GRAPHS, capturer=None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.enabled = bool(enabled)
        self.max_graphs = max_graphs
        self.capturer = capturer if capturer is not None else CudaCapture()
        self.stats = dict(captures=0, replays=0, eager=0, failures=0, invalidations=0)
        self.generation = 0  # bumped by every forward replay
        self._pending = None  # weak reference to the token of the replay whose backward has not run yet
        self._signature = None  # what the graphs were captured against (see _check_signature)
        self._lists = self._objects = None  # cached parameter/buffer/BatchNorm lists and the tensors' identities
        self.semaphores = SemaphorePool()  # last_to_finish counters of this model's graphs (ops/semaphores.py)
        self._reset()

    def _reset(self):
        self._entries: "OrderedDict[GraphKey, _Entry]" = OrderedDict()
        self._warm = OrderedDict()   # keys that ran eagerly once (their kernels are compiled)
        self._failed = set()         # keys whose capture raised: eager from then on

    def clear(self):
        """Drop every graph (they are rebuilt on the next calls)."""
        if self._entries or self._warm:
            self.stats["invalidations"] += 1
        self._reset()

    # copy.deepcopy / pickle of the model: graphs belong to one model's memory and are not copied
    def __deepcopy__(self, memo):
        return GraphRunner(self.enabled, self.max_graphs, type(self.capturer)())

    def __getstate__(self):
        return dict(enabled=self.enabled, max_graphs=self.max_graphs, capturer=type(self.capturer))

    def __setstate__(self, state):
        self.__init__(state["enabled"], state["max_graphs"], state["capturer"]())

    def __len__(self):
        return len(self._entries)

    def __repr__(self):
        return (f"GraphRunner(enabled={self.enabled}, graphs={len(self._entries)}/{self.max_graphs}, "
                f"stats={self.stats})")

    # ---- when graphs apply -------------------------------------------------------------------------------------

    def applies(self, x: torch.Tensor) -> bool:
        if not self.enabled or x.device.type not in self.capturer.device_types or not _dense(x):
            return False
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False  # the compiler (or tracer) sees the plain model; its own graphs, if any, capture it
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # inside the user's capture: the outer graph records the kernels
        return True

    def _busy(self):
        tok = self._pending() if self._pending is not None else None
        return tok is not None and not tok.done

    def _key(self, x, backend, training, params_grad):
        dev = x.device.type
        autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or params_grad)
        return GraphKey(tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad and needs_grad,
                        autocast, training, needs_grad, torch.is_inference_mode_enabled(), conv_tf32(),
                        backend.name)

    def _check_signature(self, module):
        """Drop the graphs when something they baked in changed: a parameter or buffer replaced (a new object or
        a new storage), which parameters require grad, a BatchNorm's momentum / eps / track_running_stats.
        Returns whether any parameter requires grad."""
        if self._lists is None or self._lists[0] != _registrations[0]:
            self._lists = (_registrations[0], list(module.parameters()), list(module.buffers()),
                           [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)])
            objects = (tuple(map(id, self._lists[1])), tuple(map(id, self._lists[2])))
            if objects != self._objects:
                if self._objects is not None:
                    self.clear()
                self._objects = objects
        _, params, buffers, bns = self._lists
        sig = ([t.data_ptr() for t in params], [t.data_ptr() for t in buffers], [t.requires_grad for t in params],
               [(m.momentum, m.eps, m.track_running_stats) for m in bns])
        if sig != self._signature:
            if self._signature is not None:
                self.clear()
            self._signature = sig
        return any(sig[2])

    # ---- a call --------------------------------------------------------------------------------------------------

    def __call__(self, module, x, backend, run):
        """``run(x)`` is the model's plain forward for this backend (logits)."""
        key = self._key(x, backend, module.training, self._check_signature(module))
        if self._busy() or key in self._failed:
            self.stats["eager"] += 1
            return run(x)
        fold_gen = module.fold_cache.refresh(module, module.plan, _compute_dtype(x)) if not key.training else None
        entry = self._entries.get(key)
        if entry is not None and entry.fold_generation != fold_gen:
            self._drop(key)  # eval graph of older folded weights: recapture (its kernels are warm)
            entry = None
        if entry is None:
            if key not in self._warm:
                self._warm[key] = True
                while len(self._warm) > 4 * self.max_graphs:
                    self._warm.popitem(last=False)
                self.stats["eager"] += 1
                with use_pool(self.semaphores):  # the warm-up sizes the graphs' counters (zeroed here, eagerly)
                    return run(x)
            entry = self._capture(module, key, x, run, fold_gen, backend)
            if entry is None:
                self.stats["eager"] += 1
                return run(x)
        self._entries.move_to_end(key)
        if not key.needs_grad:
            return self._replay_forward(module, entry, x)
        params = [t for t in entry.inputs if t is not entry.static_x]
        return _Replay.apply(self, module, entry, x, *params)

    def _drop(self, key):
        self._entries.pop(key, None)

    def _capture(self, module, key, x, run, fold_gen, backend):
        while len(self._entries) >= self.max_graphs:
            self._entries.popitem(last=False)
        entry = _Entry(key)
        entry.fold_generation = fold_gen
        try:
            backend.prepare(module, x)  # packed/transformed weights made now (in the call's autocast dtype)
            with use_pool(self.semaphores):
                self._capture_into(entry, module, key, x, run)
        except Exception as e:  # noqa: BLE001 - anything the capture refuses: run this key eagerly from now on
            self._failed.add(key)
            self.stats["failures"] += 1
            warnings.warn(f"FusedResNet: CUDA graph capture failed for input {key.shape} ({type(e).__name__}: "
                          f"{e}); this input shape runs without graphs. FusedResNet(cuda_graphs=False) turns "
                          f"graphs off.", RuntimeWarning, stacklevel=4)
            return None
        self._entries[key] = entry
        self.stats["captures"] += 1
        return entry

    def _capture_into(self, entry, module, key, x, run):
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            static_x.copy_(x)
        static_x.requires_grad_(key.x_requires_grad)
        entry.static_x = static_x

        def forward():
            with _modes(key):
                return (run(static_x),)
        entry.fwd = self.capturer.capture(forward, module)
        if not key.needs_grad:
            return
        entry.inputs = tuple(([static_x] if key.x_requires_grad else [])
                             + [p for p in module.parameters() if p.requires_grad])
        out = entry.fwd.outputs[0]
        entry.static_grad_out = torch.zeros_like(out, requires_grad=False)
        sizes = {}
        for t in entry.inputs:
            dense = _dense(t) and all(s > 0 for s in t.stride())
            stride = t.stride() if dense else _contiguous_strides(t.shape)
            entry.slots.append((t.dtype, sizes.get(t.dtype, 0), tuple(t.shape), tuple(stride)))
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        entry.flat = {dt: torch.zeros(n, dtype=dt, device=x.device) for dt, n in sizes.items()}
        views = [_slot_view(entry.flat[dt], off, shape, stride) for dt, off, shape, stride in entry.slots]

        def backward():
            grads = torch.autograd.grad(entry.fwd.live[0], entry.inputs, entry.static_grad_out,
                                        retain_graph=False, allow_unused=True)  # captured once, replayed
            with torch.no_grad():
                for v, g in zip(views, grads):
                    v.zero_() if g is None else v.copy_(g)
            return tuple(entry.flat.values())
        entry.bwd = self.capturer.capture(backward, module)

    def _replay_forward(self, module, entry, x):
        with torch.no_grad():
            entry.static_x.copy_(x)
        with use_pool(self.semaphores):  # what the capture used (the emulated replay checks it)
            entry.fwd.replay()
        if entry.key.training:
            # the replay moved the running statistics without moving their version counters: the folded
            # inference weights must be rebuilt from them
            module.fold_cache.invalidate()
        self.generation += 1
        self.stats["replays"] += 1
        return entry.fwd.outputs[0].detach().clone()

    def _replay_backward(self, entry, grad):
        with torch.no_grad():
            entry.static_grad_out.copy_(grad)
        with use_pool(self.semaphores):
            entry.bwd.replay()
        flat = {dt: buf.clone() for dt, buf in entry.flat.items()}  # one copy per dtype: the user's gradients
        return tuple(_slot_view(flat[dt], off, shape, stride) for dt, off, shape, stride in entry.slots)


def _contiguous_strides(shape):
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= max(n, 1)
    return tuple(reversed(strides))


def _compute_dtype(x):
    from .backends.base import compute_dtype
    return compute_dtype(x)


@contextlib.contextmanager
def _modes(key: GraphKey):
    """The grad mode and autocast of the call, autocast's cast cache off (see the module docstring)."""
    dev = key.device.type
    with torch.set_grad_enabled(key.needs_grad):
        if key.autocast is None:
            with torch.autocast(dev, enabled=False):
                yield
        else:
            with torch.autocast(dev, dtype=key.autocast, cache_enabled=False):
                yield
