"""Image-classification datasets: MNIST, and scikit-learn's 8x8 digits as an offline fallback.

``mnist()`` tries its sources in a fixed order and reports which one it used:

1. a folder holding the four standard IDX files, given as ``data_dir`` or by the
   environment variable ``JAXNN_DATA_DIR``. A folder given this way is the only
   source tried: its files are checked by structure (IDX header, sizes, label
   range, matching counts) and any problem is an error naming the file;
2. the user cache, ``$XDG_CACHE_HOME/jaxnn/mnist`` (default ``~/.cache/jaxnn/mnist``),
   whose files are checked against their published sha256 digests; missing or
   mismatching files are downloaded (``download=True``) from public mirrors,
   verified, and moved into place atomically;
3. tensorflow-datasets, when it is installed (it needs TensorFlow): MNIST as tfds has
   prepared it in ``tfds_data_dir``; if not yet prepared, tfds prepares it there, offline
   from the four ``.gz`` files in ``tfds_manual_dir`` when that is given, else by
   downloading them itself (``download=True``).

When no source works, ``DatasetUnavailableError`` lists every source tried, why
it failed, and how to supply the files. ``digits()`` loads the small dataset
bundled with scikit-learn, so an example can still run with no files and no
network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxnn.datasets._idx import DatasetError, _read_idx

__all__ = ["Dataset", "DatasetUnavailableError", "default_cache_dir", "digits", "mnist"]

# The four files of the original release, as they are usually named.
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# sha256 of the canonical gzipped files (the same digests tensorflow-datasets registers).
MNIST_SHA256 = {
    TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

DATA_DIR_ENV = "JAXNN_DATA_DIR"
MNIST_NAME = "MNIST"
DIGITS_NAME = "digits (scikit-learn 8x8)"

# A mirror that sends more than this is not sending MNIST (the largest file is ~9.9 MB).
_MAX_DOWNLOAD_BYTES = 64 * 2**20


class DatasetUnavailableError(DatasetError):
    """No source could provide the dataset; the message lists each source and why it failed."""


class Dataset(NamedTuple):
    """A train/test split of an image-classification dataset, with where it came from.

    Attributes:
      x_train: float32 images in [0, 1], shape (N_train, H, W), or (N_train, H*W) if flattened.
      y_train: int32 labels in [0, num_classes), shape (N_train,).
      x_test: float32 images, shape (N_test, H, W) or (N_test, H*W).
      y_test: int32 labels, shape (N_test,).
      name: the dataset, e.g. ``"MNIST"`` or ``"digits (scikit-learn 8x8)"``.
      source: which source gave it: ``"data_dir"``, ``"cache"``, ``"download"``,
        ``"tensorflow-datasets"`` or ``"scikit-learn"``.
      location: the folder, URL or loader the data came from.
      num_classes: the number of classes.

    ``(x_train, y_train), (x_test, y_test) = data.train, data.test`` splits it the
    Keras way; ``data.info()`` is a JSON-ready summary without the arrays.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    source: str
    location: str
    num_classes: int

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    def info(self) -> dict[str, Any]:
        """Name, source, location, sizes and shapes as plain JSON-serialisable values."""
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "num_classes": self.num_classes,
            "train_size": int(self.x_train.shape[0]),
            "test_size": int(self.x_test.shape[0]),
            "input_shape": list(self.x_train.shape[1:]),
        }


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxnn/mnist``, or ``~/.cache/jaxnn/mnist`` when that is unset."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "jaxnn" / "mnist"


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Write the body of ``url`` to ``dest``. Tests replace this function to stay offline."""
    request = urllib.request.Request(url, headers={"User-Agent": "jaxnn"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
        total = 0
        while chunk := response.read(1 << 16):
            total += len(chunk)
            if total > _MAX_DOWNLOAD_BYTES:
                raise ValueError(f"response larger than {_MAX_DOWNLOAD_BYTES} bytes")
            f.write(chunk)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _download(name: str, cache: Path, mirrors: Sequence[str], timeout: float) -> str:
    """Fetch ``name`` into ``cache`` from the first mirror whose copy has the right sha256.

    The bytes go to a temporary file in ``cache`` that is checked and then moved
    into place with ``os.replace``; nothing is left behind on failure.
    Returns the URL used.
    """
    expected = MNIST_SHA256[name]
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp, timeout)
            digest = _sha256(tmp)
            if digest != expected:
                errors.append(f"{url}: sha256 {digest} is not the expected {expected}")
                continue
            os.replace(tmp, cache / name)
            return url
        except (OSError, http.client.HTTPException, ValueError) as err:
            errors.append(f"{url}: {type(err).__name__}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetError(f"could not download {name}: " + "; ".join(errors))


def _find_in_dir(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each standard file name to its path in ``folder``; also list the missing ones.

    Accepts ``train-images-idx3-ubyte`` with or without ``.gz`` and the dotted
    ``train-images.idx3-ubyte`` variants.
    """
    found, missing = {}, []
    for name in MNIST_FILES:
        stem = name.removesuffix(".gz")
        dotted = stem.replace("-idx", ".idx")
        candidates = (name, stem, dotted + ".gz", dotted)
        path = next((folder / c for c in candidates if (folder / c).is_file()), None)
        if path is None:
            missing.append(f"{stem}[.gz]")
        else:
            found[name] = path
    return found, missing


def _check_split(images: np.ndarray, labels: np.ndarray, image_src: str, label_src: str) -> None:
    """Check that images are (N, 28, 28) uint8 and labels are (N,) in 0..9."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{image_src}: expected MNIST images, uint8 of shape (N, 28, 28) (IDX magic 2051), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{label_src}: expected MNIST labels, integers of shape (N,) (IDX magic 2049), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_src} holds {len(images)} images but {label_src} holds "
            f"{len(labels)} labels; the files do not belong together"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(
            f"{label_src}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
        )


def _load_files(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    arrays = {name: _read_idx(path, copy=False) for name, path in files.items()}
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        _check_split(arrays[images], arrays[labels], str(files[images]), str(files[labels]))
    return tuple(arrays[name] for name in MNIST_FILES)


def _check_manual_dir(folder: Path) -> None:
    """Check that ``folder`` holds the four ``.gz`` files, each with its published sha256.

    tensorflow-datasets looks for exactly these names in its manual dir and downloads any
    file it does not find there, so a gap here would silently reach for the network.
    """
    problems = []
    for name in MNIST_FILES:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (digest := _sha256(path)) != MNIST_SHA256[name]:
            problems.append(f"{name}: sha256 {digest} is not the expected {MNIST_SHA256[name]}")
    if problems:
        raise DatasetError(
            f"tfds_manual_dir {folder} cannot be used to prepare MNIST offline ("
            + "; ".join(problems)
            + "); it needs the four gzipped files under their standard names"
        )


def _tfds_mnist(
    download: bool, data_dir: Path | None = None, manual_dir: Path | None = None
) -> tuple[np.ndarray, ...]:
    """MNIST through tensorflow-datasets; raises ImportError when it is not installed.

    ``data_dir`` is tfds's folder of prepared datasets (its default when None). With
    ``manual_dir``, tfds prepares MNIST from the files there (checked first by
    ``_check_manual_dir``) without the network, whatever ``download`` says; without it,
    tfds downloads the files itself only if ``download`` is true.
    Only the options that are set are passed on to ``tfds.load``.
    """
    import tensorflow_datasets as tfds

    options: dict[str, Any] = {"download": download}
    if data_dir is not None:
        options["data_dir"] = os.fspath(data_dir)
    if manual_dir is not None:
        _check_manual_dir(manual_dir)
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
        options["download"] = True  # "download and prepare": the files are all local
        options["download_and_prepare_kwargs"] = {"download_config": config}
    train, test = tfds.as_numpy(
        tfds.load("mnist", split=["train", "test"], batch_size=-1, as_supervised=True, **options)
    )
    out = []
    for images, labels in (train, test):
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        out += [images, np.asarray(labels)]
    _check_split(out[0], out[1], "tensorflow-datasets mnist train images", "its labels")
    _check_split(out[2], out[3], "tensorflow-datasets mnist test images", "its labels")
    return tuple(out)


def _as_dataset(
    arrays: tuple[np.ndarray, ...],
    scale: float,
    flatten: bool,
    name: str,
    source: str,
    location: str,
    num_classes: int,
) -> Dataset:
    def images(x: np.ndarray) -> np.ndarray:
        x = np.divide(x, np.float32(scale), dtype=np.float32)
        return x.reshape(len(x), -1) if flatten else x

    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        images(x_train),
        y_train.astype(np.int32),
        images(x_test),
        y_test.astype(np.int32),
        name,
        source,
        location,
        num_classes,
    )


def _how_to_supply(cache: Path) -> str:
    names = ", ".join(MNIST_FILES)
    return (
        f"To supply MNIST, put the four files ({names}; gzipped or not) in a folder and pass "
        f"data_dir=<folder> (--data-dir in the examples) or set {DATA_DIR_ENV}=<folder>; "
        f"or copy the .gz files into {cache}; or allow the download (download=True) from "
        f"{' or '.join(MNIST_MIRRORS)}; "
        "or pip install tensorflow-datasets tensorflow-cpu importlib_resources (the jaxnn[tfds] "
        "extra) and pass tfds_manual_dir=<folder with the four .gz files> to prepare MNIST "
        "offline with tensorflow-datasets."
    )


def mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    flatten: bool = False,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 10.0,
    use_tfds: bool = True,
    tfds_data_dir: str | os.PathLike | None = None,
    tfds_manual_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load MNIST: 60,000 training and 10,000 test images of handwritten digits.

    Args:
      data_dir: a folder with ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (each may also be
        uncompressed, or named ``train-images.idx3-ubyte`` etc.). Defaults to the
        ``JAXNN_DATA_DIR`` environment variable. When a folder is given, it is the only
        source tried.
      flatten: return images as (N, 784) rows instead of (N, 28, 28).
      download: fetch missing or damaged cache files from the mirrors.
      cache_dir: the cache folder; default ``default_cache_dir()``.
      mirrors: base URLs to try in order, each followed by a file name.
      timeout: seconds to wait on each network operation.
      use_tfds: fall back to tensorflow-datasets if it is installed.
      tfds_data_dir: where tensorflow-datasets keeps prepared datasets; default its own
        (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``). MNIST prepared there once is
        read back on later calls without ``tfds_manual_dir`` or the network.
      tfds_manual_dir: a folder with the four gzipped files under their standard names
        (e.g. ``train-images-idx3-ubyte.gz``), each checked against its sha256 first;
        tensorflow-datasets prepares MNIST from them into ``tfds_data_dir`` without the
        network, even when ``download=False``. Only used when the sources before
        tensorflow-datasets fail (so give no ``data_dir``).

    Returns:
      A ``Dataset`` with ``x_train`` float32 (60000, 28, 28) = pixels / 255 in [0, 1],
      ``y_train`` int32 (60000,), ``x_test`` (10000, 28, 28), ``y_test`` (10000,),
      ``name="MNIST"`` and ``source``/``location`` saying where the data came from.
      tensorflow-datasets stores the examples in its own fixed shuffled order: the same
      images and labels as the files, in a different order.

    Raises:
      DatasetError: a file is corrupt or malformed (the message names it).
      DatasetUnavailableError: no source worked; the message lists each source,
        why it failed, and how to supply the files.

    Example::

        data = mnist(flatten=True)
        (x_train, y_train), (x_test, y_test) = data.train, data.test
        print(data.info())
    """
    origin = "data_dir"
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir, origin = os.environ[DATA_DIR_ENV], DATA_DIR_ENV
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def dataset(arrays: tuple[np.ndarray, ...], source: str, location: str) -> Dataset:
        return _as_dataset(arrays, 255.0, flatten, MNIST_NAME, source, location, 10)

    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        files, missing = _find_in_dir(folder)
        if missing:
            problem = "is not a folder" if not folder.is_dir() else "lacks " + ", ".join(missing)
            raise DatasetUnavailableError(
                f"MNIST data directory {folder} (from {origin}) {problem}.\n"
                + _how_to_supply(cache)
            )
        return dataset(_load_files(files), "data_dir", str(folder))

    failures = [
        ("data directory", f"none given (data_dir argument, --data-dir, or {DATA_DIR_ENV})")
    ]

    # The cache: every file present with the published sha256.
    bad = {}
    for name in MNIST_FILES:
        path = cache / name
        if not path.is_file():
            bad[name] = "missing"
        elif (digest := _sha256(path)) != MNIST_SHA256[name]:
            bad[name] = f"sha256 {digest} is not the expected {MNIST_SHA256[name]}"
    if not bad:
        return dataset(_load_files({n: cache / n for n in MNIST_FILES}), "cache", str(cache))
    failures.append((f"cache {cache}", "; ".join(f"{n}: {why}" for n, why in bad.items())))

    # Download what the cache lacks.
    if not download:
        failures.append(("download", "disabled (download=False)"))
    elif not mirrors:
        failures.append(("download", "no mirrors given"))
    else:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            urls = [_download(name, cache, mirrors, timeout) for name in bad]
        except (DatasetError, OSError) as err:
            failures.append(("download", str(err)))
        else:
            used = sorted({url.rsplit("/", 1)[0] + "/" for url in urls})
            location = f"{cache} (downloaded from {', '.join(used)})"
            files = {n: cache / n for n in MNIST_FILES}
            return dataset(_load_files(files), "download", location)

    if not use_tfds:
        failures.append(("tensorflow-datasets", "disabled (use_tfds=False)"))
    else:
        options: dict[str, Path] = {}
        location = "tensorflow_datasets.load('mnist')"
        if tfds_data_dir is not None:
            options["data_dir"] = Path(tfds_data_dir).expanduser()
            location = f"tensorflow_datasets.load('mnist', data_dir={str(options['data_dir'])!r})"
        if tfds_manual_dir is not None:
            options["manual_dir"] = Path(tfds_manual_dir).expanduser()
            location += f" with manual_dir {options['manual_dir']}"
        try:
            arrays = _tfds_mnist(download, **options)
        except ImportError as err:
            if err.name in (None, "tensorflow_datasets"):
                failures.append(("tensorflow-datasets", f"not installed ({err})"))
            else:  # e.g. TensorFlow, which tfds imports only to prepare a dataset
                why = f"installed, but a module it needs is missing: {err.name} ({err})"
                failures.append(("tensorflow-datasets", why))
        except Exception as err:  # tfds fails in many ways (network, TF, prepare errors)
            failures.append(("tensorflow-datasets", f"{type(err).__name__}: {err}"))
        else:
            return dataset(arrays, "tensorflow-datasets", location)

    lines = [f"  {i}. {src}: {why}" for i, (src, why) in enumerate(failures, 1)]
    raise DatasetUnavailableError(
        "MNIST could not be loaded from any source:\n"
        + "\n".join(lines)
        + "\n"
        + _how_to_supply(cache)
    )


def digits(*, flatten: bool = False, test_fraction: float = 0.2, seed: int | None = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), split into train and test.

    Works offline: the data ships with scikit-learn. A stand-in for MNIST when its
    files cannot be had; far smaller and easier, so accuracies do not compare.

    Args:
      flatten: return images as (N, 64) rows instead of (N, 8, 8).
      test_fraction: share of the images held out for testing, in (0, 1).
      seed: images are shuffled by ``np.random.default_rng(seed).permutation`` before the
        split; ``None`` keeps the original order and takes the last images as the test set.

    Returns:
      A ``Dataset`` with float32 images = pixel / 16 in [0, 1] (the raw values are 0..16),
      int32 labels in 0..9, ``name="digits (scikit-learn 8x8)"`` and
      ``source="scikit-learn"``. With the defaults: 1,438 training and 359 test images.

    Raises:
      ImportError: scikit-learn is not installed.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"digits: test_fraction must lie in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "digits() needs scikit-learn, which is not installed: pip install scikit-learn"
        ) from err
    bunch = load_digits()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target)
    n = len(labels)
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    train, test = order[: n - n_test], order[n - n_test :]
    arrays = (images[train], labels[train], images[test], labels[test])
    import sklearn

    location = f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})"
    return _as_dataset(arrays, 16.0, flatten, DIGITS_NAME, "scikit-learn", location, 10)
