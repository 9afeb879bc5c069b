"""Loss functions: plain functions of predictions and targets that return a scalar.

Every loss has the form::

    loss(predictions, targets, *, weights=None, mask=None, reduction="mean")

and is a pure ``jnp`` function, so ``jax.jit``, ``jax.grad`` and ``jax.vmap``
apply. Losses compose with anything else by plain arithmetic
(``loss + 1e-4 * penalty``).

**Shapes.** The leading axis of ``predictions`` is the batch. Each loss first
computes an *element loss* (per array element for regression and binary
losses; per position ``logits.shape[:-1]`` for categorical losses, whose last
axis holds the classes), then averages it over every non-batch axis, giving
one *per-example loss* ``l`` of shape ``(batch,)``. ``predictions`` and
``targets`` must have exactly the same shape (``(batch,)`` against
``(batch, 1)`` is an error, not a silent broadcast); for the sparse losses the
integer ``labels`` have shape ``logits.shape[:-1]``.

**Weights, mask and reduction.** ``weights`` (real) and ``mask`` (bool, or
numbers where non-zero means "keep") each have shape ``(batch,)``. With
``w = weights * mask`` (either defaulting to ones):

* ``reduction="mean"`` (default): ``sum(w * l) / sum(w)``, the weighted mean
  over examples; 0 when ``sum(w) == 0`` (everything masked).
* ``reduction="sum"``: ``sum(w * l)``.
* ``reduction="none"``: the array ``w * l`` of shape ``(batch,)``.

Masked-out examples contribute exactly 0 to the value even if their loss is
NaN or inf (padding), but a NaN produced inside the loss can still reach the
gradient, so masked predictions should be finite. Negative weights are not
checked.

**Precision.** Losses are computed in at least float32 (float16 and bfloat16
inputs are promoted), in float64 when the inputs are float64.

**Epsilon.** Losses on probabilities (:func:`binary_cross_entropy`,
:func:`categorical_cross_entropy`, :func:`sparse_categorical_cross_entropy`)
clip the probabilities to ``[EPSILON, 1 - EPSILON]`` with ``EPSILON = 1e-7``
(the bounds rounded to the computation dtype), as Keras does, so
probabilities of exactly 0 and 1 give a finite loss (at most about 16.1) and a
finite gradient (zero outside the clip range). Prefer the ``*_with_logits`` /
``softmax_*`` losses, which need no clipping and are exact.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn._typing import Array, ArrayLike
from jaxnn.activations import log_softmax, softplus

__all__ = [
    "EPSILON",
    "Reduction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "categorical_cross_entropy",
    "huber",
    "mae",
    "mean_absolute_error",
    "mean_squared_error",
    "mse",
    "softmax_cross_entropy",
    "sparse_categorical_cross_entropy",
    "sparse_softmax_cross_entropy",
]

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")

EPSILON = 1e-7
"""Losses on probabilities clip them to ``[EPSILON, 1 - EPSILON]``."""


# -- input checks ------------------------------------------------------------


def _check_reduction(loss: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{loss}: reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, "
            f"got {reduction!r}"
        )


def _floating(loss: str, arg: str, x: ArrayLike) -> Array:
    """``x`` as an array in the loss dtype (at least float32); ``TypeError`` unless floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{loss}: `{arg}` must be a floating-point array, got dtype {x.dtype} "
            f"with shape {x.shape}"
        )
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _with_batch(loss: str, arg: str, x: Array, *, min_rank: int, layout: str) -> None:
    if x.ndim < min_rank:
        raise ValueError(
            f"{loss}: `{arg}` must have shape {layout} (rank >= {min_rank}), "
            f"got shape {x.shape}"
        )


def _same_shape(loss: str, name_a: str, a: Array, name_b: str, b: Array) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{loss}: `{name_b}` has shape {b.shape} but `{name_a}` has shape {a.shape}; "
            "they must be equal (no broadcasting)"
        )


def _check_fraction(loss: str, arg: str, value: float) -> None:
    if isinstance(value, int | float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{loss}: `{arg}` must lie in [0, 1], got {value!r}")


def _integer_labels(loss: str, labels: ArrayLike, scores: Array, scores_name: str) -> Array:
    """Check integer ``labels`` of shape ``scores.shape[:-1]``, and their range when concrete."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{loss}: `labels` must hold integer class indices, got dtype {labels.dtype} "
            f"with shape {labels.shape}; for one-hot or probability labels use the "
            "non-sparse loss, or convert with labels.astype(jnp.int32)"
        )
    if labels.shape != scores.shape[:-1]:
        raise ValueError(
            f"{loss}: `labels` has shape {labels.shape} but `{scores_name}` has shape "
            f"{scores.shape}; labels must have shape {scores.shape[:-1]} "
            f"(= {scores_name}.shape[:-1])"
        )
    try:  # the range can be checked only on concrete values, not under jit or vmap
        concrete = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:
        return labels
    num_classes = scores.shape[-1]
    if concrete.size and (concrete.min() < 0 or concrete.max() >= num_classes):
        raise ValueError(
            f"{loss}: `labels` must lie in [0, {num_classes}) for {num_classes} classes, "
            f"got values from {concrete.min()} to {concrete.max()}"
        )
    return labels


# -- reduction ---------------------------------------------------------------


def _per_example(element_loss: Array) -> Array:
    """Average an element loss of shape ``(batch, ...)`` over its non-batch axes."""
    return jnp.mean(element_loss, axis=tuple(range(1, element_loss.ndim)))


def _example_array(loss: str, arg: str, x: ArrayLike, batch: int, batch_of: str) -> Array:
    x = jnp.asarray(x)
    if x.shape != (batch,):
        raise ValueError(
            f"{loss}: `{arg}` must have shape ({batch},), one value per example (the batch "
            f"axis of `{batch_of}` has size {batch}), got shape {x.shape}"
        )
    return x


def _reduce(
    loss: str,
    per_example: Array,
    weights: ArrayLike | None,
    mask: ArrayLike | None,
    reduction: str,
    batch_of: str,
) -> Array:
    """Apply ``weights`` and ``mask`` to the per-example losses and reduce them."""
    batch = per_example.shape[0]
    dtype = per_example.dtype
    if weights is None:
        w = jnp.ones((batch,), dtype)
    else:
        w = _example_array(loss, "weights", weights, batch, batch_of).astype(dtype)
    weighted = w * per_example
    if mask is not None:
        keep = _example_array(loss, "mask", mask, batch, batch_of)
        keep = keep if keep.dtype == jnp.bool_ else keep != 0
        weighted = jnp.where(keep, weighted, jnp.zeros_like(weighted))
        w = jnp.where(keep, w, jnp.zeros_like(w))
    if reduction == "none":
        return weighted
    total = jnp.sum(weighted)
    if reduction == "sum":
        return total
    denominator = jnp.sum(w)
    nonzero = denominator != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, denominator, 1), jnp.zeros_like(total))


# -- regression --------------------------------------------------------------


def _regression_inputs(loss: str, predictions: ArrayLike, targets: ArrayLike,
                       reduction: str) -> tuple[Array, Array]:
    _check_reduction(loss, reduction)
    predictions = _floating(loss, "predictions", predictions)
    _with_batch(loss, "predictions", predictions, min_rank=1, layout="(batch, ...)")
    targets = jnp.asarray(targets)
    _same_shape(loss, "predictions", predictions, "targets", targets)
    return predictions, targets.astype(predictions.dtype)


def mean_squared_error(
    predictions: ArrayLike,
    targets: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Mean squared error.

    Element loss ``(p - t)**2`` (derivative ``2 * (p - t)``), averaged over the
    non-batch axes. ``predictions`` and ``targets``: ``(batch, ...)``, equal shapes.
    Returns a scalar (``(batch,)`` for ``reduction="none"``); see the module
    docstring for ``weights``, ``mask`` and ``reduction``.
    """
    name = "mean_squared_error"
    p, t = _regression_inputs(name, predictions, targets, reduction)
    return _reduce(name, _per_example(jnp.square(p - t)), weights, mask, reduction,
                   "predictions")


def mean_absolute_error(
    predictions: ArrayLike,
    targets: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Mean absolute error.

    Element loss ``|p - t|`` (derivative ``sign(p - t)``; JAX takes 1 at
    ``p == t``), averaged over the non-batch axes. ``predictions`` and
    ``targets``: ``(batch, ...)``, equal shapes.
    """
    name = "mean_absolute_error"
    p, t = _regression_inputs(name, predictions, targets, reduction)
    return _reduce(name, _per_example(jnp.abs(p - t)), weights, mask, reduction,
                   "predictions")


def huber(
    predictions: ArrayLike,
    targets: ArrayLike,
    *,
    delta: float = 1.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Huber loss: quadratic for small errors, linear for large ones.

    With ``d = p - t``, the element loss is ``0.5 * d**2`` if ``|d| <= delta``
    and ``delta * (|d| - 0.5 * delta)`` otherwise (derivative
    ``clip(d, -delta, delta)``), averaged over the non-batch axes. ``delta > 0``.
    """
    name = "huber"
    if isinstance(delta, int | float) and not delta > 0:
        raise ValueError(f"{name}: `delta` must be positive, got {delta!r}")
    p, t = _regression_inputs(name, predictions, targets, reduction)
    error = jnp.abs(p - t)
    quadratic = jnp.minimum(error, delta)
    element = 0.5 * jnp.square(quadratic) + delta * (error - quadratic)
    return _reduce(name, _per_example(element), weights, mask, reduction, "predictions")


mse = mean_squared_error
mae = mean_absolute_error


# -- binary classification ---------------------------------------------------


def _binary_inputs(loss: str, scores_name: str, scores: ArrayLike, labels: ArrayLike,
                   label_smoothing: float, reduction: str) -> tuple[Array, Array]:
    _check_reduction(loss, reduction)
    _check_fraction(loss, "label_smoothing", label_smoothing)
    scores = _floating(loss, scores_name, scores)
    _with_batch(loss, scores_name, scores, min_rank=1, layout="(batch, ...)")
    labels = jnp.asarray(labels)
    _same_shape(loss, scores_name, scores, "labels", labels)
    labels = labels.astype(scores.dtype)
    return scores, labels * (1.0 - label_smoothing) + 0.5 * label_smoothing


def binary_cross_entropy(
    probabilities: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Binary cross-entropy on probabilities (Keras ``binary_crossentropy``).

    ``probabilities`` ``p`` (in [0, 1]) and ``labels`` ``t`` (in [0, 1], not
    checked): ``(batch, ...)``, equal shapes. With
    ``q = clip(p, EPSILON, 1 - EPSILON)`` (``EPSILON = 1e-7``) and smoothed
    labels ``s = t * (1 - label_smoothing) + 0.5 * label_smoothing``, the
    element loss is ``-(s * log(q) + (1 - s) * log(1 - q))`` (derivative in
    ``p``: ``(q - s) / (q * (1 - q))`` inside the clip range, 0 outside),
    averaged over the non-batch axes.

    Prefer :func:`binary_cross_entropy_with_logits`, which needs no clipping.
    """
    name = "binary_cross_entropy"
    p, s = _binary_inputs(name, "probabilities", probabilities, labels, label_smoothing,
                          reduction)
    q = jnp.clip(p, EPSILON, 1.0 - EPSILON)
    element = -(s * jnp.log(q) + (1.0 - s) * jnp.log1p(-q))
    return _reduce(name, _per_example(element), weights, mask, reduction, "probabilities")


def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Binary cross-entropy on logits: ``binary_cross_entropy(sigmoid(z), t)`` without clipping.

    ``logits`` ``z`` and ``labels`` ``t`` (in [0, 1], not checked): ``(batch, ...)``,
    equal shapes. With smoothed labels
    ``s = t * (1 - label_smoothing) + 0.5 * label_smoothing``, the element loss is
    ``-(s * log(sigmoid(z)) + (1 - s) * log(1 - sigmoid(z)))
    = s * softplus(-z) + (1 - s) * softplus(z)``, computed in that second form,
    which is finite and exact for any finite ``z`` (e.g. ``|z| = 1e4``).
    Derivative ``sigmoid(z) - s``. Averaged over the non-batch axes.
    """
    name = "binary_cross_entropy_with_logits"
    z, s = _binary_inputs(name, "logits", logits, labels, label_smoothing, reduction)
    element = s * softplus(-z) + (1.0 - s) * softplus(z)
    return _reduce(name, _per_example(element), weights, mask, reduction, "logits")


# -- multi-class classification ----------------------------------------------


def _categorical_inputs(loss: str, scores_name: str, scores: ArrayLike,
                        label_smoothing: float, reduction: str) -> Array:
    _check_reduction(loss, reduction)
    _check_fraction(loss, "label_smoothing", label_smoothing)
    scores = _floating(loss, scores_name, scores)
    _with_batch(loss, scores_name, scores, min_rank=2, layout="(batch, ..., classes)")
    return scores


def _dense_labels(loss: str, scores_name: str, scores: Array, labels: ArrayLike,
                  label_smoothing: float) -> Array:
    labels = jnp.asarray(labels)
    _same_shape(loss, scores_name, scores, "labels", labels)
    num_classes = scores.shape[-1]
    labels = labels.astype(scores.dtype)
    return labels * (1.0 - label_smoothing) + label_smoothing / num_classes


def _sparse_cross_entropy(log_probs: Array, labels: Array, label_smoothing: float) -> Array:
    """``-(1 - ls) * log_probs[label] - (ls / K) * sum_k log_probs[k]``; NaN for bad labels."""
    num_classes = log_probs.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    element = -(1.0 - label_smoothing) * picked
    if not (isinstance(label_smoothing, int | float) and label_smoothing == 0):
        element = element - (label_smoothing / num_classes) * jnp.sum(log_probs, axis=-1)
    return jnp.where(valid, element, jnp.full_like(element, jnp.nan))


def _clipped_log(probabilities: Array) -> Array:
    """``log(clip(p / sum(p, -1), EPSILON, 1 - EPSILON))``, as Keras on probabilities."""
    p = probabilities / jnp.sum(probabilities, axis=-1, keepdims=True)
    return jnp.log(jnp.clip(p, EPSILON, 1.0 - EPSILON))


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Cross-entropy between ``softmax(logits)`` and one-hot (or probability) ``labels``.

    ``logits`` and ``labels``: ``(batch, ..., classes)``, equal shapes; each
    row of ``labels`` should sum to 1 (not checked). With ``K`` classes and
    smoothed labels ``s = labels * (1 - label_smoothing) + label_smoothing / K``,
    the element loss is ``-sum_k s_k * log_softmax(logits)_k`` (derivative
    ``softmax(logits) - s``), averaged over the positions ``...`` if any.
    Finite for any finite logits (e.g. ``1e4``); mask classes with a large
    negative logit rather than ``-inf`` (``0 * -inf`` is NaN).
    """
    name = "softmax_cross_entropy"
    z = _categorical_inputs(name, "logits", logits, label_smoothing, reduction)
    s = _dense_labels(name, "logits", z, labels, label_smoothing)
    element = -jnp.sum(s * log_softmax(z, axis=-1), axis=-1)
    return _reduce(name, _per_example(element), weights, mask, reduction, "logits")


def sparse_softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Cross-entropy from logits and integer class labels.

    Keras' ``sparse_categorical_crossentropy(from_logits=True)``, optax's
    ``softmax_cross_entropy_with_integer_labels``. ``logits``:
    ``(batch, ..., classes)``; ``labels``: integer dtype, shape
    ``logits.shape[:-1]``. Equal to :func:`softmax_cross_entropy` with
    ``one_hot(labels)``: with ``K`` classes the element loss is
    ``-(1 - label_smoothing) * log_softmax(logits)[label]
    - (label_smoothing / K) * sum_k log_softmax(logits)_k``.

    Label range: outside ``jax.jit``/``jax.vmap`` labels outside ``[0, K)``
    raise ``ValueError``; under tracing they cannot be checked, and such an
    example's loss is NaN (so the mistake shows rather than silently
    counting as 0). Float labels raise ``TypeError``.
    """
    name = "sparse_softmax_cross_entropy"
    z = _categorical_inputs(name, "logits", logits, label_smoothing, reduction)
    labels = _integer_labels(name, labels, z, "logits")
    element = _sparse_cross_entropy(log_softmax(z, axis=-1), labels, label_smoothing)
    return _reduce(name, _per_example(element), weights, mask, reduction, "logits")


def categorical_cross_entropy(
    probabilities: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Cross-entropy on probabilities (Keras ``categorical_crossentropy(from_logits=False)``).

    ``probabilities`` (e.g. a softmax output) and one-hot or probability
    ``labels``: ``(batch, ..., classes)``, equal shapes. Exactly as Keras:
    the probabilities are first renormalised to sum to 1 over the last axis,
    ``q = p / sum_k p_k``, then clipped, ``q = clip(q, EPSILON, 1 - EPSILON)``
    with ``EPSILON = 1e-7``; with smoothed labels
    ``s = labels * (1 - label_smoothing) + label_smoothing / K`` the element
    loss is ``-sum_k s_k * log(q_k)``, averaged over the positions ``...``.
    A row of all zeros gives NaN.

    Prefer :func:`softmax_cross_entropy` on logits: it is exact where the
    clipping here caps the loss at ``-log(1e-7) ~ 16.1``.
    """
    name = "categorical_cross_entropy"
    p = _categorical_inputs(name, "probabilities", probabilities, label_smoothing, reduction)
    s = _dense_labels(name, "probabilities", p, labels, label_smoothing)
    element = -jnp.sum(s * _clipped_log(p), axis=-1)
    return _reduce(name, _per_example(element), weights, mask, reduction, "probabilities")


def sparse_categorical_cross_entropy(
    probabilities: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Cross-entropy on probabilities and integer labels (Keras ``from_logits=False``).

    ``probabilities``: ``(batch, ..., classes)``; ``labels``: integer dtype,
    shape ``probabilities.shape[:-1]``. With ``log q`` as in
    :func:`categorical_cross_entropy` (renormalise, clip to
    ``[EPSILON, 1 - EPSILON]``, ``EPSILON = 1e-7``), the element loss is
    ``-(1 - label_smoothing) * log(q[label]) - (label_smoothing / K) * sum_k log(q_k)``.
    Labels are checked as in :func:`sparse_softmax_cross_entropy` (``ValueError``
    when concrete and out of range, NaN under tracing; ``TypeError`` for floats).
    """
    name = "sparse_categorical_cross_entropy"
    p = _categorical_inputs(name, "probabilities", probabilities, label_smoothing, reduction)
    labels = _integer_labels(name, labels, p, "probabilities")
    element = _sparse_cross_entropy(_clipped_log(p), labels, label_smoothing)
    return _reduce(name, _per_example(element), weights, mask, reduction, "probabilities")
