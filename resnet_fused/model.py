"""FusedResNet: the reference ResNet's modules and state_dict, run through fused operators.

forward = input checks -> backend features (resnet_fused.backends: "triton", "cpu"/"cuda" extension, or the plain
PyTorch reference) -> global average pool -> fc. The backends walk ``self.plan`` (resnet_fused.plan: the network
described once); in eval mode they read the BatchNorm-folded plan from ``self.fold_cache``. See
docs/ARCHITECTURE.md for the path from here to a kernel.
"""
from __future__ import annotations

import os

import torch

from . import backends, distributed
from .graphs import GraphRunner, enabled_by_default
from .plan import FoldCache, build_plan
from .reference import ResNet

BACKENDS = backends.BACKENDS


def _copy_bn_settings(src, dst):
    """eps and momentum are BatchNorm attributes, not state_dict entries: carried over by the conversions."""
    for a, b in zip(src.modules(), dst.modules()):
        if isinstance(a, torch.nn.modules.batchnorm._BatchNorm):
            b.eps, b.momentum = a.eps, a.momentum


def _drop_graphs(module, incompatible_keys):
    module.graphs.clear()


class FusedResNet(ResNet):
    """Drop-in ResNet with fused kernels: same constructor (plus ``backend``) and the same state_dict keys.

    ``backend``: "auto" (default, or ``RESNET_FUSED_BACKEND``), "triton", "cuda" or "cpu"; see the README's
    backends table and docs/GUIDE.md.
    ``cuda_graphs``: capture the forward/backward of CUDA inputs in CUDA graphs and replay them (default on;
    ``RESNET_FUSED_CUDA_GRAPHS=0`` sets the default off); see resnet_fused.graphs and docs/GUIDE.md.
    ``sync_bn``: in training under torch.distributed, BatchNorm statistics of the global batch (over
    ``process_group``, default the world); see resnet_fused.distributed."""

    def __init__(self, depth: int = 20, shortcut: str | None = "A", in_channels: int = 1, num_classes: int = 10,
                 widths=None, plain: bool = False, backend: str | None = None, cuda_graphs: bool | None = None,
                 sync_bn: bool = False, process_group=None):
        super().__init__(depth, shortcut, in_channels, num_classes, widths, plain)
        self.sync_bn, self.process_group = bool(sync_bn), process_group
        self.backend = backends.validate_name(backend or os.environ.get("RESNET_FUSED_BACKEND", "auto"))
        self.plan = build_plan(self)
        self.fold_cache = FoldCache()
        self.graphs = GraphRunner(enabled_by_default() if cuda_graphs is None else cuda_graphs)
        self.whole_network_inference = os.environ.get("RESNET_FUSED_WHOLE_NETWORK", "0") == "1"
        self.register_load_state_dict_post_hook(_drop_graphs)

    # ---- conversions ---------------------------------------------------------------------------------------------

    @classmethod
    def from_reference(cls, model: ResNet, backend: str | None = None, cuda_graphs: bool | None = None,
                       sync_bn: bool = False, process_group=None) -> "FusedResNet":
        fused = cls(**model.config(), backend=backend, cuda_graphs=cuda_graphs, sync_bn=sync_bn,
                    process_group=process_group)
        p = next(model.parameters())
        fused.to(device=p.device, dtype=p.dtype)
        fused.load_state_dict(model.state_dict(), strict=True)
        _copy_bn_settings(model, fused)
        return fused.train(model.training)

    @staticmethod
    def from_torchvision(model, backend: str | None = None):
        """A torchvision ResNet (resnet18 ... wide_resnet101_2, or a variant of one) run through the fused
        backends: a FusedTorchvisionResNet with a copy of its modules and its state_dict keys
        (resnet_fused.torchvision_resnet)."""
        from .torchvision_resnet import from_torchvision
        return from_torchvision(model, backend)

    def to_reference(self) -> ResNet:
        ref = ResNet(**self.config())
        p = next(self.parameters())
        ref.to(device=p.device, dtype=p.dtype)
        ref.load_state_dict(self.state_dict(), strict=True)
        _copy_bn_settings(self, ref)
        return ref.train(self.training)

    def extra_repr(self):
        return f"backend={self.backend!r}, cuda_graphs={self.graphs.enabled}, sync_bn={self.sync_bn}"

    # ---- caches ----------------------------------------------------------------------------------------------------

    def folded(self, dtype):
        """The BatchNorm-folded plan for inference in ``dtype`` (cached; see plan.FoldCache)."""
        return self.fold_cache.get(self, self.plan, dtype)

    def invalidate_caches(self):
        """Drop the inference caches (BatchNorm folded into the conv weights, their Winograd transforms) and the
        CUDA graphs. Needed only after changing a weight or buffer in a way PyTorch does not record
        (``p.data[...] = ...``, ``p.data.copy_(...)``); optimizer steps, in-place ops on the parameters,
        load_state_dict, ``.to()``, replaced parameters and changes of eps or momentum are seen by themselves."""
        self.fold_cache.invalidate()
        self.graphs.clear()

    def _apply(self, fn, *args, **kwargs):
        if "graphs" in self.__dict__:  # .to() / .cuda() / .half() replace tensors (and run during __init__)
            self.invalidate_caches()
        return super()._apply(fn, *args, **kwargs)

    @property
    def whole_network_inference(self) -> bool:
        """Inference on the triton backend as one launch for the whole network (ops/resnet_infer.py) instead of
        one per conv. Off by default (``RESNET_FUSED_WHOLE_NETWORK=1`` turns it on) until measured on a GPU;
        networks the kernel does not take run per layer."""
        return self._whole_network

    @whole_network_inference.setter
    def whole_network_inference(self, on: bool):
        self._whole_network = bool(on)
        self.graphs.clear()  # a captured inference graph holds the other path

    # ---- forward -----------------------------------------------------------------------------------------------

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The name of the backend this input runs on: "triton", "cuda", "cpu", or "reference"."""
        return backends.resolve(self.backend, x).name

    def forward(self, x):
        self._check_input(x)
        backend = backends.resolve(self.backend, x)
        if not self.training and torch.is_grad_enabled() and self._needs_grad(x):
            backend = backends.REFERENCE  # eval-mode gradients (saliency, adversarial): the reference composition
        group = distributed.active_group(self.process_group) if self.sync_bn and self.training else None
        if group is not None:  # collectives in every BatchNorm: run without the model's own CUDA graphs
            return self._run(x, backend, distributed.BatchSync(group, x))
        if backend is not backends.REFERENCE and self.graphs.applies(x):
            return self.graphs(self, x, backend, lambda a: self._run(a, backend))
        return self._run(x, backend)

    def _run(self, x, backend, sync=None):
        return backend.forward(self, x, sync)

    def _needs_grad(self, x):
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedResNet expects a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"FusedResNet expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FusedResNet was built for {self.in_channels} input channels, got input of shape "
                             f"{tuple(x.shape)} ({x.shape[1]} channels)")
        if not x.is_floating_point():
            raise TypeError(f"FusedResNet expects a floating-point input, got {x.dtype}; convert images with "
                            f".float() (and normalise) first")
        w = self.conv1.weight
        if x.device != w.device:
            raise RuntimeError(f"input is on {x.device} but the model's weights are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"input dtype {x.dtype} does not match the weight dtype {w.dtype}; convert one of "
                               f"them (or run under torch.autocast)")
        if self.training and x.shape[0] == 0:
            raise ValueError(f"FusedResNet got an empty batch (input shape {tuple(x.shape)}); training needs at "
                             f"least one image (BatchNorm statistics of no values are undefined)")
        if self.training and x.shape[0] * self._min_spatial(x) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)} (spatial size 1x1 after the last stage with batch "
                             f"{x.shape[0]})")

    def _min_spatial(self, x):
        h, w = x.shape[2], x.shape[3]
        for _ in range(len(self.widths) - 1):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return h * w
