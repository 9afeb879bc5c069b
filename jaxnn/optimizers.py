"""Optimizers written by hand, speaking optax's protocol.

Each factory returns an :class:`optax.GradientTransformation` ``(init, update)``:

* ``init(params) -> state``: a NamedTuple of this module (each has a ``count``
  of the updates done so far, an int32 scalar).
* ``update(grads, state, params=None) -> (updates, new_state)``: the
  ``updates`` are to be *added* to the parameters, e.g. with
  :func:`optax.apply_updates`.

So ours and optax's are interchangeable, and ours compose with optax's
(``optax.chain(optax.clip_by_global_norm(1.0), jaxnn.optimizers.adam(1e-3))``).
The update rules are written here with :func:`jax.tree_util.tree_map`; they
agree number for number with their optax counterparts (tested in float64).

A learning rate is a float or a schedule: a function ``t -> lr(t)`` of the
step count. As in optax, the schedule is called with the count *before* this
update, so the first update uses ``schedule(0)``. This module has the usual
ones, each with its formula in the docstring and its arguments checked:

* :func:`constant`: ``lr(t) = value``;
* :func:`exponential_decay`: ``lr(t) = init_value * decay_rate ** (t / transition_steps)``;
* :func:`cosine_decay`: from ``init_value`` down to ``alpha * init_value`` over
  ``decay_steps``, along half a cosine;
* :func:`warmup_cosine_decay`: a linear warmup to ``peak_value``, then a
  cosine decay to ``end_value``;
* :func:`piecewise_constant`: ``values[i]`` between ``boundaries[i - 1]``
  and ``boundaries[i]``.

They take optax's argument names and order, and are plain functions of the
count, so they work with every optimizer here and with optax's
(``optax.adam(jaxnn.optimizers.cosine_decay(1e-3, 10_000))``); optax's own
schedules (``optax.linear_schedule``, ...) work with ours.

Updates and optimizer state keep the dtype of the gradients and parameters:
bfloat16 parameters get bfloat16 moments and updates.

Example::

    opt = jaxnn.optimizers.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn._typing import Array, ArrayLike

Schedule: TypeAlias = Callable[[Array], ArrayLike]
ScalarOrSchedule: TypeAlias = float | Schedule

__all__ = [
    "AdamState",
    "GradientDescentState",
    "ScalarOrSchedule",
    "Schedule",
    "SgdState",
    "adam",
    "adamw",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "gradient_descent",
    "piecewise_constant",
    "sgd",
    "warmup_cosine_decay",
]


class GradientDescentState(NamedTuple):
    """State of :func:`gradient_descent`: only the step count."""

    count: Array  # int32 scalar: updates done so far


class SgdState(NamedTuple):
    """State of :func:`sgd`.

    ``trace`` is the momentum buffer (same structure and dtypes as the params),
    or ``None`` when ``momentum == 0`` (nothing to remember).
    """

    count: Array
    trace: Any


class AdamState(NamedTuple):
    """State of :func:`adam` and :func:`adamw`: the first (``mu``) and second
    (``nu``) moment estimates, each shaped like the params."""

    count: Array
    mu: Any
    nu: Any


# -- helpers ---------------------------------------------------------------


def _check_number(value: Any, owner: str, what: str, *, low: float = 0.0,
                  high: float | None = None, high_open: bool = True) -> None:
    """Check a Python-number hyperparameter (traced or array values pass unchecked)."""
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}")
    if not isinstance(value, int | float | np.floating | np.integer):
        return
    value = float(value)
    if math.isnan(value) or value < low or (
        high is not None and (value >= high if high_open else value > high)
    ):
        upper = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{owner}: {what} must be >= {low}{upper}, got {value!r}")


def _check_learning_rate(learning_rate: Any, owner: str) -> None:
    if not callable(learning_rate):
        _check_number(learning_rate, owner, "learning_rate")


def _increment(count: Array) -> Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping around."""
    top = jnp.iinfo(count.dtype).max
    return jnp.where(count < top, count + 1, top)


def _zero_count() -> Array:
    return jnp.zeros([], jnp.int32)


def _scale_by_learning_rate(updates: Any, learning_rate: ScalarOrSchedule, count: Array) -> Any:
    """``-lr * u`` per leaf, with ``lr = learning_rate(count)`` for a schedule.

    The step is cast to each leaf's dtype first, so a bfloat16 leaf stays bfloat16.
    """
    step = -learning_rate(count) if callable(learning_rate) else -learning_rate
    return jax.tree_util.tree_map(lambda u: jnp.asarray(step, dtype=u.dtype) * u, updates)


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree_util.tree_map(lambda t, ref: t.astype(ref.dtype), tree, like)


def _zeros_like(params: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, params)


# -- optimizers --------------------------------------------------------------


def gradient_descent(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """Plain gradient descent.

    Update rule, for each parameter ``w`` with gradient ``g`` at step ``t``
    (counting from 0)::

        w <- w - lr(t) * g

    Args:
      learning_rate: a float ``lr``, or a schedule ``t -> lr(t)``.

    Returns:
      An optax ``GradientTransformation`` with state :class:`GradientDescentState`.
      It equals ``optax.sgd(learning_rate)``.
    """
    _check_learning_rate(learning_rate, "gradient_descent")

    def init(params: Any) -> GradientDescentState:
        del params
        return GradientDescentState(count=_zero_count())

    def update(grads: Any, state: GradientDescentState, params: Any = None):
        del params
        updates = _scale_by_learning_rate(grads, learning_rate, state.count)
        return updates, GradientDescentState(count=_increment(state.count))

    return optax.GradientTransformation(init, update)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Stochastic gradient descent with (optionally Nesterov) momentum.

    Update rule, for each parameter ``w`` with gradient ``g`` at step ``t``
    (the momentum buffer ``m`` starts at zero)::

        m <- g + momentum * m
        d  = m                       (heavy-ball momentum)
        d  = g + momentum * m        (nesterov=True, using the new m)
        w <- w - lr(t) * d

    This is the convention of ``optax.sgd`` and PyTorch (no ``1 - momentum``
    damping of the gradient), and it equals ``optax.sgd`` number for number.
    With ``momentum=0`` it is :func:`gradient_descent`.

    Args:
      learning_rate: a float ``lr``, or a schedule ``t -> lr(t)``.
      momentum: the decay ``0 <= momentum < 1`` of the momentum buffer.
      nesterov: use Nesterov's look-ahead form.

    Returns:
      An optax ``GradientTransformation`` with state :class:`SgdState`.
    """
    _check_learning_rate(learning_rate, "sgd")
    _check_number(momentum, "sgd", "momentum", high=1.0)
    keep_trace = not (isinstance(momentum, int | float) and momentum == 0)

    def init(params: Any) -> SgdState:
        return SgdState(count=_zero_count(), trace=_zeros_like(params) if keep_trace else None)

    def update(grads: Any, state: SgdState, params: Any = None):
        del params
        if keep_trace:
            trace = jax.tree_util.tree_map(lambda g, m: g + momentum * m, grads, state.trace)
            if nesterov:
                direction = jax.tree_util.tree_map(lambda g, m: g + momentum * m, grads, trace)
            else:
                direction = trace
            trace = _cast_like(trace, state.trace)
        else:
            trace, direction = None, grads
        updates = _scale_by_learning_rate(direction, learning_rate, state.count)
        return updates, SgdState(count=_increment(state.count), trace=trace)

    return optax.GradientTransformation(init, update)


def _adam_direction(grads: Any, state: AdamState, b1: float, b2: float, eps: float):
    """The bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` and new state."""
    tree_map = jax.tree_util.tree_map
    mu = tree_map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
    nu = tree_map(lambda g, v: (1 - b2) * jnp.square(g) + b2 * v, grads, state.nu)
    count = _increment(state.count)
    # Compute 1 - b**t in (at least) float32, then divide in the moment's dtype, so
    # a bfloat16 moment stays bfloat16 without 1 - b**t rounding to zero.
    correction1 = 1 - b1**count
    correction2 = 1 - b2**count
    mu_hat = tree_map(lambda m: m / correction1.astype(m.dtype), mu)
    nu_hat = tree_map(lambda v: v / correction2.astype(v.dtype), nu)
    direction = tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    new_state = AdamState(count=count, mu=_cast_like(mu, state.mu), nu=_cast_like(nu, state.nu))
    return direction, new_state


def _check_adam(owner: str, learning_rate: Any, b1: Any, b2: Any, eps: Any) -> None:
    _check_learning_rate(learning_rate, owner)
    _check_number(b1, owner, "b1", high=1.0)
    _check_number(b2, owner, "b2", high=1.0)
    _check_number(eps, owner, "eps")


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam (Kingma and Ba, 2015, Algorithm 1).

    Update rule, for each parameter ``w`` with gradient ``g``; ``m`` and ``v``
    start at zero and ``t`` counts updates from 1::

        m <- b1 * m + (1 - b1) * g
        v <- b2 * v + (1 - b2) * g^2
        m_hat = m / (1 - b1^t)
        v_hat = v / (1 - b2^t)
        w <- w - lr(t - 1) * m_hat / (sqrt(v_hat) + eps)

    (``lr(t - 1)``: a schedule sees the count before this update, as in optax.)
    Equals ``optax.adam(learning_rate, b1, b2, eps)`` (with optax's default
    ``eps_root=0``) number for number.

    Args:
      learning_rate: a float ``lr``, or a schedule of the step count.
      b1: decay of the first-moment average, ``0 <= b1 < 1``.
      b2: decay of the second-moment average, ``0 <= b2 < 1``.
      eps: added to ``sqrt(v_hat)`` to avoid dividing by zero.

    Returns:
      An optax ``GradientTransformation`` with state :class:`AdamState`.
    """
    _check_adam("adam", learning_rate, b1, b2, eps)

    def init(params: Any) -> AdamState:
        return AdamState(count=_zero_count(), mu=_zeros_like(params), nu=_zeros_like(params))

    def update(grads: Any, state: AdamState, params: Any = None):
        del params
        direction, new_state = _adam_direction(grads, state, b1, b2, eps)
        return _scale_by_learning_rate(direction, learning_rate, state.count), new_state

    return optax.GradientTransformation(init, update)


def _broadcast_mask(mask_tree: Any, params: Any) -> Any:
    """Expand a bool pytree that is a prefix of ``params`` to params' full structure."""
    try:
        return jax.tree_util.tree_map(
            lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), mask_tree, params
        )
    except ValueError as error:
        raise ValueError(
            "adamw: mask must be a pytree of bools with the structure of the params (or a "
            f"prefix of it); mask has structure {jax.tree_util.tree_structure(mask_tree)}, "
            f"params have {jax.tree_util.tree_structure(params)}"
        ) from error


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW: Adam with decoupled weight decay (Loshchilov and Hutter, 2019).

    Update rule, with the Adam direction of :func:`adam` and decay ``wd``::

        d = m_hat / (sqrt(v_hat) + eps) + wd * w     (wd * w only where mask is True)
        w <- w - lr(t - 1) * d

    The decay is added to the Adam direction, not to the gradient, so it is not
    rescaled by ``v_hat``, and it is multiplied by the learning rate (as in
    optax and PyTorch). Equals ``optax.adamw`` number for number.

    Args:
      learning_rate: a float ``lr``, or a schedule of the step count.
      b1, b2, eps: as in :func:`adam`.
      weight_decay: the decay rate ``wd`` (a float or a schedule of the count).
      mask: which parameters decay: ``None`` (all), a pytree of bools with the
        structure of the params (or a prefix of it), or a function
        ``params -> such a pytree``. To decay only kernels, pass
        ``jaxnn.regularizers.mask_fn(jaxnn.regularizers.kernels_only)``.

    ``update`` needs ``params``. Returns an optax ``GradientTransformation``
    with state :class:`AdamState`.
    """
    _check_adam("adamw", learning_rate, b1, b2, eps)
    if not callable(weight_decay):
        _check_number(weight_decay, "adamw", "weight_decay")

    def init(params: Any) -> AdamState:
        return AdamState(count=_zero_count(), mu=_zeros_like(params), nu=_zeros_like(params))

    def update(grads: Any, state: AdamState, params: Any = None):
        if params is None:
            raise ValueError(
                "adamw: update needs the current params for weight decay; "
                "call update(grads, state, params)"
            )
        direction, new_state = _adam_direction(grads, state, b1, b2, eps)
        decay = weight_decay(state.count) if callable(weight_decay) else weight_decay
        if mask is None:
            decays = jax.tree_util.tree_map(lambda _: True, params)
        else:
            decays = _broadcast_mask(mask(params) if callable(mask) else mask, params)
        direction = jax.tree_util.tree_map(
            lambda d, w, on: d + jnp.asarray(decay, d.dtype) * w if on else d,
            direction, params, decays,
        )
        return _scale_by_learning_rate(direction, learning_rate, state.count), new_state

    return optax.GradientTransformation(init, update)


# -- learning-rate schedules -------------------------------------------------
#
# Each factory checks its arguments (errors name the schedule and the argument)
# and returns ``schedule(count) -> scalar``: a pure function of the step count
# (a Python int or an int array, traced under jit), evaluated in JAX's default
# float (float32, or float64 under x64).


def _check_value(value: Any, owner: str, what: str) -> float:
    """A finite Python number >= 0 (a learning rate, or a value a schedule takes)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {what} must be a finite number >= 0, got {value!r}")
    return value


def _check_steps(value: Any, owner: str, what: str, *, low: int = 1) -> int:
    """A step count: a Python int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{owner}: {what} must be an int (a number of steps), got {value!r}")
    if value < low:
        raise ValueError(f"{owner}: {what} must be >= {low}, got {value!r}")
    return int(value)


def _steps_as_float(count: ArrayLike) -> Array:
    return jnp.asarray(count).astype(jnp.result_type(float))


def constant(value: float) -> Schedule:
    """A constant schedule: ``lr(t) = value`` for every step ``t``.

    Same as passing the float itself; useful where a schedule is expected.

    Args:
      value: a finite number ``>= 0``.
    """
    value = _check_value(value, "constant", "value")

    def schedule(count: ArrayLike) -> Array:
        return jnp.full(jnp.shape(count), value, jnp.result_type(float))

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    *,
    staircase: bool = False,
) -> Schedule:
    """Exponential decay: the rate is multiplied by ``decay_rate`` every
    ``transition_steps`` steps::

        lr(t) = init_value * decay_rate ** (t / transition_steps)
        lr(t) = init_value * decay_rate ** floor(t / transition_steps)   (staircase=True)

    Equals ``optax.exponential_decay(init_value, transition_steps, decay_rate,
    staircase=staircase)``.

    Args:
      init_value: ``lr(0)``, a finite number ``>= 0``.
      transition_steps: the steps over which the rate is multiplied by
        ``decay_rate``, an int ``>= 1``.
      decay_rate: ``> 0``; below 1 decays, above 1 grows.
      staircase: decay in whole steps of ``transition_steps`` rather than smoothly.
    """
    owner = "exponential_decay"
    init_value = _check_value(init_value, owner, "init_value")
    transition_steps = _check_steps(transition_steps, owner, "transition_steps")
    decay_rate = _check_value(decay_rate, owner, "decay_rate")
    if decay_rate == 0:
        raise ValueError(f"{owner}: decay_rate must be > 0, got 0.0")

    def schedule(count: ArrayLike) -> Array:
        exponent = _steps_as_float(count) / transition_steps
        if staircase:
            exponent = jnp.floor(exponent)
        return init_value * jnp.power(decay_rate, exponent)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay (Loshchilov and Hutter's SGDR, without restarts)::

        lr(t) = init_value * ((1 - alpha) * (1 + cos(pi * min(t, T) / T)) / 2 + alpha)

    with ``T = decay_steps``: ``init_value`` at ``t = 0``, down along half a
    cosine to ``alpha * init_value`` at ``t = T``, and constant after. Equals
    ``optax.cosine_decay_schedule(init_value, decay_steps, alpha)``.

    Args:
      init_value: ``lr(0)``, a finite number ``>= 0``.
      decay_steps: ``T``, an int ``>= 1``.
      alpha: the final value as a fraction of ``init_value``, in ``[0, 1]``.
    """
    owner = "cosine_decay"
    init_value = _check_value(init_value, owner, "init_value")
    decay_steps = _check_steps(decay_steps, owner, "decay_steps")
    alpha = _check_value(alpha, owner, "alpha")
    if alpha > 1:
        raise ValueError(f"{owner}: alpha (the final fraction of init_value) must be in "
                         f"[0, 1], got {alpha!r}")

    def schedule(count: ArrayLike) -> Array:
        t = jnp.minimum(_steps_as_float(count), decay_steps)
        cosine = (1 + jnp.cos(jnp.pi * t / decay_steps)) / 2
        return init_value * ((1 - alpha) * cosine + alpha)

    return schedule


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup, then cosine decay. With ``W = warmup_steps`` and
    ``T = decay_steps`` (the *total* length, warmup included, as in optax)::

        lr(t) = init_value + (peak_value - init_value) * t / W              for t < W
        lr(t) = end_value + (peak_value - end_value)
                * (1 + cos(pi * min(t - W, T - W) / (T - W))) / 2            for t >= W

    so the rate climbs from ``init_value`` to ``peak_value`` at ``t = W``, falls
    to ``end_value`` at ``t = T``, and stays there. Equals
    ``optax.warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps,
    decay_steps, end_value)``.

    Args:
      init_value: ``lr(0)``, a finite number ``>= 0`` (often 0).
      peak_value: the rate at the end of the warmup, ``>= 0``.
      warmup_steps: ``W``, an int ``>= 0`` (0: no warmup).
      decay_steps: ``T``, the total number of steps, an int ``> warmup_steps``.
      end_value: the final rate, ``>= 0``.
    """
    owner = "warmup_cosine_decay"
    init_value = _check_value(init_value, owner, "init_value")
    peak_value = _check_value(peak_value, owner, "peak_value")
    end_value = _check_value(end_value, owner, "end_value")
    warmup_steps = _check_steps(warmup_steps, owner, "warmup_steps", low=0)
    decay_steps = _check_steps(decay_steps, owner, "decay_steps")
    if warmup_steps >= decay_steps:
        raise ValueError(
            f"{owner}: warmup_steps ({warmup_steps}) must be less than decay_steps "
            f"({decay_steps}), the total length of the schedule, warmup included"
        )
    cosine_steps = decay_steps - warmup_steps

    def schedule(count: ArrayLike) -> Array:
        t = _steps_as_float(count)
        warm = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
        s = jnp.clip(t - warmup_steps, 0, cosine_steps)
        cosine = end_value + (peak_value - end_value) * (1 + jnp.cos(jnp.pi * s / cosine_steps)) / 2
        return jnp.where(t < warmup_steps, warm, cosine)

    return schedule


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """A step function: ``values[i]`` from step ``boundaries[i - 1]`` until
    step ``boundaries[i]``::

        lr(t) = values[i],   i = the number of boundaries b with b <= t

    e.g. ``piecewise_constant([1000, 2000], [1e-2, 1e-3, 1e-4])`` gives 1e-2
    for steps 0 to 999, 1e-3 for 1000 to 1999, 1e-4 from 2000 on. (optax's
    ``piecewise_constant_schedule`` takes multiplying factors instead of values.)

    Args:
      boundaries: strictly increasing ints ``>= 1`` (may be empty).
      values: ``len(boundaries) + 1`` finite numbers ``>= 0``.
    """
    owner = "piecewise_constant"
    boundaries = [_check_steps(b, owner, f"boundaries[{i}]") for i, b in enumerate(boundaries)]
    values = [_check_value(v, owner, f"values[{i}]") for i, v in enumerate(values)]
    for i in range(1, len(boundaries)):
        if boundaries[i] <= boundaries[i - 1]:
            raise ValueError(f"{owner}: boundaries must be strictly increasing, got "
                             f"boundaries[{i - 1}] = {boundaries[i - 1]} and "
                             f"boundaries[{i}] = {boundaries[i]}")
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"{owner}: values must have len(boundaries) + 1 = "
                         f"{len(boundaries) + 1} entries, got {len(values)}")

    def schedule(count: ArrayLike) -> Array:
        table = jnp.asarray(values, jnp.result_type(float))
        if not boundaries:
            return jnp.full(jnp.shape(count), table[0])
        index = jnp.sum(jnp.asarray(count)[..., None] >= jnp.asarray(boundaries), axis=-1)
        return table[index]

    return schedule
