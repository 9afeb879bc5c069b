"""Run by tests/test_sharded_params.py in a subprocess with 8 forced CPU devices.

Trains one small model (Dense, BatchNorm, Dropout, Adam) in float64 and prints
one JSON object:

- ``"bytes"``, ``"runs"``: over 4 devices, the bytes of params and optimizer
  state each device holds (from the arrays' shards) with ``shard_params`` and
  without, and each run's largest difference to the replicated run and to one
  device;
- ``"to_one"``: a checkpoint saved by ``ModelCheckpoint`` from 8 devices with
  sharded state, restored on one device: whether the restored arrays are the
  8-device run's final values bit for bit, and whether the next epoch from them
  on one device is bit for bit the next epoch from those values in memory;
- ``"to_eight"``: the reverse, saved from one device, restored on 8 with
  sharded state: each device's shard checked against the saved values (as fit
  placed them, before the first step), and the next epoch from the checkpoint
  against the next epoch from the values in memory, both on 8 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_params_worker.py DIR

The 8-device run also writes ``DIR/reference.npz`` and ``DIR/reference.json``: its
two epochs sharded over 4 devices, the reference of the two processes below.

Or, with ``PROCESS_ID PORT`` (2 devices; two processes after
``jax.distributed.initialize``), two epochs sharded over the 4 devices of both with a
ModelCheckpoint into ``DIR/NAME`` (see :func:`over_processes`).
"""

import functools
import json
import os
import pathlib
import sys
import traceback

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnn  # noqa: E402
from jaxnn.callbacks import Callback, ModelCheckpoint  # noqa: E402

BATCH = 8
N = 42  # 5 full batches and a ragged one of 2 (padded with zero-weight rows)
EPOCHS = 2  # trained before the checkpoint; the continuations run epoch 3

x_rng = np.random.default_rng(0)
X = x_rng.normal(size=(N, 8))
Y = np.argmax(X @ x_rng.normal(size=(8, 4)), axis=-1).astype(np.int32)
# Every dimension divisible by 4, so over 4 devices only Adam's step count stays
# whole; over 8 the last bias (4,) is replicated too.
MODEL = jaxnn.Sequential([jaxnn.Dense(16), jnp.tanh, jaxnn.BatchNorm(), jaxnn.Dropout(0.3),
                          jaxnn.Dense(4)])
OPTIMIZER = optax.adam(1e-2)


@functools.cache
def initial():
    """The initial ``(params, state)`` (made on first use: a process of a distributed
    run may touch its devices only after ``jax.distributed.initialize``): params of
    init's shapes drawn in numpy (init compiles a program per initializer and shape),
    BatchNorm's statistics as init makes them (mean 0, variance 1)."""
    params, state = jax.eval_shape(MODEL.init_with_state, jax.random.key(0), X[:1])
    rng = np.random.default_rng(0)
    return (jax.tree_util.tree_map(
                lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), params),
            jax.tree_util.tree_map_with_path(
                lambda path, s: jnp.full(s.shape, path[-1].key == "var", s.dtype), state))


def fit(**kwargs):
    params, state = initial()
    kwargs = {"params": params, "state": state, "epochs": EPOCHS, "key": jax.random.key(1),
              **kwargs}
    return jaxnn.fit(MODEL, kwargs.pop("params"), X, Y, loss="sparse_softmax_cross_entropy",
                     optimizer=OPTIMIZER, batch_size=BATCH, verbose=0,
                     validation_data=(X[:20], Y[:20]), **kwargs)


def carry(result):
    return result.params, result.state, result.opt_state


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def history_diff(a, b) -> float:
    return max(abs(u - v) for name in a.history if name != "seconds"
               for u, v in zip(a.history[name], b.history[name]))


def same_bits(a, b) -> bool:
    """Whether two trees hold the same arrays bit for bit (shapes, dtypes, bytes)."""
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(a) == len(b) and all(
        np.asarray(u).dtype == np.asarray(v).dtype and np.shape(u) == np.shape(v)
        and np.asarray(u).tobytes() == np.asarray(v).tobytes() for u, v in zip(a, b))


def gathered(tree):
    """Host copies (numpy) of every leaf: a sharded array is gathered."""
    return jax.tree_util.tree_map(np.asarray, tree)


def bytes_per_device(tree) -> dict[int, int]:
    per: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per[shard.device.id] = per.get(shard.device.id, 0) + shard.data.nbytes
    return per


def specs(tree):
    return [str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(tree)]


def four_devices(report, folder: pathlib.Path):
    """Returns the one-device run (checkpointed into ``folder/from1``)."""
    single = fit(callbacks=[ModelCheckpoint(folder / "from1", max_to_keep=None)])
    replicated = fit(devices=4)
    sharded = fit(devices=4, shard_params=True)
    table = {"dense_0/kernel": P("data", None), "batchnorm_0/*": P()}
    runs = {
        "shard_params=True": sharded,
        # a table, and several steps per compiled call fed from the device
        "table,steps_per_call=2,feed=device": fit(devices=4, shard_params=table,
                                                  steps_per_call=2, feed="device"),
    }
    write_carry(folder, "reference", sharded)
    state_bytes = {
        name: {str(k): v for k, v in sorted(bytes_per_device((r.params, r.opt_state)).items())}
        for name, r in (("replicated", replicated), ("sharded", sharded))}
    leaves = jax.tree_util.tree_leaves((sharded.params, sharded.opt_state))
    report["bytes"] = {
        **state_bytes,
        "total": sum(leaf.nbytes for leaf in leaves),
        "whole_on_each": sum(leaf.nbytes for leaf in leaves if leaf.sharding.is_fully_replicated),
        "whole_leaves": [str(leaf.shape) for leaf in leaves if leaf.sharding.is_fully_replicated],
        "state_replicated": all(leaf.sharding.is_fully_replicated
                                for leaf in jax.tree_util.tree_leaves(sharded.state)),
    }
    report["runs"] = {name: {
        "to_replicated": max_diff(carry(r), carry(replicated)),
        "to_single": max_diff(carry(r), carry(single)),
        "history_to_replicated": history_diff(r, replicated),
        "params_specs": specs(r.params),
        "opt_specs": specs(r.opt_state),
        "devices": sorted({d.id for leaf in jax.tree_util.tree_leaves(carry(r))
                           for d in leaf.sharding.device_set}),
    } for name, r in runs.items()}
    report["replicated_to_single"] = max_diff(carry(replicated), carry(single))
    errors = {}
    for name, table in {"indivisible": {"dense_1/bias": P("data")},
                        "unmatched": {"dense_9/*": P()}}.items():
        try:
            fit(devices=8, shard_params=table)
        except ValueError as error:
            errors[name] = str(error)
    report["errors"] = errors

    def nan_at_the_short_batch(predictions, targets, weights):  # the last step's (2 rows)
        loss = jaxnn.losses.sparse_softmax_cross_entropy(predictions, targets, weights=weights)
        return loss * jnp.where(jnp.sum(weights) < BATCH, jnp.nan, 1.0)

    params, state = initial()
    try:
        jaxnn.fit(MODEL, params, X, Y, state=state, loss=nan_at_the_short_batch,
                  optimizer=OPTIMIZER, key=jax.random.key(1), batch_size=BATCH, verbose=0,
                  devices=4, shard_params=True)
    except jaxnn.NonFiniteError as error:  # found by the halting replay, sharded too
        report["nonfinite"] = {"step": error.step, "specs": specs(error.result.params),
                               "finite": bool(jaxnn.training.all_finite(error.result.params))}
    return single


class Placed(Callback):
    """Keeps each device's shard of the carry fit starts from, copied to the host."""

    def on_train_begin(self, info):
        self.shards = [
            (str(leaf.sharding.spec), leaf.shape,
             [(shard.index, np.array(shard.data)) for shard in leaf.addressable_shards])
            for leaf in jax.tree_util.tree_leaves((info.params, info.state, info.opt_state))]


def shards_match(placed, saved) -> bool:
    """Whether every device's shard is its part of the saved arrays, bit for bit."""
    leaves = jax.tree_util.tree_leaves(saved)
    return len(placed.shards) == len(leaves) and all(
        shape == whole.shape and len(shards) == 8 and all(
            data.dtype == whole.dtype and data.tobytes() == whole[index].tobytes()
            for index, data in shards)
        for (_, shape, shards), whole in zip(placed.shards, leaves))


def resume(folder):
    params, state = initial()
    ckpt = jaxnn.resume(folder, params=params, state=state, opt_state=OPTIMIZER.init(params))
    return ckpt, (ckpt.params, ckpt.state, ckpt.opt_state)


def continued(values, key, **kwargs):
    params, state, opt_state = values
    return fit(params=params, state=state, opt_state=opt_state, key=key,
               initial_epoch=EPOCHS, epochs=EPOCHS + 1, **kwargs)


def checkpoints(report, folder: pathlib.Path, single):
    """``single``: the one-device run, checkpointed into ``folder/from1``."""
    # 8 devices, sharded -> one device
    trained = fit(devices=8, shard_params=True,
                  callbacks=[ModelCheckpoint(folder / "from8", max_to_keep=None)])
    in_memory = gathered(carry(trained))
    ckpt, restored = resume(folder / "from8")
    from_ckpt = continued(restored, ckpt.key)
    from_memory = continued(in_memory, trained.key)
    report["to_one"] = {
        "saved_specs": specs(carry(trained)),
        "epoch": ckpt.epoch,
        "restored_same_bits": same_bits(restored, in_memory),
        "restored_devices": sorted({d.id for leaf in jax.tree_util.tree_leaves(restored)
                                    for d in leaf.sharding.device_set}),
        "continued_same_bits": same_bits(carry(from_ckpt), carry(from_memory)),
        "history_same": all(from_ckpt.history[k] == from_memory.history[k]
                            for k in from_ckpt.history if k != "seconds"),
        "continued_diff": max_diff(carry(from_ckpt), carry(from_memory)),
        "moved": max_diff(from_ckpt.params, in_memory[0]),
        "eight_vs_one_after_2": max_diff(in_memory, carry(single)),
    }

    # one device -> 8 devices, sharded
    trained = single
    in_memory = gathered(carry(trained))
    ckpt, restored = resume(folder / "from1")
    placed = Placed()
    from_ckpt = continued(restored, ckpt.key, devices=8, shard_params=True, callbacks=[placed])
    placed_memory = Placed()
    from_memory = continued(carry(trained), trained.key, devices=8, shard_params=True,
                            callbacks=[placed_memory])
    one_device = continued(restored, ckpt.key)
    report["to_eight"] = {
        "epoch": ckpt.epoch,
        "restored_same_bits": same_bits(restored, in_memory),
        "shards_match_saved": shards_match(placed, in_memory),
        "placed_specs": [spec for spec, _, _ in placed.shards],
        "shard_rows": sorted({tuple(data.shape) for _, _, shards in placed.shards
                              for _, data in shards}),
        "continued_same_bits": same_bits(carry(from_ckpt), carry(from_memory)),
        "history_same": all(from_ckpt.history[k] == from_memory.history[k]
                            for k in from_ckpt.history if k != "seconds"),
        "continued_diff": max_diff(carry(from_ckpt), carry(from_memory)),
        "moved": max_diff(from_ckpt.params, in_memory[0]),
        "eight_vs_one_continued": max_diff(carry(from_ckpt), carry(one_device)),
        "result_specs": specs(carry(from_ckpt)),
    }


def write_carry(out: pathlib.Path, name: str, result, whole=None):
    """Writes ``out/name.npz`` (the final carry, gathered (``whole`` when given), by leaf
    number) and ``out/name.json`` (the history, the bytes each local device holds)."""
    whole = gathered(carry(result)) if whole is None else whole
    np.savez(out / f"{name}.npz", **{str(i): np.asarray(leaf) for i, leaf in
                                     enumerate(jax.tree_util.tree_leaves(whole))})
    leaves = jax.tree_util.tree_leaves((result.params, result.opt_state))
    report = {
        "history": {k: v for k, v in result.history.items() if k != "seconds"},
        "bytes": {str(k): v for k, v in
                  sorted(bytes_per_device((result.params, result.opt_state)).items())},
        "total": sum(leaf.nbytes for leaf in leaves),
        "specs": specs(carry(result)),
        "split_between_processes": not any(leaf.is_fully_addressable for leaf in leaves
                                           if not leaf.sharding.is_fully_replicated),
    }
    (out / f"{name}.json").write_text(json.dumps(report))


def over_processes(out: pathlib.Path, name: str, devices):
    """Two epochs sharded over ``devices`` with ModelCheckpoint into ``out/name``;
    writes ``out/name.npz`` and ``out/name.json`` (:func:`write_carry`)."""
    from jax.experimental import multihost_utils

    result = fit(devices=devices, shard_params=True,
                 callbacks=[ModelCheckpoint(out / name, max_to_keep=None)])
    write_carry(out, name, result,
                whole=multihost_utils.process_allgather(carry(result), tiled=True))


def main(argv):
    out = pathlib.Path(argv[0])
    if len(argv) == 1:
        assert jax.device_count() == 8, jax.devices()
        report = {}
        single = four_devices(report, out)
        checkpoints(report, out, single)
        print(json.dumps(report))
    else:  # process PROCESS_ID of 2, 2 devices each, coordinator on localhost:PORT
        process_id, port = int(argv[1]), int(argv[2])
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                                   process_id=process_id, initialization_timeout=60,
                                   heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
        over_processes(out, f"process_{process_id}", devices="all")
        jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - any error ends this process at once (a process
        traceback.print_exc()  # that raised would leave the other waiting in a collective)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
