"""Pooling layers against direct numpy loops and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.gradcheck import check_grads
from jaxnn.layers._conv import Conv2D
from jaxnn.layers._pool import (
    AvgPool,
    AvgPool1D,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
    MaxPool1D,
)

# -- numpy float64 references -------------------------------------------------------------


def same_pads(size, window, stride):
    """TensorFlow's SAME rule: ceil(size / stride) outputs, odd padding on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def pool2d_loops(x, reduce, window, strides, pads):
    """Reduce the in-bounds elements of each window (padded positions are skipped)."""
    n, h, w, c = x.shape
    (wh, ww), (sh, sw) = window, strides
    (top, bottom), (left, right) = pads
    ho = (h + top + bottom - wh) // sh + 1
    wo = (w + left + right - ww) // sw + 1
    y = np.zeros((n, ho, wo, c))
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    values = []
                    for p in range(wh):
                        for q in range(ww):
                            r, col = i * sh + p - top, j * sw + q - left
                            if 0 <= r < h and 0 <= col < w:
                                values.append(x[b, r, col, ch])
                    y[b, i, j, ch] = max(values) if reduce == "max" else sum(values) / len(values)
    return y


def pool1d_loops(x, reduce, window, stride, pad):
    n, w, c = x.shape
    lo, hi = pad
    wo = (w + lo + hi - window) // stride + 1
    y = np.zeros((n, wo, c))
    for b in range(n):
        for i in range(wo):
            for ch in range(c):
                values = [x[b, i * stride + t - lo, ch] for t in range(window)
                          if 0 <= i * stride + t - lo < w]
                y[b, i, ch] = max(values) if reduce == "max" else sum(values) / len(values)
    return y


def distinct_values(shape, seed=0):
    """Values 0.01 apart in random order: no ties, so max pooling is differentiable."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    return (rng.permutation(size) * 0.01 - 0.005 * size).reshape(shape)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# -- forward numerics ---------------------------------------------------------------------

POOL2D_CASES = [
    # window, strides, padding
    (2, None, "VALID"),
    (3, 2, "SAME"),
    ((2, 3), (1, 2), "same"),
    (3, 1, ((1, 1), (0, 2))),
    (2, 3, 1),
]


@pytest.mark.parametrize("reduce, make", [("max", MaxPool), ("avg", AvgPool)])
@pytest.mark.parametrize("window, strides, padding", POOL2D_CASES)
def test_pool2d_matches_numpy_loops(x64, reduce, make, window, strides, padding):
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3))
    y = np.asarray(make(window, strides=strides, padding=padding).apply({}, jnp.asarray(x)))

    win = pair(window)
    st = win if strides is None else pair(strides)
    if isinstance(padding, str) and padding.upper() == "SAME":
        pads = tuple(same_pads(7, k, s) for k, s in zip(win, st))
        assert y.shape[1:3] == tuple(-(-7 // s) for s in st)
    elif isinstance(padding, str):
        pads = ((0, 0), (0, 0))
    elif isinstance(padding, int):
        pads = ((padding, padding),) * 2
    else:
        pads = padding
    expected = pool2d_loops(x, reduce, win, st, pads)
    assert y.shape == expected.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


POOL1D_CASES = [(2, None, "VALID"), (3, 2, "SAME"), (4, 1, "Same"), (3, 2, ((2, 1),))]


@pytest.mark.parametrize("reduce, make", [("max", MaxPool1D), ("avg", AvgPool1D)])
@pytest.mark.parametrize("window, strides, padding", POOL1D_CASES)
def test_pool1d_matches_numpy_loops(x64, reduce, make, window, strides, padding):
    x = np.random.default_rng(1).standard_normal((2, 9, 3))
    y = np.asarray(make(window, strides=strides, padding=padding).apply({}, jnp.asarray(x)))
    stride = window if strides is None else strides
    if isinstance(padding, str):
        pad = same_pads(9, window, stride) if padding.upper() == "SAME" else (0, 0)
    else:
        pad = padding[0]
    expected = pool1d_loops(x, reduce, window, stride, pad)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_avg_pool_same_does_not_count_padding(x64):
    # All ones: an average over real elements only is 1 everywhere, borders included
    # (counting the zero padding would give 4/9 in the corners of a 3x3 window).
    y = AvgPool(3, strides=1, padding="SAME").apply({}, jnp.ones((1, 4, 5, 2)))
    np.testing.assert_allclose(y, np.ones((1, 4, 5, 2)), rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 4, 5, 3)])
def test_global_pools_match_numpy_loops(x64, shape):
    x = np.random.default_rng(2).standard_normal(shape)
    n, c = shape[0], shape[-1]
    mean, top = np.zeros((n, c)), np.full((n, c), -np.inf)
    for b in range(n):
        for ch in range(c):
            values = [x[(b, *pos, ch)] for pos in np.ndindex(*shape[1:-1])]
            mean[b, ch] = sum(values) / len(values)
            top[b, ch] = max(values)
    np.testing.assert_allclose(GlobalAvgPool().apply({}, jnp.asarray(x)), mean, rtol=1e-12)
    np.testing.assert_allclose(GlobalMaxPool().apply({}, jnp.asarray(x)), top, rtol=1e-12)


def test_pools_have_no_params_and_keep_dtype(key):
    x = jnp.zeros((2, 6, 6, 3), jnp.float32)
    for layer in (MaxPool(2), AvgPool(2, padding="SAME"), GlobalAvgPool()):
        assert layer.init_with_state(key, x) == ({}, {})
        assert layer.apply({}, x).dtype == jnp.float32
    assert MaxPool(2).apply({}, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_conv_pool_model_shapes_and_names(key):
    model = jaxnn.Sequential([Conv2D(4, 3, padding="SAME"), jax.nn.relu, MaxPool(2),
                              AvgPool(2, strides=1, padding="SAME"), GlobalAvgPool(),
                              jaxnn.Dense(3)])
    x = jnp.zeros((2, 7, 7, 3))
    shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(model.init, key, x))
    assert shapes == {"conv2d_0": {"kernel": (3, 3, 3, 4), "bias": (4,)},
                      "dense_0": {"kernel": (4, 3), "bias": (3,)}}
    summary = model.summary(x)
    for line in ("max_pool_0", "(2, 3, 3, 4)", "avg_pool_0", "global_avg_pool_0", "(2, 4)"):
        assert line in summary


# -- gradients (float64, finite differences) -------------------------------------------------


@pytest.mark.parametrize("layer, shape", [
    (MaxPool(3, strides=2, padding="SAME"), (2, 6, 5, 2)),
    (MaxPool1D(2, strides=1, padding=((1, 0),)), (2, 7, 2)),
    (AvgPool((2, 3), strides=(2, 1), padding="SAME"), (2, 5, 6, 2)),
    (AvgPool1D(3, strides=2, padding="SAME"), (2, 8, 2)),
    (GlobalAvgPool(), (2, 4, 3, 2)),
    (GlobalMaxPool(), (2, 4, 3, 2)),
])
def test_pool_input_gradients_match_finite_differences(x64, layer, shape):
    x = jnp.asarray(distinct_values(shape))
    out_shape = jax.eval_shape(layer.apply, {}, x).shape
    weights = jnp.asarray(np.random.default_rng(3).standard_normal(out_shape))

    @jax.jit
    def loss(x):
        return jnp.sum(weights * jnp.sin(layer.apply({}, x)))

    errors = check_grads(loss, x)
    assert max(errors.values()) < 1e-6, errors


# -- transformations ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer, shape", [
    (MaxPool(3, strides=2, padding="SAME"), (2, 7, 7, 3)),
    (AvgPool(3, strides=2, padding="SAME"), (2, 7, 7, 3)),
    (AvgPool1D(2), (2, 8, 3)),
    (GlobalAvgPool(), (2, 7, 7, 3)),
])
def test_pool_jit_grad_vmap(layer, shape):
    xs = jnp.asarray(distinct_values((3, *shape), seed=4), jnp.float32)  # three batches
    eager = np.stack([np.asarray(layer.apply({}, x)) for x in xs])
    np.testing.assert_allclose(jax.jit(layer.apply)({}, xs[0]), eager[0], rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(layer.apply, in_axes=(None, 0))({}, xs), eager,
                               rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply({}, x) ** 2)))(xs[0])
    assert grad.shape == shape and np.all(np.isfinite(grad))


# -- errors -----------------------------------------------------------------------------------


def test_pool_rank_and_dtype_errors(key):
    model = jaxnn.Sequential([MaxPool(2)])
    with pytest.raises(ValueError, match=r"MaxPool layer 'max_pool_0': expected an input of "
                       r"rank 4 \(batch, height, width, channels\), got shape \(2, 8, 3\)"):
        model.init(key, jnp.zeros((2, 8, 3)))
    with pytest.raises(ValueError, match=r"AvgPool1D layer: expected an input of rank 3 "
                       r"\(batch, width, channels\)"):
        AvgPool1D(2).apply({}, jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"GlobalAvgPool layer: expected an input of rank >= 3"):
        GlobalAvgPool().apply({}, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="MaxPool layer 'max_pool_0': expected a floating-point"):
        model.apply({}, jnp.zeros((2, 8, 8, 3), jnp.int32))
    with pytest.raises(TypeError, match="GlobalMaxPool layer: expected a floating-point"):
        GlobalMaxPool().init(key, jnp.zeros((2, 8, 3), jnp.int32))


def test_pool_window_larger_than_input_is_a_clear_error(key):
    with pytest.raises(ValueError, match=r"MaxPool layer: input of shape \(1, 8, 2, 1\) is too "
                       r"small for the pooling window \(3, 3\): its width is 2"):
        MaxPool(3).apply({}, jnp.zeros((1, 8, 2, 1)))
    with pytest.raises(ValueError, match="AvgPool1D layer: input of shape .* too small"):
        AvgPool1D(4).init(key, jnp.zeros((1, 3, 1)))
    assert MaxPool(3, padding="SAME").apply({}, jnp.zeros((1, 8, 2, 1))).shape == (1, 3, 1, 1)


@pytest.mark.parametrize("make, kwargs, message", [
    (MaxPool, {"window": 0}, "MaxPool: window must be a positive int or a tuple of 2"),
    (AvgPool, {"window": 2, "strides": (1, 2, 3)}, "AvgPool: strides must be"),
    (MaxPool, {"window": 2, "padding": "causal"}, "MaxPool: padding must be 'VALID' or 'SAME'"),
    (MaxPool, {"window": 2, "padding": 2}, "explicit padding must be smaller than the window"),
    (MaxPool1D, {"window": (2, 2)}, "MaxPool1D: window must be a positive int, got"),
    (AvgPool1D, {"window": 3, "padding": ((0, 3),)}, "explicit padding must be smaller"),
])
def test_pool_invalid_arguments(make, kwargs, message):
    window = kwargs.pop("window")
    with pytest.raises(ValueError, match=message):
        make(window, **kwargs)


def test_tiled_max_pool_matches_window_reduction_on_ragged_sizes(x64):
    # stride == window without padding takes the reshape path; compare it with
    # lax.reduce_window (the general path) and with numpy, on sizes that leave rows over.
    from jax import lax

    # Inputs from numpy (jax.random compiles a program per shape); values and gradients
    # each from one jitted program (eager, every operation compiles on its own).
    xs = np.random.default_rng(3).standard_normal((2, 7, 9, 3))
    x = jnp.asarray(xs)
    layer = jaxnn.MaxPool((2, 3))

    def general(x):
        return lax.reduce_window(x, -np.inf, lax.max, (1, 2, 3, 1), (1, 2, 3, 1), "VALID")

    def values_and_grad(pool):
        return jax.jit(lambda x: (pool(x), jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)))

    np.testing.assert_array_equal(layer.apply({}, x), general(x))  # eager
    y, g = values_and_grad(lambda x: layer.apply({}, x))(x)
    y_general, g_general = values_and_grad(general)(x)
    np.testing.assert_array_equal(y, y_general)
    expected = xs[:, :6, :9].reshape(2, 3, 2, 3, 3, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(y, expected)
    # Without ties the gradient goes to the arg-max of each window, as reduce_window's does.
    np.testing.assert_allclose(g, g_general, rtol=1e-12)
    # Tied maxima share the window's gradient equally.
    tied = jnp.zeros((1, 2, 2, 1))
    grad_tied = jax.jit(jax.grad(lambda x: jnp.sum(jaxnn.MaxPool(2).apply({}, x))))(tied)
    np.testing.assert_allclose(grad_tied, np.full((1, 2, 2, 1), 0.25))
