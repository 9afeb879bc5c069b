"""Tests for SimpleRNN, LSTM and GRU against a float64 numpy loop written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.gradcheck import check_grads
from jaxnn.layers._container import Sequential, model
from jaxnn.layers._dense import Dense
from jaxnn.layers._recurrent import GRU, LSTM, SimpleRNN, gru_step, lstm_step, simple_rnn_step

KINDS = ["simple_rnn", "lstm", "gru"]
FACTORIES = {"simple_rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}
STEPS = {"simple_rnn": simple_rnn_step, "lstm": lstm_step, "gru": gru_step}
GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}


# -- the numpy reference ------------------------------------------------------


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _ref_step(kind, p, h, c, x, activation=np.tanh):
    """One step for one example (x: (F,), h, c: (u,)), written gate by gate."""
    W, U, b = p["kernel"], p["recurrent_kernel"], p["bias"]
    u = U.shape[0]
    blk = lambda a, k: a[..., k * u:(k + 1) * u]
    if kind == "simple_rnn":
        return activation(x @ W + h @ U + b), c
    if kind == "lstm":
        i = _sigmoid(x @ blk(W, 0) + h @ blk(U, 0) + blk(b, 0))
        f = _sigmoid(x @ blk(W, 1) + h @ blk(U, 1) + blk(b, 1))
        g = np.tanh(x @ blk(W, 2) + h @ blk(U, 2) + blk(b, 2))
        o = _sigmoid(x @ blk(W, 3) + h @ blk(U, 3) + blk(b, 3))
        c = f * c + i * g
        return o * np.tanh(c), c
    rb = p["recurrent_bias"]
    z = _sigmoid(x @ blk(W, 0) + blk(b, 0) + h @ blk(U, 0) + blk(rb, 0))
    r = _sigmoid(x @ blk(W, 1) + blk(b, 1) + h @ blk(U, 1) + blk(rb, 1))
    n = np.tanh(x @ blk(W, 2) + blk(b, 2) + r * (h @ blk(U, 2) + blk(rb, 2)))
    return (1 - z) * n + z * h, c


def _ref_run(kind, p, x, mask=None, h0=None, c0=None, activation=np.tanh):
    """Loop over examples and steps; padded steps keep the state and emit zeros.

    Returns (sequence outputs (N, T, u), final h (N, u), final c (N, u)).
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    n_batch, n_time, _ = x.shape
    u = p["recurrent_kernel"].shape[0]
    hs = np.zeros((n_batch, u)) if h0 is None else np.array(h0, np.float64)
    cs = np.zeros((n_batch, u)) if c0 is None else np.array(c0, np.float64)
    ys = np.zeros((n_batch, n_time, u))
    for n in range(n_batch):
        for t in range(n_time):
            if mask is not None and not mask[n, t]:
                continue
            hs[n], cs[n] = _ref_step(kind, p, hs[n], cs[n], x[n, t], activation)
            ys[n, t] = hs[n]
    return ys, hs, cs


def _random_params(kind, features, units, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    g = GATES[kind] * units
    p = {
        "kernel": scale * rng.normal(size=(features, g)),
        "recurrent_kernel": scale * rng.normal(size=(units, g)),
        "bias": scale * rng.normal(size=(g,)),
    }
    if kind == "gru":
        p["recurrent_bias"] = scale * rng.normal(size=(g,))
    return {k: jnp.asarray(v) for k, v in p.items()}


def _random_like_init(net, key, *inputs, seed=0, scale=0.5):
    """Parameters of the structure, shapes and dtypes ``net.init`` gives (traced, not run:
    initialisation is tested below, and would compile a program here) with random values."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype),
        jax.eval_shape(net.init, key, *inputs))


def _random_input(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- numerics -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cell_step_matches_numpy(x64, kind):
    p = _random_params(kind, 3, 4)
    x_t = _random_input((2, 3), seed=2)
    h = _random_input((2, 4), seed=3)
    c = _random_input((2, 4), seed=4)
    carry = (h, c) if kind == "lstm" else h
    new_carry, out = STEPS[kind](p, carry, x_t)
    for n in range(2):
        want_h, want_c = _ref_step(kind, {k: np.asarray(v) for k, v in p.items()},
                                   np.asarray(h[n]), np.asarray(c[n]), np.asarray(x_t[n]))
        _close(out[n], want_h)
        if kind == "lstm":
            _close(new_carry[0][n], want_h)
            _close(new_carry[1][n], want_c)
        else:
            _close(new_carry[n], want_h)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_numpy_loop(x64, kind):
    n_batch, n_time, features, units = 3, 5, 4, 6
    p = _random_params(kind, features, units)
    x = _random_input((n_batch, n_time, features))
    make = FACTORIES[kind]

    lengths = np.array([5, 2, 0])
    last, full = make(units), make(units, return_sequences=True, return_state=True)

    @jax.jit  # the four calls in one compiled program
    def run(p, x, lengths_array):
        return (last.apply(p, x), full.apply(p, x),
                last.apply(p, x, lengths=lengths.tolist()),  # a list is accepted too
                full.apply(p, x, lengths=lengths_array))

    got_h, (seq, carry), got_h_masked, (seq_masked, carry_masked) = run(
        p, x, jnp.asarray(lengths))

    ys, h, c = _ref_run(kind, p, x)
    _close(got_h, h)
    _close(seq, ys)
    if kind == "lstm":
        _close(carry[0], h)
        _close(carry[1], c)
    else:
        _close(carry, h)

    mask = np.arange(n_time)[None, :] < lengths[:, None]
    ys, h, c = _ref_run(kind, p, x, mask=mask)
    _close(got_h_masked, h)
    seq, carry = seq_masked, carry_masked
    _close(seq, ys)
    assert np.all(np.asarray(seq)[1, 2:] == 0) and np.all(np.asarray(seq)[2] == 0)
    if kind == "lstm":
        _close(carry[1], c)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_mask_with_holes_and_initial_state(x64, kind):
    n_batch, n_time, features, units = 2, 5, 3, 4
    p = _random_params(kind, features, units, seed=5)
    x = _random_input((n_batch, n_time, features), seed=6)
    mask = np.array([[True, False, True, True, False], [False, True, True, False, True]])
    h0 = np.asarray(_random_input((n_batch, units), seed=7))
    c0 = np.asarray(_random_input((n_batch, units), seed=8))
    init = (jnp.asarray(h0), jnp.asarray(c0)) if kind == "lstm" else jnp.asarray(h0)

    ys, h, c = _ref_run(kind, p, x, mask=mask, h0=h0, c0=c0)
    layer = FACTORIES[kind](units, return_sequences=True, return_state=True)
    seq, carry = layer.apply(p, x, mask=jnp.asarray(mask), initial_state=init)
    _close(seq, ys)
    _close(carry[0] if kind == "lstm" else carry, h)
    if kind == "lstm":
        _close(carry[1], c)


def test_simple_rnn_custom_activation(x64):
    p = _random_params("simple_rnn", 3, 4, seed=9)
    x = _random_input((2, 4, 3), seed=10)
    _, h, _ = _ref_run("simple_rnn", p, x, activation=lambda a: np.maximum(a, 0.0))
    _close(SimpleRNN(4, activation=jax.nn.relu).apply(p, x), h)


def test_sequential_lstm_then_dense(x64, key):
    x = _random_input((3, 4, 5), seed=11)
    net = Sequential([LSTM(8), Dense(3)])
    params = _random_like_init(net, key, x)
    assert sorted(params) == ["dense_0", "lstm_0"]
    assert params["lstm_0"]["kernel"].shape == (5, 32)
    y = net.apply(params, x)
    _, h, _ = _ref_run("lstm", params["lstm_0"], x)
    want = h @ np.asarray(params["dense_0"]["kernel"]) + np.asarray(params["dense_0"]["bias"])
    _close(y, want)
    assert "LSTM(8)" in net.summary(x)


def test_functional_model_passes_lengths(x64, key):
    @model
    def encoder(nn, x, lengths):
        return nn(GRU(4), x, lengths=lengths)

    x = _random_input((2, 5, 3), seed=12)
    lengths = jnp.array([3, 5])
    params = _random_like_init(encoder, key, x, lengths)
    mask = np.arange(5)[None, :] < np.asarray(lengths)[:, None]
    _, h, _ = _ref_run("gru", params["gru_0"], x, mask=mask)
    _close(encoder.apply(params, x, lengths), h)


# -- initialisation -------------------------------------------------------------


def _shapes(layer, x, key):
    return {k: v.shape for k, v in jax.eval_shape(layer.init, key, x).items()}


def test_initial_parameters(key):
    x = jnp.zeros((2, 3, 5), jnp.float32)
    # both initialisations in one compiled program
    lstm, no_forget_bias = jax.jit(lambda key: (
        LSTM(4).init(key, x), LSTM(4, unit_forget_bias=False).init(key, x)))(key)
    assert {k: (v.shape, v.dtype) for k, v in lstm.items()} == {
        "kernel": ((5, 16), jnp.float32), "recurrent_kernel": ((4, 16), jnp.float32),
        "bias": ((16,), jnp.float32)}
    want_bias = np.concatenate([np.zeros(4), np.ones(4), np.zeros(8)])
    np.testing.assert_array_equal(lstm["bias"], want_bias)
    np.testing.assert_array_equal(no_forget_bias["bias"], np.zeros(16))
    u = np.asarray(lstm["recurrent_kernel"], np.float64)
    np.testing.assert_allclose(u @ u.T, np.eye(4), atol=1e-5)  # orthogonal rows
    limit = np.sqrt(6.0 / (5 + 16))  # Glorot uniform on (F, 4u)
    assert np.all(np.abs(np.asarray(lstm["kernel"])) <= limit)

    assert _shapes(GRU(4), x, key) == {
        "kernel": (5, 12), "recurrent_kernel": (4, 12), "bias": (12,), "recurrent_bias": (12,)}
    assert _shapes(SimpleRNN(4), x, key) == {
        "kernel": (5, 4), "recurrent_kernel": (4, 4), "bias": (4,)}


def test_param_dtype_follows_input(x64, key):
    x = jnp.zeros((1, 2, 2), jnp.float64)
    params = jax.eval_shape(GRU(3).init, key, x)
    assert all(v.dtype == jnp.float64 for v in params.values())
    params = jax.eval_shape(GRU(3, dtype=jnp.float32).init, key, x)
    assert all(v.dtype == jnp.float32 for v in params.values())


# -- gradients and transformations ---------------------------------------------------


def test_gradients_match_finite_differences(x64):
    # The three kinds in one check (one program for the loss, one for its gradient), each
    # with parameters and an input of its own: an error per leaf, per kind.
    n_batch, n_time, features, units = 2, 3, 3, 4
    weights = _random_input((n_batch, n_time, units), seed=15)
    lengths = jnp.array([3, 2])
    layers = {kind: FACTORIES[kind](units, return_sequences=True, return_state=True)
              for kind in KINDS}
    tree = {kind: {"params": _random_params(kind, features, units, seed=13),
                   "x": _random_input((n_batch, n_time, features), seed=14)} for kind in KINDS}

    @jax.jit
    def loss(tree):
        total = 0.0
        for kind, layer in layers.items():
            seq, carry = layer.apply(tree[kind]["params"], tree[kind]["x"], lengths=lengths)
            last = carry[1] if kind == "lstm" else carry  # LSTM: also through c
            total = total + jnp.sum(seq * weights) + jnp.sum(jnp.sin(last))
        return total

    errors = check_grads(loss, tree, max_coords=24)
    assert len(errors) == 3 + 3 + 4 + 3  # every parameter of each kind, and each input
    assert max(errors.values()) < 1e-6, errors


def test_jit_grad_and_vmap(key):
    x = jnp.asarray(_random_input((3, 2, 4, 3)), jnp.float32)  # 3 batches of (2, 4, 3)
    layer = LSTM(5, return_sequences=True)
    params = _random_like_init(layer, key, x[0])

    apply = jax.jit(layer.apply)
    eager = layer.apply(params, x[0])
    np.testing.assert_allclose(apply(params, x[0]), eager, rtol=1e-5, atol=1e-6)

    batched = jax.jit(jax.vmap(layer.apply, in_axes=(None, 0)))(params, x)
    for b in range(3):
        np.testing.assert_allclose(batched[b], apply(params, x[b]), rtol=1e-5, atol=1e-6)

    # correctness of gradients: test_gradients_match_finite_differences
    loss = lambda p, x: jnp.sum(layer.apply(p, x) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x[0])
    assert jax.tree_util.tree_structure(grads[0]) == jax.tree_util.tree_structure(params)
    assert grads[1].shape == x[0].shape
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))

    # the cell on a single example (no batch axis), vmapped over the batch
    h = jnp.zeros((2, 5))
    carry, out = jax.jit(jax.vmap(lstm_step, in_axes=(None, 0, 0)))(params, (h, h), x[0, :, 0])
    want_carry, want_out = jax.jit(lstm_step)(params, (h, h), x[0, :, 0])
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(carry[1], want_carry[1], rtol=1e-6, atol=1e-6)


def _dot_counts(jaxpr):
    """(dot_generals outside any scan, dot_generals inside scan bodies)."""
    outside = inside = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            inside += sum(e.primitive.name == "dot_general" for e in body.eqns)
        elif eqn.primitive.name == "dot_general":
            outside += 1
    return outside, inside


@pytest.mark.parametrize("kind", KINDS)
def test_input_projection_placement(kind, key):
    # All at once (GPU/TPU): one matmul before the scan, only h @ recurrent_kernel inside.
    # Each step (CPU): x_t @ kernel inside the scan as well. Both give the same values.
    # Inputs and parameters from numpy (initialisation is tested above; here it would
    # only compile its programs again for each kind).
    x = jnp.asarray(np.random.default_rng(18).normal(size=(2, 6, 3)), jnp.float32)
    by_backend = FACTORIES[kind](4, return_sequences=True)
    fixed = {placement: FACTORIES[kind](4, return_sequences=True, projection=placement)
             for placement in ("all_at_once", "each_step")}
    params = {k: v.astype(jnp.float32) for k, v in _random_params(kind, 3, 4, seed=18).items()}
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
        jnp.shape, jax.eval_shape(by_backend.init, key, x))

    def run(layer):
        return lambda p, x: layer.apply(p, x, lengths=jnp.array([6, 2]))

    for placement, counts in (("all_at_once", (1, 1)), ("each_step", (0, 2))):
        assert _dot_counts(jax.make_jaxpr(run(fixed[placement]))(params, x).jaxpr) == counts
    # the three in one compiled program
    outputs = jax.jit(lambda p, x: [run(layer)(p, x) for layer in (by_backend, *fixed.values())])(
        params, x)
    for got in outputs[1:]:
        np.testing.assert_allclose(got, outputs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_option_is_checked(kind):
    name = FACTORIES[kind].__name__
    with pytest.raises(ValueError, match=f"{name}: projection must be None .*'sideways'"):
        FACTORIES[kind](4, projection="sideways")


# -- errors ------------------------------------------------------------------------


def _zero_params(layer, key, x):
    """Parameters of the right shapes without running (and compiling) the initialisers:
    the errors below are raised from the shapes alone."""
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  jax.eval_shape(layer.init, key, x))


def test_errors_name_the_layer_and_the_shapes(key):
    x = jnp.zeros((2, 4, 3))
    params = _zero_params(LSTM(5), key, x)
    with pytest.raises(ValueError, match=r"LSTM layer.*rank 3.*\(4, 3\)"):
        LSTM(5).apply(params, x[0])
    with pytest.raises(ValueError, match=r"rank 3.*\(batch, time, features\)"):
        GRU(5).init(key, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"features\) 3, got shape \(2, 4, 7\)"):
        LSTM(5).apply(params, jnp.zeros((2, 4, 7)))
    with pytest.raises(TypeError, match=r"SimpleRNN layer: expected a floating-point.*int32"):
        SimpleRNN(5).init(key, jnp.zeros((2, 4, 3), jnp.int32))
    with pytest.raises(TypeError, match="floating-point"):
        LSTM(5).apply(params, jnp.zeros((2, 4, 3), jnp.int32))

    net = Sequential([LSTM(5), Dense(2)])
    net_params = _zero_params(net, key, x)
    with pytest.raises(ValueError, match=r"LSTM layer 'lstm_0'.*features\) 3"):
        net.apply(net_params, jnp.zeros((2, 4, 6)))


def test_errors_for_masks_and_initial_state(key):
    x = jnp.zeros((2, 4, 3))
    layer = LSTM(5)
    params = _zero_params(layer, key, x)
    with pytest.raises(ValueError, match="either lengths= or mask="):
        layer.apply(params, x, lengths=jnp.array([1, 2]), mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"lengths must have shape \(batch,\) = \(2,\).*\(3,\)"):
        layer.apply(params, x, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(TypeError, match="lengths must hold integers"):
        layer.apply(params, x, lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        layer.apply(params, x, mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"mask must have shape .* \(2, 4\).*\(4, 2\)"):
        layer.apply(params, x, mask=jnp.ones((4, 2), bool))
    with pytest.raises(TypeError, match=r"initial_state must be the pair \(h, c\)"):
        layer.apply(params, x, initial_state=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"initial_state c must have shape .*\(2, 5\)"):
        layer.apply(params, x, initial_state=(jnp.zeros((2, 5)), jnp.zeros((2, 4))))
    with pytest.raises(ValueError, match=r"initial_state must have shape .*\(2, 5\)"):
        GRU(5).apply(_zero_params(GRU(5), key, x), x, initial_state=jnp.zeros((5,)))
    with pytest.raises(ValueError, match="units must be a positive integer"):
        GRU(0)
    with pytest.raises(TypeError, match="activation must be callable"):
        SimpleRNN(3, activation="tanh")


# -- optional: PyTorch with transferred weights ----------------------------------------


def _to_torch_gates(a, units):
    """Our GRU gate order [z, r, n] -> PyTorch's [r, z, n] along the last axis."""
    z, r, n = np.split(a, 3, axis=-1)
    return np.concatenate([r, z, n], axis=-1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_torch_with_transferred_weights(x64, kind):
    torch = pytest.importorskip("torch", reason="torch is not installed; numpy reference "
                                "tests cover the formulas")
    features, units = 3, 4
    p = {k: np.asarray(v) for k, v in _random_params(kind, features, units, seed=16).items()}
    x = np.asarray(_random_input((2, 5, features), seed=17))
    module_cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    module = module_cls(features, units, batch_first=True).double()
    if kind == "lstm":  # same gate order; PyTorch's two biases only appear as a sum
        w_ih, w_hh = p["kernel"].T, p["recurrent_kernel"].T
        b_ih, b_hh = p["bias"], np.zeros_like(p["bias"])
    else:
        w_ih = _to_torch_gates(p["kernel"], units).T
        w_hh = _to_torch_gates(p["recurrent_kernel"], units).T
        b_ih = _to_torch_gates(p["bias"], units)
        b_hh = _to_torch_gates(p["recurrent_bias"], units)
    with torch.no_grad():
        for name, value in [("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh),
                            ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)]:
            getattr(module, name).copy_(torch.from_numpy(np.array(value)))  # a writable copy
        want, _ = module(torch.from_numpy(np.array(x)))
    got = FACTORIES[kind](units, return_sequences=True).apply(
        {k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(x))
    _close(got, want.numpy())
