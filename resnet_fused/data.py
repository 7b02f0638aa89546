"""MNIST-family datasets held whole on the target device, with per-batch normalisation and augmentation there.

Datasets come from ``torchvision.datasets`` in its on-disk layout under a root directory: ``--data-root``, else the
``RESNET_FUSED_DATA`` environment variable, else ``./data``. Nothing is downloaded unless asked (``download=True``).

A split is one uint8 tensor [N, 1, H, W] plus int64 labels on the device; :class:`DeviceLoader` draws batches by
index, translates them randomly (zero padding, no flips: digits are not mirror-symmetric) and normalises them, all
as batched tensor ops on that device: no per-image Python work in the training loop. Every epoch's order and
augmentation come from a generator seeded with (seed, epoch), so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DataFormatError", "DataNotFoundError", "DatasetError", "Split", "DeviceLoader",
           "default_data_root", "load_dataset", "load_splits", "read_idx"]


class DatasetError(RuntimeError):
    """A dataset that cannot be used as it is: missing, or files that are not what they should be."""


class DataNotFoundError(DatasetError):
    """The dataset files are not under the root (and downloading was not asked for)."""


class DataFormatError(DatasetError):
    """A dataset file is there but not a valid one (bad magic, truncated, counts or labels out of range)."""


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


# ---- IDX files ------------------------------------------------------------------------------------------------
# The MNIST family's format: 2 zero bytes, a type code, the number of dimensions, each dimension as a big-endian
# uint32, then the values (big-endian). Read here (not through torchvision) so that every fault is named: a missing
# file, a bad magic number, a truncated or over-long file; and so that a root holding only the gzip-compressed
# files ("*-ubyte.gz", as most mirrors ship them) works without writing into it.

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _find(path):
    """The file, or its .gz beside it; None if neither exists."""
    for p in (path, path + ".gz"):
        if os.path.isfile(p):
            return p
    return None


def read_idx(path: str) -> np.ndarray:
    """An IDX file (or its .gz) as a numpy array; DataFormatError naming the file and the fault."""
    found = _find(path)
    if found is None:
        raise DataNotFoundError(f"{path} (or {os.path.basename(path)}.gz) not found")
    try:
        if found.endswith(".gz"):
            with gzip.open(found, "rb") as f:
                raw = f.read()
        else:
            with open(found, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{found} cannot be read: {e}") from None
    if len(raw) < 4:
        raise DataFormatError(f"{found} is {'empty' if not raw else 'too short'} ({len(raw)} bytes): not an IDX file")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataFormatError(f"{found} is not an IDX file: bad magic number 0x{raw[:4].hex()} (expected 0x0000 "
                              f"then a type code and the number of dimensions)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{found} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataFormatError(f"{found} is {what}: its header says {'x'.join(map(str, shape))} values of "
                              f"{dtype.itemsize} byte(s) ({expected:,} bytes with the header), the file has "
                              f"{len(raw):,} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


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


def rotate_zoom_theta(angle, zoom):
    """The output -> input maps [B, 2, 3] (affine_grid's normalised coordinates) that turn each image
    counter-clockwise by ``angle[b]`` radians and magnify it by ``zoom[b]`` about its centre."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    # affine_grid's (x, y) have y pointing down: a counter-clockwise turn on screen samples the input at the
    # output point turned clockwise
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def rotate_zoom(x, angle, zoom):
    """Images x [B, C, H, W] (float) each rotated counter-clockwise by ``angle[b]`` radians and magnified by
    ``zoom[b]`` about the image centre; bilinear, zero fill outside."""
    grid = F.affine_grid(rotate_zoom_theta(angle, zoom).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# elastic distortion (Simard et al., 2003): the random displacement field's smoothing, in pixels
ELASTIC_SIGMA = 4.0


def elastic_field(u, alpha, sigma=ELASTIC_SIGMA):
    """Displacement fields [B, 2, H, W] in pixels ((dx, dy)) from uniform draws ``u`` [B, 2, H, W] in [0, 1): each
    component 2u - 1 smoothed by a Gaussian of ``sigma`` pixels (kernel normalised to sum 1, radius 3 sigma, zeros
    outside the image: the field fades towards the borders, which hold the digits' background) and scaled by
    ``alpha``."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=u.device, dtype=u.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = u.shape
    f = (2 * u - 1).reshape(b * c, 1, h, w)
    f = F.conv2d(f, k.view(1, 1, 1, -1), padding=(0, r))
    f = F.conv2d(f, k.view(1, 1, -1, 1), padding=(r, 0))
    return alpha * f.reshape(b, c, h, w)


def elastic_warp(x, disp, theta=None):
    """Images x [B, C, H, W] (float) resampled at every pixel's own position plus ``disp`` [B, 2, H, W] ((dx, dy),
    pixels): output[y, x] = input[y + dy, x + dx], bilinear, zero fill outside. ``theta`` [B, 2, 3]
    (rotate_zoom_theta) puts a rotation/zoom before the distortion in the same single resample: output[p] =
    input[theta(p + disp(p))], the image ``elastic_warp(rotate_zoom(x, ...), disp)`` would give without blurring
    the digits by a second bilinear interpolation."""
    b, c, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=disp.dtype) + 0.5) * (2.0 / h) - 1
    xs = (torch.arange(w, device=x.device, dtype=disp.dtype) + 0.5) * (2.0 / w) - 1
    gx = xs[None, None, :] + disp[:, 0] * (2.0 / w)
    gy = ys[None, :, None] + disp[:, 1] * (2.0 / h)
    grid = torch.stack([gx, gy], -1)
    if theta is not None:
        theta = theta.to(grid.dtype)
        grid = torch.einsum("bhwj,bij->bhwi", grid, theta[:, :, :2]) + theta[:, None, None, :, 2]
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


# random erasing (Zhong et al., 2017): the erased rectangle's area as a fraction of the image, and its aspect ratio
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)


def erase_mask(u, p, h, w):
    """Boolean [B, 1, H, W] masks, one rectangle per image whose first draw is below ``p``: ``u`` [5, B] uniform
    draws in [0, 1) give (erase or not, area, log aspect, top, left). The rectangle (area ``s * H * W``, height over
    width ``r``) is clipped to the image; images not erased get an all-False mask."""
    ue, ua, ur, ut, ul = u
    area = (ERASE_AREA[0] + ua * (ERASE_AREA[1] - ERASE_AREA[0])) * (h * w)
    lo, hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(lo + ur * (hi - lo))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (ut * (h - eh + 1)).long()
    left = (ul * (w - ew + 1)).long()
    ys = torch.arange(h, device=u.device)[None, :, None]
    xs = torch.arange(w, device=u.device)[None, None, :]
    inside = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None]) &
              (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None]))
    return (inside & (ue < p)[:, None, None])[:, None]


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
                from .distributed import shard_bounds
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
