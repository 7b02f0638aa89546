"""The backend interface, and the plain-PyTorch backend (the reference composition)."""
from __future__ import annotations

import torch

from ..reference import ResNet


class Backend:
    """Runs a FusedResNet's feature extractor (stem and blocks) on one kind of input."""

    name = "?"

    def check(self, x: torch.Tensor) -> None:
        """Raise (naming what is missing) if this backend cannot run on ``x``."""

    def forward(self, model, x: torch.Tensor, sync=None) -> torch.Tensor:
        """The logits: the features, then the head."""
        return self.head(model, self.features(model, x, sync))

    def features(self, model, x: torch.Tensor, sync=None) -> torch.Tensor:
        """``sync``: a distributed.BatchSync in training with sync_bn across processes (global statistics)."""
        return self.train_features(model, x, sync) if model.training else self.eval_features(model, x)

    def prepare(self, model, x: torch.Tensor) -> None:
        """Make now whatever ``forward(model, x)`` would otherwise compute lazily and keep (packed or transformed
        weights): resnet_fused.graphs calls it before a capture, inside which nothing may be kept."""

    def train_features(self, model, x, sync=None):
        raise NotImplementedError

    def eval_features(self, model, x):
        raise NotImplementedError

    def head(self, model, feats: torch.Tensor) -> torch.Tensor:
        """The logits from the features: global average pool, then the classifier."""
        return model.fc(feats.mean((2, 3)))

    def __repr__(self):
        return f"<backend {self.name}>"


class ReferenceBackend(Backend):
    """The reference ResNet's own modules: where no fused backend runs, and for eval-mode gradients."""

    name = "reference"

    def features(self, model, x, sync=None):
        if sync is not None:
            raise RuntimeError("sync_bn needs a fused backend ('triton', 'cuda' or 'cpu'); the plain-PyTorch "
                               "fallback runs here because no fused backend can run this input")
        own = getattr(model, "reference_features", None)  # a torchvision ResNet's own composition
        return own(x) if own is not None else ResNet.features(model, x)


REFERENCE = ReferenceBackend()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the network computes in: autocast's when it is on for x's device, else x's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype
