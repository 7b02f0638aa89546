"""The reference ResNets in plain PyTorch: the oracle every fused kernel is tested against.

Two families, both built from BasicBlocks (two 3x3 conv-BN layers and a shortcut):

* depth = 6n+2 (8, 14, 20, 32, 44, 56, 110, ...): the CIFAR-style nets of He et al. (2016), section 4.2:
  a 3x3 stem, three stages of n blocks with widths 16/32/64 (stride 1, 2, 2), global average pooling and a
  linear head.
* depth 18 or 34: the ImageNet-style layout ([2,2,2,2] / [3,4,6,3] blocks, widths 64-512), with a 3x3 stride-1
  stem and no max-pool, since the inputs are small images.

Shortcuts where the shape changes: option "A" subsamples by the stride and pads the new channels with zeros (no
parameters); option "B" projects with a 1x1 conv (same stride) + BatchNorm. Where the shape stays, both use the
identity. ``plain=True`` drops every shortcut (the paper's "plain" nets).

Module and parameter names (``conv1``, ``bn1``, ``layer{i}.{j}.conv1`` ..., ``layer{i}.{j}.shortcut.conv``,
``layer{i}.{j}.shortcut.bn``, ``fc``) are the contract shared with ``FusedResNet``: same ``state_dict`` keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "PadShortcut", "ProjectionShortcut", "ResNet", "resnet_layout"]


def resnet_layout(depth: int, widths=None):
    """(blocks per stage, widths per stage, default shortcut, stem width) for a depth; ValueError otherwise."""
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"depth must be an int, got {depth!r}")
    if depth == 18:
        blocks, default_widths, shortcut = [2, 2, 2, 2], [64, 128, 256, 512], "B"
    elif depth == 34:
        blocks, default_widths, shortcut = [3, 4, 6, 3], [64, 128, 256, 512], "B"
    elif depth >= 8 and (depth - 2) % 6 == 0:
        n = (depth - 2) // 6
        blocks, default_widths, shortcut = [n, n, n], [16, 32, 64], "A"
    else:
        raise ValueError(
            f"unsupported ResNet depth {depth}: use 6n+2 (8, 14, 20, 32, 44, 56, 110, ...) for the CIFAR-style "
            f"nets, or 18 / 34 for the ImageNet-style ones")
    if widths is None:
        widths = default_widths
    widths = [int(w) for w in widths]
    if len(widths) != len(blocks) or any(w <= 0 for w in widths):
        raise ValueError(f"depth {depth} needs {len(blocks)} positive stage widths, got {list(widths)}")
    return blocks, widths, shortcut


class PadShortcut(nn.Module):
    """Option A: subsample by ``stride``, then zero-pad the channels from ``in_ch`` to ``out_ch`` (no parameters).

    The new channels are split as evenly as possible around the old ones (``pad_front`` before, the rest after),
    the usual choice for CIFAR ResNets (planes // 4 on each side when the width doubles).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_ch} -> {out_ch}); use shortcut='B'")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.pad_front = (out_ch - in_ch) // 2

    def forward(self, x):
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        pad_back = self.out_ch - self.in_ch - self.pad_front
        return F.pad(x, (0, 0, 0, 0, self.pad_front, pad_back))

    def extra_repr(self):
        return f"{self.in_ch}->{self.out_ch}, stride={self.stride}, pad_front={self.pad_front}"


class ProjectionShortcut(nn.Module):
    """Option B: 1x1 conv (stride s, no bias) + BatchNorm."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); no shortcut term when ``plain``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str = "A", plain: bool = False):
        super().__init__()
        self.in_ch, self.out_ch, self.stride, self.plain = in_ch, out_ch, stride, plain
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if plain:
            self.shortcut = None
        elif stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = ProjectionShortcut(in_ch, out_ch, stride)

    @property
    def shortcut_kind(self) -> str:
        """"none", "identity", "A" or "B"."""
        if self.shortcut is None:
            return "none"
        if isinstance(self.shortcut, nn.Identity):
            return "identity"
        return "A" if isinstance(self.shortcut, PadShortcut) else "B"

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """ResNet(depth=20, shortcut="A", in_channels=1, num_classes=10, widths=None, plain=False).

    ``shortcut=None`` picks the family's default ("A" for 6n+2); depth 18 and 34 always use "B" projections.
    """

    def __init__(self, depth: int = 20, shortcut: str | None = "A", in_channels: int = 1, num_classes: int = 10,
                 widths=None, plain: bool = False):
        super().__init__()
        blocks, widths, default_shortcut = resnet_layout(depth, widths)
        # The ImageNet layout (18/34) is defined with projection shortcuts; 6n+2 nets take the argument.
        shortcut = default_shortcut if (shortcut is None or depth in (18, 34)) else str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if int(in_channels) <= 0 or int(num_classes) <= 0:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        self.depth, self.shortcut_type, self.plain = depth, shortcut, bool(plain)
        self.in_channels, self.num_classes, self.widths = int(in_channels), int(num_classes), list(widths)

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_ch = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(in_ch, w, stride if j == 0 else 1, shortcut, plain))
                in_ch = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(in_ch, num_classes)
        self.reset_parameters()

    @property
    def layers(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.widths))]

    def blocks(self):
        for layer in self.layers:
            yield from layer

    def reset_parameters(self):
        """He initialisation (kaiming-normal, fan_in, ReLU gain), BN weight 1 / bias 0, as in the paper."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def config(self) -> dict:
        return dict(depth=self.depth, shortcut=self.shortcut_type, in_channels=self.in_channels,
                    num_classes=self.num_classes, widths=list(self.widths), plain=self.plain)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)
