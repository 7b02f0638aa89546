"""torchvision's ResNets (ResNet-18 ... 152, wide_resnet50_2 / 101_2, and CIFAR-style variants of them) through the
fused backends.

``FusedResNet.from_torchvision(model)`` (or ``from_torchvision`` here) takes a ``torchvision.models.ResNet`` and
returns a ``FusedTorchvisionResNet``: the same modules under the same names (a copy), so its state_dict is
torchvision's and ``load_state_dict`` works both ways, strictly. Its forward walks a ``ChainPlan``: the stem
(any conv, its BatchNorm and ReLU, then the max-pool or none), and per block a chain of convolutions with their
BatchNorms (BasicBlock: 3x3, 3x3; Bottleneck: 1x1, 3x3, 1x1), ReLU after each but the last, then the shortcut
(identity, or torchvision's ``downsample``: a 1x1 convolution and its BatchNorm) added and a ReLU.

Backends: the extension's ("cpu", "cuda": ATen/oneDNN convolutions + the C++ operators; on a CPU in eval mode every
BatchNorm is folded, the 3x3 stride-1 convolutions run as Winograd and the others as oneDNN primitives with bias,
shortcut and ReLU as post-ops), "triton" (the fused implicit-GEMM kernels: BatchNorm statistics in the
convolution's epilogue, BN + ReLU applied on load by the next one; tested under the Triton interpreter, never run
on a GPU), else plain PyTorch (torchvision's own modules). "auto" picks the CUDA extension (cuDNN's
convolutions) on CUDA tensors: which of it and Triton is faster on a GPU has not been measured.
Refused with an error that says why: grouped convolutions (ResNeXt), dilation (replace_stride_with_dilation), and
blocks that are neither torchvision's BasicBlock nor Bottleneck.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import backends
from .plan import ConvBN, FoldCache, FoldedConv, _fold, all_finite, fold_conv

__all__ = ["ChainBlock", "ChainPlan", "FusedTorchvisionResNet", "from_torchvision", "build_chain_plan",
           "TORCHVISION_MODELS", "torchvision_model"]

# the torchvision constructors build_model / bench/throughput.py know as tv-NAME
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                      "wide_resnet101_2")


@dataclass(frozen=True)
class ChainBlock:
    """relu(bn_k(conv_k(... relu(bn_1(conv_1(x))) ...)) + shortcut(x)); shortcut = x, or BN(conv1x1_s(x))."""
    convs: tuple                    # ConvBN per convolution, in order
    proj: Optional[ConvBN] = None   # torchvision's downsample


@dataclass(frozen=True)
class ChainPlan:
    stem: ConvBN
    maxpool: Optional[nn.MaxPool2d]
    blocks: tuple

    def conv_bns(self):
        yield self.stem
        for b in self.blocks:
            yield from b.convs
            if b.proj is not None:
                yield b.proj


@dataclass(frozen=True)
class FoldedChainBlock:
    convs: tuple                         # FoldedConv; the last one's bias also holds the projection's shift
    proj_weight: Optional[torch.Tensor]  # the folded 1x1 projection weight
    proj_stride: int


@dataclass(frozen=True)
class FoldedChainPlan:
    stem: FoldedConv
    maxpool: Optional[nn.MaxPool2d]
    blocks: tuple
    all_finite: Optional[bool]

    def convs(self):
        yield self.stem
        for b in self.blocks:
            yield from b.convs

    def walk(self, x, conv, finish):
        """The inference walk every backend takes: ``conv(a, folded_conv)`` (bias + ReLU) for the stem and for a
        block's convolutions but its last, the max-pool after the stem, ``finish(h, a, block)`` for the block's last
        convolution of h, which adds the shortcut of the block input a."""
        a = conv(x, self.stem)
        if self.maxpool is not None:
            a = self.maxpool(a)
        for b in self.blocks:
            h = a
            for fc in b.convs[:-1]:
                h = conv(h, fc)
            a = finish(h, a, b)
        return a


def _check_conv(conv, where):
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{where}: expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{where}: grouped convolutions (groups={conv.groups}: ResNeXt) are not supported by the "
                         f"fused backends; run this model with torchvision itself")
    if conv.dilation != (1, 1):
        raise ValueError(f"{where}: dilated convolutions (dilation={conv.dilation}: replace_stride_with_dilation) "
                         f"are not supported by the fused backends")
    if conv.bias is not None:
        raise ValueError(f"{where}: a convolution with a bias before its BatchNorm is not a torchvision ResNet's")
    if len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"{where}: only square strides and zero padding are supported, got stride {conv.stride}, "
                         f"padding {conv.padding} ({conv.padding_mode})")


def _conv_bn(conv, bn, where) -> ConvBN:
    _check_conv(conv, where)
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"{where}: expected an nn.BatchNorm2d after the convolution, got {type(bn).__name__}")
    return ConvBN(conv, bn)


def _block(blk, where) -> ChainBlock:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    if isinstance(blk, Bottleneck):
        names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    elif isinstance(blk, BasicBlock):
        names = (("conv1", "bn1"), ("conv2", "bn2"))
    else:
        raise ValueError(f"{where}: {type(blk).__name__} is not a torchvision BasicBlock or Bottleneck")
    convs = tuple(_conv_bn(getattr(blk, c), getattr(blk, b), f"{where}.{c}") for c, b in names)
    proj = None
    if blk.downsample is not None:
        ds = blk.downsample
        if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and ds[0].kernel_size == (1, 1)):
            raise ValueError(f"{where}.downsample: expected Sequential(1x1 Conv2d, BatchNorm2d), got {ds}")
        proj = _conv_bn(ds[0], ds[1], f"{where}.downsample")
    return ChainBlock(convs, proj)


def build_chain_plan(model) -> ChainPlan:
    """The plan of a torchvision ResNet (ValueError naming what the fused backends do not take)."""
    stem = _conv_bn(model.conv1, model.bn1, "conv1")
    pool = model.maxpool
    if isinstance(pool, nn.Identity):
        pool = None
    elif not isinstance(pool, nn.MaxPool2d):
        raise ValueError(f"maxpool: expected nn.MaxPool2d or nn.Identity, got {type(pool).__name__}")
    blocks = tuple(_block(blk, f"layer{i}.{j}") for i in range(1, 5) for j, blk in enumerate(getattr(model, f"layer{i}")))
    return ChainPlan(stem, pool, blocks)


def fold_chain(plan: ChainPlan, dtype) -> FoldedChainPlan:
    """Every BatchNorm folded into its convolution (plan.fold's rules); the projection's shift into the block's
    last bias."""
    blocks = []
    for b in plan.blocks:
        proj_w = proj_b = None
        if b.proj is not None:
            proj_w, proj_b = _fold(b.proj, dtype)
        convs = tuple(fold_conv(c, dtype) for c in b.convs[:-1]) + (fold_conv(b.convs[-1], dtype, proj_b),)
        blocks.append(FoldedChainBlock(convs, proj_w, b.proj.stride if b.proj is not None else 1))
    stem = fold_conv(plan.stem, dtype)
    tensors = [t for c in [stem] + [c for b in blocks for c in b.convs] for t in (c.weight, c.bias)]
    tensors += [b.proj_weight for b in blocks if b.proj_weight is not None]
    return FoldedChainPlan(stem, plan.maxpool, tuple(blocks), all_finite(tensors))


_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


class FusedTorchvisionResNet(nn.Module):
    """A torchvision ResNet run through the fused backends: torchvision's modules under their own names (the
    state_dict is torchvision's). ``backend``: "auto" (default, or ``RESNET_FUSED_BACKEND``), "triton", "cuda" or
    "cpu"."""

    def __init__(self, model: nn.Module, backend: str | None = None):
        super().__init__()
        missing = [n for n in _CHILDREN if not hasattr(model, n)]
        if missing:
            raise ValueError(f"{type(model).__name__} is not a torchvision ResNet: it has no {', '.join(missing)}")
        for name in _CHILDREN:
            setattr(self, name, getattr(model, name))
        self.backend = backends.validate_name(backend or os.environ.get("RESNET_FUSED_BACKEND", "auto"))
        self.plan = build_chain_plan(self)
        self.fold_cache = FoldCache(fold_chain)
        self.in_channels = self.conv1.in_channels

    def extra_repr(self):
        return f"backend={self.backend!r}"

    def folded(self, dtype):
        return self.fold_cache.get(self, self.plan, dtype)

    def invalidate_caches(self):
        """Drop the folded weights (needed only after edits through ``.data``; see FusedResNet.invalidate_caches)."""
        self.fold_cache.invalidate()

    def _apply(self, fn, *args, **kwargs):
        if "fold_cache" in self.__dict__:
            self.fold_cache.invalidate()
        return super()._apply(fn, *args, **kwargs)

    def reference_features(self, x):
        """torchvision's own forward up to the last stage."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def resolve_backend(self, x: torch.Tensor) -> str:
        return backends.resolve(self.backend, x, chain=True).name

    def forward(self, x):
        self._check_input(x)
        backend = backends.resolve(self.backend, x, chain=True)
        if not self.training and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            backend = backends.REFERENCE  # eval-mode gradients: torchvision's composition
        return backend.forward(self, x)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedTorchvisionResNet expects a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FusedTorchvisionResNet expects an (N, {self.in_channels}, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"FusedTorchvisionResNet expects a floating-point input, got {x.dtype}")
        w = self.conv1.weight
        if x.device != w.device:
            raise RuntimeError(f"input is on {x.device} but the model's weights are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"input dtype {x.dtype} does not match the weight dtype {w.dtype}")
        if self.training and x.shape[0] == 0:
            raise ValueError("FusedTorchvisionResNet got an empty batch; training needs at least one image")


def from_torchvision(model: nn.Module, backend: str | None = None) -> FusedTorchvisionResNet:
    """A FusedTorchvisionResNet holding a copy of ``model``'s modules (``model`` itself is untouched), in its
    training mode, device and dtype."""
    return FusedTorchvisionResNet(copy.deepcopy(model), backend=backend).train(model.training)


def torchvision_model(name: str, fused: bool = True, backend: str | None = None, in_channels: int = 3,
                      **kwargs) -> nn.Module:
    """``torchvision.models.NAME(weights=None, **kwargs)`` (e.g. num_classes, zero_init_residual), run fused unless
    ``fused=False``; ``in_channels`` other than 3: the stem's convolution takes that many. Load weights with
    load_state_dict or resnet_fused.load_weights."""
    import torchvision
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"unknown torchvision ResNet {name!r}; choose from {', '.join(TORCHVISION_MODELS)}")
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    if in_channels != 3:
        c = model.conv1
        model.conv1 = nn.Conv2d(in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return FusedTorchvisionResNet(model, backend=backend) if fused else model
