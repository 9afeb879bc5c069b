"""Datasets for the examples and tests: MNIST, scikit-learn's 8x8 digits, tfds sources,
and an IDX reader.

``mnist()`` and ``digits()`` return a ``Dataset`` (float32 images in [0, 1], int32
labels, and the dataset's name and source); ``tfds_source()`` opens a split of any
tensorflow-datasets image dataset (Fashion-MNIST, CIFAR-10, ...) as a random-access
source of ``(x, y)`` examples for ``jaxnn.fit``; ``read_idx``/``write_idx`` handle the
IDX array format MNIST is distributed in. Only numpy is needed; scikit-learn and
tensorflow-datasets are imported when used.
"""

from jaxnn.datasets._idx import DatasetError, read_idx, write_idx
from jaxnn.datasets._mnist import (
    Dataset,
    DatasetUnavailableError,
    default_cache_dir,
    digits,
    mnist,
)
from jaxnn.datasets._tfds_source import TfdsSource, tfds_source

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetUnavailableError",
    "TfdsSource",
    "default_cache_dir",
    "digits",
    "mnist",
    "read_idx",
    "tfds_source",
    "write_idx",
]
