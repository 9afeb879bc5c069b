"""Run by tests/test_data_parallel.py in a subprocess with 2 forced CPU devices.

Trains the MNIST CNN data-parallel with ``fit(devices=2)`` (4 steps per call, the
CPU default for a convolution) for 16 epochs of 12,800 random images (400
calls) and prints ``ok`` when it finishes. Before ``fit`` waited for each call on
CPU devices, XLA aborted such runs on a 2-core machine: an all-reduce's
rendezvous timed out, one device's part of the step never ran, and 150 s of
waiting did not end it either. Measured then: 5 of 16 runs of 8 epochs and 4 of 4
runs of 16 epochs aborted.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/data_parallel_cnn_worker.py
"""

import jax
import numpy as np

import jaxnn

SAMPLES = 12_800
EPOCHS = 16


def main():
    model = jaxnn.Sequential([
        jaxnn.Conv2D(32, 3), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Conv2D(64, 3), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Flatten(), jaxnn.Dropout(0.5), jaxnn.Dense(10),
    ])
    rng = np.random.default_rng(0)
    x = rng.random((SAMPLES, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, SAMPLES).astype(np.int32)
    params = model.init(jax.random.key(0), x[:1])
    result = jaxnn.fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                       optimizer=jaxnn.optimizers.adam(1e-3), key=jax.random.key(1),
                       epochs=EPOCHS, batch_size=128, metrics=(), devices=2, verbose=0)
    assert len(result.history["loss"]) == EPOCHS
    assert all(np.isfinite(result.history["loss"]))
    print("ok")


if __name__ == "__main__":
    main()
