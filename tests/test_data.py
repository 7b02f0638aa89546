import gzip
import os
import shutil

import numpy as np
import pytest
import torch

from resnet_fused import train
from resnet_fused.data import DataFormatError, DataNotFoundError, DeviceLoader, load_dataset, load_splits, read_idx

from cli_helpers import base_args, cli_error


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", True, root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "--download" in msg


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10", True, root=".")


def test_mnist_splits_on_device(mnist_root):
    d = load_splits("mnist", mnist_root, val_size=1000, subset=500)
    assert d["train"].images.dtype == torch.uint8 and d["train"].images.shape == (500, 1, 28, 28)
    assert d["val"].images.shape == (500, 1, 28, 28) and d["test"].labels.shape == (500,)
    assert len(d["classes"]) == 10 and 0.1 < d["mean"] < 0.15 and 0.25 < d["std"] < 0.35
    full = load_splits("mnist", mnist_root)
    assert len(full["train"]) == 60000 and len(full["test"]) == 10000
    assert torch.bincount(full["test"].labels).tolist()[:2] == [980, 1135]


def _loader(d, **kw):
    return DeviceLoader(d["train"], 64, d["mean"], d["std"], **kw)


def test_loader_is_seeded_and_reproducible(mnist_root):
    d = load_splits("mnist", mnist_root, subset=300)
    a = _loader(d, shuffle=True, max_shift=2, seed=3)
    b = _loader(d, shuffle=True, max_shift=2, seed=3)
    for e in (0, 1):
        a.set_epoch(e), b.set_epoch(e)
        for (xa, ya), (xb, yb) in zip(a, b):
            torch.testing.assert_close(xa, xb)
            assert torch.equal(ya, yb)
    a.set_epoch(0)
    b.set_epoch(1)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])
    assert len(a) == 5 and sum(y.numel() for _, y in a) == 300


def test_different_seeds_give_different_batches(mnist_root):
    """The seed reaches the generator: another seed, another order and other shifts (same epoch)."""
    d = load_splits("mnist", mnist_root, subset=300)
    (xa, ya), (xb, yb) = (next(iter(_loader(d, shuffle=True, max_shift=2, seed=s))) for s in (3, 4))
    assert not torch.equal(ya, yb)
    xa, xb = (next(iter(_loader(d, max_shift=2, seed=s)))[0] for s in (3, 4))  # unshuffled: the shifts alone
    assert not torch.equal(xa, xb)


def test_translation_moves_digits_without_flipping(mnist_root):
    d = load_splits("mnist", mnist_root, subset=64)
    plain = next(iter(_loader(d)))[0]
    shifted = next(iter(_loader(d, max_shift=2, seed=1)))[0]
    assert plain.shape == shifted.shape == (64, 1, 28, 28)
    lo = (0 - d["mean"]) / d["std"]
    # each shifted image equals the plain one moved by some (dy, dx) in [-2, 2]^2, zero (background) filled
    pad = torch.nn.functional.pad(plain, (2, 2, 2, 2), value=lo)
    for i in range(8):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.allclose(pad[i, :, dy:dy + 28, dx:dx + 28], shifted[i], atol=1e-5)]
        assert hits, f"image {i} is not a translation"
    assert not torch.allclose(plain, shifted)


def test_normalisation_and_channels_last(mnist_root):
    d = load_splits("mnist", mnist_root, subset=1000)
    x, _ = next(iter(DeviceLoader(d["train"], 1000, d["mean"], d["std"], channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


@pytest.mark.parametrize("name", ["fashionmnist", "kmnist"])
def test_idx_family_datasets_load_through_torchvision(mnist_root, tmp_path, name):
    """FashionMNIST and KMNIST share MNIST's IDX files and layout: their loaders run on MNIST's files."""
    import os
    folder = {"fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}[name]
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    for f in os.listdir(os.path.join(mnist_root, "MNIST", "raw")):  # whichever forms the root holds (.gz or not)
        os.symlink(os.path.join(mnist_root, "MNIST", "raw", f), raw / f)
    d = load_splits(name, str(tmp_path), subset=100)
    assert d["train"].images.shape == (100, 1, 28, 28) and len(d["classes"]) == 10


def test_rotate_zoom_turns_and_magnifies():
    import math
    from resnet_fused.data import rotate_zoom
    x = torch.randn(3, 2, 5, 5)
    f64 = dict(dtype=torch.float64)
    out = rotate_zoom(x, torch.tensor([math.pi / 2, 0.0, -math.pi / 2], **f64), torch.ones(3, **f64))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, (1, 2)), rtol=0, atol=1e-5)  # counter-clockwise
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2], torch.rot90(x[2], -1, (1, 2)), rtol=0, atol=1e-5)
    half = rotate_zoom(torch.ones(1, 1, 8, 8), torch.zeros(1, **f64), torch.full((1,), 0.5, **f64))[0, 0]
    expect = torch.zeros(8, 8)
    expect[2:6, 2:6] = 1  # shrunk to the central half, zero around it
    torch.testing.assert_close(half, expect, rtol=0, atol=1e-6)


def test_rotation_and_zoom_are_seeded_and_bounded(mnist_root):
    d = load_splits("mnist", mnist_root, subset=64)
    plain = next(iter(_loader(d)))[0]
    a, b = (next(iter(_loader(d, rotate=15, scale=0.1, seed=5)))[0] for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, plain, atol=1e-3)
    bg = (0 - d["mean"]) / d["std"]
    assert a.min() >= bg - 1e-5 and a.max() <= plain.max() + 1e-5  # bilinear: within the pixels' range
    # a small turn keeps most of the ink (zoom within 10% changes it by at most ~21%)
    ink = lambda t: (t - bg).sum((1, 2, 3))
    assert ((ink(a) / ink(plain)) - 1).abs().max() < 0.3
    with pytest.raises(ValueError, match="rotate"):
        _loader(d, rotate=200)
    with pytest.raises(ValueError, match="scale"):
        _loader(d, scale=1.0)


def test_erase_mask_is_the_drawn_rectangle():
    """One rectangle per image whose first draw is below p: area s * H * W with s in [0.02, 0.4], height / width
    the drawn aspect, top-left at the drawn fraction of the free room."""
    from resnet_fused.data import ERASE_AREA, erase_mask
    f64 = dict(dtype=torch.float64)
    # image 0: area 0.02 + 0.5 * 0.38 = 0.21 of 10 x 20 = 42 px, aspect 1 (log-uniform midpoint) -> 6 x 6 at
    # top = floor(0.5 * (10 - 6 + 1)) = 2, left = floor(0.25 * (20 - 6 + 1)) = 3; image 1: not erased;
    # image 2: largest area, tallest aspect 1/0.3 -> height sqrt(80 / 0.3) = 16.3, clipped to 10
    u = torch.tensor([[0.1, 0.7, 0.6], [0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0.5, 0.5, 0.0], [0.25, 0.0, 0.0]], **f64)
    m = erase_mask(u, 0.65, 10, 20)
    assert m.shape == (3, 1, 10, 20) and m.dtype == torch.bool
    expect = torch.zeros(10, 20, dtype=torch.bool)
    expect[2:8, 3:9] = True
    assert torch.equal(m[0, 0], expect)
    assert not m[1].any()
    w = round((ERASE_AREA[1] * 200 * 0.3) ** 0.5)
    expect = torch.zeros(10, 20, dtype=torch.bool)
    expect[:, :w] = True
    assert torch.equal(m[2, 0], expect)


def test_elastic_field_is_the_smoothed_scaled_noise():
    """A single raised draw in a field of 0.5s (2u - 1 = 0 elsewhere) comes out as alpha times the 2-D Gaussian
    kernel around it: normalised, radius 3 sigma, sigma = ELASTIC_SIGMA."""
    import math
    from resnet_fused.data import ELASTIC_SIGMA, elastic_field
    u = torch.full((2, 2, 40, 40), 0.5, dtype=torch.float64)
    u[0, 1, 20, 17] = 1.0
    u[1, 0, 20, 20] = 0.0
    f = elastic_field(u, 3.0)
    r = math.ceil(3 * ELASTIC_SIGMA)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-t ** 2 / (2 * ELASTIC_SIGMA ** 2))
    k = k / k.sum()
    expect = torch.zeros(40, 40, dtype=torch.float64)
    expect[20 - r:20 + r + 1, 17 - r:17 + r + 1] = 3.0 * k[:, None] * k[None, :]
    torch.testing.assert_close(f[0, 1], expect, rtol=0, atol=1e-12)
    assert f[0, 0].abs().max() == 0 and f[1, 1].abs().max() == 0
    torch.testing.assert_close(f[1, 0], -torch.roll(expect, 3, 1), rtol=0, atol=1e-12)


def test_elastic_warp_moves_each_pixel_by_its_displacement():
    from resnet_fused.data import elastic_warp
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    disp = torch.zeros(2, 2, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(elastic_warp(x, disp), x, rtol=0, atol=1e-12)
    disp[0, 0] = 1.0   # image 0: every output pixel reads one column to the right
    disp[1, 1] = -2.0  # image 1: two rows up
    out = elastic_warp(x, disp)
    torch.testing.assert_close(out[0, :, :, :-1], x[0, :, :, 1:], rtol=0, atol=1e-12)
    assert out[0, :, :, -1].abs().max() < 1e-12
    torch.testing.assert_close(out[1, :, 2:], x[1, :, :-2], rtol=0, atol=1e-12)
    assert out[1, :, :2].abs().max() < 1e-12
    disp = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    disp[0, 0, 2, 3] = 0.25  # one pixel a quarter of the way to its right neighbour: bilinear
    out = elastic_warp(x[:1], disp)
    torch.testing.assert_close(out[0, :, 2, 3], 0.75 * x[0, :, 2, 3] + 0.25 * x[0, :, 2, 4], rtol=0, atol=1e-12)


def test_elastic_warp_after_a_rotation_is_one_resample():
    """With theta, the output reads the input at theta(p + disp(p)): the distortion acts on the turned image. A
    quarter turn moves pixel centres onto pixel centres, so turning first (exact) and distorting after must give the
    same image; a displacement not turned with it, or applied before the turn, would not."""
    import math
    from resnet_fused.data import elastic_warp, rotate_zoom, rotate_zoom_theta
    f64 = dict(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, **f64)
    disp = torch.rand(2, 2, 8, 8, generator=g, **f64) * 3 - 1.5  # fractional, different along x and y
    angle, zoom = torch.tensor([math.pi / 2, -math.pi / 2], **f64), torch.ones(2, **f64)
    one = elastic_warp(x, disp, rotate_zoom_theta(angle, zoom))
    torch.testing.assert_close(one, elastic_warp(rotate_zoom(x, angle, zoom), disp), rtol=0, atol=1e-12)
    assert (one - rotate_zoom(elastic_warp(x, disp), angle, zoom)).abs().max() > 0.1
    # no displacement: the rotation/zoom alone
    angle, zoom = torch.tensor([0.3, -0.2], **f64), torch.tensor([1.1, 0.9], **f64)
    torch.testing.assert_close(elastic_warp(x, torch.zeros_like(disp), rotate_zoom_theta(angle, zoom)),
                               rotate_zoom(x, angle, zoom), rtol=0, atol=1e-12)


def test_rotation_and_elastic_distortion_in_the_loader_take_one_resample(mnist_root):
    """The loader's rotate + elastic images are the translated digits sampled once at theta(p + disp(p)), with the
    draws in the loader's order (shifts, rotation/zoom, field)."""
    import math
    from resnet_fused.data import elastic_field, elastic_warp, rotate_zoom_theta
    d = load_splits("mnist", mnist_root, subset=64)
    kw = dict(shuffle=True, max_shift=2, rotate=10.0, scale=0.1, elastic=8.0, seed=3)
    got = next(iter(_loader(d, **kw)))[0]
    ld = _loader(d, **kw)
    g = ld._generator()
    order = torch.randperm(len(d["train"]), generator=g)
    imgs = ld._translate(d["train"].images[order[:ld.batch_size]], g)
    u = torch.rand(2, imgs.shape[0], generator=g, dtype=torch.float64)
    theta = rotate_zoom_theta((2 * u[0] - 1) * math.radians(10.0), 1 + (2 * u[1] - 1) * 0.1)
    field = elastic_field(torch.rand(imgs.shape[0], 2, 28, 28, generator=g), 8.0)
    torch.testing.assert_close(got, ld.normalize(elastic_warp(imgs.float(), field, theta)), rtol=0, atol=1e-5)


def test_elastic_distortion_in_the_loader_is_seeded_and_keeps_the_ink(mnist_root):
    d = load_splits("mnist", mnist_root, subset=64)
    plain = next(iter(_loader(d)))[0]
    a, b = (next(iter(_loader(d, elastic=34.0, seed=5)))[0] for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, plain, atol=1e-3)
    bg = (0 - d["mean"]) / d["std"]
    assert a.min() >= bg - 1e-5 and a.max() <= plain.max() + 1e-5
    ink = lambda t: (t - bg).sum((1, 2, 3))
    assert ((ink(a) / ink(plain)) - 1).abs().max() < 0.5  # stretched and squeezed here and there, not wiped
    with pytest.raises(ValueError, match="elastic"):
        _loader(d, elastic=-1.0)


def test_random_erasing_blanks_one_rectangle_in_the_drawn_share_of_images():
    from resnet_fused.data import Split
    g = torch.Generator().manual_seed(0)
    n = 2000
    split = Split(torch.randint(1, 255, (n, 1, 12, 12), dtype=torch.uint8, generator=g), torch.arange(n) % 10)
    kw = dict(mean=0.1, std=0.3, shuffle=True, seed=4)
    plain = torch.cat([x for x, _ in DeviceLoader(split, 500, **kw)])
    x = torch.cat([x for x, _ in DeviceLoader(split, 500, erase=0.3, **kw)])
    again = torch.cat([x for x, _ in DeviceLoader(split, 500, erase=0.3, **kw)])
    torch.testing.assert_close(x, again, rtol=0, atol=0)  # seeded
    bg = (0 - 0.1) / 0.3
    blank = (x - bg).abs() < 1e-6            # the images have no background pixel of their own
    changed = (x != plain)
    assert torch.equal(blank, changed)       # only erased pixels differ, and they are the background
    erased = blank.flatten(1).any(1)
    assert 0.25 < erased.float().mean() < 0.35
    area = blank.flatten(1).sum(1)[erased].float() / 144
    assert area.min() >= 0.01 and area.max() <= 0.45 and 0.15 < area.mean() < 0.27
    for b in erased.nonzero()[:50, 0]:       # one rectangle: its bounding box is all erased
        rows, cols = blank[b, 0].any(1).nonzero()[:, 0], blank[b, 0].any(0).nonzero()[:, 0]
        box = blank[b, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and box.sum() == blank[b].sum()
    with pytest.raises(ValueError, match="erase"):
        DeviceLoader(split, 500, erase=1.5, **kw)


@pytest.mark.parametrize("world,aug", [(2, {}), (3, {}), (2, dict(rotate=10.0, scale=0.1)),
                                       (2, dict(rotate=10.0, erase=0.5, elastic=8.0))])
def test_sharded_loader_splits_the_global_batches(world, aug):
    """W ranks' batches, concatenated in rank order, are exactly one process's batches (order, labels, shifts):
    disjoint shards, reshuffled every epoch."""
    from resnet_fused.data import Split
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 255, (53, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(53))
    kw = dict(mean=0.1, std=0.3, shuffle=True, max_shift=2, seed=3, drop_last=True, **aug)
    one = DeviceLoader(split, 12, **kw)
    ranks = [DeviceLoader(split, 12, **kw, shard=(r, world)) for r in range(world)]
    firsts = []
    for epoch in (0, 1):
        for loader in [one] + ranks:
            loader.set_epoch(epoch)
        for (x, y), *parts in zip(one, *ranks):
            torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert all(p[0].shape[0] >= 12 // world for p in parts)
        firsts.append(next(iter(ranks[0]))[1])
    assert not torch.equal(firsts[0], firsts[1])  # reshuffled per epoch
    with pytest.raises(ValueError, match="shard"):
        DeviceLoader(split, 12, **kw, shard=(2, 2))


# ---- the IDX files: gzip alone, and every fault named ----------------------------------------------------------

def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _small_root(tmp_path, mnist_root, n=200, gz=False):
    """A MNIST root with the first n images of each split, uncompressed or as .gz only."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = os.path.join(mnist_root, "MNIST", "raw")
    for stem in ("train", "t10k"):
        imgs = read_idx(os.path.join(src, f"{stem}-images-idx3-ubyte"))[:n]
        lbls = read_idx(os.path.join(src, f"{stem}-labels-idx1-ubyte"))[:n]
        for name, arr in ((f"{stem}-images-idx3-ubyte", imgs), (f"{stem}-labels-idx1-ubyte", lbls)):
            data = _idx_bytes(np.ascontiguousarray(arr), 0x08)
            if gz:
                with gzip.open(raw / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (raw / name).write_bytes(data)
    return tmp_path / "data", raw


def test_a_root_of_gzip_files_alone_loads_without_writing(mnist_root, tmp_path):
    root, raw = _small_root(tmp_path, mnist_root, gz=True)
    plain_root, _ = _small_root(tmp_path / "plain", mnist_root)
    for p in raw.iterdir():
        p.chmod(0o444)
    raw.chmod(0o555)  # read-only: nothing may be extracted next to the files
    try:
        before = sorted(os.listdir(raw))
        a = load_splits("mnist", str(root))
        b = load_splits("mnist", str(plain_root))
        assert sorted(os.listdir(raw)) == before
    finally:
        raw.chmod(0o755)
    assert torch.equal(a["train"].images, b["train"].images) and torch.equal(a["test"].labels, b["test"].labels)
    assert a["train"].images.shape == (200, 1, 28, 28)
    # and the real MNIST files, gz against uncompressed
    full = load_dataset("mnist", False, mnist_root)[0]
    shutil.copy(os.path.join(mnist_root, "MNIST", "raw", "t10k-images-idx3-ubyte.gz"), tmp_path / "t.gz")
    assert torch.equal(torch.from_numpy(read_idx(str(tmp_path / "t"))[:, None].copy()), full.images)


DAMAGE = [
    ("bad magic", lambda b: b"\x08\x03\x00\x00" + b[4:], "bad magic number"),
    ("empty", lambda b: b"", "is empty"),
    ("truncated", lambda b: b[:-100], "is truncated"),
    ("header only", lambda b: b[:10], "is truncated"),
    ("trailing bytes", lambda b: b + b"\0" * 7, "longer than its header says"),
]


@pytest.mark.parametrize("which", ["images", "labels"])
@pytest.mark.parametrize("damage", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_idx_files_are_named(mnist_root, tmp_path, capsys, which, damage):
    _, how, message = damage
    root, raw = _small_root(tmp_path, mnist_root)
    f = raw / f"train-{which}-idx{3 if which == 'images' else 1}-ubyte"
    f.write_bytes(how(f.read_bytes()))
    with pytest.raises(DataFormatError, match=message) as e:
        load_splits("mnist", str(root))
    assert str(f) in str(e.value)
    out = tmp_path / "run"
    err = cli_error(capsys, train.main, base_args(str(root), out, "--subset", "0"))
    assert message in err and not out.exists()


def test_image_and_label_counts_must_agree(mnist_root, tmp_path, capsys):
    root, raw = _small_root(tmp_path, mnist_root)
    lbl = raw / "train-labels-idx1-ubyte"
    lbl.write_bytes(_idx_bytes(read_idx(str(lbl))[:150].copy(), 0x08))
    err = cli_error(capsys, train.main, base_args(str(root), tmp_path / "run", "--subset", "0"))
    assert "has 200 images but" in err and "150 labels" in err


def test_labels_out_of_range_are_refused_at_load(mnist_root, tmp_path, capsys):
    root, raw = _small_root(tmp_path, mnist_root)
    lbl = raw / "t10k-labels-idx1-ubyte"
    arr = read_idx(str(lbl)).copy()
    arr[17] = 200
    lbl.write_bytes(_idx_bytes(arr, 0x08))
    err = cli_error(capsys, train.main, base_args(str(root), tmp_path / "run", "--subset", "0"))
    assert "label 200" in err and "0..9" in err and str(lbl) in err
