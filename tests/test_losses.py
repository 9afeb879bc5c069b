"""Losses against numpy float64 formulas, optax, and finite differences."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import losses as L
from jaxnn.gradcheck import check_grads

B, K, EPS = 4, 5, 1e-7

# -- numpy float64 references ---------------------------------------------------------


def np_log_softmax(z):
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_clipped_log(p):
    return np.log(np.clip(p / p.sum(axis=-1, keepdims=True), EPS, 1 - EPS))


def np_huber(p, t, delta):
    d = np.abs(p - t)
    return np.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta))


def np_bce(p, t, ls=0.0):
    q, s = np.clip(p, EPS, 1 - EPS), t * (1 - ls) + 0.5 * ls
    return -(s * np.log(q) + (1 - s) * np.log(1 - q))


def np_bce_logits(z, t, ls=0.0):
    s = t * (1 - ls) + 0.5 * ls  # log(sigmoid(z)) = -logaddexp(0, -z)
    return s * np.logaddexp(0, -z) + (1 - s) * np.logaddexp(0, z)


def np_cross_entropy(log_q, labels, ls=0.0):
    """labels: one-hot/probabilities (float), or integer indices."""
    if np.issubdtype(labels.dtype, np.integer):
        labels = np.eye(log_q.shape[-1])[labels]
    s = labels * (1 - ls) + ls / log_q.shape[-1]
    return -(s * log_q).sum(axis=-1)


def np_reduce(element, weights, mask, reduction):
    per_example = element.reshape(element.shape[0], -1).mean(axis=1)
    w = np.ones(len(per_example)) if weights is None else weights
    if mask is not None:
        w = np.where(mask, w, 0.0)
    weighted = np.where(w != 0, w * per_example, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / w.sum() if w.sum() else 0.0


# -- inputs: (predictions, targets), moderate or with extreme values ----------------------


def _logits(rng, shape, extreme):
    z = rng.normal(size=shape) * 2
    if extreme:
        z.reshape(-1, shape[-1])[0, :3] = [1e4, -1e4, 0.0]
        z.reshape(-1, shape[-1])[1, :] = -1e4
    return z


def regression(rng, extreme, shape=(B, 3)):
    p, t = rng.normal(size=shape) * 2, rng.normal(size=shape)
    if extreme:  # flat views: the first entries of examples 0, 1, 2
        pf, tf = p.reshape(B, -1), t.reshape(B, -1)
        pf[0, 0], pf[1, 0], pf[2, 0], tf[2, 0] = 1e4, -1e4, 0.0, 0.0
    return p, t


def binary_probabilities(rng, extreme):
    p, t = rng.uniform(0.05, 0.95, size=(B, 3)), (rng.uniform(size=(B, 3)) > 0.5) * 1.0
    t[3, 2] = 0.3  # soft label
    if extreme:  # exactly 0 and 1, right and wrong
        p[0, :2], t[0, :2] = [0.0, 1.0], [0.0, 1.0]
        p[1, :2], t[1, :2] = [0.0, 1.0], [1.0, 0.0]
    return p, t


def binary_logits(rng, extreme):
    z, t = _logits(rng, (B, 3), False), (rng.uniform(size=(B, 3)) > 0.5) * 1.0
    if extreme:
        z[0, :2], t[0, :2] = [1e4, -1e4], [1.0, 0.0]
        z[1, :2], t[1, :2] = [1e4, -1e4], [0.0, 1.0]
        z[2, 0] = 0.0
    return z, t


def class_logits(rng, extreme, shape=(B, K), sparse=False):
    z = _logits(rng, shape, extreme)
    labels = rng.integers(0, K, size=shape[:-1])
    labels.reshape(-1)[0] = 1  # the -1e4 entry of the extreme row: a confident wrong answer
    return z, labels if sparse else np.eye(K)[labels]


def class_probabilities(rng, extreme, sparse=False):
    z, labels = class_logits(rng, False, sparse=sparse)
    p = np.exp(np_log_softmax(z))
    if extreme:
        p[0] = np.eye(K)[2]  # exact 0 and 1: label 1 gets probability exactly 0
        p[1] = np.eye(K)[1 if sparse else int(labels[1].argmax())]  # exactly 1 on the label
    return p, labels


# name -> (loss, kwargs, inputs(rng, extreme), numpy element loss(pred, target))
CASES = {
    "mse": (L.mean_squared_error, {}, regression, lambda p, t: (p - t) ** 2),
    "mse_rank3": (L.mse, {}, partial(regression, shape=(B, 2, 3)), lambda p, t: (p - t) ** 2),
    "mse_rank1": (L.mse, {}, partial(regression, shape=(B,)), lambda p, t: (p - t) ** 2),
    "mae": (L.mae, {}, regression, lambda p, t: np.abs(p - t)),
    "huber": (L.huber, {}, regression, partial(np_huber, delta=1.0)),
    "huber_0.5": (L.huber, {"delta": 0.5}, regression, partial(np_huber, delta=0.5)),
    "bce": (L.binary_cross_entropy, {}, binary_probabilities, np_bce),
    "bce_smooth": (L.binary_cross_entropy, {"label_smoothing": 0.1}, binary_probabilities,
                   partial(np_bce, ls=0.1)),
    "bce_logits": (L.binary_cross_entropy_with_logits, {}, binary_logits, np_bce_logits),
    "bce_logits_smooth": (L.binary_cross_entropy_with_logits, {"label_smoothing": 0.2},
                          binary_logits, partial(np_bce_logits, ls=0.2)),
    "softmax_ce": (L.softmax_cross_entropy, {}, class_logits,
                   lambda z, y: np_cross_entropy(np_log_softmax(z), y)),
    "softmax_ce_smooth": (L.softmax_cross_entropy, {"label_smoothing": 0.1}, class_logits,
                          lambda z, y: np_cross_entropy(np_log_softmax(z), y, 0.1)),
    "softmax_ce_seq": (L.softmax_cross_entropy, {}, partial(class_logits, shape=(B, 2, K)),
                       lambda z, y: np_cross_entropy(np_log_softmax(z), y)),
    "sparse_ce": (L.sparse_softmax_cross_entropy, {}, partial(class_logits, sparse=True),
                  lambda z, y: np_cross_entropy(np_log_softmax(z), y)),
    "sparse_ce_smooth": (L.sparse_softmax_cross_entropy, {"label_smoothing": 0.1},
                         partial(class_logits, sparse=True),
                         lambda z, y: np_cross_entropy(np_log_softmax(z), y, 0.1)),
    "sparse_ce_seq": (L.sparse_softmax_cross_entropy, {},
                      partial(class_logits, shape=(B, 2, K), sparse=True),
                      lambda z, y: np_cross_entropy(np_log_softmax(z), y)),
    "cce": (L.categorical_cross_entropy, {}, class_probabilities,
            lambda p, y: np_cross_entropy(np_clipped_log(p), y)),
    "cce_smooth": (L.categorical_cross_entropy, {"label_smoothing": 0.1}, class_probabilities,
                   lambda p, y: np_cross_entropy(np_clipped_log(p), y, 0.1)),
    "sparse_cce": (L.sparse_categorical_cross_entropy, {},
                   partial(class_probabilities, sparse=True),
                   lambda p, y: np_cross_entropy(np_clipped_log(p), y)),
    "sparse_cce_smooth": (L.sparse_categorical_cross_entropy, {"label_smoothing": 0.1},
                          partial(class_probabilities, sparse=True),
                          lambda p, y: np_cross_entropy(np_clipped_log(p), y, 0.1)),
}
NAMES = sorted(CASES)
ON_PROBABILITIES = {"bce", "bce_smooth", "cce", "cce_smooth", "sparse_cce", "sparse_cce_smooth"}

WEIGHTS = np.array([0.5, 2.0, 1.0, 3.0])
MASK = np.array([True, False, True, True])
SETTINGS = {  # reduction, weights, mask
    "mean": ("mean", None, None),
    "sum": ("sum", None, None),
    "none": ("none", None, None),
    "mean_weighted_masked": ("mean", WEIGHTS, MASK),
    "none_weighted_masked": ("none", WEIGHTS, MASK),
    "sum_masked": ("sum", None, MASK.astype(float)),  # non-boolean mask: non-zero keeps
}


def _inputs(name, extreme, seed=0):
    return CASES[name][2](np.random.default_rng(seed), extreme)


# -- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", NAMES)
def test_value_float64_with_extremes(name, setting, x64):
    loss, kwargs, _, element = CASES[name]
    reduction, weights, mask = SETTINGS[setting]
    p, t = _inputs(name, extreme=True)
    got = loss(jnp.asarray(p), jnp.asarray(t), weights=weights, mask=mask,
               reduction=reduction, **kwargs)
    expected = np_reduce(element(p, t), weights, mask, reduction)
    assert got.shape == np.shape(expected) and got.dtype == jnp.float64
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mse", "bce_logits", "softmax_ce", "sparse_cce"])
def test_half_precision_promoted_to_float32(name):
    # the result's dtype, traced (it is fixed while tracing; running would compile each
    # operation for bfloat16 on its own)
    loss, kwargs, _, _ = CASES[name]
    p, t = _inputs(name, extreme=False)
    out = jax.eval_shape(lambda p, t: loss(p, t, **kwargs), jnp.asarray(p, jnp.bfloat16),
                         jnp.asarray(t))
    assert out.dtype == jnp.float32


def test_mask_ignores_nan_in_masked_examples(x64):
    p, t = regression(np.random.default_rng(0), False)
    p[1] = np.nan  # MASK drops example 1
    got = L.mse(jnp.asarray(p), jnp.asarray(t), mask=MASK)
    expected = ((p - t) ** 2)[MASK].mean()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_everything_masked_gives_zero_mean(x64):
    p, t = regression(np.random.default_rng(0), False)
    value, grad = jax.jit(jax.value_and_grad(L.mse))(p, t, mask=np.zeros(B))  # one program
    assert value == 0.0 and np.all(grad == 0.0)


def test_aliases():
    assert L.mse is L.mean_squared_error and L.mae is L.mean_absolute_error


# -- second references: optax ------------------------------------------------------------


@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("extreme", [False, True])
def test_sparse_matches_optax(extreme, seq, x64):
    shape = (B, 2, K) if seq else (B, K)
    z, y = class_logits(np.random.default_rng(1), extreme, shape=shape, sparse=True)
    ours = L.sparse_softmax_cross_entropy(jnp.asarray(z), jnp.asarray(y), reduction="none")
    theirs = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(z), jnp.asarray(y))
    theirs = np.asarray(theirs).reshape(B, -1).mean(axis=1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    weighted = L.sparse_softmax_cross_entropy(jnp.asarray(z), jnp.asarray(y), weights=WEIGHTS)
    np.testing.assert_allclose(weighted, (WEIGHTS * theirs).sum() / WEIGHTS.sum(), rtol=1e-12)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dense_losses_match_optax(ls, x64):
    rng = np.random.default_rng(2)
    z, y = (jnp.asarray(a) for a in class_logits(rng, True))
    smoothed = optax.smooth_labels(y, ls)
    np.testing.assert_allclose(
        L.softmax_cross_entropy(z, y, label_smoothing=ls, reduction="none"),
        optax.softmax_cross_entropy(z, smoothed), rtol=1e-12)
    np.testing.assert_allclose(
        L.sparse_softmax_cross_entropy(z, jnp.argmax(y, -1), label_smoothing=ls,
                                       reduction="none"),
        optax.softmax_cross_entropy(z, smoothed), rtol=1e-12)
    zb, tb = (jnp.asarray(a) for a in binary_logits(rng, True))
    np.testing.assert_allclose(
        L.binary_cross_entropy_with_logits(zb, tb, reduction="none"),
        optax.sigmoid_binary_cross_entropy(zb, tb).mean(axis=1), rtol=1e-12, atol=1e-300)
    p, t = (jnp.asarray(a) for a in regression(rng, True))
    np.testing.assert_allclose(L.huber(p, t, delta=0.5, reduction="none"),
                               optax.huber_loss(p, t, delta=0.5).mean(axis=1), rtol=1e-12)


# -- gradients, jit, vmap ------------------------------------------------------------------


def _loss_of(name):
    """``f(p, t, w)``: the loss of case ``name`` with its options, weights ``w`` and MASK."""
    loss, kwargs, _, _ = CASES[name]
    return lambda p, t, w: loss(p, t, weights=w, mask=MASK, **kwargs)


@pytest.fixture(scope="module")
def gradcheck_errors():
    """``{name: relative error}`` of jax.grad against central finite differences, every
    case in one check: the sum of all the cases' losses, each of its own predictions, is
    one jitted program (checked one case at a time, op by op, each compiled ~5 programs).
    Perturbing a case's predictions moves only its own term of the sum.

    That program is jax.value_and_grad of the sum; check_grads sees it as a function
    whose gradient (a custom VJP) is the program's: jax.grad of a jitted sum would compile
    a forward and a backward program, and the sum alone a third, for the same check."""
    with jax.enable_x64(True):
        targets, predictions = {}, {}
        for name in NAMES:
            p, t = _inputs(name, extreme=False)
            predictions[name], targets[name] = jnp.asarray(p), jnp.asarray(t)

        def total(ps):
            return sum(_loss_of(name)(ps[name], targets[name], WEIGHTS) for name in NAMES)

        value_and_grad = jax.jit(jax.value_and_grad(total))

        @jax.custom_vjp
        def f(ps):
            return value_and_grad(ps)[0]

        def bwd(grads, cotangent):
            return (jax.tree_util.tree_map(lambda g: np.asarray(cotangent) * np.asarray(g),
                                           grads),)

        f.defvjp(value_and_grad, bwd)
        return check_grads(f, predictions)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name, gradcheck_errors):
    assert gradcheck_errors[name] < 1e-6, gradcheck_errors


@pytest.fixture(scope="module")
def float32_extremes():
    """``{name: (targets0, args0, outputs)}``: two float32 batches with extreme values per
    case (and the first one's float64 targets), and for every case in one jitted program
    (one compilation for all, where each case op by op compiled ~7 programs): the value
    and gradient at ``args0``, the loss of the second batch alone, and the loss vmapped
    over the two batches stacked."""
    inputs, targets0 = {}, {}
    for name in NAMES:
        (p0, t0), (p1, t1) = _inputs(name, True, seed=0), _inputs(name, True, seed=1)
        targets0[name] = t0
        inputs[name] = (
            (jnp.asarray(p0, jnp.float32), jnp.asarray(t0), jnp.asarray(WEIGHTS, jnp.float32)),
            (jnp.asarray(p1, jnp.float32), jnp.asarray(t1),
             jnp.asarray(WEIGHTS[::-1], jnp.float32)))

    @jax.jit
    def run(inputs):
        out = {}
        for name, (args0, args1) in inputs.items():
            f = _loss_of(name)
            stacked = [jnp.stack(pair) for pair in zip(args0, args1)]
            value, grad = jax.value_and_grad(f)(*args0)
            out[name] = ((value, grad), (value, f(*args1)), jax.vmap(f)(*stacked))
        return out

    outputs = run(inputs)
    return {name: (targets0[name], inputs[name][0], outputs[name]) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_float32_extremes_under_jit_grad_and_vmap(name, float32_extremes):
    element = CASES[name][3]
    t0, args0, ((value, grad), single, batched) = float32_extremes[name]
    assert value.dtype == jnp.float32 and grad.shape == args0[0].shape
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # against float64 numpy on the float32-rounded inputs; the float32 clip bound
    # 1 - 1e-7 rounds to 1 - 1.19e-7, so losses on probabilities agree only loosely
    expected = np_reduce(element(np.asarray(args0[0], np.float64), t0), WEIGHTS, MASK, "mean")
    rtol = 2e-2 if name in ON_PROBABILITIES else 1e-5
    np.testing.assert_allclose(value, expected, rtol=rtol)
    np.testing.assert_allclose(batched, single, rtol=1e-6)


# -- errors ---------------------------------------------------------------------------------

z2, y2 = jnp.zeros((B, K)), jnp.zeros((B,), jnp.int32)


@pytest.mark.parametrize("call, error, words", [
    (lambda: L.mse(jnp.zeros(B), jnp.zeros((B, 1))), ValueError,
     ["`targets`", "(4, 1)", "`predictions`", "(4,)"]),
    (lambda: L.binary_cross_entropy_with_logits(jnp.zeros((B, 2)), jnp.zeros((B, 3))),
     ValueError, ["`labels`", "(4, 3)", "`logits`", "(4, 2)"]),
    (lambda: L.softmax_cross_entropy(z2, jnp.zeros((B, K + 1))), ValueError,
     ["`labels`", "(4, 6)", "(4, 5)"]),
    (lambda: L.sparse_softmax_cross_entropy(z2, jnp.zeros((B, 1), jnp.int32)), ValueError,
     ["`labels`", "(4, 1)", "(4, 5)", "(4,)"]),
    (lambda: L.sparse_softmax_cross_entropy(z2, y2.astype(jnp.float32)), TypeError,
     ["`labels`", "integer", "float32"]),
    (lambda: L.sparse_categorical_cross_entropy(z2, y2 * 1.0), TypeError, ["`labels`"]),
    (lambda: L.sparse_softmax_cross_entropy(z2, y2.at[0].set(K)), ValueError,
     ["`labels`", "[0, 5)", "5"]),
    (lambda: L.sparse_softmax_cross_entropy(z2, y2.at[0].set(-1)), ValueError, ["-1"]),
    (lambda: L.mse(z2, z2, reduction="avg"), ValueError, ["reduction", "'avg'", "'mean'"]),
    (lambda: L.softmax_cross_entropy(z2, z2, reduction=None), ValueError, ["reduction"]),
    (lambda: L.mse(z2, z2, weights=jnp.ones((B, 1))), ValueError, ["`weights`", "(4,)",
                                                                   "(4, 1)"]),
    (lambda: L.mse(z2, z2, mask=jnp.ones(B + 1, bool)), ValueError, ["`mask`", "(5,)"]),
    (lambda: L.mse(y2, y2), TypeError, ["`predictions`", "int32"]),
    (lambda: L.softmax_cross_entropy(jnp.zeros(K), jnp.zeros(K)), ValueError,
     ["`logits`", "(batch, ..., classes)", "(5,)"]),
    (lambda: L.mse(jnp.zeros(()), jnp.zeros(())), ValueError, ["`predictions`", "()"]),
    (lambda: L.softmax_cross_entropy(z2, z2, label_smoothing=1.5), ValueError,
     ["label_smoothing", "1.5"]),
    (lambda: L.huber(z2, z2, delta=0.0), ValueError, ["delta", "0.0"]),
])
def test_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("loss", [L.sparse_softmax_cross_entropy,
                                  L.sparse_categorical_cross_entropy])
def test_out_of_range_labels_under_jit_give_nan(loss):
    p = jnp.full((B, K), 1.0 / K)
    for bad in (K, -1):
        labels = y2.at[0].set(bad)
        per_example = jax.jit(partial(loss, reduction="none"))(p, labels)
        assert np.isnan(per_example[0]) and np.all(np.isfinite(per_example[1:]))
        assert np.isnan(jax.jit(loss)(p, labels))
