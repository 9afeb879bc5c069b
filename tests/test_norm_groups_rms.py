"""RMSNorm and GroupNorm against numpy float64 references, finite differences and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.gradcheck import check_grads
from jaxnn.layers._container import Sequential
from jaxnn.layers._norm import GroupNorm, RMSNorm

# -- numpy references ---------------------------------------------------------


def rms_reference(x, scale, *, eps, axes):
    """Move the normalised axes to the end, flatten them, divide each row by its RMS."""
    x = np.asarray(x, np.float64)
    axes = sorted(a % x.ndim for a in axes)
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, rest + axes)
    rows = moved.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        out[i] = row / np.sqrt(np.sum(row * row) / row.size + eps)
    out = out.reshape(moved.shape) * np.asarray(scale, np.float64)
    return np.transpose(out, np.argsort(rest + axes))


def gn_reference(x, scale, offset, *, groups, eps):
    """Loop over examples and groups of consecutive channels of a (N, ..., C) array."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[0], x.shape[-1]
    size = c // groups
    y = np.empty_like(x)
    for i in range(n):
        for g in range(groups):
            block = x[i, ..., g * size:(g + 1) * size]
            m = block.sum() / block.size
            v = ((block - m) ** 2).sum() / block.size
            y[i, ..., g * size:(g + 1) * size] = (block - m) / np.sqrt(v + eps)
    return y * np.asarray(scale, np.float64) + np.asarray(offset, np.float64)


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- RMSNorm ------------------------------------------------------------------


def test_rmsnorm_init_layout(key):
    params = jax.eval_shape(RMSNorm().init, key, jnp.zeros((2, 3, 5), jnp.float32))
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {"scale": ((5,), jnp.float32)}
    params = RMSNorm(axis=(1, 2)).init(key, jnp.zeros((2, 3, 5), jnp.float32))
    np.testing.assert_array_equal(params["scale"], np.ones((3, 5)))
    assert RMSNorm(use_scale=False).init(key, jnp.zeros((2, 3), jnp.float32)) == {}
    bf16 = jax.eval_shape(RMSNorm(dtype=jnp.bfloat16).init, key, jnp.zeros((2, 3)))
    assert bf16["scale"].dtype == jnp.bfloat16


@pytest.mark.parametrize("shape, axis, eps", [((4, 6), -1, 1e-6), ((2, 3, 4), (0, 2), 0.5)])
def test_rmsnorm_matches_numpy(x64, shape, axis, eps):
    rng = np.random.default_rng(0)
    x = rng.normal(loc=1.0, scale=2.0, size=shape)
    axes = (axis,) if isinstance(axis, int) else axis
    norm_shape = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
    scale = rng.uniform(0.5, 1.5, norm_shape)
    y = jax.jit(RMSNorm(axis=axis, epsilon=eps).apply)({"scale": jnp.asarray(scale)},
                                                       jnp.asarray(x))
    _close(y, rms_reference(x, scale, eps=eps, axes=axes))
    # Without scale: the normalised values alone; a large epsilon visibly shrinks them.
    y = jax.jit(RMSNorm(axis=axis, epsilon=eps, use_scale=False).apply)({}, jnp.asarray(x))
    _close(y, rms_reference(x, np.ones(norm_shape), eps=eps, axes=axes))


def test_rmsnorm_grads(x64):
    rng = np.random.default_rng(1)
    layer = RMSNorm(epsilon=1e-3)
    w = jnp.asarray(rng.normal(size=(3, 5)))

    @jax.jit
    def loss(p):
        y = layer.apply(p["params"], p["x"])
        return jnp.sum(w * y) + jnp.sum(y**3) / 10

    tree = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 5))},
            "x": jnp.asarray(rng.normal(size=(3, 5)))}
    errors = check_grads(loss, tree)
    assert set(errors) == {"params/scale", "x"}
    assert max(errors.values()) < 1e-6, errors


def test_rmsnorm_errors(key):
    params = {"scale": jnp.ones(4)}
    net = Sequential([RMSNorm()])
    with pytest.raises(ValueError, match=r"RMSNorm layer 'rmsnorm_0'.*size \(4,\).*\(2, 5\)"):
        net.forward({"rmsnorm_0": params}, {}, jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        RMSNorm().forward(params, {}, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="RMSNorm: epsilon must be > 0, got 0"):
        RMSNorm(epsilon=0)
    with pytest.raises(ValueError, match="RMSNorm layer 'rms': axis 2 is out of range"):
        RMSNorm(axis=2, name="rms").init(key, jnp.zeros((2, 4)))


def test_rmsnorm_half_precision_keeps_dtype():
    x = np.random.default_rng(2).normal(loc=50.0, scale=3.0, size=(8, 16))
    params = {"scale": jnp.ones(16, jnp.bfloat16)}
    y = RMSNorm().apply(params, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    # Statistics in float32: the only error left is the final rounding to bfloat16, at most
    # 2**-8 relative (statistics in bfloat16 were measured 0.0077 off here).
    np.testing.assert_allclose(np.asarray(y, np.float64),
                               rms_reference(x_rounded, np.ones(16), eps=1e-6, axes=(-1,)),
                               rtol=2.0**-8)


# -- GroupNorm ----------------------------------------------------------------


def test_groupnorm_init_layout(key):
    params = GroupNorm(2).init(key, jnp.zeros((2, 3, 3, 4), jnp.float32))
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
        "scale": ((4,), jnp.float32), "offset": ((4,), jnp.float32)}
    np.testing.assert_array_equal(params["scale"], np.ones(4))
    np.testing.assert_array_equal(params["offset"], np.zeros(4))
    assert jax.eval_shape(GroupNorm(2, use_scale=False, use_bias=False).init, key,
                          jnp.zeros((2, 4))) == {}


@pytest.mark.parametrize("shape, groups", [((3, 4, 5, 6), 3), ((2, 5, 4), 1), ((2, 6), 2),
                                           ((2, 3, 4), 4)])
def test_groupnorm_matches_numpy(x64, shape, groups):
    rng = np.random.default_rng(3)
    c = shape[-1]
    # A different mean and spread per channel, so groups mixing channels would show.
    x = rng.normal(size=shape) * np.arange(1, c + 1) + np.arange(c)
    scale, offset = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    y = jax.jit(GroupNorm(groups).apply)({"scale": jnp.asarray(scale),
                                          "offset": jnp.asarray(offset)}, jnp.asarray(x))
    _close(y, gn_reference(x, scale, offset, groups=groups, eps=1e-5))


def test_groupnorm_without_affine_and_epsilon(x64):
    x = np.random.default_rng(4).normal(size=(2, 3, 4))
    y = jax.jit(GroupNorm(2, epsilon=0.3, use_scale=False, use_bias=False).apply)(
        {}, jnp.asarray(x))
    _close(y, gn_reference(x, np.ones(4), np.zeros(4), groups=2, eps=0.3))


def test_groupnorm_grads(x64):
    rng = np.random.default_rng(5)
    layer = GroupNorm(2)
    w = jnp.asarray(rng.normal(size=(2, 3, 4)))

    @jax.jit
    def loss(p):
        y = layer.apply(p["params"], p["x"])
        return jnp.sum(w * y) + jnp.sum(y**3) / 10

    tree = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 4)),
                       "offset": jnp.asarray(rng.normal(size=4))},
            "x": jnp.asarray(rng.normal(size=(2, 3, 4)))}
    errors = check_grads(loss, tree)
    assert set(errors) == {"params/scale", "params/offset", "x"}
    assert max(errors.values()) < 1e-6, errors


def test_groupnorm_errors(key):
    with pytest.raises(ValueError, match=r"GroupNorm layer 'gn'.*C = 6.*not divisible by "
                                         r"groups = 4"):
        GroupNorm(4, name="gn").init(key, jnp.zeros((2, 3, 6)))
    net = Sequential([GroupNorm(4)])
    with pytest.raises(ValueError, match=r"GroupNorm layer 'groupnorm_0'.*C = 10.*groups = 4"):
        net.init(key, jnp.zeros((2, 10)))
    params = {"scale": jnp.ones(4), "offset": jnp.zeros(4)}
    with pytest.raises(ValueError, match=r"GroupNorm layer.*size \(4,\).*\(2, 8\)"):
        GroupNorm(2).forward(params, {}, jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"rank >= 2 \(batch, \.\.\., channels\).*\(4,\)"):
        GroupNorm(2).init(key, jnp.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        GroupNorm(2).init(key, jnp.zeros((2, 4), jnp.int32))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"groups must be a positive integer, got {bad}"):
            GroupNorm(bad)
    with pytest.raises(ValueError, match="GroupNorm: epsilon must be > 0"):
        GroupNorm(2, epsilon=-1.0)


def test_groupnorm_half_precision_keeps_dtype():
    rng = np.random.default_rng(6)
    x = rng.normal(loc=100.0, scale=2.0, size=(2, 4, 4, 4))
    params = {"scale": jnp.ones(4, jnp.bfloat16), "offset": jnp.zeros(4, jnp.bfloat16)}
    y = GroupNorm(2).apply(params, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    # Statistics in float32: the offset of 100 does not swamp a spread of 2.
    np.testing.assert_allclose(np.asarray(y, np.float64),
                               gn_reference(x_rounded, np.ones(4), np.zeros(4), groups=2,
                                            eps=1e-5), atol=3e-2)


# -- PyTorch with copied weights: outputs and gradients ---------------------------------


def _torch_grads(torch, module, x, w):
    """Output, d(sum(w * y))/dx and the module's parameter gradients (by name)."""
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    y = module(xt)
    (y * torch.from_numpy(np.array(w))).sum().backward()
    grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    return y.detach().numpy(), xt.grad.numpy(), grads


def _ours(layer, params, x, w):
    """Output, d(sum(w * y))/dx and the parameter gradients, in one compiled program."""
    def loss(p, x):
        y = layer.apply(p, x)
        return jnp.sum(y * w), y

    (_, y), (grad_p, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                          has_aux=True))(params, x)
    return y, grad_x, grad_p


def test_rmsnorm_matches_torch(x64):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed; the numpy "
                                "reference tests cover the formula")
    rng = np.random.default_rng(7)
    x, w = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
    scale = rng.uniform(0.5, 1.5, (4, 6))
    module = torch.nn.RMSNorm((4, 6), eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale))
    want_y, want_gx, want_gp = _torch_grads(torch, module, x, w)
    y, gx, gp = _ours(RMSNorm(axis=(-2, -1)), {"scale": jnp.asarray(scale)}, jnp.asarray(x),
                      jnp.asarray(w))
    _close(y, want_y)
    _close(gx, want_gx)
    _close(gp["scale"], want_gp["weight"])
    # PyTorch's eps=None is the input dtype's machine epsilon.
    default = torch.nn.RMSNorm(6, dtype=torch.float64)
    got = jax.jit(RMSNorm(epsilon=float(np.finfo(np.float64).eps)).apply)(
        {"scale": jnp.ones(6)}, jnp.asarray(x))
    _close(got, default(torch.from_numpy(x)).detach().numpy())


def test_groupnorm_matches_torch_channels_first(x64):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed; the numpy "
                                "reference tests cover the formula")
    rng = np.random.default_rng(8)
    x_nchw = rng.normal(size=(2, 6, 3, 4)) * 3 + 1
    w_nchw = rng.normal(size=x_nchw.shape)
    scale, offset = rng.uniform(0.5, 1.5, 6), rng.normal(size=6)
    module = torch.nn.GroupNorm(3, 6, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale))
        module.bias.copy_(torch.from_numpy(offset))
    want_y, want_gx, want_gp = _torch_grads(torch, module, x_nchw, w_nchw)
    to_nhwc = lambda a: jnp.asarray(np.moveaxis(a, 1, -1))  # noqa: E731
    y, gx, gp = _ours(GroupNorm(3), {"scale": jnp.asarray(scale), "offset": jnp.asarray(offset)},
                      to_nhwc(x_nchw), to_nhwc(w_nchw))
    _close(y, np.moveaxis(want_y, 1, -1))
    _close(gx, np.moveaxis(want_gx, 1, -1))
    _close(gp["scale"], want_gp["weight"])
    _close(gp["offset"], want_gp["bias"])
