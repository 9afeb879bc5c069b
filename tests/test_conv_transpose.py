"""Conv1DTranspose and Conv2DTranspose against a numpy scatter loop, the input gradient of
Conv2D, finite differences and (if present) torch's ``nn.ConvTranspose2d`` / ``1d``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.gradcheck import check_grads
from jaxnn.layers._conv import Conv2D
from jaxnn.layers._conv_transpose import Conv1DTranspose, Conv2DTranspose

# -- numpy float64 reference: every input pixel scatters the kernel into the output ------


def conv_transpose2d_loops(x, kernel, bias, strides, dilation, out_shape, offset):
    """``full[i*s + p*d] += x[i] * kernel[p]``, then ``y[a] = full[offset + a]`` (zero
    where ``offset + a`` falls outside ``full``)."""
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    y = np.zeros((n, *out_shape, cout)) + bias
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for p in range(kh):
                    for q in range(kw):
                        r = i * sh + p * dh - offset[0]
                        c = j * sw + q * dw - offset[1]
                        if 0 <= r < out_shape[0] and 0 <= c < out_shape[1]:
                            for ch in range(cin):
                                y[b, r, c] += x[b, i, j, ch] * kernel[p, q, ch]
    return y


def random_params(layer, x, seed=1):
    """N(0, 1) params shaped as ``layer.init`` makes them (traced only: nothing compiled)."""
    structs = jax.eval_shape(layer.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                  structs)


# (kwargs, expected output (H, W) for a (3, 4) input and a (3, 2) kernel, low crops)
LOOP_CASES = [
    ({}, (5, 5), (0, 0)),  # VALID: (in - 1) * s + k
    ({"strides": 2}, (7, 8), (0, 0)),
    ({"strides": (3, 2), "dilation": (1, 2)}, (9, 9), (0, 0)),
    ({"strides": 2, "padding": "SAME"}, (6, 8), (0, 0)),  # SAME: in * s; crop 1 high on H
    ({"strides": 3, "padding": "same", "dilation": 2}, (9, 12), (1, 0)),  # H: 5 - 3 = 2 cut
    ({"strides": 1, "padding": "SAME"}, (3, 4), (1, 0)),
    ({"strides": 2, "padding": 1, "output_padding": 1}, (6, 7), (1, 1)),
    ({"strides": (2, 3), "padding": ((0, 2), (1, 0)), "output_padding": (1, 2)}, (6, 12), (0, 1)),
]


@pytest.mark.parametrize("kwargs, out_shape, offset", LOOP_CASES)
def test_conv2d_transpose_matches_numpy_loops(x64, kwargs, out_shape, offset):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 2))
    layer = Conv2DTranspose(3, (3, 2), **kwargs)
    params = random_params(layer, jnp.asarray(x))
    assert params["kernel"].shape == (3, 2, 2, 3)
    y = np.asarray(jax.jit(layer.apply)(params, jnp.asarray(x)))
    pair = lambda v: (v, v) if isinstance(v, int) else v
    expected = conv_transpose2d_loops(x, np.asarray(params["kernel"]),
                                      np.asarray(params["bias"]), pair(kwargs.get("strides", 1)),
                                      pair(kwargs.get("dilation", 1)), out_shape, offset)
    assert y.shape == (2, *out_shape, 3)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_conv1d_transpose_matches_numpy_loops(x64):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 3))
    layer = Conv1DTranspose(2, 3, strides=2, padding=2, output_padding=1, dilation=2)
    params = random_params(layer, jnp.asarray(x))
    # As the 2-D loops on images of height 1: out = 3 * 2 + 5 - 4 + 1 = 8 positions.
    expected = conv_transpose2d_loops(x[:, None], np.asarray(params["kernel"])[None],
                                      np.asarray(params["bias"]), (1, 2), (1, 2), (1, 8),
                                      (0, 2))[:, 0]
    np.testing.assert_allclose(jax.jit(layer.apply)(params, jnp.asarray(x)), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs, in_shape", [
    ({"strides": 2, "padding": "SAME"}, (1, 6, 8, 3)),
    ({"strides": (2, 3), "padding": ((1, 0), (2, 1)), "dilation": (1, 2),
      "output_padding": (1, 2)}, (1, 7, 14, 3)),
])
def test_conv2d_transpose_is_the_input_gradient_of_conv2d(x64, kwargs, in_shape):
    # The Conv2D with the same strides, padding and dilation, whose kernel is this layer's
    # with the channel axes swapped, run on an input of this layer's output shape.
    rng = np.random.default_rng(2)
    transpose = Conv2DTranspose(3, (3, 2), use_bias=False, **kwargs)
    kwargs.pop("output_padding", None)
    conv = Conv2D(2, (3, 2), use_bias=False, **kwargs)
    kernel = jnp.asarray(rng.standard_normal((3, 2, 2, 3)))
    z = jnp.asarray(rng.standard_normal(in_shape))
    y, vjp = jax.vjp(lambda z: conv.apply({"kernel": kernel.transpose(0, 1, 3, 2)}, z), z)
    x = jnp.asarray(rng.standard_normal(y.shape))
    got = jax.jit(transpose.apply)({"kernel": kernel}, x)
    assert got.shape == in_shape
    np.testing.assert_allclose(got, vjp(x)[0], rtol=1e-10, atol=1e-10)


# -- torch: outputs and gradients with copied weights --------------------------------------


def _torch_vs_jaxnn(torch, module, layer, x, kernel_to_torch, nchw_perm):
    """Outputs and gradients of ``sum(y * cotangent)`` for the input, kernel and bias."""
    params = random_params(layer, jnp.asarray(x))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(kernel_to_torch(np.array(params["kernel"]))))
        module.bias.copy_(torch.from_numpy(np.array(params["bias"])))
    xt = torch.from_numpy(x.transpose(nchw_perm)).requires_grad_(True)
    yt = module(xt)
    back = np.argsort(nchw_perm)
    cot = np.random.default_rng(3).standard_normal(tuple(yt.shape))
    (yt * torch.from_numpy(cot)).sum().backward()

    cot_j = jnp.asarray(cot.transpose(back))
    loss = lambda p, x: jnp.sum(layer.apply(p, x) * cot_j)
    y, (gp, gx) = jax.jit(lambda p, x: (layer.apply(p, x),
                                        jax.grad(loss, argnums=(0, 1))(p, x)))(params, x)
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(back), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx, xt.grad.numpy().transpose(back), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(kernel_to_torch(np.asarray(gp["kernel"])),
                               module.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gp["bias"], module.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride, padding, output_padding, dilation", [
    (1, 0, 0, 1),
    (2, 1, 1, 1),
    ((2, 3), (2, 0), (1, 2), (2, 1)),
    (1, 3, (1, 0), 2),  # cropping more than the kernel's reach; output_padding < dilation
])
def test_conv2d_transpose_matches_torch(x64, stride, padding, output_padding, dilation):
    torch = pytest.importorskip("torch", reason="torch is not installed; numpy loops still run")
    module = torch.nn.ConvTranspose2d(3, 2, (3, 2), stride=stride, padding=padding,
                                      output_padding=output_padding, dilation=dilation,
                                      dtype=torch.float64)
    pads = tuple((p, p) for p in ((padding,) * 2 if isinstance(padding, int) else padding))
    layer = Conv2DTranspose(2, (3, 2), strides=stride, padding=pads,
                            output_padding=output_padding, dilation=dilation)
    x = np.random.default_rng(4).standard_normal((2, 4, 5, 3))
    # (kh, kw, C_in, C_out) <-> torch's (C_in, C_out, kh, kw)
    _torch_vs_jaxnn(torch, module, layer, x, lambda k: k.transpose(2, 3, 0, 1), (0, 3, 1, 2))


def test_conv1d_transpose_matches_torch(x64):
    torch = pytest.importorskip("torch", reason="torch is not installed; numpy loops still run")
    module = torch.nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1, output_padding=2,
                                      dilation=2, dtype=torch.float64)
    layer = Conv1DTranspose(3, 3, strides=3, padding=1, output_padding=2, dilation=2)
    x = np.random.default_rng(5).standard_normal((2, 5, 2))
    _torch_vs_jaxnn(torch, module, layer, x, lambda k: k.transpose(1, 2, 0), (0, 2, 1))


# -- gradients (finite differences) ---------------------------------------------------------


def test_conv2d_transpose_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(6)
    layer = Conv2DTranspose(2, (3, 2), strides=2, padding=((1, 0), (0, 1)), output_padding=1)
    x = jnp.asarray(rng.standard_normal((1, 3, 3, 2)))
    params = random_params(layer, x)
    target = jnp.asarray(rng.standard_normal(jax.eval_shape(layer.apply, params, x).shape))

    @jax.jit
    def loss(tree):
        return 0.5 * jnp.sum(jnp.tanh(layer.apply(tree["params"], tree["x"]) - target) ** 2)

    errors = check_grads(loss, {"params": params, "x": x}, max_coords=24)
    assert set(errors) == {"params/kernel", "params/bias", "x"}
    assert max(errors.values()) < 1e-6, errors


# -- parameters, names and errors ---------------------------------------------------------


def test_conv_transpose_init_names_and_summary(key):
    x = jnp.zeros((2, 4, 4, 3))
    model = jaxnn.Sequential([Conv2DTranspose(5, 3, strides=2, padding="SAME"),
                              Conv2DTranspose(2, (2, 1), use_bias=False, name="up")])
    params = jax.eval_shape(model.init, key, x)
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "conv2d_transpose_0": {"kernel": (3, 3, 3, 5), "bias": (5,)},
        "up": {"kernel": (2, 1, 5, 2)},
    }
    assert jax.eval_shape(model.apply, params, x).shape == (2, 9, 8, 2)
    assert "Conv2DTranspose(5, (3, 3), strides=(2, 2), padding='SAME')" in model.summary(x)
    assert repr(Conv1DTranspose(4, 3, padding=1, output_padding=0)) == \
        "Conv1DTranspose(4, 3, padding=((1, 1),))"
    assert repr(Conv2DTranspose(4, 3, strides=2, output_padding=1)) == \
        "Conv2DTranspose(4, (3, 3), strides=(2, 2), output_padding=(1, 1))"


def test_conv_transpose_input_errors_name_the_layer(key):
    model = jaxnn.Sequential([Conv2DTranspose(4, 3)])
    with pytest.raises(ValueError, match=r"Conv2DTranspose layer 'conv2d_transpose_0': expected "
                       r"an input of rank 4 \(batch, height, width, channels\), got shape "
                       r"\(5, 5, 3\)"):
        model.init(key, jnp.zeros((5, 5, 3)))
    with pytest.raises(ValueError, match=r"Conv1DTranspose layer: expected an input of rank 3"):
        Conv1DTranspose(2, 3).init(key, jnp.zeros((9, 3)))
    with pytest.raises(TypeError, match="Conv2DTranspose layer: expected a floating-point"):
        Conv2DTranspose(2, 3).init(key, jnp.zeros((1, 4, 4, 3), jnp.int32))
    params = random_params(model, jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"Conv2DTranspose layer 'conv2d_transpose_0': expected "
                       r"input with last dimension \(channels\) 3, got shape \(1, 4, 4, 2\)"):
        model.apply(params, jnp.zeros((1, 4, 4, 2)))
    # Padding that crops the whole output: (1 - 1) * 1 + 3 - 2 * 2 = -1 rows.
    with pytest.raises(ValueError, match=r"Conv2DTranspose layer: input of shape \(1, 1, 4, 3\) "
                       r"gives an empty output: its height 1 would become .* = -1"):
        Conv2DTranspose(2, 3, padding=2).init(key, jnp.zeros((1, 1, 4, 3)))


@pytest.mark.parametrize("kwargs, message", [
    ({"output_padding": 2, "strides": 2}, r"output_padding \(2, 2\) must be smaller than the "
     r"stride or the dilation on every axis \(strides \(2, 2\), dilation \(1, 1\)\)"),
    ({"output_padding": (0, 1)}, r"output_padding \(0, 1\) must be smaller"),  # stride 1
    ({"output_padding": (1, -1), "strides": 2}, "output_padding must be a non-negative int"),
    ({"output_padding": 1, "strides": 2, "padding": "SAME"},
     "output_padding is not supported with padding='SAME'"),
    ({"padding": "full"}, "padding must be 'VALID' or 'SAME'"),
    ({"strides": 0}, "strides must be a positive int"),
    ({"filters": 0}, "filters must be a positive integer"),
])
def test_conv_transpose_invalid_arguments(kwargs, message):
    args = {"filters": 4, "kernel_size": 3} | kwargs
    with pytest.raises(ValueError, match="Conv2DTranspose: " + message):
        Conv2DTranspose(args.pop("filters"), args.pop("kernel_size"), **args)
