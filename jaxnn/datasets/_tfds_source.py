"""A tensorflow-datasets split as a random-access source of ``(x, y)`` examples.

``tfds_source(name, split)`` opens a dataset that tensorflow-datasets has prepared in
its ArrayRecord format (the format its random-access ``tfds.data_source`` reads) and
returns a ``TfdsSource``: ``len(source)`` examples, ``source[i]`` one ``(x_i, y_i)`` pair
of numpy values, and ``source.__getitems__(indices)`` a list of them, read through the
underlying ``__getitems__`` in one call. That is the random-access source ``jaxnn.fit``
streams from (``x=source, y=None``): it draws the order itself and asks for thousands
of examples at a time.

Only reading needs tensorflow-datasets (with Pillow or OpenCV to decode images);
preparing a dataset also needs TensorFlow. Both come with ``pip install "jaxnn[tfds]"``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxnn.datasets._idx import DatasetError
from jaxnn.datasets._mnist import DatasetUnavailableError, _sha256

__all__ = ["TfdsSource", "tfds_source"]

_ARRAY_RECORD = "array_record"
_INSTALL = 'pip install "jaxnn[tfds]"'


class TfdsSource:
    """One split of a prepared tensorflow-datasets dataset, read example by example.

    Made by :func:`tfds_source`. ``source[i]`` is the pair ``(x_i, y_i)``:

    - ``x_i``: the image, shape as the dataset stores it, e.g. (28, 28, 1) for MNIST
      or (32, 32, 3) for CIFAR-10; float32 in [0, 1] when made with ``scale=True``
      (integer pixels divided by their type's maximum, 255 for uint8), else as stored;
    - ``y_i``: the label, a numpy int32 scalar (labels of a non-integer type as stored).

    Negative indices count from the end, as for a list; an index outside
    ``[-len, len)`` is an ``IndexError``. The order is the one tfds wrote the split in
    (it shuffles examples once, deterministically, when it prepares a dataset).

    Attributes:
      name, split: the dataset and split, as given to :func:`tfds_source`.
      info: tfds's ``DatasetInfo`` (features, splits, citation, ...).
      image_shape: the image feature's shape, e.g. ``(28, 28, 1)`` (``None`` for a
        side that varies between examples).
      num_classes: the label feature's number of classes, or ``None`` if it is not a
        class label.
      source: the underlying tfds data source, whose examples are dicts.
    """

    def __init__(self, source, *, name: str, split: str, info, image_key: str,
                 label_key: str, scale: bool):
        self.source = source
        self.name = name
        self.split = split
        self.info = info
        self._image_key = image_key
        self._label_key = label_key
        self._scale = scale
        self._len = len(source)
        image, label = info.features[image_key], info.features[label_key]
        self.image_shape = tuple(getattr(image, "shape", ()) or ())
        self.num_classes = getattr(label, "num_classes", None)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        kind = "float32 in [0, 1]" if self._scale else "as stored"
        classes = "" if self.num_classes is None else f", {self.num_classes} classes"
        return (f"TfdsSource({self.name!r}, split={self.split!r}: {self._len} examples, "
                f"images {self.image_shape} {kind}{classes})")

    def _pair(self, example: dict) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(example[self._image_key])
        if self._scale:
            if np.issubdtype(x.dtype, np.integer):
                x = np.divide(x, np.float32(np.iinfo(x.dtype).max), dtype=np.float32)
            else:
                x = x.astype(np.float32, copy=False)
        y = np.asarray(example[self._label_key])
        if y.dtype.kind in "biu":
            y = y.astype(np.int32)
        return x, y

    def __getitem__(self, index) -> tuple[np.ndarray, np.ndarray]:
        """The example at ``index`` (an int) as ``(x, y)``."""
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"{self.name} {self.split}: an index must be an integer, got "
                            f"{index!r}; use __getitems__(indices) for many") from None
        if not -self._len <= i < self._len:
            raise IndexError(f"{self.name} {self.split}: index {i} is out of range for "
                             f"{self._len} examples")
        return self._pair(self.source[i % self._len])

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> list:
        """The examples at ``indices`` (a list or 1-D array of ints), as ``(x, y)`` pairs.

        One call to the underlying source's ``__getitems__``, which reads the
        records together; ``[source[i] for i in indices]`` gives the same pairs.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            return []
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{self.name} {self.split}: __getitems__ takes a 1-D sequence of "
                            f"integer indices, got {idx.dtype} of shape {idx.shape}")
        low, high = int(idx.min()), int(idx.max())
        if low < -self._len or high >= self._len:
            bad = low if low < -self._len else high
            raise IndexError(f"{self.name} {self.split}: index {bad} is out of range for "
                             f"{self._len} examples")
        keys = np.where(idx < 0, idx + self._len, idx).tolist()
        many = getattr(self.source, "__getitems__", None)
        examples = many(keys) if many is not None else [self.source[k] for k in keys]
        return [self._pair(example) for example in examples]


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"tfds_source needs tensorflow-datasets, which cannot be imported ({err}): "
            f"{_INSTALL}"
        ) from err
    return tfds


def _check_image_decoder(name: str, feature, tfds) -> None:
    """tfds decodes images with OpenCV or Pillow when reading without TensorFlow; fail
    here, before any reading, when neither is installed."""
    if not isinstance(feature, tfds.features.Image):
        return
    for module in ("cv2", "PIL"):
        try:
            __import__(module)
            return
        except ImportError:
            pass
    raise ImportError(f"tfds_source({name!r}) needs Pillow or OpenCV to decode the images, "
                      "and neither is installed: pip install pillow (or "
                      "opencv-python-headless, which tfds decodes with about twice as fast)")


def _downloads(builder) -> list[tuple[str, str, str]]:
    """``(file name, url, sha256)`` of each file tfds downloads to prepare ``builder``'s
    dataset, as tfds registers them (empty when it registers none)."""
    return sorted((info.filename or url.rstrip("/").rsplit("/", 1)[-1], url, info.checksum)
                  for url, info in (builder.url_infos or {}).items())


def _check_manual_dir(builder, manual_dir: Path) -> None:
    """Every file tfds would download must be in ``manual_dir`` with its registered
    sha256: tfds downloads any file it does not find there, so a gap here would reach
    for the network instead of failing."""
    problems = []
    for filename, url, checksum in _downloads(builder):
        path = manual_dir / filename
        if not path.is_file():
            problems.append(f"{filename}: missing (tfds would download it from {url})")
        elif checksum and (digest := _sha256(path)) != checksum:
            problems.append(f"{filename}: sha256 {digest} is not the expected {checksum}")
    if problems:
        raise DatasetUnavailableError(
            f"manual_dir {manual_dir} cannot be used to prepare {builder.name} offline ("
            + "; ".join(problems) + ")")


def _files_wanted(builder) -> str:
    names = [filename for filename, _, _ in _downloads(builder)]
    return ", ".join(names) if names else "the files tfds would download"


def _prepare_command(name: str, data_dir) -> str:
    where = "" if data_dir is None else f", data_dir={os.fspath(data_dir)!r}"
    return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder({name!r}{where})"
            f".download_and_prepare(file_format='{_ARRAY_RECORD}')\"")


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    scale: bool = True,
) -> TfdsSource:
    """One split of a tensorflow-datasets dataset as a random-access source of ``(x, y)``.

    Example::

        train = jaxnn.datasets.tfds_source("fashion_mnist", "train", download=True)
        x0, y0 = train[0]                      # (28, 28, 1) float32 in [0, 1], int32
        pairs = train.__getitems__([5, 1, 9])  # three (x, y) pairs, one read
        jaxnn.fit(model, params, train, loss="sparse_softmax_cross_entropy", ...)

    The dataset is read from tfds's ``data_dir`` as ``tfds.data_source`` reads it
    (ArrayRecord files, random access, no TensorFlow). If it is not prepared there
    yet, it is prepared in the ArrayRecord format (``download_and_prepare(file_format=
    "array_record")``, which needs TensorFlow): offline from ``manual_dir`` when
    given, else by downloading only if ``download`` is true.

    Args:
      name: a tfds dataset name, e.g. ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``
        (``"name/config:version"`` forms work too).
      split: e.g. ``"train"``, ``"test"``, or a slice such as ``"train[:90%]"`` or
        ``"train[54000:]"`` (tfds's split syntax).
      data_dir: tfds's folder of prepared datasets; default ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.
      manual_dir: a folder holding the files tfds would download (for MNIST, the four
        ``.gz`` IDX files); each is checked against the sha256 tfds registers for it
        before preparing, so nothing is fetched from the network.
      download: let tfds download the files and prepare the dataset when it is not
        prepared and no ``manual_dir`` is given.
      image_key, label_key: the features taken as ``x`` and ``y``.
      scale: ``x`` as float32 in [0, 1] (integer images divided by their type's
        maximum); ``False``: ``x`` as stored (uint8 for most image datasets).

    Returns:
      A :class:`TfdsSource`: ``len(source)`` examples, ``source[i] -> (x_i, y_i)`` and
      ``source.__getitems__(indices) -> [(x, y), ...]``.

    Raises:
      ImportError: tensorflow-datasets, or an image decoder (Pillow or OpenCV), is not
        installed.
      DatasetUnavailableError: the dataset is not prepared and ``download`` is false
        with no ``manual_dir`` (the message says how to prepare it), or ``manual_dir``
        lacks a file, or preparing it failed.
      DatasetError: the dataset is prepared in ``data_dir`` only in a format without
        random access (TFRecord, what ``tfds.load`` writes by default).
      ValueError: ``image_key`` or ``label_key`` is not a feature of the dataset (the
        message lists its features), or tfds does not know ``name`` or ``split``.
    """
    tfds = _import_tfds()
    # No file_format here: tfds refuses to build a builder for a format other than the
    # one a dataset is prepared in, and that case deserves the clearer error below.
    builder = tfds.builder(
        name, data_dir=None if data_dir is None else os.fspath(Path(data_dir).expanduser()))
    features = builder.info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    for argument, key in (("image_key", image_key), ("label_key", label_key)):
        if key not in keys:
            supervised = builder.info.supervised_keys
            hint = f" (its supervised keys are {supervised})" if supervised else ""
            raise ValueError(f"tfds_source: {argument}={key!r} is not a feature of {name}; its "
                             f"examples have the keys {', '.join(map(repr, keys))}{hint}")
    _check_image_decoder(name, features[image_key], tfds)

    if not builder.is_prepared():
        if manual_dir is None and not download:
            raise DatasetUnavailableError(
                f"{name} is not prepared in tensorflow-datasets' data dir {builder.data_path} "
                f"and download=False. Prepare it once, with network: "
                f"{_prepare_command(name, data_dir)} (or pass download=True); or pass "
                f"manual_dir=<a folder with {_files_wanted(builder)}> to prepare it offline.")
        config = None
        if manual_dir is not None:
            manual_dir = Path(manual_dir).expanduser()
            _check_manual_dir(builder, manual_dir)
            config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
        try:
            builder.download_and_prepare(file_format=_ARRAY_RECORD, download_config=config)
        except Exception as err:  # network, TensorFlow missing, checksum, disk: say which
            if isinstance(err, ImportError):
                how = f" Preparing a dataset needs TensorFlow: {_INSTALL}."
            elif manual_dir is None:
                how = f" Prepare it with: {_prepare_command(name, data_dir)}"
            else:
                how = ""
            raise DatasetUnavailableError(
                f"tensorflow-datasets could not prepare {name} in {builder.data_path}: "
                f"{type(err).__name__}: {err}.{how}") from err

    formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
    if _ARRAY_RECORD not in formats:
        raise DatasetError(
            f"{name} is prepared in {builder.data_path} as {', '.join(sorted(formats))} only "
            f"(tfds.load's default), which has no random access; tfds_source reads "
            f"{_ARRAY_RECORD}. Pass another data_dir to prepare it there in {_ARRAY_RECORD}, "
            f"or delete {builder.data_path} and prepare it again.")
    source = builder.as_data_source(split=split, file_format=_ARRAY_RECORD)
    return TfdsSource(source, name=name, split=split, info=builder.info, image_key=image_key,
                      label_key=label_key, scale=scale)
