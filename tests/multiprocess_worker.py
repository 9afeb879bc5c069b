"""Run by tests/test_multiprocess.py: the MNIST MLP trained by ``fit`` in one
process of a multi-process run, or in the single-process reference.

    python multiprocess_worker.py MNIST_DIR OUT_DIR reference
    python multiprocess_worker.py MNIST_DIR OUT_DIR PROCESS_ID PROCESSES PORT

The reference needs 4 devices in its process; each process of the run 4 /
PROCESSES (``XLA_FLAGS=--xla_force_host_platform_device_count=N``). Every run
trains on the same random-access source of the first TRAIN MNIST examples with
the same key, global batch and validation data, and writes ``OUT_DIR/NAME.npz``
(the params, keyed by path; the rows the source was asked for, in order) and
``OUT_DIR/NAME.json`` (the history, what it saw), NAME being ``reference`` or
``process_<i>``; its callbacks write under ``OUT_DIR/NAME/``. An error is printed
and ends the process at once (``os._exit``): a process that raised would leave the
others waiting in a collective until their timeout.
"""

import json
import os
import pathlib
import sys
import traceback

TRAIN, VALIDATION, BATCH, EPOCHS = 1024, 256, 32, 2  # 32 steps an epoch, 64 in all


class CountedSource:
    """A random-access source of MNIST examples that records the rows it is asked for."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.reads = []  # one array of rows per __getitems__ call

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, rows):
        self.reads.append(list(rows))
        return [(self.x[i], self.y[i]) for i in rows]


def train(mnist_dir, out, name, devices, distributed_errors=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxnn

    folder = pathlib.Path(mnist_dir)
    images = jaxnn.datasets.read_idx(folder / "train-images-idx3-ubyte.gz")[:TRAIN]
    labels = jaxnn.datasets.read_idx(folder / "train-labels-idx1-ubyte.gz")[:TRAIN]
    test_images = jaxnn.datasets.read_idx(folder / "t10k-images-idx3-ubyte.gz")[:VALIDATION]
    test_labels = jaxnn.datasets.read_idx(folder / "t10k-labels-idx1-ubyte.gz")[:VALIDATION]

    def prepare(a):
        return (a.reshape(len(a), -1) / np.float32(255)).astype(np.float32)

    source = CountedSource(prepare(images), labels.astype(np.int32))
    validation = (prepare(test_images), test_labels.astype(np.int32))
    model = jaxnn.Sequential([jaxnn.Dense(64), jaxnn.relu, jaxnn.Dense(64), jaxnn.relu,
                              jaxnn.Dense(10)])
    # Glorot-uniform kernels and zero biases of init's shapes, drawn in numpy: the same
    # in every process, and no initializer to compile (each shape of jax.random is a
    # program of its own).
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape) * np.sqrt(6 / sum(s.shape))
                              if len(s.shape) == 2 else np.zeros(s.shape), s.dtype),
        jax.eval_shape(model.init, jax.random.key(0), source.x[:1]))
    errors = {} if distributed_errors is None else distributed_errors(model, params, source)
    callbacks = [jaxnn.callbacks.CSVLogger(out / name / "log.csv"),
                 jaxnn.callbacks.ModelCheckpoint(out / name / "checkpoints")]
    result = jaxnn.fit(model, params, source, loss="sparse_softmax_cross_entropy",
                       optimizer=optax.adam(1e-3), key=jax.random.key(1), epochs=EPOCHS,
                       batch_size=BATCH, validation_data=validation, devices=devices,
                       callbacks=callbacks, verbose=2)
    paths = jax.tree_util.tree_flatten_with_path(result.params)[0]
    arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in paths}
    rows = np.concatenate([np.asarray(r, np.int64) for r in source.reads[1:]])
    np.savez(out / f"{name}.npz", rows=rows, **{f"param {k}": v for k, v in arrays.items()})
    report = {
        "history": result.history,
        "first_read": source.reads[0],  # fit's look at the first example, before training
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "params_fully_replicated": all(leaf.sharding.is_fully_replicated
                                       for leaf in jax.tree_util.tree_leaves(result.params)),
        "params_on_devices": sorted({d.id for leaf in jax.tree_util.tree_leaves(result.params)
                                     for d in leaf.sharding.device_set}),
        "errors": errors,
    }
    (out / f"{name}.json").write_text(json.dumps(report))


def distributed_errors(model, params, source):
    """fit's errors for what a multi-process run refuses (each raised before any
    collective, so every process raises it alike)."""
    import jax
    import optax

    import jaxnn
    from jaxnn._sharding import data_parallel

    mine = jax.local_devices()
    theirs = [d for d in jax.devices() if d.process_index != jax.process_index()]
    errors = {}
    for what, data, devices in [("devices=None", (source,), None),
                                ("devices=2", (source,), 2),
                                ("local devices", (source,), mine),
                                ("interleaved", (source,), [mine[0], theirs[0], mine[1],
                                                            theirs[1]]),
                                ("batches", ([(source.x[:BATCH], source.y[:BATCH])],), "all")]:
        try:
            jaxnn.fit(model, params, *data, loss="sparse_softmax_cross_entropy",
                      optimizer=optax.sgd(0.1), key=jax.random.key(1), devices=devices,
                      verbose=0)
        except ValueError as error:
            errors[what] = str(error)
    # the other process's devices first: this process holds the second half of each batch
    parallel = data_parallel([*theirs, *mine])
    columns = parallel.columns(BATCH)
    errors["columns, other process first"] = [columns.start, columns.stop]
    return errors


def main(argv):
    mnist_dir, out = argv[0], pathlib.Path(argv[1])
    if argv[2] == "reference":
        train(mnist_dir, out, "reference", devices=4)
        return
    process_id, processes, port = (int(a) for a in argv[2:5])
    import jax

    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=processes, process_id=process_id,
                               initialization_timeout=60, heartbeat_timeout_seconds=10,
                               shutdown_timeout_seconds=10)
    train(mnist_dir, out, f"process_{process_id}", devices="all",
          distributed_errors=distributed_errors)
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - any error ends this process at once
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
