"""DeviceLoader: batches of a split held on the device, drawn by index, translated randomly (zero padding; no flips:
digits are not mirror-symmetric), augmented and normalised there as batched tensor ops (no per-image Python in the
training loop); each epoch's order and augmentation come from a generator
seeded with (seed, epoch), so a resumed run sees exactly the same batches, and a sharded (distributed) run sees
the batches one process would."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import elastic_field, elastic_warp, erase_mask, rotate_zoom, rotate_zoom_theta
from .datasets import Split


class DeviceLoader:
    """Batches from a :class:`Split` held on a device: shuffled, translated, normalised there.

    Iterating yields (float images [B, 1, H, W], labels [B]); ``epoch`` selects the seeded order and shifts.
    ``max_shift`` pixels of random translation (zero fill), 0 disables it; ``rotate`` (degrees) and ``scale``
    (relative) add a random rotation in [-rotate, rotate] and zoom in [1 - scale, 1 + scale] about the centre
    (bilinear, zero fill), drawn per image after the translation; 0 disables each. ``elastic`` (pixels) adds an
    elastic distortion after them: a random displacement field smoothed over ELASTIC_SIGMA pixels, scaled by it
    (Simard et al. used 34 on MNIST; 0 disables it). ``erase`` is the probability
    that an image gets one random rectangle (2-40% of its area, aspect 0.3-3.3) set to the background value 0
    (random erasing, after the other augmentations); 0 disables it.
    ``shard=(rank, world)`` (distributed training): ``batch_size`` is the global batch; every rank draws the same
    order and the same shifts for it and yields only its own contiguous part (disjoint, reshuffled every epoch), so
    W ranks together see exactly the batches one process would.
    """

    def __init__(self, split: Split, batch_size: int, mean: float, std: float, shuffle: bool = False,
                 max_shift: int = 0, seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 dtype=torch.float32, shard: tuple = (0, 1), rotate: float = 0.0, scale: float = 0.0,
                 erase: float = 0.0, elastic: float = 0.0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not (0.0 <= rotate <= 180.0 and 0.0 <= scale < 1.0):
            raise ValueError(f"rotate must be in [0, 180] degrees and scale in [0, 1), got {rotate} and {scale}")
        if not 0.0 <= erase <= 1.0:
            raise ValueError(f"erase is a probability in [0, 1], got {erase}")
        if not (math.isfinite(elastic) and elastic >= 0.0):
            raise ValueError(f"elastic (the displacement scale, pixels) must be finite and >= 0, got {elastic}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        self.split, self.batch_size, self.mean, self.std = split, int(batch_size), float(mean), float(std)
        self.shuffle, self.max_shift, self.seed, self.drop_last = shuffle, int(max_shift), int(seed), drop_last
        self.channels_last, self.dtype, self.epoch = channels_last, dtype, 0
        self.rank, self.world = int(rank), int(world)
        self.rotate, self.scale, self.erase = float(rotate), float(scale), float(erase)
        self.elastic = float(elastic)

    @property
    def device(self):
        return self.split.images.device

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def _generator(self):
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 100003 + self.epoch)
        return g

    def normalize(self, images_u8):
        x = images_u8.to(self.dtype).mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _translate(self, x, g, rows=None):
        """Shift every image by its own (dy, dx) in [-s, s] with zero fill, by one batched gather. ``rows``
        (lo, hi, total): x is rows lo:hi of a batch of ``total`` whose shifts are drawn whole (the same draws on
        every rank)."""
        s = self.max_shift
        lo, hi, total = rows if rows is not None else (0, x.shape[0], x.shape[0])
        dy = torch.randint(0, 2 * s + 1, (total,), device=x.device, generator=g)[lo:hi]
        dx = torch.randint(0, 2 * s + 1, (total,), device=x.device, generator=g)[lo:hi]
        b, c, h, w = x.shape
        padded = F.pad(x, (s, s, s, s))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[bidx, cidx, rows, cols]

    def _rotate_zoom_draws(self, imgs, g, rows=None):
        """Every image's (angle, zoom), drawn from the whole global batch as in _translate."""
        lo, hi, total = rows if rows is not None else (0, imgs.shape[0], imgs.shape[0])
        u = torch.rand(2, total, device=imgs.device, generator=g, dtype=torch.float64)[:, lo:hi]
        return (2 * u[0] - 1) * math.radians(self.rotate), 1 + (2 * u[1] - 1) * self.scale

    def _elastic(self, imgs, g, rows=None, theta=None):
        """Elastic distortion: each image's field drawn from the whole global batch, as in _translate; applied in
        one resample with the rotation/zoom ``theta`` when there is one."""
        lo, hi, total = rows if rows is not None else (0, imgs.shape[0], imgs.shape[0])
        h, w = imgs.shape[-2:]
        u = torch.rand(total, 2, h, w, device=imgs.device, generator=g)[lo:hi]
        return elastic_warp(imgs.float(), elastic_field(u, self.elastic), theta)

    def _erase(self, imgs, g, rows=None):
        """Random erasing: each image's rectangle drawn from the whole global batch, as in _translate."""
        lo, hi, total = rows if rows is not None else (0, imgs.shape[0], imgs.shape[0])
        u = torch.rand(5, total, device=imgs.device, generator=g, dtype=torch.float64)[:, lo:hi]
        return imgs.masked_fill(erase_mask(u, self.erase, imgs.shape[-2], imgs.shape[-1]), 0)

    def __iter__(self):
        n = len(self.split)
        g = self._generator()
        order = torch.randperm(n, device=self.device, generator=g) if self.shuffle else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            rows = None
            if self.world > 1:  # this rank's contiguous part of the global batch
                from ..distributed import shard_bounds
                a, b = shard_bounds(hi - lo, self.rank, self.world)
                rows, lo, hi = (a, b, hi - lo), lo + a, lo + b
            if order is None:
                imgs, labels = self.split.images[lo:hi], self.split.labels[lo:hi]
            else:
                idx = order[lo:hi]
                imgs, labels = self.split.images[idx], self.split.labels[idx]
            if self.max_shift:
                imgs = self._translate(imgs, g, rows)
            # rotation/zoom and elastic distortion: one bilinear resample for both
            turn = self._rotate_zoom_draws(imgs, g, rows) if self.rotate or self.scale else None
            if self.elastic:
                imgs = self._elastic(imgs, g, rows, None if turn is None else rotate_zoom_theta(*turn))
            elif turn is not None:
                imgs = rotate_zoom(imgs.float(), *turn)
            if self.erase:
                imgs = self._erase(imgs, g, rows)
            yield self.normalize(imgs), labels
