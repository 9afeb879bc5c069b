"""Training loops: ``fit``, ``evaluate`` and ``predict``.

``fit`` trains a model on in-memory arrays with the whole epoch compiled as one
program: the dataset is put on the device once, each epoch draws a permutation
from ``fold_in(key, epoch)``, and ``jax.lax.scan`` runs the optimisation steps,
gathering each batch on the device. Nothing returns to Python between steps.

The last partial batch is kept, not dropped: it is padded to the batch size
and the padded rows get weight 0, so its gradient is exactly the gradient of
the mean loss over its real examples (what Keras does with a short last batch).

The randomness of epoch ``e`` (its shuffle, its dropout keys) depends only on
``(key, e)``, so training resumed at epoch ``k`` from a checkpoint ends with
exactly the parameters of an uninterrupted run.

With ``verbose=1`` the compiled steps count themselves and call back into
Python every ``max(1, steps // 20)`` steps (``jax.debug.callback`` under
``lax.cond``; compiled in only then), so the progress bar moves while one
compiled epoch runs. On CPU a model with a convolution runs 4 straight-line
steps per compiled call instead of a rolled epoch (see
``_CONV_STEPS_PER_CALL_ON_CPU``); over several CPU devices each call is waited
for before the next is sent (queued calls could deadlock XLA:CPU's all-reduce);
and ``fit`` asks glibc to keep freed memory (:mod:`jaxnn.host_memory`).
docs/training.md describes every option of ``fit`` for users.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn import _data_checks, _loss_forms, _sharding, host_memory
from jaxnn._typing import Array, Params, PRNGKey, State
from jaxnn.callbacks import Callback, EpochEnd, TrainBegin
from jaxnn.layers._base import Layer, _describe_keys

LossFn = Callable[..., Array]
MetricFn = Callable[..., Array]
ValueAndGradFn = Callable[..., tuple[Array, Params, Any]]


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params, state, opt_state: the trained values.
      history: ``{"loss": [...], "accuracy": [...], "val_loss": [...], ...}``, one
        entry per epoch run.
      epoch: the number of epochs completed (the ``initial_epoch`` to resume from).
      key: the key training used (epoch ``e`` used ``fold_in(key, e)``).
      compile_seconds: time spent compiling the training programs (it is not
        counted in ``history["seconds"]``, the training time of each epoch).
    """

    params: Params
    state: State
    opt_state: Any
    history: dict[str, list[float]]
    epoch: int
    key: PRNGKey
    compile_seconds: float = 0.0


class NonFiniteError(FloatingPointError):
    """Training met a loss or a gradient that is NaN or inf.

    Attributes:
      result: a :class:`FitResult` at the last good point: the params, state and
        optimizer state before the failing step (``step`` steps into epoch
        ``epoch``), and the history of the epochs completed before it.
      epoch: the failing epoch, counting from 0 (``result.epoch`` equals it).
      step: the failing step within that epoch, counting from 0.
      what: ``"the loss is"``, ``"the gradient is"`` or ``"the loss and the gradient
        are"`` (NaN or inf).
    """

    def __init__(self, message: str, result: FitResult, epoch: int, step: int, what: str):
        super().__init__(message)
        self.result = result
        self.epoch = epoch
        self.step = step
        self.what = what


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) stopped :func:`fit`; ``result`` is the
    :class:`FitResult` of the last completed epoch (``result.epoch`` epochs done),
    ready to resume from with ``initial_epoch=result.epoch``. A ``except
    KeyboardInterrupt`` clause catches it as before."""

    def __init__(self, result: FitResult):
        super().__init__(f"training interrupted after {result.epoch} completed epoch(s); "
                         "the exception's .result holds them")
        self.result = result


_NONFINITE_WHAT = {1: "the loss is", 2: "the gradient is", 3: "the loss and the gradient are"}
_ON_NONFINITE = ("raise", "warn", "ignore")


# --------------------------------------------------------------------------
# Metrics and losses as used inside the compiled step
# --------------------------------------------------------------------------


def _metric_table(metrics: Sequence[str | MetricFn]) -> dict[str, MetricFn]:
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


def _weighted(fn: Callable, predictions, targets, weights) -> Array:
    return fn(predictions, targets, weights=weights)


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_arrays(x, y, x_name: str = "x", y_name: str = "y") -> int:
    """The number of examples in ``(x, y)``, after checking that both are numeric
    arrays (or dicts of them) with the same, nonzero, leading axis."""
    _data_checks.check_array_tree(x, x_name)
    _data_checks.check_array_tree(y, y_name, labels=True)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    for leaf in jax.tree_util.tree_leaves((x, y)):
        if leaf.shape[0] != n:
            raise ValueError(
                f"{x_name} and {y_name} must have the same number of examples: got "
                f"{n} and {leaf.shape[0]} (shapes "
                f"{[np.shape(a) for a in jax.tree_util.tree_leaves((x, y))]})"
            )
    if n == 0:
        raise ValueError(f"{x_name} has no examples (its leading axis has length 0)")
    return n


def _check_data(model, params, state, x, y, x_name="x", y_name="y") -> None:
    """NaN/inf in ``x`` or ``y``, and class labels outside the model's range: errors
    naming the argument, the value and its index (see :mod:`jaxnn._data_checks`)."""
    _data_checks.check_finite(x, x_name)
    _data_checks.check_finite(y, y_name)
    if not isinstance(y, dict):
        _data_checks.check_labels(
            y, _data_checks.class_scores_shape(model, params, state, x), y_name)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)


def _slice(tree, start, stop):
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def _cast_floating(tree, dtype):
    """``tree`` with its floating leaves cast to ``dtype`` (integer leaves, keys kept)."""

    def cast(a):
        a_dtype = getattr(a, "dtype", None)
        floating = a_dtype is not None and jnp.issubdtype(a_dtype, jnp.floating)
        return a.astype(dtype) if floating else a

    return jax.tree_util.tree_map(cast, tree)


def _check_compute_dtype(compute_dtype) -> jnp.dtype | None:
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(f"compute_dtype must be a floating dtype such as jnp.bfloat16 or "
                        f"None, got {compute_dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype such as jnp.bfloat16 or "
                         f"None, got {dtype.name}")
    return dtype


# --------------------------------------------------------------------------
# The compiled step and epoch
# --------------------------------------------------------------------------


def _nonfinite_code(value, grads) -> Array:
    """0 when the loss and every gradient entry are finite; else 1 (loss), 2
    (gradient) or 3 (both), as an int32 scalar."""
    grad_ok = jnp.array(True)
    for g in jax.tree_util.tree_leaves(grads):
        if jnp.issubdtype(g.dtype, jnp.inexact):
            grad_ok = grad_ok & jnp.all(jnp.isfinite(g))
    return (jnp.logical_not(jnp.isfinite(value)).astype(jnp.int32)
            + 2 * jnp.logical_not(grad_ok).astype(jnp.int32))


def _make_step(model: Layer, loss: LossFn, optimizer: optax.GradientTransformation,
               penalty: Callable[[Params], Array] | None, metric_fns: dict[str, MetricFn],
               value_and_grad: ValueAndGradFn | None = None,
               compute_dtype: jnp.dtype | None = None, guard: bool = False):
    """``step(carry, batch) -> (carry, sums)`` for one optimisation step.

    ``carry = (params, state, opt_state)``; ``batch = (x, y, weights, key)``;
    ``sums`` holds the weight total and the weighted sums of loss and metrics,
    and with ``guard`` ``"_nonfinite"``: :func:`_nonfinite_code` of the step.
    The gradient is ``jax.value_and_grad`` of the model's loss, or, when
    ``value_and_grad`` is given, what that function returns (the state is kept).

    With ``compute_dtype`` (mixed precision), the forward pass runs on the
    floating params and inputs cast to it and its floating outputs are cast to
    float32 before the loss; the casts sit inside the differentiated function,
    so the gradients arrive in the params' own dtype (the master weights), and
    the new state is cast back to the old state's dtypes.
    """

    def objective(params, state, x, y, weights, key):
        if compute_dtype is None:
            predictions, new_state = model.apply_with_state(params, state, x, key=key,
                                                            train=True)
        else:
            predictions, new_state = model.apply_with_state(
                _cast_floating(params, compute_dtype), state, _cast_floating(x, compute_dtype),
                key=key, train=True)
            predictions = _cast_floating(predictions, jnp.float32)
            new_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype),
                                               new_state, state)
        value = _weighted(loss, predictions, y, weights)
        if penalty is not None:
            value = value + penalty(params)
        return value, (new_state, predictions)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(carry, batch):
        params, state, opt_state = carry
        x, y, weights, key = batch
        if value_and_grad is None:
            (value, (state, predictions)), grads = grad_fn(params, state, x, y, weights, key)
        else:
            value, grads, predictions = value_and_grad(params, x, y, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        total = jnp.sum(weights)
        sums = {"_weight": total, "loss": value * total}
        for name, fn in metric_fns.items():
            sums[name] = _weighted(fn, predictions, y, weights) * total
        if guard:
            sums["_nonfinite"] = _nonfinite_code(value, grads)
        return (params, state, opt_state), sums

    return step


def _epoch_plan(n: int, batch_size: int, key: PRNGKey, shuffle: bool):
    """Indices ``(steps, batch)`` and weights ``(steps, batch)`` for one epoch."""
    steps = math.ceil(n / batch_size)
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    pad = steps * batch_size - n
    order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    weights = (jnp.arange(steps * batch_size) < n).astype(jnp.float32)
    return order.reshape(steps, batch_size), weights.reshape(steps, batch_size)


def epoch_plan(key: PRNGKey, n: int, batch_size: int, shuffle: bool = True):
    """The plan of one epoch from its key: ``(indices, weights, step_keys)``.

    ``indices`` and ``weights`` are ``(steps, batch_size)`` (padded rows weigh 0);
    ``step_keys`` holds one dropout key per step. The same key gives the same
    plan, which is what makes a resumed run repeat an uninterrupted one.
    """
    shuffle_key, dropout_key = jax.random.split(key)
    idx, weights = _epoch_plan(n, batch_size, shuffle_key, shuffle)
    return idx, weights, jax.random.split(dropout_key, idx.shape[0])


def scan_steps(step, carry, data, plan, *, straight_line: bool = False, unroll: int = 1):
    """Run ``step`` over the batches of ``plan``, gathering each batch from the
    device-resident ``data = (x, y)``; returns the carry and the summed per-step logs.

    A rolled ``lax.scan`` running ``unroll`` steps per loop iteration by default;
    ``straight_line=True`` writes the steps out as straight-line code instead
    (XLA:CPU runs convolutions slower inside a loop than outside one, even a loop
    of one step).
    """

    def body(carry, batch):
        idx, weights, key = batch
        x, y = _take(data, idx)
        return step(carry, (x, y, weights, key))

    if not straight_line:
        carry, sums = jax.lax.scan(body, carry, plan, unroll=unroll)
        return carry, jax.tree_util.tree_map(jnp.sum, sums)
    totals = None
    for i in range(plan[0].shape[0]):
        carry, sums = body(carry, jax.tree_util.tree_map(lambda a, i=i: a[i], plan))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return carry, totals


# On CPU, a model whose forward pass holds a convolution runs this many steps per
# compiled call, written out straight-line, unless steps_per_call says otherwise:
# XLA:CPU runs a convolution step slower inside a rolled loop (even one of one
# step). On 2 cores, the MNIST CNN trained 2,750 samples/s at 4 steps per call
# against 2,050 at 1 and about 1/16 of that as a rolled epoch; with the
# convolution's patch-matrix training path (jaxnn.layers._conv_grad), 8-step
# epochs took 0.265 s at 4 per call, 0.308 s at 16, 0.402 s at 1 and 0.417 s rolled.
_CONV_STEPS_PER_CALL_ON_CPU = 4


def _has_convolution(jaxpr) -> bool:
    """Whether a jaxpr (or any jaxpr nested in its equations) holds a convolution."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(inner, "eqns") and _has_convolution(inner):
                    return True
    return False


def _default_steps_per_call(model: Layer, params, state, x, batch_size: int) -> int | None:
    """``steps_per_call`` when the caller left it to ``fit``: see _CONV_STEPS_PER_CALL_ON_CPU."""
    if jax.default_backend() != "cpu":
        return None
    batch = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((batch_size, *np.shape(a)[1:]), jnp.result_type(a)), x)
    jaxpr = jax.make_jaxpr(lambda p, s, xb: model.apply_with_state(p, s, xb, train=False))(
        params, state, batch)
    return _CONV_STEPS_PER_CALL_ON_CPU if _has_convolution(jaxpr.jaxpr) else None


# A rolled epoch runs this many steps per loop iteration when a step is small: a
# dense step of about 2 * batch * parameters FLOPs under _SMALL_STEP_FLOPS. Measured on
# 2 cores (MNIST MLP 784-64-64-10, batch 32, ~3.5 MFLOP a step), four alternating
# runs each: 2 steps per iteration trained 7-20% faster than 1 (compile 1.5-1.9 s
# against 1.0-1.3 s); 4 steps 10-40% faster but compiled in 2.1-2.6 s. At batch
# 128, and for the row-LSTM, unrolling made no difference and only added compile time.
_SMALL_STEP_UNROLL = 2
_SMALL_STEP_FLOPS = 8e6


def _epoch_unroll(params: Params, batch_size: int) -> int:
    count = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    return _SMALL_STEP_UNROLL if 2 * batch_size * count < _SMALL_STEP_FLOPS else 1


def _halting(step):
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


def _reporting(step, every: int, report: Callable[[Array], None]):
    """``step`` that also counts the steps run and calls ``report(count)`` on the
    host after every ``every``-th one (``jax.debug.callback`` under ``lax.cond``, so
    a progress bar moves while a compiled epoch runs). Its carry is ``(carry, count)``."""

    def reporting_step(carry, batch):
        inner, count = carry
        new, sums = step(inner, batch)
        count = count + 1
        jax.lax.cond(count % every == 0, lambda c: jax.debug.callback(report, c),
                     lambda c: None, count)
        return (new, count), sums

    return reporting_step


def _no_halt():
    return jnp.int32(0), jnp.int32(0), jnp.int32(0)


@jax.jit
def all_finite(tree) -> Array:
    """Whether every floating entry of ``tree`` is finite (one compiled reduction)."""
    ok = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


class _Trainer:
    """Holds the compiled programs of one ``fit`` call (compiled once, reused each epoch).

    Two variants of the epoch: ``"fast"`` trains; ``"halting"`` (compiled only when
    needed) replays an epoch with :func:`_halting` steps to find its first
    non-finite step and the last good point before it.
    """

    def __init__(self, model, loss, optimizer, penalty, metric_fns, n, batch_size,
                 shuffle, steps_per_call, value_and_grad=None, data_parallel=None,
                 compute_dtype=None, scan_unroll=1, progress=False):
        self.n = n
        self.batch_size = batch_size
        self.steps = math.ceil(n / batch_size)
        self.chunk = self.steps if steps_per_call is None else min(steps_per_call, self.steps)
        steps = {variant: _make_step(model, loss, optimizer, penalty, metric_fns,
                                     value_and_grad, compute_dtype, guard=variant == "halting")
                 for variant in ("fast", "halting")}
        # Over several devices (jaxnn._sharding): the same step, with each batch split
        # over them and the carry replicated; None keeps the single-device program as is.
        self.data_parallel = data_parallel
        if data_parallel is not None:
            steps = {variant: data_parallel.step(step) for variant, step in steps.items()}
        steps["halting"] = _halting(steps["halting"])
        # Over several CPU devices each call finishes before the next is dispatched:
        # with calls queued ahead, XLA:CPU's all-reduce could deadlock (RESULTS.md).
        self.wait_each_call = data_parallel is not None and all(
            d.platform == "cpu" for d in data_parallel.mesh.devices.flat)
        self.shuffle = shuffle
        # verbose=1: the training steps report their count to the host every few percent
        # of the epoch (see _reporting); on_progress(done_steps) receives it.
        self.on_progress: Callable[[int], None] | None = None
        if progress:
            steps["fast"] = _reporting(steps["fast"], _progress_every(self.steps), self._report)

        def run_steps(carry, data, idx, weights, keys, start, length, variant):
            plan = jax.tree_util.tree_map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, start, length), (idx, weights, keys)
            )
            counted = progress and variant == "fast"
            if counted:
                carry = (carry, start)
            # A chunk of a few steps is written out; a whole epoch stays a rolled loop.
            carry, sums = scan_steps(steps[variant], carry, data, plan,
                                     straight_line=steps_per_call is not None,
                                     unroll=scan_unroll)
            return (carry[0] if counted else carry), sums

        self._run_steps = jax.jit(run_steps, donate_argnums=(0,),
                                  static_argnames=("length", "variant"))
        self._compiled: dict[tuple[str, int], Any] = {}
        self.compile_seconds = 0.0

        self.plan = jax.jit(lambda key: epoch_plan(key, n, batch_size, shuffle),
                            **({} if data_parallel is None else
                               {"out_shardings": data_parallel.replicated}))
        self._plan_compiled = None

    def _report(self, count) -> None:
        on_progress = self.on_progress
        if on_progress is not None:
            on_progress(int(count))

    def _program(self, variant, length, *args):
        """The compiled program running ``length`` steps (compiled ahead, timed, once)."""
        program = self._compiled.get((variant, length))
        if program is None:
            start = time.perf_counter()
            program = self._run_steps.lower(*args, length=length, variant=variant).compile()
            self.compile_seconds += time.perf_counter() - start
            self._compiled[variant, length] = program
        return program

    def _run(self, variant, carry, data, plan, compiled=None):
        """Run the epoch's steps: ``(carry, sums)``, the sums added over the calls.
        ``compiled()``, when given, is called once the programs are compiled."""
        chunks = [(start, min(self.chunk, self.steps - start))
                  for start in range(0, self.steps, self.chunk)]
        # Compile every program this epoch needs before running any, so compile time
        # does not overlap (asynchronously dispatched) training and can be told apart.
        for length in sorted({length for _, length in chunks}):
            self._program(variant, length, carry, data, *plan, jnp.int32(0))
        if compiled is not None:
            compiled()
        totals = None
        for start, length in chunks:
            args = (carry, data, *plan, jnp.int32(start))
            carry, sums = self._program(variant, length, *args)(*args)
            if self.wait_each_call:
                jax.block_until_ready(sums)
            totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        return carry, totals

    def _epoch_plan(self, key):
        if self._plan_compiled is None:
            start = time.perf_counter()
            self._plan_compiled = self.plan.lower(key).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._plan_compiled(key)

    def epoch(self, carry, data, key, compiled=None):
        """One epoch: ``(carry, sums)``; ``compiled()`` runs when its programs are compiled."""
        if self.data_parallel is not None:  # replicate (once: then a no-op)
            carry = self.data_parallel.put(carry)
        return self._run("fast", carry, data, self._epoch_plan(key), compiled)

    def find_nonfinite(self, carry, data, key):
        """Replay the epoch of ``key`` from its starting point ``carry`` with halting
        steps: ``(last good carry, code, step)``, code 0 when every step was finite."""
        if self.data_parallel is not None:
            carry = self.data_parallel.put(carry)
        (good, (code, at, _)), _ = self._run("halting", (carry, _no_halt()), data,
                                             self._epoch_plan(key))
        return good, int(code), int(at)


class _StreamTrainer:
    """The jitted per-step path for data given as an iterable of ``(x, y)`` batches.

    Every batch is padded to the size of the first one (padded rows weigh 0), so
    a ragged last batch does not cause a recompilation. With ``guard``, the steps
    halt (:func:`_halting`): the epoch ends at its last good point.
    """

    def __init__(self, model, loss, optimizer, penalty, metric_fns, value_and_grad=None,
                 compute_dtype=None, guard=False):
        step = _make_step(model, loss, optimizer, penalty, metric_fns, value_and_grad,
                          compute_dtype, guard)
        self.guard = guard
        self.step = jax.jit(_halting(step) if guard else step, donate_argnums=(0,))
        self.batch_size: int | None = None
        self.compile_seconds = 0.0  # not separated from the first step on this path

    def epoch(self, carry, batches, key, on_step=None):
        """One epoch: ``(carry, sums, (code, step))``, as :meth:`_Trainer.find_nonfinite`;
        ``on_step(steps_done)`` after each step is dispatched."""
        totals = None
        if self.guard:
            carry = (carry, _no_halt())
        for index, (xb, yb) in enumerate(batches):
            m = _check_arrays(xb, yb, f"batch {index} x", f"batch {index} y")
            if self.batch_size is None:
                self.batch_size = m
            if m > self.batch_size:
                raise ValueError(f"x (batches, with y=None): no batch may be larger than the "
                                 f"first, which had {self.batch_size} examples; batch {index} "
                                 f"has {m}. Put the largest batch first or use one size")
            pad = self.batch_size - m

            def padded(a, pad=pad):
                a = jnp.asarray(a)
                return jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

            xb, yb = jax.tree_util.tree_map(padded, (xb, yb))
            weights = (jnp.arange(self.batch_size) < m).astype(jnp.float32)
            carry, sums = self.step(carry, (xb, yb, weights, jax.random.fold_in(key, index)))
            totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
            if on_step is not None:
                on_step(index + 1)
        if totals is None:
            raise ValueError("x (batches, with y=None) gave no batch this epoch; pass a list "
                             "of (x_batch, y_batch) pairs, or a function epoch -> iterable "
                             "that returns a fresh, non-empty iterable each time")
        if not self.guard:
            return carry, totals, (0, 0)
        carry, (code, at, _) = carry
        return carry, totals, (int(code), int(at))


def _logs_from_sums(sums: Mapping[str, Array], names: Sequence[str]) -> dict[str, float]:
    """Means from weighted sums, in the order ``loss, *metrics`` (JAX sorts dict keys)."""
    sums = jax.device_get(sums)
    weight = float(sums["_weight"])
    return {name: float(sums[name]) / weight for name in ("loss", *names)}


# --------------------------------------------------------------------------
# Evaluation and prediction
# --------------------------------------------------------------------------


def evaluate(
    model: Layer,
    params: Params,
    x: Any,
    y: Any,
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
    """
    n = _check_arrays(x, y)
    if state is None:
        _check_stateless(model, x, "evaluate")
    state = state or {}
    _check_data(model, params, state, x, y)
    batch_size = min(_check_positive_int(batch_size, "batch_size"), n)
    metric_fns = _metric_table(metrics)
    loss = _loss_forms.weighted(loss, "loss")
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
            xb, yb = _take((x, y), idx)
            predictions, _ = model.apply_with_state(params, state, xb, train=False)
            w = jnp.sum(weights)
            sums = {"_weight": w, "loss": _weighted(loss, predictions, yb, weights) * w}
            for name, fn in metric_fns.items():
                sums[name] = _weighted(fn, predictions, yb, weights) * w
            return None, sums

        _, per_batch = jax.lax.scan(body, None, (idx, weights), length=steps)
        total = jax.tree_util.tree_map(jnp.sum, per_batch)
        if penalty is not None:
            total["loss"] = total["loss"] + penalty(params) * total["_weight"]
        return total

    return run


def _evaluate_compiled(model, loss, penalty, metric_fns, batch_size):
    jitted = _evaluate_jitted(model, loss, penalty, tuple(metric_fns.items()), batch_size)
    return lambda *args: _logs_from_sums(jitted(*args), list(metric_fns))


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

    Zero examples give an empty array shaped like the output, ``(0, ...)``.
    """
    if output not in ("logits", "probabilities", "classes"):
        raise ValueError(f"output must be 'logits', 'probabilities' or 'classes', got {output!r}")
    _data_checks.check_array_tree(x, "x")
    if isinstance(x, dict):
        raise TypeError("predict: x must be one array (a dict of inputs is not supported here)")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if state is None:
        _check_stateless(model, x, "predict")
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


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------


def _format_logs(logs: Mapping[str, float]) -> str:
    return " - ".join(f"{name}: {value:.4g}" if name == "learning_rate" else
                      f"{name}: {value:.4f}" for name, value in logs.items())


def learning_rate(opt_state) -> float | None:
    """The learning rate held in ``opt_state``, or None when it holds none.

    Found when the optimizer was made with ``optax.inject_hyperparams`` (e.g.
    ``optax.inject_hyperparams(optax.adam)(learning_rate=schedule)``): the value
    its last update used, ``schedule(count - 1)`` after ``count`` updates.
    """
    found = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda node: isinstance(getattr(node, "hyperparams", None), dict))
    for node in found:
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
            value = np.asarray(jax.device_get(hyperparams["learning_rate"]))
            if value.size == 1:
                return float(value.reshape(()))
    return None


def _check_stateless(model: Layer, x, where: str = "fit") -> None:
    """Raise when ``model`` keeps state (BatchNorm) but ``where`` got no ``state=``."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    signature = tuple((tuple(np.shape(a)[1:]), jnp.result_type(a).name) for a in leaves)
    keys = _state_keys(model, treedef, signature)
    if keys:
        if where == "fit":
            advice = ("Create both with params, state = model.init_with_state(key, x[:1]) and "
                      "pass fit(..., state=state); the trained state is in the result's .state")
        else:
            advice = (f"Pass the trained state: {where}(..., state=result.state), with result "
                      "what fit returned (or the state from model.init_with_state)")
        raise ValueError(f"{where}: the model has state ({keys}: e.g. "
                         f"BatchNorm's running statistics) but no state= was given. {advice}")


@functools.lru_cache(maxsize=64)
def _state_keys(model: Layer, treedef, signature) -> str:
    """The model's state entries for inputs of this structure ("" when it has none),
    from an abstract init (cached: predict and evaluate call it every time)."""
    structs = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct((1, *shape), dtype) for shape, dtype in signature])
    try:
        _, state = jax.eval_shape(lambda k: model.initialize(k, structs), jax.random.key(0))
    except Exception:  # noqa: BLE001 - the model's own errors are raised later, with context
        return ""
    return _describe_keys(state) if jax.tree_util.tree_leaves(state) else ""


def _check_optimizer(optimizer) -> None:
    if isinstance(optimizer, optax.GradientTransformation) or (
            hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        return
    if callable(optimizer):
        name = getattr(optimizer, "__name__", "the optimizer")
        raise TypeError(f"optimizer: got the function {name} itself, not an optimizer; call it "
                        f"with a learning rate, e.g. optimizer={name}(1e-3)")
    raise TypeError("optimizer must be an optax GradientTransformation such as "
                    f"optax.adam(1e-3) or jaxnn.optimizers.adam(1e-3), got {optimizer!r}")


def _check_key(key) -> None:
    shape, dtype = np.shape(key), getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        ok = shape == ()
    else:
        ok = len(shape) == 1 and dtype == np.uint32  # a raw key, jax.random.PRNGKey(0)
    if not ok:
        raise TypeError(f"key must be one PRNG key such as jax.random.key(0), got {key!r}"[:300])


def _check_not_pair(params) -> None:
    if isinstance(params, tuple) and len(params) == 2 and all(
            isinstance(part, dict) for part in params):
        raise TypeError("params is a pair (params, state), as init_with_state returns: unpack "
                        "it, params, state = model.init_with_state(key, x[:1]), and pass "
                        "fit(model, params, x, y, ..., state=state)")


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def _stream_progress(display: _Progress, epoch: int, every: int, done: int) -> None:
    if done % every == 0:
        display.update(epoch, done)


def _start_bar(display: _Progress, trainer: _Trainer, epoch: int, first: bool) -> None:
    """Called once the epoch's programs are compiled, before they run."""
    if first:
        display.note(f"compiled in {trainer.compile_seconds:.1f} s")
    trainer.on_progress = functools.partial(display.update, epoch)
    display.start(epoch, trainer.steps)


# --------------------------------------------------------------------------
# Progress display (verbose=1)
# --------------------------------------------------------------------------

_VERBOSE = (0, 1, 2)
# verbose=1 updates the bar this many times an epoch (every max(1, steps // 20) steps)
_PROGRESS_UPDATES = 20
# Without a terminal (a pipe, a log file) a progress line is written at most this often
_PLAIN_LINE_SECONDS = 10.0


def _check_verbose(verbose, where: str = "fit") -> int:
    """``verbose`` as 0, 1 or 2; ``True``/``False`` count as 1/0 (Python's bools are ints)."""
    if isinstance(verbose, bool | int | np.integer) and int(verbose) in _VERBOSE:
        return int(verbose)
    raise ValueError(f"{where}: verbose must be 0 (silent), 1 (a progress bar per epoch) or 2 "
                     f"(one line per epoch), got {verbose!r}")


def _progress_every(steps: int) -> int:
    return max(1, steps // _PROGRESS_UPDATES)


class _Progress:
    """The progress bar of ``verbose=1``, one per epoch, drawn on ``stream``.

    On a terminal: tqdm's bar when tqdm is importable, else a line redrawn with
    ``\\r``. Elsewhere (a pipe, a file): no ``\\r`` ever, a plain progress line at
    most every :data:`_PLAIN_LINE_SECONDS`. :meth:`update` may be called from
    XLA's callback thread while the compiled epoch runs; updates for another
    epoch than the current one are ignored.
    """

    def __init__(self, epochs: int, stream=None):
        self.stream = sys.stdout if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.epochs = epochs
        self.lock = threading.Lock()
        self.epoch: int | None = None
        self.steps: int | None = None
        self.drawn = False  # a partial bar line is on the terminal
        self.bar = None  # tqdm's bar, when tqdm draws it
        self.tqdm = None
        if self.terminal:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            self.tqdm = tqdm

    def start(self, epoch: int, steps: int | None) -> None:
        """A new bar for ``epoch`` (counting from 0) of ``steps`` steps (None: unknown)."""
        with self.lock:
            self.epoch, self.steps, self.done = epoch, steps, 0
            self.started = self.last_line = time.perf_counter()
            if self.tqdm is not None:
                self.bar = self.tqdm(total=steps, desc=f"Epoch {epoch + 1}/{self.epochs}",
                                     file=self.stream, leave=False, unit="step")
            elif self.terminal:
                self._draw()

    def update(self, epoch: int, done: int) -> None:
        """``done`` steps of ``epoch`` have run."""
        with self.lock:
            if epoch != self.epoch or done <= self.done:
                return
            if self.bar is not None:
                self.bar.update(done - self.done)
                self.done = done
                return
            self.done = done
            if self.terminal:
                self._draw()
            elif time.perf_counter() - self.last_line >= _PLAIN_LINE_SECONDS:
                self.last_line = time.perf_counter()
                self.stream.write(self._text() + "\n")
                self.stream.flush()

    def _text(self) -> str:
        elapsed = time.perf_counter() - self.started
        head = f"Epoch {self.epoch + 1}/{self.epochs}"
        if not self.steps:
            return f"{head} - step {self.done} - {elapsed:.1f}s"
        width = 30
        filled = width * self.done // self.steps
        arrow = ">" if filled < width else ""
        bar = "=" * filled + arrow + "." * (width - filled - len(arrow))
        eta = elapsed / self.done * (self.steps - self.done) if self.done else float("nan")
        return (f"{head} [{bar}] {self.done}/{self.steps} - {elapsed:.1f}s"
                + (f" - ETA {eta:.1f}s" if self.done < self.steps and self.done else ""))

    def _draw(self) -> None:
        text = self._text()
        self.stream.write("\r" + text.ljust(getattr(self, "width", 0)))
        self.width = len(text)
        self.stream.flush()
        self.drawn = True

    def _clear(self) -> None:
        """Remove the bar (caller holds the lock)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.drawn:
            self.stream.write("\r" + " " * getattr(self, "width", 0) + "\r")
            self.drawn = False

    def finish(self, line: str | None = None) -> None:
        """End the current bar and write ``line`` (the epoch's summary) in its place."""
        with self.lock:
            self._clear()
            self.epoch = None
            if line is not None:
                self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, line: str) -> None:
        """A line of its own (e.g. the compile time), outside any bar."""
        with self.lock:
            self._clear()
            self.stream.write(line + "\n")
            self.stream.flush()


def fit(
    model: Layer,
    params: Params,
    x: Any,
    y: Any = None,
    *,
    loss: LossFn,
    optimizer: optax.GradientTransformation,
    key: PRNGKey,
    epochs: int = 1,
    batch_size: int = 32,
    state: State | None = None,
    opt_state: Any = None,
    penalty: Callable[[Params], Array] | None = None,
    metrics: Sequence[str | MetricFn] = ("accuracy",),
    validation_data: tuple[Any, Any] | None = None,
    validation_split: float = 0.0,
    initial_epoch: int = 0,
    callbacks: Iterable[Callback] = (),
    shuffle: bool = True,
    steps_per_call: int | str | None = None,
    verbose: int = 1,
    value_and_grad: ValueAndGradFn | None = None,
    compute_dtype: jnp.dtype | None = None,
    devices: int | Sequence[jax.Device] | None = None,
    on_nonfinite: str = "raise",
) -> FitResult:
    """Train ``model`` on ``(x, y)``; returns a :class:`FitResult` (params, state, history).

    Example::

        params = model.init(key, x[:1])
        result = jaxnn.fit(model, params, x, y, loss="sparse_softmax_cross_entropy",
                           optimizer=optax.adam(1e-3), key=key, epochs=5)
        result.params, result.history["loss"]  # the history: one value per epoch

    Args:
      model, params: the model and its params. A model with state (BatchNorm):
        ``params, state = model.init_with_state(key, x[:1])``, then ``state=state``.
      x, y: inputs and targets, leading axis = examples (numpy or JAX arrays, or
        dicts of them), checked first: NaN/inf or labels out of range are errors.
        With ``y=None``, ``x`` is a list of ``(x_batch, y_batch)`` pairs or a
        function ``epoch -> iterable of pairs`` (data too large for memory).
      loss: a name from :mod:`jaxnn.losses`, a jaxnn loss, or an optax-style loss
        ``(predictions, targets) -> (batch,)``. ``metrics`` take the same forms.
      optimizer: any optax transformation, e.g. ``optax.adam(1e-3)``; made with
        ``optax.inject_hyperparams``, its rate is logged as ``"learning_rate"``.
      key: randomness for shuffling and dropout; epoch ``e`` uses ``fold_in(key, e)``.
      epochs, batch_size: train until epoch ``epochs``; examples per step (32).
      verbose: 1 (default): a progress bar per epoch, moving while the compiled
        epoch runs (plain lines when stdout is not a terminal); 2: one line per
        epoch; 0: silent. ``True``/``False`` mean 1/0.
      validation_data: ``(x_val, y_val)``, evaluated after each epoch (``val_loss``,
        ...); or ``validation_split``: hold out this fraction, the last examples.
      callbacks: e.g. :class:`jaxnn.callbacks.EarlyStopping`, ``ModelCheckpoint``.
      state, opt_state, initial_epoch: where to start (resuming a checkpoint).
      penalty: e.g. ``jaxnn.regularizers.l2(1e-4)``, added to the loss.
      on_nonfinite: ``"raise"`` (default): :class:`NonFiniteError` at the first NaN
        or inf loss or gradient, naming the step; ``"warn"``; ``"ignore"``.
      shuffle, steps_per_call, value_and_grad, compute_dtype, devices: reshuffling,
        steps per compiled call, a custom gradient, mixed precision (``jnp.bfloat16``)
        and data parallelism: see ``docs/training.md``.

    Ctrl-C raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``); its
    ``.result`` holds the last completed epoch, to resume from.
    """
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size")
    verbose = _check_verbose(verbose)
    if on_nonfinite not in _ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
    guard = on_nonfinite != "ignore"
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int | np.integer) or (
            initial_epoch < 0):
        raise ValueError(f"initial_epoch must be an integer >= 0 (the epoch to resume at, e.g. "
                         f"a previous result's .epoch), got {initial_epoch!r}")
    whole_epoch = isinstance(steps_per_call, str) and steps_per_call == "epoch"
    if steps_per_call is not None and not whole_epoch:
        if isinstance(steps_per_call, str):
            raise ValueError(f"steps_per_call must be a positive integer, 'epoch' or None, "
                             f"got {steps_per_call!r}")
        steps_per_call = _check_positive_int(steps_per_call, "steps_per_call")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if validation_split and validation_data is not None:
        raise ValueError("validation_data and validation_split: give one of them, not both")
    if value_and_grad is not None and penalty is not None:
        raise ValueError("give the penalty inside value_and_grad (its loss and gradient must "
                         "include it), not as penalty=, when using a custom value_and_grad")
    if value_and_grad is not None and not callable(value_and_grad):
        raise TypeError(f"value_and_grad must be a function (params, x, y, weights) -> "
                        f"(loss, grads, predictions), got {value_and_grad!r}")
    compute_dtype = _check_compute_dtype(compute_dtype)
    if compute_dtype is not None and value_and_grad is not None:
        raise ValueError("compute_dtype does not apply to a custom value_and_grad (it computes "
                         "its own gradient); cast inside value_and_grad instead")
    _check_optimizer(optimizer)
    _check_key(key)
    _check_not_pair(params)
    loss = _loss_forms.weighted(loss, "loss")
    streaming = y is None
    state_given = state is not None
    state = {} if state is None else state
    if streaming:
        if validation_split:
            raise ValueError("validation_split needs in-memory arrays (x, y); with batches "
                             "(y=None) pass validation_data=(x_val, y_val) instead")
        batches_for = x if callable(x) else (lambda epoch: x)
        if not callable(x) and iter(x) is x:
            raise TypeError("x is a one-shot iterator; pass a list of batches or a function "
                            "epoch -> iterable of (x_batch, y_batch) so each epoch can restart")
        n = batch_size  # only used to size validation batches
    else:
        n = _check_arrays(x, y)
        if not state_given:
            _check_stateless(model, x)
        _check_data(model, params, state, x, y)
    if validation_split:
        n_val = int(n * validation_split)
        if n_val == 0 or n_val == n:
            raise ValueError(f"validation_split={validation_split} of {n} examples leaves "
                             f"{n_val} for validation; choose a fraction that leaves both sides")
        validation_data = (_slice(x, n - n_val, n), _slice(y, n - n_val, n))
        x, y = _slice(x, 0, n - n_val), _slice(y, 0, n - n_val)
        n -= n_val
    batch_size = min(batch_size, n)
    callbacks = list(callbacks)
    metric_fns = _metric_table(metrics)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    host_memory.prepare_cpu()

    parallel = None if devices is None else _sharding.data_parallel(devices)
    if streaming:
        if parallel is not None:
            raise ValueError("devices: data-parallel training needs in-memory arrays (x, y); "
                             "batches given as an iterable (y=None) run on one device, so "
                             "pass devices=None there")
        trainer = _StreamTrainer(model, loss, optimizer, penalty, metric_fns, value_and_grad,
                                 compute_dtype=compute_dtype, guard=guard)
    else:
        if parallel is None:
            data = jax.tree_util.tree_map(jnp.asarray, (x, y))
        else:
            _sharding.check_batch_size(batch_size, parallel.size, n)
            data = parallel.put((x, y))  # a full copy of the dataset on every device
        if whole_epoch:
            steps_per_call = None
        elif steps_per_call is None:
            steps_per_call = _default_steps_per_call(model, params, state, x, batch_size)
        trainer = _Trainer(model, loss, optimizer, penalty, metric_fns, n, batch_size,
                           shuffle, steps_per_call, value_and_grad, data_parallel=parallel,
                           compute_dtype=compute_dtype,
                           scan_unroll=_epoch_unroll(params, batch_size),
                           progress=verbose == 1)
    validate = None
    if validation_data is not None:
        if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (x_val, y_val), got "
                            f"{type(validation_data).__name__}")
        x_val, y_val = validation_data
        n_val = _check_arrays(x_val, y_val, "validation_data[0]", "validation_data[1]")
        _check_data(model, params, state, x_val, y_val, "validation_data[0]",
                    "validation_data[1]")
        val_data = jax.tree_util.tree_map(jnp.asarray, (x_val, y_val))
        validate = _evaluate_compiled(model, loss, penalty, metric_fns,
                                      min(max(batch_size, 1000), n_val))
        if parallel is not None:  # validation runs on one device, with its copy of params
            validate = parallel.on_first_device(validate)

    history: dict[str, list[float]] = {}
    # The compiled epoch donates (reuses) the buffers of its carry; copy once so the
    # caller's params, state and optimizer state stay valid.
    carry = jax.tree_util.tree_map(jnp.array, (params, state, opt_state))
    epoch = initial_epoch
    if callbacks:
        begin = TrainBegin(initial_epoch, epochs, *carry, key)
        for callback in callbacks:
            _train_begin(callback, begin)
    done = carry  # the last completed point; a copy while `carry` is donated to an epoch
    display = _Progress(epochs) if verbose == 1 else None
    try:
        while epoch < epochs:
            done = jax.tree_util.tree_map(jnp.copy, carry)
            start = time.perf_counter()
            compiling = trainer.compile_seconds
            epoch_key = jax.random.fold_in(key, epoch)
            epoch_data = batches_for(epoch) if streaming else data
            if streaming:
                on_step = None
                if display is not None:
                    total = _length(epoch_data)
                    display.start(epoch, total)
                    on_step = functools.partial(_stream_progress, display, epoch,
                                                _progress_every(total) if total else 10)
                carry, sums, (code, step) = trainer.epoch(carry, epoch_data, epoch_key,
                                                          on_step)
                good = carry
            else:
                compiled = None
                if display is not None:
                    compiled = functools.partial(_start_bar, display, trainer, epoch,
                                                 epoch == initial_epoch)
                carry, sums = trainer.epoch(carry, epoch_data, epoch_key, compiled)
            sums = jax.device_get(sums)  # waits for the epoch to finish
            if display is not None:
                trainer.on_progress = None
                display.finish()
            if guard and not streaming:
                # Any NaN/inf loss shows in the epoch's sum, any NaN/inf gradient in the
                # values it updated; only then is the epoch replayed step by step.
                code = 0
                if not (np.isfinite(sums["loss"]) and bool(all_finite(carry))):
                    good, code, step = trainer.find_nonfinite(done, data, epoch_key)
            if guard and code:
                what = _NONFINITE_WHAT[code]
                result = FitResult(*good, history, epoch, key, trainer.compile_seconds)
                of_steps = "" if streaming else f"/{trainer.steps}"
                holder = "the returned result" if on_nonfinite == "warn" else "error.result"
                message = (
                    f"fit: {what} NaN or inf at epoch {epoch + 1}/{epochs}, step "
                    f"{step + 1}{of_steps} (batch {step} of that epoch, counting from 0); "
                    f"training stopped there. The params, state and optimizer state from "
                    f"before that step are in {holder}. "
                    "Usual causes: a learning rate too large, labels or inputs out of range, "
                    "a log or a division of 0 in a custom loss")
                if on_nonfinite == "raise":
                    raise NonFiniteError(message, result, epoch, step, what)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                for callback in callbacks:
                    result = callback.on_train_end(result)
                return result
            logs = _logs_from_sums(sums, list(metric_fns))
            seconds = time.perf_counter() - start - (trainer.compile_seconds - compiling)
            if validate is not None:
                logs.update({"val_" + k: v
                             for k, v in validate(carry[0], carry[1], *val_data).items()})
            rate = learning_rate(carry[2])
            if rate is not None:
                logs["learning_rate"] = rate
            for name, value in logs.items():
                history.setdefault(name, []).append(value)
            history.setdefault("seconds", []).append(seconds)
            epoch += 1
            done = carry
            if verbose:
                print(f"Epoch {epoch}/{epochs} - {seconds:.2f}s - {_format_logs(logs)}",
                      file=sys.stdout, flush=True)
            info = EpochEnd(epoch - 1, logs, *carry, key, history)
            stop = False
            for callback in callbacks:
                stop = callback.on_epoch_end(info) or stop
            if stop:
                break
    except KeyboardInterrupt:
        completed = {name: values[:epoch - initial_epoch] for name, values in history.items()}
        result = FitResult(*done, completed, epoch, key, trainer.compile_seconds)
        for callback in callbacks:
            interrupted = getattr(callback, "on_train_interrupted", None)
            if interrupted is not None:
                interrupted(result)
        raise TrainingInterrupted(result) from None
    finally:
        if display is not None:
            trainer.on_progress = None
            display.finish()

    result = FitResult(carry[0], carry[1], carry[2], history, epoch, key,
                       trainer.compile_seconds)
    for callback in callbacks:
        result = callback.on_train_end(result)
    return result


def _train_begin(callback, info) -> None:
    """``callback.on_train_begin(info)``, or ``()`` for an override that takes no argument."""
    method = callback.on_train_begin
    try:
        takes_info = bool(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        takes_info = True
    if takes_info:
        method(info)
    else:
        method()
