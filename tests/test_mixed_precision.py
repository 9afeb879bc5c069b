"""Mixed precision in ``fit``: ``compute_dtype`` casts the forward pass, not the master weights.

The reference gradients are ``jax.grad`` of a two-layer MLP written out in the
test, casting explicitly: params and inputs to bfloat16, the logits back to
float32, then the mean softmax cross-entropy. ``fit`` is run for one full-batch
step with an "optimizer" that stores the gradient it is given as its state and
leaves the params unchanged, so the gradient of that step can be read back.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_params import numpy_init

from jaxnn.activations import relu
from jaxnn.layers._container import Sequential
from jaxnn.layers._dense import Dense
from jaxnn.layers._norm import BatchNorm
from jaxnn.losses import sparse_softmax_cross_entropy
from jaxnn.training import fit

N, FEATURES, HIDDEN, CLASSES = 16, 5, 8, 3


def _gradient_recorder() -> optax.GradientTransformation:
    """Zero updates; the state is the last gradient received."""

    def init(params):
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree_util.tree_map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


_init = numpy_init


@functools.lru_cache(maxsize=1)
def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, N).astype(np.int32)
    model = Sequential([Dense(HIDDEN), relu, Dense(CLASSES)])
    return model, _init(model, x, seed), x, y


def _reference_loss(dtype):
    """Mean cross-entropy of the MLP computed in ``dtype``, logits cast to float32."""

    def loss(p, x, y):
        def c(a):
            return a.astype(dtype)

        h = jax.nn.relu(c(x) @ c(p["dense_0"]["kernel"]) + c(p["dense_0"]["bias"]))
        logits = (h @ c(p["dense_1"]["kernel"]) + c(p["dense_1"]["bias"])).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return loss


@functools.lru_cache(maxsize=1)
def _reference_gradients():
    """``{dtype: gradient}`` of the problem's loss computed in bfloat16 and in float32,
    one jitted program for both."""
    _, params, x, y = _problem()
    dtypes = (jnp.bfloat16, jnp.float32)
    grads = jax.jit(lambda p, x, y: [jax.grad(_reference_loss(d))(p, x, y) for d in dtypes])(
        params, x, y)
    return dict(zip(dtypes, grads))


def _one_step_gradient(model, params, x, y, compute_dtype):
    result = fit(model, params, x, y, loss=sparse_softmax_cross_entropy,
                 optimizer=_gradient_recorder(), key=jax.random.key(1), epochs=1,
                 batch_size=N, shuffle=False, metrics=(), verbose=0,
                 compute_dtype=compute_dtype)
    return result


def _max_rel_error(a, b):
    errors = jax.tree_util.tree_map(
        lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
                           / (np.max(np.abs(np.asarray(v, np.float64))) + 1e-12)), a, b)
    return max(jax.tree_util.tree_leaves(errors))


def test_bfloat16_step_gradient_matches_hand_cast_reference():
    model, params, x, y = _problem()
    result = _one_step_gradient(model, params, x, y, jnp.bfloat16)
    grads = result.opt_state

    # Master weights stay float32 (and unchanged by the zero update); so do the gradients.
    for leaf in jax.tree_util.tree_leaves((result.params, grads)):
        assert leaf.dtype == jnp.float32
    jax.tree_util.tree_map(np.testing.assert_array_equal, result.params, params)

    reference = _reference_gradients()[jnp.bfloat16]
    full = _reference_gradients()[jnp.float32]
    error = _max_rel_error(grads, reference)
    assert error < 1e-3, error
    # The check can tell bfloat16 from float32 compute: float32 gradients are farther off.
    assert _max_rel_error(full, reference) > 10 * max(error, 1e-4)


def test_compute_dtype_none_is_unchanged_float32_training():
    model, params, x, y = _problem()
    plain = _one_step_gradient(model, params, x, y, None)
    cast = _one_step_gradient(model, params, x, y, jnp.float32)  # every cast a no-op
    jax.tree_util.tree_map(np.testing.assert_array_equal, cast.opt_state, plain.opt_state)
    reference = _reference_gradients()[jnp.float32]
    assert _max_rel_error(plain.opt_state, reference) < 1e-6
    assert plain.history["loss"] == cast.history["loss"]


def test_bfloat16_training_reaches_float32_accuracy():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, FEATURES)) * 3.0
    y = rng.integers(0, CLASSES, 384).astype(np.int32)
    x = (centers[y] + rng.normal(size=(384, FEATURES))).astype(np.float32)
    model = Sequential([Dense(HIDDEN), relu, Dense(CLASSES)])
    params = _init(model, x)

    accuracies = {}
    for dtype in (None, jnp.bfloat16):
        result = fit(model, params, x, y, loss=sparse_softmax_cross_entropy,
                     optimizer=optax.adam(1e-2), key=jax.random.key(2), epochs=4,
                     batch_size=32, verbose=0, compute_dtype=dtype)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(
            (result.params, result.opt_state)) if jnp.issubdtype(leaf.dtype, jnp.floating))
        # the trained float32 params' accuracy, in numpy float64
        p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), result.params)
        h = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0.0)
        logits = h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
        accuracies[dtype] = float(np.mean(logits.argmax(-1) == y))
    assert accuracies[None] > 0.9, accuracies
    assert abs(accuracies[jnp.bfloat16] - accuracies[None]) <= 0.03, accuracies


def test_bfloat16_keeps_batchnorm_state_in_its_dtype():
    model, _, x, y = _problem()
    model = Sequential([Dense(HIDDEN), BatchNorm(), relu, Dense(CLASSES)])
    # Shapes and dtypes from init_with_state, traced, not run (its initialisers would
    # compile a program of their own): random params, running mean and variance all 1.
    shapes = jax.eval_shape(model.init_with_state, jax.random.key(0), x[:1])
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes[0])
    state = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes[1])
    result = fit(model, params, x, y, loss=sparse_softmax_cross_entropy,
                 optimizer=optax.sgd(0.1), key=jax.random.key(1), state=state, epochs=1,
                 batch_size=N, metrics=(), verbose=0, compute_dtype="bfloat16")
    for before, after in zip(jax.tree_util.tree_leaves(state),
                             jax.tree_util.tree_leaves(result.state), strict=True):
        assert after.dtype == before.dtype == jnp.float32
    # The running mean moved towards the batch statistics of the bfloat16 forward pass.
    assert not np.array_equal(result.state["batchnorm_0"]["mean"],
                              state["batchnorm_0"]["mean"])


@pytest.mark.parametrize("bad, error", [(jnp.int32, ValueError), ("bool", ValueError),
                                        ("not-a-dtype", TypeError), (3, TypeError)])
def test_bad_compute_dtype_is_a_clear_error(bad, error):
    model, params, x, y = _problem()
    with pytest.raises(error, match="compute_dtype"):
        fit(model, params, x, y, loss=sparse_softmax_cross_entropy, optimizer=optax.sgd(0.1),
            key=jax.random.key(0), verbose=0, compute_dtype=bad)


def test_compute_dtype_with_custom_value_and_grad_is_an_error():
    model, params, x, y = _problem()

    def value_and_grad(p, xb, yb, weights):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="compute_dtype"):
        fit(model, params, x, y, loss=sparse_softmax_cross_entropy, optimizer=optax.sgd(0.1),
            key=jax.random.key(0), verbose=0, compute_dtype=jnp.bfloat16,
            value_and_grad=value_and_grad)
