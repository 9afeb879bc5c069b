"""Keras 3: ``keras.Sequential``, ``model.compile`` + ``model.fit``, ``model.predict``.

The backend is whatever ``KERAS_BACKEND`` says when Keras is first imported;
``throughput.py`` runs this module once with ``tensorflow`` and once with
``jax``, each in its own process. Compiled with ``Adam(1e-3)`` and
``SparseCategoricalCrossentropy(from_logits=True)``, no metrics, Keras's default
``jit_compile="auto"`` (recorded). ``fit`` shuffles every epoch and keeps the
ragged last batch; a callback times each epoch.
"""

from __future__ import annotations

import os
import time

from bench_common import (
    LEARNING_RATE,
    Data,
    Measurement,
    ModelSpec,
    Plan,
    model_inputs,
    time_passes,
)


def versions() -> dict[str, str]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    backend = keras.backend.backend()
    found = {"keras": keras.__version__, "backend": backend}
    if backend == "tensorflow":
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax

        found["jax"] = jax.__version__
    return found


def setup(cores: int) -> dict:
    import keras

    info = {"backend": keras.backend.backend()}
    if info["backend"] == "tensorflow":
        import tensorflow as tf

        info["tf_intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()
        info["tf_inter_op_threads"] = tf.config.threading.get_inter_op_parallelism_threads()
    return info


def build(kind: str):
    import keras
    from keras import layers

    if kind == "mlp":
        stack = [keras.Input((784,)), layers.Dense(64, activation="relu"),
                 layers.Dense(64, activation="relu"), layers.Dense(10)]
    elif kind == "cnn":
        stack = [keras.Input((28, 28, 1)),
                 layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
                 layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
                 layers.Flatten(), layers.Dropout(0.5), layers.Dense(10)]
    elif kind == "lstm":
        stack = [keras.Input((28, 28)), layers.LSTM(128), layers.Dense(10)]
    else:
        raise ValueError(kind)
    return keras.Sequential(stack)


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    import keras

    keras.utils.set_random_seed(plan.seed)
    x = model_inputs(spec.kind, data.x_train[:plan.samples])
    y = data.y_train[:plan.samples]
    model = build(spec.kind)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(x, y, batch_size=spec.batch, epochs=plan.epochs, shuffle=True, verbose=0,
              callbacks=[timer])
    wall = time.perf_counter() - start

    x_test = model_inputs(spec.kind, data.x_test[:plan.infer_samples])
    first, infer_seconds = time_passes(
        lambda: model.predict(x_test, batch_size=plan.infer_batch, verbose=0),
        plan.infer_repeats)
    return Measurement(epoch_seconds=timer.seconds, samples_per_epoch=len(x), wall_seconds=wall,
                       infer_seconds=infer_seconds, infer_first_seconds=first,
                       infer_samples=len(x_test),
                       notes=[f"jit_compile={getattr(model, 'jit_compile', '?')}"])
