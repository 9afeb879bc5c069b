"""Sequential, functional models, naming, keys, summaries and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.gradcheck import check_grads


def _mlp():
    return jaxnn.Sequential([jaxnn.Dense(16), jax.nn.relu, jaxnn.Dense(16), jax.nn.relu,
                             jaxnn.Dense(10)])


def _normal(seed, shape):
    """Standard normal inputs from numpy (jax.random compiles a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _like_init(model, key, *inputs, seed=0):
    """Parameters of the structure, shapes and dtypes ``model.init`` gives, traced, not run
    (the initialisers compile a program per model and input; they are tested in
    test_init_is_deterministic_and_layers_get_distinct_keys and test_initializers.py),
    with random values drawn in numpy."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype),
        jax.eval_shape(model.init, key, *inputs))


def _numpy_mlp(params, x):
    h = np.asarray(x, np.float64)
    for i in range(3):
        p = params[f"dense_{i}"]
        h = h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
        if i < 2:
            h = np.maximum(h, 0.0)
    return h


def test_sequential_param_names_and_shapes(key):
    params = jax.eval_shape(_mlp().init, key, jnp.zeros((4, 784)))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes == {
        "dense_0": {"kernel": (784, 16), "bias": (16,)},
        "dense_1": {"kernel": (16, 16), "bias": (16,)},
        "dense_2": {"kernel": (16, 10), "bias": (10,)},
    }


def test_sequential_matches_numpy_and_is_pure(key, x64):
    model = _mlp()
    x = _normal(1, (5, 784))
    params = _like_init(model, key, x)
    y = model.apply(params, x)
    np.testing.assert_allclose(y, _numpy_mlp(params, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(jax.jit(model.apply)(params, x), y)


def test_sequential_vmap_over_batches(key):
    model = _mlp()
    xs = _normal(1, (3, 4, 784))
    params = _like_init(model, key, xs[0])
    stacked = jax.vmap(model.apply, in_axes=(None, 0))(params, xs)
    for i in range(3):
        np.testing.assert_allclose(stacked[i], model.apply(params, xs[i]), rtol=1e-5, atol=1e-6)


def test_sequential_gradients_match_finite_differences(key, x64):
    model = jaxnn.Sequential([jaxnn.Dense(5), jnp.tanh, jaxnn.Dense(3)])
    x = _normal(1, (4, 6))
    params = _like_init(model, key, x)
    errors = check_grads(jax.jit(lambda p: jnp.sum(model.apply(p, x) ** 2)), params)
    assert max(errors.values()) < 1e-6, errors


def test_init_is_deterministic_and_layers_get_distinct_keys(key):
    model = jaxnn.Sequential([jaxnn.Dense(8), jaxnn.Dense(8)])
    x = jnp.zeros((1, 8))
    a, b = model.init(key, x), model.init(key, x)
    np.testing.assert_array_equal(a["dense_0"]["kernel"], b["dense_0"]["kernel"])
    assert not np.allclose(a["dense_0"]["kernel"], a["dense_1"]["kernel"])
    c = model.init(jax.random.key(1), x)
    assert not np.allclose(a["dense_0"]["kernel"], c["dense_0"]["kernel"])


def test_explicit_names_and_duplicates():
    model = jaxnn.Sequential([jaxnn.Dense(4, name="hidden"), jaxnn.Dense(2, name="out")])
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3)))
    assert set(params) == {"hidden", "out"}
    with pytest.raises(ValueError, match="two layers are named 'a'"):
        jaxnn.Sequential([jaxnn.Dense(4, name="a"), jaxnn.Dense(2, name="a")])


def test_empty_sequential_is_refused():
    with pytest.raises(ValueError, match="at least one layer"):
        jaxnn.Sequential([])


def test_functional_model_residual_and_two_inputs(key, x64):
    @jaxnn.model
    def two_tower(nn, a, b):
        ha = jnp.tanh(nn(jaxnn.Dense(4), a))
        hb = jnp.tanh(nn(jaxnn.Dense(4), b))
        h = ha + hb
        return h + nn(jaxnn.Dense(4), h)  # residual

    a = _normal(1, (3, 5))
    b = _normal(2, (3, 7))
    params = _like_init(two_tower, key, a, b)
    assert set(params) == {"dense_0", "dense_1", "dense_2"}
    p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in params.items()}
    dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]
    h = np.tanh(dense("dense_0", np.asarray(a))) + np.tanh(dense("dense_1", np.asarray(b)))
    expected = h + dense("dense_2", h)
    np.testing.assert_allclose(two_tower.apply(params, a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(two_tower.apply)(params, a, b), expected, rtol=1e-12)
    errors = check_grads(jax.jit(lambda q: jnp.sum(two_tower.apply(q, a, b) ** 2)),
                         params)
    assert max(errors.values()) < 1e-6, errors


def test_functional_model_nested_in_sequential_summary(key):
    @jaxnn.model
    def block(nn, x):
        return x + nn(jaxnn.Dense(8), jax.nn.relu(nn(jaxnn.Dense(8), x)))

    model = jaxnn.Sequential([jaxnn.Dense(8), block, block, jaxnn.Dense(2)])
    x = jnp.zeros((5, 3))
    params = _like_init(model, key, x)
    assert set(params) == {"dense_0", "block_0", "block_1", "dense_1"}
    assert set(params["block_1"]) == {"dense_0", "dense_1"}
    table = model.summary(x)
    lines = table.splitlines()
    assert any(line.startswith("block_1/dense_1 (Dense(8))") and "(5, 8)" in line
               for line in lines)
    total = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    assert lines[-1] == f"Total params: {total:,}"
    assert jaxnn.count_params(params) == total


def test_summary_of_the_mnist_mlp():
    model = jaxnn.Sequential([jaxnn.Dense(64), jax.nn.relu, jaxnn.Dense(64), jax.nn.relu,
                              jaxnn.Dense(10)])
    table = model.summary(jax.ShapeDtypeStruct((32, 784), jnp.float32))
    rows = {line.split()[0]: line for line in table.splitlines()[2:-2]}
    # Parameter counts from the formula in * out + out.
    assert rows["dense_0"].endswith(f"{784 * 64 + 64:,}")
    assert rows["dense_1"].endswith(f"{64 * 64 + 64:,}")
    assert rows["dense_2"].endswith(f"{64 * 10 + 10:,}")
    assert "(32, 10)" in rows["dense_2"]
    assert table.splitlines()[-1] == f"Total params: {784*64+64 + 64*64+64 + 64*10+10:,}"


@pytest.mark.parametrize("jitted", [False, True])
def test_wrong_feature_count_names_layer_and_shapes(key, jitted):
    model = _mlp()
    params = _like_init(model, key, jnp.zeros((2, 784)))
    bad = jnp.zeros((2, 785))
    apply = jax.jit(model.apply) if jitted else model.apply
    with pytest.raises(ValueError) as info:
        apply(params, bad)
    message = str(info.value)
    assert "dense_0" in message and "784" in message and "(2, 785)" in message


def test_integer_input_is_refused_with_layer_name(key):
    model = _mlp()
    with pytest.raises(TypeError, match="Dense layer 'dense_0'.*int32"):
        model.init(key, jnp.zeros((2, 784), jnp.int32))
    params = _like_init(model, key, jnp.zeros((2, 784)))
    with pytest.raises(TypeError, match="Dense layer 'dense_0'.*int32"):
        model.apply(params, jnp.zeros((2, 784), jnp.int32))


def test_wrong_rank_is_refused_with_layer_name(key):
    model = jaxnn.Sequential([jaxnn.Flatten(), jaxnn.Dense(3)])
    with pytest.raises(ValueError, match=r"Flatten layer 'flatten_0'.*got shape \(\)"):
        model.init(key, jnp.zeros(()))


def test_nested_error_path(key):
    inner = jaxnn.Sequential([jaxnn.Dense(4), jaxnn.Dense(4)], name="encoder")
    model = jaxnn.Sequential([inner, jaxnn.Dense(2)])
    params = _like_init(model, key, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"'encoder/dense_0'.*3.*\(1, 5\)"):
        model.apply(params, jnp.zeros((1, 5)))


def test_bare_shape_to_init_gets_clear_error(key):
    with pytest.raises(TypeError, match="bare shape"):
        _mlp().init(key, (1, 784))


def test_flatten_and_reshape_match_numpy(key):
    x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(jaxnn.Flatten().apply({}, x), np.arange(24).reshape(2, 12))
    y = jaxnn.Reshape((4, -1)).apply({}, x)
    np.testing.assert_array_equal(y, np.arange(24).reshape(2, 4, 3))
    with pytest.raises(ValueError, match="Reshape layer.*cannot reshape.*\\(3, 4\\)"):
        jaxnn.Reshape((5, -1)).apply({}, x)
    with pytest.raises(ValueError, match="target_shape"):
        jaxnn.Reshape((-1, -1))


def test_dense_options_and_errors(key, x64):
    layer = jaxnn.Dense(3, use_bias=False, kernel_init=jaxnn.initializers.ones())
    x = _normal(0, (2, 4))
    params = layer.init(key, x)
    assert set(params) == {"kernel"}
    np.testing.assert_allclose(layer.apply(params, x), np.asarray(x).sum(-1, keepdims=True)
                               * np.ones((1, 3)), rtol=1e-12)
    assert params["kernel"].dtype == jnp.float64
    assert jax.eval_shape(jaxnn.Dense(3, dtype=jnp.float32).init, key, x)["kernel"].dtype == (
        jnp.float32)
    with pytest.raises(ValueError, match="units must be a positive integer"):
        jaxnn.Dense(0)


@pytest.mark.parametrize("layer", [jaxnn.Flatten(), jaxnn.Reshape((6, 2))],
                         ids=["flatten", "reshape"])
def test_shape_layers_gradients_jit_and_vmap(layer, x64):
    x = _normal(4, (2, 3, 4))
    weights = _normal(5, (2, 12))
    f = lambda x: jnp.sum(layer.apply({}, x).reshape(2, 12) * weights)
    errors = check_grads(jax.jit(f), x)
    assert max(errors.values()) < 1e-6
    # The gradient of a reshape is the upstream gradient reshaped back.
    np.testing.assert_array_equal(jax.grad(f)(x), np.asarray(weights).reshape(2, 3, 4))
    np.testing.assert_array_equal(jax.jit(layer.apply)({}, x), layer.apply({}, x))
    stacked = jax.vmap(lambda x: layer.apply({}, x))(jnp.stack([x, 2 * x]))
    np.testing.assert_array_equal(stacked[1], layer.apply({}, 2 * x))
