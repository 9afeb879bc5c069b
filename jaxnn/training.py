"""Training: ``fit`` turns a data source into batches, batches into compiled
chunks of steps, and runs the chunks over a carry of ``(params, state, opt_state)``.

- :mod:`jaxnn._sources`: arrays on the device, examples on the host (arrays,
  memmaps, random-access sources) or an iterable of batches, each cut into
  chunks of steps by the epoch's plan (drawn from ``fold_in(key, epoch)``);
- :mod:`jaxnn._steps`: one optimisation step (loss, gradient, update, logs);
- :mod:`jaxnn._chunks`: the compiled programs that run a chunk of steps;
- this module: the epochs around them (logs, validation, callbacks, the
  NaN/inf guard, Ctrl-C). ``docs/training.md`` describes every option.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn import (
    _data_checks,
    _loss_forms,
    _param_sharding,
    _sharding,
    _sources,
    evaluation,
    host_memory,
)
from jaxnn._chunks import (
    ChunkRunner,
    default_steps_per_call,
    epoch_plan,
    epoch_unroll,
    scan_steps,
)
from jaxnn._fit_checks import (
    check_arrays,
    check_data,
    check_fit_options,
    check_stateless,
)
from jaxnn._progress import PROGRESS_UPDATES, Progress, check_verbose
from jaxnn._steps import (
    LossFn,
    MetricFn,
    ValueAndGradFn,
    all_finite,
    halting,
    make_step,
    metric_table,
    no_halt,
    slice_examples,
)
from jaxnn._typing import Array, Params, PRNGKey, State
from jaxnn.callbacks import Callback, EpochEnd, TrainBegin
from jaxnn.evaluation import evaluate, evaluation_sums, predict
from jaxnn.layers._base import Layer
from jaxnn.results import FitResult, NonFiniteError, TrainingInterrupted

__all__ = [
    "Callback", "FitResult", "NonFiniteError", "TrainingInterrupted", "all_finite",
    "epoch_plan", "evaluate", "evaluation_sums", "fit", "learning_rate", "predict",
    "scan_steps",
]

NONFINITE_WHAT = {1: "the loss is", 2: "the gradient is", 3: "the loss and the gradient are"}


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
    devices: int | str | Sequence[jax.Device] | None = None,
    on_nonfinite: str = "raise",
    feed: str | None = None,
    accumulate: int = 1,
    shard_params: bool | Mapping[str, jax.sharding.PartitionSpec] = False,
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
        With ``y=None``, ``x`` is a random-access source (``len(x)``, ``x[i] ->
        (x_i, y_i)``, e.g. ``jaxnn.datasets.tfds_source``), a list of ``(x_batch,
        y_batch)`` pairs, or a function ``epoch -> iterable of pairs``.
      feed: ``"device"``: the arrays put on the device once (the default for
        arrays); ``"host"``: left on the host and streamed in chunks (the default
        for memmaps, sources, batches and ``devices=N``).
      loss: a name from :mod:`jaxnn.losses`, a jaxnn loss, or an optax-style loss
        ``(predictions, targets) -> (batch,)``. ``metrics`` take the same forms.
      optimizer: any optax transformation, e.g. ``optax.adam(1e-3)``; made with
        ``optax.inject_hyperparams``, its rate is logged as ``"learning_rate"``.
      key: randomness for shuffling and dropout; epoch ``e`` uses ``fold_in(key, e)``.
      epochs, batch_size: train until epoch ``epochs``; examples per step (32).
      accumulate: ``k`` to take ``k * batch_size`` examples per optimizer step,
        ``batch_size`` at a time (gradient accumulation).
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
        and data parallelism (``devices="all"``: every device, of every process after
        ``jax.distributed.initialize``): see ``docs/training.md``.
      shard_params: over several devices, ``True`` splits the params and the
        optimizer state over them (each parameter along its largest dimension the
        device count divides) instead of copying them to each; a dict
        ``{"*/kernel": P("data", None)}`` sets the split of the parameters whose
        path matches. No effect on one device.

    Ctrl-C raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``); its
    ``.result`` holds the last completed epoch, to resume from.
    """
    epochs, batch_size, steps_per_call, compute_dtype, accumulate = check_fit_options(
        epochs=epochs, batch_size=batch_size, initial_epoch=initial_epoch,
        steps_per_call=steps_per_call, validation_split=validation_split,
        validation_data=validation_data, value_and_grad=value_and_grad, penalty=penalty,
        compute_dtype=compute_dtype, optimizer=optimizer, key=key, params=params,
        on_nonfinite=on_nonfinite, feed=feed, accumulate=accumulate)
    verbose = check_verbose(verbose)
    shard_table = _param_sharding.check_shard_params(shard_params)
    parallel = _sharding.data_parallel(devices)
    if parallel is not None and parallel.spans_processes and jax.process_index() != 0:
        verbose = 0  # over several processes, process 0 prints
    loss = _loss_forms.weighted(loss, "loss")
    metric_fns = metric_table(metrics)
    state_given = state is not None
    state = {} if state is None else state
    callbacks = list(callbacks)
    source, validation_data = _source(
        model, params, state, state_given, x, y, feed=feed, batch_size=batch_size,
        accumulate=accumulate, shuffle=shuffle, steps_per_call=steps_per_call,
        validation_split=validation_split, validation_data=validation_data,
        parallel=parallel, progress=verbose == 1)
    validate = _validation(model, params, state, validation_data, loss, penalty, metric_fns,
                           batch_size, parallel)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    if parallel is None:
        shardings = None
        if shard_table:  # one device: nothing split, but a pattern matching nothing is an error
            _param_sharding.param_specs(params, shard_table, 1)
    else:
        shardings = _param_sharding.carry_shardings(parallel, shard_table, params, state,
                                                    opt_state)
    host_memory.prepare_cpu()
    runner = _runner(model, loss, optimizer, penalty, metric_fns, value_and_grad, compute_dtype,
                     accumulate, parallel, shardings, params, batch_size, source.steps)

    def compile_seconds() -> float:
        return runner.compile_seconds + source.compile_seconds

    # The compiled chunks donate (reuse) the buffers of their carry; copy once so the
    # caller's params, state and optimizer state stay valid.
    carry = jax.tree_util.tree_map(jnp.array, (params, state, opt_state))
    if parallel is not None:
        carry = parallel.put(carry, shardings)
    history: dict[str, list[float]] = {}
    epoch = initial_epoch
    if callbacks:
        begin = TrainBegin(initial_epoch, epochs, *carry, key)
        for callback in callbacks:
            _train_begin(callback, begin)
    done = carry  # the last completed point; a copy while `carry` is donated to an epoch
    display = Progress(epochs) if verbose == 1 else None
    try:
        while epoch < epochs:
            done = jax.tree_util.tree_map(jnp.copy, carry)
            start = time.perf_counter()
            compiling = compile_seconds()
            epoch_key = jax.random.fold_in(key, epoch)
            carry, sums = _run_epoch(runner, source, carry, epoch, epoch_key, display,
                                     first=epoch == initial_epoch)
            sums = jax.device_get(sums)  # waits for the epoch to finish
            if on_nonfinite != "ignore":
                good, code, step = _find_nonfinite(runner, source, sums, carry, done, epoch,
                                                   epoch_key)
                if code:
                    result = FitResult(*good, history, epoch, key, compile_seconds())
                    return _nonfinite(result, callbacks, on_nonfinite, code, epoch, epochs,
                                      step, source.steps)
            logs = _logs(sums, list(metric_fns), carry, validate)
            seconds = time.perf_counter() - start - (compile_seconds() - compiling)
            for name, value in logs.items():
                history.setdefault(name, []).append(value)
            history.setdefault("seconds", []).append(seconds)
            epoch += 1
            done = carry
            if verbose:
                print(f"Epoch {epoch}/{epochs} - {seconds:.2f}s - {_format_logs(logs)}",
                      file=sys.stdout, flush=True)
            if _stop_asked(callbacks, EpochEnd(epoch - 1, logs, *carry, key, history)):
                break
    except KeyboardInterrupt:
        completed = {name: values[:epoch - initial_epoch] for name, values in history.items()}
        result = FitResult(*done, completed, epoch, key, compile_seconds())
        for callback in callbacks:
            interrupted = getattr(callback, "on_train_interrupted", None)
            if interrupted is not None:
                interrupted(result)
        raise TrainingInterrupted(result) from None
    finally:
        if display is not None:
            display.finish()

    result = FitResult(carry[0], carry[1], carry[2], history, epoch, key,
                       compile_seconds())
    for callback in callbacks:
        result = callback.on_train_end(result)
    return result


def _runner(model, loss, optimizer, penalty, metric_fns, value_and_grad, compute_dtype,
            accumulate, parallel, shardings, params, batch_size, epoch_steps) -> ChunkRunner:
    """The compiled training programs: a fast step and, to find a NaN/inf, a halting one
    (over a mesh: with the carry kept at ``shardings``)."""
    steps = {variant: make_step(model, loss, optimizer, penalty, metric_fns, value_and_grad,
                                compute_dtype, guard=variant == "halting", accumulate=accumulate)
             for variant in ("fast", "halting")}
    if parallel is not None:
        steps = {variant: parallel.step(step, shardings) for variant, step in steps.items()}
    steps["halting"] = halting(steps["halting"])
    return ChunkRunner(
        steps, unroll=epoch_unroll(params, batch_size * accumulate, epoch_steps),
        wait_each_call=parallel is not None and all(
            d.platform == "cpu" for d in parallel.mesh.devices.flat),
        replicated=None if parallel is None else parallel.replicated)


def _find_nonfinite(runner, source, sums, carry, start, epoch, epoch_key):
    """``(last good carry, code, step)`` of an epoch run from ``start`` to ``carry``; code
    0 when all was finite. Any NaN/inf loss shows in the epoch's summed loss, any NaN/inf
    gradient in the values it updated; only then is the epoch replayed step by step."""
    if np.isfinite(sums["loss"]) and bool(all_finite(carry)):
        return carry, 0, 0
    (good, (code, step, _)), _ = runner.run("halting", (start, no_halt()),
                                            source.chunks(epoch, epoch_key))
    if not int(code):  # the replay met no NaN/inf: the source gave other batches
        return start, int(not np.isfinite(sums["loss"])) or 2, -1
    return good, int(code), int(step)


def _stop_asked(callbacks, info: EpochEnd) -> bool:
    """Every callback sees the epoch's end; True when any asks to stop."""
    stop = False
    for callback in callbacks:
        stop = callback.on_epoch_end(info) or stop
    return stop


def _source(model, params, state, state_given, x, y, *, feed, batch_size, accumulate, shuffle,
            steps_per_call, validation_split, validation_data, parallel, progress):
    """The data source of a ``fit`` call (checked), and its validation data."""
    straight_line_steps = functools.partial(_straight_line_steps, model, params, state,
                                            steps_per_call)
    if y is None:
        what = "a source" if _sources.is_example_source(x) else "batches given as an iterable"
        if feed == "device":
            raise ValueError(f"feed='device' needs in-memory arrays (x, y); {what} (y=None) "
                             "is read on the host and copied in chunks")
        if validation_split:
            raise ValueError(f"validation_split needs in-memory arrays (x, y); with {what} "
                             "(y=None) pass validation_data=(x_val, y_val) instead")
        if not _sources.is_example_source(x):
            if parallel is not None and parallel.spans_processes:
                raise ValueError(
                    "fit over several processes: batches given as an iterable (y=None) are "
                    "not split between the processes; pass arrays (x, y) or a random-access "
                    "source (len(x), x[i] -> (x_i, y_i)), the same in every process, and "
                    "each process reads its part of every batch")
            return _batch_stream(model, params, state, x, accumulate, straight_line_steps,
                                 parallel), validation_data
        n, read, example, labels = _example_source(model, params, state, state_given, x)
    else:
        x, y, n, held_out = _arrays(model, params, state, state_given, x, y, validation_split)
        validation_data = validation_data if held_out is None else held_out
        if feed is None:  # memmaps and several devices: no copy of the dataset on a device
            memmapped = any(isinstance(a, np.memmap) for a in jax.tree_util.tree_leaves((x, y)))
            feed = "host" if memmapped or parallel is not None else "device"
        example, labels = slice_examples((x, y), 0, 1), None
        read = functools.partial(_sources.take_rows, jax.tree_util.tree_map(np.asarray, (x, y)))
    step_batch = _step_batch(batch_size, accumulate, n)
    if parallel is not None:
        _sharding.check_batch_size(step_batch, parallel.size, n)
    straight = straight_line_steps(example[0], step_batch)
    if y is not None and feed == "device":
        steps = math.ceil(n / step_batch)
        chunk = straight or (math.ceil(steps / PROGRESS_UPDATES) if progress else steps)
        return _sources.ResidentArrays(x, y, step_batch, shuffle, chunk, straight is not None,
                                       parallel), validation_data
    example_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(example))
    return _sources.HostExamples(read, n, example_bytes, step_batch, shuffle, straight,
                                 parallel, labels), validation_data


def _straight_line_steps(model, params, state, steps_per_call, xb, size) -> int | None:
    """Steps per straight-line program, or None for a loop (see jaxnn._chunks)."""
    if steps_per_call is None:
        return default_steps_per_call(model, params, state, xb, size)
    return steps_per_call or None  # 0: "epoch", a loop


def _batch_stream(model, params, state, x, accumulate, straight_line_steps, parallel):
    """An iterable of batches (or a function epoch -> iterable) as a source."""
    if not callable(x) and iter(x) is x:
        raise TypeError("x is a one-shot iterator; pass a list of batches or a function "
                        "epoch -> iterable of (x_batch, y_batch) so each epoch can restart")

    def configure(xb, size):
        """At the first batch: steps per straight-line program, and the label check."""
        if size % accumulate:
            raise ValueError(f"accumulate={accumulate}: each batch is split into {accumulate} "
                             f"micro-batches, but the first batch has {size} examples; give "
                             f"batches of a multiple of {accumulate}")
        scores = _data_checks.class_scores_shape(model, params, state, xb)
        return straight_line_steps(xb, size), _sources.label_check(
            None if scores is None else scores[-1], "x (batches)")

    return _sources.BatchStream(x if callable(x) else (lambda epoch: x), configure, parallel)


def _example_source(model, params, state, state_given, x):
    """``(n, read, first example, label check)`` of a random-access source."""
    n = len(x)
    if n == 0:
        raise ValueError("x (a source) has no examples: len(x) is 0")
    first = _sources.read_source(x, np.arange(1), name="x")
    check_arrays(*first, "x[0] (a source's example)", "its label")
    if not state_given:
        check_stateless(model, first[0])
    scores = _data_checks.class_scores_shape(model, params, state, first[0])
    labels = _sources.label_check(None if scores is None else scores[-1], "x (a source)")
    return n, functools.partial(_sources.read_source, x), first, labels


def _arrays(model, params, state, state_given, x, y, validation_split):
    """``(x, y, n, validation_data)`` of in-memory arrays, checked, with the last
    ``validation_split`` of them held out."""
    n = check_arrays(x, y)
    if not state_given:
        check_stateless(model, x)
    check_data(model, params, state, x, y)
    if not validation_split:
        return x, y, n, None
    n_val = int(n * validation_split)
    if n_val == 0 or n_val == n:
        raise ValueError(f"validation_split={validation_split} of {n} examples leaves {n_val} "
                         "for validation; choose a fraction that leaves both sides")
    held_out = (slice_examples(x, n - n_val, n), slice_examples(y, n - n_val, n))
    return slice_examples(x, 0, n - n_val), slice_examples(y, 0, n - n_val), n - n_val, held_out


def _step_batch(batch_size: int, accumulate: int, n: int) -> int:
    """Examples per optimizer step: ``batch_size * accumulate``, within the data's ``n``."""
    if accumulate == 1:
        return min(batch_size, n)
    if batch_size * accumulate > n:
        raise ValueError(f"batch_size * accumulate = {batch_size} * {accumulate} = "
                         f"{batch_size * accumulate} examples per optimizer step, more than the "
                         f"{n} training examples; lower accumulate or batch_size")
    return batch_size * accumulate


def _validation(model, params, state, validation_data, loss, penalty, metric_fns, batch_size,
                parallel):
    """``validate(params, state) -> logs`` for ``validation_data``, or None. A source
    of examples, or arrays in a memmap, is read from the host at each validation."""
    if validation_data is None:
        return None
    if _sources.is_example_source(validation_data):
        validation_data = (validation_data, None)
    if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
        raise TypeError("validation_data must be a pair (x_val, y_val) or a source of (x, y) "
                        f"examples, got {type(validation_data).__name__}")
    x_val, y_val = validation_data
    if evaluation.streamed(x_val, y_val):
        def validate_streamed(params, state):
            if parallel is not None:  # on one device, with its copy of the params
                params, state = parallel.local_copy((params, state))
            return evaluation.evaluate_streamed(
                model, params, state, x_val, y_val, loss, penalty, metric_fns,
                max(batch_size, 1000), where="validation_data")

        return validate_streamed
    n_val = check_arrays(x_val, y_val, "validation_data[0]", "validation_data[1]")
    check_data(model, params, state, x_val, y_val, "validation_data[0]", "validation_data[1]")
    val_data = jax.tree_util.tree_map(jnp.asarray, (x_val, y_val))
    validate = evaluation._evaluate_compiled(model, loss, penalty, metric_fns,
                                             min(max(batch_size, 1000), n_val))
    if parallel is not None:  # validation runs on one device, with its copy of params
        validate = parallel.on_first_device(validate)  # (in each process: the same logs)
    return lambda params, state: validate(params, state, *val_data)


def _run_epoch(runner, source, carry, epoch, epoch_key, display, first):
    """One epoch's chunks through ``runner``: ``(carry, sums)``; moves ``display``."""
    if isinstance(source, _sources.BatchStream):
        batches = source.batches_for(epoch)
        steps, chunks = source.steps_of(batches), source.chunks(epoch, epoch_key, batches)
    else:
        steps, chunks = source.steps, source.chunks(epoch, epoch_key)
    if display is None:
        return runner.run("fast", carry, chunks)

    def compiled():
        if first:
            display.note(f"compiled in {runner.compile_seconds + source.compile_seconds:.1f} s")
        display.start(epoch, steps)

    try:
        return runner.run("fast", carry, chunks, functools.partial(display.update, epoch),
                          compiled)
    finally:
        display.finish()


def _logs(sums, metric_names, carry, validate) -> dict[str, float]:
    """The epoch's logs: mean loss and metrics, ``val_`` ones, the learning rate."""
    weight = float(sums["_weight"])
    logs = {name: float(sums[name]) / weight for name in ("loss", *metric_names)}
    if validate is not None:
        logs.update({"val_" + k: v for k, v in validate(carry[0], carry[1]).items()})
    rate = learning_rate(carry[2])
    if rate is not None:
        logs["learning_rate"] = rate
    return logs


def _nonfinite(result, callbacks, on_nonfinite, code, epoch, epochs, step, steps):
    """Raise :class:`NonFiniteError` (or warn and return ``result``) for a NaN/inf."""
    what = NONFINITE_WHAT[code]
    holder = "the returned result" if on_nonfinite == "warn" else "error.result"
    if step < 0:
        where = (f"epoch {epoch + 1}/{epochs} (replayed, the epoch gave no NaN or inf: "
                 "its batches differed; the state from the epoch's start is kept)")
    else:
        of_steps = "" if steps is None else f"/{steps}"
        where = (f"epoch {epoch + 1}/{epochs}, step {step + 1}{of_steps} (batch {step} of that "
                 "epoch, counting from 0)")
    message = (
        f"fit: {what} NaN or inf at {where}; training stopped there. The params, state and "
        f"optimizer state from before that step are in {holder}. "
        "Usual causes: a learning rate too large, labels or inputs out of range, "
        "a log or a division of 0 in a custom loss")
    if on_nonfinite == "raise":
        raise NonFiniteError(message, result, epoch, step, what)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    for callback in callbacks:
        result = callback.on_train_end(result)
    return result


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
