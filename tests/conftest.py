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

# One persistent XLA compilation cache for the whole run, shared with the subprocesses
# the tests start (through the environment): many tests compile the same programs
# (fit builds its programs afresh on every call), and a program compiled once is then
# loaded from disk. A fresh folder per run unless JAXNN_TEST_COMPILATION_CACHE names one.
# Measured on tests/test_training.py and tests/test_population.py: 119 s of CPU time
# without it, 78 s with it (cold cache).
_KEEP_CACHE = bool(os.environ.get("JAXNN_TEST_COMPILATION_CACHE"))
_COMPILATION_CACHE = os.environ.get("JAXNN_TEST_COMPILATION_CACHE") or tempfile.mkdtemp(
    prefix="jaxnn-tests-xla-cache-")
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
    """Remove the run's compilation cache (unless the user named a folder to keep)."""
    if not _KEEP_CACHE:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
