"""Shared fixtures.

Tests that need float64 (gradient checks, comparisons with numpy references)
use the ``x64`` fixture, which turns on ``jax_enable_x64`` for that test only.
"""

import os
import pathlib

import jax
import pytest

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
