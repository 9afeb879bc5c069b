"""BatchNorm and LayerNorm against numpy float64 references and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.gradcheck import check_grads
from jaxnn.layers._container import Sequential
from jaxnn.layers._dense import Dense
from jaxnn.layers._norm import BatchNorm, LayerNorm

# -- numpy references ---------------------------------------------------------


def bn_reference(x, scale, offset, run_mean, run_var, *, train, momentum, eps, axis=-1):
    """Batch norm over a (..., C) view: loop over channels, one column at a time."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    cols = x.reshape(-1, x.shape[-1])
    y = np.empty_like(cols)
    new_mean = np.array(run_mean, np.float64)
    new_var = np.array(run_var, np.float64)
    for c in range(cols.shape[1]):
        col = cols[:, c]
        if train:
            m = col.sum() / col.size
            v = ((col - m) ** 2).sum() / col.size  # biased
            new_mean[c] = momentum * run_mean[c] + (1 - momentum) * m
            new_var[c] = momentum * run_var[c] + (1 - momentum) * v
        else:
            m, v = run_mean[c], run_var[c]
        y[:, c] = scale[c] * (col - m) / np.sqrt(v + eps) + offset[c]
    return np.moveaxis(y.reshape(x.shape), -1, axis), new_mean, new_var


def ln_reference(x, scale, offset, *, eps, axes):
    """Layer norm: move the normalised axes to the end, flatten them, normalise rows."""
    x = np.asarray(x, np.float64)
    ndim = x.ndim
    axes = sorted(a % ndim for a in axes)
    rest = [a for a in range(ndim) if a not in axes]
    moved = np.transpose(x, rest + axes)
    rows = moved.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
    m = rows.mean(axis=1, keepdims=True)
    v = ((rows - m) ** 2).mean(axis=1, keepdims=True)
    normed = ((rows - m) / np.sqrt(v + eps)).reshape(moved.shape)
    normed = normed * np.asarray(scale, np.float64) + np.asarray(offset, np.float64)
    return np.transpose(normed, np.argsort(rest + axes))


def _random_params(rng, shape):
    return {"scale": jnp.asarray(rng.uniform(0.5, 1.5, shape)),
            "offset": jnp.asarray(rng.normal(size=shape))}


# -- BatchNorm ----------------------------------------------------------------


def test_batchnorm_init_layout(key):
    layer = BatchNorm()
    params, state = layer.init_with_state(key, jnp.zeros((2, 4, 4, 3), jnp.float32))
    assert set(params) == {"scale", "offset"} and set(state) == {"mean", "var"}
    np.testing.assert_array_equal(params["scale"], np.ones(3))
    np.testing.assert_array_equal(params["offset"], np.zeros(3))
    np.testing.assert_array_equal(state["mean"], np.zeros(3))
    np.testing.assert_array_equal(state["var"], np.ones(3))
    assert all(v.dtype == jnp.float32 for v in (*params.values(), *state.values()))
    params, _ = BatchNorm(use_scale=False, use_bias=False).init_with_state(
        key, jnp.zeros((2, 3), jnp.float32))
    assert params == {}


def test_batchnorm_nhwc_several_steps_match_numpy(x64, key):
    rng = np.random.default_rng(0)
    momentum, eps = 0.9, 1e-3
    layer = BatchNorm(momentum=momentum, epsilon=eps)
    _, state = layer.init_with_state(key, jnp.zeros((4, 3, 3, 5)))
    params = _random_params(rng, (5,))
    run_mean, run_var = np.zeros(5), np.ones(5)
    step = jax.jit(lambda p, s, x: layer.apply_with_state(p, s, x, train=True))
    for i in range(3):
        x = rng.normal(loc=i - 1.0, scale=2.0 + i, size=(4, 3, 3, 5))
        y, state = step(params, state, jnp.asarray(x))
        y_ref, run_mean, run_var = bn_reference(
            x, np.asarray(params["scale"]), np.asarray(params["offset"]), run_mean, run_var,
            train=True, momentum=momentum, eps=eps)
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(state["mean"], run_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(state["var"], run_var, rtol=1e-12, atol=1e-12)
    # Evaluation uses the running statistics and leaves them unchanged.
    x = rng.normal(size=(4, 3, 3, 5))
    y, new_state = layer.apply_with_state(params, state, jnp.asarray(x), train=False)
    y_ref, _, _ = bn_reference(x, np.asarray(params["scale"]), np.asarray(params["offset"]),
                               run_mean, run_var, train=False, momentum=momentum, eps=eps)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(new_state["mean"], state["mean"])
    np.testing.assert_array_equal(new_state["var"], state["var"])


def test_batchnorm_2d_default_momentum_matches_numpy(x64, key):
    rng = np.random.default_rng(1)
    layer = BatchNorm()
    x = rng.normal(loc=3.0, scale=0.5, size=(16, 4))
    params, state = layer.init_with_state(key, jnp.asarray(x))
    y, state = layer.apply_with_state(params, state, jnp.asarray(x), train=True)
    y_ref, m_ref, v_ref = bn_reference(x, np.ones(4), np.zeros(4), np.zeros(4), np.ones(4),
                                       train=True, momentum=0.99, eps=1e-3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(state["mean"], m_ref, rtol=1e-12)
    np.testing.assert_allclose(state["var"], v_ref, rtol=1e-12)


def test_batchnorm_channels_first_axis(x64, key):
    rng = np.random.default_rng(2)
    layer = BatchNorm(axis=1, momentum=0.5)
    x = rng.normal(size=(3, 4, 2, 5))  # NCHW
    params, state = layer.init_with_state(key, jnp.asarray(x))
    assert state["mean"].shape == (4,)
    params = _random_params(rng, (4,))
    y, state = layer.apply_with_state(params, state, jnp.asarray(x), train=True)
    y_ref, m_ref, v_ref = bn_reference(
        x, np.asarray(params["scale"]), np.asarray(params["offset"]), np.zeros(4), np.ones(4),
        train=True, momentum=0.5, eps=1e-3, axis=1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(state["mean"], m_ref, rtol=1e-12)
    np.testing.assert_allclose(state["var"], v_ref, rtol=1e-12)


def test_batchnorm_grads_train_mode(x64, key):
    rng = np.random.default_rng(3)
    layer = BatchNorm(momentum=0.9)
    x = jnp.asarray(rng.normal(size=(6, 3)))
    _, state = layer.init_with_state(key, x)
    w = jnp.asarray(rng.normal(size=(6, 3)))  # a random projection makes the loss non-trivial

    @jax.jit  # one program for the many evaluations of the finite differences
    def loss(p):
        y, _ = layer.apply_with_state(p["params"], state, p["x"], train=True)
        return jnp.sum(w * y) + jnp.sum(y**3) / 10

    errors = check_grads(loss, {"params": _random_params(rng, (3,)), "x": x})
    assert set(errors) == {"params/scale", "params/offset", "x"}
    assert max(errors.values()) < 1e-6, errors


def test_batchnorm_eval_grads(x64, key):
    rng = np.random.default_rng(4)
    layer = BatchNorm()
    x = jnp.asarray(rng.normal(size=(5, 3)))
    _, state = layer.init_with_state(key, x)
    state = {"mean": jnp.asarray(rng.normal(size=3)), "var": jnp.asarray(rng.uniform(1, 2, 3))}

    @jax.jit
    def loss(p):
        y, _ = layer.apply_with_state(p["params"], state, p["x"], train=False)
        return jnp.sum(jnp.sin(y))

    errors = check_grads(loss, {"params": _random_params(rng, (3,)), "x": x})
    assert max(errors.values()) < 1e-6, errors


def test_batchnorm_vmap_over_independent_batches(x64, key):
    rng = np.random.default_rng(5)
    layer = BatchNorm(momentum=0.8)
    xs = jnp.asarray(rng.normal(size=(3, 8, 2)))  # 3 independent batches of 8
    params, state = layer.init_with_state(key, xs[0])
    run = lambda x: layer.apply_with_state(params, state, x, train=True)
    ys, states = jax.vmap(run)(xs)
    for i in range(3):
        y_ref, m_ref, v_ref = bn_reference(np.asarray(xs[i]), np.ones(2), np.zeros(2),
                                           np.zeros(2), np.ones(2), train=True,
                                           momentum=0.8, eps=1e-3)
        np.testing.assert_allclose(ys[i], y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(states["mean"][i], m_ref, rtol=1e-12)
        np.testing.assert_allclose(states["var"][i], v_ref, rtol=1e-12)


def test_batchnorm_in_sequential_nests_state(x64, key):
    rng = np.random.default_rng(6)
    net = Sequential([Dense(3), BatchNorm(momentum=0.9)])
    x = jnp.asarray(rng.normal(size=(10, 4)))
    params, state = net.init_with_state(key, x)
    assert set(params) == {"dense_0", "batchnorm_0"}
    assert set(state) == {"batchnorm_0"} and set(state["batchnorm_0"]) == {"mean", "var"}

    @jax.jit
    def train_step(params, state, x):
        def loss(p):
            y, new_state = net.apply_with_state(p, state, x, train=True)
            return jnp.sum(y**2), new_state

        return jax.value_and_grad(loss, has_aux=True)(params)

    (loss_value, new_state), grads = train_step(params, state, x)
    h = np.asarray(x) @ np.asarray(params["dense_0"]["kernel"]) + np.asarray(
        params["dense_0"]["bias"])
    y_ref, m_ref, v_ref = bn_reference(h, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3),
                                       train=True, momentum=0.9, eps=1e-3)
    np.testing.assert_allclose(loss_value, np.sum(y_ref**2), rtol=1e-10)
    np.testing.assert_allclose(new_state["batchnorm_0"]["mean"], m_ref, rtol=1e-10)
    np.testing.assert_allclose(new_state["batchnorm_0"]["var"], v_ref, rtol=1e-10)
    assert set(grads) == {"dense_0", "batchnorm_0"}
    # Eval mode returns the state unchanged.
    _, eval_state = net.apply_with_state(params, new_state, x, train=False)
    np.testing.assert_array_equal(eval_state["batchnorm_0"]["var"],
                                  new_state["batchnorm_0"]["var"])


def test_batchnorm_errors(key):
    x = jnp.zeros((4, 3), jnp.float32)
    net = Sequential([Dense(3), BatchNorm()])
    with pytest.raises(ValueError, match="init_with_state"):
        net.init(key, x)
    params, _ = net.init_with_state(key, x)
    with pytest.raises(ValueError, match=r"BatchNorm layer 'batchnorm_0'.*apply_with_state"):
        net.apply(params, x)
    layer = BatchNorm()
    params, state = layer.init_with_state(key, x)
    with pytest.raises(ValueError, match=r"size \(3,\).*got shape \(4, 5\)"):
        layer.apply_with_state(params, state, jnp.zeros((4, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        layer.init_with_state(key, jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        BatchNorm(axis=2).init_with_state(key, x)
    with pytest.raises(ValueError, match="training mode the input needs an axis"):
        layer.apply_with_state(params, state, jnp.zeros(3), train=True)
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        BatchNorm(epsilon=0.0)
    with pytest.raises(ValueError, match="BatchNorm layer 'bn'"):
        BatchNorm(name="bn").apply({}, x)


def test_batchnorm_half_precision_keeps_dtype(key):
    rng = np.random.default_rng(7)
    x = rng.normal(loc=100.0, scale=3.0, size=(64, 4))
    layer = BatchNorm()
    params, state = layer.init_with_state(key, jnp.asarray(x, jnp.bfloat16))
    y, new_state = layer.apply_with_state(params, state, jnp.asarray(x, jnp.bfloat16),
                                          train=True)
    assert y.dtype == jnp.bfloat16 and params["scale"].dtype == jnp.bfloat16
    assert new_state["mean"].dtype == jnp.float32  # running averages kept in float32
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    y_ref, _, _ = bn_reference(x_rounded, np.ones(4), np.zeros(4), np.zeros(4), np.ones(4),
                               train=True, momentum=0.99, eps=1e-3)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, atol=3e-2)


# -- LayerNorm ----------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, axis",
    [((4, 6), -1), ((2, 3, 4), (-2, -1)), ((2, 3, 4), 1), ((2, 3, 4), (0, 2))],
)
def test_layernorm_matches_numpy(x64, key, shape, axis):
    rng = np.random.default_rng(8)
    layer = LayerNorm(axis=axis)
    x = rng.normal(loc=2.0, scale=3.0, size=shape)
    params = layer.init(key, jnp.asarray(x))
    axes = (axis,) if isinstance(axis, int) else axis
    norm_shape = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
    assert params["scale"].shape == norm_shape and params["offset"].shape == norm_shape
    params = _random_params(rng, norm_shape)
    y = layer.apply(params, jnp.asarray(x))
    y_ref = ln_reference(x, params["scale"], params["offset"], eps=1e-5, axes=axes)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)


def test_layernorm_grads(x64, key):
    rng = np.random.default_rng(9)
    layer = LayerNorm()
    x = jnp.asarray(rng.normal(size=(3, 5)))
    w = jnp.asarray(rng.normal(size=(3, 5)))

    @jax.jit
    def loss(p):
        return jnp.sum(w * layer.apply(p["params"], p["x"])) + jnp.sum(
            layer.apply(p["params"], p["x"]) ** 3) / 10

    errors = check_grads(loss, {"params": _random_params(rng, (5,)), "x": x})
    assert set(errors) == {"params/scale", "params/offset", "x"}
    assert max(errors.values()) < 1e-6, errors


def test_layernorm_jit_and_vmap(x64, key):
    rng = np.random.default_rng(10)
    layer = LayerNorm(epsilon=1e-3, use_bias=False)
    x = jnp.asarray(rng.normal(size=(4, 2, 6)))
    params = layer.init(key, x)
    assert set(params) == {"scale"}
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 6))}
    y = jax.jit(layer.apply)(params, x)
    per_example = jax.vmap(layer.apply, in_axes=(None, 0))(params, x)
    y_ref = ln_reference(np.asarray(x), params["scale"], np.zeros(6), eps=1e-3, axes=(-1,))
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(per_example, y_ref, rtol=1e-10, atol=1e-10)


def test_layernorm_errors(key):
    layer = LayerNorm()
    params = layer.init(key, jnp.zeros((2, 4), jnp.float32))
    net = Sequential([layer])
    with pytest.raises(ValueError, match=r"LayerNorm layer 'layernorm_0'.*size \(4,\)"):
        net.apply({"layernorm_0": params}, jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(TypeError, match="floating-point"):
        layer.apply(params, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="axis"):
        LayerNorm(axis=())
    with pytest.raises(ValueError, match="same axis twice"):
        LayerNorm(axis=(1, -1)).init(key, jnp.zeros((2, 4), jnp.float32))


# -- optional comparison with PyTorch ------------------------------------------


def test_norms_match_torch(x64, key):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 4))
    tbn = torch.nn.BatchNorm1d(4, eps=1e-3, momentum=0.1, dtype=torch.float64)
    ty = tbn(torch.from_numpy(x)).detach().numpy()
    layer = BatchNorm(momentum=0.9, epsilon=1e-3)
    params, state = layer.init_with_state(key, jnp.asarray(x))
    y, state = layer.apply_with_state(params, state, jnp.asarray(x), train=True)
    np.testing.assert_allclose(y, ty, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(state["mean"], tbn.running_mean.numpy(), rtol=1e-10)
    # PyTorch's running variance uses the unbiased batch variance (n - 1).
    n = x.shape[0]
    biased_update = 0.9 * 1.0 + 0.1 * (tbn.running_var.numpy() - 0.9) / 0.1 * (n - 1) / n
    np.testing.assert_allclose(state["var"], biased_update, rtol=1e-10)
    tln = torch.nn.LayerNorm(4, eps=1e-5, dtype=torch.float64)
    ln = LayerNorm()
    np.testing.assert_allclose(ln.apply(ln.init(key, jnp.asarray(x)), jnp.asarray(x)),
                               tln(torch.from_numpy(x)).detach().numpy(), rtol=1e-10,
                               atol=1e-10)
