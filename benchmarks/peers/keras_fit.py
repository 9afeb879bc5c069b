"""Keras 3: ``keras.Sequential``, ``model.compile`` + ``model.fit``, ``model.predict``.

The backend is whatever ``KERAS_BACKEND`` says when Keras is first imported;
``throughput.py`` runs this module once with ``tensorflow`` and once with
``jax``, each in its own process. Compiled with ``Adam(1e-3)`` and
``SparseCategoricalCrossentropy(from_logits=True)``, no metrics, Keras's default
``jit_compile="auto"`` (recorded). ``fit`` shuffles every epoch and keeps the
ragged last batch; a callback times each epoch. The Transformer is written out
from Keras's layers (``MultiHeadAttention``, ``LayerNormalization``, ``Dense``;
pre-norm), a functional ``keras.Model``.
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
    elif kind == "transformer":
        return _transformer()
    else:
        raise ValueError(kind)
    return keras.Sequential(stack)


def _transformer():
    """Rows as tokens, written out with the functional API: Dense(64), a learned position
    table, 2 pre-norm blocks (``MultiHeadAttention(4, key_dim=16)`` and a Dense(128)
    ReLU / Dense(64) MLP, each after a ``LayerNormalization``, added back), a final
    LayerNormalization, ``GlobalAveragePooling1D`` over the tokens and Dense(10)."""
    import keras
    from keras import layers

    class AddPosition(layers.Layer):
        """``x + table``, a learned ``(tokens, features)`` table (normal, stddev 0.02)."""

        def build(self, input_shape):
            self.table = self.add_weight(shape=tuple(input_shape[1:]),
                                         initializer=keras.initializers.RandomNormal(
                                             stddev=0.02), name="table")

        def call(self, x):
            return x + self.table

    inputs = keras.Input((28, 28))
    h = AddPosition()(layers.Dense(64)(inputs))
    for _ in range(2):
        y = layers.LayerNormalization(epsilon=1e-5)(h)
        h = layers.Add()([h, layers.MultiHeadAttention(num_heads=4, key_dim=16)(y, y)])
        y = layers.LayerNormalization(epsilon=1e-5)(h)
        y = layers.Dense(64)(layers.Dense(128, activation="relu")(y))
        h = layers.Add()([h, y])
    h = layers.GlobalAveragePooling1D()(layers.LayerNormalization(epsilon=1e-5)(h))
    return keras.Model(inputs, layers.Dense(10)(h))


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
