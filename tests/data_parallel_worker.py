"""Run by tests/test_data_parallel.py in a subprocess with 4 forced CPU devices.

Trains one small model (Dense, BatchNorm, Dropout) in float64 with ``fit`` on
one device and over several, and prints one JSON object: the largest
differences to the single-device run, where the results live, the per-device
shape of the batch inside the step, and whether the dataset was ever on a
device (over several devices fit streams each device its part of each batch
from the host; with feed="device" every device holds a copy).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/data_parallel_worker.py
"""

import json

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnn  # noqa: E402
from jaxnn import _sources  # noqa: E402
from jaxnn.training import fit  # noqa: E402

BATCH = 8
N = 42  # 5 full batches of 8 and a ragged one of 2 (padded with zero-weight rows);
# 6 steps: steps_per_call=2 runs 3 calls of one program


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5))
    y = np.argmax(x @ rng.normal(size=(5, 3)), axis=-1).astype(np.int32)
    return x, y


def main():
    assert jax.device_count() == 4, jax.devices()
    x, y = data()
    # BatchNorm after tanh: a bias just before it would get a zero gradient, which
    # Adam turns from round-off noise into steps (no test of sharding then).
    model = jaxnn.Sequential([jaxnn.Dense(16), jnp.tanh, jaxnn.BatchNorm(),
                              jaxnn.Dropout(0.3), jaxnn.Dense(3)])
    params, state = model.init_with_state(jax.random.key(0), x[:1])

    batch_rows = []  # rows of the batch one device holds, as seen inside the step

    def loss(predictions, targets, weights):
        jax.debug.inspect_array_sharding(
            predictions,
            callback=lambda s: batch_rows.append(s.shard_shape(predictions.shape)[0]))
        return jaxnn.losses.sparse_softmax_cross_entropy(predictions, targets, weights=weights)

    dataset_seen = []  # whether an array shaped like x was alive on a device

    def look():
        dataset_seen.append(any(a.shape == x.shape for a in jax.live_arrays()))

    class Look(jaxnn.callbacks.Callback):
        def on_epoch_end(self, info):
            look()

    take_rows = _sources.take_rows

    def reading(*args):  # while training: fit's feeding thread reads the next chunk
        look()
        return take_rows(*args)

    _sources.take_rows = reading

    def run(**kwargs):
        batch_rows.clear()
        dataset_seen.clear()
        result = fit(model, params, x, y, state=state, loss=loss, optimizer=optax.adam(1e-2),
                     key=jax.random.key(1), epochs=2, batch_size=BATCH, verbose=0,
                     validation_data=(x[:20], y[:20]), callbacks=[Look()], **kwargs)
        return result, sorted(set(batch_rows))

    reference, reference_rows = run()
    runs = {
        "devices=4": {"devices": 4},
        "devices=4,feed=device": {"devices": 4, "feed": "device"},
        "devices=2,steps_per_call=2": {"devices": 2, "steps_per_call": 2},
        "devices=[3,1]": {"devices": [jax.devices()[3], jax.devices()[1]]},
    }
    report = {"reference_batch_rows": reference_rows}
    for name, kwargs in runs.items():
        result, rows = run(**kwargs)
        trained = (result.params, result.state, result.opt_state)
        expected = (reference.params, reference.state, reference.opt_state)
        leaves = jax.tree_util.tree_leaves(trained)
        report[name] = {
            "max_param_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                  for a, b in zip(leaves, jax.tree_util.tree_leaves(expected))),
            "max_history_diff": max(abs(a - b) for key in reference.history if key != "seconds"
                                    for a, b in zip(result.history[key],
                                                    reference.history[key])),
            "history_keys": sorted(result.history),
            "dtypes": sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(
                result.params)}),
            "device_sets": sorted({tuple(sorted(d.id for d in leaf.sharding.device_set))
                                   for leaf in leaves}),
            "fully_replicated": all(leaf.sharding.is_fully_replicated for leaf in leaves),
            "batch_rows": rows,
            "dataset_on_a_device": any(dataset_seen),
            "looks": len(dataset_seen),
        }
    errors = {}
    for name, kwargs in {
        "batch_size=6": {"x": x, "y": y, "batch_size": 6},
        "batch_size=64": {"x": x, "y": y, "batch_size": 64},  # capped at the 42 examples
        "batches of 6": {"x": [(x[:6], y[:6])], "y": None},
    }.items():
        try:
            fit(model, params, state=state, loss=loss, optimizer=optax.adam(1e-2),
                key=jax.random.key(1), verbose=0, devices=4, **kwargs)
        except ValueError as error:
            errors[name] = str(error)
    report["errors"] = errors
    # The caller's arrays stay usable (fit donates only its own copies).
    report["inputs_alive"] = not any(leaf.is_deleted()
                                     for leaf in jax.tree_util.tree_leaves((params, state)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
