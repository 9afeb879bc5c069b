"""Initializers: shapes, dtypes, and the variance each formula promises."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import initializers as inits

SHAPE = (400, 300)  # fan_in 400, fan_out 300; 120k draws pin the moments tightly


@pytest.mark.parametrize(
    "factory, variance",
    [
        (inits.glorot_uniform, 2 / (400 + 300)),
        (inits.glorot_normal, 2 / (400 + 300)),
        (inits.he_uniform, 2 / 400),
        (inits.he_normal, 2 / 400),
        (inits.lecun_normal, 1 / 400),
        (lambda: inits.normal(0.05), 0.05**2),
        (lambda: inits.uniform(-0.05, 0.05), 0.1**2 / 12),
    ],
)
def test_variance_matches_formula(factory, variance):
    w = np.asarray(factory()(jax.random.key(0), SHAPE, jnp.float32), np.float64)
    assert w.shape == SHAPE and abs(w.mean()) < 0.02 * math.sqrt(variance) * 10
    assert w.var() == pytest.approx(variance, rel=0.02)


def test_uniform_bounds():
    limit = math.sqrt(6 / 700)
    w = inits.glorot_uniform()(jax.random.key(1), SHAPE)
    assert float(jnp.max(jnp.abs(w))) <= limit
    assert float(jnp.max(jnp.abs(w))) > 0.99 * limit


def test_conv_fans_use_receptive_field():
    assert inits.compute_fans((3, 3, 16, 32)) == (3 * 3 * 16, 3 * 3 * 32)
    assert inits.compute_fans((5,)) == (5, 5)
    w = np.asarray(inits.he_normal()(jax.random.key(2), (5, 5, 32, 64)), np.float64)
    assert w.var() == pytest.approx(2 / (5 * 5 * 32), rel=0.03)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 2, 8)])
def test_orthogonal_is_orthogonal(shape):
    w = np.asarray(inits.orthogonal(gain=2.0)(jax.random.key(3), shape), np.float64)
    m = w.reshape(-1, shape[-1])
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    np.testing.assert_allclose(gram, 4.0 * np.eye(gram.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="rank >= 2"):
        inits.orthogonal()(jax.random.key(3), (4,))


def test_constants_and_dtypes():
    np.testing.assert_array_equal(inits.zeros()(None, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(inits.ones()(None, (2,)), np.ones(2))
    np.testing.assert_array_equal(inits.constant(0.5)(None, (2,)), np.full(2, 0.5))
    for factory in (inits.glorot_uniform, inits.he_normal, inits.orthogonal):
        assert factory()(jax.random.key(0), (4, 4), jnp.bfloat16).dtype == jnp.bfloat16
