"""The tensorflow-datasets sources, for real and offline.

tensorflow-datasets prepares MNIST from the four standard files (given as its manual
dir) into a temporary tfds data dir, with every socket refused. ``mnist()`` must return
through it the same images and labels as our own IDX reader, and so must
``tfds_source`` (tfds's random-access ArrayRecord source, example by example), which
``fit`` and ``examples/train_tfds.py`` stream from. These tests need
tensorflow-datasets with TensorFlow, which the main environment does not install: they
skip there and run in ``.ci/tfds``, whose own virtualenv has them and which sets
``JAXNN_REQUIRE_TFDS=1`` to turn that skip into a failure. The checks of the manual dir
and of the arguments given to ``tfds.load``, and the error without tensorflow-datasets,
use a stand-in module (or none) and run everywhere.
"""

import importlib.util
import itertools
import json
import os
import pathlib
import shutil
import socket
import sys
import types
import urllib.error

import jax
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn.datasets import DatasetError, TfdsSource, _mnist, tfds_source
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


def refuse_network(monkeypatch):
    """Every socket connection and name lookup fails at once."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network at all, no JAXNN_DATA_DIR, no real user cache or tfds data dir."""

    def no_fetch(url, dest, timeout):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    refuse_network(monkeypatch)
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

    # tfds.load prepared it as TFRecord, which has no random access: tfds_source says so.
    with pytest.raises(DatasetError) as err:
        tfds_source("mnist", "train", data_dir=tfds_dir)
    assert not isinstance(err.value, DatasetUnavailableError)
    assert "as tfrecord only" in str(err.value) and "array_record" in str(err.value)
    assert str(tfds_dir / "mnist") in str(err.value)


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


# -- tfds_source: a prepared split as a random-access source of (x, y) ------------------

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tfds.py"
SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``(tfds data dir, IDX folder)``: MNIST prepared once for this module by
    ``tfds_source`` itself, offline from the IDX folder, in tfds's ArrayRecord format."""
    import_tfds()
    mnist_dir = pathlib.Path(os.environ.get("JAXNN_TEST_MNIST", SHARED_MNIST))
    if not (mnist_dir / NAMES[0]).exists():
        pytest.skip(f"real MNIST files not found in {mnist_dir} (set JAXNN_TEST_MNIST)")
    data_dir = tmp_path_factory.mktemp("tfds-array-record")
    with pytest.MonkeyPatch.context() as patch:
        refuse_network(patch)
        source = tfds_source("mnist", "test", data_dir=data_dir, manual_dir=mnist_dir)
    assert len(source) == 10_000
    return data_dir, mnist_dir


@pytest.fixture(scope="module")
def idx_mnist(prepared):
    """MNIST as our own IDX reader gives it, images as (N, 28, 28, 1)."""
    data = mnist(data_dir=prepared[1])
    return (data.x_train[..., None], data.y_train), (data.x_test[..., None], data.y_test)


def idx_positions(images, x):
    """For each image of ``x``, its row in ``images`` (MNIST has no two identical images)."""
    rows = {image.tobytes(): i for i, image in enumerate(images)}
    assert len(rows) == len(images)
    return np.array([rows[image.tobytes()] for image in x])


def stack(pairs):
    return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])


def test_source_gives_the_idx_examples(prepared, idx_mnist):
    """tfds shuffles a split once, when it prepares it: each example of the source is
    the IDX example at some row, labels included, every row exactly once."""
    data_dir, _ = prepared
    rng = np.random.default_rng(0)
    for split, (images, labels), size in (("train", idx_mnist[0], 60_000),
                                          ("test", idx_mnist[1], 10_000)):
        source = tfds_source("mnist", split, data_dir=data_dir)
        assert isinstance(source, TfdsSource) and len(source) == size
        assert source.image_shape == (28, 28, 1) and source.num_classes == 10
        sample = np.concatenate([[0, size - 1], rng.choice(size, 300, replace=False)])
        one_by_one = [source[int(i)] for i in sample]
        for x, y in one_by_one:
            assert x.shape == (28, 28, 1) and x.dtype == np.float32
            assert y.shape == () and y.dtype == np.int32
        x, y = stack(one_by_one)
        rows = idx_positions(images, x)
        np.testing.assert_array_equal(x, images[rows])
        np.testing.assert_array_equal(y, labels[rows])
        # __getitems__ gives the same pairs, in the order asked, from one read.
        x2, y2 = stack(source.__getitems__(sample))
        np.testing.assert_array_equal(x2, x)
        np.testing.assert_array_equal(y2, y)
        # The order is tfds's own: the wrapper reorders nothing.
        raw = source.source[int(sample[2])]
        np.testing.assert_array_equal(x[2], raw["image"] / np.float32(255))
        assert y[2] == raw["label"]
    # The whole test split, read in random chunks: a permutation of the IDX rows.
    source = tfds_source("mnist", "test", data_dir=data_dir)
    order = rng.permutation(10_000)
    x, y = stack([pair for start in range(0, 10_000, 2048)
                  for pair in source.__getitems__(order[start:start + 2048])])
    rows = idx_positions(idx_mnist[1][0], x)
    assert np.array_equal(np.sort(rows), np.arange(10_000))
    np.testing.assert_array_equal(y, idx_mnist[1][1][rows])


def test_indices_as_for_a_list(prepared):
    source = tfds_source("mnist", "test", data_dir=prepared[0])
    last_x, last_y = source[9999]
    x, y = source[-1]
    np.testing.assert_array_equal(x, last_x)
    assert y == last_y
    assert source[np.int64(3)][1] == source[3][1]
    pairs = source.__getitems__(np.array([-1, 3, 3, 0]))
    assert [int(p[1]) for p in pairs] == [int(last_y), int(source[3][1]), int(source[3][1]),
                                          int(source[0][1])]
    assert source.__getitems__([]) == []
    for bad in (10_000, -10_001):
        with pytest.raises(IndexError, match=f"index {bad} is out of range for 10000"):
            source[bad]
        with pytest.raises(IndexError, match=f"index {bad} is out of range for 10000"):
            source.__getitems__([0, bad])
    with pytest.raises(TypeError, match="an index must be an integer, got 1.5"):
        source[1.5]
    with pytest.raises(TypeError, match="1-D sequence of integer indices, got float64"):
        source.__getitems__([0.0, 1.0])
    first = list(itertools.islice(iter(source), 3))  # iteration as for a sequence
    assert [int(y) for _, y in first] == [int(source[i][1]) for i in range(3)]
    assert "10000 examples" in repr(source) and "10 classes" in repr(source)


def test_unscaled_images_and_split_slices(prepared):
    source = tfds_source("mnist", "train", data_dir=prepared[0])
    raw = tfds_source("mnist", "train[:1000]", data_dir=prepared[0], scale=False)
    assert len(raw) == 1000 and raw.split == "train[:1000]"
    x, y = raw[999]
    assert x.dtype == np.uint8 and x.shape == (28, 28, 1)
    np.testing.assert_array_equal(x / np.float32(255), source[999][0])
    tail = tfds_source("mnist", "train[59000:]", data_dir=prepared[0])
    assert len(tail) == 1000 and tail[0][1] == source[59000][1]


def test_without_tensorflow_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r'tfds_source needs tensorflow-datasets, .*'
                                          r'pip install "jaxnn\[tfds\]"'):
        tfds_source("mnist", "train")


def test_without_an_image_decoder_says_what_to_install(prepared, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow or OpenCV .* pip install pillow"):
        tfds_source("mnist", "train", data_dir=prepared[0])


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    import_tfds()
    empty = tmp_path / "tfds"
    with pytest.raises(DatasetUnavailableError) as err:
        tfds_source("fashion_mnist", "train", data_dir=empty)
    text = str(err.value)
    assert f"fashion_mnist is not prepared in tensorflow-datasets' data dir {empty}" in text
    assert ("tfds.builder('fashion_mnist', data_dir=" + repr(str(empty)) +
            ").download_and_prepare(file_format='array_record')") in text
    assert "download=True" in text
    assert "manual_dir=<a folder with t10k-images-idx3-ubyte.gz," in text
    assert not empty.exists()  # nothing was written


def test_failed_preparation_names_the_cause(tmp_path, monkeypatch):
    tfds = import_tfds()

    def no_network(self, **kwargs):
        assert kwargs["file_format"] == "array_record"
        raise ConnectionError("Failed to resolve 'fashion-mnist.s3-website'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(DatasetUnavailableError) as err:
        tfds_source("fashion_mnist", "train", data_dir=tmp_path, download=True)
    text = str(err.value)
    assert "tensorflow-datasets could not prepare fashion_mnist" in text
    assert "ConnectionError: Failed to resolve 'fashion-mnist.s3-website'" in text
    assert "download_and_prepare(file_format='array_record')" in text


def test_bad_manual_dir_is_reported_before_preparing(mnist_dir, tmp_path):
    import_tfds()
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in NAMES[:3]:
        shutil.copy(mnist_dir / name, manual / name)
    (manual / NAMES[0]).write_bytes(b"not the images")
    with pytest.raises(DatasetUnavailableError) as err:
        tfds_source("mnist", "train", data_dir=tmp_path / "tfds", manual_dir=manual)
    text = str(err.value)
    assert f"manual_dir {manual} cannot be used to prepare mnist offline" in text
    assert f"{NAMES[3]}: missing (tfds would download it from https://" in text
    assert f"{NAMES[0]}: sha256 " in text
    assert NAMES[1] not in text and NAMES[2] not in text
    assert not (tmp_path / "tfds" / "mnist").exists()


def test_missing_keys_list_the_features(prepared):
    with pytest.raises(ValueError) as err:
        tfds_source("mnist", "train", data_dir=prepared[0], image_key="pixels")
    assert ("image_key='pixels' is not a feature of mnist; its examples have the keys "
            "'image', 'label'") in str(err.value)
    with pytest.raises(ValueError, match="label_key='digit' is not a feature of mnist"):
        tfds_source("mnist", "train", data_dir=prepared[0], label_key="digit")


class Spy:
    """A source that records the indices it is asked for (and is not a TfdsSource)."""

    def __init__(self, source):
        self.source, self.calls = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.calls.append([i])
        return self.source[i]

    def __getitems__(self, indices):
        self.calls.append(list(indices))
        return self.source.__getitems__(indices)


def test_fit_trains_the_mlp_streamed_from_the_source(prepared, idx_mnist):
    train = Spy(tfds_source("mnist", "train[:8192]", data_dir=prepared[0]))
    x_test, y_test = idx_mnist[1][0][:2000], idx_mnist[1][1][:2000]
    model = jaxnn.Sequential([jaxnn.Flatten(), jaxnn.Dense(64), jaxnn.relu, jaxnn.Dense(64),
                              jaxnn.relu, jaxnn.Dense(10)])
    key = jax.random.key(0)
    params = model.init(key, x_test[:1])
    result = jaxnn.fit(model, params, train, loss="sparse_softmax_cross_entropy",
                       optimizer=optax.adam(1e-3), key=key, epochs=1, batch_size=64,
                       verbose=0)
    assert max(map(len, train.calls)) > 64  # many examples per __getitems__ call
    read = np.concatenate(train.calls)
    assert np.array_equal(np.unique(read), np.arange(8192))  # every example, none else
    test = jaxnn.evaluate(model, result.params, x_test, y_test,
                          loss="sparse_softmax_cross_entropy")
    assert result.history["loss"][0] < 1.0 and test["accuracy"] > 0.8, (result.history, test)


def load_example():
    spec = importlib.util.spec_from_file_location("train_tfds_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_offline_on_mnist(prepared, capsys):
    data_dir, mnist_dir = prepared
    summary = load_example().main([
        "--dataset", "mnist", "--data-dir", str(data_dir), "--manual-dir", str(mnist_dir),
        "--no-download", "--epochs", "1", "--train-limit", "4096", "--test-limit", "1000",
        "--no-compile-cache", "--quiet", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_accuracy"] == summary["test_accuracy"]
    assert summary["source"] == "tensorflow-datasets" and summary["input_shape"] == [28, 28, 1]
    assert summary["train_examples"] == 3687 and summary["validation_examples"] == 409
    assert summary["test_examples"] == 1000 and summary["epochs"] == 1
    assert summary["test_accuracy"] > 0.8, summary


def test_example_says_how_to_get_an_unprepared_dataset(tmp_path, capsys):
    import_tfds()
    with pytest.raises(SystemExit) as exit_:
        load_example().main(["--data-dir", str(tmp_path / "tfds"), "--no-download",
                             "--no-compile-cache"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fashion_mnist is not prepared") and err.count("\n") == 1
    assert "download_and_prepare(file_format='array_record')" in err
    assert "--manual-dir DIR" in err
