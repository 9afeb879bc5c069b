"""Data checked at the door of fit / evaluate / predict, and losses as users write them.

Each bad input is one case; each asserts the error type and that the message names
the argument and what was wrong (the value, its index, the dtype)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_params import numpy_init

import jaxnn
from jaxnn.training import evaluate, fit, predict

N, FEATURES, CLASSES = 40, 5, 3


_init = numpy_init


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=N).astype(np.int32)
    model = jaxnn.Sequential([jaxnn.Dense(8), jaxnn.relu, jaxnn.Dense(CLASSES)])
    params = _init(model, x)
    return model, params, x, y


def _with(a, index, value):
    a = np.array(a)
    a[index] = value
    return a


# (case id, function (x, y) -> (x, y), error type, words the message must hold)
BAD_DATA = [
    ("x-list", lambda x, y: (x.tolist(), y), TypeError, ["x:", "list"]),
    ("y-list", lambda x, y: (x, y.tolist()), TypeError, ["y:", "list"]),
    ("x-tuple", lambda x, y: (tuple(x), y), TypeError, ["x:", "tuple"]),
    ("x-object", lambda x, y: (x.astype(object), y), TypeError, ["x", "object"]),
    ("x-str", lambda x, y: (x.astype(str), y), TypeError, ["x", "str"]),
    ("y-str", lambda x, y: (x, np.array(["cat", "dog", "cow", "ant"] * 10)), TypeError,
     ["y", "str", "map them to integers"]),
    ("y-bytes", lambda x, y: (x, y.astype("S3")), TypeError, ["y", "bytes"]),
    ("y-object", lambda x, y: (x, y.astype(object)), TypeError, ["y", "object"]),
    ("y-complex", lambda x, y: (x, y.astype(np.complex64)), TypeError, ["y", "complex64"]),
    ("y-datetime", lambda x, y: (x, y.astype("datetime64[s]")), TypeError, ["y", "datetime"]),
    ("x-scalar", lambda x, y: (np.float32(1.0), y), ValueError, ["x", "scalar"]),
    ("x-none-in-dict", lambda x, y: ({"a": x, "b": "text"}, y), TypeError, ["x['b']", "str"]),
    ("lengths", lambda x, y: (x, y[:-1]), ValueError, ["same number of examples", "40", "39"]),
    ("no-examples", lambda x, y: (x[:0], y[:0]), ValueError, ["x has no examples"]),
    ("label-negative", lambda x, y: (x, _with(y, 7, -1)), ValueError,
     ["y:", "label -1", "index 7", "[0, 3)"]),
    ("label-equal-classes", lambda x, y: (x, _with(y, 11, CLASSES)), ValueError,
     ["y:", "label 3", "index 11", "[0, 3)"]),
    ("label-large", lambda x, y: (x, _with(y, 39, 1000)), ValueError,
     ["label 1000", "index 39"]),
    ("label-first-of-two", lambda x, y: (x, _with(_with(y, 30, 9), 4, -5)), ValueError,
     ["label -5", "index 4"]),
    ("label-int64-large", lambda x, y: (x, _with(y.astype(np.int64), 2, 2**40)), ValueError,
     [f"label {2**40}", "index 2"]),
    ("label-uint8", lambda x, y: (x, _with(y.astype(np.uint8), 3, 255)), ValueError,
     ["label 255", "index 3"]),
    ("x-nan", lambda x, y: (_with(x, (5, 2), np.nan), y), ValueError,
     ["x holds nan", "(5, 2)", "example 5"]),
    ("x-inf", lambda x, y: (_with(x, (0, 0), np.inf), y), ValueError,
     ["x holds inf", "(0, 0)"]),
    ("x-minus-inf", lambda x, y: (_with(x, (39, 4), -np.inf), y), ValueError,
     ["x holds -inf", "(39, 4)"]),
    ("x-nan-float64", lambda x, y: (_with(x.astype(np.float64), (12, 1), np.nan), y),
     ValueError, ["x holds nan", "(12, 1)"]),
    ("x-nan-float16", lambda x, y: (_with(x.astype(np.float16), (3, 3), np.nan), y),
     ValueError, ["x holds nan", "(3, 3)"]),
    ("x-nan-jax", lambda x, y: (jnp.asarray(_with(x, (8, 0), np.nan)), y), ValueError,
     ["x holds nan", "(8, 0)"]),
    ("x-huge-but-finite-sum-overflows", lambda x, y: (_with(np.full_like(x, 3e38), (1, 1),
                                                            np.nan), y), ValueError,
     ["x holds nan", "(1, 1)"]),
]


@pytest.mark.parametrize(("make", "error", "words"), [c[1:] for c in BAD_DATA],
                         ids=[c[0] for c in BAD_DATA])
def test_fit_refuses_bad_data_naming_it(setup, make, error, words):
    model, params, x, y = setup
    bad_x, bad_y = make(x, y)
    with pytest.raises(error) as caught:
        fit(model, params, bad_x, bad_y, loss="sparse_softmax_cross_entropy",
            optimizer=optax.sgd(0.1), key=jax.random.key(1), verbose=0)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


EVALUATE_CASES = [
    ("label-out-of-range", lambda x, y: (x, _with(y, 3, 7)), ValueError, ["y:", "label 7"]),
    ("x-nan", lambda x, y: (_with(x, (2, 2), np.nan), y), ValueError, ["x holds nan"]),
    ("y-str", lambda x, y: (x, y.astype(str)), TypeError, ["y", "str"]),
    ("no-examples", lambda x, y: (x[:0], y[:0]), ValueError, ["no examples"]),
]


@pytest.mark.parametrize(("make", "error", "words"), [c[1:] for c in EVALUATE_CASES],
                         ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_refuses_bad_data_naming_it(setup, make, error, words):
    model, params, x, y = setup
    bad_x, bad_y = make(x, y)
    with pytest.raises(error) as caught:
        evaluate(model, params, bad_x, bad_y, loss="sparse_softmax_cross_entropy")
    for word in words:
        assert word in str(caught.value)


VALIDATION_CASES = [
    ("label", lambda x, y: (x, _with(y, 1, -2)), ValueError, ["validation_data[1]", "-2"]),
    ("nan", lambda x, y: (_with(x, (0, 1), np.nan), y), ValueError, ["validation_data[0]"]),
    ("list", lambda x, y: (x.tolist(), y), TypeError, ["validation_data[0]", "list"]),
]


@pytest.mark.parametrize(("make", "error", "words"), [c[1:] for c in VALIDATION_CASES],
                         ids=[c[0] for c in VALIDATION_CASES])
def test_validation_data_is_checked_too(setup, make, error, words):
    model, params, x, y = setup
    with pytest.raises(error) as caught:
        fit(model, params, x, y, loss="sparse_softmax_cross_entropy", optimizer=optax.sgd(0.1),
            key=jax.random.key(1), verbose=0, validation_data=make(x, y))
    for word in words:
        assert word in str(caught.value)


def test_float_targets_and_one_hot_labels_are_not_range_checked(setup):
    # Regression targets or one-hot rows may hold any finite value.
    model, params, x, y = setup
    one_hot = np.eye(CLASSES, dtype=np.float32)[y] * 5.0
    result = fit(model, params, x, one_hot, loss=jaxnn.losses.softmax_cross_entropy,
                 optimizer=optax.sgd(0.01), key=jax.random.key(1), verbose=0, metrics=())
    assert np.isfinite(result.history["loss"]).all()


@pytest.mark.parametrize("output", ["logits", "probabilities", "classes"])
def test_predict_on_zero_examples_is_empty_with_the_right_shape(setup, output):
    model, params, x, _ = setup
    got = predict(model, params, x[:0], output=output)
    want = predict(model, params, x[:2], output=output)
    assert got.shape == (0, *want.shape[1:]) and got.dtype == want.dtype


@pytest.mark.parametrize(("bad", "error", "words"), [
    ([[0.0] * FEATURES], TypeError, ["x:", "list"]),
    (np.array([["a"] * FEATURES]), TypeError, ["x", "str"]),
])
def test_predict_refuses_what_is_not_an_array(setup, bad, error, words):
    model, params, _, _ = setup
    with pytest.raises(error) as caught:
        predict(model, params, bad)
    for word in words:
        assert word in str(caught.value)


# -- losses as users write them ------------------------------------------------------------


def _fit(setup, loss, metrics=(), **kwargs):
    model, params, x, y = setup
    return fit(model, params, x, y, loss=loss, optimizer=optax.adam(1e-2),
               key=jax.random.key(1), epochs=2, batch_size=16, verbose=0, metrics=metrics,
               **kwargs)


def _hits(predictions, targets):
    """A per-example metric: 1.0 where the class is right."""
    return (jnp.argmax(predictions, -1) == targets).astype(jnp.float32)


@pytest.fixture(scope="module")
def setup64():
    """Float64 data, model and params for the tests that compare loss forms."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(N, FEATURES))
        y = rng.integers(0, CLASSES, size=N).astype(np.int32)
        model = jaxnn.Sequential([jaxnn.Dense(8), jaxnn.relu, jaxnn.Dense(CLASSES)])
        return model, _init(model, x), x, y


def test_losses_in_three_forms_train_alike(x64, setup64):
    # 40 examples in batches of 16: the last batch is 8 real rows and 8 padded ones,
    # which the per-example form must weigh 0 as the weights= form does.
    setup = setup64
    model, params, x, y = setup
    hits = (_hits,)
    by_weights = _fit(setup, jaxnn.losses.sparse_softmax_cross_entropy, metrics=("accuracy",))
    by_name = _fit(setup, "sparse_softmax_cross_entropy", metrics=("accuracy",))
    per_example = _fit(setup, optax.softmax_cross_entropy_with_integer_labels, metrics=hits)
    for other in (by_name, per_example):
        for a, b in zip(jax.tree_util.tree_leaves(by_weights.params),
                        jax.tree_util.tree_leaves(other.params)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(per_example.history["loss"], by_weights.history["loss"],
                               rtol=1e-10)
    # the per-example metric, padded rows weighed 0 too, equals jaxnn's accuracy
    np.testing.assert_allclose(per_example.history["_hits"],
                               by_weights.history["accuracy"], rtol=1e-12)
    # evaluate with the per-example forms against numpy float64
    got = evaluate(model, per_example.params, x, y,
                   loss=optax.softmax_cross_entropy_with_integer_labels, metrics=hits)
    p = jax.tree_util.tree_map(np.asarray, per_example.params)
    h = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0.0)
    logits = h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert got["loss"] == pytest.approx(-log_probs[np.arange(N), y].mean(), rel=1e-10)
    assert got["_hits"] == pytest.approx(np.mean(logits.argmax(-1) == y), abs=1e-12)


BAD_LOSSES = [
    ("scalar-no-weights",
     lambda p, t: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(p, t)), TypeError,
     ["returns a scalar", "(batch,)", "weights=", "jaxnn.losses"]),
    ("unknown-name", "softmax_crossentropy", ValueError,
     ["unknown name 'softmax_crossentropy'", "sparse_softmax_cross_entropy"]),
    ("private-name", "_reduce", ValueError, ["unknown name '_reduce'"]),
    ("not-callable", 3, TypeError, ["loss:", "int"]),
    ("wrong-length", lambda p, t: jnp.zeros(p.shape[0] + 1), ValueError,
     ["returned shape (17,)", "(16,)"]),
]


@pytest.mark.parametrize(("loss", "error", "words"), [c[1:] for c in BAD_LOSSES],
                         ids=[c[0] for c in BAD_LOSSES])
def test_bad_losses_say_which_form_to_use(setup, loss, error, words):
    with pytest.raises(error) as caught:
        _fit(setup, loss)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


@pytest.mark.parametrize(("metric", "error", "words"), [
    ("accuracyy", ValueError, ["metrics", "accuracyy"]),
    (lambda p, t: jnp.mean(p), TypeError, ["metrics", "returns a scalar"]),
])
def test_bad_metrics_are_named(setup, metric, error, words):
    with pytest.raises(error) as caught:
        _fit(setup, "sparse_softmax_cross_entropy", metrics=(metric,))
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"initial_epoch": -1}, ["initial_epoch", "-1"]),
    ({"initial_epoch": 1.5}, ["initial_epoch", "1.5"]),
    ({"validation_data": np.zeros((4, FEATURES))}, ["validation_data must be a pair"]),
])
def test_bad_fit_arguments_are_named(setup, kwargs, words):
    with pytest.raises((TypeError, ValueError)) as caught:
        _fit(setup, "sparse_softmax_cross_entropy", **kwargs)
    for word in words:
        assert word in str(caught.value)


def test_fit_many_checks_its_data_too(setup):
    model, params, x, y = setup
    stacked = jax.tree_util.tree_map(lambda a: np.stack([a, a]), params)
    with pytest.raises(ValueError, match=r"y: class label 5 at index 9"):
        jaxnn.fit_many(model, stacked, x, _with(y, 9, 5), loss="sparse_softmax_cross_entropy",
                       optimizer=optax.sgd(0.1), key=jax.random.key(1), verbose=0)


def test_an_unhashable_callable_loss_is_taken(x64, setup64):
    # the setup and loss of the per-example case above: its training program, from the cache
    class PerExample:
        __hash__ = None  # as for any class that defines __eq__ only

        def __call__(self, predictions, targets):
            return optax.softmax_cross_entropy_with_integer_labels(predictions, targets)

    by_object = _fit(setup64, PerExample(), metrics=(_hits,))
    by_function = _fit(setup64, optax.softmax_cross_entropy_with_integer_labels,
                       metrics=(_hits,))
    np.testing.assert_allclose(by_object.history["loss"], by_function.history["loss"],
                               rtol=1e-12)
