"""Regularizers: penalties against numpy formulas, filters, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn import regularizers
from jaxnn.gradcheck import check_grads
from jaxnn.regularizers import all_leaves, kernels_only, leaf_paths, mask_from

KERNELS = {"dense_0/kernel", "block/conv2d_0/kernel", "block/lstm_0/recurrent_kernel",
           "block/lstm_0/kernel", "heads/0/kernel"}


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {
        "dense_0": {"kernel": r(3, 2), "bias": r(2)},
        "block": {
            "conv2d_0": {"kernel": r(2, 2, 1, 2), "bias": r(2)},
            "lstm_0": {"kernel": r(2, 8), "recurrent_kernel": r(2, 8), "bias": r(8)},
        },
        "batch_norm_0": {"scale": r(2), "offset": r(2)},
        "embedding_0": {"embedding": r(5, 2)},
        "heads": [{"kernel": r(2, 1), "bias": r(1)}],
    }


def _numpy_leaves(params, selected):
    return [np.asarray(v, np.float64) for k, v in leaf_paths(params).items() if k in selected]


def test_leaf_paths_and_kernels_only():
    paths = leaf_paths(_params())
    assert set(paths) == KERNELS | {
        "dense_0/bias", "block/conv2d_0/bias", "block/lstm_0/bias", "batch_norm_0/scale",
        "batch_norm_0/offset", "embedding_0/embedding", "heads/0/bias"}
    assert {p for p, w in paths.items() if kernels_only(p, w)} == KERNELS
    assert all(all_leaves(p, w) for p, w in paths.items())


@pytest.mark.parametrize("where", ["kernels", "all"])
def test_penalties_match_numpy(where, x64):
    params = _params(jnp.float64)
    filt = kernels_only if where == "kernels" else all_leaves
    chosen = KERNELS if where == "kernels" else set(leaf_paths(params))
    leaves = _numpy_leaves(params, chosen)
    abs_sum = sum(np.abs(w).sum() for w in leaves)
    sq_sum = sum((w**2).sum() for w in leaves)
    np.testing.assert_allclose(float(regularizers.l1(0.3, filt)(params)), 0.3 * abs_sum,
                               rtol=1e-12)
    np.testing.assert_allclose(float(regularizers.l2(0.7, filt)(params)), 0.7 * sq_sum,
                               rtol=1e-12)
    np.testing.assert_allclose(float(regularizers.elastic_net(0.3, 0.7, filt)(params)),
                               0.3 * abs_sum + 0.7 * sq_sum, rtol=1e-12)


def test_default_filter_is_kernels_only(x64):
    params = _params(jnp.float64)
    expected = 0.5 * sum((w**2).sum() for w in _numpy_leaves(params, KERNELS))
    np.testing.assert_allclose(float(regularizers.l2(0.5)(params)), expected, rtol=1e-12)


def test_where_as_bool_pytree_prefix(x64):
    params = _params(jnp.float64)
    where = {"dense_0": True, "block": {"conv2d_0": {"kernel": True, "bias": False},
                                        "lstm_0": False},
             "batch_norm_0": True, "embedding_0": False, "heads": False}
    chosen = {"dense_0/kernel", "dense_0/bias", "block/conv2d_0/kernel", "batch_norm_0/scale",
              "batch_norm_0/offset"}
    expected = 2.0 * sum(np.abs(w).sum() for w in _numpy_leaves(params, chosen))
    np.testing.assert_allclose(float(regularizers.l1(2.0, where)(params)), expected, rtol=1e-12)
    mask = mask_from(where, params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert {p for p, on in leaf_paths(mask).items() if on} == chosen


def test_mask_from_filter_is_an_optax_mask(x64):
    params = _params(jnp.float64)
    mask = mask_from(kernels_only, params)
    assert {p for p, on in leaf_paths(mask).items() if on} == KERNELS
    # With zero gradients only weight decay moves the params: exactly the masked-in leaves.
    opt = optax.adamw(0.1, weight_decay=0.5, mask=regularizers.mask_fn(kernels_only))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    # jitted: one program (op by op, every operation on every leaf shape compiles its own)
    updates = jax.jit(lambda p: opt.update(zeros, opt.init(p), p)[0])(params)
    for path, u in leaf_paths(updates).items():
        w = np.asarray(leaf_paths(params)[path])
        expected = -0.1 * 0.5 * w if path in KERNELS else np.zeros_like(w)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-12, atol=1e-15)


def test_biases_and_norms_untouched_by_gradient(x64):
    params = _params(jnp.float64)
    grads = jax.jit(jax.grad(regularizers.elastic_net(0.1, 0.2)))(params)  # one program
    for path, g in leaf_paths(grads).items():
        w = np.asarray(leaf_paths(params)[path])
        expected = 0.1 * np.sign(w) + 2 * 0.2 * w if path in KERNELS else np.zeros_like(w)
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["l1", "l2", "elastic_net"])
def test_gradients_match_finite_differences(name, x64):
    penalty = {"l1": regularizers.l1(0.3, all_leaves), "l2": regularizers.l2(0.7, all_leaves),
               "elastic_net": regularizers.elastic_net(0.3, 0.7, all_leaves)}[name]
    params = {"dense_0": _params(jnp.float64)["dense_0"],
              "lstm_0": _params(jnp.float64)["block"]["lstm_0"]}
    errors = check_grads(jax.jit(penalty), params)
    assert max(errors.values()) < 1e-6, errors


def test_l1_gradient_is_zero_at_zero(x64):
    grads = jax.grad(regularizers.l1(1.0, all_leaves))({"kernel": jnp.array([0.0, 2.0, -3.0])})
    np.testing.assert_array_equal(np.asarray(grads["kernel"]), [0.0, 1.0, -1.0])


def test_composes_with_loss_under_grad_and_jit(x64):
    model = jaxnn.Sequential([jaxnn.Dense(4), jax.nn.tanh, jaxnn.Dense(2)])
    # Data and parameters from numpy: jax.random and the initialisers would compile
    # programs of their own (initialisation is tested elsewhere).
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6, 2)))
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                                    jax.eval_shape(model.init, jax.random.key(0), x))
    penalty = regularizers.l2(0.05)

    def loss(p):
        return jnp.mean((model.apply(p, x) - y) ** 2)

    objective = jax.jit(jax.grad(lambda p: loss(p) + penalty(p)))
    got = objective(params)
    plain = jax.jit(jax.grad(loss))(params)
    for name in ("dense_0", "dense_1"):
        kernel = np.asarray(params[name]["kernel"])
        np.testing.assert_allclose(np.asarray(got[name]["kernel"]),
                                   np.asarray(plain[name]["kernel"]) + 2 * 0.05 * kernel,
                                   rtol=1e-12)
        np.testing.assert_allclose(np.asarray(got[name]["bias"]), np.asarray(plain[name]["bias"]),
                                   rtol=1e-12)
    # jitted: each finite-difference evaluation runs one program, not the ops one by one
    errors = check_grads(jax.jit(lambda p: loss(p) + penalty(p)), params)
    assert max(errors.values()) < 1e-6, errors


def test_vmap_over_stacked_params(x64):
    members = [_params(jnp.float64), jax.tree_util.tree_map(lambda w: 2 * w, _params(jnp.float64))]
    stacked = jax.tree_util.tree_map(lambda *ws: jnp.stack(ws), *members)
    penalty = regularizers.elastic_net(0.1, 0.2)
    got = jax.jit(jax.vmap(penalty))(stacked)  # one program, not one per operation
    expected = [0.1 * sum(np.abs(w).sum() for w in _numpy_leaves(m, KERNELS))
                + 0.2 * sum((w**2).sum() for w in _numpy_leaves(m, KERNELS)) for m in members]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_bfloat16_params_sum_in_float32():
    params = {"kernel": jnp.full((64, 64), 1.5, jnp.bfloat16)}
    value = regularizers.l2(1.0)(params)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), 64 * 64 * 2.25, rtol=1e-6)


def test_nothing_selected_raises_and_no_params_is_zero():
    # A filter that selects none of the leaves is an error (tests/test_regularizers_filter.py);
    # only a tree with no leaves at all gives 0.
    with pytest.raises(ValueError, match="l2: the filter where=kernels_only selects none"):
        regularizers.l2(1.0)({"dense_0": {"bias": jnp.ones(3)}})
    assert float(regularizers.l2(1.0)({"relu_0": {}})) == 0.0


def test_bad_strength_errors():
    with pytest.raises(ValueError, match=r"l1: strength must be a finite number >= 0, got -0.1"):
        regularizers.l1(-0.1)
    with pytest.raises(ValueError, match=r"l2: strength must be a finite number >= 0, got nan"):
        regularizers.l2(float("nan"))
    with pytest.raises(ValueError, match="elastic_net: l2_strength must be a finite number"):
        regularizers.elastic_net(0.1, -1.0)
    with pytest.raises(TypeError, match="l2: strength must be a number, got '1e-4'"):
        regularizers.l2("1e-4")
    with pytest.raises(ValueError, match=r"l2: strength must be a scalar, got shape \(2,\)"):
        regularizers.l2(np.ones(2))


def test_bad_where_errors():
    params = _params()
    with pytest.raises(TypeError, match="l1: where must be a filter function"):
        regularizers.l1(0.1, where=None)
    with pytest.raises(ValueError, match="l2: where must be a filter function .* where has "
                                         "structure"):
        regularizers.l2(0.1, where={"dense_0": True})(params)
    with pytest.raises(TypeError, match="l2: the where filter must return a Python bool, got "
                                        "ArrayImpl"):
        regularizers.l2(0.1, where=lambda path, w: w.ndim > 1 or jnp.bool_(True))(params)
    with pytest.raises(TypeError, match="mask_from: where must be .* found a leaf 'yes'"):
        mask_from({"w": "yes"}, {"w": jnp.ones(2)})
