"""MultiHeadAttention, TransformerEncoderBlock and the position embeddings: against a
float64 numpy loop written from the formulas, against PyTorch with copied weights
(outputs and gradients), finite differences, the fused path against the formula,
dropout, and the error messages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import regularizers
from jaxnn.errors import ParamsMismatchError
from jaxnn.gradcheck import check_grads
from jaxnn.layers import _attention
from jaxnn.layers._attention import MultiHeadAttention, attend_explicit, attend_fused
from jaxnn.layers._container import Sequential
from jaxnn.layers._position import PositionEmbedding, SinusoidalPositionEmbedding
from jaxnn.layers._transformer import TransformerEncoderBlock

N, L, D, H = 2, 5, 8, 2


def _rand(shape, seed, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=shape)


def _params_like(layer, *inputs, seed=0, scale=0.5):
    """Random parameters of the structure, shapes and dtypes ``layer.init`` gives
    (traced, not run: initialisation compiles programs of its own)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype),
        jax.eval_shape(layer.init, jax.random.key(0), *inputs))


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _padding(lengths, lk):
    """``(N, 1, 1, Lk)``: True for the first ``lengths[n]`` keys of example ``n``."""
    return (np.arange(lk)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


# -- the numpy reference ------------------------------------------------------


def _ref_mha(p, q, k, v, heads, mask=None, causal=False):
    """Head by head, query by query; a query allowed no key gives a zero head output."""
    p = jax.tree_util.tree_map(np.asarray, p)
    dense = lambda e, x: x @ e["kernel"] + e.get("bias", 0.0)
    qp, kp, vp = dense(p["query"], q), dense(p["key"], k), dense(p["value"], v)
    n_batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    ks, vs = qp.shape[-1] // heads, vp.shape[-1] // heads
    allowed = np.ones((n_batch, heads, lq, lk), bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, allowed.shape)
    if causal:
        allowed &= np.tril(np.ones((lq, lk), bool))
    out = np.zeros((n_batch, lq, heads * vs))
    for n in range(n_batch):
        for h in range(heads):
            for i in range(lq):
                a = allowed[n, h, i]
                if not a.any():
                    continue
                s = kp[n, a, h * ks:(h + 1) * ks] @ qp[n, i, h * ks:(h + 1) * ks] / np.sqrt(ks)
                w = np.exp(s - s.max())
                out[n, i, h * vs:(h + 1) * vs] = (w / w.sum()) @ vp[n, a, h * vs:(h + 1) * vs]
    return dense(p["output"], out)


def _ref_layernorm(p, x, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["offset"])


def _ref_block(p, x, heads, mask=None):
    h = x + _ref_mha(p["attention"], *(3 * (_ref_layernorm(p["norm_0"], x),)), heads, mask)
    m = _ref_layernorm(p["norm_1"], h) @ np.asarray(p["mlp_0"]["kernel"]) + np.asarray(
        p["mlp_0"]["bias"])
    return h + np.maximum(m, 0) @ np.asarray(p["mlp_1"]["kernel"]) + np.asarray(
        p["mlp_1"]["bias"])


# (id, layer, input shapes, mask, call keywords)
MASK_ROW = np.ones((N, H, L, L), bool)
MASK_ROW[0, 1, 2] = False        # one query of one head may attend to nothing
MASK_ROW[1, :, :, 3] = False
REF_CASES = [
    ("self", MultiHeadAttention(H), [(N, L, D)], None, {}),
    ("cross", MultiHeadAttention(H), [(N, L, D), (N, 3, 6)], None, {}),
    ("qkv_sizes", MultiHeadAttention(H, key_size=3, value_size=5, output_size=4),
     [(N, L, D), (N, 4, 6), (N, 4, 7)], None, {}),
    ("padding", MultiHeadAttention(H), [(N, L, D)], _padding([5, 2], L), {}),
    ("causal", MultiHeadAttention(H, causal=True), [(N, L, D)], None, {}),
    ("causal_call", MultiHeadAttention(H), [(N, L, D)], None, {"causal": True}),
    ("full_mask_rows", MultiHeadAttention(H, use_bias=False), [(N, L, D)], MASK_ROW, {}),
    ("causal_cross_mask", MultiHeadAttention(H, causal=True), [(N, L, D), (N, 4, D)],
     _padding([4, 1], 4), {}),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[c[0] for c in REF_CASES])
def test_matches_numpy_reference(x64, case):
    _, layer, shapes, mask, kwargs = case
    xs = [jnp.asarray(_rand(s, seed=i + 1)) for i, s in enumerate(shapes)]
    p = _params_like(layer, *xs)
    if mask is not None:
        kwargs = {**kwargs, "mask": jnp.asarray(mask)}
    got = jax.jit(functools.partial(layer.apply, **kwargs))(p, *xs)
    q, k, v = (xs * 3)[:3] if len(xs) == 1 else (xs[0], xs[1], xs[-1])
    causal = kwargs.get("causal", "causal=True" in layer.spec)
    want = _ref_mha(p, np.asarray(q), np.asarray(k), np.asarray(v), H, mask, causal)
    assert got.shape == want.shape
    _close(got, want)


def test_param_layout_and_regularizers(key):
    layer = MultiHeadAttention(4, value_size=3, output_size=5)
    x, kv = jnp.zeros((N, L, 12)), jnp.zeros((N, 3, 7))
    shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(layer.init, key, x, kv))
    assert shapes == {"query": {"kernel": (12, 12), "bias": (12,)},
                      "key": {"kernel": (7, 12), "bias": (12,)},
                      "value": {"kernel": (7, 12), "bias": (12,)},
                      "output": {"kernel": (12, 5), "bias": (5,)}}
    p = _params_like(layer, x, kv)
    kernels = sum(float(np.sum(np.asarray(p[r]["kernel"], np.float64) ** 2)) for r in p)
    np.testing.assert_allclose(float(jax.jit(regularizers.l2(0.5))(p)), 0.5 * kernels,
                               rtol=1e-6)


def test_batch_axes_vmap_and_jit_agree(x64):
    layer = MultiHeadAttention(H)
    x = jnp.asarray(_rand((N, L, D), 1))
    p = _params_like(layer, x)
    mask = jnp.asarray(_padding([3, 5], L))
    want = jax.jit(functools.partial(layer.apply, mask=mask))(p, x)
    unbatched = jax.jit(lambda p, x, m: jax.vmap(lambda xi, mi: layer.apply(p, xi, mask=mi))(
        x, m))(p, x, mask)
    _close(unbatched, want)
    two_axes = jax.jit(functools.partial(layer.apply, mask=mask[None]))(p, x[None])
    _close(two_axes[0], want)


# -- the fused path against the formula ------------------------------------------------


def test_fused_and_explicit_agree_with_gradients():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(N, L, H, 4)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.normal(size=(N, L, H, 4)), jnp.float32)
    mask = jnp.asarray(MASK_ROW)

    @jax.jit
    def both(q, k, v):
        out = []
        for m, causal in ((None, False), (mask, True)):
            for attend in (attend_fused, attend_explicit):
                f = lambda q, k, v, m=m, causal=causal, attend=attend: jnp.sum(w * (
                    _attention.zero_empty_rows(attend(q, k, v, m, causal), m, causal, L)))
                out.append(jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v))
        return out

    results = both(q, k, v)
    for fused, explicit in zip(results[::2], results[1::2]):
        jax.tree_util.tree_map(lambda a, b: _close(a, b, tol=2e-5), fused, explicit)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in fused[1] + explicit[1])


def test_which_path_runs(monkeypatch, key):
    calls = []
    real = _attention.attend_fused
    monkeypatch.setattr(_attention, "attend_fused",
                        lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))

    def fused(layer, x, **kwargs):
        calls.clear()
        jax.eval_shape(functools.partial(layer.apply, **kwargs), _params_like(layer, x), x)
        return bool(calls)

    x32 = jnp.zeros((N, L, D), jnp.float32)
    assert fused(MultiHeadAttention(H), x32)
    assert fused(MultiHeadAttention(H), x32.astype(jnp.bfloat16))
    assert fused(MultiHeadAttention(H, dropout_rate=0.5), x32)           # eval mode
    assert not fused(MultiHeadAttention(H, dropout_rate=0.5), x32, train=True, key=key)
    assert not fused(MultiHeadAttention(H, value_size=3), x32)
    with jax.enable_x64(True):
        assert not fused(MultiHeadAttention(H), jnp.zeros((N, L, D), jnp.float64))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fully_masked_query_gives_the_output_bias(dtype):
    with jax.enable_x64(dtype == "float64"):
        layer = MultiHeadAttention(H)
        x = jnp.asarray(_rand((N, L, D), 1), dtype)
        p = _params_like(layer, x)
        mask = jnp.ones((N, 1, L, L), bool).at[0, 0, 2].set(False)

        @jax.jit
        def run(p, x):
            loss = lambda p, x: jnp.sum(layer.apply(p, x, mask=mask) ** 2)
            return layer.apply(p, x, mask=mask), jax.grad(loss, argnums=(0, 1))(p, x)

        y, grads = run(p, x)
        _close(y[0, 2], p["output"]["bias"], tol=1e-6)
        assert bool(jnp.all(jnp.isfinite(y)))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_float32_layer_matches_float64_reference():
    layer = MultiHeadAttention(H, causal=True)
    x = _rand((N, L, D), 1)
    p = _params_like(layer, jnp.zeros((N, L, D), jnp.float32))
    mask = _padding([5, 3], L)
    got = jax.jit(functools.partial(layer.apply, mask=jnp.asarray(mask)))(
        p, jnp.asarray(x, jnp.float32))
    want = _ref_mha(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p),
                    x, x, x, H, mask, causal=True)
    _close(got, want, tol=1e-5)


# -- gradients --------------------------------------------------------------------


def test_finite_difference_gradients(x64):
    layer = MultiHeadAttention(H, key_size=3, value_size=2)
    q, kv = jnp.asarray(_rand((N, 3, 4), 1)), jnp.asarray(_rand((N, 4, 5), 2))
    p = _params_like(layer, q, kv)
    w = jnp.asarray(_rand((N, 3, 4), 3))
    mask = jnp.asarray(_padding([4, 2], 4))
    f = jax.jit(lambda args: jnp.sum(w * layer.apply(args[0], args[1], args[2], mask=mask,
                                                     causal=True)))
    errors = check_grads(f, (p, q, kv), max_coords=8)
    # The key bias adds q . bk to every logit of a query's row: the softmax ignores it,
    # so its gradient is zero (as PyTorch's, in test_mha_matches_torch) and the relative
    # error is rounding error over rounding error.
    del errors["0/key/bias"]
    assert max(errors.values()) < 1e-7, errors


# -- PyTorch with copied weights --------------------------------------------------


def _torch_mha(torch, p, embed, heads, kdim):
    module = torch.nn.MultiheadAttention(embed, heads, batch_first=True, kdim=kdim, vdim=kdim,
                                         dtype=torch.float64)
    t = lambda a: torch.from_numpy(np.array(a))  # a writable copy
    with torch.no_grad():
        if module._qkv_same_embed_dim:
            module.in_proj_weight.copy_(t(np.concatenate(
                [p[r]["kernel"].T for r in ("query", "key", "value")])))
        else:
            for r in ("query", "key", "value"):
                getattr(module, f"{r[0]}_proj_weight").copy_(t(p[r]["kernel"].T))
        module.in_proj_bias.copy_(t(np.concatenate([p[r]["bias"] for r in ("query", "key",
                                                                            "value")])))
        module.out_proj.weight.copy_(t(p["output"]["kernel"].T))
        module.out_proj.bias.copy_(t(p["output"]["bias"]))
    return module


def _torch_mha_grads(module, embed):
    """The gradients of the module's weights in our layout."""
    b = np.split(module.in_proj_bias.grad.numpy(), 3)
    if module._qkv_same_embed_dim:
        w = [g.T for g in np.split(module.in_proj_weight.grad.numpy(), 3)]
    else:
        w = [getattr(module, f"{r}_proj_weight").grad.numpy().T for r in "qkv"]
    grads = {r: {"kernel": w[i], "bias": b[i]} for i, r in enumerate(("query", "key", "value"))}
    grads["output"] = {"kernel": module.out_proj.weight.grad.numpy().T,
                       "bias": module.out_proj.bias.grad.numpy()}
    return grads


TORCH_CASES = ["self", "cross", "cross_kdim", "key_padding", "causal"]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_mha_matches_torch(x64, case):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed; the numpy "
                                "reference tests cover the formulas")
    kdim = 6 if case == "cross_kdim" else D
    q = _rand((N, L, D), 1)
    kv = q if case in ("self", "key_padding", "causal") else _rand((N, 4, kdim), 2)
    lk = kv.shape[1]
    layer = MultiHeadAttention(H, causal=case == "causal")
    inputs = (q,) if kv is q else (q, kv)
    p = _params_like(layer, *(jnp.asarray(a) for a in inputs))
    w = _rand((N, L, D), 3)
    valid = np.arange(lk)[None, :] < np.array([lk, 2])[:, None]          # (N, Lk)
    mask = jnp.asarray(valid[:, None, None, :]) if case == "key_padding" else None

    def loss(p, *xs):
        y = layer.apply(p, *xs, mask=mask)
        return jnp.sum(jnp.asarray(w) * y), y

    # outputs and gradients from one compiled program
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs) + 1)),
                                               has_aux=True))(p, *map(jnp.asarray, inputs))

    module = _torch_mha(torch, jax.tree_util.tree_map(np.asarray, p), D, H, kdim)
    tq = torch.tensor(q, requires_grad=True)
    tkv = tq if kv is q else torch.tensor(kv, requires_grad=True)
    extra = {}
    if case == "key_padding":
        extra["key_padding_mask"] = torch.from_numpy(~valid)            # True = ignore
    if case == "causal":
        extra["attn_mask"] = torch.from_numpy(np.triu(np.ones((L, L), bool), 1))
    ty, _ = module(tq, tkv, tkv, need_weights=False, **extra)
    (ty * torch.from_numpy(w)).sum().backward()

    _close(y, ty.detach().numpy())
    jax.tree_util.tree_map(_close, grads[0], _torch_mha_grads(module, D))
    _close(grads[1], tq.grad.numpy())
    if kv is not q:
        _close(grads[2], tkv.grad.numpy())


@pytest.mark.parametrize("masked", [False, True])
def test_encoder_block_matches_torch(x64, masked):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed; the numpy "
                                "reference test covers the formula")
    block = TransformerEncoderBlock(H, 16)
    x = _rand((N, L, D), 1)
    p = _params_like(block, jnp.asarray(x))
    w = _rand((N, L, D), 3)
    valid = np.arange(L)[None, :] < np.array([L, 3])[:, None]
    mask = jnp.asarray(valid[:, None, None, :]) if masked else None

    def loss(p, x):
        y = block.apply(p, x, mask=mask)
        return jnp.sum(jnp.asarray(w) * y), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        p, jnp.asarray(x))
    _close(y, _ref_block(p, x, H, valid[:, None, None, :] if masked else None))

    pn = jax.tree_util.tree_map(np.asarray, p)
    module = torch.nn.TransformerEncoderLayer(D, H, dim_feedforward=16, dropout=0.0,
                                              batch_first=True, norm_first=True,
                                              dtype=torch.float64)
    t = lambda a: torch.from_numpy(np.array(a))
    with torch.no_grad():
        module.self_attn.load_state_dict(_torch_mha(torch, pn["attention"], D, H, D)
                                         .state_dict())
        for ours, theirs in (("norm_0", module.norm1), ("norm_1", module.norm2)):
            theirs.weight.copy_(t(pn[ours]["scale"]))
            theirs.bias.copy_(t(pn[ours]["offset"]))
        for ours, theirs in (("mlp_0", module.linear1), ("mlp_1", module.linear2)):
            theirs.weight.copy_(t(pn[ours]["kernel"].T))
            theirs.bias.copy_(t(pn[ours]["bias"]))
    tx = torch.tensor(x, requires_grad=True)
    ty = module(tx, src_key_padding_mask=torch.from_numpy(~valid) if masked else None)
    (ty * torch.from_numpy(w)).sum().backward()

    _close(y, ty.detach().numpy())
    _close(grads[1], tx.grad.numpy())
    jax.tree_util.tree_map(_close, grads[0]["attention"], _torch_mha_grads(module.self_attn, D))
    for ours, theirs in (("norm_0", module.norm1), ("norm_1", module.norm2)):
        _close(grads[0][ours]["scale"], theirs.weight.grad.numpy())
        _close(grads[0][ours]["offset"], theirs.bias.grad.numpy())
    for ours, theirs in (("mlp_0", module.linear1), ("mlp_1", module.linear2)):
        _close(grads[0][ours]["kernel"], theirs.weight.grad.numpy().T)
        _close(grads[0][ours]["bias"], theirs.bias.grad.numpy())


def test_encoder_block_structure(key):
    block = TransformerEncoderBlock(H, 16, key_size=3, causal=True)
    x = jnp.zeros((N, L, D))
    shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(block.init, key, x))
    assert set(shapes) == {"norm_0", "attention", "norm_1", "mlp_0", "mlp_1"}
    assert shapes["attention"]["query"]["kernel"] == (D, 6)
    assert shapes["attention"]["output"]["kernel"] == (6, D)
    assert shapes["mlp_0"]["kernel"] == (D, 16) and shapes["mlp_1"]["kernel"] == (16, D)
    rows = block.summary(x).splitlines()
    assert [r.split()[0] for r in rows[2:10]] == [
        "norm_0", "attention", "dropout_0", "norm_1", "mlp_0", "dropout_1", "mlp_1",
        "dropout_2"]


# -- dropout ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: MultiHeadAttention(H, dropout_rate=0.5),
                                  lambda: TransformerEncoderBlock(H, 16, dropout_rate=0.5)],
                         ids=["attention", "block"])
def test_dropout_train_eval_and_keys(make):
    layer = make()
    x = jnp.asarray(_rand((N, L, D), 1), jnp.float32)
    p = _params_like(layer, x)
    run = jax.jit(lambda p, x, k: (layer.apply(p, x, train=True, key=k), layer.apply(p, x)))
    # rbg keys: the masks come from one RngBitGenerator operation, where threefry's hash
    # took 4x the compile time (threefry keys: test_attention_dropout_drops_weights)
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    (a, eval_a), (b, _), (c, _) = run(p, x, k1), run(p, x, k1), run(p, x, k2)
    assert not np.allclose(a, eval_a) and not np.allclose(a, c)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"layer.* needs a PRNG key in training mode"):
        jax.eval_shape(functools.partial(layer.apply, train=True), p, x)  # raised tracing


def test_attention_dropout_drops_weights(x64, key):
    """Train mode equals the formula with the weights dropped by the layer's mask."""
    q, k, v = (jnp.asarray(_rand((N, L, H, 3), s)) for s in (1, 2, 3))

    @jax.jit
    def both(q, k, v, key):
        dropped = attend_explicit(q, k, v, dropout_rate=0.25, dropout_key=key)
        keep = jax.random.bernoulli(key, 0.75, (N, H, L, L))
        return dropped, keep

    dropped, keep = map(np.asarray, both(q, k, v, key))
    assert 0.5 < keep.mean() < 0.95
    q, k, v = map(np.asarray, (q, k, v))
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(3)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = np.where(keep, weights / weights.sum(-1, keepdims=True) / 0.75, 0.0)
    _close(dropped, np.einsum("bhqs,bshv->bqhv", weights, v))


# -- position embeddings -----------------------------------------------------------


@pytest.mark.parametrize("features", [8, 7])
def test_sinusoidal_matches_numpy(x64, features):
    x = _rand((N, L, features), 1)
    layer = SinusoidalPositionEmbedding(base=100.0)
    pe = np.zeros((L, features))
    for pos in range(L):
        for j in range(features):
            angle = pos / 100.0 ** (2 * (j // 2) / features)
            pe[pos, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    apply = jax.jit(layer.apply)
    _close(apply({}, jnp.asarray(x)), x + pe)
    _close(apply({}, jnp.asarray(x[0])), x[0] + pe)
    half = jax.eval_shape(SinusoidalPositionEmbedding().apply, {},
                          jnp.zeros((1, 2, 4), jnp.bfloat16))
    assert half.dtype == jnp.bfloat16


def test_position_embedding_adds_the_first_rows(x64, key):
    layer = PositionEmbedding(7)
    x = _rand((N, L, D), 1)
    p = layer.init(key, jnp.asarray(x))
    table = np.asarray(p["embedding"])
    assert table.shape == (7, D) and 0.005 < table.std() < 0.05
    apply = jax.jit(layer.apply)
    _close(apply(p, jnp.asarray(x)), x + table[:L])
    _close(apply(p, jnp.asarray(x[:, :2])), x[:, :2] + table[:2])


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"num_heads": 2.0}, "num_heads must be a positive integer"),
    ({"num_heads": 2, "key_size": 0}, "key_size must be a positive integer or None"),
    ({"num_heads": 2, "dropout_rate": 1.0}, r"dropout_rate .* \[0, 1\), got 1.0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_error_messages(key):
    x = jnp.zeros((N, L, D), jnp.float32)
    with pytest.raises(ValueError, match=r"MultiHeadAttention layer 'att': the query's 8 "
                       r"features are not divisible by num_heads=3"):
        MultiHeadAttention(3, name="att").init(key, x)
    net = Sequential([MultiHeadAttention(3)])
    with pytest.raises(ValueError, match=r"layer 'multi_head_attention_0'.*not divisible"):
        net.init(key, x)
    layer = MultiHeadAttention(H)
    p = _params_like(layer, x)
    with pytest.raises((ValueError, ParamsMismatchError), match=r"\(8, 8\).*\(2, 5, 6\)"
                       r"|\(2, 5, 6\).*\(8, 8\)"):
        layer.apply(p, jnp.zeros((N, L, 6)))
    with pytest.raises(ValueError, match=r"key and value must have the same length.*"
                       r"\(2, 4, 8\).*\(2, 3, 8\)"):
        layer.apply(p, x, jnp.zeros((N, 4, D)), jnp.zeros((N, 3, D)))
    with pytest.raises(ValueError, match=r"key input's batch axes \(3,\) differ from the "
                       r"query's \(2,\)"):
        layer.apply(p, x, jnp.zeros((3, 4, D)))
    with pytest.raises(TypeError, match="expected 1 input .* got 4"):
        layer.apply(p, x, x, x, x)
    with pytest.raises(TypeError, match="mask must be a boolean array.*float32"):
        layer.apply(p, x, mask=jnp.ones((N, 1, 1, L)))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5\) does not broadcast to .*"
                       r"\(2, 2, 5, 5\).*mask\[:, None, None, :\]"):
        layer.apply(p, x, mask=jnp.ones((N, L), bool))
    with pytest.raises(TypeError, match="real floating-point query input.*int32"):
        layer.apply(p, jnp.zeros((N, L, D), jnp.int32))
    with pytest.raises(ValueError, match=r"PositionEmbedding layer 'pos': the sequence "
                       r"length 5 .* exceeds max_length=4"):
        PositionEmbedding(4, name="pos").init(key, x)
    pos = PositionEmbedding(5)
    pp = _params_like(pos, x)
    with pytest.raises(ValueError, match=r"position_embedding_0'.*length 6 .* max_length=5"):
        Sequential([pos]).apply({"position_embedding_0": pp}, jnp.zeros((N, 6, D)))
    with pytest.raises(ValueError, match="mlp_size must be a positive integer"):
        TransformerEncoderBlock(H, 0)
    with pytest.raises(ValueError, match="base must be > 0"):
        SinusoidalPositionEmbedding(base=0.0)
