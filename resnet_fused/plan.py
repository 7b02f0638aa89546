"""The network described once: the plan every backend walks.

``NetworkPlan`` lists the stem and the BasicBlocks of a ResNet module as named specs (which conv and BatchNorm,
stride, padding, shortcut mode), built once per module and rebuilt only if the module's structure changes.
``FoldedPlan`` is the inference form: every BatchNorm folded into its convolution (weight * gamma/sqrt(var+eps),
bias beta - mean * gamma/sqrt(var+eps)), option B's projection shift added into conv2's bias; ``FoldCache`` keeps
it while nothing it depends on has changed.

``ShortcutMode`` is the one shortcut encoding of every fused op (Triton and C++): the same numbers as
``resnet_fused::ShortcutMode`` in csrc/constants.h.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .capture_state import forbid_in_capture

__all__ = ["ShortcutMode", "ConvBN", "BlockSpec", "NetworkPlan", "FoldedConv", "FoldedBlock", "FoldedPlan",
           "FoldCache", "build_plan", "to_channels_last"]


class ShortcutMode(enum.IntEnum):
    NONE = 0      # plain block: no shortcut term
    IDENTITY = 1  # out += x
    PAD_A = 2     # out += x[:, :, ::s, ::s] zero-padded in channels (option A), read by index math
    PROJ_B = 3    # out += BN(conv1x1_s(x)) (option B)


_MODE_OF_KIND = {"none": ShortcutMode.NONE, "identity": ShortcutMode.IDENTITY, "A": ShortcutMode.PAD_A,
                 "B": ShortcutMode.PROJ_B}


@dataclass(frozen=True)
class ConvBN:
    """A bias-free convolution followed by its BatchNorm."""
    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    @property
    def stride(self) -> int:
        return self.conv.stride[0]

    @property
    def padding(self) -> int:
        return self.conv.padding[0]


@dataclass(frozen=True)
class BlockSpec:
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    conv1: ConvBN
    conv2: ConvBN
    mode: ShortcutMode
    stride: int                      # the block's stride (conv1's; option A and B subsample by it)
    pad_front: int = 0               # option A: zero channels before the shortcut's own
    proj: Optional[ConvBN] = None    # option B: the projection


@dataclass(frozen=True)
class NetworkPlan:
    stem: ConvBN
    blocks: tuple

    def conv_bns(self):
        """Every (conv, BN) pair in network order: stem, then per block conv1, conv2 and the projection."""
        yield self.stem
        for b in self.blocks:
            yield b.conv1
            yield b.conv2
            if b.proj is not None:
                yield b.proj


def build_plan(model) -> NetworkPlan:
    """The plan of a ResNet (resnet_fused.reference.ResNet or a subclass)."""
    blocks = []
    for blk in model.blocks():
        mode = _MODE_OF_KIND[blk.shortcut_kind]
        blocks.append(BlockSpec(ConvBN(blk.conv1, blk.bn1), ConvBN(blk.conv2, blk.bn2), mode, blk.stride,
                                blk.shortcut.pad_front if mode == ShortcutMode.PAD_A else 0,
                                ConvBN(blk.shortcut.conv, blk.shortcut.bn) if mode == ShortcutMode.PROJ_B else None))
    return NetworkPlan(ConvBN(model.conv1, model.bn1), tuple(blocks))


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last, with strides that say so even for one channel: ATen reads an (N, 1, H, W) tensor's
    strides as NCHW, and its convolution would then return NCHW activations for the rest of the network."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1:
        n, c, h, w = x.shape
        x = x.as_strided(x.shape, (h * w * c, 1, w * c, c))
    return x


# ---- inference: BatchNorm folded -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldedConv:
    weight: torch.Tensor   # conv weight * gamma/sqrt(var+eps), in the compute dtype, channels_last
    bias: torch.Tensor     # beta - mean * gamma/sqrt(var+eps), fp32 (fp64 for fp64 models)
    stride: int
    padding: int
    module: nn.Conv2d      # the convolution it came from (its shape decides e.g. the Winograd path)


@dataclass(frozen=True)
class FoldedBlock:
    conv1: FoldedConv
    conv2: FoldedConv                  # option B: its bias also holds the projection's folded shift
    mode: ShortcutMode
    stride: int
    pad_front: int
    proj_weight: Optional[torch.Tensor]  # option B: the folded 1x1 projection weight


@dataclass(frozen=True)
class FoldedPlan:
    stem: FoldedConv
    blocks: tuple
    all_finite: Optional[bool]  # every folded tensor finite (fast paths that would lose a NaN need it); None when
    #                             traced (not computed: it would be a data-dependent branch)

    def convs(self):
        """The 3x3 convolutions in network order (stem, then conv1 and conv2 of each block)."""
        yield self.stem
        for b in self.blocks:
            yield b.conv1
            yield b.conv2


def _acc(t):
    """Per-channel math in fp32 at least (fp64 models stay fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _fold(cb: ConvBN, dtype):
    bn = cb.bn
    s = _acc(bn.weight) * torch.rsqrt(_acc(bn.running_var) + bn.eps)
    w = to_channels_last((_acc(cb.conv.weight) * s[:, None, None, None]).to(dtype))  # oneDNN's layout: no reorder
    return w, _acc(bn.bias) - _acc(bn.running_mean) * s


def fold_conv(cb: ConvBN, dtype, extra_bias=None) -> FoldedConv:
    """One convolution with its BatchNorm folded in (``extra_bias``: a shortcut's folded shift added to the bias)."""
    w, b = _fold(cb, dtype)
    return FoldedConv(w, b if extra_bias is None else b + extra_bias, cb.stride, cb.padding, cb.conv)


def all_finite(tensors) -> Optional[bool]:
    """Whether every folded tensor is finite: one host read per fold (a cache miss), not one per tensor; None when
    traced (it would be a data-dependent branch)."""
    if torch.compiler.is_compiling():
        return None
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def fold(plan: NetworkPlan, dtype) -> FoldedPlan:
    blocks = []
    for b in plan.blocks:
        proj_w = proj_b = None
        if b.proj is not None:
            proj_w, proj_b = _fold(b.proj, dtype)
        blocks.append(FoldedBlock(fold_conv(b.conv1, dtype), fold_conv(b.conv2, dtype, proj_b), b.mode, b.stride,
                                  b.pad_front, proj_w))
    stem = fold_conv(plan.stem, dtype)
    tensors = [t for c in [stem] + [c for b in blocks for c in (b.conv1, b.conv2)] for t in (c.weight, c.bias)]
    tensors += [b.proj_weight for b in blocks if b.proj_weight is not None]
    return FoldedPlan(stem, tuple(blocks), all_finite(tensors))


class FoldCache:
    """The folded plan of a module, kept until something it depends on changes: every parameter and buffer
    (storage and version: optimizer steps, in-place edits, load_state_dict and replaced tensors change it), each
    BatchNorm's eps, and the dtype. Edits through ``.data`` bypass the version counter: ``invalidate()`` (the
    module's ``invalidate_caches()``) after them. Derived caches (e.g. Winograd transforms) hang off the folded
    plan: ``derived(name, fn)`` computes fn(folded) once per folded plan."""

    def __init__(self, fold_fn=None):
        self._fold = fold_fn or fold  # the plan's folding (torchvision_resnet.fold_chain for its ChainPlan)
        self._key = self._folded = None
        self._derived = {}
        self._slots = None  # (id(module), [(tensor dict, name)], [BatchNorms]) the key reads, found once (the id:
        # holding the module itself would make a cycle that keeps a dropped model's weights until the GC runs)
        self.generation = 0  # bumped at every (re)fold: what a CUDA graph of the folded plan was captured from

    def invalidate(self):
        self._key = self._folded = self._slots = None
        self._derived = {}

    def _cache_key(self, module, dtype):
        """The key, read through the module's parameter and buffer dicts (found once: the plan's modules are fixed
        at construction), so a replaced tensor is seen; ~20x cheaper than walking the module tree every call, which
        cost ~0.28 ms of a 1.2 ms batch-1 forward of ResNet-20."""
        if self._slots is None or self._slots[0] != id(module):
            mods = list(module.modules())
            slots = [(d, name) for m in mods for d in (m._parameters, m._buffers) for name in d]
            self._slots = id(module), slots, [m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        _, slots, bns = self._slots
        tensors = [d[name] for d, name in slots]
        return (dtype, tuple(m.eps for m in bns),
                tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors))

    def get(self, module, plan: NetworkPlan, dtype) -> FoldedPlan:
        if torch.compiler.is_compiling():  # traced: folded inside the graph, nothing cached
            return self._fold(plan, dtype)
        key = self._cache_key(module, dtype)
        if key != self._key:
            forbid_in_capture("folding BatchNorm into the convolution weights")
            self._folded, self._key, self._derived = self._fold(plan, dtype), key, {}
            self.generation += 1
        return self._folded

    def refresh(self, module, plan: NetworkPlan, dtype) -> int:
        """Fold now if anything changed (outside any graph capture); the generation of the plan in use."""
        self.get(module, plan, dtype)
        return self.generation

    def derived(self, name, fn):
        if name not in self._derived:
            forbid_in_capture(f"computing the {name!r} weights from the folded plan")
            self._derived[name] = fn(self._folded)
        return self._derived[name]
