"""jaxnn: ``jaxnn.fit`` on arrays (the dataset on the device, epochs compiled), ``jaxnn.predict``.

``steps_per_call`` (how many optimisation steps one compiled call runs) is set
per model from :data:`STEPS_PER_CALL` unless the plan's options say otherwise
(``--jaxnn-steps-per-call`` in ``throughput.py``); with ``"tune"`` each of
:data:`TUNE_CANDIDATES` is timed on a short run first and the fastest is used.

The per-model table, from the measurements in ``shared/PERF-LEADS.md`` on the
2-core machine (check again with ``--jaxnn-steps-per-call tune``):

* MLPs: the whole epoch in one ``lax.scan`` (``None``): about 2x the per-step loop.
* CNN: one step per call (``1``): convolutions inside a rolled scan ran about 16x
  slower on XLA:CPU.
* LSTM: the whole epoch (``None``): 2.4k vs 1.4k samples/s for the per-step loop.
"""

from __future__ import annotations

import time

import jax
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
STEPS_PER_CALL: dict[str, int | None] = {"mlp": None, "cnn": 4, "lstm": None}
TUNE_CANDIDATES: tuple[int | None, ...] = (None, 1, 4, 16)
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
    raise ValueError(kind)


def _fit(model, params, x, y, spec: ModelSpec, epochs: int, steps_per_call, key):
    import jaxnn

    return jaxnn.fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                     optimizer=jaxnn.optimizers.adam(LEARNING_RATE), key=key, epochs=epochs,
                     batch_size=spec.batch, metrics=(), steps_per_call=steps_per_call,
                     verbose=0)


def tune(model, params, x, y, spec: ModelSpec, key) -> tuple[int | None, dict[str, float]]:
    """The fastest ``steps_per_call`` on a :data:`TUNE_STEPS`-step epoch (second epoch timed)."""
    n = min(len(x), TUNE_STEPS * spec.batch)
    timings = {}
    for k in TUNE_CANDIDATES:
        result = _fit(model, params, x[:n], y[:n], spec, 2, k, key)
        timings[str(k)] = result.history["seconds"][-1]
    best = min(timings, key=timings.get)
    return (None if best == "None" else int(best)), timings


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    import jaxnn

    x = model_inputs(spec.kind, data.x_train[:plan.samples])
    y = data.y_train[:plan.samples]
    model = build(spec.kind)
    init_key, fit_key = jax.random.split(jax.random.key(plan.seed))
    params = model.init(init_key, x[:1])
    notes = []

    choice = plan.options.get("steps_per_call", "table")
    if choice == "table":
        steps_per_call = STEPS_PER_CALL[spec.kind]
    elif choice == "tune":
        steps_per_call, timings = tune(model, params, x, y, spec, fit_key)
        notes.append(f"tuned steps_per_call on {TUNE_STEPS}-step epochs: "
                     + ", ".join(f"{k}: {v:.3f}s" for k, v in timings.items()))
    else:
        steps_per_call = None if choice in (None, "epoch", "None") else int(choice)
    notes.append(f"steps_per_call={steps_per_call} ({choice})")

    start = time.perf_counter()
    result = _fit(model, params, x, y, spec, plan.epochs, steps_per_call, fit_key)
    wall = time.perf_counter() - start

    # On the device once, as the plain-JAX peer does (PyTorch's tensors are in memory too).
    x_test = jax.device_put(model_inputs(spec.kind, data.x_test[:plan.infer_samples]))

    def infer():
        jax.block_until_ready(jaxnn.predict(model, result.params, x_test,
                                            batch_size=plan.infer_batch))

    first, seconds = time_passes(infer, plan.infer_repeats)
    return Measurement(
        epoch_seconds=[float(s) for s in result.history["seconds"]],
        # fit keeps the ragged last batch (padded, zero weight): every sample is trained on
        samples_per_epoch=len(x), wall_seconds=wall, infer_seconds=seconds,
        infer_first_seconds=first, infer_samples=len(x_test),
        compile_seconds=float(result.compile_seconds), notes=notes,
    )

