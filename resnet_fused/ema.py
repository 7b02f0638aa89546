"""Exponential moving average of a model's weights (the ``--ema`` of resnet_fused.train).

The average lives in a copy of the model that is evaluated in the trained model's place: after every optimizer
step each floating parameter and buffer (BatchNorm's running statistics too) moves towards the trained model's,
``ema = d * ema + (1 - d) * weight`` with ``d = min(decay, (1 + n) / (10 + n))`` at update ``n`` (the early
updates follow the fast-moving weights closely); integer buffers (``num_batches_tracked``) are copied.
"""
from __future__ import annotations

import copy

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = float(decay), 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._pairs = None

    def _tensor_pairs(self, model):
        mine = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        theirs = dict(model.named_parameters()) | dict(model.named_buffers())
        if mine.keys() != theirs.keys():
            raise ValueError("the EMA copy and the model have different parameters/buffers")
        floats = [(mine[k], theirs[k]) for k in mine if mine[k].is_floating_point()]
        others = [(mine[k], theirs[k]) for k in mine if not mine[k].is_floating_point()]
        return floats, others

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        """One step towards ``model`` (the module the optimizer trains, not a DDP/compile wrapper)."""
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, *self._tensor_pairs(model))
        _, floats, others = self._pairs
        w = 1.0 - self.current_decay()
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b.detach() for _, b in floats], w)
        for a, b in others:
            a.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), updates=self.updates, decay=self.decay)

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self._pairs = None
