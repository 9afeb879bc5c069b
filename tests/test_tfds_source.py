"""The tensorflow-datasets MNIST source, for real and offline.

tensorflow-datasets prepares MNIST from the four standard files (given as its manual
dir) into a temporary tfds data dir, with every socket refused, and ``mnist()`` must
return through it the same images and labels as our own IDX reader. These tests need
tensorflow-datasets with TensorFlow, which the main environment does not install: they
skip there and run in ``.ci/tfds``, whose own virtualenv has them and which sets
``JAXNN_REQUIRE_TFDS=1`` to turn that skip into a failure. The checks of the manual dir
and of the arguments given to ``tfds.load`` use a stand-in module and run everywhere.
"""

import os
import shutil
import socket
import sys
import types
import urllib.error

import numpy as np
import pytest

from jaxnn.datasets import _mnist
from jaxnn.datasets._mnist import DatasetUnavailableError, mnist

NAMES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
# From /work/shared/data/mnist/README.md.
TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network at all, no JAXNN_DATA_DIR, no real user cache or tfds data dir."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    def no_fetch(url, dest, timeout):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(_mnist, "_fetch", no_fetch)
    monkeypatch.delenv("JAXNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))


def import_tfds():
    """tensorflow_datasets, or a skip (a failure under JAXNN_REQUIRE_TFDS=1)."""
    try:
        import tensorflow_datasets
    except ImportError as err:
        reason = f"tensorflow_datasets cannot be imported ({err}); .ci/tfds runs this test"
        if os.environ.get("JAXNN_REQUIRE_TFDS") == "1":
            pytest.fail(f"JAXNN_REQUIRE_TFDS=1 but {reason}")
        pytest.skip(reason)
    return tensorflow_datasets


def sorted_rows(x, y):
    """The (image, label) pairs of a split in a fixed order, to compare splits as multisets."""
    rows = np.ascontiguousarray(np.column_stack([x.reshape(len(x), -1), y.astype(x.dtype)]))
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).ravel())


def test_tfds_prepares_mnist_offline_and_matches_the_idx_reader(mnist_dir, tmp_path):
    import_tfds()
    ours = mnist(data_dir=mnist_dir)
    tfds_dir = tmp_path / "tfds"
    data = mnist(
        cache_dir=tmp_path / "empty-cache",
        download=False,
        tfds_data_dir=tfds_dir,
        tfds_manual_dir=mnist_dir,
    )
    assert data.source == "tensorflow-datasets" and data.name == "MNIST"
    assert str(tfds_dir) in data.location and str(mnist_dir) in data.location
    assert (tfds_dir / "mnist").is_dir()
    assert not (tmp_path / "tfds-default").exists()
    for got, want in zip(data, ours[:4]):
        assert got.shape == want.shape and got.dtype == want.dtype
    # tfds keeps its own shuffled order: compare each split as a multiset of pairs.
    assert np.array_equal(sorted_rows(*data.train), sorted_rows(*ours.train))
    assert np.array_equal(sorted_rows(*data.test), sorted_rows(*ours.test))
    # And against the class counts published with the files.
    assert np.bincount(data.y_train, minlength=10).tolist() == TRAIN_HIST
    assert np.bincount(data.y_test, minlength=10).tolist() == TEST_HIST

    # Prepared once, it loads again from the tfds data dir alone, in the same order.
    again = mnist(
        cache_dir=tmp_path / "empty-cache", download=False, tfds_data_dir=tfds_dir, flatten=True
    )
    assert again.source == "tensorflow-datasets"
    np.testing.assert_array_equal(again.x_train, data.x_train.reshape(60000, 784))
    np.testing.assert_array_equal(again.y_test, data.y_test)


def fake_tfds(calls):
    """A stand-in tensorflow_datasets module whose ``load`` records its arguments."""

    class DownloadConfig:
        def __init__(self, manual_dir=None):
            self.manual_dir = manual_dir

    def load(name, **kwargs):
        calls.append(dict(kwargs, name=name))
        rng = np.random.default_rng(0)
        return [
            (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n))
            for n in (3, 2)
        ]

    module = types.ModuleType("tensorflow_datasets")
    module.load, module.as_numpy = load, lambda tree: tree
    module.download = types.SimpleNamespace(DownloadConfig=DownloadConfig)
    return module


def test_manual_dir_and_data_dir_reach_tfds_load(mnist_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(calls))
    data = mnist(
        cache_dir=tmp_path / "cache",
        download=False,
        tfds_data_dir=tmp_path / "tfds",
        tfds_manual_dir=mnist_dir,
    )
    assert data.source == "tensorflow-datasets" and data.x_train.shape == (3, 28, 28)
    (call,) = calls
    config = call.pop("download_and_prepare_kwargs")["download_config"]
    assert config.manual_dir == os.fspath(mnist_dir)
    assert call == {
        "name": "mnist",
        "split": ["train", "test"],
        "batch_size": -1,
        "as_supervised": True,
        "download": True,  # prepare from the local files even though download=False
        "data_dir": os.fspath(tmp_path / "tfds"),
    }


def test_bad_manual_dir_is_reported_before_tfds_is_called(mnist_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(calls))
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(mnist_dir / NAMES[0], manual / NAMES[0])
    shutil.copy(mnist_dir / NAMES[2], manual / NAMES[2])
    labels = bytearray((mnist_dir / NAMES[3]).read_bytes())
    labels[-1] ^= 0xFF
    (manual / NAMES[3]).write_bytes(bytes(labels))
    with pytest.raises(DatasetUnavailableError) as err:
        mnist(cache_dir=tmp_path / "cache", download=False, tfds_manual_dir=manual)
    assert calls == []
    (line,) = [line for line in str(err.value).splitlines() if "4. tensorflow-datasets" in line]
    assert f"4. tensorflow-datasets: DatasetError: tfds_manual_dir {manual} " in line
    assert f"{NAMES[1]}: missing" in line and f"{NAMES[3]}: sha256 " in line
    assert NAMES[0] not in line and NAMES[2] not in line


def test_missing_tensorflow_is_not_reported_as_tfds_missing(tmp_path, monkeypatch):
    def needs_tensorflow(download):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(_mnist, "_tfds_mnist", needs_tensorflow)
    with pytest.raises(DatasetUnavailableError) as err:
        mnist(cache_dir=tmp_path / "cache", download=False)
    assert "4. tensorflow-datasets: installed, but a module it needs is missing: tensorflow" in str(
        err.value
    )
