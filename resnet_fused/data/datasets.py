"""The datasets by name (MNIST, Fashion-MNIST, KMNIST, EMNIST, QMNIST, USPS) in torchvision's on-disk layout under a
root (``--data-root``, else ``RESNET_FUSED_DATA``, else ``./data``; nothing is downloaded unless asked), and their
splits as one uint8 tensor [N, 1, H, W] plus int64 labels on the device (train, an optional validation split carved
out of train by a seeded permutation, test), with the training images' mean and std."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .idx import DataFormatError, DataNotFoundError, _find, read_idx


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files are and how to read them."""
    tv_class: str                       # torchvision class (for --download and USPS)
    folder: str                         # under the root
    files: dict                         # "train"/"test" -> (images file, labels file)
    classes: tuple
    tv_kwargs: tuple = ()               # extra torchvision constructor arguments (for --download)
    transposed: bool = False            # EMNIST stores images transposed
    label_column: int | None = None     # QMNIST: 2-D label records, column 0 is the class


def _mnist_like(tv_class, classes):
    return DatasetSpec(tv_class, f"{tv_class}/raw", dict(train=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                                         test=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
                       tuple(classes))


def _emnist(split):
    import torchvision.datasets as tvd
    return DatasetSpec("EMNIST", "EMNIST/raw",
                       {w: (f"emnist-{split}-{w}-images-idx3-ubyte", f"emnist-{split}-{w}-labels-idx1-ubyte")
                        for w in ("train", "test")},
                       tuple(tvd.EMNIST.classes_split_dict[split]), (("split", split),), transposed=True)


def _specs():
    import torchvision.datasets as tvd
    return {
        "mnist": _mnist_like("MNIST", tvd.MNIST.classes),
        "fashionmnist": _mnist_like("FashionMNIST", tvd.FashionMNIST.classes),
        "kmnist": _mnist_like("KMNIST", tvd.KMNIST.classes),
        "emnist-balanced": _emnist("balanced"),
        "emnist-digits": _emnist("digits"),
        "emnist-letters": _emnist("letters"),
        "qmnist": DatasetSpec("QMNIST", "QMNIST/raw",
                              {w: (f"qmnist-{w}-images-idx3-ubyte", f"qmnist-{w}-labels-idx2-int")
                               for w in ("train", "test")}, tuple(tvd.QMNIST.classes), label_column=0),
        "usps": DatasetSpec("USPS", "", dict(train=("usps.bz2", None), test=("usps.t.bz2", None)),
                            tuple(str(i) for i in range(10))),
    }


DATASETS = ("mnist", "fashionmnist", "kmnist", "emnist-balanced", "emnist-digits", "emnist-letters", "qmnist", "usps")


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


def _read_split(spec: DatasetSpec, where: str, which: str) -> Split:
    img_file, lbl_file = (os.path.join(where, f) for f in spec.files[which])
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{_find(img_file)} holds {images.dtype} values of shape {images.shape}; images are "
                              f"uint8 [N, H, W]")
    if spec.label_column is not None and labels.ndim == 2:
        labels = labels[:, spec.label_column]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataFormatError(f"{_find(lbl_file)} holds {labels.dtype} values of shape {labels.shape}; labels are "
                              f"integers [N]")
    if labels.shape[0] != images.shape[0]:
        raise DataFormatError(f"{_find(img_file)} has {images.shape[0]:,} images but {_find(lbl_file)} has "
                              f"{labels.shape[0]:,} labels")
    img = torch.from_numpy(images.copy()).unsqueeze(1)
    if spec.transposed:
        img = img.transpose(2, 3).contiguous()
    return Split(img, torch.from_numpy(labels.astype(np.int64)))


def _check_labels(split: Split, spec: DatasetSpec, source: str):
    if len(split) == 0:
        raise DataFormatError(f"{source} holds no images")
    lo, hi = int(split.labels.min()), int(split.labels.max())
    if lo < 0 or hi >= len(spec.classes):
        bad = lo if lo < 0 else hi
        raise DataFormatError(f"{source} has label {bad}, outside 0..{len(spec.classes) - 1} for its "
                              f"{len(spec.classes)} classes")


def load_dataset(name: str, train: bool, root: str | None = None, download: bool = False):
    """(Split on CPU, class names) for one split of a dataset."""
    key = _canonical(name)
    spec = _specs()[key]
    root = default_data_root(root)
    which = "train" if train else "test"
    where = os.path.join(os.path.abspath(root), spec.folder)
    missing = [f for f in spec.files[which] if f and _find(os.path.join(where, f)) is None]
    if missing or spec.tv_class == "USPS":
        split = _load_torchvision(key, spec, root, train, download, missing, where)
        source = os.path.join(where, spec.files[which][0])
    else:
        split = _read_split(spec, where, which)
        source = _find(os.path.join(where, spec.files[which][1]))
    _check_labels(split, spec, source)
    return split, list(spec.classes)


def _load_torchvision(key, spec, root, train, download, missing, where):
    """USPS (bz2 libsvm files), and the download of any dataset: through torchvision."""
    import torchvision.datasets as tvd

    if missing and not download:
        raise DataNotFoundError(
            f"dataset {key!r} not found under {os.path.abspath(root)}: expected "
            f"{', '.join(f for pair in spec.files.values() for f in pair if f)} (or their .gz) in {where} "
            f"(torchvision layout); point --data-root or RESNET_FUSED_DATA at it, or pass --download")
    kwargs = dict(spec.tv_kwargs)
    if spec.tv_class == "QMNIST":
        kwargs["what"] = "train" if train else "test"
    else:
        kwargs["train"] = train
    try:
        ds = getattr(tvd, spec.tv_class)(root=root, download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DataNotFoundError(f"dataset {key!r} could not be loaded from {os.path.abspath(root)} "
                                f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None
    if spec.tv_class != "USPS":  # downloaded: read the files it wrote, with every check
        return _read_split(spec, where, "train" if train else "test")
    images = torch.as_tensor(ds.data).to(torch.uint8).unsqueeze(1).contiguous()
    return Split(images, torch.as_tensor(ds.targets, dtype=torch.int64))


def load_splits(name: str, root: str | None = None, download: bool = False, val_size: int = 0,
                subset: int | None = None, seed: int = 0, device="cpu"):
    """dict(train=Split, val=Split|None, test=Split, classes=list, mean=float, std=float, n_train_all=int) on
    ``device``.

    ``val_size`` images are carved out of train by a fixed permutation (seeded); ``subset`` keeps the first
    ``subset`` training images after that (and at most as many test images), for quick runs and tests.
    mean/std are those of the training images (in [0, 1]); n_train_all counts the training file's images.
    """
    if subset is not None and subset < 0:
        raise ValueError(f"subset (--subset) must be 0 (all) or positive, got {subset}")
    train, classes = load_dataset(name, True, root, download)
    test, _ = load_dataset(name, False, root, download)
    n_train_all = len(train)
    val = None
    if val_size:
        if not 0 < val_size < len(train):
            raise ValueError(f"val_size (--val-size) must be between 1 and {len(train) - 1} for the {len(train)} "
                             f"training images, got {val_size}")
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
               classes=classes, mean=mean, std=std, n_train_all=n_train_all)
    return out
