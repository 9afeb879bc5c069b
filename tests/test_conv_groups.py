"""Grouped and depthwise Conv1D/Conv2D (``groups=``) against numpy loops, finite
differences and (if present) torch's ``nn.Conv2d(groups=g)`` / ``nn.Conv1d(groups=g)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.gradcheck import check_grads
from jaxnn.layers import _conv
from jaxnn.layers._conv import Conv1D, Conv2D

# -- numpy float64 reference: explicit loops, each output channel over its group's inputs --


def grouped_conv2d_loops(x, kernel, bias, groups, strides, pads, dilation):
    n, h, w, cin = x.shape
    kh, kw, cin_g, cout = kernel.shape
    assert cin_g * groups == cin
    cout_g = cout // groups
    (sh, sw), (dh, dw), ((top, bottom), (left, right)) = strides, dilation, pads
    ho = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    wo = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((n, ho, wo, cout))
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for o in range(cout):
                    first = (o // cout_g) * cin_g  # the group's first input channel
                    acc = bias[o]
                    for p in range(kh):
                        for q in range(kw):
                            r, c = i * sh + p * dh - top, j * sw + q * dw - left
                            if 0 <= r < h and 0 <= c < w:
                                for ch in range(cin_g):
                                    acc += x[b, r, c, first + ch] * kernel[p, q, ch, o]
                    y[b, i, j, o] = acc
    return y


def grouped_conv1d_loops(x, kernel, bias, groups, stride, pad, dilation):
    n, w, cin = x.shape
    k, cin_g, cout = kernel.shape
    cout_g = cout // groups
    wo = (w + pad[0] + pad[1] - (k - 1) * dilation - 1) // stride + 1
    y = np.zeros((n, wo, cout))
    for b in range(n):
        for i in range(wo):
            for o in range(cout):
                first = (o // cout_g) * cin_g
                acc = bias[o]
                for t in range(k):
                    r = i * stride + t * dilation - pad[0]
                    if 0 <= r < w:
                        for ch in range(cin_g):
                            acc += x[b, r, first + ch] * kernel[t, ch, o]
                y[b, i, o] = acc
    return y


def random_params(layer, x, seed=1):
    """N(0, 1) params shaped as ``layer.init`` makes them (traced only: nothing compiled)."""
    structs = jax.eval_shape(layer.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                  structs)


# -- forward numerics -----------------------------------------------------------------------


@pytest.mark.parametrize("cin, filters, groups, kwargs, pads", [
    (4, 6, 2, {}, ((0, 0), (0, 0))),  # grouped, stride 1
    (3, 6, 3, {"strides": 2, "padding": 1}, ((1, 1), (1, 1))),  # depthwise, multiplier 2
    (4, 4, 4, {"padding": "SAME", "dilation": (2, 1)}, ((2, 2), (1, 1))),  # depthwise, SAME
    (6, 4, 2, {"strides": (1, 2), "padding": ((0, 1), (2, 0))}, ((0, 1), (2, 0))),
])
def test_grouped_conv2d_matches_numpy_loops(x64, cin, filters, groups, kwargs, pads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, cin))
    layer = Conv2D(filters, 3, groups=groups, **kwargs)
    params = random_params(layer, jnp.asarray(x))
    assert params["kernel"].shape == (3, 3, cin // groups, filters)
    y = np.asarray(jax.jit(layer.apply)(params, jnp.asarray(x)))
    pair = lambda v: (v, v) if isinstance(v, int) else v
    expected = grouped_conv2d_loops(x, np.asarray(params["kernel"]), np.asarray(params["bias"]),
                                    groups, pair(kwargs.get("strides", 1)), pads,
                                    pair(kwargs.get("dilation", 1)))
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_grouped_conv1d_matches_numpy_loops(x64):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 4))
    layer = Conv1D(6, 3, strides=2, padding=2, dilation=2, groups=2)
    params = random_params(layer, jnp.asarray(x))
    assert params["kernel"].shape == (3, 2, 6)
    expected = grouped_conv1d_loops(x, np.asarray(params["kernel"]), np.asarray(params["bias"]),
                                    2, 2, (2, 2), 2)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, jnp.asarray(x)), expected,
                               rtol=1e-10, atol=1e-10)


def test_groups_split_channels_into_independent_convolutions(x64):
    # A grouped convolution is the ordinary convolutions of each group, concatenated.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 4)))
    grouped = Conv2D(6, 2, groups=2, use_bias=False)
    kernel = jnp.asarray(rng.standard_normal((2, 2, 2, 6)))
    y = jax.jit(grouped.apply)({"kernel": kernel}, x)
    plain = jax.jit(Conv2D(3, 2, use_bias=False).apply)
    parts = [plain({"kernel": kernel[..., 3 * g:3 * g + 3]}, x[..., 2 * g:2 * g + 2])
             for g in range(2)]
    np.testing.assert_allclose(y, jnp.concatenate(parts, axis=-1), rtol=1e-12, atol=1e-12)


# -- torch: outputs and gradients with copied weights ---------------------------------------


def _torch_vs_jaxnn(torch, module, layer, x, to_torch_weight, nchw_perm):
    """Outputs and gradients of ``sum(y * cotangent)`` for the input, kernel and bias."""
    rng = np.random.default_rng(3)
    params = random_params(layer, jnp.asarray(x))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(to_torch_weight(np.array(params["kernel"]))))
        module.bias.copy_(torch.from_numpy(np.array(params["bias"])))
    xt = torch.from_numpy(x.transpose(nchw_perm)).requires_grad_(True)
    yt = module(xt)
    back = np.argsort(nchw_perm)
    cot = rng.standard_normal(tuple(yt.shape))
    (yt * torch.from_numpy(cot)).sum().backward()

    cot_j = jnp.asarray(cot.transpose(back))
    loss = lambda p, x: jnp.sum(layer.apply(p, x) * cot_j)
    y, (gp, gx) = jax.jit(lambda p, x: (layer.apply(p, x),
                                        jax.grad(loss, argnums=(0, 1))(p, x)))(params, x)
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(back), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx, xt.grad.numpy().transpose(back), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_torch_weight(np.asarray(gp["kernel"])),
                               module.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gp["bias"], module.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cin, filters, groups, stride, padding, dilation", [
    (4, 6, 2, 1, 0, 1),  # grouped, stride 1
    (4, 8, 4, 2, 1, 1),  # depthwise, multiplier 2, strided
    (3, 3, 3, (1, 2), (2, 1), (2, 1)),  # depthwise, dilated
])
def test_grouped_conv2d_matches_torch(x64, cin, filters, groups, stride, padding, dilation):
    torch = pytest.importorskip("torch", reason="torch is not installed; numpy loops still run")
    module = torch.nn.Conv2d(cin, filters, (3, 2), stride=stride, padding=padding,
                             dilation=dilation, groups=groups, dtype=torch.float64)
    pads = tuple((p, p) for p in ((padding,) * 2 if isinstance(padding, int) else padding))
    layer = Conv2D(filters, (3, 2), strides=stride, padding=pads, dilation=dilation,
                   groups=groups)
    x = np.random.default_rng(4).standard_normal((2, 6, 7, cin))
    _torch_vs_jaxnn(torch, module, layer, x, lambda k: k.transpose(3, 2, 0, 1), (0, 3, 1, 2))


def test_grouped_conv1d_matches_torch(x64):
    torch = pytest.importorskip("torch", reason="torch is not installed; numpy loops still run")
    module = torch.nn.Conv1d(6, 4, 3, stride=2, padding=1, dilation=2, groups=2,
                             dtype=torch.float64)
    layer = Conv1D(4, 3, strides=2, padding=1, dilation=2, groups=2)
    x = np.random.default_rng(5).standard_normal((2, 9, 6))
    _torch_vs_jaxnn(torch, module, layer, x, lambda k: k.transpose(2, 1, 0), (0, 2, 1))


# -- gradients (finite differences) ------------------------------------------------------


@pytest.mark.parametrize("layer, shape", [
    (Conv2D(4, 2, groups=2, padding="SAME"), (1, 4, 4, 4)),  # grouped, stride 1
    (Conv2D(3, 3, groups=3, strides=2, dilation=1), (1, 5, 5, 3)),  # depthwise
])
def test_grouped_conv_gradients_match_finite_differences(x64, layer, shape):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal(shape))
    params = random_params(layer, x)
    target = jnp.asarray(rng.standard_normal(jax.eval_shape(layer.apply, params, x).shape))

    @jax.jit
    def loss(tree):
        return 0.5 * jnp.sum(jnp.tanh(layer.apply(tree["params"], tree["x"]) - target) ** 2)

    errors = check_grads(loss, {"params": params, "x": x}, max_coords=24)
    assert set(errors) == {"params/kernel", "params/bias", "x"}
    assert max(errors.values()) < 1e-6, errors


# -- the fast stride-1 path -----------------------------------------------------------------


def test_groups_one_keeps_the_conv_valid_path(monkeypatch):
    calls = []
    original = _conv.conv_valid

    def counting(x, w):
        calls.append(w.shape)
        return original(x, w)

    monkeypatch.setattr(_conv, "conv_valid", counting)
    x = jax.ShapeDtypeStruct((2, 6, 6, 4), jnp.float32)
    for groups in (1, 2):
        layer = Conv2D(4, 3, padding="SAME", groups=groups)
        params = jax.eval_shape(layer.init, jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(layer.apply)(params, x))
        if groups == 1:
            assert calls == [(3, 3, 4, 4)] and "custom_jvp_call" in jaxpr
        else:
            assert calls == [(3, 3, 4, 4)], "groups > 1 must not take conv_valid"
            assert "feature_group_count=2" in jaxpr and "custom_jvp_call" not in jaxpr


# -- parameters, summaries and errors --------------------------------------------------------


def test_grouped_init_shapes_and_summary(key):
    x = jnp.zeros((2, 6, 6, 4))
    model = jaxnn.Sequential([Conv2D(8, 3, groups=4), Conv2D(2, 1, groups=2, use_bias=False)])
    params = jax.eval_shape(model.init, key, x)
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "conv2d_0": {"kernel": (3, 3, 1, 8), "bias": (8,)},
        "conv2d_1": {"kernel": (1, 1, 4, 2)},
    }
    assert "Conv2D(8, (3, 3), groups=4)" in model.summary(x)
    assert repr(Conv2D(8, 3)) == "Conv2D(8, (3, 3))"  # groups=1 is not shown


def test_groups_errors_name_the_layer_and_the_numbers(key):
    with pytest.raises(ValueError, match=r"Conv2D: filters \(6\) must be a multiple of groups "
                       r"\(4\)"):
        Conv2D(6, 3, groups=4)
    with pytest.raises(ValueError, match=r"Conv1D: filters \(3\) must be a multiple of groups"):
        Conv1D(3, 3, groups=2)
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match="Conv2D: groups must be a positive integer"):
            Conv2D(4, 3, groups=bad)
    model = jaxnn.Sequential([Conv2D(4, 3, groups=4)])
    with pytest.raises(ValueError, match=r"Conv2D layer 'conv2d_0': the input's 6 channels "
                       r"\(shape \(1, 5, 5, 6\)\) are not divisible by groups=4"):
        model.init(key, jnp.zeros((1, 5, 5, 6)))
    with pytest.raises(ValueError, match=r"Conv1D layer: the input's 3 channels"):
        Conv1D(2, 3, groups=2).init(key, jnp.zeros((1, 9, 3)))
    # Params made for 4 channels, applied to 8 (divisible, but not the kernel's).
    params = random_params(model, jnp.zeros((1, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"Conv2D layer 'conv2d_0': expected input with last "
                       r"dimension \(channels\) 4, got shape \(1, 5, 5, 8\)"):
        model.apply(params, jnp.zeros((1, 5, 5, 8)))
