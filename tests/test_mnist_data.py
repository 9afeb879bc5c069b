"""Loading MNIST (from a folder, the cache, a simulated download, tensorflow-datasets) and the
scikit-learn digits fallback. No test touches the network: ``_fetch`` is replaced."""

import gzip
import hashlib
import json
import re
import sys
import time
import types
import urllib.error

import numpy as np
import pytest

from jaxnn.datasets import _mnist
from jaxnn.datasets._idx import DatasetError, write_idx
from jaxnn.datasets._mnist import DatasetUnavailableError, default_cache_dir, digits, mnist

# From /work/shared/data/mnist/README.md.
TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
NAMES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
MIRROR_A, MIRROR_B = "https://mirror-a.invalid/mnist/", "https://mirror-b.invalid/mnist"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no real user cache, no JAXNN_DATA_DIR from the environment."""

    def no_network(url, dest, timeout):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(_mnist, "_fetch", no_network)
    monkeypatch.delenv("JAXNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def no_tfds(download):
    raise ImportError("No module named 'tensorflow_datasets'")


def serve_from(folder, calls=None, tamper=None):
    """A stand-in for ``_fetch`` that copies ``folder/<file name>``; ``tamper`` edits the bytes."""

    def fetch(url, dest, timeout):
        if calls is not None:
            calls.append(url)
        data = (folder / url.rsplit("/", 1)[1]).read_bytes()
        dest.write_bytes(tamper(data) if tamper else data)

    return fetch


def fake_split(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(
        np.uint8
    )


def write_fake_mnist(folder, n_train=7, n_test=3, names=NAMES):
    """Small MNIST-shaped files; returns the raw uint8 arrays in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [*fake_split(n_train, 0), *fake_split(n_test, 1)]
    for name, array in zip(names, arrays):
        write_idx(folder / name, array)
    return arrays


def check_real_mnist(data, flat=False):
    shape = (784,) if flat else (28, 28)
    assert data.x_train.shape == (60000, *shape) and data.x_test.shape == (10000, *shape)
    assert data.y_train.shape == (60000,) and data.y_test.shape == (10000,)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.x_test.dtype == np.float32 and data.y_test.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert data.x_test.min() == 0.0 and data.x_test.max() == 1.0
    assert np.bincount(data.y_train, minlength=10).tolist() == TRAIN_HIST
    assert np.bincount(data.y_test, minlength=10).tolist() == TEST_HIST
    assert data.name == "MNIST" and data.num_classes == 10


def raw_idx(path, header):
    """The uint8 payload of a gzipped IDX file, decoded independently of jaxnn."""
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=header)


def test_real_mnist_from_folder(mnist_dir):
    start = time.perf_counter()
    data = mnist(mnist_dir)
    seconds = time.perf_counter() - start
    check_real_mnist(data)
    assert data.source == "data_dir" and data.location == str(mnist_dir)
    # Pixels are the file's bytes / 255 (README: mean pixel 33.32 train, 33.79 test).
    pixels = raw_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", 16).reshape(10000, 28, 28)
    # float64 division rounded to float32 equals the correctly rounded float32 quotient.
    # np.array_equal: numpy.testing's comparison of the 10,000 images takes seconds
    assert np.array_equal(data.x_test, (pixels / 255.0).astype(np.float32))
    assert abs(data.x_train.mean() * 255 - 33.32) < 0.01
    assert abs(data.x_test.mean() * 255 - 33.79) < 0.01
    labels = raw_idx(mnist_dir / "train-labels-idx1-ubyte.gz", 8)
    np.testing.assert_array_equal(data.y_train, labels)
    assert seconds < 5.0, f"loading MNIST took {seconds:.2f} s"  # about 0.4 s; guards a slow path
    info = json.loads(json.dumps(data.info()))
    assert info == {
        "name": "MNIST",
        "source": "data_dir",
        "location": str(mnist_dir),
        "num_classes": 10,
        "train_size": 60000,
        "test_size": 10000,
        "input_shape": [28, 28],
    }
    (x_train, y_train), (x_test, y_test) = data.train, data.test
    assert x_train is data.x_train and y_train is data.y_train
    assert x_test is data.x_test and y_test is data.y_test


def test_real_mnist_uncompressed_and_dotted_names(mnist_dir, tmp_path):
    # Train files linked as shipped (.gz); test files uncompressed, under the dotted names.
    for name in NAMES[:2]:
        (tmp_path / name).symlink_to(mnist_dir / name)
    for name in NAMES[2:]:
        plain = name.removesuffix(".gz").replace("-idx", ".idx")
        (tmp_path / plain).write_bytes(gzip.decompress((mnist_dir / name).read_bytes()))
    data = mnist(tmp_path, flatten=True)
    check_real_mnist(data, flat=True)


def test_flatten_and_env_var(tmp_path, monkeypatch):
    raw = write_fake_mnist(tmp_path / "data")
    monkeypatch.setenv("JAXNN_DATA_DIR", str(tmp_path / "data"))
    data = mnist()
    assert data.source == "data_dir" and data.location == str(tmp_path / "data")
    for got, want in zip(data, raw, strict=False):
        ref = want / 255.0 if want.ndim == 3 else want
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    flat = mnist(flatten=True)
    assert flat.x_train.shape == (7, 784) and flat.x_test.shape == (3, 784)
    np.testing.assert_array_equal(flat.x_train, data.x_train.reshape(7, 784))


def test_argument_beats_env_var(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "arg", n_train=4)
    write_fake_mnist(tmp_path / "env", n_train=5)
    monkeypatch.setenv("JAXNN_DATA_DIR", str(tmp_path / "env"))
    assert len(mnist(tmp_path / "arg").x_train) == 4
    assert len(mnist().x_train) == 5


def test_mismatched_counts(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / NAMES[1], np.zeros(6, np.uint8))  # 7 images, 6 labels
    with pytest.raises(DatasetError, match="7 images") as err:
        mnist(tmp_path)
    assert str(tmp_path / NAMES[0]) in str(err.value)
    assert str(tmp_path / NAMES[1]) in str(err.value)


def test_swapped_files_and_bad_labels(tmp_path):
    images, labels, *_ = write_fake_mnist(tmp_path)
    write_idx(tmp_path / NAMES[2], labels)  # a labels file where the test images belong
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / NAMES[2]))):
        mnist(tmp_path)
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / NAMES[3], np.array([0, 10, 2], np.uint8))
    with pytest.raises(DatasetError, match="0..9"):
        mnist(tmp_path)


def test_corrupt_file_in_folder_is_an_error_naming_it(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / NAMES[0]
    path.write_bytes(path.read_bytes()[:-20])  # truncated gzip stream
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        mnist(tmp_path)


def test_given_folder_is_the_only_source(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_mnist, "_fetch", serve_from(tmp_path, calls))
    write_fake_mnist(tmp_path / "partial", names=NAMES[:3])
    with pytest.raises(DatasetUnavailableError, match="t10k-labels-idx1-ubyte") as err:
        mnist(tmp_path / "partial")
    assert "JAXNN_DATA_DIR" in str(err.value)
    with pytest.raises(DatasetUnavailableError, match="not a folder"):
        mnist(tmp_path / "missing")
    assert calls == []


def test_download_into_cache_then_cache_hit(mnist_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []

    def first_mirror_down(url, dest, timeout):
        calls.append(url)
        if url.startswith(MIRROR_A):
            raise urllib.error.URLError("connection refused")
        serve_from(mnist_dir)(url, dest, timeout)

    monkeypatch.setattr(_mnist, "_fetch", first_mirror_down)
    data = mnist(cache_dir=cache, mirrors=[MIRROR_A, MIRROR_B], use_tfds=False)
    check_real_mnist(data)
    assert data.source == "download" and MIRROR_B in data.location
    assert len(calls) == 8  # each file: mirror A fails, mirror B serves
    assert sorted(p.name for p in cache.iterdir()) == sorted(NAMES)
    for name in NAMES:
        digest = hashlib.sha256((cache / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((mnist_dir / name).read_bytes()).hexdigest()

    calls.clear()
    again = mnist(cache_dir=cache, mirrors=[MIRROR_A, MIRROR_B], use_tfds=False)
    assert again.source == "cache" and again.location == str(cache) and calls == []
    assert np.array_equal(again.x_train, data.x_train)  # numpy.testing's takes seconds


def test_tampered_download_is_rejected_and_leaves_nothing(mnist_dir, tmp_path, monkeypatch):
    def flip_one_byte(data):
        return data[:100] + bytes([data[100] ^ 1]) + data[101:]

    cache = tmp_path / "cache"
    monkeypatch.setattr(_mnist, "_fetch", serve_from(mnist_dir, tamper=flip_one_byte))
    with pytest.raises(DatasetUnavailableError) as err:
        mnist(cache_dir=cache, mirrors=[MIRROR_A, MIRROR_B], use_tfds=False)
    message = str(err.value)
    assert "sha256" in message and MIRROR_A in message and MIRROR_B.rstrip("/") in message
    assert list(cache.iterdir()) == []  # no partial or unverified file left behind


def test_failed_fetch_leaves_nothing(tmp_path, monkeypatch):
    def half_then_fail(url, dest, timeout):
        dest.write_bytes(b"\x1f\x8b partial")
        raise TimeoutError("timed out")

    cache = tmp_path / "cache"
    monkeypatch.setattr(_mnist, "_fetch", half_then_fail)
    with pytest.raises(DatasetUnavailableError, match="timed out"):
        mnist(cache_dir=cache, mirrors=[MIRROR_A], use_tfds=False)
    assert list(cache.iterdir()) == []


def test_damaged_cache_file_is_detected_and_replaced(mnist_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in NAMES:
        (cache / name).write_bytes((mnist_dir / name).read_bytes())
    bad = cache / NAMES[3]
    bad.write_bytes(bad.read_bytes()[:-1] + bytes([bad.read_bytes()[-1] ^ 1]))
    with pytest.raises(DatasetUnavailableError, match=f"{NAMES[3]}: sha256") as err:
        mnist(cache_dir=cache, download=False, use_tfds=False)
    assert "download=False" in str(err.value)

    calls = []
    monkeypatch.setattr(_mnist, "_fetch", serve_from(mnist_dir, calls))
    data = mnist(cache_dir=cache, mirrors=[MIRROR_A], use_tfds=False)
    assert calls == [MIRROR_A + NAMES[3]]  # only the damaged file is fetched again
    assert data.source == "download"
    assert bad.read_bytes() == (mnist_dir / NAMES[3]).read_bytes()


def test_error_when_nothing_works_lists_every_source(tmp_path, monkeypatch):
    monkeypatch.setattr(_mnist, "_tfds_mnist", no_tfds)
    with pytest.raises(DatasetUnavailableError) as err:
        mnist(cache_dir=tmp_path / "cache", mirrors=[MIRROR_A])
    message = str(err.value)
    for expected in [
        "1. data directory",
        "2. cache " + str(tmp_path / "cache"),
        "missing",
        "3. download",
        "network disabled",
        "4. tensorflow-datasets: not installed",
        "JAXNN_DATA_DIR",
        "--data-dir",
        "pip install tensorflow-datasets",
    ]:
        assert expected in message, (expected, message)
    assert isinstance(err.value, DatasetError) and isinstance(err.value, ValueError)


def test_default_cache_dir_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "jaxnn" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "jaxnn" / "mnist"


def test_default_cache_is_used(mnist_dir, tmp_path, monkeypatch):
    # The autouse fixture points XDG_CACHE_HOME at tmp_path / "xdg-cache".
    monkeypatch.setattr(_mnist, "_fetch", serve_from(mnist_dir))
    data = mnist(use_tfds=False)
    assert data.source == "download"
    assert sorted(p.name for p in (tmp_path / "xdg-cache" / "jaxnn" / "mnist").iterdir()) == sorted(
        NAMES
    )


def test_tensorflow_datasets_source(tmp_path, monkeypatch):
    x_train, y_train = fake_split(5, 2)
    x_test, y_test = fake_split(2, 3)
    seen = {}

    def load(name, split, batch_size, as_supervised, download):
        seen.update(name=name, split=split, download=download)
        return [(x_train[..., None], y_train.astype(np.int64)), (x_test[..., None], y_test)]

    fake = types.ModuleType("tensorflow_datasets")
    fake.load, fake.as_numpy = load, lambda tree: tree
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    data = mnist(cache_dir=tmp_path / "cache", download=False, flatten=True)
    assert seen == {"name": "mnist", "split": ["train", "test"], "download": False}
    assert data.source == "tensorflow-datasets"
    np.testing.assert_allclose(data.x_train, x_train.reshape(5, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, y_test)
    assert data.y_train.dtype == np.int32


def test_digits_fallback():
    from sklearn.datasets import load_digits

    ref = load_digits()
    data = digits()
    assert data.name == "digits (scikit-learn 8x8)" and data.source == "scikit-learn"
    assert data.x_train.shape == (1438, 8, 8) and data.x_test.shape == (359, 8, 8)
    assert data.y_train.shape == (1438,) and data.y_test.shape == (359,)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    # Together the two splits are exactly the 1,797 images / 16, each once.
    all_x = np.concatenate([data.x_train, data.x_test]).reshape(1797, 64).astype(np.float64)
    all_y = np.concatenate([data.y_train, data.y_test])
    order = np.lexsort(np.column_stack([all_x, all_y]).T)
    ref_order = np.lexsort(np.column_stack([ref.data / 16, ref.target]).T)
    np.testing.assert_array_equal(all_x[order], ref.data[ref_order] / 16)
    np.testing.assert_array_equal(all_y[order], ref.target[ref_order])
    # Deterministic; seed=None keeps the original order; flatten gives rows of 64.
    np.testing.assert_array_equal(digits().x_test, data.x_test)
    ordered = digits(seed=None, flatten=True)
    np.testing.assert_array_equal(ordered.x_test, ref.data[-359:] / 16)
    np.testing.assert_array_equal(ordered.y_train, ref.target[:-359])
    assert not np.array_equal(ordered.y_test, data.y_test)  # the default split is shuffled
    assert json.loads(json.dumps(ordered.info()))["input_shape"] == [64]


def test_digits_bad_fraction_and_missing_sklearn(monkeypatch):
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.0)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits()
