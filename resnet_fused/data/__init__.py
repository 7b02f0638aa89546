"""MNIST-family datasets held whole on the target device, with per-batch normalisation and augmentation there.

- ``idx``: the IDX file reader and the dataset errors (every fault named);
- ``datasets``: the datasets by name, their splits on the device (``load_splits``, ``load_dataset``, ``Split``);
- ``augment``: the augmentations beyond translation, batched on the device: rotation/zoom, elastic distortion,
  random erasing;
- ``loader``: ``DeviceLoader``, seeded batches (shuffled, translated, augmented, normalised) of a split.
"""
from .augment import (ELASTIC_SIGMA, ERASE_AREA, ERASE_ASPECT, elastic_field, elastic_warp, erase_mask, rotate_zoom,
                      rotate_zoom_theta)
from .datasets import DATASETS, DatasetSpec, Split, default_data_root, load_dataset, load_splits
from .idx import DataFormatError, DataNotFoundError, DatasetError, read_idx
from .loader import DeviceLoader

__all__ = ["DATASETS", "DataFormatError", "DataNotFoundError", "DatasetError", "Split", "DeviceLoader",
           "default_data_root", "load_dataset", "load_splits", "read_idx", "DatasetSpec", "ELASTIC_SIGMA",
           "ERASE_AREA", "ERASE_ASPECT", "elastic_field", "elastic_warp", "erase_mask", "rotate_zoom",
           "rotate_zoom_theta"]
