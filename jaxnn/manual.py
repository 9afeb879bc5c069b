"""Backpropagation written out by hand, for a multilayer perceptron.

Everywhere else jaxnn lets ``jax.grad`` find gradients. This module computes
them itself, one layer at a time, with the chain rule in plain sight, so the
maths of a network can be read next to the code that runs it. The result is
the same gradient pytree ``jax.grad`` gives for the equivalent functional model
(tested to 1e-6 relative in float64), so it plugs straight into
:func:`jaxnn.fit` (``value_and_grad=``) and any optimizer.

The pieces, each a pure function of arrays:

* a Dense layer: :func:`dense_forward` ``z = x W + b`` and :func:`dense_backward`
  ``dW = x^T dz``, ``db = sum_batch dz``, ``dx = dz W^T``;
* activations (``"identity"``, ``"sigmoid"``, ``"tanh"``, ``"relu"``,
  ``"softmax"``): :func:`activation_forward` and :func:`activation_backward`,
  which turns ``dL/da`` into ``dL/dz``;
* losses with their gradient in the predictions: :func:`mse`,
  :func:`softmax_cross_entropy` (the simplified gradient ``softmax(z) - y``) and
  :func:`cross_entropy` (on probabilities, gradient ``-y / p``);
* penalties on the kernels with their gradients: :func:`l1`, :func:`l2`;
* :class:`MLP`, which chains them: forward pass, loss, backward pass.

Notation: ``B`` examples, per-example weights ``w`` (all ones by default), and
``dX`` always means ``dL/dX``, the gradient of the scalar loss ``L`` with respect
to ``X`` (an array of the shape of ``X``).

Example::

    net = MLP(units=(64, 10), activation="relu")
    params = net.init(jax.random.key(0), x)       # = net.sequential().init(...)
    loss, grads, logits = net.value_and_grad("softmax_cross_entropy")(params, x, labels)
    # grads == jax.grad of sparse_softmax_cross_entropy(net.sequential().apply(params, x), labels)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnn import activations as _act
from jaxnn._typing import Array, ArrayLike, Params, PRNGKey
from jaxnn.layers._base import Layer

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "LayerTape",
    "activation_backward",
    "activation_forward",
    "cross_entropy",
    "dense_backward",
    "dense_forward",
    "l1",
    "l2",
    "mse",
    "softmax_cross_entropy",
]

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "softmax")
"""The activations :func:`activation_forward` and :func:`activation_backward` know."""

LOSSES = ("mse", "softmax_cross_entropy")
"""The losses :meth:`MLP.value_and_grad` accepts."""

ValueAndGrad = Callable[..., tuple[Array, Params, Array]]


# --------------------------------------------------------------------------
# Dense layer
# --------------------------------------------------------------------------


def dense_forward(params: Params, x: Array) -> Array:
    """``z = x @ kernel + bias``: ``x`` ``(B, in)``, kernel ``(in, out)``, bias ``(out,)``."""
    return jnp.matmul(x, params["kernel"]) + params["bias"]


def dense_backward(params: Params, x: Array, dz: Array, *,
                   input_grad: bool = True) -> tuple[Params, Array | None]:
    """The chain rule through ``z = x W + b``.

    Each ``z[i, k] = sum_j x[i, j] W[j, k] + b[k]``, so, summing over every
    place a parameter is used::

        dW[j, k] = sum_i x[i, j] dz[i, k]      i.e.  dW = x^T dz      (in, out)
        db[k]    = sum_i dz[i, k]                                    (out,)
        dx[i, j] = sum_k dz[i, k] W[j, k]      i.e.  dx = dz W^T      (B, in)

    Args:
      params: ``{"kernel": (in, out), "bias": (out,)}``.
      x: the layer's input ``(B, in)``.
      dz: ``dL/dz`` ``(B, out)``.
      input_grad: compute ``dx`` (the first layer of a network does not need it).

    Returns:
      ``({"kernel": dW, "bias": db}, dx)``, ``dx`` None when not asked for.
    """
    grads = {"kernel": jnp.matmul(x.T, dz), "bias": jnp.sum(dz, axis=0)}
    dx = jnp.matmul(dz, params["kernel"].T) if input_grad else None
    return grads, dx


# --------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------


def _check_activation(name: Any, owner: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: unknown activation {name!r}; expected one of "
                         f"{', '.join(map(repr, ACTIVATIONS))}")
    return name


def activation_forward(name: str, z: ArrayLike) -> Array:
    """``a = f(z)`` for the activation ``name`` (softmax over the last axis).

    The functions are jaxnn's own (:mod:`jaxnn.activations`), so the forward
    pass is exactly that of the functional model.
    """
    _check_activation(name, "activation_forward")
    z = jnp.asarray(z)
    if name == "identity":
        return z
    return {"sigmoid": _act.sigmoid, "tanh": _act.tanh, "relu": _act.relu,
            "softmax": _act.softmax}[name](z)


def activation_backward(name: str, z: Array, a: Array, da: Array) -> Array:
    """``dz`` from ``da`` for ``a = f(z)``: the chain rule through the activation.

    Element-wise activations multiply by their derivative, written with the
    output ``a`` where that is cheaper::

        identity: dz = da
        sigmoid:  dz = da * a * (1 - a)
        tanh:     dz = da * (1 - a^2)
        relu:     dz = da * [z > 0]             (0 at z == 0, as jaxnn.relu)

    Softmax mixes the entries of a row: ``d a_i / d z_j = a_i (delta_ij - a_j)``,
    so ``dz_j = sum_i da_i a_i (delta_ij - a_j) = a_j (da_j - sum_i da_i a_i)``::

        softmax:  dz = a * (da - sum(da * a, axis=-1, keepdims=True))

    Args:
      name: one of :data:`ACTIVATIONS`.
      z, a: the activation's input and output (same shape).
      da: ``dL/da`` (same shape).
    """
    _check_activation(name, "activation_backward")
    if name == "identity":
        return da
    if name == "sigmoid":
        return da * a * (1 - a)
    if name == "tanh":
        return da * (1 - jnp.square(a))
    if name == "relu":
        return jnp.where(z > 0, da, jnp.zeros_like(da))
    return a * (da - jnp.sum(da * a, axis=-1, keepdims=True))


# --------------------------------------------------------------------------
# Losses: value and gradient in the predictions
# --------------------------------------------------------------------------


def _batch_weights(weights: ArrayLike | None, batch: int, dtype: Any, owner: str) -> Array:
    if weights is None:
        return jnp.ones((batch,), dtype)
    weights = jnp.asarray(weights)
    if weights.shape != (batch,):
        raise ValueError(f"{owner}: weights must have shape ({batch},), one per example, "
                         f"got shape {weights.shape}")
    return weights.astype(dtype)


def _normaliser(w: Array) -> Array:
    """``sum(w)``, or 1 when it is 0 (all examples weigh 0: loss and gradient are 0)."""
    total = jnp.sum(w)
    return jnp.where(total == 0, jnp.ones_like(total), total)


def _floating(x: ArrayLike, owner: str, arg: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{owner}: {arg} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{owner}: {arg} must have a batch axis, got shape {x.shape}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _same_shape(owner: str, predictions: Array, targets: Array, arg: str) -> None:
    if predictions.shape != targets.shape:
        raise ValueError(f"{owner}: {arg} has shape {targets.shape} but the predictions "
                         f"have shape {predictions.shape}; they must be equal")


def mse(predictions: ArrayLike, targets: ArrayLike,
        weights: ArrayLike | None = None) -> tuple[Array, Array]:
    """Mean squared error and its gradient in the predictions.

    ``predictions`` ``p`` and ``targets`` ``t``: ``(B, ...)``, equal shapes; each
    example has ``D`` values (the product of the non-batch axes)::

        l_i = (1/D) sum_j (p_ij - t_ij)^2           (per example)
        L   = sum_i w_i l_i / sum_i w_i             (weighted mean; plain mean if w = 1)
        dp_ij = 2 w_i (p_ij - t_ij) / (D sum_i w_i)

    Equals :func:`jaxnn.losses.mean_squared_error` (with ``weights=``).

    Returns:
      ``(L, dp)``: the scalar loss and ``dL/dp`` of the shape of ``p``.
    """
    p = _floating(predictions, "manual.mse", "predictions")
    t = jnp.asarray(targets)
    _same_shape("manual.mse", p, t, "targets")
    t = t.astype(p.dtype)
    w = _batch_weights(weights, p.shape[0], p.dtype, "manual.mse")
    per_value = p[0].size
    total = _normaliser(w)
    w_b = w.reshape((-1,) + (1,) * (p.ndim - 1))
    error = p - t
    loss = jnp.sum(w * jnp.mean(jnp.square(error).reshape(p.shape[0], -1), axis=1)) / total
    return loss, 2 * w_b * error / (per_value * total)


def _class_targets(labels: ArrayLike, scores: Array, owner: str) -> Array:
    """One-hot targets from integer labels ``(B,)``, or float labels ``(B, C)`` as given."""
    from jaxnn.losses import _integer_labels

    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        labels = _integer_labels(owner, labels, scores, "logits")
        return jax.nn.one_hot(labels, scores.shape[-1], dtype=scores.dtype)
    _same_shape(owner, scores, labels, "labels")
    return labels.astype(scores.dtype)


def _check_classes(x: Array, owner: str, arg: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{owner}: {arg} must have shape (batch, classes), got shape {x.shape}")


def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike,
                          weights: ArrayLike | None = None) -> tuple[Array, Array]:
    """Cross-entropy of ``softmax(logits)`` and its gradient in the logits, simplified.

    ``logits`` ``z``: ``(B, C)``; ``labels``: integer classes ``(B,)`` (made
    one-hot) or one-hot / probability rows ``y`` ``(B, C)`` that sum to 1.
    With ``p = softmax(z)``::

        l_i = -sum_k y_ik log p_ik
        L   = sum_i w_i l_i / sum_i w_i
        dz_i = w_i (p_i - y_i) / sum_i w_i

    The simplification: through softmax, ``dz = p * (dp - sum(dp * p))`` with
    ``dp = -y / p`` gives ``dz = -y + p * sum(y) = p - y`` when the row of ``y``
    sums to 1. No division by ``p``, so it is exact even when ``p`` underflows.
    Equals :func:`jaxnn.losses.sparse_softmax_cross_entropy` (integer labels)
    and :func:`jaxnn.losses.softmax_cross_entropy`.

    Returns:
      ``(L, dz)``.
    """
    owner = "manual.softmax_cross_entropy"
    z = _floating(logits, owner, "logits")
    _check_classes(z, owner, "logits")
    y = _class_targets(labels, z, owner)
    w = _batch_weights(weights, z.shape[0], z.dtype, owner)
    total = _normaliser(w)
    log_p = _act.log_softmax(z, axis=-1)
    loss = jnp.sum(w * -jnp.sum(y * log_p, axis=-1)) / total
    return loss, w[:, None] * (jnp.exp(log_p) - y) / total


def cross_entropy(probabilities: ArrayLike, labels: ArrayLike,
                  weights: ArrayLike | None = None) -> tuple[Array, Array]:
    """Cross-entropy on probabilities and its gradient in them (the unsimplified form).

    ``probabilities`` ``p``: ``(B, C)``, strictly positive (no clipping here);
    ``labels`` as in :func:`softmax_cross_entropy`::

        L    = -sum_i w_i sum_k y_ik log p_ik / sum_i w_i
        dp_i = -w_i y_i / (p_i sum_i w_i)

    Followed by :func:`activation_backward` of ``"softmax"`` this gives the same
    ``dz = p - y`` as :func:`softmax_cross_entropy`, the long way round.

    Returns:
      ``(L, dp)``.
    """
    owner = "manual.cross_entropy"
    p = _floating(probabilities, owner, "probabilities")
    _check_classes(p, owner, "probabilities")
    y = _class_targets(labels, p, owner)
    w = _batch_weights(weights, p.shape[0], p.dtype, owner)
    total = _normaliser(w)
    loss = jnp.sum(w * -jnp.sum(y * jnp.log(p), axis=-1)) / total
    return loss, -w[:, None] * y / (p * total)


# --------------------------------------------------------------------------
# Penalties on the kernels
# --------------------------------------------------------------------------


def _kernel_penalty(params: Params, value: Callable, grad: Callable) -> tuple[Array, Params]:
    """Apply a penalty to every ``kernel`` leaf; other leaves get gradient 0."""
    total = jnp.zeros((), jnp.result_type(float))
    grads: Params = {}
    for name, layer in params.items():
        grads[name] = {}
        for leaf_name, leaf in layer.items():
            if leaf_name == "kernel":
                total = total + value(leaf)
                grads[name][leaf_name] = grad(leaf)
            else:
                grads[name][leaf_name] = jnp.zeros_like(leaf)
    return total, grads


def l1(strength: float, params: Params) -> tuple[Array, Params]:
    """L1 penalty on the kernels and its gradient::

        P = strength * sum |W|        dP/dW = strength * sign(W)   (0 at W == 0)

    Biases are not penalised (gradient 0), as :func:`jaxnn.regularizers.l1`'s
    default. ``params``: ``{"dense_0": {"kernel", "bias"}, ...}``.

    Returns:
      ``(P, grads)`` with ``grads`` shaped like ``params``.
    """
    return _kernel_penalty(params, lambda w: strength * jnp.sum(jnp.abs(w)),
                           lambda w: strength * jnp.sign(w))


def l2(strength: float, params: Params) -> tuple[Array, Params]:
    """L2 penalty on the kernels and its gradient (no factor 1/2, as Keras)::

        P = strength * sum W^2        dP/dW = 2 * strength * W

    Biases are not penalised, as :func:`jaxnn.regularizers.l2`'s default.

    Returns:
      ``(P, grads)`` with ``grads`` shaped like ``params``.
    """
    return _kernel_penalty(params, lambda w: strength * jnp.sum(jnp.square(w)),
                           lambda w: 2 * strength * w)


_PENALTIES = {"l1": l1, "l2": l2}


# --------------------------------------------------------------------------
# The multilayer perceptron
# --------------------------------------------------------------------------


class LayerTape(NamedTuple):
    """What the forward pass keeps of one Dense + activation layer for the backward pass.

    ``x``: the layer's input ``(B, in)``; ``z = x W + b``: ``(B, out)``;
    ``a = f(z)``: the layer's output ``(B, out)``.
    """

    x: Array
    z: Array
    a: Array


def _tree_add(a: Params, b: Params) -> Params:
    return jax.tree_util.tree_map(jnp.add, a, b)


@dataclasses.dataclass(frozen=True)
class MLP:
    """A multilayer perceptron whose backward pass is written by hand.

    ``MLP(units=(h1, ..., C), activation="relu", output_activation="identity")``
    is the network ``x -> Dense(h1) -> f -> ... -> Dense(C) -> g`` with ``f`` the
    hidden activation and ``g`` the output activation. It has the parameter
    layout of its functional twin :meth:`sequential`,
    ``jaxnn.Sequential([Dense(h1), f, ..., Dense(C), g])``:
    ``{"dense_0": {"kernel": (in, h1), "bias": (h1,)}, ...}``.

    Attributes:
      units: the width of each Dense layer, the last one being the output.
      activation: one of :data:`ACTIVATIONS` for every hidden layer, or a
        sequence of them, one per hidden layer (``len(units) - 1``).
      output_activation: applied to the last Dense layer; ``"identity"``
        (logits, for :func:`softmax_cross_entropy`) by default.
    """

    units: tuple[int, ...]
    activation: str | tuple[str, ...] = "relu"
    output_activation: str = "identity"

    def __post_init__(self) -> None:
        units = tuple(self.units) if isinstance(self.units, Sequence) else self.units
        if (not isinstance(units, tuple) or not units
                or not all(isinstance(u, int) and not isinstance(u, bool) and u > 0
                           for u in units)):
            raise ValueError(f"MLP: units must be a non-empty sequence of positive integers, "
                             f"got {self.units!r}")
        object.__setattr__(self, "units", units)
        hidden = len(units) - 1
        if isinstance(self.activation, str):
            _check_activation(self.activation, "MLP")
        else:
            acts = tuple(self.activation)
            if len(acts) != hidden:
                raise ValueError(f"MLP: activation must be one name or one per hidden layer "
                                 f"({hidden} for units={units}), got {len(acts)}: {acts!r}")
            for act in acts:
                _check_activation(act, "MLP")
            object.__setattr__(self, "activation", acts)
        _check_activation(self.output_activation, "MLP")

    # -- structure ------------------------------------------------------------

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation after each Dense layer (the last is ``output_activation``)."""
        hidden = len(self.units) - 1
        acts = (self.activation,) * hidden if isinstance(self.activation, str) \
            else self.activation
        return (*acts, self.output_activation)

    def sequential(self) -> Layer:
        """The same network as a functional jaxnn model, for ``jax.grad`` and ``fit``."""
        from jaxnn.layers import Dense, Sequential

        functions = {"sigmoid": _act.sigmoid, "tanh": _act.tanh, "relu": _act.relu,
                     "softmax": _act.softmax}
        layers: list[Any] = []
        for width, act in zip(self.units, self.activations):
            layers.append(Dense(width))
            if act != "identity":
                layers.append(functions[act])
        return Sequential(layers)

    def init(self, key: PRNGKey, x: ArrayLike) -> Params:
        """Parameters for inputs like ``x`` ``(B, in)``: those of :meth:`sequential`'s init."""
        return self.sequential().init(key, x)

    def _check(self, params: Params, x: Array) -> None:
        expected = [f"dense_{i}" for i in range(len(self.units))]
        if sorted(params) != sorted(expected):
            raise ValueError(f"MLP: params must hold the layers {expected} (as MLP.init "
                             f"returns), got {sorted(params)}")
        if x.ndim != 2:
            raise ValueError(f"MLP: x must have shape (batch, features), got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"MLP: x must be a floating-point array, got dtype {x.dtype}")
        kernel = params["dense_0"]["kernel"]
        if x.shape[1] != kernel.shape[0]:
            raise ValueError(f"MLP: x has {x.shape[1]} features but dense_0/kernel expects "
                             f"{kernel.shape[0]} (kernel shape {kernel.shape})")

    # -- forward and backward ---------------------------------------------------

    def forward(self, params: Params, x: ArrayLike) -> tuple[Array, tuple[LayerTape, ...]]:
        """The forward pass, keeping what the backward pass needs.

        For each layer ``l``: ``z_l = a_{l-1} W_l + b_l`` and ``a_l = f_l(z_l)``,
        with ``a_{-1} = x``.

        Returns:
          ``(output, tape)``: the network output ``(B, C)`` and one
          :class:`LayerTape` per layer.
        """
        a = jnp.asarray(x)
        self._check(params, a)
        tape = []
        for index, act in enumerate(self.activations):
            z = dense_forward(params[f"dense_{index}"], a)
            out = activation_forward(act, z)
            tape.append(LayerTape(a, z, out))
            a = out
        return a, tuple(tape)

    def apply(self, params: Params, x: ArrayLike) -> Array:
        """The network output ``(B, C)``."""
        return self.forward(params, x)[0]

    def backward(self, params: Params, tape: Sequence[LayerTape], d_output: Array) -> Params:
        """The backward pass: from ``dL/d(output)`` to ``dL/d(params)``.

        From the last layer to the first::

            dz_l     = f_l'(z_l) * da_l              (activation_backward)
            dW_l     = a_{l-1}^T dz_l                (dense_backward)
            db_l     = sum_batch dz_l
            da_{l-1} = dz_l W_l^T                    (the next layer down gets this)

        Returns:
          The gradient pytree, shaped like ``params``.
        """
        grads: Params = {}
        da = d_output
        for index in reversed(range(len(tape))):
            layer = tape[index]
            dz = activation_backward(self.activations[index], layer.z, layer.a, da)
            grads[f"dense_{index}"], da = dense_backward(
                params[f"dense_{index}"], layer.x, dz, input_grad=index > 0)
        return {name: grads[name] for name in sorted(grads)}

    def value_and_grad(self, loss: str = "softmax_cross_entropy", *, l1: float = 0.0,
                       l2: float = 0.0) -> ValueAndGrad:
        """A function ``(params, x, y, weights=None) -> (value, grads, predictions)``.

        ``value = loss(net(params, x), y, weights) + l1 * sum|W| + l2 * sum W^2``
        (penalties on the kernels), ``grads`` its gradient in ``params`` by
        forward pass, loss gradient and backward pass, and ``predictions`` the
        network output. This is the signature :func:`jaxnn.fit` takes as
        ``value_and_grad=``; it is a pure function, so ``jax.jit`` applies.

        Args:
          loss: ``"softmax_cross_entropy"`` (the network outputs logits; ``y``
            integer classes ``(B,)`` or one-hot ``(B, C)``) or ``"mse"``
            (``y`` of the output's shape).
          l1, l2: penalty strengths, as ``jaxnn.regularizers.l1(l1)`` and
            ``jaxnn.regularizers.l2(l2)`` (kernels only).
        """
        if loss not in LOSSES:
            raise ValueError(f"MLP.value_and_grad: unknown loss {loss!r}; expected one of "
                             f"{', '.join(map(repr, LOSSES))}")
        for what, strength in (("l1", l1), ("l2", l2)):
            if not isinstance(strength, int | float) or isinstance(strength, bool) \
                    or not strength >= 0:
                raise ValueError(f"MLP.value_and_grad: {what} must be a number >= 0, "
                                 f"got {strength!r}")
        loss_fn = mse if loss == "mse" else softmax_cross_entropy
        penalties = [(strength, _PENALTIES[what])
                     for what, strength in (("l1", l1), ("l2", l2)) if strength]

        def value_and_grad(params: Params, x: ArrayLike, y: ArrayLike,
                           weights: ArrayLike | None = None) -> tuple[Array, Params, Array]:
            output, tape = self.forward(params, x)
            value, d_output = loss_fn(output, y, weights)
            grads = self.backward(params, tape, d_output)
            for strength, penalty in penalties:
                extra, extra_grads = penalty(strength, params)
                value = value + extra
                grads = _tree_add(grads, extra_grads)
            return value, grads, output

        return value_and_grad
