"""Conv1D and Conv2D against direct numpy loops, finite differences and (if present) torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.gradcheck import check_grads
from jaxnn.layers._conv import Conv1D, Conv2D

# -- numpy float64 references: explicit loops over outputs, taps and channels ---------


def same_pads(size, extent, stride):
    """TensorFlow's SAME rule: ceil(size / stride) outputs, odd padding on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def conv2d_loops(x, kernel, bias, strides, pads, dilation):
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    (top, bottom), (left, right) = pads
    ho = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    wo = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((n, ho, wo, cout))
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for o in range(cout):
                    acc = bias[o]
                    for p in range(kh):
                        for q in range(kw):
                            r = i * sh + p * dh - top
                            c = j * sw + q * dw - left
                            if 0 <= r < h and 0 <= c < w:  # outside: zero padding
                                for ch in range(cin):
                                    acc += x[b, r, c, ch] * kernel[p, q, ch, o]
                    y[b, i, j, o] = acc
    return y


def conv1d_loops(x, kernel, bias, stride, pad, dilation):
    n, w, cin = x.shape
    k, _, cout = kernel.shape
    lo, hi = pad
    wo = (w + lo + hi - (k - 1) * dilation - 1) // stride + 1
    y = np.zeros((n, wo, cout))
    for b in range(n):
        for i in range(wo):
            for o in range(cout):
                acc = bias[o]
                for t in range(k):
                    r = i * stride + t * dilation - lo
                    if 0 <= r < w:
                        for ch in range(cin):
                            acc += x[b, r, ch] * kernel[t, ch, o]
                y[b, i, o] = acc
    return y


def random_params(layer, x, seed=1):
    """Params shaped as ``layer.init`` makes them, drawn from N(0, 1) (a non-zero bias too).

    Shapes come from ``jax.eval_shape`` so that no initializer is compiled (each
    distinct shape of ``jax.random.uniform`` costs a compilation).
    """
    structs = jax.eval_shape(layer.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                  structs)


# -- forward numerics ---------------------------------------------------------------

CONV2D_CASES = [
    # kernel_size, strides, padding, dilation
    (3, 1, "VALID", 1),
    (3, 2, "SAME", 1),
    ((3, 2), (1, 2), "same", (2, 1)),
    (2, 2, "VALID", 2),
    ((2, 3), 1, ((1, 2), (0, 1)), 1),
    (3, (2, 3), "SAME", 2),
]


@pytest.mark.parametrize("kernel_size, strides, padding, dilation", CONV2D_CASES)
def test_conv2d_matches_numpy_loops(x64, kernel_size, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 7, 3))
    layer = Conv2D(4, kernel_size, strides=strides, padding=padding, dilation=dilation)
    params = random_params(layer, jnp.asarray(x))
    y = np.asarray(layer.apply(params, jnp.asarray(x)))

    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    ks, st, dl = pair(kernel_size), pair(strides), pair(dilation)
    if isinstance(padding, str) and padding.upper() == "SAME":
        pads = tuple(same_pads(7, (k - 1) * d + 1, s) for k, d, s in zip(ks, dl, st))
        assert y.shape[1:3] == tuple(-(-7 // s) for s in st)
    elif isinstance(padding, str):
        pads = ((0, 0), (0, 0))
    else:
        pads = padding
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    assert kernel.shape == (*ks, 3, 4)
    expected = conv2d_loops(x, kernel, bias, st, pads, dl)
    assert y.dtype == np.float64
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


CONV1D_CASES = [
    # kernel_size, strides, padding, dilation
    (3, 1, "VALID", 1),
    (3, 2, "SAME", 1),
    (2, 3, "Same", 2),
    (3, 1, 2, 2),
    (4, 2, ((0, 3),), 1),
]


@pytest.mark.parametrize("kernel_size, strides, padding, dilation", CONV1D_CASES)
def test_conv1d_matches_numpy_loops(x64, kernel_size, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3))
    layer = Conv1D(5, kernel_size, strides=strides, padding=padding, dilation=dilation)
    params = random_params(layer, jnp.asarray(x))
    y = np.asarray(layer.apply(params, jnp.asarray(x)))

    if isinstance(padding, str) and padding.upper() == "SAME":
        pad = same_pads(9, (kernel_size - 1) * dilation + 1, strides)
        assert y.shape[1] == -(-9 // strides)
    elif isinstance(padding, str):
        pad = (0, 0)
    elif isinstance(padding, int):
        pad = (padding, padding)
    else:
        pad = padding[0]
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    assert kernel.shape == (kernel_size, 3, 5)
    expected = conv1d_loops(x, kernel, bias, strides, pad, dilation)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_conv_padding_spellings_agree(x64):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 5, 2)))
    explicit = Conv2D(3, 3, padding=((1, 1), (1, 1)))
    params = random_params(explicit, x)
    y = explicit.apply(params, x)
    np.testing.assert_array_equal(Conv2D(3, 3, padding=1).apply(params, x), y)
    np.testing.assert_array_equal(Conv2D(3, 3, padding="same").apply(params, x), y)
    np.testing.assert_array_equal(Conv2D(3, 3, padding="SAME").apply(params, x), y)


def test_conv2d_without_bias(x64):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6, 2))
    layer = Conv2D(3, 2, use_bias=False)
    params = random_params(layer, jnp.asarray(x))
    assert set(params) == {"kernel"}
    kernel = np.asarray(params["kernel"])
    expected = conv2d_loops(x, kernel, np.zeros(3), (1, 1), ((0, 0), (0, 0)), (1, 1))
    np.testing.assert_allclose(layer.apply(params, jnp.asarray(x)), expected, rtol=1e-10,
                               atol=1e-10)


def test_conv2d_matches_torch_with_permuted_weights():
    torch = pytest.importorskip("torch", reason="torch is not installed; numpy loops still run")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 7, 3)).astype(np.float32)
    w_oihw = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w_oihw),
        torch.from_numpy(b), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
    ).permute(0, 2, 3, 1).numpy()
    layer = Conv2D(4, (3, 2), strides=(2, 1), padding=((1, 1), (2, 2)), dilation=(1, 2))
    params = {"kernel": jnp.asarray(w_oihw.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)}
    np.testing.assert_allclose(layer.apply(params, jnp.asarray(x)), expected, rtol=1e-4,
                               atol=1e-4)


# -- parameters and shapes ------------------------------------------------------------


def test_conv_init_param_shapes_and_glorot_range(key):
    x = jnp.zeros((2, 7, 7, 3))
    params = Conv2D(4, (3, 2)).init(key, x)
    assert jax.tree_util.tree_map(jnp.shape, params) == {"kernel": (3, 2, 3, 4), "bias": (4,)}
    limit = np.sqrt(6.0 / (3 * 2 * 3 + 3 * 2 * 4))  # fans scaled by the window size
    assert np.all(np.abs(params["kernel"]) <= limit)
    assert np.abs(params["kernel"]).max() > 0.5 * limit
    np.testing.assert_array_equal(params["bias"], np.zeros(4))

    p1 = jax.eval_shape(Conv1D(6, 5, use_bias=False).init, key, jnp.zeros((2, 9, 3)))
    assert jax.tree_util.tree_map(jnp.shape, p1) == {"kernel": (5, 3, 6)}
    p2 = jax.eval_shape(Conv2D(2, 1, dtype=jnp.bfloat16).init, key, x)
    assert p2["kernel"].dtype == jnp.bfloat16 and p2["bias"].dtype == jnp.bfloat16
    assert params["kernel"].dtype == jnp.float32


def test_conv_output_shape_matches_eval_shape(key):
    x = jnp.zeros((2, 7, 7, 3))
    layer = Conv2D(4, 3, strides=2, padding="SAME")
    params = random_params(layer, x)
    out = jax.eval_shape(layer.apply, params, x)
    assert out.shape == (2, 4, 4, 4) and out.dtype == jnp.float32
    assert layer.apply(params, x).shape == (2, 4, 4, 4)
    layer = Conv1D(2, 3, dilation=3)
    x = jnp.zeros((1, 9, 1))
    assert layer.apply(random_params(layer, x), x).shape == (1, 3, 2)


def test_conv_mixed_dtype_params_promote(key):
    x = jnp.ones((1, 5, 5, 2), jnp.float32)
    layer = Conv2D(3, 3, dtype=jnp.bfloat16)
    y = layer.apply(random_params(layer, x), x)
    assert y.dtype == jnp.float32


def test_sequential_names_and_summary(key):
    model = jaxnn.Sequential([Conv2D(4, 3, padding="SAME"), jax.nn.relu, Conv2D(2, 3),
                              jaxnn.Flatten(), jaxnn.Dense(3)])
    x = jnp.zeros((2, 7, 7, 3))
    params = random_params(model, x)
    assert params["conv2d_0"]["kernel"].shape == (3, 3, 3, 4)
    assert params["conv2d_1"]["kernel"].shape == (3, 3, 4, 2)
    assert params["dense_0"]["kernel"].shape == (5 * 5 * 2, 3)
    assert model.apply(params, x).shape == (2, 3)
    assert "Conv2D(4, (3, 3), padding='SAME')" in model.summary(x)


# -- gradients (float64, finite differences) -------------------------------------------


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2D(3, (3, 2), strides=(2, 1), padding="SAME", dilation=(1, 2)), (2, 6, 5, 2)),
    (lambda: Conv1D(3, 3, strides=2, padding="SAME", dilation=2), (2, 9, 2)),
])
def test_conv_gradients_match_finite_differences(x64, make, shape):
    rng = np.random.default_rng(5)
    layer = make()
    x = jnp.asarray(rng.standard_normal(shape))
    params = random_params(layer, x)
    target = jnp.asarray(rng.standard_normal(jax.eval_shape(layer.apply, params, x).shape))

    @jax.jit
    def loss(tree):
        y = layer.apply(tree["params"], tree["x"])
        return 0.5 * jnp.sum(jnp.tanh(y - target) ** 2)

    errors = check_grads(loss, {"params": params, "x": x})
    assert set(errors) == {"params/kernel", "params/bias", "x"}
    assert max(errors.values()) < 1e-6, errors


# -- transformations ---------------------------------------------------------------------


@pytest.mark.parametrize("layer, shape", [
    (Conv2D(4, 3, strides=2, padding="SAME"), (2, 7, 7, 3)),
    (Conv1D(4, 3, padding="SAME"), (2, 9, 3)),
])
def test_conv_jit_grad_vmap(layer, shape):
    xs = jnp.asarray(np.random.default_rng(6).standard_normal((3, *shape)), jnp.float32)
    params = random_params(layer, xs[0])
    eager = np.stack([np.asarray(layer.apply(params, x)) for x in xs])
    np.testing.assert_allclose(jax.jit(layer.apply)(params, xs[0]), eager[0], rtol=1e-5,
                               atol=1e-5)
    batched = jax.vmap(layer.apply, in_axes=(None, 0))(params, xs)
    np.testing.assert_allclose(batched, eager, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2)))(params, xs[0])
    assert jax.tree_util.tree_map(jnp.shape, grads) == jax.tree_util.tree_map(jnp.shape, params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


# -- errors -------------------------------------------------------------------------------


def test_conv_rank_error_names_layer_and_layout(key):
    model = jaxnn.Sequential([Conv2D(4, 3)])
    with pytest.raises(ValueError, match=r"Conv2D layer 'conv2d_0': expected an input of rank 4 "
                       r"\(batch, height, width, channels\), got shape \(28, 28\)"):
        model.init(key, jnp.zeros((28, 28)))
    with pytest.raises(ValueError, match=r"Conv1D layer: expected an input of rank 3 "
                       r"\(batch, width, channels\), got shape \(9, 3, 1, 1\)"):
        Conv1D(2, 3).init(key, jnp.zeros((9, 3, 1, 1)))
    params = random_params(Conv1D(2, 3), jnp.zeros((1, 9, 3)))
    with pytest.raises(ValueError, match="rank 3"):
        Conv1D(2, 3).apply(params, jnp.zeros((9, 3)))  # unbatched input is not guessed at


def test_conv_channel_mismatch_and_integer_input(key):
    model = jaxnn.Sequential([Conv2D(4, 3)])
    params = random_params(model, jnp.zeros((1, 7, 7, 3)))
    with pytest.raises(ValueError, match=r"Conv2D layer 'conv2d_0': expected input with last "
                       r"dimension \(channels\) 3, got shape \(1, 7, 7, 5\)"):
        model.apply(params, jnp.zeros((1, 7, 7, 5)))
    with pytest.raises(TypeError, match="Conv2D layer 'conv2d_0': expected a floating-point"):
        model.apply(params, jnp.zeros((1, 7, 7, 3), jnp.int32))
    with pytest.raises(TypeError, match="Conv1D layer: expected a floating-point"):
        Conv1D(2, 3).init(key, jnp.zeros((1, 9, 3), jnp.int32))


def test_conv_input_smaller_than_kernel_is_a_clear_error(key):
    with pytest.raises(ValueError, match=r"Conv2D layer: input of shape \(1, 3, 8, 1\) is too "
                       r"small for the kernel \(kernel_size \(5, 5\)\): its height is 3"):
        Conv2D(2, 5).init(key, jnp.zeros((1, 3, 8, 1)))
    with pytest.raises(ValueError, match=r"dilation 3\): its width is 6, but the window spans 7"):
        Conv1D(2, 3, dilation=3).init(key, jnp.zeros((1, 6, 1)))
    layer = Conv2D(2, 3)
    params = random_params(layer, jnp.zeros((1, 5, 5, 1)))
    with pytest.raises(ValueError, match="too small"):
        layer.apply(params, jnp.zeros((1, 2, 5, 1)))
    # Padding that makes room is fine; so is SAME.
    x = jnp.zeros((1, 3, 3, 1))
    for padding, out_shape in [(1, (1, 1, 1, 2)), ("SAME", (1, 3, 3, 2))]:
        layer = Conv2D(2, 5, padding=padding)
        assert layer.apply(random_params(layer, x), x).shape == out_shape


@pytest.mark.parametrize("kwargs, message", [
    ({"padding": "full"}, "Conv2D: padding must be 'VALID' or 'SAME'"),
    ({"padding": ((1, 1),)}, "Conv2D: padding must be"),
    ({"padding": -1}, "Conv2D: padding must be"),
    ({"strides": 0}, "Conv2D: strides must be a positive int or a tuple of 2"),
    ({"dilation": (1, 2, 3)}, "Conv2D: dilation must be"),
    ({"kernel_size": (3,)}, "Conv2D: kernel_size must be"),
    ({"filters": 0}, "Conv2D: filters must be a positive integer"),
])
def test_conv_invalid_arguments(kwargs, message):
    args = {"filters": 4, "kernel_size": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        Conv2D(args.pop("filters"), args.pop("kernel_size"), **args)
    with pytest.raises(ValueError, match="Conv1D: kernel_size must be a positive int"):
        Conv1D(4, (3, 3))
