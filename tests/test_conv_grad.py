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


SHAPES = [  # (x, kernel): one case per path of the kernel's tangent, in 1-D, 2-D and 3-D
    ((2, 6, 1), (3, 1, 2)),  # few channels (one): values as a fused loop (3 terms)
    ((1, 5, 5, 4), (3, 3, 4, 2)),  # few channels: values from the stacked taps (36 terms)
    ((1, 4, 5, _FEW_CHANNELS), (2, 2, _FEW_CHANNELS, 2)),  # many channels: the patch matrix
    ((1, 3, 4, 3, _FEW_CHANNELS), (2, 2, 2, _FEW_CHANNELS, 2)),  # the same in 3-D
]


@pytest.mark.parametrize("x_shape, w_shape, patch_limit", [
    *((x, w, "default") for x, w in SHAPES),
    # Many channels with no patch matrix fitting: the per-tap products, as layers
    # whose patch matrix would exceed PATCHES_MAX_BYTES take (in 3-D, where the
    # windows slice the most axes).
    (*SHAPES[-1], "none fit"),
])
def test_conv_derivatives_equal_lax(x64, monkeypatch, x_shape, w_shape, patch_limit):
    if patch_limit == "none fit":
        monkeypatch.setattr(_conv_grad, "PATCHES_MAX_BYTES", 0)
    rng = np.random.default_rng(0)  # numpy's, not jax.random's: no program to compile per shape
    x, w, tx, tw = (jnp.asarray(rng.standard_normal(s)) for s in (x_shape, w_shape) * 2)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    def derivatives(conv):
        # Everything in one compiled program per convolution (eager, each operation
        # compiles on its own): values, both gradients, the kernel's gradient alone
        # (the input's tangent a symbolic zero) and forward mode.
        return jax.jit(lambda x, w, tx, tw: (
            conv(x, w), jax.grad(loss(conv), argnums=(0, 1))(x, w),
            jax.grad(loss(conv), argnums=1)(x, w), jax.jvp(conv, (x, w), (tx, tw))[1]))

    got_y, got, got_w, got_t = derivatives(conv_valid)(x, w, tx, tw)
    want_y, want, _, want_t = derivatives(_lax_conv)(x, w, tx, tw)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv_valid(x, w), want_y, rtol=1e-12, atol=1e-12)  # eager
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got_w, want[1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-10, atol=1e-10)


def test_patches_are_the_im2col_matrix(x64):
    # Reference: the definition, entry by entry, in numpy.
    x = np.random.default_rng(2).standard_normal((2, 5, 4, 3))
    window = (3, 2)
    got = np.asarray(patches(jnp.asarray(x), window))
    assert got.shape == (2, 3, 3, 6 * 3)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                want = [x[n, i + di, j + dj, c] for di in range(3) for dj in range(2)
                        for c in range(3)]
                np.testing.assert_array_equal(got[n, i, j], want)


@pytest.mark.parametrize("channels", [2, _FEW_CHANNELS])  # stacked taps; patches
def test_conv_hessian_equals_lax(x64, channels):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, channels)))
    w = jnp.asarray(rng.standard_normal((2, 2, channels, 2)))

    def loss(conv):
        return lambda w: jnp.sum(jnp.sin(conv(x, w)))

    np.testing.assert_allclose(jax.jit(jax.hessian(loss(conv_valid)))(w),
                               jax.jit(jax.hessian(loss(_lax_conv)))(w), rtol=1e-10, atol=1e-10)


def test_tiled_max_forward_mode_and_ties(x64):
    # Without ties: the derivative equals reduce_window's, in both modes, on ragged sizes.
    x = jnp.asarray(np.random.default_rng(0).permutation(5 * 7 * 2).reshape(1, 5, 7, 2),
                    jnp.float64) / 10
    tx = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))

    def general(x):
        return lax.reduce_window(x, -np.inf, lax.max, (1, 2, 3, 1), (1, 2, 3, 1), "VALID")

    def tiled(x):
        return _tiled_max(x, (2, 3))

    def values_and_tangent(f):
        return jax.jit(lambda x, tx: jax.jvp(f, (x,), (tx,)))

    got, got_t = values_and_tangent(tiled)(x, tx)
    want, want_t = values_and_tangent(general)(x, tx)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-12)
    # Ties: the tangent is the mean of the tied maxima's tangents.
    tied = jnp.array([[[[1.0], [1.0]], [[0.0], [1.0]]]])  # (1, 2, 2, 1): three tied maxima
    t = jnp.array([[[[3.0], [6.0]], [[100.0], [9.0]]]])
    np.testing.assert_allclose(values_and_tangent(lambda x: _tiled_max(x, (2, 2)))(tied, t)[1],
                               [[[[6.0]]]])


def test_relu_derivative_and_nan(x64):
    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(jax.vmap(jax.grad(relu))(x), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(jax.jvp(relu, (x,), (jnp.ones(3),))[1], [0.0, 0.0, 1.0])
    assert np.isnan(relu(jnp.array(np.nan)))  # NaN propagates (max(x, 0), not a select)
