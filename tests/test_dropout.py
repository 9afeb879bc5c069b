"""Dropout: identity at inference, inverted dropout with an explicit key in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.gradcheck import check_grads
from jaxnn.layers._container import Sequential
from jaxnn.layers._dense import Dense
from jaxnn.layers._dropout import Dropout


def test_eval_mode_and_rate_zero_are_identity(key):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 7)), jnp.float32)
    layer = Dropout(0.5)
    assert layer.init(key, x) == {}
    np.testing.assert_array_equal(layer.apply({}, x), x)  # train=False, no key needed
    np.testing.assert_array_equal(layer.apply({}, x, train=False, key=key), x)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, train=True), x)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_train_mode_drops_rate_and_rescales(key, rate):
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (200, 500)), jnp.float32)
    y = np.asarray(Dropout(rate).apply({}, x, key=key, train=True))
    dropped = y == 0
    n = x.size
    # Binomial(n, rate): allow five standard deviations.
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    kept = ~dropped
    np.testing.assert_allclose(y[kept], np.asarray(x, np.float64)[kept] / (1 - rate), rtol=1e-6)


def test_same_key_same_mask_different_key_different_mask(key):
    x = jnp.ones((64, 64), jnp.float32)
    layer = Dropout(0.5)
    a = layer.apply({}, x, key=key, train=True)
    b = layer.apply({}, x, key=key, train=True)
    c = layer.apply({}, x, key=jax.random.fold_in(key, 1), train=True)
    np.testing.assert_array_equal(a, b)
    assert np.mean((np.asarray(a) == 0) != (np.asarray(c) == 0)) > 0.3


def test_jit_and_vmap(key):
    layer = Dropout(0.3)
    # numpy's generator: jax.random.normal would compile a program for this shape
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32)), jnp.float32)
    eager = layer.apply({}, x, key=key, train=True)
    jitted = jax.jit(layer.apply, static_argnames="train")({}, x, key=key, train=True)
    np.testing.assert_array_equal(eager, jitted)
    # vmap over keys: one independent mask per key.
    keys = jax.random.split(key, 3)
    ys = jax.vmap(lambda k: layer.apply({}, x, key=k, train=True))(keys)
    assert ys.shape == (3, 4, 32)
    for i in range(3):
        np.testing.assert_array_equal(ys[i], layer.apply({}, x, key=keys[i], train=True))
    assert not np.array_equal(np.asarray(ys[0]) == 0, np.asarray(ys[1]) == 0)


def test_gradient_with_fixed_key(x64, key):
    rate = 0.4
    layer = Dropout(rate)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6)))
    w = jnp.asarray(rng.normal(size=(4, 6)))

    @jax.jit  # one compiled call per finite-difference evaluation
    def loss(x):
        return jnp.sum(w * layer.apply({}, x, key=key, train=True) ** 2)

    errors = check_grads(loss, x)
    assert errors["<root>"] < 1e-6, errors
    # d loss / dx = 2 w x mask / (1 - rate)^2, with the mask read off the forward pass.
    mask = np.asarray(layer.apply({}, jnp.ones((4, 6)), key=key, train=True)) != 0
    expected = 2 * np.asarray(w) * np.asarray(x) * mask / (1 - rate) ** 2
    np.testing.assert_allclose(jax.grad(loss)(x), expected, rtol=1e-12)


def test_sequential_folds_a_key_per_child(key):
    x = jnp.ones((8, 16), jnp.float32)
    net = Sequential([Dense(16), Dropout(0.5)])
    params = net.init(key, x)
    y = net.apply(params, x, key=key, train=True)
    h = Dense(16).apply(params["dense_0"], x)
    expected = Dropout(0.5).apply({}, h, key=jax.random.fold_in(key, 1), train=True)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(net.apply(params, x), h)  # inference: identity


def test_missing_key_error_names_the_layer(key):
    x = jnp.ones((2, 3), jnp.float32)
    net = Sequential([Dropout(0.5)])
    message = ("Dropout layer 'dropout_0' needs a PRNG key in training mode: "
               "pass key=... to apply")
    with pytest.raises(ValueError, match=message):
        net.apply({}, x, train=True)
    with pytest.raises(ValueError, match="Dropout layer 'drop' needs a PRNG key"):
        Dropout(0.5, name="drop").apply({}, x, train=True)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, True, "0.5", None])
def test_invalid_rate(rate):
    with pytest.raises(ValueError, match=r"fraction of units dropped.*\[0, 1\)"):
        Dropout(rate)


def test_integer_input_rejected(key):
    with pytest.raises(TypeError, match="floating-point"):
        Dropout(0.5).apply({}, jnp.ones((2, 3), jnp.int32), key=key, train=True)
