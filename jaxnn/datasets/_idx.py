"""Read and write IDX files, the array format of the MNIST release.

An IDX file is a header followed by the raw array, all big-endian::

    bytes 0-1   zero
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64
    byte  3     number of dimensions, ndim
    4 * ndim    the dimensions, each an unsigned 32-bit integer
    rest        prod(dims) elements, row-major

So the MNIST images start with the magic number 2051 (0x00000803: uint8, 3-D)
and the labels with 2049 (0x00000801: uint8, 1-D). A file may be gzipped as a
whole; gzip is recognised by its magic bytes 1f 8b, not by the file name.

The reader is strict: the payload must hold exactly prod(dims) elements (a
truncated file and trailing bytes are both errors), a damaged gzip stream is an
error, and every error names the file. It never returns partial data.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DatasetError", "read_idx", "write_idx"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX element-type code -> big-endian numpy dtype.
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# numpy kind+size -> IDX code, for writing.
_DTYPE_TO_CODE: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()
}


class DatasetError(ValueError):
    """A data file is malformed, corrupt, or does not hold what was expected.

    The message names the file.
    """


def _decompress(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(
            f"{path}: corrupt gzip data ({type(err).__name__}: {err}); "
            "delete the file and fetch it again"
        ) from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array.

    Args:
      path: the file. Gzip compression is detected from the content.

    Returns:
      A new, writable array in native byte order with the file's shape and
      element type (uint8, int8, int16, int32, float32 or float64).

    Raises:
      DatasetError: the gzip stream is damaged, the header is invalid (bad
        magic, unknown type code, a shape numpy cannot represent: over 64
        dimensions, or say (0, 2**32-1, 2**32-1)), or the payload is not exactly
        prod(dims) * itemsize bytes long. The message names ``path``.
      FileNotFoundError: there is no such file.
    """
    return _read_idx(path, copy=True)


def _read_idx(path: str | os.PathLike, *, copy: bool) -> np.ndarray:
    """``read_idx``; with ``copy=False`` the result may be a read-only view of the file's bytes."""
    path = Path(path)
    raw = path.read_bytes()
    compressed = raw[:2] == _GZIP_MAGIC
    data = _decompress(raw, path) if compressed else raw
    what = "decompressed content" if compressed else "file"

    if len(data) < 4:
        raise DatasetError(
            f"{path}: not an IDX file: {what} is {len(data)} bytes, shorter than the 4-byte magic"
        )
    if data[0] != 0 or data[1] != 0 or data[2] not in _CODE_TO_DTYPE:
        magic = int.from_bytes(data[:4], "big")
        raise DatasetError(
            f"{path}: not an IDX file: magic number {magic} (0x{magic:08x}); expected bytes "
            "00 00 <type> <ndim> with type one of 08 09 0b 0c 0d 0e, "
            "e.g. 2051 for MNIST images and 2049 for labels"
        )
    dtype = _CODE_TO_DTYPE[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} header bytes, "
            f"the {what} has {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing bytes after the array"
        raise DatasetError(
            f"{path}: {problem}: header says shape {shape} of {dtype.newbyteorder('=').name} "
            f"({expected} payload bytes), the {what} has {actual} payload bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header)
    try:
        array = array.reshape(shape)
    except ValueError as err:  # numpy's limits: over 64 dimensions, or (0, 2**32-1, 2**32-1)
        raise DatasetError(
            f"{path}: header says {ndim} dimensions {shape}, which numpy cannot represent ({err})"
        ) from err
    return array.astype(dtype.newbyteorder("=")) if copy else array


def write_idx(path: str | os.PathLike, array, *, compress: bool | None = None) -> None:
    """Write ``array`` to ``path`` as an IDX file, atomically.

    The bytes go to a temporary file in the same folder, which then replaces
    ``path`` in one step (``os.replace``), so readers never see a half-written
    file.

    Args:
      path: the destination.
      array: anything ``np.asarray`` accepts with dtype uint8, int8, int16,
        int32, float32 or float64 (IDX has no other types), every dimension
        below 2**32 and at most 255 dimensions.
      compress: gzip the file; by default, when ``path`` ends in ``.gz``.

    Raises:
      TypeError: the dtype has no IDX type code.
      ValueError: too many dimensions or a dimension too large.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _DTYPE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(
            f"write_idx: IDX cannot store dtype {array.dtype}; "
            "use uint8, int8, int16, int32, float32 or float64"
        )
    if array.ndim > 255:
        raise ValueError(f"write_idx: IDX allows at most 255 dimensions, got {array.ndim}")
    if any(d >= 2**32 for d in array.shape):
        raise ValueError(f"write_idx: every dimension must be below 2**32, got {array.shape}")
    if compress is None:
        compress = path.suffix == ".gz"

    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    if compress:
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    _atomic_write_bytes(path, payload)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
