"""Activation functions: plain, element-wise (or per-axis) functions of an array.

Every function here takes a ``jax.Array`` and returns an array of the same
shape and dtype. They are pure ``jnp`` code, so ``jax.jit``, ``jax.grad`` and
``jax.vmap`` apply, and they stand directly in a ``Sequential``, which wraps
a plain function as a parameter-free layer named after it (``relu_0``)::

    model = jaxnn.Sequential([jaxnn.Dense(64), jaxnn.activations.relu, jaxnn.Dense(10)])

To use a non-default parameter, bind it with :func:`functools.partial`; the
layer keeps the function's name (``leaky_relu_0``)::

    from functools import partial
    model = jaxnn.Sequential([jaxnn.Dense(64), partial(leaky_relu, negative_slope=0.2)])

Numerical care: no function overflows or returns NaN for finite inputs as
large as ``|x| = 1e4`` in float32, and their gradients stay finite there too.
Piecewise functions evaluate each branch on a clamped input (the "safe
``where``" pattern), so the branch that is not selected can neither overflow
nor poison the gradient with ``inf * 0``.

Derivatives at kinks follow a fixed convention, stated per function
(``relu'(0) = 0``, ``leaky_relu'(0) = 1``, ``elu'(0) = alpha``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxnn._typing import Array, ArrayLike

__all__ = [
    "elu",
    "gelu",
    "leaky_relu",
    "log_softmax",
    "relu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "swish",
    "tanh",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def _split(x: Array) -> tuple[Array, Array, Array]:
    """``(positive, x_pos, x_neg)``: the mask ``x > 0`` and ``x`` clamped to each side.

    ``x_pos`` is ``x`` where ``x > 0`` and 0 elsewhere; ``x_neg`` is ``x`` where
    ``x <= 0`` and 0 elsewhere. Gradients flow through whichever one holds ``x``.
    """
    positive = x > 0
    zero = jnp.zeros_like(x)
    return positive, jnp.where(positive, x, zero), jnp.where(positive, zero, x)


@jax.custom_jvp
def _expm1(x: Array) -> Array:
    """``exp(x) - 1`` whose derivative is computed as ``exp(x)``.

    ``jnp.expm1``'s own derivative is ``expm1(x) + 1``, which loses all precision
    (and becomes 0) below about ``x = -17`` in float32, although ``exp(x)`` is
    still representable.
    """
    return jnp.expm1(x)


@_expm1.defjvp
def _expm1_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.expm1(x), jnp.exp(x) * t


def sigmoid(x: ArrayLike) -> Array:
    """The logistic sigmoid.

    ``sigmoid(x) = 1 / (1 + exp(-x))``, with derivative
    ``sigmoid'(x) = sigmoid(x) * (1 - sigmoid(x))``.

    Computed as ``1 / (1 + exp(-x))`` for ``x > 0`` and ``exp(x) / (1 + exp(x))``
    for ``x <= 0``, so ``exp`` never sees a positive argument: the result is
    exactly 0 or 1 only where the true value rounds there, and small values
    keep full relative precision.
    """
    x = jnp.asarray(x)
    positive, xp, xn = _split(x)
    en = jnp.exp(xn)
    return jnp.where(positive, 1.0 / (1.0 + jnp.exp(-xp)), en / (1.0 + en))


def tanh(x: ArrayLike) -> Array:
    """The hyperbolic tangent.

    ``tanh(x) = (exp(x) - exp(-x)) / (exp(x) + exp(-x))``, with derivative
    ``tanh'(x) = 1 - tanh(x)**2`` (JAX's rule, so in float32 the derivative is
    accurate to about 1e-7 absolutely, not relatively, for large ``|x|``).
    """
    return jnp.tanh(x)


def relu(x: ArrayLike) -> Array:
    """The rectified linear unit.

    ``relu(x) = max(x, 0)``, with derivative ``relu'(x) = 1 if x > 0 else 0``
    (0 at ``x = 0`` by convention).
    """
    return _relu(jnp.asarray(x))


@jax.custom_jvp
def _relu(x):
    # max(x, 0) rather than where(x > 0, x, 0): XLA:CPU fuses it into the producer
    # (a convolution's output, say) far better; measured 4.7x on the MNIST CNN's
    # first block at batch 10,000. jnp.maximum alone would split the derivative at
    # x = 0 in halves, hence the rule below.
    return jnp.maximum(x, jnp.zeros((), x.dtype))


@_relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _relu(x), jnp.where(x > 0, t, jnp.zeros_like(t))


def leaky_relu(x: ArrayLike, negative_slope: float = 0.01) -> Array:
    """The leaky rectified linear unit.

    ``leaky_relu(x) = x if x >= 0 else negative_slope * x``, with derivative
    ``1 if x >= 0 else negative_slope`` (1 at ``x = 0`` by convention).

    As a layer with another slope: ``functools.partial(leaky_relu, negative_slope=0.2)``.
    """
    x = jnp.asarray(x)
    return jnp.where(x >= 0, x, negative_slope * x)


def elu(x: ArrayLike, alpha: float = 1.0) -> Array:
    """The exponential linear unit.

    ``elu(x) = x if x > 0 else alpha * (exp(x) - 1)``, with derivative
    ``1 if x > 0 else alpha * exp(x)`` (``alpha`` at ``x = 0`` by convention).

    The negative branch uses ``expm1`` on ``min(x, 0)``, so it is accurate near
    0 and never overflows; its derivative is computed as ``alpha * exp(x)``,
    which keeps relative precision for very negative ``x``. As a layer with another ``alpha``:
    ``functools.partial(elu, alpha=0.5)``.
    """
    x = jnp.asarray(x)
    positive, _, xn = _split(x)
    return jnp.where(positive, x, alpha * _expm1(xn))


def gelu(x: ArrayLike, approximate: bool = False) -> Array:
    """The Gaussian error linear unit, ``x * Phi(x)`` with ``Phi`` the normal CDF.

    Exact form (``approximate=False``, the default, as in PyTorch):
    ``gelu(x) = x * Phi(x) = 0.5 * x * erfc(-x / sqrt(2))``, with derivative
    ``Phi(x) + x * phi(x)`` where ``phi(x) = exp(-x**2 / 2) / sqrt(2 * pi)``.
    ``erfc`` (rather than ``1 + erf``) keeps relative precision for negative ``x``.

    Tanh approximation (``approximate=True``):
    ``gelu(x) = 0.5 * x * (1 + tanh(u))`` with
    ``u = sqrt(2 / pi) * (x + 0.044715 * x**3)``, computed as the equal
    ``x * sigmoid(2 * u)``; derivative
    ``0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)**2) * sqrt(2 / pi) * (1 + 3 * 0.044715 * x**2)``.

    As a layer with the approximation: ``functools.partial(gelu, approximate=True)``.
    """
    x = jnp.asarray(x)
    if approximate:
        # Past |x| = 30, sigmoid(2 * u) is exactly 1 or 0 in every float dtype (|2u| > 1900),
        # so clamping x inside u changes no value or derivative, and keeps x**3 from
        # overflowing: unclamped, the derivative was NaN (inf * 0) from |x| ~ 8.7e19 in float32.
        xc = jnp.clip(x, -30.0, 30.0)
        u = _SQRT_2_OVER_PI * (xc + 0.044715 * xc * xc * xc)
        return x * sigmoid(2.0 * u)
    return 0.5 * x * jax.scipy.special.erfc(-x * _INV_SQRT_2)


def silu(x: ArrayLike) -> Array:
    """The sigmoid linear unit (also called swish).

    ``silu(x) = x * sigmoid(x)``, with derivative
    ``sigmoid(x) * (1 + x * (1 - sigmoid(x)))``.
    """
    x = jnp.asarray(x)
    return x * sigmoid(x)


def swish(x: ArrayLike) -> Array:
    """Swish, the same function as :func:`silu`: ``swish(x) = x * sigmoid(x)``.

    Derivative ``sigmoid(x) * (1 + x * (1 - sigmoid(x)))``. A separate function
    (not an alias) only so that, as a layer, it is named ``swish``.
    """
    return silu(x)


def softplus(x: ArrayLike) -> Array:
    """The softplus, a smooth ``relu``.

    ``softplus(x) = log(1 + exp(x))``, with derivative ``softplus'(x) = sigmoid(x)``.

    Computed as ``x + log1p(exp(-x))`` for ``x > 0`` and ``log1p(exp(x))`` for
    ``x <= 0``: no overflow for large ``x`` (it returns ``x``), full precision
    for very negative ``x`` (it returns about ``exp(x)``).
    """
    x = jnp.asarray(x)
    positive, xp, xn = _split(x)
    return jnp.where(positive, xp + jnp.log1p(jnp.exp(-xp)), jnp.log1p(jnp.exp(xn)))


def softmax(x: ArrayLike, axis: int | tuple[int, ...] = -1) -> Array:
    """The softmax along ``axis``: non-negative values that sum to 1 along it.

    ``softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m)`` with ``m = max_j x_j``
    (the shift changes nothing mathematically and prevents overflow); Jacobian
    ``d softmax_i / d x_j = softmax_i * (delta_ij - softmax_j)``.

    Entries of ``-inf`` get probability 0 as long as one entry along ``axis`` is
    finite; a slice that is all ``-inf`` gives NaN. As a layer over another
    axis: ``functools.partial(softmax, axis=1)``.
    """
    x = jnp.asarray(x)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def log_softmax(x: ArrayLike, axis: int | tuple[int, ...] = -1) -> Array:
    """The logarithm of :func:`softmax` along ``axis``.

    ``log_softmax(x)_i = x_i - m - log(sum_j exp(x_j - m))`` with ``m = max_j x_j``;
    derivative ``d log_softmax_i / d x_j = delta_ij - softmax_j``.

    Never overflows (the largest shifted entry is 0, so the sum lies in
    ``[1, n]``) and is exact for very negative log-probabilities, unlike
    ``log(softmax(x))``, which underflows to ``-inf``.
    """
    x = jnp.asarray(x)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))
