"""Embedding: lookup and its scatter-add gradient against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import initializers
from jaxnn.layers._container import Sequential
from jaxnn.layers._dense import Dense
from jaxnn.layers._embedding import Embedding

IDS = np.array([[0, 3, 3, 9], [2, 0, 7, 3], [9, 9, 1, 5]])


def test_init_layout(key):
    layer = Embedding(10, 4)
    params = layer.init(key, jnp.asarray(IDS))
    assert set(params) == {"embedding"}
    table = params["embedding"]
    assert table.shape == (10, 4) and table.dtype == jnp.float32
    assert float(jnp.min(table)) >= -0.05 and float(jnp.max(table)) <= 0.05
    assert float(jnp.std(table)) > 0.01  # not constant
    bf16 = Embedding(10, 4, dtype=jnp.bfloat16).init(key, jnp.asarray(IDS))
    assert bf16["embedding"].dtype == jnp.bfloat16
    ones = Embedding(10, 4, embedding_init=initializers.ones()).init(key, jnp.asarray(IDS))
    np.testing.assert_array_equal(ones["embedding"], np.ones((10, 4)))


def test_lookup_matches_numpy_indexing(key):
    layer = Embedding(10, 4)
    params = layer.init(key, jnp.asarray(IDS))
    table = np.asarray(params["embedding"])
    y = layer.apply(params, jnp.asarray(IDS))
    assert y.shape == (3, 4, 4)
    np.testing.assert_array_equal(y, table[IDS])
    np.testing.assert_array_equal(jax.jit(layer.apply)(params, jnp.asarray(IDS)), table[IDS])
    # vmap over rows of ids gives the same as the batched call.
    np.testing.assert_array_equal(
        jax.vmap(layer.apply, in_axes=(None, 0))(params, jnp.asarray(IDS)), table[IDS])
    # A scalar id gives one vector.
    np.testing.assert_array_equal(layer.apply(params, jnp.asarray(7)), table[7])


def test_gradient_is_scatter_add_of_upstream(x64, key):
    layer = Embedding(10, 4)
    params = layer.init(key, jnp.asarray(IDS))
    assert params["embedding"].dtype == jnp.float64
    upstream = np.random.default_rng(0).normal(size=(3, 4, 4))

    def loss(p, ids):
        return jnp.sum(jnp.asarray(upstream) * layer.apply(p, ids))

    expected = np.zeros((10, 4))
    for index in np.ndindex(IDS.shape):  # each position adds its upstream gradient to its row
        expected[IDS[index]] += upstream[index]
    grads = jax.grad(loss)(params, jnp.asarray(IDS))
    np.testing.assert_allclose(grads["embedding"], expected, rtol=1e-12, atol=1e-12)
    jitted = jax.jit(jax.grad(loss))(params, jnp.asarray(IDS))
    np.testing.assert_allclose(jitted["embedding"], expected, rtol=1e-12, atol=1e-12)


def test_in_sequential_with_dense(key):
    net = Sequential([Embedding(10, 4), Dense(2)])
    params = net.init(key, jnp.asarray(IDS))
    assert set(params) == {"embedding_0", "dense_0"}
    y = net.apply(params, jnp.asarray(IDS))
    table = np.asarray(params["embedding_0"]["embedding"], np.float64)
    kernel = np.asarray(params["dense_0"]["kernel"], np.float64)
    bias = np.asarray(params["dense_0"]["bias"], np.float64)
    np.testing.assert_allclose(y, table[IDS] @ kernel + bias, rtol=1e-5, atol=1e-6)


def test_float_input_rejected_naming_the_layer(key):
    net = Sequential([Embedding(10, 4)])
    params = net.init(key, jnp.asarray(IDS))
    with pytest.raises(TypeError, match=r"Embedding layer 'embedding_0'.*integer.*float32"):
        net.apply(params, jnp.asarray(IDS, jnp.float32))
    with pytest.raises(TypeError, match="integer"):
        net.init(key, jnp.zeros((3, 4), jnp.float32))


def test_out_of_range_ids(key):
    layer = Embedding(10, 4)
    params = layer.init(key, jnp.asarray(IDS))
    net = Sequential([layer])
    with pytest.raises(ValueError, match=r"Embedding layer 'embedding_0'.*\[0, 10\).*got 10"):
        net.apply({"embedding_0": params}, jnp.asarray([1, 10]))
    with pytest.raises(ValueError, match=r"got -1"):
        layer.apply(params, jnp.asarray([-1, 2]))
    # Under jit the ids are unknown while tracing: they are clamped into range.
    ids = np.array([-3, 0, 12, 9])
    table = np.asarray(params["embedding"])
    np.testing.assert_array_equal(jax.jit(layer.apply)(params, jnp.asarray(ids)),
                                  table[np.clip(ids, 0, 9)])


@pytest.mark.parametrize("args", [(0, 4), (10, -1), (10.0, 4), (True, 4)])
def test_invalid_sizes(args):
    with pytest.raises(ValueError, match="positive integer"):
        Embedding(*args)
