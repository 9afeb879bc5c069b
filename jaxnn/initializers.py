"""Parameter initializers.

Each factory returns ``init(key, shape, dtype) -> array``, the same calling
convention as :mod:`jax.nn.initializers`, so either can be passed to a layer.

Fans: for a kernel of shape ``(in, out)``, ``fan_in = in`` and ``fan_out = out``;
for a convolution kernel in HWIO layout ``(*window, in, out)``, both are
multiplied by the window size ``prod(window)``; for a vector, both are its length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxnn._typing import Array, DTypeLike, PRNGKey

Initializer = Callable[[PRNGKey, Sequence[int], DTypeLike], Array]

__all__ = [
    "Initializer",
    "compute_fans",
    "zeros",
    "ones",
    "constant",
    "normal",
    "uniform",
    "glorot_uniform",
    "glorot_normal",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
    "orthogonal",
]


def compute_fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel shape (see the module docstring)."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def zeros() -> Initializer:
    """All zeros."""
    return lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)


def ones() -> Initializer:
    """All ones."""
    return lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype)


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``."""
    return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def normal(stddev: float = 0.05, mean: float = 0.0) -> Initializer:
    """Independent draws from N(mean, stddev^2)."""

    def init(key, shape, dtype=jnp.float32):
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


def uniform(minval: float = -0.05, maxval: float = 0.05) -> Initializer:
    """Independent draws from U(minval, maxval)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval, maxval)

    return init


def _scaled_uniform(variance: Callable[[int, int], float]) -> Initializer:
    # U(-a, a) has variance a^2 / 3, so a = sqrt(3 * variance).
    def init(key, shape, dtype=jnp.float32):
        limit = math.sqrt(3.0 * variance(*compute_fans(shape)))
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def _scaled_normal(variance: Callable[[int, int], float]) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return math.sqrt(variance(*compute_fans(shape))) * jax.random.normal(key, shape, dtype)

    return init


def glorot_uniform() -> Initializer:
    """Glorot (Xavier) uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    return _scaled_uniform(lambda fan_in, fan_out: 2.0 / (fan_in + fan_out))


def glorot_normal() -> Initializer:
    """Glorot (Xavier) normal: N(0, 2 / (fan_in + fan_out))."""
    return _scaled_normal(lambda fan_in, fan_out: 2.0 / (fan_in + fan_out))


def he_uniform() -> Initializer:
    """He (Kaiming) uniform: U(-a, a) with a = sqrt(6 / fan_in)."""
    return _scaled_uniform(lambda fan_in, fan_out: 2.0 / fan_in)


def he_normal() -> Initializer:
    """He (Kaiming) normal: N(0, 2 / fan_in)."""
    return _scaled_normal(lambda fan_in, fan_out: 2.0 / fan_in)


def lecun_normal() -> Initializer:
    """LeCun normal: N(0, 1 / fan_in)."""
    return _scaled_normal(lambda fan_in, fan_out: 1.0 / fan_in)


xavier_uniform = glorot_uniform
xavier_normal = glorot_normal
kaiming_uniform = he_uniform
kaiming_normal = he_normal


def orthogonal(gain: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``gain``.

    The shape is viewed as ``(prod(shape[:-1]), shape[-1])``; the result has
    orthonormal columns (or rows, when there are fewer rows than columns).
    It is the Q factor of the QR decomposition of a standard normal matrix,
    with column signs fixed by the signs of R's diagonal so that it is
    uniformly distributed.
    """

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"orthogonal initializer needs a shape of rank >= 2, got {shape}")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32)
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diag(r))
        if rows < cols:
            q = q.T
        return (gain * q).reshape(shape).astype(dtype)

    return init
