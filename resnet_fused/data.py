"""MNIST-family datasets held whole on the target device, with per-batch normalisation and augmentation there.

Datasets come from ``torchvision.datasets`` in its on-disk layout under a root directory: ``--data-root``, else the
``RESNET_FUSED_DATA`` environment variable, else ``./data``. Nothing is downloaded unless asked (``download=True``).

A split is one uint8 tensor [N, 1, H, W] plus int64 labels on the device; :class:`DeviceLoader` draws batches by
index, translates them randomly (zero padding, no flips: digits are not mirror-symmetric) and normalises them, all
as batched tensor ops on that device: no per-image Python work in the training loop. Every epoch's order and
augmentation come from a generator seeded with (seed, epoch), so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DataNotFoundError", "Split", "DeviceLoader", "default_data_root", "load_dataset",
           "load_splits"]


class DataNotFoundError(RuntimeError):
    """The dataset files are not under the root (and downloading was not asked for)."""


# name -> (torchvision class, constructor kwargs, folder under root, files expected)
DATASETS = {
    "mnist": ("MNIST", {}, "MNIST/raw",
              ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]),
    "fashionmnist": ("FashionMNIST", {}, "FashionMNIST/raw",
                     ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                      "t10k-labels-idx1-ubyte"]),
    "kmnist": ("KMNIST", {}, "KMNIST/raw",
               ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"]),
    "emnist-balanced": ("EMNIST", {"split": "balanced"}, "EMNIST/raw",
                        ["emnist-balanced-{train,test}-{images-idx3,labels-idx1}-ubyte"]),
    "emnist-digits": ("EMNIST", {"split": "digits"}, "EMNIST/raw",
                      ["emnist-digits-{train,test}-{images-idx3,labels-idx1}-ubyte"]),
    "emnist-letters": ("EMNIST", {"split": "letters"}, "EMNIST/raw",
                       ["emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte"]),
    "qmnist": ("QMNIST", {"what": None}, "QMNIST/raw",
               ["qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int", "qmnist-test-images-idx3-ubyte",
                "qmnist-test-labels-idx2-int"]),
    "usps": ("USPS", {}, "", ["usps.bz2", "usps.t.bz2"]),
}


def default_data_root(root: str | None = None) -> str:
    return root or os.environ.get("RESNET_FUSED_DATA") or "./data"


def _canonical(name: str) -> str:
    key = str(name).lower().replace("_", "-")
    key = {"fashion-mnist": "fashionmnist", "emnist": "emnist-balanced"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return key


@dataclass
class Split:
    """One split on a device: uint8 images [N, 1, H, W], int64 labels [N]."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return self.images.shape[0]

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index):
        return Split(self.images[index], self.labels[index])


def load_dataset(name: str, train: bool, root: str | None = None, download: bool = False):
    """(Split on CPU, class names) for one split of a dataset, read through torchvision."""
    import torchvision.datasets as tvd

    key = _canonical(name)
    cls_name, kwargs, folder, files = DATASETS[key]
    root = default_data_root(root)
    kwargs = dict(kwargs)
    if cls_name == "QMNIST":
        kwargs["what"] = "train" if train else "test"
    else:
        kwargs["train"] = train
    try:
        ds = getattr(tvd, cls_name)(root=root, download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        where = os.path.join(os.path.abspath(root), folder)
        raise DataNotFoundError(
            f"dataset {key!r} not found under {os.path.abspath(root)}: expected {', '.join(files)} in {where} "
            f"(torchvision layout); point --data-root or RESNET_FUSED_DATA at it, or pass --download "
            f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None
    data = ds.data
    images = data.clone() if isinstance(data, torch.Tensor) else torch.as_tensor(data)
    targets = ds.targets
    labels = torch.as_tensor(targets, dtype=torch.int64)
    if labels.dim() == 2:  # QMNIST keeps extended labels; column 0 is the class
        labels = labels[:, 0].contiguous()
    if cls_name == "EMNIST":  # stored transposed relative to MNIST
        images = images.transpose(1, 2).contiguous()
    images = images.to(torch.uint8).unsqueeze(1).contiguous()
    return Split(images, labels), list(getattr(ds, "classes", [str(i) for i in range(int(labels.max()) + 1)]))


def load_splits(name: str, root: str | None = None, download: bool = False, val_size: int = 0,
                subset: int | None = None, seed: int = 0, device="cpu"):
    """dict(train=Split, val=Split|None, test=Split, classes=list, mean=float, std=float) on ``device``.

    ``val_size`` images are carved out of train by a fixed permutation (seeded); ``subset`` keeps the first
    ``subset`` training images after that (and at most as many test images), for quick runs and tests.
    mean/std are those of the training images (in [0, 1]).
    """
    train, classes = load_dataset(name, True, root, download)
    test, _ = load_dataset(name, False, root, download)
    val = None
    if val_size:
        if not 0 < val_size < len(train):
            raise ValueError(f"val_size must be between 1 and {len(train) - 1}, got {val_size}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 12345))
        val, train = train.subset(perm[:val_size]), train.subset(perm[val_size:])
    if subset:
        train = train.subset(slice(0, subset))
        test = test.subset(slice(0, subset))
        if val is not None:
            val = val.subset(slice(0, subset))
    pix = train.images.float().div_(255)
    mean, std = pix.mean().item(), pix.std().item()
    out = dict(train=train.to(device), val=val.to(device) if val is not None else None, test=test.to(device),
               classes=classes, mean=mean, std=std)
    return out


class DeviceLoader:
    """Batches from a :class:`Split` held on a device: shuffled, translated, normalised there.

    Iterating yields (float images [B, 1, H, W], labels [B]); ``epoch`` selects the seeded order and shifts.
    ``max_shift`` pixels of random translation (zero fill), 0 disables augmentation.
    """

    def __init__(self, split: Split, batch_size: int, mean: float, std: float, shuffle: bool = False,
                 max_shift: int = 0, seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 dtype=torch.float32):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split, self.batch_size, self.mean, self.std = split, int(batch_size), float(mean), float(std)
        self.shuffle, self.max_shift, self.seed, self.drop_last = shuffle, int(max_shift), int(seed), drop_last
        self.channels_last, self.dtype, self.epoch = channels_last, dtype, 0

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

    def _translate(self, x, g):
        """Shift every image by its own (dy, dx) in [-s, s] with zero fill, by one batched gather."""
        s = self.max_shift
        b, c, h, w = x.shape
        padded = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (b,), device=x.device, generator=g)
        dx = torch.randint(0, 2 * s + 1, (b,), device=x.device, generator=g)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[bidx, cidx, rows, cols]

    def __iter__(self):
        n = len(self.split)
        g = self._generator()
        order = torch.randperm(n, device=self.device, generator=g) if self.shuffle else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if order is None:
                imgs, labels = self.split.images[lo:hi], self.split.labels[lo:hi]
            else:
                idx = order[lo:hi]
                imgs, labels = self.split.images[idx], self.split.labels[idx]
            if self.max_shift:
                imgs = self._translate(imgs, g)
            yield self.normalize(imgs), labels
