"""One optimisation step, as the compiled training programs run it.

``make_step`` builds ``step(carry, batch) -> (carry, sums)`` from a model, a loss,
an optimizer and metrics; ``halting`` wraps a guarded step so that it stops at the
first NaN/inf (used only to replay an epoch that went bad).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxnn import _loss_forms
from jaxnn._typing import Array, Params
from jaxnn.layers._base import Layer

LossFn = Callable[..., Array]


MetricFn = Callable[..., Array]


ValueAndGradFn = Callable[..., tuple[Array, Params, Any]]


def metric_table(metrics: Sequence[str | MetricFn]) -> dict[str, MetricFn]:
    from jaxnn import metrics as metrics_module

    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a list of names or functions, e.g. "
                        f"metrics=[{metrics!r}]; got the string {metrics!r}")
    table: dict[str, MetricFn] = {}
    for metric in metrics:
        if isinstance(metric, str):
            fn = getattr(metrics_module, metric, None)
            if fn is None or not callable(fn):
                raise ValueError(f"metrics: unknown metric {metric!r}; pass a name from "
                                 "jaxnn.metrics (e.g. 'accuracy') or a function")
            table[metric] = fn
        elif callable(metric):
            table[getattr(metric, "__name__", "metric")] = _loss_forms.weighted(metric,
                                                                                "metrics")
        else:
            raise TypeError(f"metrics: expected names from jaxnn.metrics (e.g. 'accuracy') or "
                            f"functions f(predictions, targets), got {metric!r}")
    return table


def weighted(fn: Callable, predictions, targets, weights) -> Array:
    return fn(predictions, targets, weights=weights)


def take(tree, idx):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)


def slice_examples(tree, start, stop):
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def cast_floating(tree, dtype):
    """``tree`` with its floating leaves cast to ``dtype`` (integer leaves, keys kept)."""

    def cast(a):
        a_dtype = getattr(a, "dtype", None)
        floating = a_dtype is not None and jnp.issubdtype(a_dtype, jnp.floating)
        return a.astype(dtype) if floating else a

    return jax.tree_util.tree_map(cast, tree)


def nonfinite_code(value, grads) -> Array:
    """0 when the loss and every gradient entry are finite; else 1 (loss), 2
    (gradient) or 3 (both), as an int32 scalar."""
    grad_ok = jnp.array(True)
    for g in jax.tree_util.tree_leaves(grads):
        if jnp.issubdtype(g.dtype, jnp.inexact):
            grad_ok = grad_ok & jnp.all(jnp.isfinite(g))
    return (jnp.logical_not(jnp.isfinite(value)).astype(jnp.int32)
            + 2 * jnp.logical_not(grad_ok).astype(jnp.int32))


def make_step(model: Layer, loss: LossFn, optimizer: optax.GradientTransformation,
               penalty: Callable[[Params], Array] | None, metric_fns: dict[str, MetricFn],
               value_and_grad: ValueAndGradFn | None = None,
               compute_dtype: jnp.dtype | None = None, guard: bool = False,
               accumulate: int = 1):
    """``step(carry, batch) -> (carry, sums)`` for one optimisation step.

    ``carry = (params, state, opt_state)``; ``batch = (x, y, weights, key)``;
    ``sums`` holds the weight total and the weighted sums of loss and metrics,
    and with ``guard`` ``"_nonfinite"``: :func:`nonfinite_code` of the step.
    The gradient is ``jax.value_and_grad`` of the model's loss, or, when
    ``value_and_grad`` is given, what that function returns (the state is kept).

    With ``compute_dtype`` (mixed precision), the forward pass runs on the
    floating params and inputs cast to it and its floating outputs are cast to
    float32 before the loss; the casts sit inside the differentiated function,
    so the gradients arrive in the params' own dtype (the master weights), and
    the new state is cast back to the old state's dtypes.

    With ``accumulate=k`` the batch (of ``k * b`` rows) is taken ``b`` rows at a
    time and the gradients summed before the one optimizer update (gradient
    accumulation: a large batch with the activation memory of a small one).
    """

    def objective(params, state, x, y, weights, key):
        if compute_dtype is None:
            predictions, new_state = model.apply_with_state(params, state, x, key=key,
                                                            train=True)
        else:
            predictions, new_state = model.apply_with_state(
                cast_floating(params, compute_dtype), state, cast_floating(x, compute_dtype),
                key=key, train=True)
            predictions = cast_floating(predictions, jnp.float32)
            new_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype),
                                               new_state, state)
        value = weighted(loss, predictions, y, weights)
        if penalty is not None:
            value = value + penalty(params)
        return value, (new_state, predictions)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def gradient(params, state, x, y, weights, key):
        """``(value, grads, state, sums)`` of one (micro-)batch: the weighted mean loss,
        its gradient, the new state, and the weighted sums of loss and metrics."""
        if value_and_grad is None:
            (value, (state, predictions)), grads = grad_fn(params, state, x, y, weights, key)
        else:
            value, grads, predictions = value_and_grad(params, x, y, weights)
        total = jnp.sum(weights)
        sums = {"_weight": total, "loss": value * total}
        for name, fn in metric_fns.items():
            sums[name] = weighted(fn, predictions, y, weights) * total
        return value, grads, state, sums

    def accumulated(params, state, x, y, weights, key):
        """:func:`gradient` of the whole batch, computed ``accumulate`` micro-batches at
        a time: the mean over the batch is the weight-weighted mean of the micro-batch
        means, so this equals one pass over the batch (up to rounding)."""
        # Micro-batch j takes rows j, j + k, j + 2k, ...: split over devices by rows,
        # each device then holds its share of every micro-batch.
        def micro(a):
            return jnp.swapaxes(a.reshape(-1, accumulate, *a.shape[1:]), 0, 1)

        parts = jax.tree_util.tree_map(micro, (x, y, weights))
        keys = jax.random.split(key, accumulate)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        _, _, _, sums0 = jax.eval_shape(gradient, params, state, *jax.tree_util.tree_map(
            lambda a: a[0], parts), keys[0])
        sums0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)

        def one(acc, part):
            state, grad_sum, sums = acc
            (xj, yj, wj), kj = part
            _, grads, new_state, sums_j = gradient(params, state, xj, yj, wj, kj)
            real = sums_j["_weight"] > 0  # a micro-batch of padding alone adds nothing
            grad_sum = jax.tree_util.tree_map(
                lambda a, g: a + jnp.where(real, g * sums_j["_weight"].astype(g.dtype), 0),
                grad_sum, grads)
            sums = jax.tree_util.tree_map(lambda a, b: a + jnp.where(real, b, 0), sums, sums_j)
            state = jax.tree_util.tree_map(lambda n, o: jnp.where(real, n, o), new_state, state)
            return (state, grad_sum, sums), None

        (state, grad_sum, sums), _ = jax.lax.scan(one, (state, zeros, sums0), (parts, keys))
        total = sums["_weight"]
        grads = jax.tree_util.tree_map(lambda g: g / total.astype(g.dtype), grad_sum)
        return sums["loss"] / total, grads, state, sums

    def step(carry, batch):
        params, state, opt_state = carry
        value, grads, state, sums = (gradient if accumulate == 1 else accumulated)(
            params, state, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if guard:
            sums["_nonfinite"] = nonfinite_code(value, grads)
        return (params, state, opt_state), sums

    return step


def halting(step):
    """``step`` that halts at its first non-finite loss or gradient.

    ``step`` is made with ``guard=True``. The halting step's carry is ``(carry,
    (code, at, index))``: ``index`` counts the steps run, and from the first step
    whose code is nonzero on, ``code`` and ``at`` hold that step's code and index
    and the inner carry stays as it was (the last good point).
    """

    def halting_step(carry, batch):
        inner, (code, at, index) = carry
        new, sums = step(inner, batch)
        step_code = sums.pop("_nonfinite")
        first = (code == 0) & (step_code > 0)
        code = jnp.where(first, step_code, code)
        at = jnp.where(first, index, at)
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(code > 0, o, n), new, inner)
        return (new, (code, at, index + 1)), sums

    return halting_step


def no_halt():
    return jnp.int32(0), jnp.int32(0), jnp.int32(0)


@jax.jit
def all_finite(tree) -> Array:
    """Whether every floating entry of ``tree`` is finite (one compiled reduction)."""
    ok = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok
