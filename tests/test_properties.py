"""Property-based tests (hypothesis): activations and losses over wide value ranges, and the
IDX reader on random and damaged bytes.

Each property states what must hold for *every* input the strategy can draw, so a failure
prints the smallest input hypothesis could find. Shapes are fixed and small, and the JAX
functions are jitted once per dtype, so examples cost microseconds, not recompilations.
float64 examples run under ``jax.enable_x64(True)`` inside the test: hypothesis's health
check rejects function-scoped fixtures such as ``x64``, which are not reset between examples.
"""

import gzip
import math
import struct
import tracemalloc
from functools import partial

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxnn import activations as A
from jaxnn import losses as L
from jaxnn.datasets._idx import DatasetError, read_idx

# No example database: it would leave a .hypothesis/ folder in the checkout; a failure
# prints its input (and a @reproduce_failure line) instead.
PROPERTY = partial(settings, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

DTYPES = [np.float32, np.float64]
# Largest finite value of each dtype, and a bound whose pairwise differences are still
# finite (x - max(x) in softmax).
BIG = {np.float32: float(np.finfo(np.float32).max), np.float64: float(np.finfo(np.float64).max)}
DIFF_SAFE = {dt: BIG[dt] / 2.5 for dt in DTYPES}


def floats(dtype, bound, low=None):
    """Finite floats of ``dtype`` in ``[-bound, bound]`` (``[low, bound]`` if given), zeros of
    both signs included, subnormals excluded: XLA on CPU flushes them to zero (so relu'(1e-42)
    is relu'(0) = 0 there), a property of the platform, not of jaxnn."""
    width = 32 if dtype == np.float32 else 64
    low = -bound if low is None else low
    low, bound = (float(np.asarray(b, dtype)) for b in (low, bound))  # representable bounds
    return st.floats(low, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                     width=width)


def float_arrays(dtype, shape, bound):
    return hnp.arrays(dtype, shape, elements=floats(dtype, bound))


def jax_array(x):
    """``x`` as a jax array of its own dtype (call under ``enable_x64`` for float64)."""
    return jnp.asarray(x, dtype=x.dtype)


def f64(x):
    return np.asarray(x, np.float64)


def assert_finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a))), a


# -- activations --------------------------------------------------------------------------
#
# numpy float64 references, evaluated on the (exactly representable) input values. Their
# own error is far below the tolerances: they are evaluated in a stable form (no
# cancellation, no overflow into a NaN).


def np_sigmoid(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))  # exp(-z) = inf gives exactly 0, not NaN


_erfc = np.vectorize(math.erfc, otypes=[np.float64])
_C = math.sqrt(2.0 / math.pi)


def np_gelu_tanh(x):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u); the sigmoid form keeps the left tail accurate
    with np.errstate(over="ignore", invalid="ignore"):
        u = _C * (x + 0.044715 * x**3)
        return np.where(np.abs(x) < 100, x * np_sigmoid(2 * u), np.where(x > 0, x, -0.0))


def np_gelu_tanh_grad(x):
    # beyond |x| = 100 the derivative is 1 or 0 to float64 precision (sigmoid(2u) saturates)
    xc = np.clip(x, -100, 100)
    u = _C * (xc + 0.044715 * xc**3)
    s = np_sigmoid(2 * u)
    exact = s + xc * s * (1 - s) * 2 * _C * (1 + 3 * 0.044715 * xc**2)
    return np.where(np.abs(x) < 100, exact, (x > 0).astype(np.float64))


def np_gelu(x):
    return 0.5 * x * _erfc(-x / math.sqrt(2))


def np_gelu_grad(x):
    with np.errstate(over="ignore"):
        phi = np.exp(-0.5 * np.minimum(x * x, 1e4)) / math.sqrt(2 * math.pi)
    return 0.5 * _erfc(-x / math.sqrt(2)) + x * phi


def np_silu_grad(x):
    s = np_sigmoid(x)
    return s * (1 + x * np_sigmoid(-x))


# name -> (function, value reference, derivative reference)
ELEMENTWISE = {
    "sigmoid": (A.sigmoid, np_sigmoid, lambda x: np_sigmoid(x) * np_sigmoid(-x)),
    "tanh": (A.tanh, np.tanh, lambda x: np.cosh(np.minimum(np.abs(x), 300)) ** -2.0),
    "relu": (A.relu, lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64)),
    "leaky_relu": (A.leaky_relu, lambda x: np.where(x >= 0, x, 0.01 * x),
                   lambda x: np.where(x >= 0, 1.0, 0.01)),
    "leaky_relu_0.2": (partial(A.leaky_relu, negative_slope=0.2),
                       lambda x: np.where(x >= 0, x, 0.2 * x),
                       lambda x: np.where(x >= 0, 1.0, 0.2)),
    "elu": (A.elu, lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
            lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0)))),
    "elu_0.5": (partial(A.elu, alpha=0.5),
                lambda x: np.where(x > 0, x, 0.5 * np.expm1(np.minimum(x, 0))),
                lambda x: np.where(x > 0, 1.0, 0.5 * np.exp(np.minimum(x, 0)))),
    "gelu": (A.gelu, np_gelu, np_gelu_grad),
    "gelu_tanh": (partial(A.gelu, approximate=True), np_gelu_tanh, np_gelu_tanh_grad),
    "silu": (A.silu, lambda x: x * np_sigmoid(x), np_silu_grad),
    "swish": (A.swish, lambda x: x * np_sigmoid(x), np_silu_grad),
    "softplus": (A.softplus, lambda x: np.logaddexp(0.0, x), np_sigmoid),
}

# Tolerances against the float64 references: relative, plus an absolute floor near the
# dtype's smallest normal number (below it, results are subnormal and only absolutely
# accurate). Derivatives get an absolute 1e-6 (float32) for tanh' = 1 - tanh**2, which
# JAX computes with an absolute, not relative, error.
VALUE_TOL = {np.float32: dict(rtol=2e-5, atol=2e-37), np.float64: dict(rtol=1e-11, atol=1e-300)}
GRAD_TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-15)}


@jax.jit
def _all_elementwise(x):
    """{name: (value, derivative)} of every element-wise activation: one compilation per dtype
    serves all of them."""
    out = {}
    for name, (fn, _, _) in ELEMENTWISE.items():
        y, vjp = jax.vjp(fn, x)
        out[name] = y, vjp(jnp.ones_like(y))[0]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY(max_examples=80)
@given(data=st.data())
def test_elementwise_finite_and_matches_float64_reference(dtype, data):
    """Over the whole finite range of the dtype, for every activation (each example runs
    them all: one call of the compiled program): finite value and derivative, both equal
    to the float64 reference within the stated tolerances; sigmoid in [0, 1]."""
    x = data.draw(float_arrays(dtype, (16,), BIG[dtype]), label="x")
    with jax.enable_x64(dtype == np.float64):
        outputs = _all_elementwise(jax_array(x))
    for name, (_, ref, dref) in ELEMENTWISE.items():
        y, dy = (np.asarray(a) for a in outputs[name])
        assert y.dtype == dtype and dy.dtype == dtype, name
        assert_finite(y, dy)
        np.testing.assert_allclose(f64(y), ref(f64(x)), err_msg=name, **VALUE_TOL[dtype])
        np.testing.assert_allclose(f64(dy), dref(f64(x)), err_msg=name, **GRAD_TOL[dtype])
        if name == "sigmoid":
            assert np.all((y >= 0) & (y <= 1))


def test_gelu_tanh_derivative_at_huge_inputs():
    """Found by the property above: x**3 overflowed and the derivative was NaN (inf * 0) from
    |x| = 8.723547e19 in float32 (6.8e154 in float64)."""
    fn = _all_elementwise
    for dtype, x in ((np.float32, [8.723547e19, -8.723547e19, 3.4e38, -3.4e38]),
                     (np.float64, [6.9e154, -6.9e154, 1.7e308, -1.7e308])):
        with jax.enable_x64(dtype == np.float64):
            y, dy = (np.asarray(a) for a in fn(jnp.asarray(np.resize(x, 16), dtype))["gelu_tanh"])
        np.testing.assert_array_equal(dy, np.resize([1.0, 0.0], 16))
        np.testing.assert_array_equal(y, np.resize([x[0], 0.0, x[2], 0.0], 16).astype(dtype))


def np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


ROWS, CLASSES = 4, 8
# a fixed cotangent, so that the softmax derivative is not trivially zero
_COT = np.linspace(-1.0, 2.0, ROWS * CLASSES).reshape(ROWS, CLASSES)


def _softmaxes(x, cot):
    (s, ds), (ls, dls) = (_value_and_cot(fn, x, cot) for fn in (A.softmax, A.log_softmax))
    return s, ds, ls, dls


def _value_and_cot(fn, x, cot):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(cot.astype(y.dtype))[0]


_SOFTMAXES = jax.jit(_softmaxes)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY(max_examples=100)
@given(data=st.data())
def test_softmax_and_log_softmax(dtype, data):
    """softmax: in [0, 1], rows sum to 1 within CLASSES * eps, equal to the float64 reference;
    log_softmax: <= 0, equal to the reference; finite values and derivatives.

    Inputs lie in [-max/2.5, max/2.5], where x - max(x) cannot overflow. (Beyond that the
    true log-probability is itself below -max, so -inf there is the correctly rounded value.)
    """
    x = data.draw(float_arrays(dtype, (ROWS, CLASSES), DIFF_SAFE[dtype]), label="x")
    eps = float(np.finfo(dtype).eps)
    with jax.enable_x64(dtype == np.float64):
        s, ds, ls, dls = (np.asarray(a) for a in _SOFTMAXES(jax_array(x), jnp.asarray(_COT)))
    assert_finite(s, ds, ls, dls)
    s, ls, xr = f64(s), f64(ls), f64(x)
    assert np.all((s >= 0) & (s <= 1))
    np.testing.assert_allclose(s.sum(axis=-1), 1.0, rtol=0, atol=CLASSES * eps)
    assert np.all(ls <= 0)
    ref = np_log_softmax(xr)
    # x - max(x) is rounded in the dtype: relative error eps * |x - max| in the result
    np.testing.assert_allclose(ls, ref, rtol=4 * eps, atol=4 * eps)
    np.testing.assert_allclose(s, np.exp(ref), rtol=0, atol=4 * CLASSES * eps)


@PROPERTY(max_examples=50)
@given(x=float_arrays(np.float32, (ROWS, CLASSES), BIG[np.float32]))
def test_softmax_full_float32_range(x):
    """Any finite float32 logits, up to +-3.4e38: softmax finite and sums to 1; log_softmax
    is never NaN or positive, and both derivatives are finite."""
    s, ds, ls, dls = _SOFTMAXES(jnp.asarray(x), jnp.asarray(_COT, jnp.float32))
    assert_finite(s, ds, dls)
    np.testing.assert_allclose(f64(s).sum(axis=-1), 1.0, rtol=0, atol=CLASSES * 1.2e-7)
    assert not np.any(np.isnan(ls)) and np.all(ls <= 0)


# -- losses --------------------------------------------------------------------------------

B, K, F = 4, 5, 3  # batch, classes, features per example of the regression and binary losses
CATEGORICAL = ("softmax_ce", "sparse_softmax_ce", "cce", "sparse_cce")
REGRESSION = ("mse", "mae", "huber", "huber_0.3")


def _no_smoothing(loss):
    def without_label_smoothing(p, t, *, label_smoothing, **kwargs):
        return loss(p, t, **kwargs)

    return without_label_smoothing


LOSSES = {
    "softmax_ce": L.softmax_cross_entropy,
    "sparse_softmax_ce": L.sparse_softmax_cross_entropy,
    "cce": L.categorical_cross_entropy,
    "sparse_cce": L.sparse_categorical_cross_entropy,
    "bce_logits": L.binary_cross_entropy_with_logits,
    "bce": L.binary_cross_entropy,
    "mse": _no_smoothing(L.mse),
    "mae": _no_smoothing(L.mae),
    "huber": _no_smoothing(L.huber),
    "huber_0.3": _no_smoothing(partial(L.huber, delta=0.3)),
}


@jax.jit
def _all_losses(inputs, w, ls):
    """{name: (mean loss, its gradient in the predictions, reduction="none")} for every loss,
    with weights ``w`` and label smoothing ``ls`` (traced, so one compilation per dtype
    serves every drawn value)."""
    out = {}
    for name, loss in LOSSES.items():
        p, t = inputs[name]
        value, grad = jax.value_and_grad(
            lambda q, t=t, loss=loss: loss(q, t, weights=w, label_smoothing=ls))(p)
        out[name] = value, grad, loss(p, t, weights=w, label_smoothing=ls, reduction="none")
    return out


def run_losses(inputs, w, ls, dtype):
    with jax.enable_x64(dtype == np.float64):
        out = _all_losses({k: (jax_array(p), jnp.asarray(t)) for k, (p, t) in inputs.items()},
                          jax_array(w), jnp.asarray(ls, dtype))
    return {k: tuple(np.asarray(a) for a in v) for k, v in out.items()}


def np_softmax(x):
    return np.exp(np_log_softmax(f64(x)))


def unit_floats(dtype):
    return floats(dtype, 1.0, low=0.0)


@st.composite
def loss_inputs(draw, dtype, bound, mse_bound):
    """{loss name: (predictions, targets)}: logits and regression values in [-bound, bound]
    (scaled to [-mse_bound, mse_bound] for mse), one-hot or probability label rows, integer
    classes, probabilities in [0, 1] and probability rows (softmax rows of the logits, and
    |tanh| of the predictions, so exact zeros and ones among them)."""
    logits = draw(float_arrays(dtype, (B, K), bound), label="logits")
    classes = draw(hnp.arrays(np.int32, (B,), elements=st.integers(0, K - 1)), label="classes")
    if draw(st.booleans(), label="probability labels"):
        raw = draw(hnp.arrays(dtype, (B, K), elements=unit_floats(dtype)), label="raw labels")
        raw[np.arange(B), classes] += 1  # no all-zero row
        dense = (raw / raw.sum(axis=-1, keepdims=True)).astype(dtype)
    else:
        dense = np.eye(K, dtype=dtype)[classes]
    rows = np_softmax(logits).astype(dtype)
    binary = draw(hnp.arrays(dtype, (B, F), elements=unit_floats(dtype)), label="binary labels")
    p, t = (draw(float_arrays(dtype, (B, F), bound), label=k) for k in ("predictions", "targets"))
    pm, tm = ((x * (mse_bound / bound)).astype(dtype) for x in (p, t))
    probabilities = np.abs(np.tanh(p.astype(np.float64))).astype(dtype)  # [0, 1], with 0 and 1
    return {
        "softmax_ce": (logits, dense), "sparse_softmax_ce": (logits, classes),
        "cce": (rows, dense), "sparse_cce": (rows, classes),
        "bce_logits": (p, binary), "bce": (probabilities, binary),
        "mse": (pm, tm), "mae": (p, t), "huber": (p, t), "huber_0.3": (p, t),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY(max_examples=60)
@given(data=st.data())
def test_losses_nonnegative_finite_with_finite_gradient(dtype, data):
    """Every loss is >= 0 and finite, and so is its gradient, for logits and predictions up to
    1e36 in float32 (1e300 in float64; mse: 1e17 and 1e150, so that the square is finite),
    any label smoothing in [0, 1] and any weights in [0, 10]. (Past that, x - max(x) inside
    log_softmax and the sum over the batch can overflow although the true mean does not.)"""
    bound, mse_bound = {np.float32: (1e36, 1e17), np.float64: (1e300, 1e150)}[dtype]
    inputs = data.draw(loss_inputs(dtype, bound, mse_bound))
    w = data.draw(hnp.arrays(dtype, (B,), elements=floats(dtype, 10.0, low=0.0)), label="w")
    ls = data.draw(st.floats(0.0, 1.0), label="label_smoothing")
    for name, (value, grad, none) in run_losses(inputs, w, ls, dtype).items():
        assert value.dtype == dtype and grad.dtype == dtype, name
        assert np.isfinite(value) and value >= 0, (name, value)
        assert np.all(np.isfinite(grad)), (name, grad)
        assert np.all(np.isfinite(none) & (none >= 0)), (name, none)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY(max_examples=30)
@given(data=st.data())
def test_regression_losses_of_equal_arrays_are_zero(dtype, data):
    """mse, mae and huber of (p, p) are exactly 0 for any finite p, and so is the gradient of
    mse and huber (mae's derivative at p == t is sign(0) := 1, documented)."""
    inputs = data.draw(loss_inputs(dtype, 1.0, 1.0))
    p = data.draw(float_arrays(dtype, (B, F), BIG[dtype]), label="p")
    inputs.update({name: (p, p) for name in REGRESSION})
    out = run_losses(inputs, np.ones(B, dtype), 0.0, dtype)
    for name in REGRESSION:
        value, grad, none = out[name]
        assert value == 0 and np.all(none == 0), (name, value, none)
        assert name == "mae" or np.all(grad == 0), (name, grad)


def np_per_example(name, p, t, ls, dtype):
    """The per-example loss in numpy float64: the element loss averaged over non-batch axes.
    The probability clip bounds are EPSILON and 1 - EPSILON rounded to ``dtype``, as
    documented (1 - 1e-7 is 1 - 1.19e-7 in float32)."""
    lo, hi = (float(np.asarray(b, dtype)) for b in (L.EPSILON, 1 - L.EPSILON))
    p, t = f64(p), np.asarray(t)
    if name in CATEGORICAL:
        if name in ("cce", "sparse_cce"):
            logq = np.log(np.clip(p / p.sum(axis=-1, keepdims=True), lo, hi))
        else:
            logq = np_log_softmax(p)
        labels = np.eye(K)[t] if name.startswith("sparse") else f64(t)
        return -((labels * (1 - ls) + ls / K) * logq).sum(axis=-1)
    t = f64(t)
    s = t * (1 - ls) + 0.5 * ls
    d = np.abs(p - t)
    delta = 0.3 if name == "huber_0.3" else 1.0
    element = {
        "bce": lambda: -(s * np.log(np.clip(p, lo, hi)) + (1 - s) * np.log1p(-np.clip(p, lo, hi))),
        "bce_logits": lambda: s * np.logaddexp(0, -p) + (1 - s) * np.logaddexp(0, p),
        "mse": lambda: d**2,
        "mae": lambda: d,
    }.get(name, lambda: np.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta)))()
    return element.mean(axis=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@PROPERTY(max_examples=60)
@given(data=st.data())
def test_weights_give_weighted_mean(dtype, data):
    """With ``weights=w`` (zeros mixed with values from 1e-6 to 1e6), the mean is
    sum(w * l) / sum(w), 0 when every weight is 0, and ``reduction="none"`` gives w * l,
    for l the numpy float64 per-example loss.

    Tolerance: relative 1e-5 (float32) / 1e-11 (float64), plus an absolute 16 * eps * max(1,
    |inputs|) per example: log_softmax rounds x - max(x), and log(q) of a q near 1 has an
    absolute error of eps."""
    inputs = data.draw(loss_inputs(dtype, 1e3, 1e3))
    w = data.draw(hnp.arrays(dtype, (B,), elements=st.just(0.0) | floats(dtype, 1e6, low=1e-6)),
                  label="weights")
    ls = data.draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0), label="label_smoothing")
    eps = float(np.finfo(dtype).eps)
    rtol = {np.float32: 1e-5, np.float64: 1e-11}[dtype]
    wr = f64(w)
    for name, (mean, _, none) in run_losses(inputs, w, ls, dtype).items():
        p, t = inputs[name]
        per_example = np_per_example(name, p, t, ls, dtype)
        atol = 16 * eps * max(1.0, float(np.max(np.abs(p))))
        err = np.abs(f64(none) - wr * per_example)
        assert np.all(err <= rtol * wr * per_example + atol * wr), (name, none, wr * per_example)
        if wr.sum() == 0:
            assert mean == 0, (name, mean)
        else:
            expected = (wr * per_example).sum() / wr.sum()
            assert abs(f64(mean) - expected) <= rtol * expected + atol, (name, mean, expected)


# -- the IDX reader ----------------------------------------------------------------------
#
# An independent reference parse of the format (tests/test_idx.py has the byte layout):
# the expected array, or None where the reader must raise DatasetError naming the file.

IDX_TYPES = {0x08: "B", 0x09: "b", 0x0B: "h", 0x0C: "i", 0x0D: "f", 0x0E: "d"}  # struct codes
NUMPY_MAX_DIMS = 64  # numpy >= 2 (an array of more dimensions cannot be returned)


def reference_parse(raw: bytes):
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except Exception:  # any damage: the reader must refuse the file
            return None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        return None
    code, ndim = raw[2], raw[3]
    if len(raw) < 4 + 4 * ndim or ndim > NUMPY_MAX_DIMS:
        return None
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = math.prod(shape)
    payload = raw[4 + 4 * ndim :]
    if len(payload) != count * struct.calcsize(IDX_TYPES[code]):
        return None
    values = struct.unpack(f">{count}{IDX_TYPES[code]}", payload)
    dtype = np.dtype(IDX_TYPES[code])
    try:  # a zero-size shape whose other dimensions multiply past what numpy can index
        return np.array(values, dtype).reshape(shape)
    except ValueError:
        return None


def check_read(directory, raw: bytes):
    """``read_idx`` of a file holding ``raw`` returns exactly the reference parse, or raises
    DatasetError naming the file; nothing else."""
    path = directory / "property-case.idx"
    path.write_bytes(raw)
    expected = reference_parse(raw)
    try:
        got = read_idx(path)
    except DatasetError as err:
        assert str(path) in str(err), err
        assert expected is None, f"rejected a valid file: {err}"
        return None
    assert expected is not None, f"accepted an invalid file as {got.dtype} {got.shape}"
    assert got.dtype == expected.dtype and got.dtype.isnative and got.shape == expected.shape
    assert got.flags.writeable
    np.testing.assert_array_equal(got, expected)
    return got


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("idx-properties")


@st.composite
def idx_bytes(draw):
    """Bytes near the IDX format: a header with a valid or wrong magic, a few or up to 255
    dimensions, each small or huge (up to 2**32 - 1), then a body of exactly the declared
    size, shorter, longer, or random; the whole possibly cut anywhere."""
    zero = draw(st.just(b"\0\0") | st.binary(min_size=2, max_size=2), label="bytes 0-1")
    code = draw(st.sampled_from(sorted(IDX_TYPES)) | st.integers(0, 255), label="type code")
    ndim = draw(st.integers(0, 4) | st.sampled_from([64, 65, 255]), label="ndim")
    dim = st.integers(0, 4) | st.sampled_from([0, 1, 2**16 + 1, 2**31, 2**32 - 1])
    dims = draw(st.lists(dim, min_size=ndim, max_size=ndim) if ndim <= 4
                else st.just([1] * ndim) | st.just([0] + [2**32 - 1] * (ndim - 1)), label="dims")
    header = zero + bytes([code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    size = math.prod(dims) * struct.calcsize(IDX_TYPES.get(code, "B"))
    exact = draw(st.binary(min_size=size, max_size=size)) if size <= 256 else b""
    body = draw(st.sampled_from(["exact", "short", "long", "random"]), label="body")
    if body == "short":
        exact = exact[: draw(st.integers(0, max(len(exact) - 1, 0)))]
    elif body == "long":
        exact += draw(st.binary(min_size=1, max_size=16))
    elif body == "random":
        exact = draw(st.binary(max_size=64))
    raw = header + exact
    if draw(st.booleans(), label="cut"):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def gzipped(raw_strategy):
    """gzip of the drawn bytes: whole, truncated anywhere, with one byte changed, or with
    bytes appended after the stream."""
    @st.composite
    def build(draw):
        packed = gzip.compress(draw(raw_strategy), mtime=0)
        damage = draw(st.sampled_from(["none", "cut", "flip", "append"]), label="damage")
        if damage == "cut":
            packed = packed[: draw(st.integers(0, len(packed) - 1))]
        elif damage == "flip":
            at, flip = draw(st.integers(0, len(packed) - 1)), draw(st.integers(1, 255))
            packed = packed[:at] + bytes([packed[at] ^ flip]) + packed[at + 1 :]
        elif damage == "append":
            packed += draw(st.binary(min_size=1, max_size=16))
        return packed

    return build()


@PROPERTY(max_examples=150)
@given(raw=st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: b"\x1f\x8b" + b))
def test_idx_random_bytes(idx_dir, raw):
    """Fully random bytes (some starting with the gzip magic): a correct parse, or
    DatasetError naming the file."""
    check_read(idx_dir, raw)


@PROPERTY(max_examples=250)
@given(raw=idx_bytes() | gzipped(idx_bytes()) | gzipped(st.binary(max_size=64)))
# found by this property: numpy refused the reshape with a bare ValueError, not naming the file
@example(raw=b"\0\0\x08\x03" + b"\0\0\0\0" + b"\xff\xff\xff\xff" * 2)  # (0, 2**32-1, 2**32-1)
@example(raw=b"\0\0\x08\x41" + b"\0\0\0\x01" * 65 + b"x")  # 65 dimensions of 1
def test_idx_near_valid_and_gzipped_bytes(idx_dir, raw):
    """Headers valid or not, bodies exact, short, long or random, plain or gzipped, the gzip
    whole or damaged: a correct parse, or DatasetError naming the file."""
    check_read(idx_dir, raw)


@PROPERTY(max_examples=40)
@given(code=st.sampled_from(sorted(IDX_TYPES)),
       dims=st.lists(st.integers(2**10, 2**32 - 1), min_size=2, max_size=6),
       body=st.binary(max_size=64), compress=st.booleans())
def test_idx_huge_header_refused_without_allocating(idx_dir, code, dims, body, compress):
    """A header claiming 2**20 to 2**192 elements over a small body is refused, with at most
    a megabyte allocated while reading (tracemalloc sees numpy's allocations too)."""
    raw = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body
    raw = gzip.compress(raw, mtime=0) if compress else raw
    tracemalloc.start()
    try:
        assert check_read(idx_dir, raw) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
