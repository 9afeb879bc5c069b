"""The IDX reader and writer: byte layout checked against headers built by hand, and every
corrupt-file case rejected with an error that names the file."""

import gzip
import os
import re
import struct

import numpy as np
import pytest

from jaxnn.datasets._idx import DatasetError, read_idx, write_idx

# dtype -> IDX type code, from the format description (big-endian payload).
CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The IDX encoding of ``array``, written out independently of jaxnn."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def sample(dtype, shape=(3, 4, 5)) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        x.flat[:2] = [info.min, info.max]
    else:
        x = rng.normal(size=shape).astype(dtype) * 1e3
        x.flat[:3] = [np.inf, -np.inf, np.nan]
    return x


def errors_naming(path):
    return pytest.raises(DatasetError, match=re.escape(str(path)))


@pytest.mark.parametrize("dtype", list(CODES), ids=lambda d: np.dtype(d).name)
def test_read_hand_built_file_each_dtype(tmp_path, dtype):
    x = sample(dtype)
    plain, packed = tmp_path / "x.idx", tmp_path / "x.idx.gz"
    plain.write_bytes(idx_bytes(x, CODES[dtype]))
    packed.write_bytes(gzip.compress(idx_bytes(x, CODES[dtype])))
    for path in (plain, packed):
        y = read_idx(path)
        assert y.dtype == np.dtype(dtype) and y.dtype.isnative
        assert y.shape == x.shape
        np.testing.assert_array_equal(y, x)
        assert y.flags.writeable


@pytest.mark.parametrize("dtype", list(CODES), ids=lambda d: np.dtype(d).name)
def test_write_matches_format_and_round_trips(tmp_path, dtype):
    x = sample(dtype)
    write_idx(tmp_path / "x.idx", x)
    write_idx(tmp_path / "x.idx.gz", x)
    assert (tmp_path / "x.idx").read_bytes() == idx_bytes(x, CODES[dtype])
    raw_gz = (tmp_path / "x.idx.gz").read_bytes()
    assert raw_gz[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw_gz) == idx_bytes(x, CODES[dtype])
    for name in ("x.idx", "x.idx.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), x)


def test_mnist_style_headers(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", np.array([3, 7], np.uint8))
    assert struct.unpack(">IIII", (tmp_path / "img").read_bytes()[:16]) == (2051, 2, 28, 28)
    assert struct.unpack(">II", (tmp_path / "lab").read_bytes()[:8]) == (2049, 2)


def test_gzip_detected_by_content_not_name(tmp_path):
    x = np.arange(12, dtype=np.int16).reshape(3, 4)
    write_idx(tmp_path / "packed.bin", x, compress=True)
    write_idx(tmp_path / "plain.gz", x, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.bin"), x)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), x)


def test_empty_and_one_dim_arrays(tmp_path):
    for x in (np.zeros((0, 28, 28), np.uint8), np.array([1.5, -2.0], np.float64)):
        write_idx(tmp_path / "x.gz", x)
        y = read_idx(tmp_path / "x.gz")
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(
    "head",
    [b"\x01\x00\x08\x01", b"\x00\x00\x0a\x01", b"\x00\x00\x07\x01", b"PK\x03\x04"],
    ids=["nonzero-first-byte", "unknown-type-0a", "unknown-type-07", "zip-file"],
)
def test_wrong_magic(tmp_path, head):
    path = tmp_path / "bad.idx"
    path.write_bytes(head + struct.pack(">I", 1) + b"\x00")
    with errors_naming(path) as err:
        read_idx(path)
    assert "magic" in str(err.value)


def test_too_short_for_magic_and_header(tmp_path):
    empty, short = tmp_path / "empty", tmp_path / "short"
    empty.write_bytes(b"")
    short.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 5))  # 3 dims, only one given
    with errors_naming(empty):
        read_idx(empty)
    with errors_naming(short) as err:
        read_idx(short)
    assert "header" in str(err.value)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_truncated_payload(tmp_path, compress):
    x = np.arange(60, dtype=np.int32).reshape(3, 20)
    data = idx_bytes(x, 0x0C)[:-1]  # one byte short
    path = tmp_path / "short.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    with errors_naming(path) as err:
        read_idx(path)
    assert "truncated" in str(err.value)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_trailing_bytes(tmp_path, compress):
    x = np.arange(6, dtype=np.uint8)
    data = idx_bytes(x, 0x08) + b"\x00"
    path = tmp_path / "long.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    with errors_naming(path) as err:
        read_idx(path)
    assert "trailing" in str(err.value)


def corrupt_gzip_cases():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    good = gzip.compress(idx_bytes(x, 0x08))
    mid = len(good) // 2
    flipped = bytearray(good)
    flipped[mid] ^= 0xFF
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0x01  # the CRC-32 is the trailer's first 4 bytes
    bad_size = bytearray(good)
    bad_size[-1] ^= 0x01  # ISIZE, the uncompressed length mod 2**32
    return {
        "flipped-deflate-byte": bytes(flipped),
        "truncated-stream": good[:mid],
        "truncated-trailer": good[:-3],
        "bad-crc": bytes(bad_crc),
        "bad-length": bytes(bad_size),
        "trailing-garbage": good + b"garbage!",
    }


@pytest.mark.parametrize("case", list(corrupt_gzip_cases()))
def test_corrupt_gzip(tmp_path, case):
    path = tmp_path / "corrupt.idx.gz"
    path.write_bytes(corrupt_gzip_cases()[case])
    with errors_naming(path):
        read_idx(path)


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


def test_write_rejects_types_idx_cannot_hold(tmp_path):
    for x in (np.arange(3, dtype=np.int64), np.array([True]), np.arange(3, dtype=np.uint16)):
        with pytest.raises(TypeError, match=str(x.dtype)):
            write_idx(tmp_path / "x.idx", x)
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.idx.gz"
    old = np.arange(5, dtype=np.uint8)
    write_idx(path, old)
    write_idx(path, old + 1)  # overwrite in place
    np.testing.assert_array_equal(read_idx(path), old + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx.gz"]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_idx(path, old + 2)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_idx(path), old + 1)  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx.gz"]  # no temp left behind
