"""The CPU-friendly derivatives: Conv's kernel gradient as products, MaxPool's by reshape.

References: ``lax.conv_general_dilated`` and ``lax.reduce_window`` with JAX's own
derivatives, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxnn.activations import relu
from jaxnn.layers import _conv_grad
from jaxnn.layers._conv_grad import _FEW_CHANNELS, conv_valid, patches
from jaxnn.layers._pool import _tiled_max


def _lax_conv(x, w):
    letters = "DHW"[3 - (x.ndim - 2):]
    dn = (f"N{letters}C", f"{letters}IO", f"N{letters}C")
    return lax.conv_general_dilated(x, w, (1,) * (x.ndim - 2), "VALID", dimension_numbers=dn)


SHAPES = [  # (x, kernel): 1-D, 2-D and 3-D; few input channels and many
    ((3, 9, 9, 1), (3, 3, 1, 4)),  # values as a fused loop (9 terms)
    ((2, 9, 9, 3), (4, 3, 3, 4)),  # values from the stacked taps (36 terms)
    ((2, 7, 8, _FEW_CHANNELS + 2), (3, 2, _FEW_CHANNELS + 2, 5)),
    ((2, 11, 3), (4, 3, 6)),
    ((2, 5, 6, 7, 9), (2, 3, 2, 9, 3)),
]


@pytest.mark.parametrize("x_shape, w_shape, patch_limit", [
    *((x, w, "default") for x, w in SHAPES),
    # Many channels with no patch matrix fitting: the per-tap products, as layers
    # whose patch matrix would exceed PATCHES_MAX_BYTES take.
    *((x, w, "none fit") for x, w in SHAPES if w[-2] >= _FEW_CHANNELS),
])
def test_conv_derivatives_equal_lax(x64, monkeypatch, x_shape, w_shape, patch_limit):
    if patch_limit == "none fit":
        monkeypatch.setattr(_conv_grad, "PATCHES_MAX_BYTES", 0)
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    tx = jax.random.normal(jax.random.key(2), x_shape)
    tw = jax.random.normal(jax.random.key(3), w_shape)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    np.testing.assert_allclose(conv_valid(x, w), _lax_conv(x, w), rtol=1e-12, atol=1e-12)
    got = jax.jit(jax.grad(loss(conv_valid), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(_lax_conv), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)
    # Only the kernel's gradient (the input's tangent is a symbolic zero).
    np.testing.assert_allclose(jax.grad(loss(conv_valid), argnums=1)(x, w), want[1],
                               rtol=1e-10, atol=1e-10)
    # Forward mode.
    got_t = jax.jvp(conv_valid, (x, w), (tx, tw))[1]
    want_t = jax.jvp(_lax_conv, (x, w), (tx, tw))[1]
    np.testing.assert_allclose(got_t, want_t, rtol=1e-10, atol=1e-10)


def test_patches_are_the_im2col_matrix(x64):
    # Reference: the definition, entry by entry, in numpy.
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 4, 3)))
    window = (3, 2)
    got = np.asarray(patches(jnp.asarray(x), window))
    assert got.shape == (2, 3, 3, 6 * 3)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                want = [x[n, i + di, j + dj, c] for di in range(3) for dj in range(2)
                        for c in range(3)]
                np.testing.assert_array_equal(got[n, i, j], want)


@pytest.mark.parametrize("channels", [2, _FEW_CHANNELS + 1])  # stacked taps; patches
def test_conv_hessian_equals_lax(x64, channels):
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, channels))
    w = jax.random.normal(jax.random.key(1), (2, 2, channels, 2))

    def loss(conv):
        return lambda w: jnp.sum(jnp.sin(conv(x, w)))

    np.testing.assert_allclose(jax.hessian(loss(conv_valid))(w), jax.hessian(loss(_lax_conv))(w),
                               rtol=1e-10, atol=1e-10)


def test_tiled_max_forward_mode_and_ties(x64):
    # Without ties: the derivative equals reduce_window's, in both modes, on ragged sizes.
    x = jnp.asarray(np.random.default_rng(0).permutation(2 * 7 * 9 * 3).reshape(2, 7, 9, 3),
                    jnp.float64) / 10
    tx = jax.random.normal(jax.random.key(1), x.shape)

    def general(x):
        return lax.reduce_window(x, -np.inf, lax.max, (1, 2, 3, 1), (1, 2, 3, 1), "VALID")

    def tiled(x):
        return _tiled_max(x, (2, 3))

    np.testing.assert_array_equal(tiled(x), general(x))
    np.testing.assert_allclose(jax.jvp(tiled, (x,), (tx,))[1], jax.jvp(general, (x,), (tx,))[1],
                               rtol=1e-12)
    # Ties: the tangent is the mean of the tied maxima's tangents.
    tied = jnp.array([[[[1.0], [1.0]], [[0.0], [1.0]]]])  # (1, 2, 2, 1): three tied maxima
    t = jnp.array([[[[3.0], [6.0]], [[100.0], [9.0]]]])
    np.testing.assert_allclose(jax.jvp(lambda x: _tiled_max(x, (2, 2)), (tied,), (t,))[1],
                               [[[[6.0]]]])


def test_relu_derivative_and_nan(x64):
    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(jax.vmap(jax.grad(relu))(x), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(jax.jvp(relu, (x,), (jnp.ones(3),))[1], [0.0, 0.0, 1.0])
    assert np.isnan(relu(jnp.array(np.nan)))  # NaN propagates (max(x, 0), not a select)
