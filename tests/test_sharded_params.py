"""fit(devices=N, shard_params=...): params and optimizer state split over the devices.

The runs over several devices happen in a subprocess with 8 forced CPU devices
(tests/sharded_params_worker.py), which prints its findings as JSON: the bytes
each device holds, the differences to the replicated run, and checkpoints moved
between 8 sharded devices and one. The rules (which dimension each leaf is split
along) and the argument checks need no second device and run here.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxnn
from jaxnn._param_sharding import (
    check_shard_params,
    default_spec,
    mirrored_specs,
    param_specs,
    path_name,
)

WORKER = pathlib.Path(__file__).with_name("sharded_params_worker.py")

# float64: sharded and replicated runs differ only in the order of float additions
# (the gradient reduce-scattered rather than all-reduced). Measured: 2.2e-16.
TOLERANCE = 1e-10


def _forced_devices_env(count, distributed=False):
    env = dict(os.environ)
    if distributed:  # the coordinator is on localhost; no shared compilation cache
        env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")
               and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def worker_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


# The worker: 25 s of CPU with a cold compilation cache (its 11 trainings, 2 refusals).
@pytest.fixture(scope="module")
def report(worker_folder):
    done = subprocess.run([sys.executable, str(WORKER), str(worker_folder)],
                          env=_forced_devices_env(8), capture_output=True, text=True,
                          timeout=600, cwd=WORKER.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_each_of_4_devices_holds_a_quarter_of_params_and_optimizer_state(report):
    held = report["bytes"]
    total = held["total"]  # params, Adam's mu and nu (float64), its step count (int32)
    assert held["whole_leaves"] == ["()"]  # only the step count is whole on each device
    assert held["whole_on_each"] == 4
    assert held["replicated"] == {str(d): total for d in range(4)}
    assert held["sharded"] == {str(d): (total - 4) // 4 + 4 for d in range(4)}
    assert held["state_replicated"]  # BatchNorm's statistics


@pytest.mark.slow
def test_sharded_training_equals_replicated_training(report):
    assert report["replicated_to_single"] < TOLERANCE
    for name, run in report["runs"].items():
        assert run["to_replicated"] < TOLERANCE, (name, run)
        assert run["to_single"] < TOLERANCE, (name, run)
        assert run["history_to_replicated"] < TOLERANCE, (name, run)
        assert run["devices"] == [0, 1, 2, 3], (name, run)
    # Leaves in order: batchnorm_0 offset, scale; dense_0 bias, kernel (8, 16); dense_1
    # bias (4,), kernel (16, 4). By default each along its largest dimension.
    default = ["P('data',)"] * 3 + ["P(None, 'data')"] + ["P('data',)"] * 2
    assert report["runs"]["shard_params=True"]["params_specs"] == default
    # Adam's state: the count, then mu and nu mirroring the params
    assert report["runs"]["shard_params=True"]["opt_specs"] == ["P()", *default, *default]
    # a NaN found by replaying the epoch with the sharded carry: the params before it
    assert report["nonfinite"] == {"step": 5, "specs": default, "finite": True}
    table = ["P()", "P()", "P('data',)", "P('data',)", "P('data',)", "P('data',)"]
    run = report["runs"]["table,steps_per_call=2,feed=device"]
    assert run["params_specs"] == table
    assert run["opt_specs"] == ["P()", *table, *table]


@pytest.mark.slow
def test_shard_params_errors_over_several_devices(report):
    errors = report["errors"]
    assert "'dense_1/bias'" in errors["indivisible"]
    assert "(4,)" in errors["indivisible"] and "8 devices" in errors["indivisible"]
    assert "'dense_9/*' match no parameter" in errors["unmatched"]
    assert "'dense_0/kernel'" in errors["unmatched"]


@pytest.mark.slow
def test_checkpoint_from_8_sharded_devices_continues_on_one(report):
    run = report["to_one"]
    assert run["epoch"] == 2
    # saved from sharded arrays (the last bias (4,) and the counts whole on each device)
    assert "P(None, 'data')" in run["saved_specs"] and "P()" in run["saved_specs"]
    assert run["restored_devices"] == [0]
    assert run["restored_same_bits"]  # the 8-device run's final values, gathered
    assert run["continued_same_bits"] and run["history_same"]
    assert run["continued_diff"] == 0.0
    assert run["moved"] > 1e-3  # the continuation trained
    assert run["eight_vs_one_after_2"] < TOLERANCE


@pytest.mark.slow
def test_checkpoint_from_one_device_continues_on_8_sharded(report):
    run = report["to_eight"]
    assert run["epoch"] == 2
    assert run["restored_same_bits"]
    # fit put each device its part of each saved array, bit for bit
    assert run["shards_match_saved"]
    assert run["placed_specs"] == run["result_specs"]
    assert "P(None, 'data')" in run["placed_specs"]
    assert [2] in run["shard_rows"] and [8, 2] in run["shard_rows"]  # (16,), (8, 16) in 8
    assert run["continued_same_bits"] and run["history_same"]
    assert run["continued_diff"] == 0.0
    assert run["moved"] > 1e-3
    assert run["eight_vs_one_continued"] < TOLERANCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 2 processes at once: 16 s of CPU
def test_two_processes_shard_as_one_process_over_4_devices(tmp_path, x64, report,
                                                          worker_folder):
    # The reference: the worker's run sharded over 4 of its 8 devices, in one process.
    port = str(_free_port())
    runs = {f"process_{i}": ([str(i), port], 2) for i in range(2)}
    started = {name: subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), *args],
        env=_forced_devices_env(count, distributed=True), cwd=WORKER.parent,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for name, (args, count) in runs.items()}
    deadline = time.monotonic() + 300
    outputs = {}
    for name, process in started.items():
        try:
            outputs[name] = process.communicate(timeout=max(1, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            for other in started.values():
                if other.poll() is None:
                    os.killpg(other.pid, 9)
            raise
        assert process.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    carries = {name: np.load(tmp_path / f"{name}.npz") for name in runs}
    reports["reference"] = json.loads((worker_folder / "reference.json").read_text())
    carries["reference"] = np.load(worker_folder / "reference.npz")
    total = reports["reference"]["total"]
    assert reports["reference"]["bytes"] == {str(d): (total - 4) // 4 + 4 for d in range(4)}
    for i in range(2):
        report = reports[f"process_{i}"]
        assert report["split_between_processes"]
        assert report["specs"] == reports["reference"]["specs"]
        # each process's 2 devices hold their quarters, as the 4 devices of one process
        assert list(report["bytes"].values()) == [(total - 4) // 4 + 4] * 2
        assert report["history"] == reports["process_0"]["history"]
        for name in carries["reference"].files:
            assert carries[f"process_{i}"][name].tobytes() == carries["process_0"][name].tobytes()
            np.testing.assert_allclose(carries[f"process_{i}"][name],
                                       carries["reference"][name], rtol=0, atol=TOLERANCE)

    # process 0 wrote the checkpoints, gathered from both processes: the final carry,
    # bit for bit; process 1 wrote none
    assert [p.name for p in (tmp_path / "process_1").iterdir()] == []
    saved = jaxnn.checkpoint.read_manifest(tmp_path / "process_0" / "ckpt_0002.npz")
    assert saved["epoch"] == 2
    with np.load(tmp_path / "process_0" / "ckpt_0002.npz") as archive:
        names = [n for section in ("params", "state", "opt_state")
                 for n in saved["sections"][section]]
        # the carry's leaves in order: params, state, opt_state, each by sorted path
        stored = [archive[name] for name in names]
    whole = [carries["process_0"][str(i)] for i in range(len(carries["process_0"].files))]
    assert len(stored) == len(whole)
    for name, a, b in zip(names, stored, whole):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


# -- the rules, on one device ---------------------------------------------------------


def test_default_spec_takes_the_largest_divisible_dimension():
    assert default_spec((784, 64), 4) == P("data")
    assert default_spec((64, 784), 4) == P(None, "data")
    assert default_spec((30, 64), 4) == P(None, "data")  # 30 is not divisible by 4
    assert default_spec((3, 3, 16, 32), 8) == P(None, None, None, "data")
    assert default_spec((16, 16), 4) == P("data")  # the first of equal lengths
    assert default_spec((10,), 4) == P()
    assert default_spec((), 4) == P()
    assert default_spec((2,), 4) == P()


def _params():
    return {"dense_0": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
            "dense_1": {"kernel": jnp.zeros((16, 3)), "bias": jnp.zeros(3)}}


def test_table_overrides_by_path_first_match_wins():
    specs = param_specs(_params(), {"dense_1/*": P(), "*kernel": P("data", None)}, 4)
    assert specs == {"dense_0": {"kernel": P("data", None), "bias": P("data")},
                     "dense_1": {"kernel": P(), "bias": P()}}


@pytest.mark.parametrize("optimizer", [
    optax.adam(1e-3),
    optax.sgd(0.1, momentum=0.9),
    optax.adamw(1e-3),
    optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    optax.masked(optax.adam(1e-3), {"dense_0": {"kernel": True, "bias": False},
                                    "dense_1": {"kernel": True, "bias": False}}),
])
def test_optimizer_state_mirrors_the_params_and_replicates_the_rest(optimizer):
    params = _params()
    opt_state = optimizer.init(params)
    opt_specs = mirrored_specs(opt_state, params, param_specs(params, {}, 4))
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    specs = jax.tree_util.tree_leaves(opt_specs, is_leaf=lambda s: isinstance(s, P))
    assert len(leaves) == len(specs)
    expected = {"dense_0/kernel": P(None, "data"), "dense_0/bias": P("data"),
                "dense_1/kernel": P("data"), "dense_1/bias": P()}  # bias (3,): whole
    mirrored = 0
    for (path, leaf), spec in zip(leaves, specs):
        name = path_name(path)
        param = next((p for p in expected if name.endswith(p)), None)
        if param is None:  # counts, injected hyperparameters
            assert np.shape(leaf) == () and spec == P(), name
        else:
            assert spec == expected[param], name
            mirrored += 1
    assert mirrored >= 2  # at least one trace of the two kernels


def test_shard_params_is_checked():
    assert check_shard_params(False) is None
    assert check_shard_params(None) is None
    assert check_shard_params(True) == {}
    with pytest.raises(TypeError, match="shard_params must be True, False or a dict"):
        check_shard_params("fsdp")
    with pytest.raises(TypeError, match="PartitionSpec"):
        check_shard_params({"*": ("data",)})
    with pytest.raises(TypeError, match="must be a string"):
        check_shard_params({0: P()})
    with pytest.raises(ValueError, match="'model'"):
        check_shard_params({"*": P("model")})
    with pytest.raises(ValueError, match="has 2 entries but parameter 'dense_0/bias'"):
        param_specs(_params(), {"dense_0/bias": P(None, "data")}, 4)


def _tiny_fit(**kwargs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=24).astype(np.int32)
    model = jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dense(3)])
    # init's shapes, values drawn in numpy (init would compile its initializers)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape),
                                                          s.dtype),
                                    jax.eval_shape(model.init, jax.random.key(0), x))
    return jaxnn.fit(model, params, x, y, loss="sparse_softmax_cross_entropy",
                     optimizer=optax.adam(1e-2), key=jax.random.key(1), batch_size=8,
                     verbose=0, **kwargs)


def test_on_one_device_shard_params_changes_nothing():
    plain = _tiny_fit()
    sharded = _tiny_fit(devices=1, shard_params={"*/kernel": P("data", None)})
    for a, b in zip(jax.tree_util.tree_leaves((plain.params, plain.opt_state)),
                    jax.tree_util.tree_leaves((sharded.params, sharded.opt_state))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        assert len(b.sharding.device_set) == 1
    with pytest.raises(ValueError, match="'dense_9/kernel' match no parameter"):
        _tiny_fit(shard_params={"dense_9/kernel": P()})
