"""fit(devices=...): data-parallel training against single-device fit.

This process has one CPU device (XLA_FLAGS must be set before jax is imported),
so the multi-device runs happen in subprocesses: a short one on 2 forced CPU
devices (TWO_DEVICES, below), one with 4 (tests/data_parallel_worker.py, slow),
each printing its findings as JSON, and one that trains the MNIST CNN on 2
(tests/data_parallel_cnn_worker.py, slow) to check that many queued calls run to
the end. The input checks that need no second device run here.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn._sharding import data_parallel
from jaxnn.training import fit

WORKER = pathlib.Path(__file__).with_name("data_parallel_worker.py")
CNN_WORKER = pathlib.Path(__file__).with_name("data_parallel_cnn_worker.py")


def _forced_devices_env(count, *extra_flags):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}",
                                 *extra_flags])
    env["JAX_PLATFORMS"] = "cpu"
    return env


# The fast tier's check of the same property, on 2 forced CPU devices: data-parallel fit
# equals single-device fit in float64 (BatchNorm's batch statistics and dropout's masks
# included), the carry replicated on both devices, each holding half of every batch; and
# a batch size the devices do not divide is refused. Params and state are drawn in numpy
# (initialisation would compile a program of its own).
TWO_DEVICES = """
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax, jaxnn

rng = np.random.default_rng(0)
x = rng.normal(size=(42, 5))  # 5 batches of 8 and a ragged one of 2
y = np.argmax(x @ rng.normal(size=(5, 3)), axis=-1).astype(np.int32)
model = jaxnn.Sequential([jaxnn.Dense(16), jnp.tanh, jaxnn.BatchNorm(), jaxnn.Dropout(0.3),
                          jaxnn.Dense(3)])
shapes = jax.eval_shape(model.init_with_state, jax.random.key(0), x[:1])
params = jax.tree_util.tree_map(lambda s: 0.5 * rng.normal(size=s.shape), shapes[0])
state = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), shapes[1])
rows = []  # rows of the batch one device holds, as seen inside the step


def loss(predictions, targets, weights):
    jax.debug.inspect_array_sharding(
        predictions, callback=lambda s: rows.append(s.shard_shape(predictions.shape)[0]))
    return jaxnn.losses.sparse_softmax_cross_entropy(predictions, targets, weights=weights)


kwargs = dict(state=state, loss=loss, optimizer=optax.adam(1e-2), key=jax.random.key(1),
              epochs=2, batch_size=8, verbose=0)
single = jaxnn.fit(model, params, x, y, **kwargs)
report = {"single_rows": sorted(set(rows))}
rows.clear()
split = jaxnn.fit(model, params, x, y, devices=2, **kwargs)
leaves = jax.tree_util.tree_leaves((split.params, split.state, split.opt_state))
expected = jax.tree_util.tree_leaves((single.params, single.state, single.opt_state))
report.update(
    rows=sorted(set(rows)),
    max_param_diff=max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                       for a, b in zip(leaves, expected)),
    max_history_diff=max(abs(a - b) for name in single.history if name != "seconds"
                         for a, b in zip(split.history[name], single.history[name])),
    history_keys=sorted(split.history),
    dtypes=sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(split.params)}),
    device_sets=sorted({tuple(sorted(d.id for d in leaf.sharding.device_set))
                        for leaf in leaves}),
    fully_replicated=all(leaf.sharding.is_fully_replicated for leaf in leaves))
try:
    jaxnn.fit(model, params, x, y, **{**kwargs, "batch_size": 7}, devices=2)
except ValueError as error:
    report["error"] = str(error)
print(json.dumps(report))
"""


def test_fit_over_2_cpu_devices_equals_single_device_fit():
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES], env=_forced_devices_env(2),
                          capture_output=True, text=True, timeout=600, cwd=WORKER.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["single_rows"] == [8] and report["rows"] == [4], report
    # float64: the same training up to the order of float additions
    assert report["max_param_diff"] < 1e-10, report
    assert report["max_history_diff"] < 1e-10, report
    assert report["history_keys"] == ["accuracy", "loss", "seconds"]
    assert report["dtypes"] == ["float64"]
    assert report["device_sets"] == [[0, 1]] and report["fully_replicated"], report
    assert "batch_size=7" in report["error"] and "2 devices" in report["error"]


# Five float64 fits over 2 and 4 devices (20 s of CPU with a cold compilation cache); the
# fast tier's test_fit_over_2_cpu_devices_equals_single_device_fit checks the same property.
@pytest.mark.slow
def test_fit_over_4_cpu_devices_equals_single_device_fit():
    env = _forced_devices_env(4)
    done = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=WORKER.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    # Inside the step, one device holds batch / devices rows (8 on one device).
    assert report["reference_batch_rows"][0] == 8
    expected_rows = {"devices=4": 2, "devices=4,feed=device": 2,
                     "devices=2,steps_per_call=2": 4, "devices=[3,1]": 4}
    expected_devices = {"devices=4": [[0, 1, 2, 3]], "devices=4,feed=device": [[0, 1, 2, 3]],
                        "devices=2,steps_per_call=2": [[0, 1]], "devices=[3,1]": [[1, 3]]}
    for name, rows in expected_rows.items():
        run = report[name]
        # float64: the same training up to the order of float additions
        assert run["max_param_diff"] < 1e-10, (name, run)
        assert run["max_history_diff"] < 1e-10, (name, run)
        assert run["history_keys"] == ["accuracy", "loss", "seconds", "val_accuracy",
                                       "val_loss"]
        assert run["dtypes"] == ["float64"]
        # params, state and optimizer state replicated on exactly the devices asked for
        assert run["device_sets"] == expected_devices[name], (name, run)
        assert run["fully_replicated"], (name, run)
        # the training batch split over the devices; validation (20 rows) on one device
        assert run["batch_rows"][0] == rows, (name, run)
        assert all(r in (rows, 20) for r in run["batch_rows"]), (name, run)
        # streamed from the host, each device receiving its part of each batch; the
        # dataset is copied to every device only when asked for (feed="device")
        assert run["dataset_on_a_device"] == (name == "devices=4,feed=device"), (name, run)
        assert run["looks"] >= 2, (name, run)
    assert report["inputs_alive"]

    errors = report["errors"]
    assert "batch_size=6" in errors["batch_size=6"] and "4 devices" in errors["batch_size=6"]
    assert "batch_size=42" in errors["batch_size=64"]
    assert "capped" in errors["batch_size=64"]
    assert "batch_size=6" in errors["batches of 6"] and "4 devices" in errors["batches of 6"]


@pytest.mark.slow
def test_cnn_over_2_cpu_devices_runs_to_the_end():
    # 400 calls of 4 steps, each with its all-reduce. XLA's own limit for a
    # collective waiting on a device that never arrives is 40 s; 10 s fails faster.
    env = _forced_devices_env(2, "--xla_cpu_collective_call_terminate_timeout_seconds=10",
                              "--xla_cpu_collective_call_warn_stuck_timeout_seconds=5")
    done = subprocess.run([sys.executable, str(CNN_WORKER)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=CNN_WORKER.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"


@functools.cache
def _problem(n=24):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    model = jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dense(3)])
    # zeros of init's shapes: the checks below raise before anything runs
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                    jax.eval_shape(model.init, jax.random.key(0), x))
    return model, params, x, y


def _fit(devices, **kwargs):
    model, params, x, y = _problem()
    return fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
               optimizer=optax.sgd(0.1), key=jax.random.key(1), batch_size=8, verbose=0,
               devices=devices, **kwargs)


def test_more_devices_than_available_says_how_to_force_cpu_devices():
    wanted = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"devices={wanted}") as info:
        _fit(wanted)
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in str(info.value)
    assert f"only {jax.device_count()} device" in str(info.value)


@pytest.mark.parametrize("devices, error, match", [
    (0, ValueError, "positive integer"),
    (-2, ValueError, "positive integer"),
    (True, TypeError, "devices must be"),
    (1.5, TypeError, "devices must be"),
    ("cpu", TypeError, "devices must be"),
    ([], ValueError, "empty sequence"),
    ([0, 1], TypeError, r"devices\[0\] must be a jax.Device"),
])
def test_devices_argument_is_checked(devices, error, match):
    with pytest.raises(error, match=match):
        _fit(devices)


def test_device_listed_twice_is_an_error():
    device = jax.devices()[0]
    with pytest.raises(ValueError, match="more than once"):
        data_parallel([device, device])


def test_one_device_takes_the_plain_single_device_path():
    assert data_parallel(None) is None
    assert data_parallel(1) is None
    assert data_parallel(np.int64(1)) is None
    assert data_parallel([jax.devices()[0]]) is None
    assert data_parallel((jax.devices()[0],)) is None

