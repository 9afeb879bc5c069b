"""Shared fixtures.

Tests that need float64 (gradient checks, comparisons with numpy references)
use the ``x64`` fixture, which turns on ``jax_enable_x64`` for that test only.
"""

import os
import pathlib
import shutil
import tempfile

import jax
import pytest

# One persistent XLA compilation cache, kept from run to run and shared with the
# subprocesses the tests start (through the environment). Most of the suite's time is
# XLA compiling programs: every eager operation compiles one, and fit builds its programs
# afresh on every call. A program compiled once, in this run or an earlier one, is then
# loaded from disk; after a change, only the programs it changed compile again. Measured
# on 2 cores, the tests without the slow marker: 509 s of CPU with an empty cache, 156 s
# (2 min 47 s) on the next run; the whole suite's cache held 34 MB.
#
# Where: $JAXNN_TEST_COMPILATION_CACHE, else $XDG_CACHE_HOME/jaxnn/test-compilation-cache
# (~/.cache/...). JAXNN_TEST_COMPILATION_CACHE=fresh: a new folder for this run only,
# removed at its end (a cold run, as on a fresh CI machine). The kept folder is pruned to
# half of _CACHE_LIMIT_BYTES, oldest files first, when a run starts above the limit.
_CACHE_LIMIT_BYTES = 2 * 2**30


def _kept_cache_dir() -> pathlib.Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "jaxnn" / "test-compilation-cache"


def _prune(folder: pathlib.Path, limit: int) -> None:
    """Remove the oldest files of ``folder`` (by modification time) down to half of
    ``limit`` when it holds more than ``limit`` bytes."""
    files = [(entry.stat().st_mtime, entry.stat().st_size, entry)
             for entry in folder.iterdir() if entry.is_file()]
    total = sum(size for _, size, _ in files)
    if total <= limit:
        return
    for _, size, entry in sorted(files, key=lambda f: f[0]):
        if total <= limit // 2:
            break
        entry.unlink(missing_ok=True)
        total -= size


_WANTED = os.environ.get("JAXNN_TEST_COMPILATION_CACHE", "")
# pytest-xdist's workers inherit the folder their controller chose (and own nothing).
_INHERITED = "PYTEST_XDIST_WORKER" in os.environ and "JAX_COMPILATION_CACHE_DIR" in os.environ
_KEEP_CACHE = _WANTED != "fresh" or _INHERITED
if _INHERITED:
    _COMPILATION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
elif not _KEEP_CACHE:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="jaxnn-tests-xla-cache-")
else:
    _COMPILATION_CACHE = str(pathlib.Path(_WANTED).expanduser() if _WANTED
                             else _kept_cache_dir())
    os.makedirs(_COMPILATION_CACHE, mode=0o700, exist_ok=True)
    _prune(pathlib.Path(_COMPILATION_CACHE), _CACHE_LIMIT_BYTES)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (``jax_enable_x64``)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    """A fresh PRNG key."""
    return jax.random.key(0)


@pytest.fixture
def mnist_dir():
    """The real MNIST files in ../shared/data/mnist; skips with the reason when absent."""
    path = pathlib.Path(os.environ.get("JAXNN_TEST_MNIST", SHARED_MNIST))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST files not found in {path} (set JAXNN_TEST_MNIST)")
    return path


def pytest_sessionfinish(session, exitstatus):
    """Remove the run's compilation cache when it was a fresh one."""
    if not _KEEP_CACHE:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
