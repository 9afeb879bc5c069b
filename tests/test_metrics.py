"""Metrics against numpy references (ties included), under jit and vmap, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import metrics

N, C = 24, 5


def _scores(seed=0, ties=False):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many rows have tied maxima
        return rng.integers(0, 3, size=(N, C)).astype(np.float32)
    return rng.normal(size=(N, C)).astype(np.float32)


def _labels(seed=1):
    return np.random.default_rng(seed).integers(0, C, size=N).astype(np.int32)


def _np_first_argmax(scores):
    """First index of the maximum, by an explicit loop."""
    out = []
    for row in scores:
        best = 0
        for j in range(1, len(row)):
            if row[j] > row[best]:
                best = j
        out.append(best)
    return np.array(out)


@pytest.mark.parametrize("ties", [False, True])
def test_accuracy_matches_numpy(ties):
    scores, labels = _scores(ties=ties), _labels()
    expected = np.mean(_np_first_argmax(scores) == labels)
    np.testing.assert_allclose(float(metrics.accuracy(scores, labels)), expected, rtol=1e-6)
    one_hot = np.eye(C, dtype=np.float32)[labels]
    np.testing.assert_allclose(float(metrics.accuracy(scores, one_hot)), expected, rtol=1e-6)
    probs = np.asarray(jax.nn.softmax(scores))
    np.testing.assert_allclose(float(metrics.accuracy(probs, labels)), expected, rtol=1e-6)


def test_ties_go_to_first_max():
    scores = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, 1.0, 1.0]], np.float32)
    assert list(_np_first_argmax(scores)) == list(np.argmax(scores, axis=1)) == [1, 0, 1]
    np.testing.assert_allclose(float(metrics.accuracy(scores, np.array([1, 0, 1]))), 1.0)
    np.testing.assert_allclose(float(metrics.accuracy(scores, np.array([2, 1, 2]))), 0.0)


def test_accuracy_weights_and_mask():
    scores, labels = _scores(), _labels()
    correct = (_np_first_argmax(scores) == labels).astype(np.float64)
    weights = np.random.default_rng(2).uniform(0.1, 2.0, size=N).astype(np.float32)
    np.testing.assert_allclose(float(metrics.accuracy(scores, labels, weights)),
                               np.sum(weights * correct) / np.sum(weights), rtol=1e-6)
    mask = np.arange(N) < 10
    np.testing.assert_allclose(float(metrics.accuracy(scores, labels, mask)),
                               correct[:10].mean(), rtol=1e-6)


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_binary_accuracy(shape):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=N).astype(np.float32)
    labels = rng.integers(0, 2, size=N)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected_logits = np.mean((logits > 0) == (labels == 1))
    # probabilities: threshold 0.5 on p, a different rule from the logit one when shifted
    shifted = np.clip(probs + 0.15, 0, 1).astype(np.float32)
    expected_probs = np.mean((shifted > 0.5) == (labels == 1))
    if shape == "column":
        logits, shifted, labels = logits[:, None], shifted[:, None], labels[:, None]
    np.testing.assert_allclose(float(metrics.accuracy(logits, labels)), expected_logits,
                               rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics.accuracy(shifted, labels.astype(np.float32), from_logits=False)),
        expected_probs, rtol=1e-6)


def test_binary_threshold_is_exclusive():
    labels = np.array([0, 0, 1])
    np.testing.assert_allclose(float(metrics.accuracy(np.array([0.0, -1.0, 2.0]), labels)), 1.0)
    np.testing.assert_allclose(
        float(metrics.accuracy(np.array([0.5, 0.2, 0.9]), labels, from_logits=False)), 1.0)


def _np_top_k(scores, labels, k):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.mean([labels[i] in order[i] for i in range(len(labels))])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, C])
def test_top_k_accuracy_matches_numpy(k, ties):
    scores, labels = _scores(ties=ties), _labels()
    got = metrics.top_k_accuracy(scores, labels, k=k)
    np.testing.assert_allclose(float(got), _np_top_k(scores, labels, k), rtol=1e-6)
    if k == 1:
        np.testing.assert_allclose(float(got), float(metrics.accuracy(scores, labels)))


def test_top_k_weights_and_one_hot():
    scores, labels = _scores(), _labels()
    weights = (np.arange(N) % 3 != 0).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    hit = np.array([labels[i] in order[i] for i in range(N)], np.float64)
    got = metrics.top_k_accuracy(scores, np.eye(C)[labels], k=2, weights=weights)
    np.testing.assert_allclose(float(got), np.sum(weights * hit) / np.sum(weights), rtol=1e-6)


def _np_confusion(true, predicted, num_classes):
    out = np.zeros((num_classes, num_classes), np.int64)
    for t, p in zip(true, predicted):
        if 0 <= t < num_classes and 0 <= p < num_classes:
            out[t, p] += 1
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_confusion_matrix_matches_numpy_and_sklearn(ties):
    scores, labels = _scores(ties=ties), _labels()
    predicted = _np_first_argmax(scores)
    expected = _np_confusion(labels, predicted, C)
    got = metrics.confusion_matrix(scores, labels, C)
    assert got.shape == (C, C) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(
        np.asarray(metrics.confusion_matrix(predicted.astype(np.int32), np.eye(C)[labels], C)),
        expected)
    # the loop reference agrees with scikit-learn's convention (rows true, columns predicted)
    sk_metrics = pytest.importorskip("sklearn.metrics")
    np.testing.assert_array_equal(
        sk_metrics.confusion_matrix(labels, predicted, labels=list(range(C))), expected)


def test_confusion_matrix_rows_are_true_classes():
    got = metrics.confusion_matrix(np.array([1, 1, 2]), np.array([0, 0, 0]), 3)
    np.testing.assert_array_equal(np.asarray(got), [[0, 2, 1], [0, 0, 0], [0, 0, 0]])


def test_confusion_matrix_ignores_out_of_range_ids():
    predicted = np.array([0, 3, 1, -1, 2])
    true = np.array([0, 1, 4, 2, 2])
    got = metrics.confusion_matrix(predicted, true, 3)
    np.testing.assert_array_equal(np.asarray(got), _np_confusion(true, predicted, 3))
    assert int(got.sum()) == 2


def test_under_jit():
    scores, labels = _scores(ties=True), _labels()
    weights = np.linspace(0.5, 1.5, N).astype(np.float32)
    np.testing.assert_allclose(float(jax.jit(metrics.accuracy)(scores, labels, weights)),
                               float(metrics.accuracy(scores, labels, weights)), rtol=1e-6)
    top2 = jax.jit(metrics.top_k_accuracy, static_argnames="k")(scores, labels, k=2)
    np.testing.assert_allclose(float(top2), _np_top_k(scores, labels, 2), rtol=1e-6)
    cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(scores, labels, C)
    np.testing.assert_array_equal(np.asarray(cm), _np_confusion(labels, _np_first_argmax(scores),
                                                                C))


def test_under_vmap():
    groups = 3
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=(groups, N, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(groups, N)).astype(np.int32)
    acc = jax.vmap(metrics.accuracy)(scores, labels)
    top2 = jax.vmap(lambda s, y: metrics.top_k_accuracy(s, y, k=2))(scores, labels)
    cms = jax.vmap(lambda s, y: metrics.confusion_matrix(s, y, C))(scores, labels)
    for g in range(groups):
        predicted = _np_first_argmax(scores[g])
        np.testing.assert_allclose(float(acc[g]), np.mean(predicted == labels[g]), rtol=1e-6)
        np.testing.assert_allclose(float(top2[g]), _np_top_k(scores[g], labels[g], 2), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(cms[g]), _np_confusion(labels[g], predicted, C))


def test_mean_accumulator_matches_numpy_over_batches():
    rng = np.random.default_rng(6)
    values = rng.normal(size=(4, 8)).astype(np.float32)
    weights = rng.uniform(0, 1, size=(4, 8)).astype(np.float32)
    state = metrics.mean_init()
    for v, w in zip(values, weights):
        state = metrics.mean_update(state, v, w)
    np.testing.assert_allclose(float(metrics.mean_result(state)),
                               np.sum(values.astype(np.float64) * weights) / np.sum(weights),
                               rtol=1e-5)
    # batch means weighted by batch sizes equal the mean over all examples
    sizes = [3, 5, 2]
    chunks = np.split(rng.normal(size=10), np.cumsum(sizes)[:-1])
    state = metrics.mean_init()
    for chunk in chunks:
        state = metrics.mean_update(state, np.mean(chunk), weights=len(chunk))
    np.testing.assert_allclose(float(metrics.mean_result(state)), np.mean(np.concatenate(chunks)),
                               rtol=1e-5)


def test_mean_accumulator_in_scan_and_jit():
    values = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)

    @jax.jit
    def run(values):
        def body(state, batch):
            return metrics.mean_update(state, batch), None

        state, _ = jax.lax.scan(body, metrics.mean_init(), values)
        return state

    state = run(values)
    assert state.total.dtype == state.count.dtype == jnp.float32
    np.testing.assert_allclose(float(state.count), values.size)
    np.testing.assert_allclose(float(metrics.mean_result(state)),
                               np.mean(values.astype(np.float64)), rtol=1e-5)
    assert np.isnan(float(metrics.mean_result(metrics.mean_init())))


def test_mean_init_dtype(x64):
    assert metrics.mean_init().total.dtype == jnp.float64
    state = metrics.mean_update(metrics.mean_init(jnp.float32), np.ones(3, np.float64))
    assert state.total.dtype == jnp.float32


def test_shape_errors_name_argument_and_shapes():
    scores, labels = _scores(), _labels()
    with pytest.raises(ValueError, match=r"accuracy: labels must have shape \(N,\) = \(24,\) .* "
                                         r"got labels shape \(23,\)"):
        metrics.accuracy(scores, labels[:-1])
    with pytest.raises(ValueError, match=r"accuracy: one-hot labels must have shape \(N, C\) = "
                                         r"\(24, 5\) .* got labels shape \(24, 4\)"):
        metrics.accuracy(scores, np.zeros((N, 4)))
    with pytest.raises(ValueError, match=r"accuracy: weights must have shape \(N,\) = \(24,\), "
                                         r"got weights shape \(24, 1\)"):
        metrics.accuracy(scores, labels, np.ones((N, 1)))
    with pytest.raises(ValueError, match=r"accuracy: predictions must have shape .* got "
                                         r"predictions shape \(2, 3, 4\)"):
        metrics.accuracy(np.zeros((2, 3, 4)), labels)
    with pytest.raises(ValueError, match=r"accuracy: binary predictions of shape \(24,\) need "
                                         r"labels .* got labels shape \(24, 2\)"):
        metrics.accuracy(scores[:, 0], np.zeros((N, 2)))
    with pytest.raises(TypeError, match=r"accuracy: class-id labels must be integers, got dtype "
                                        r"float32"):
        metrics.accuracy(scores, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"top_k_accuracy: k must be an integer with 1 <= k <= "
                                         r"C = 5 .* got k=6"):
        metrics.top_k_accuracy(scores, labels, k=6)
    with pytest.raises(ValueError, match=r"confusion_matrix: score predictions must have shape "
                                         r"\(N, num_classes\) = \(24, 4\), got predictions "
                                         r"shape \(24, 5\)"):
        metrics.confusion_matrix(scores, labels, 4)
    with pytest.raises(TypeError, match="confusion_matrix: 1-D predictions must be integer"):
        metrics.confusion_matrix(scores[:, 0], labels, C)
    with pytest.raises(ValueError, match="confusion_matrix: num_classes must be a positive"):
        metrics.confusion_matrix(labels, labels, 0)
    with pytest.raises(ValueError, match=r"mean_update: weights of shape \(3,\) do not broadcast "
                                         r"to values of shape \(4,\)"):
        metrics.mean_update(metrics.mean_init(), np.ones(4), np.ones(3))
