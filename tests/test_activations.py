"""Activations against numpy float64 formulas, finite differences and jax.nn."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.activations import (
    elu,
    gelu,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swish,
    tanh,
)
from jaxnn.gradcheck import check_grads
from jaxnn.layers import Dense, Sequential, as_layer

# -- numpy float64 references: value and derivative ----------------------------

_erfc = np.vectorize(math.erfc)


def np_sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def np_gelu_tanh(x):
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(u))


def np_gelu_tanh_grad(x):
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * du


def np_elu(x, alpha):
    with np.errstate(over="ignore"):
        return np.where(x > 0, x, alpha * (np.exp(x) - 1))


def np_elu_grad(x, alpha):
    with np.errstate(over="ignore"):
        return np.where(x > 0, 1.0, alpha * np.exp(x))


def np_phi(x):
    return np.exp(-(x**2) / 2) / np.sqrt(2 * np.pi)


# name -> (jaxnn function, numpy value, numpy derivative); element-wise ones.
ELEMENTWISE = {
    "sigmoid": (sigmoid, np_sigmoid, lambda x: np_sigmoid(x) * np_sigmoid(-x)),
    "tanh": (tanh, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "relu": (relu, lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "leaky_relu": (leaky_relu, lambda x: np.where(x >= 0, x, 0.01 * x),
                   lambda x: np.where(x >= 0, 1.0, 0.01)),
    "leaky_relu_0.2": (partial(leaky_relu, negative_slope=0.2),
                       lambda x: np.where(x >= 0, x, 0.2 * x),
                       lambda x: np.where(x >= 0, 1.0, 0.2)),
    "elu": (elu, partial(np_elu, alpha=1.0), partial(np_elu_grad, alpha=1.0)),
    "elu_0.5": (partial(elu, alpha=0.5), partial(np_elu, alpha=0.5),
                partial(np_elu_grad, alpha=0.5)),
    "gelu": (gelu, lambda x: 0.5 * x * _erfc(-x / np.sqrt(2)),
             lambda x: 0.5 * _erfc(-x / np.sqrt(2)) + x * np_phi(x)),
    "gelu_tanh": (partial(gelu, approximate=True), np_gelu_tanh, np_gelu_tanh_grad),
    "silu": (silu, lambda x: x * np_sigmoid(x),
             lambda x: np_sigmoid(x) * (1 + x * np_sigmoid(-x))),
    "swish": (swish, lambda x: x * np_sigmoid(x),
              lambda x: np_sigmoid(x) * (1 + x * np_sigmoid(-x))),
    "softplus": (softplus, lambda x: np.logaddexp(0.0, x), np_sigmoid),
}
KINKED = {"relu", "leaky_relu", "leaky_relu_0.2", "elu", "elu_0.5"}

EXTREME = np.array([-1e4, -60.0, -20.0, -3.0, -1.0, -0.3, -1e-3, 0.0, 1e-3, 0.3, 1.0, 3.0,
                    20.0, 60.0, 1e4])
SMOOTH_POINTS = np.array([-2.5, -1.2, -0.4, 0.0, 0.35, 0.9, 2.2])
KINK_POINTS = np.array([-2.5, -1.2, -0.4, -0.01, 0.01, 0.35, 0.9, 2.2])  # |x| >= 1e-3


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


SOFTMAX_ROWS = np.array([
    [0.0, 0.0, 0.0, 0.0],
    [1e4, -1e4, 0.0, 1.0],
    [-1e4, -1e4 + 1.0, -1e4 + 2.0, -1e4],
    [0.3, -1.7, 2.2, 0.9],
])


# -- values ------------------------------------------------------------------------


@jax.jit
def _values_and_derivatives(x):
    """``{name: (fn(x), fn'(x))}`` for every element-wise activation, one program per dtype
    (each function op by op compiled a program per operation, per dtype)."""
    return {name: (fn(x), jax.vmap(jax.grad(fn))(x)) for name, (fn, _, _) in ELEMENTWISE.items()}


@pytest.fixture(scope="module")
def float64_extremes():
    with jax.enable_x64(True):
        return _values_and_derivatives(jnp.asarray(EXTREME, jnp.float64))


@pytest.fixture(scope="module")
def float32_extremes():
    x = jnp.asarray(EXTREME, jnp.float32)
    return np.asarray(x, np.float64), _values_and_derivatives(x)  # the float32-rounded inputs


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_value_and_derivative_float64(name, float64_extremes):
    _, ref, dref = ELEMENTWISE[name]
    y, grads = float64_extremes[name]
    assert y.dtype == grads.dtype == jnp.float64
    np.testing.assert_allclose(y, ref(EXTREME), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads, dref(EXTREME), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_float32_extremes_finite_and_accurate(name, float32_extremes):
    _, ref, dref = ELEMENTWISE[name]
    x64_points, outputs = float32_extremes
    y, g = outputs[name]
    assert y.dtype == jnp.float32 and g.dtype == jnp.float32
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(y, ref(x64_points), rtol=2e-6, atol=1e-30)
    # jnp.tanh's derivative 1 - tanh(x)**2 is accurate only to float32's epsilon absolutely
    np.testing.assert_allclose(g, dref(x64_points), rtol=2e-6,
                               atol=1e-7 if name == "tanh" else 1e-30)


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("fn, ref", [(softmax, np_softmax), (log_softmax, np_log_softmax)])
def test_softmax_value_float64(fn, ref, axis, x64):
    x = jnp.asarray(SOFTMAX_ROWS)
    np.testing.assert_allclose(fn(x, axis=axis), ref(SOFTMAX_ROWS, axis), rtol=1e-12,
                               atol=1e-300)


def test_softmax_float32_extremes_finite():
    x = jnp.asarray(SOFTMAX_ROWS, jnp.float32)
    c = jnp.arange(4.0)

    @jax.jit  # one program (op by op, every operation compiled on its own)
    def values_and_grads(x):
        return softmax(x), log_softmax(x), [jax.grad(lambda x, fn=fn: jnp.sum(fn(x) * c))(x)
                                            for fn in (softmax, log_softmax)]

    p, lp, grads = values_and_grads(x)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(lp))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(lp, np_log_softmax(SOFTMAX_ROWS, -1), rtol=1e-6)
    for g in grads:
        assert np.all(np.isfinite(g))


def test_softmax_minus_inf_gets_zero_probability():
    x = jnp.array([[-jnp.inf, 0.0, 1.0]])
    np.testing.assert_allclose(softmax(x), [[0.0, *np_softmax(np.array([0.0, 1.0]), -1)]],
                               rtol=1e-6)
    assert log_softmax(x)[0, 0] == -np.inf


def test_against_jax_nn(x64):
    x = jnp.asarray(EXTREME)
    pairs = [(sigmoid, jax.nn.sigmoid), (relu, jax.nn.relu), (softplus, jax.nn.softplus),
             (silu, jax.nn.silu), (elu, jax.nn.elu), (leaky_relu, jax.nn.leaky_relu),
             (gelu, partial(jax.nn.gelu, approximate=False)),
             (partial(gelu, approximate=True), partial(jax.nn.gelu, approximate=True))]
    softmaxes = [(softmax, jax.nn.softmax), (log_softmax, jax.nn.log_softmax)]

    @jax.jit  # one program (op by op, every operation compiled on its own)
    def both(x, s):
        return ([(ours(x), theirs(x)) for ours, theirs in pairs],
                [(ours(s), theirs(s)) for ours, theirs in softmaxes])

    elementwise, rows = both(x, jnp.asarray(SOFTMAX_ROWS))
    for ours, theirs in elementwise:
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(*rows[0], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(*rows[1], rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved(dtype):
    # The dtype is decided while tracing: eval_shape traces each function without
    # compiling it (op by op, every operation compiled a program per dtype).
    x = jax.ShapeDtypeStruct((7,), dtype)
    for fn, _, _ in ELEMENTWISE.values():
        assert jax.eval_shape(fn, x).dtype == dtype
    assert jax.eval_shape(softmax, x).dtype == jax.eval_shape(log_softmax, x).dtype == dtype


# -- gradients, jit, vmap ------------------------------------------------------------


@pytest.fixture(scope="module")
def gradcheck_errors():
    """``{name: relative error}`` of jax.grad against central finite differences, every
    element-wise activation in one check of one jitted program: the sum over the
    activations of sum(c * fn(x)), each at its own points (at least 1e-3 from a kink)."""
    with jax.enable_x64(True):
        points = {name: jnp.asarray(KINK_POINTS if name in KINKED else SMOOTH_POINTS)
                  for name in ELEMENTWISE}
        weights = {name: jnp.linspace(0.5, 1.5, p.size) for name, p in points.items()}

        @jax.jit
        def total(xs):
            return sum(jnp.sum(weights[name] * fn(xs[name]))
                       for name, (fn, _, _) in ELEMENTWISE.items())

        return check_grads(total, points)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_gradcheck(name, gradcheck_errors):
    assert gradcheck_errors[name] < 1e-6, gradcheck_errors


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("fn", [softmax, log_softmax])
def test_softmax_gradcheck(fn, axis, x64):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    c = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
    errors = check_grads(jax.jit(lambda p: jnp.sum(c * fn(p["x"], axis=axis))), {"x": x})
    assert errors["x"] < 1e-6, errors


ALL = {name: entry[0] for name, entry in ELEMENTWISE.items()}
ALL |= {"softmax": softmax, "log_softmax": log_softmax,
        "softmax_axis0": partial(softmax, axis=0)}


@pytest.mark.parametrize("name", sorted(ALL))
def test_jit_and_vmap(name):
    fn = ALL[name]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)) * 3, jnp.float32)
    expected = fn(x)
    np.testing.assert_allclose(jax.jit(fn)(x), expected, rtol=1e-6, atol=1e-7)
    if name != "softmax_axis0":  # vmapping rows is the same as applying to each row
        np.testing.assert_allclose(jax.vmap(fn)(x), expected, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_allclose(jax.vmap(fn, in_axes=1, out_axes=1)(x), expected,
                                   rtol=1e-6, atol=1e-7)


# -- as layers ------------------------------------------------------------------------


@pytest.mark.parametrize("fn, name", [
    (relu, "relu"), (swish, "swish"), (silu, "silu"), (tanh, "tanh"),
    (partial(leaky_relu, negative_slope=0.2), "leaky_relu"),
    (partial(gelu, approximate=True), "gelu"), (partial(softmax, axis=0), "softmax"),
])
def test_as_layer_names(fn, name):
    layer = as_layer(fn)
    assert layer.name == name
    assert layer.init(jax.random.key(0), jnp.zeros((2, 3))) == {}


def test_in_sequential_with_partial(key, x64):
    model = Sequential([Dense(4), relu, Dense(3), partial(leaky_relu, negative_slope=0.2),
                        partial(elu, alpha=0.5), log_softmax])
    x = np.random.default_rng(3).normal(size=(5, 2))
    params = model.init(key, jnp.asarray(x))
    assert sorted(params) == ["dense_0", "dense_1"]
    p = jax.tree_util.tree_map(np.asarray, params)
    h = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0)
    h = h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    h = np_elu(np.where(h >= 0, h, 0.2 * h), 0.5)
    expected = np_log_softmax(h, -1)
    np.testing.assert_allclose(model.apply(params, jnp.asarray(x)), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(model.apply)(params, jnp.asarray(x)), expected,
                               rtol=1e-12)
    assert "leaky_relu" in repr(model) and "elu" in repr(model)
