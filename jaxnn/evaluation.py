"""``evaluate`` and ``predict``: a model in inference mode over in-memory arrays,
in fixed-size batches, one compiled program each (cached across calls)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn import _data_checks, _loss_forms, _sources, host_memory
from jaxnn._chunks import _epoch_plan
from jaxnn._fit_checks import check_arrays, check_data, check_positive_int, check_stateless
from jaxnn._steps import LossFn, MetricFn, metric_table, take, weighted
from jaxnn._typing import Array, Params, State
from jaxnn.layers._base import Layer


def logs_from_sums(sums: Mapping[str, Array], names: Sequence[str]) -> dict[str, float]:
    """Means from weighted sums, in the order ``loss, *metrics`` (JAX sorts dict keys)."""
    sums = jax.device_get(sums)
    weight = float(sums["_weight"])
    return {name: float(sums[name]) / weight for name in ("loss", *names)}


def evaluate(
    model: Layer,
    params: Params,
    x: Any,
    y: Any = None,
    *,
    loss: LossFn,
    state: State | None = None,
    metrics: Sequence[str | MetricFn] = ("accuracy",),
    penalty: Callable[[Params], Array] | None = None,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean loss and metrics over ``(x, y)`` in inference mode (``train=False``).

    Returns ``{"loss": ..., "accuracy": ...}``. The loss includes ``penalty(params)``
    when a penalty is given (as ``fit`` reports it). ``loss`` and ``metrics`` take
    the forms :func:`fit` takes; ``x`` and ``y`` are checked as ``fit`` checks them.
    A memmap, or a random-access source of ``(x_i, y_i)`` examples as ``x`` with
    ``y=None``, is read ``batch_size`` examples at a time (see :func:`fit`).
    """
    metric_fns = metric_table(metrics)
    loss = _loss_forms.weighted(loss, "loss")
    if streamed(x, y):
        return evaluate_streamed(model, params, state, x, y, loss, penalty, metric_fns,
                                 batch_size)
    n = check_arrays(x, y)
    if state is None:
        check_stateless(model, x, "evaluate")
    state = state or {}
    check_data(model, params, state, x, y)
    batch_size = min(check_positive_int(batch_size, "batch_size"), n)
    host_memory.prepare_cpu()
    return _evaluate_compiled(model, loss, penalty, metric_fns, batch_size)(
        params, state or {}, jnp.asarray(x) if not isinstance(x, dict) else x,
        jnp.asarray(y) if not isinstance(y, dict) else y,
    )


def evaluation_sums(model, loss, penalty, metric_fns, batch_size):
    """``sums(params, state, x, y)``: weighted sums of loss and metrics over all of
    ``(x, y)`` in inference mode, batch by batch (a pure function, to jit or vmap)."""

    def run(params, state, x, y):
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        steps = math.ceil(n / batch_size)
        idx, weights = _epoch_plan(n, batch_size, None, shuffle=False)

        def body(_, batch):
            idx, weights = batch
            xb, yb = take((x, y), idx)
            predictions, _ = model.apply_with_state(params, state, xb, train=False)
            w = jnp.sum(weights)
            sums = {"_weight": w, "loss": weighted(loss, predictions, yb, weights) * w}
            for name, fn in metric_fns.items():
                sums[name] = weighted(fn, predictions, yb, weights) * w
            return None, sums

        _, per_batch = jax.lax.scan(body, None, (idx, weights), length=steps)
        total = jax.tree_util.tree_map(jnp.sum, per_batch)
        if penalty is not None:
            total["loss"] = total["loss"] + penalty(params) * total["_weight"]
        return total

    return run


def _evaluate_compiled(model, loss, penalty, metric_fns, batch_size):
    jitted = _evaluate_jitted(model, loss, penalty, tuple(metric_fns.items()), batch_size)
    return lambda *args: logs_from_sums(jitted(*args), list(metric_fns))


@functools.lru_cache(maxsize=32)
def _evaluate_jitted(model, loss, penalty, metric_items, batch_size):
    # Cached so that repeated evaluate() calls reuse one compiled program.
    return jax.jit(evaluation_sums(model, loss, penalty, dict(metric_items), batch_size))


def predict(
    model: Layer,
    params: Params,
    x: Any,
    *,
    state: State | None = None,
    batch_size: int = 1000,
    output: str = "logits",
) -> Array:
    """Model outputs for ``x`` in inference mode, computed in fixed-size jitted batches.

    Args:
      output: ``"logits"`` (the model's raw output), ``"probabilities"`` (softmax
        over the last axis, for models that output logits) or ``"classes"``
        (argmax over the last axis).

    Zero examples give an empty array shaped like the output, ``(0, ...)``. A
    memmap, or a random-access source of ``(x_i, y_i)`` examples, is read
    ``batch_size`` examples at a time; the outputs then come back as numpy arrays.
    """
    if output not in ("logits", "probabilities", "classes"):
        raise ValueError(f"output must be 'logits', 'probabilities' or 'classes', got {output!r}")
    if streamed(x, None):
        n, first, blocks = _host_blocks(model, params, state, x, None, batch_size, "predict")
        program = _predict_compiled(model, min(batch_size, n), output)
        return np.concatenate([np.asarray(program(params, state or {}, xb))
                               for xb, _ in blocks])
    _data_checks.check_array_tree(x, "x")
    if isinstance(x, dict):
        raise TypeError("predict: x must be one array (a dict of inputs is not supported here)")
    batch_size = check_positive_int(batch_size, "batch_size")
    if state is None:
        check_stateless(model, x, "predict")
    state = state or {}
    n = np.shape(x)[0]
    if n == 0:  # no examples: an empty result shaped like the model's output
        one = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), x.dtype)
        out = jax.eval_shape(lambda p, s, xb: _predict_compiled(model, 1, output)(p, s, xb),
                             params, state, one)
        return jnp.zeros((0, *out.shape[1:]), out.dtype)
    host_memory.prepare_cpu()
    return _predict_compiled(model, min(batch_size, n), output)(params, state, jnp.asarray(x))


@functools.lru_cache(maxsize=32)
def _predict_compiled(model, batch_size, output):
    # Cached so that repeated predict() calls reuse one compiled program.
    @jax.jit
    def run(params, state, x):
        n = x.shape[0]
        steps = math.ceil(n / batch_size)
        pad = steps * batch_size - n
        xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        xp = xp.reshape(steps, batch_size, *x.shape[1:])

        def apply_batch(xb):
            y, _ = model.apply_with_state(params, state, xb, train=False)
            if output == "probabilities":
                y = jax.nn.softmax(y, axis=-1)
            elif output == "classes":
                y = jnp.argmax(y, axis=-1)
            return y

        if steps == 1:  # one batch: no loop around it (a loop costs time on CPU)
            return apply_batch(xp[0])[:n]
        ys = jax.lax.map(apply_batch, xp)
        return ys.reshape(steps * batch_size, *ys.shape[2:])[:n]

    return run


def evaluate_streamed(model, params, state, x, y, loss, penalty, metric_fns, batch_size,
                      where="evaluate") -> dict[str, float]:
    """:func:`evaluate` of data read from the host block by block (``loss`` and
    ``metric_fns`` already in their weighted forms)."""
    n, _, blocks = _host_blocks(model, params, state, x, y, batch_size, where)
    program = _evaluate_jitted(model, loss, penalty, tuple(metric_fns.items()),
                               min(batch_size, n))
    totals = None
    for xb, yb in blocks:
        sums = program(params, state or {}, xb, yb)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return logs_from_sums(totals, list(metric_fns))


def streamed(x, y) -> bool:
    """Whether ``x`` is read from the host block by block: a random-access source,
    or arrays held in a memory-mapped file."""
    if y is None and _sources.is_example_source(x):
        return True
    return any(isinstance(a, np.memmap) for a in jax.tree_util.tree_leaves((x, y)))


def _host_blocks(model, params, state, x, y, batch_size, where):
    """``(n, first example, blocks)``: ``blocks`` yields ``(x_block, y_block)`` on the
    device, ``batch_size`` examples each in order, read ahead on a background thread
    and checked as they come (NaN/inf, labels)."""
    batch_size = check_positive_int(batch_size, "batch_size")
    if y is None and _sources.is_example_source(x):
        n = len(x)
        read = functools.partial(_sources.read_source, x)
        name = "x (a source)"
    else:
        n = check_arrays(x, y) if y is not None else np.shape(x)[0]
        host = jax.tree_util.tree_map(np.asarray, (x, y))
        read = functools.partial(_sources.take_rows, host)
        name = "x"
    if n == 0:
        raise ValueError(f"{where}: {name} has no examples")
    first = read(np.arange(1), 1)
    if state is None:
        check_stateless(model, first[0], where)
    state = state or {}
    scores = _data_checks.class_scores_shape(model, params, state, first[0])
    labels = _sources.label_check(None if scores is None else scores[-1], name)

    def produce():
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            xb, yb = read(rows, len(rows))
            _data_checks.check_finite(xb, f"{name}, examples {start}-{rows[-1]}")
            if yb is not None:
                labels(yb, rows)
            yield jax.device_put((xb, yb))

    host_memory.prepare_cpu()
    return n, first, _sources.prefetched(produce())
