"""Bidirectional against a float64 numpy loop, finite differences and PyTorch's
bidirectional LSTM and GRU (packed variable-length sequences included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.gradcheck import check_grads
from jaxnn.layers._bidirectional import Bidirectional
from jaxnn.layers._container import Sequential
from jaxnn.layers._dense import Dense
from jaxnn.layers._recurrent import GRU, LSTM, SimpleRNN

FACTORIES = {"simple_rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}
GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}

# -- the numpy reference ------------------------------------------------------


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _step(kind, p, h, c, x):
    """One step for one example, from the formulas in the layers' docstrings."""
    W, U, b = p["kernel"], p["recurrent_kernel"], p["bias"]
    u = U.shape[0]
    if kind == "simple_rnn":
        return np.tanh(x @ W + h @ U + b), c
    s = x @ W + b
    if kind == "lstm":
        s = s + h @ U
        i, f, g, o = (s[k * u:(k + 1) * u] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        return _sigmoid(o) * np.tanh(c), c
    r_s = h @ U + p["recurrent_bias"]
    z = _sigmoid(s[:u] + r_s[:u])
    r = _sigmoid(s[u:2 * u] + r_s[u:2 * u])
    n = np.tanh(s[2 * u:] + r * r_s[2 * u:])
    return (1 - z) * n + z * h, c


def _direction(kind, p, x, steps, h0, c0):
    """Run over the time indices ``steps`` in that order: (outputs (T, u), h, c)."""
    u = p["recurrent_kernel"].shape[0]
    h, c = h0.copy(), c0.copy()
    ys = np.zeros((x.shape[0], u))
    for t in steps:
        h, c = _step(kind, p, h, c, x[t])
        ys[t] = h
    return ys, h, c


def bidirectional_reference(kind, p_f, p_b, x, mask=None, initial=None):
    """Per example: the forward direction over its real steps in order, the backward one
    over the same steps in reverse. Returns (seq_f, seq_b, (h_f, c_f), (h_b, c_b)), with
    sequences (N, T, u) zero at padded steps and final states (N, u)."""
    p_f = {k: np.asarray(v, np.float64) for k, v in p_f.items()}
    p_b = {k: np.asarray(v, np.float64) for k, v in p_b.items()}
    x = np.asarray(x, np.float64)
    n, t = x.shape[:2]
    mask = np.ones((n, t), bool) if mask is None else np.asarray(mask)
    u_f, u_b = p_f["recurrent_kernel"].shape[0], p_b["recurrent_kernel"].shape[0]
    zeros = lambda u: np.zeros((n, u))  # noqa: E731
    (hf0, cf0), (hb0, cb0) = initial or ((zeros(u_f), zeros(u_f)), (zeros(u_b), zeros(u_b)))
    out = [np.zeros((n, t, u_f)), np.zeros((n, t, u_b)),
           (zeros(u_f), zeros(u_f)), (zeros(u_b), zeros(u_b))]
    for i in range(n):
        real = [s for s in range(t) if mask[i, s]]
        out[0][i], out[2][0][i], out[2][1][i] = _direction(kind, p_f, x[i], real,
                                                           hf0[i], cf0[i])
        out[1][i], out[3][0][i], out[3][1][i] = _direction(kind, p_b, x[i], real[::-1],
                                                           hb0[i], cb0[i])
    return out


def _random_params(kind, features, units, rng, scale=0.5):
    g = GATES[kind] * units
    p = {"kernel": rng.normal(size=(features, g)), "recurrent_kernel": rng.normal(size=(units, g)),
         "bias": rng.normal(size=(g,))}
    if kind == "gru":
        p["recurrent_bias"] = rng.normal(size=(g,))
    return {k: jnp.asarray(scale * v) for k, v in p.items()}


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


MERGED = {"concat": lambda a, b: np.concatenate([a, b], -1), "sum": np.add,
          "mean": lambda a, b: (a + b) / 2, "mul": np.multiply}

# -- numerics -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_sequences_and_last_states_match_numpy(x64, kind):
    rng = np.random.default_rng(0)
    n, t, f, u = 3, 5, 3, 4
    params = {"forward": _random_params(kind, f, u, rng),
              "backward": _random_params(kind, f, u, rng)}
    x = jnp.asarray(rng.normal(size=(n, t, f)))
    lengths = np.array([5, 2, 3])
    mask = np.arange(t)[None, :] < lengths[:, None]
    make = FACTORIES[kind]
    seq_f, seq_b, (h_f, _), (h_b, _) = bidirectional_reference(
        kind, params["forward"], params["backward"], x, mask)

    seq = Bidirectional(make(u, return_sequences=True))
    last = Bidirectional(make(u), merge="mul")
    run = jax.jit(lambda p, x, lengths: (seq.apply(p, x, lengths=lengths),
                                         last.apply(p, x, lengths=lengths)))
    got_seq, got_last = run(params, x, jnp.asarray(lengths))
    _close(got_seq, np.concatenate([seq_f, seq_b], -1))
    assert np.all(np.asarray(got_seq)[1, 2:] == 0)  # padded steps are zeros
    # The backward direction's last state is its state at time 0.
    _close(got_last, h_f * h_b)
    _close(got_last, h_f * seq_b[:, 0])


def test_full_length_merges_state_and_initial_state(x64):
    rng = np.random.default_rng(1)
    n, t, f, u = 2, 4, 3, 3
    params = {"forward": _random_params("lstm", f, u, rng),
              "backward": _random_params("lstm", f, u, rng)}
    x = jnp.asarray(rng.normal(size=(n, t, f)))
    initial = tuple((rng.normal(size=(n, u)), rng.normal(size=(n, u))) for _ in range(2))
    seq_f, seq_b, carry_f, carry_b = bidirectional_reference(
        "lstm", params["forward"], params["backward"], x, initial=initial)
    layers = {merge: Bidirectional(LSTM(u, return_sequences=True, return_state=True),
                                   merge=merge) for merge in MERGED}
    init = jax.tree_util.tree_map(jnp.asarray, initial)
    outs = jax.jit(lambda p, x, init: {m: layer.apply(p, x, initial_state=init)
                                       for m, layer in layers.items()})(params, x, init)
    for merge, (y, (got_f, got_b)) in outs.items():
        _close(y, MERGED[merge](seq_f, seq_b))
        for got, want in ((got_f, carry_f), (got_b, carry_b)):
            _close(got[0], want[0])
            _close(got[1], want[1])


def test_mask_with_holes_and_backward_layer(x64, key):
    rng = np.random.default_rng(2)
    n, t, f = 2, 5, 3
    mask = np.array([[True, False, True, True, False], [False, True, True, False, True]])
    layer = Bidirectional(GRU(4, return_sequences=True),
                          backward_layer=GRU(2, return_sequences=True))
    x = jnp.asarray(rng.normal(size=(n, t, f)))
    shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(layer.init, key, x))
    assert shapes == {
        "forward": {"kernel": (3, 12), "recurrent_kernel": (4, 12), "bias": (12,),
                    "recurrent_bias": (12,)},
        "backward": {"kernel": (3, 6), "recurrent_kernel": (2, 6), "bias": (6,),
                     "recurrent_bias": (6,)}}
    params = {"forward": _random_params("gru", f, 4, rng),
              "backward": _random_params("gru", f, 2, rng)}
    seq_f, seq_b, _, _ = bidirectional_reference("gru", params["forward"], params["backward"],
                                                 x, mask)
    y = jax.jit(lambda p, x, m: layer.apply(p, x, mask=m))(params, x, jnp.asarray(mask))
    assert y.shape == (n, t, 6)
    _close(y, np.concatenate([seq_f, seq_b], -1))


def test_init_in_sequential_and_summary(key):
    x = jnp.zeros((2, 4, 3), jnp.float32)
    net = Sequential([Bidirectional(LSTM(5)), Dense(2)])
    params = net.init(key, x)
    assert sorted(params) == ["bidirectional_0", "dense_0"]
    bi = params["bidirectional_0"]
    assert sorted(bi) == ["backward", "forward"]
    assert bi["forward"]["kernel"].shape == bi["backward"]["kernel"].shape == (3, 20)
    # Two copies with their own parameters, not one shared set.
    assert not np.allclose(bi["forward"]["kernel"], bi["backward"]["kernel"])
    assert params["dense_0"]["kernel"].shape == (10, 2)
    summary = net.summary(x)
    assert "Bidirectional(LSTM(5))" in summary and "(2, 10)" in summary
    assert repr(Bidirectional(GRU(3), merge="sum")) == "Bidirectional(GRU(3), merge='sum')"


def test_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(3)
    n, t, f, u = 2, 3, 2, 3
    layer = Bidirectional(LSTM(u, return_sequences=True, return_state=True), merge="mean")
    tree = {"params": {"forward": _random_params("lstm", f, u, rng),
                       "backward": _random_params("lstm", f, u, rng)},
            "x": jnp.asarray(rng.normal(size=(n, t, f)))}
    weights = jnp.asarray(rng.normal(size=(n, t, u)))
    lengths = jnp.array([3, 2])

    @jax.jit
    def loss(tree):
        y, (carry_f, carry_b) = layer.apply(tree["params"], tree["x"], lengths=lengths)
        return jnp.sum(y * weights) + jnp.sum(jnp.sin(carry_f[1])) + jnp.sum(carry_b[1] ** 2)

    errors = check_grads(loss, tree, max_coords=12)
    assert len(errors) == 7 and max(errors.values()) < 1e-6, errors


# -- errors ---------------------------------------------------------------------


def test_errors(key):
    x = jnp.zeros((2, 4, 3))
    with pytest.raises(TypeError, match="Bidirectional: layer must be a jaxnn Layer"):
        Bidirectional(lambda x: x)
    with pytest.raises(TypeError, match="backward_layer must be a jaxnn Layer or None"):
        Bidirectional(LSTM(3), backward_layer="lstm")
    with pytest.raises(ValueError, match="merge must be one of 'concat', 'sum', 'mean', "
                                         "'mul', got 'max'"):
        Bidirectional(LSTM(3), merge="max")

    def params_of(layer):  # zeros of the declared shapes, without running the initialisers
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                      jax.eval_shape(layer.init, key, x))

    def trace(layer, params, x, **kw):  # errors are raised while tracing: nothing compiles
        return jax.eval_shape(lambda p, x: layer.forward(p, {}, x, **kw), params, x)

    mixed = Bidirectional(LSTM(3, return_sequences=True), backward_layer=LSTM(3))
    with pytest.raises(ValueError, match=r"must agree on return_sequences and return_state.*"
                                         r"\(2, 4, 3\) and \(2, 3\)"):
        trace(mixed, params_of(mixed), x)
    uneven = Bidirectional(GRU(3), backward_layer=GRU(2), merge="sum")
    with pytest.raises(ValueError, match=r"merge='sum' needs .* same shape, got \(2, 3\) "
                                         r"\(forward\) and \(2, 2\) \(backward\)"):
        trace(uneven, params_of(uneven), x)
    layer = Bidirectional(LSTM(3))
    params = params_of(layer)
    with pytest.raises(ValueError, match=r"Bidirectional layer.*lengths must have shape "
                                         r"\(batch,\) = \(2,\)"):
        trace(layer, params, x, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(TypeError, match=r"initial_state must be the pair \(forward_initial, "
                                        "backward_initial\\)"):
        trace(layer, params, x, initial_state=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"Bidirectional layer.*rank 3 \(batch, time, "
                                         r"features\).*\(4, 3\)"):
        layer.init(key, x[0])
    # Errors inside a direction name it.
    net = Sequential([layer])
    with pytest.raises(ValueError, match=r"LSTM layer 'bidirectional_0/forward'.*features\) 3"):
        trace(net, {"bidirectional_0": params}, jnp.zeros((2, 4, 5)))


# -- optional: PyTorch's bidirectional LSTM and GRU with copied weights -------------------


def _torch_order(kind, a):
    """Our GRU gate blocks [z, r, n] -> PyTorch's [r, z, n] along the last axis."""
    if kind != "gru":
        return a
    z, r, n = np.split(a, 3, axis=-1)
    return np.concatenate([r, z, n], axis=-1)


def _torch_weights(kind, p):
    """PyTorch's (weight_ih, weight_hh, bias_ih, bias_hh) for our params."""
    p = {k: np.asarray(v) for k, v in p.items()}
    b_hh = p["recurrent_bias"] if kind == "gru" else np.zeros_like(p["bias"])
    return (_torch_order(kind, p["kernel"]).T, _torch_order(kind, p["recurrent_kernel"]).T,
            _torch_order(kind, p["bias"]), _torch_order(kind, b_hh))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_torch_packed_with_gradients(x64, kind):
    torch = pytest.importorskip("torch", reason="torch is not installed; the numpy "
                                "reference tests cover the formulas")
    pack = torch.nn.utils.rnn
    rng = np.random.default_rng(4)
    n, t, f, u = 3, 5, 3, 4
    params = {"forward": _random_params(kind, f, u, rng),
              "backward": _random_params(kind, f, u, rng)}
    x = rng.normal(size=(n, t, f))
    w_seq, w_last = rng.normal(size=(n, t, 2 * u)), rng.normal(size=(n, 2 * u))
    lengths = np.array([5, 2, 4])

    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(
        f, u, batch_first=True, bidirectional=True).double()
    with torch.no_grad():
        for suffix, part in (("", "forward"), ("_reverse", "backward")):
            for name, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                                   _torch_weights(kind, params[part])):
                getattr(module, f"{name}_l0{suffix}").copy_(torch.from_numpy(np.array(value)))
    xt = torch.from_numpy(x).requires_grad_(True)
    packed = pack.pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=True,
                                       enforce_sorted=False)
    out, h_n = module(packed)
    h_n, c_n = h_n if kind == "lstm" else (h_n, None)
    seq, _ = pack.pad_packed_sequence(out, batch_first=True, total_length=t)
    last = torch.cat([h_n[0], h_n[1]], dim=-1)
    ((seq * torch.from_numpy(w_seq)).sum() + (last * torch.from_numpy(w_last)).sum()).backward()

    # The sequences and the final states of one layer (return_sequences=False, the merged
    # final states, is checked against numpy in test_sequences_and_last_states_match_numpy)
    layer = Bidirectional(FACTORIES[kind](u, return_sequences=True, return_state=True))

    def loss(p, x):
        y_seq, carries = layer.apply(p, x, lengths=jnp.asarray(lengths))
        hs = [carry[0] if kind == "lstm" else carry for carry in carries]
        y_last = jnp.concatenate(hs, axis=-1)
        return jnp.sum(y_seq * w_seq) + jnp.sum(y_last * w_last), (y_seq, y_last, carries)

    (_, (y_seq, y_last, carries)), (grad_p, grad_x) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    _close(y_seq, seq.detach().numpy())
    _close(y_last, last.detach().numpy())
    if kind == "lstm":  # the cell states too
        _close(carries[0][1], c_n[0].detach().numpy())
        _close(carries[1][1], c_n[1].detach().numpy())
    _close(grad_x, xt.grad.numpy())
    for suffix, part in (("", "forward"), ("_reverse", "backward")):
        g_ih, g_hh, gb_ih, gb_hh = (getattr(module, f"{name}_l0{suffix}").grad.numpy()
                                    for name in ("weight_ih", "weight_hh", "bias_ih",
                                                 "bias_hh"))
        want = _torch_weights(kind, grad_p[part])  # the same transfer, applied to gradients
        _close(want[0], g_ih)
        _close(want[1], g_hh)
        _close(want[2], gb_ih)
        _close(want[3] if kind == "gru" else want[2], gb_hh)
