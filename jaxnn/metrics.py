"""Evaluation metrics: pure functions of predictions and labels.

Every function is pure and jit-, vmap-friendly: shape checks happen on static
shapes while tracing; nothing is checked on values (values cannot raise under
``jit``). Conventions:

* ``predictions`` are scores, ``(N, C)``: logits or probabilities give the
  same argmax. Ties go to the first (lowest-index) maximum, as ``np.argmax``.
* ``labels`` are integer class ids ``(N,)`` or one-hot ``(N, C)`` (one-hot
  labels are turned into ids with argmax).
* ``weights`` (optional, ``(N,)``): per-example weights, e.g. a 0/1 mask of
  the real examples in a padded last batch. A weighted metric is
  ``sum(weights * correct) / sum(weights)``; it is NaN when the weights sum
  to zero.

Means over many batches are accumulated with :class:`MeanState`
(:func:`mean_init`, :func:`mean_update`, :func:`mean_result`): a NamedTuple of
two scalars, so it can be carried through ``jax.lax.scan`` or a jitted step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn._typing import Array, ArrayLike, DTypeLike

__all__ = [
    "MeanState",
    "accuracy",
    "confusion_matrix",
    "mean_init",
    "mean_result",
    "mean_update",
    "top_k_accuracy",
]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _class_ids(labels: ArrayLike, owner: str, n: int, num_classes: int | None) -> Array:
    """Integer ids ``(N,)`` from integer labels ``(N,)`` or one-hot labels ``(N, C)``."""
    labels = jnp.asarray(labels)
    shape = labels.shape
    if labels.ndim == 2 and num_classes is not None:
        if shape != (n, num_classes):
            raise ValueError(
                f"{owner}: one-hot labels must have shape (N, C) = {(n, num_classes)} to match "
                f"predictions; got labels shape {shape}"
            )
        return jnp.argmax(labels, axis=-1)
    if labels.ndim != 1 or shape[0] != n:
        raise ValueError(
            f"{owner}: labels must have shape (N,) = {(n,)} (class ids) or (N, C) (one-hot) to "
            f"match predictions with N = {n}; got labels shape {shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{owner}: class-id labels must be integers, got dtype {labels.dtype} with shape "
            f"{shape}; convert them, e.g. labels.astype(jnp.int32)"
        )
    return labels


def _weighted_mean(values: Array, weights: ArrayLike | None, owner: str) -> Array:
    dtype = jnp.result_type(float)
    values = values.astype(dtype)
    if weights is None:
        return jnp.mean(values)
    weights = jnp.asarray(weights)
    if weights.shape != values.shape:
        raise ValueError(
            f"{owner}: weights must have shape (N,) = {values.shape}, got weights shape "
            f"{weights.shape}"
        )
    weights = weights.astype(jnp.promote_types(dtype, weights.dtype)
                             if jnp.issubdtype(weights.dtype, jnp.floating) else dtype)
    return jnp.sum(weights * values) / jnp.sum(weights)


def _check_predictions(predictions: ArrayLike, owner: str) -> Array:
    predictions = jnp.asarray(predictions)
    if predictions.ndim not in (1, 2):
        raise ValueError(
            f"{owner}: predictions must have shape (N, C) (class scores) or (N,) (binary), "
            f"got predictions shape {predictions.shape}"
        )
    return predictions


def accuracy(
    predictions: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    from_logits: bool = True,
) -> Array:
    """Fraction of examples whose predicted class is the label.

    Multi-class: ``predictions`` ``(N, C)`` with ``C >= 2`` (logits or
    probabilities), the predicted class is ``argmax`` over classes (first max
    wins). ``labels`` are ids ``(N,)`` or one-hot ``(N, C)``.

    Binary: ``predictions`` ``(N,)`` or ``(N, 1)``, one score per example for
    class 1. The predicted class is 1 when the score is ``> 0`` (logits,
    ``from_logits=True``, the default, as a jaxnn model's last Dense layer
    gives) or ``> 0.5`` (probabilities, ``from_logits=False``); a score exactly
    at the threshold counts as class 0. ``labels`` are ``(N,)`` or ``(N, 1)``
    with values 0 or 1 (integers, bools or floats).

    Args:
      predictions: ``(N, C)``, ``(N, 1)`` or ``(N,)`` scores.
      labels: as above.
      weights: optional ``(N,)`` per-example weights or 0/1 mask.
      from_logits: only for binary predictions; see above.

    Returns:
      A scalar: ``sum(w * [pred == label]) / sum(w)`` (``w = 1`` by default).
    """
    owner = "accuracy"
    predictions = _check_predictions(predictions, owner)
    n = predictions.shape[0]
    if predictions.ndim == 1 or predictions.shape[1] == 1:
        scores = predictions.reshape(n)
        labels = jnp.asarray(labels)
        if labels.shape not in ((n,), (n, 1)):
            raise ValueError(
                f"{owner}: binary predictions of shape {predictions.shape} need labels of shape "
                f"(N,) = {(n,)} or (N, 1) = {(n, 1)}; got labels shape {labels.shape}"
            )
        threshold = 0.0 if from_logits else 0.5
        predicted = scores > threshold
        correct = predicted == (labels.reshape(n) > 0.5)
    else:
        ids = _class_ids(labels, owner, n, predictions.shape[1])
        correct = jnp.argmax(predictions, axis=-1) == ids
    return _weighted_mean(correct, weights, owner)


def top_k_accuracy(
    predictions: ArrayLike,
    labels: ArrayLike,
    k: int = 5,
    weights: ArrayLike | None = None,
) -> Array:
    """Fraction of examples whose label is among the ``k`` highest-scored classes.

    Classes are ranked by score, ties broken by the lower index first (the
    order of a stable sort of ``-predictions``), so ``k=1`` equals
    :func:`accuracy`. An example is correct when the label's rank is below
    ``k``, i.e. ``#{j : s_j > s_y} + #{j < y : s_j == s_y} < k``.

    Args:
      predictions: ``(N, C)`` scores (logits or probabilities).
      labels: ids ``(N,)`` or one-hot ``(N, C)``.
      k: a Python int, ``1 <= k <= C``.
      weights: optional ``(N,)`` per-example weights or 0/1 mask.

    Returns:
      A scalar in ``[0, 1]``.
    """
    owner = "top_k_accuracy"
    predictions = jnp.asarray(predictions)
    if predictions.ndim != 2:
        raise ValueError(
            f"{owner}: predictions must have shape (N, C), got predictions shape "
            f"{predictions.shape}"
        )
    n, c = predictions.shape
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= c:
        raise ValueError(
            f"{owner}: k must be an integer with 1 <= k <= C = {c} (the number of classes in "
            f"predictions of shape {predictions.shape}), got k={k!r}"
        )
    ids = _class_ids(labels, owner, n, c)
    label_score = jnp.take_along_axis(predictions, ids[:, None], axis=1)
    before = jnp.arange(c)[None, :] < ids[:, None]
    ahead = (predictions > label_score) | ((predictions == label_score) & before)
    rank = jnp.sum(ahead, axis=1)
    return _weighted_mean(rank < k, weights, owner)


def confusion_matrix(
    predictions: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
) -> Array:
    """Counts of (true class, predicted class) pairs.

    Args:
      predictions: scores ``(N, num_classes)`` (argmax is taken, first max wins)
        or integer predicted classes ``(N,)``.
      labels: ids ``(N,)`` or one-hot ``(N, num_classes)``.
      num_classes: a Python int ``C``.

    Returns:
      An int32 ``(C, C)`` array ``M`` with ``M[i, j]`` = number of examples of
      true class ``i`` predicted as class ``j`` (rows true, columns predicted,
      as scikit-learn). Ids outside ``[0, C)`` are not counted (values cannot
      raise under ``jit``), so ``M.sum()`` is less than ``N`` if there are any.
    """
    owner = "confusion_matrix"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) \
            or num_classes < 1:
        raise ValueError(f"{owner}: num_classes must be a positive integer, got {num_classes!r}")
    predictions = _check_predictions(predictions, owner)
    n = predictions.shape[0]
    if predictions.ndim == 2:
        if predictions.shape[1] != num_classes:
            raise ValueError(
                f"{owner}: score predictions must have shape (N, num_classes) = "
                f"{(n, num_classes)}, got predictions shape {predictions.shape}"
            )
        predicted = jnp.argmax(predictions, axis=-1)
    else:
        if not jnp.issubdtype(predictions.dtype, jnp.integer):
            raise TypeError(
                f"{owner}: 1-D predictions must be integer class ids, got dtype "
                f"{predictions.dtype} with shape {predictions.shape}; pass (N, num_classes) "
                "scores or predicted ids"
            )
        predicted = predictions
    ids = _class_ids(labels, owner, n, num_classes)
    true_one_hot = jax.nn.one_hot(ids, num_classes, dtype=jnp.int32)
    predicted_one_hot = jax.nn.one_hot(predicted, num_classes, dtype=jnp.int32)
    return jnp.einsum("ni,nj->ij", true_one_hot, predicted_one_hot,
                      preferred_element_type=jnp.int32)


# -- running means -----------------------------------------------------------


class MeanState(NamedTuple):
    """A running weighted mean: ``result = total / count``.

    ``total`` is ``sum(w * value)`` and ``count`` is ``sum(w)`` over all
    values seen; both are scalars of the state's float dtype.
    """

    total: Array
    count: Array


def mean_init(dtype: DTypeLike | None = None) -> MeanState:
    """An empty running mean (``total = count = 0``).

    ``dtype``: the accumulator dtype; default JAX's float (float32, or float64
    under x64). Updates keep this dtype, so the state can be a ``lax.scan`` carry.
    """
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    zero = jnp.zeros((), dtype)
    return MeanState(total=zero, count=zero)


def mean_update(state: MeanState, values: ArrayLike, weights: ArrayLike | None = None) -> MeanState:
    """Add ``values`` (a scalar, e.g. a batch's mean loss, or an array of
    per-example values) to the running mean.

    Each element of ``values`` counts with weight ``w`` (default 1);
    ``weights`` must broadcast to ``values``' shape (a per-batch scalar weight,
    such as the batch size when ``values`` is a batch mean, or a 0/1 mask).

    ``total += sum(w * values)``, ``count += sum(w)``.
    """
    owner = "mean_update"
    dtype = state.total.dtype
    values = jnp.asarray(values).astype(dtype)
    if weights is None:
        weights = jnp.ones(values.shape, dtype)
    else:
        weights = jnp.asarray(weights)
        try:
            weights = jnp.broadcast_to(weights, values.shape).astype(dtype)
        except ValueError as error:
            raise ValueError(
                f"{owner}: weights of shape {weights.shape} do not broadcast to values of shape "
                f"{values.shape}"
            ) from error
    return MeanState(total=state.total + jnp.sum(weights * values),
                     count=state.count + jnp.sum(weights))


def mean_result(state: MeanState) -> Array:
    """``total / count``: the weighted mean of everything added (NaN if nothing was)."""
    return state.total / state.count
