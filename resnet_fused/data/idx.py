"""The MNIST family's IDX files, read here rather than through torchvision so that every fault is named (a missing
file, a bad magic number, a truncated or over-long file), from a root with the uncompressed files or with the
gzip-compressed ones alone ("*-ubyte.gz", as most mirrors ship them), without writing into it."""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np


class DatasetError(RuntimeError):
    """A dataset that cannot be used as it is: missing, or files that are not what they should be."""


class DataNotFoundError(DatasetError):
    """The dataset files are not under the root (and downloading was not asked for)."""


class DataFormatError(DatasetError):
    """A dataset file is there but not a valid one (bad magic, truncated, counts or labels out of range)."""


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
