"""jaxnn: ``jaxnn.fit`` on arrays (the dataset on the device, epochs compiled), ``jaxnn.predict``.

``steps_per_call`` (how many optimisation steps one compiled call runs) is set
per model from :data:`STEPS_PER_CALL` unless the plan's options say otherwise
(``--jaxnn-steps-per-call`` in ``throughput.py``); with ``"tune"`` each of
:data:`TUNE_CANDIDATES` is timed on a short run first and the fastest is used.

The per-model table, measured on the 2-core machine (check again with
``--jaxnn-steps-per-call tune``):

* MLPs: the whole epoch in one ``lax.scan`` (``"epoch"``): about 2x the per-step loop.
* CNN: 4 straight-line steps per call (``4``): convolutions inside a rolled scan
  ran about 16x slower on XLA:CPU; 4 per call beat 1 per call by about 30%.
  Tuned again after the convolution's patch-matrix path (third session), on
  8-step epochs: 0.265 s at 4 per call, 0.308 s at 16, 0.402 s at 1, 0.417 s
  as a rolled epoch.
* LSTM: the whole epoch (``"epoch"``): 5.7k samples/s against 2.9k at 1 step per
  call and 3.1-3.7k at 4 (2026-11-28, second session).
* Transformer: the whole epoch (``"epoch"``). Under load 6-9 the steady rates were
  within the noise of each other (medians of alternating 50- and 40-step epochs:
  883 and 892 samples/s as one program an epoch, 949 and 873 at 1 step per call,
  1,012 and 781 at 4), but 4 straight-line steps compiled in 16-36 s against 8-14 s.

With more than one JAX device (``throughput.py --devices N`` forces N CPU devices
before JAX is imported) ``fit`` trains data-parallel over all of them
(``devices=jax.device_count()``): each batch (32 or 128) is split in equal parts,
so N must divide it (1, 2, 4, 8, 16 and 32 do). Forced CPU devices share the
machine's cores. Inference stays on one device.

The ``jaxnn-noguard`` column runs the same with ``fit(..., on_nonfinite="ignore")``
(``JAXNN_BENCH_ON_NONFINITE``): beside ``jaxnn`` it gives the cost of the check
for NaN/inf losses and gradients inside the compiled epoch.

The ``jaxnn-progress`` column runs the same with ``fit(..., verbose=1)``
(``JAXNN_BENCH_VERBOSE``): the progress bar, updated from inside the compiled
epoch, written to the worker's stdout, a pipe (so plain lines, no redraws); the
``jaxnn-progress-tty`` column writes it to a pseudo-terminal instead
(``JAXNN_BENCH_PROGRESS_TO=pty``, drained by a thread), so the bar is redrawn as
on a user's terminal. Beside ``jaxnn`` (verbose=0) they give the bar's cost.

The ``jaxnn-host``, ``jaxnn-memmap`` and ``jaxnn-source`` columns
(``JAXNN_BENCH_FEED``) leave the training data on the host: numpy arrays with
``fit(..., feed="host")``; the images as an ``np.memmap`` of a temporary ``.npy``
file; and :class:`ExampleSource`, a random-access source of ``(x, y)`` examples
over that memmap (``len`` and ``__getitems__``, as tfds's and grain's sources).
``fit`` streams each to the device in prefetched chunks; beside ``jaxnn`` (the
dataset on the device) they give the streamed paths' rate as a ratio.

With ``--dtype bfloat16`` (the plan's ``options["dtype"]``) training runs
``fit(..., compute_dtype=jnp.bfloat16)`` (mixed precision, float32 master
weights) and inference ``predict`` on params and inputs cast to bfloat16.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
from bench_common import (
    LEARNING_RATE,
    Data,
    Measurement,
    ModelSpec,
    Plan,
    model_inputs,
    time_passes,
)

# Measured on 2 cores (2026-11-28): the CNN is fastest at 4 straight-line steps per
# call (2,750 samples/s against 2,050 at 1), the MLP and LSTM as one program an epoch.
STEPS_PER_CALL: dict[str, int | str] = {"mlp": "epoch", "cnn": 4, "lstm": "epoch",
                                         "transformer": "epoch"}
TUNE_CANDIDATES: tuple[int | str, ...] = ("epoch", 1, 4, 16)
TUNE_STEPS = 8  # steps per tuning epoch


def versions() -> dict[str, str]:
    import jaxlib

    import jaxnn

    return {"jaxnn": jaxnn.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def setup(cores: int) -> dict:
    return {"jax_devices": [str(d) for d in jax.devices()], "device_count": jax.device_count()}


def build(kind: str):
    import jaxnn

    if kind == "mlp":
        return jaxnn.Sequential([jaxnn.Dense(64), jaxnn.relu, jaxnn.Dense(64), jaxnn.relu,
                                 jaxnn.Dense(10)])
    if kind == "cnn":
        return jaxnn.Sequential([
            jaxnn.Conv2D(32, 3), jaxnn.relu, jaxnn.MaxPool(2),
            jaxnn.Conv2D(64, 3), jaxnn.relu, jaxnn.MaxPool(2),
            jaxnn.Flatten(), jaxnn.Dropout(0.5), jaxnn.Dense(10),
        ])
    if kind == "lstm":
        return jaxnn.Sequential([jaxnn.LSTM(128), jaxnn.Dense(10)])
    if kind == "transformer":  # examples/mnist_transformer.py's model
        return jaxnn.Sequential([
            jaxnn.Dense(64), jaxnn.PositionEmbedding(28),
            jaxnn.TransformerEncoderBlock(4, 128), jaxnn.TransformerEncoderBlock(4, 128),
            jaxnn.LayerNorm(), jaxnn.GlobalAvgPool(), jaxnn.Dense(10),
        ])
    raise ValueError(kind)


def _devices() -> int | None:
    """``fit``'s ``devices``: every JAX device when there are several, else None."""
    return jax.device_count() if jax.device_count() > 1 else None


class ExampleSource:
    """A random-access source of ``(x, y)`` examples over host arrays (a memmap)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        xs, ys = self.x[indices], self.y[indices]  # one read, then one pair per example
        return list(zip(xs, ys))


@contextlib.contextmanager
def _feed(x, y):
    """``(x, y, feed)`` for ``fit`` as ``JAXNN_BENCH_FEED`` asks (see the module doc)."""
    import tempfile

    import numpy as np

    kind = os.environ.get("JAXNN_BENCH_FEED", "device")
    if kind in ("device", "host"):
        yield x, y, (None if kind == "device" else "host")
        return
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "x.npy")
        np.save(path, np.asarray(x))
        mapped = np.load(path, mmap_mode="r")
        labels = np.asarray(y)
        if kind == "memmap":
            yield mapped, labels, "host"
        else:
            yield ExampleSource(mapped, labels), None, None
        del mapped


def _fit(model, params, x, y, spec: ModelSpec, epochs: int, steps_per_call, key,
         compute_dtype=None):
    import jaxnn

    verbose = int(os.environ.get("JAXNN_BENCH_VERBOSE", "0"))
    with _progress_output(), _feed(x, y) as (x, y, feed):
        return jaxnn.fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                         optimizer=jaxnn.optimizers.adam(LEARNING_RATE), key=key,
                         epochs=epochs, batch_size=spec.batch, metrics=(),
                         steps_per_call=steps_per_call, verbose=verbose,
                         compute_dtype=compute_dtype, devices=_devices(),
                         on_nonfinite=os.environ.get("JAXNN_BENCH_ON_NONFINITE", "raise"),
                         feed=feed)


@contextlib.contextmanager
def _progress_output():
    """With ``JAXNN_BENCH_PROGRESS_TO=pty``: ``sys.stdout`` is a pseudo-terminal whose
    output a thread reads and drops (fit then redraws its bar as on a terminal)."""
    if os.environ.get("JAXNN_BENCH_PROGRESS_TO") != "pty":
        yield
        return
    import pty

    master, replica = pty.openpty()

    def drain():
        with contextlib.suppress(OSError):
            while os.read(master, 65536):
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    saved = sys.stdout
    sys.stdout = open(replica, "w", buffering=1, closefd=True)  # noqa: SIM115
    try:
        yield
    finally:
        sys.stdout.close()
        sys.stdout = saved
        reader.join(timeout=5)
        os.close(master)


def tune(model, params, x, y, spec: ModelSpec, key,
         compute_dtype=None) -> tuple[int | str, dict[str, float]]:
    """The fastest ``steps_per_call`` on a :data:`TUNE_STEPS`-step epoch (second epoch timed)."""
    n = min(len(x), TUNE_STEPS * spec.batch)
    timings = {}
    for k in TUNE_CANDIDATES:
        result = _fit(model, params, x[:n], y[:n], spec, 2, k, key, compute_dtype)
        timings[str(k)] = result.history["seconds"][-1]
    best = min(timings, key=timings.get)
    return (best if best == "epoch" else int(best)), timings


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    import jaxnn

    x = model_inputs(spec.kind, data.x_train[:plan.samples])
    y = data.y_train[:plan.samples]
    model = build(spec.kind)
    init_key, fit_key = jax.random.split(jax.random.key(plan.seed))
    params = model.init(init_key, x[:1])
    notes = []
    dtype_name = plan.options.get("dtype", "float32")
    compute_dtype = None if dtype_name == "float32" else jnp.dtype(dtype_name)
    if compute_dtype is not None:
        notes.append(f"mixed precision: fit(compute_dtype={dtype_name}), float32 params")

    choice = plan.options.get("steps_per_call", "table")
    if choice == "table":
        steps_per_call = STEPS_PER_CALL[spec.kind]
    elif choice == "tune":
        steps_per_call, timings = tune(model, params, x, y, spec, fit_key, compute_dtype)
        notes.append(f"tuned steps_per_call on {TUNE_STEPS}-step epochs: "
                     + ", ".join(f"{k}: {v:.3f}s" for k, v in timings.items()))
    else:
        steps_per_call = "epoch" if choice in (None, "epoch", "None") else int(choice)
    notes.append(f"steps_per_call={steps_per_call} ({choice})")
    if _devices() is not None:
        notes.append(f"data-parallel over {_devices()} devices (fit(devices={_devices()})): "
                     f"{spec.batch // _devices()} examples of each batch of {spec.batch} per "
                     "device; inference on one device")

    start = time.perf_counter()
    result = _fit(model, params, x, y, spec, plan.epochs, steps_per_call, fit_key,
                  compute_dtype)
    wall = time.perf_counter() - start
    from jaxnn import host_memory

    notes.append("glibc keeps freed memory (jaxnn.host_memory, set by fit)"
                 if host_memory.applied() else "allocator left at its defaults")

    # On the device once, as the plain-JAX peer does (PyTorch's tensors are in memory too).
    x_test = jax.device_put(model_inputs(spec.kind, data.x_test[:plan.infer_samples]))
    trained = result.params
    if _devices() is not None:  # replicated by fit; predict on one device, as the peers
        trained = jax.device_put(trained, jax.devices()[0])
    if compute_dtype is not None:  # inference wholly in the compute dtype, as the JAX peers
        x_test = x_test.astype(compute_dtype)
        trained = jax.tree_util.tree_map(lambda a: a.astype(compute_dtype), trained)

    def infer():
        jax.block_until_ready(jaxnn.predict(model, trained, x_test,
                                            batch_size=plan.infer_batch))

    first, seconds = time_passes(infer, plan.infer_repeats)
    return Measurement(
        epoch_seconds=[float(s) for s in result.history["seconds"]],
        # fit keeps the ragged last batch (padded, zero weight): every sample is trained on
        samples_per_epoch=len(x), wall_seconds=wall, infer_seconds=seconds,
        infer_first_seconds=first, infer_samples=len(x_test),
        compile_seconds=float(result.compile_seconds), notes=notes,
    )

