"""Checkpoints never lose or mix up a run: one run per folder, no NaN checkpoint,
resume from a file or a folder, leftover temporary files, Ctrl-C, and saves killed
by SIGKILL at every step (tests/checkpoint_kill_worker.py)."""

import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn import checkpoint
from jaxnn.callbacks import Callback, EpochEnd, ModelCheckpoint, TrainBegin
from jaxnn.checkpoint import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    restore_checkpoint,
    resume,
    save_checkpoint,
)
from jaxnn.training import FitResult, TrainingInterrupted

WORKER_PATH = pathlib.Path(__file__).with_name("checkpoint_kill_worker.py")
_spec = importlib.util.spec_from_file_location("checkpoint_kill_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# -- a tiny model and fit -----------------------------------------------------------

MODEL = jaxnn.Sequential([jaxnn.Dense(3)])
_rng = np.random.default_rng(0)
X = _rng.normal(size=(32, 4)).astype(np.float32)
Y = _rng.integers(0, 3, size=32)


def _params_like(model, x, seed=0):
    """Random params of init's structure, shapes and dtypes, drawn in numpy (init would
    compile a program of its own)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype),
                                  jax.eval_shape(model.init, jax.random.key(0), x))


PARAMS = _params_like(MODEL, X)
OPT = optax.adam(1e-2)


def _fit(**kwargs):
    kwargs = {"loss": jaxnn.losses.sparse_softmax_cross_entropy, "optimizer": OPT,
              "batch_size": 8, "verbose": 0, "key": jax.random.key(7), **kwargs}
    params = kwargs.pop("params", PARAMS)
    return jaxnn.fit(MODEL, params, X, Y, **kwargs)


def _snapshot(value):
    """A (params, state, opt_state) with every float ``value``, as an epoch's end."""
    params = {"dense_0": {"kernel": jnp.full((4, 3), value), "bias": jnp.full(3, value)}}
    state = {"mean": jnp.full(3, value)}
    opt_state = OPT.init(params)
    return params, state, opt_state


def _epoch_end(epoch, value=None, key=None):
    """What fit hands a callback after epoch ``epoch`` (counting from 0)."""
    params, state, opt_state = _snapshot(float(epoch + 1) if value is None else value)
    return EpochEnd(epoch, {"loss": 1.0}, params, state, opt_state,
                    jax.random.key(7) if key is None else key,
                    {"loss": [1.0] * (epoch + 1)})


def _begin(initial_epoch, key=None, epochs=10):
    params, state, opt_state = _snapshot(0.0)
    return TrainBegin(initial_epoch, epochs, params, state, opt_state,
                      jax.random.key(7) if key is None else key)


def _target():
    params, state, opt_state = _snapshot(0.0)
    return {"params": params, "state": state, "opt_state": opt_state}


def _run_into(folder, epochs, key=None, max_to_keep=None):
    """Write a run's checkpoints for epochs 1..epochs through ModelCheckpoint's hooks."""
    callback = ModelCheckpoint(folder, max_to_keep=max_to_keep)
    callback.on_train_begin(_begin(0, key))
    for epoch in range(epochs):
        callback.on_epoch_end(_epoch_end(epoch, key=key))
    return callback


def _contents(folder):
    return {p.name: p.read_bytes() for p in pathlib.Path(folder).iterdir()}


# -- one run per folder --------------------------------------------------------------


def test_model_checkpoint_creates_its_folder_and_a_first_run_resumes_none(tmp_path):
    folder = tmp_path / "a" / "run"
    callback = ModelCheckpoint(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert resume(folder, params=PARAMS) is None
    callback.on_train_begin(_begin(0))  # an empty folder takes any run
    callback.on_epoch_end(_epoch_end(0))
    assert [p.name for p in list_checkpoints(folder)] == ["ckpt_0001.npz"]


def test_fit_into_another_runs_folder_is_refused_before_training(tmp_path):
    _fit(epochs=3, callbacks=[ModelCheckpoint(tmp_path, max_to_keep=5)])
    before = _contents(tmp_path)
    assert sorted(before) == ["ckpt_0001.npz", "ckpt_0002.npz", "ckpt_0003.npz"]

    class Count(Callback):
        epochs = 0

        def on_epoch_end(self, info):
            Count.epochs += 1
            return False

    # A second run from scratch, even with the same key and settings.
    with pytest.raises(CheckpointConflictError) as err:
        _fit(epochs=5, callbacks=[Count(), ModelCheckpoint(tmp_path, max_to_keep=5)])
    message = str(err.value)
    assert message.startswith(str(tmp_path))
    assert "ckpt_0001..ckpt_0003, 3 files; latest epoch 3" in message
    assert "starts at epoch 0" in message
    assert f"jaxnn.resume({str(tmp_path)!r}" in message
    assert "initial_epoch=ckpt.epoch" in message and "key=ckpt.key" in message
    assert "fresh folder" in message
    assert Count.epochs == 0  # nothing trained, nothing written
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("initial_epoch, key, why", [
    (0, jax.random.key(7), "starts at epoch 0"),
    (2, jax.random.key(7), "starts at epoch 2, not at the latest checkpoint's epoch 3"),
    (4, jax.random.key(7), "starts at epoch 4, not at the latest checkpoint's epoch 3"),
    (3, jax.random.key(8), "with a different key"),
    (3, jax.random.key(7, impl="rbg"), "with a different key"),
    (3, None, "with a different key"),
], ids=["from-scratch", "older-epoch", "later-epoch", "other-key", "other-impl", "no-key"])
def test_a_run_that_does_not_continue_the_folder_is_refused(tmp_path, initial_epoch, key, why):
    _run_into(tmp_path, 3)
    before = _contents(tmp_path)
    callback = ModelCheckpoint(tmp_path)
    with pytest.raises(CheckpointConflictError, match=re.escape(why)) as err:
        callback.on_train_begin(_begin(initial_epoch, key) if key is not None else
                                TrainBegin(initial_epoch, 10, *_snapshot(0.0), None))
    assert str(tmp_path) in str(err.value) and "ckpt_0001..ckpt_0003" in str(err.value)
    assert _contents(tmp_path) == before


def test_a_folder_saved_without_a_key_is_not_continued_by_a_run_with_one(tmp_path):
    CheckpointManager(tmp_path).save(params=_snapshot(1.0)[0], epoch=2)
    with pytest.raises(CheckpointConflictError, match="different key") as err:
        ModelCheckpoint(tmp_path).on_train_begin(_begin(2))
    assert "(ckpt_0002; latest epoch 2)" in str(err.value)


def test_a_damaged_latest_checkpoint_is_an_error_naming_it_before_training(tmp_path):
    _run_into(tmp_path, 2)
    damaged = tmp_path / "ckpt_0002.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    before = _contents(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        ModelCheckpoint(tmp_path).on_train_begin(_begin(2))
    assert str(err.value).startswith(str(damaged))
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("make_key", [
    lambda: jax.random.key(7),
    lambda: jax.random.key(7, impl="rbg"),
    lambda: jax.random.PRNGKey(7),
], ids=["typed-threefry", "typed-rbg", "legacy-uint32"])
def test_continuing_the_run_is_accepted(tmp_path, make_key):
    _run_into(tmp_path, 3, key=make_key())
    ckpt = resume(tmp_path, params=_target()["params"], state=_target()["state"],
                  opt_state=_target()["opt_state"])
    assert ckpt.epoch == 3
    callback = ModelCheckpoint(tmp_path, max_to_keep=None)
    callback.on_train_begin(_begin(ckpt.epoch, ckpt.key))
    callback.on_epoch_end(_epoch_end(3, key=ckpt.key))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_0001.npz", "ckpt_0002.npz", "ckpt_0003.npz", "ckpt_0004.npz"]


def test_without_train_begin_info_the_check_runs_before_the_first_write(tmp_path):
    # A caller that predates TrainBegin calls on_train_begin() with no argument: the
    # first on_epoch_end checks (epoch and key from its EpochEnd) before writing.
    _run_into(tmp_path, 2)
    before = _contents(tmp_path)
    callback = ModelCheckpoint(tmp_path)
    callback.on_train_begin()
    with pytest.raises(CheckpointConflictError, match="starts at epoch 0"):
        callback.on_epoch_end(_epoch_end(0))
    assert _contents(tmp_path) == before
    callback.on_train_begin()
    callback.on_epoch_end(_epoch_end(2))  # epoch index 2: continues the run at epoch 2
    assert resume(tmp_path, **_target()).epoch == 3


# -- Ctrl-C, and a resumed run that continues its folder --------------------------------


def test_interrupted_hook_saves_the_last_completed_epoch(tmp_path, monkeypatch):
    run = tmp_path / "run"
    callback = ModelCheckpoint(run)
    callback.on_train_begin(_begin(0))
    callback.on_epoch_end(_epoch_end(0))

    def ctrl_c(point):
        if point == "write.synced":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_crash_hook", ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the save of epoch 2
        callback.on_epoch_end(_epoch_end(1))
    monkeypatch.setattr(checkpoint, "_crash_hook", None)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_0001.npz"]  # no temp left

    params, state, opt_state = _snapshot(2.0)
    result = FitResult(params, state, opt_state, {"loss": [1.0, 0.5]}, 2, jax.random.key(7))
    callback.on_train_interrupted(result)
    ckpt = resume(run, **_target())
    assert ckpt.epoch == 2 and ckpt.metadata == {"history": {"loss": [1.0, 0.5]}}
    np.testing.assert_array_equal(ckpt.params["dense_0"]["kernel"], np.full((4, 3), 2.0))

    # Already on disk, or no epoch of this run completed: nothing written.
    before = _contents(run)
    callback.on_train_interrupted(result)
    callback.on_train_interrupted(result._replace(epoch=1))
    assert _contents(run) == before
    fresh = ModelCheckpoint(tmp_path / "fresh")
    fresh.on_train_begin(_begin(0))
    fresh.on_train_interrupted(result._replace(epoch=0))
    unchecked = ModelCheckpoint(tmp_path / "unchecked")  # on_train_begin never called
    unchecked.on_train_interrupted(result)
    assert list((tmp_path / "fresh").iterdir()) == []
    assert list((tmp_path / "unchecked").iterdir()) == []


def test_ctrl_c_during_a_save_in_fit_then_resume_into_the_same_folder(tmp_path, monkeypatch):
    full = _fit(epochs=4)

    fired = []

    def ctrl_c_saving_epoch_2(point):  # once: on_train_interrupted's save then succeeds
        if (not fired and point == "write.member_end __manifest__"
                and len(list_checkpoints(tmp_path)) == 1):
            fired.append(point)
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_crash_hook", ctrl_c_saving_epoch_2)
    with pytest.raises(TrainingInterrupted) as err:
        _fit(epochs=4, callbacks=[ModelCheckpoint(tmp_path)])
    monkeypatch.setattr(checkpoint, "_crash_hook", None)
    assert fired and err.value.result.epoch == 2
    # on_train_interrupted wrote epoch 2 after the interrupted attempt; no temp file left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0001.npz", "ckpt_0002.npz"]

    ckpt = resume(tmp_path, params=PARAMS, opt_state=OPT.init(PARAMS))
    assert ckpt.epoch == 2 and len(ckpt.metadata["history"]["loss"]) == 2
    for a, b in zip(jax.tree_util.tree_leaves(ckpt.params),
                    jax.tree_util.tree_leaves(err.value.result.params)):
        np.testing.assert_array_equal(a, b)
    resumed = _fit(params=ckpt.params, opt_state=ckpt.opt_state, key=ckpt.key,
                   initial_epoch=ckpt.epoch, epochs=4, callbacks=[ModelCheckpoint(tmp_path)])
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                    jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_0002.npz", "ckpt_0003.npz", "ckpt_0004.npz"]
    assert resume(tmp_path, params=PARAMS).epoch == 4


# -- never a NaN checkpoint ------------------------------------------------------------


def _poison(where):
    """An epoch-4 snapshot with one NaN or inf in the place named."""
    params, state, opt_state = _snapshot(4.0)
    if where == "params-nan":
        params["dense_0"]["kernel"] = params["dense_0"]["kernel"].at[1, 2].set(jnp.nan)
        name = "params/dense_0/kernel"
    elif where == "state-inf":
        state["mean"] = state["mean"].at[0].set(jnp.inf)
        name = "state/mean"
    elif where == "opt_state-nan":
        mu = jax.tree_util.tree_map(lambda a: a.at[0].set(jnp.nan), opt_state[0].mu)
        opt_state = (opt_state[0]._replace(mu=mu), *opt_state[1:])
        name = "opt_state/0/mu/dense_0/bias"
    elif where == "bfloat16-nan":
        params["dense_0"]["bias"] = jnp.asarray([1.0, jnp.nan, 2.0], jnp.bfloat16)
        name = "params/dense_0/bias"
    else:  # numpy-inf: a host array, checked on the host
        params["dense_0"]["bias"] = np.asarray([1.0, -np.inf, 2.0], np.float32)
        name = "params/dense_0/bias"
    return params, state, opt_state, name


@pytest.mark.parametrize("where", ["params-nan", "state-inf", "opt_state-nan", "bfloat16-nan",
                                   "numpy-inf"])
def test_nonfinite_epochs_are_not_saved_and_the_good_ones_stay(tmp_path, where):
    callback = ModelCheckpoint(tmp_path, max_to_keep=2)
    callback.on_train_begin(_begin(0))
    for epoch in range(3):
        callback.on_epoch_end(_epoch_end(epoch))
    params, state, opt_state, name = _poison(where)
    for epoch in range(3, 6):  # three bad epochs would rotate out both good ones
        info = EpochEnd(epoch, {"loss": float("nan")}, params, state, opt_state,
                        jax.random.key(7), {})
        with pytest.warns(RuntimeWarning) as record:
            callback.on_epoch_end(info)
        message = str(record[0].message)
        assert f"epoch {epoch + 1} not saved" in message and name in message
        assert str(tmp_path) in message and "stays ckpt_0003.npz" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0002.npz", "ckpt_0003.npz"]
    ckpt = resume(tmp_path, **_target())
    assert ckpt.epoch == 3
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(ckpt.params))


def test_manager_skip_nonfinite_flag(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=1)
    params, _, _, _ = _poison("params-nan")
    with pytest.warns(RuntimeWarning, match="epoch 4 not saved.*no checkpoint there yet"):
        assert manager.save(params=params, epoch=4) is None
    assert list(tmp_path.iterdir()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = manager.save(params=params, epoch=4, skip_nonfinite=False)  # asked for
    assert path == tmp_path / "ckpt_0004.npz"
    restored = restore_checkpoint(path, target={"params": params}).params
    assert np.isnan(restored["dense_0"]["kernel"][1, 2])
    # Integer leaves and finite floats pass; rotation never deletes a later epoch.
    manager.save(params={"step": jnp.arange(3), "w": jnp.ones(2)}, epoch=6)
    manager.save(params={"step": jnp.arange(3), "w": jnp.ones(2)}, epoch=5)
    assert [p.name for p in manager.checkpoints()] == ["ckpt_0005.npz", "ckpt_0006.npz"]
    assert manager.latest_epoch() == 6
    assert CheckpointManager(tmp_path / "none").latest_epoch() is None


_ON_TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np, warnings
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxnn.checkpoint import CheckpointManager
mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
params = jax.device_put({"w": jnp.ones((4, 3)), "b": jnp.ones(3)},
                        NamedSharding(mesh, PartitionSpec()))  # replicated, as fit(devices=2)
state = {"mean": jax.device_put(jnp.asarray([1.0, jnp.inf]), jax.devices()[1])}
manager = CheckpointManager(__import__("sys").argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert manager.save(params=params, state=state, epoch=1) is None
    assert manager.save(params=params, state={"mean": jnp.ones(2)}, epoch=1) is not None
print([str(w.message) for w in caught])
"""


def test_the_nonfinite_check_takes_arrays_on_several_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", _ON_TWO_DEVICES, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1 not saved: NaN or inf in 'state/mean'" in proc.stdout
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0001.npz"]


def test_fit_into_nan_with_the_guard_off_keeps_the_last_good_checkpoints(tmp_path):
    # SGD at learning rate 100 on a least-squares fit: the params grow by ~100x per
    # step until they overflow to inf and NaN a few epochs in.
    model = jaxnn.Sequential([jaxnn.Dense(1)])
    y = _rng.normal(size=(32, 1)).astype(np.float32)
    finite = []

    class Record(Callback):
        def on_epoch_end(self, info):
            finite.append(all(bool(jnp.all(jnp.isfinite(a)))
                              for a in jax.tree_util.tree_leaves(info.params)))
            return False

    with pytest.warns(RuntimeWarning, match="not saved: NaN or inf") as record:
        jaxnn.fit(model, _params_like(model, X), X, y,
                  loss=jaxnn.losses.mean_squared_error, optimizer=optax.sgd(100.0),
                  key=jax.random.key(1), epochs=8, batch_size=8, verbose=0, metrics=(),
                  on_nonfinite="ignore", callbacks=[Record(), ModelCheckpoint(tmp_path,
                                                                              max_to_keep=2)])
    good = [epoch + 1 for epoch, ok in enumerate(finite) if ok]
    bad = [epoch + 1 for epoch, ok in enumerate(finite) if not ok]
    assert len(good) >= 2 and len(bad) >= 2 and good == list(range(1, len(good) + 1))
    skipped = [str(w.message) for w in record if "not saved" in str(w.message)]
    assert [int(re.search(r"epoch (\d+) not saved", m).group(1)) for m in skipped] == bad
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        f"ckpt_{e:04d}.npz" for e in good[-2:]]
    ckpt = resume(tmp_path, params=_params_like(model, X))
    assert ckpt.epoch == good[-1]
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(ckpt.params))


# -- resume: a file or a folder ----------------------------------------------------------


def test_resume_takes_a_folder_or_a_checkpoint_file(tmp_path):
    _run_into(tmp_path / "run", 3)
    assert resume(tmp_path / "run", **_target()).epoch == 3
    ckpt = resume(tmp_path / "run" / "ckpt_0002.npz", **_target())
    assert ckpt.epoch == 2 and ckpt.path == tmp_path / "run" / "ckpt_0002.npz"
    np.testing.assert_array_equal(ckpt.params["dense_0"]["bias"], np.full(3, 2.0))
    assert resume(str(tmp_path / "run" / "ckpt_0001.npz"), **_target()).epoch == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".ckpt_0001.npz.abcd1234.tmp").write_bytes(b"PK")
    assert resume(tmp_path / "empty", **_target()) is None


def _bad_resume_path(tmp_path, case):
    if case == "missing":
        return tmp_path / "no_such_run"
    if case == "missing-file":
        return tmp_path / "ckpt_0009.npz"
    if case == "text-file":
        path = tmp_path / "notes.txt"
        path.write_text("not a checkpoint")
        return path
    if case == "plain-npz":
        path = tmp_path / "arrays.npz"
        np.savez(path, w=np.ones(3))
        return path
    if case == "truncated":
        path = tmp_path / "ckpt_0001.npz"
        save_checkpoint(path, **dict(zip(("params", "state", "opt_state"),
                                         _snapshot(1.0))), epoch=1)
        path.write_bytes(path.read_bytes()[:200])
        return path
    if case == "other-model":
        path = tmp_path / "ckpt_0001.npz"
        save_checkpoint(path, params={"dense_9": {"kernel": jnp.ones((2, 2))}}, epoch=1)
        return path
    if case == "newer-format":
        path = tmp_path / "ckpt_0001.npz"
        params, state, opt_state = _snapshot(1.0)
        save_checkpoint(path, params=params, state=state, opt_state=opt_state, epoch=1)
        current = checkpoint.FORMAT_VERSION
        checkpoint.FORMAT_VERSION = current + 1  # as a later jaxnn would write it
        try:
            save_checkpoint(path, params=params, state=state, opt_state=opt_state, epoch=1)
        finally:
            checkpoint.FORMAT_VERSION = current
        return path
    if case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs os.mkfifo")
        path = tmp_path / "pipe"
        os.mkfifo(path)
        return path
    raise AssertionError(case)


@pytest.mark.parametrize("case, error, match", [
    ("missing", FileNotFoundError, "does not exist.*ModelCheckpoint"),
    ("missing-file", FileNotFoundError, "does not exist"),
    ("text-file", CheckpointError, "not a valid .npz"),
    ("plain-npz", CheckpointError, "not a jaxnn checkpoint"),
    ("truncated", CheckpointError, "corrupt or truncated"),
    ("other-model", CheckpointError, "structure mismatch"),
    ("newer-format", CheckpointError, "unknown checkpoint format version 2"),
    ("fifo", CheckpointError, "neither a checkpoint file nor a folder"),
])
def test_resume_refuses_a_path_that_is_not_a_checkpoint(tmp_path, case, error, match):
    path = _bad_resume_path(tmp_path, case)
    with pytest.raises(error, match=match) as err:
        resume(path, **_target())
    assert str(path) in str(err.value)


# -- leftover temporary files --------------------------------------------------------------

STALE = [".ckpt_0002.npz.0123abcd.tmp", ".ckpt_0003.npz.k3j2h1ab.tmp"]
NOT_OURS = [".ckpt_0003.npz.tmp", ".other_0001.npz.abcdefgh.tmp", "ckpt_0001.npz.bak",
            "notes.txt", ".ckpt_0003.npz.ab.tmp"]


def test_the_next_save_removes_leftover_temp_files_and_only_those(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=None)
    manager.save(params={"w": jnp.ones(2)}, epoch=1)
    for name in STALE + NOT_OURS:
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a file")
    (tmp_path / ".ckpt_0004.npz.dir12345.tmp").mkdir()  # not a file: left alone
    manager.save(params={"w": jnp.ones(2)}, epoch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt_0001.npz", "ckpt_0002.npz", ".ckpt_0004.npz.dir12345.tmp", *NOT_OURS])

    # save_checkpoint alone removes the leftovers of its own file name only.
    for name in STALE:
        (tmp_path / name).write_bytes(b"PK")
    save_checkpoint(tmp_path / "ckpt_0003.npz", params={"w": jnp.ones(2)}, epoch=3)
    names = {p.name for p in tmp_path.iterdir()}
    assert STALE[0] in names and STALE[1] not in names


# -- faults during a save: SIGKILL in a subprocess, exceptions in process ---------------------

KILL_POINTS = [
    "cleanup.before_unlink", "cleanup.after_unlink",  # the two stale temp files
    "cleanup.before_unlink", "cleanup.after_unlink",
    "write.created",
    "write.member_start params/b", "write.member_end params/b",
    "write.member_start params/w", "write.member_end params/w",
    "write.member_start key", "write.member_end key",
    "write.member_start __manifest__", "write.member_end __manifest__",
    "write.zip_closed", "write.synced", "write.replaced", "write.directory_synced",
    "rotate.before_unlink", "rotate.after_unlink",  # epoch 1 rotated out
]
OWN_TEMP = re.compile(r"\.ckpt_0003\.npz\.[0-9a-f]{8}\.tmp")


def _prepare_folder(folder):
    """Epochs 1 and 2 of the worker's run, two stale temp files, and files not ours."""
    manager = CheckpointManager(folder, max_to_keep=worker.MAX_TO_KEEP)
    for epoch in (1, 2):
        manager.save(params=worker.snapshot(epoch), epoch=epoch, key=worker.KEY,
                     metadata={"epoch": epoch})
    for name in STALE + NOT_OURS:
        (folder / name).write_bytes(b"PK\x03\x04 half a file")


def _check_folder(folder, reached):
    """The folder after a save stopped at the kill point ``reached`` (1-based), and
    after the next save into it."""
    done = KILL_POINTS[:reached]
    names = {p.name for p in folder.iterdir()}
    own = {n for n in names if OWN_TEMP.fullmatch(n) and n not in STALE}
    names -= own
    expected = {"ckpt_0002.npz", *NOT_OURS, *STALE[done.count("cleanup.after_unlink"):]}
    if "rotate.after_unlink" not in done:
        expected.add("ckpt_0001.npz")
    replaced = "write.replaced" in done
    if replaced:
        expected.add("ckpt_0003.npz")
    assert names == expected, done[-1]
    assert len(own) <= 1

    # Every checkpoint restores and verifies; the latest is the previous or the new epoch.
    paths = list_checkpoints(folder)
    for path in paths:
        ckpt = restore_checkpoint(path, target={"params": worker.snapshot(0)})
        epoch = int(path.stem[-4:])
        assert ckpt.epoch == epoch and ckpt.metadata == {"epoch": epoch}
        np.testing.assert_array_equal(ckpt.key, worker.KEY)
        for got, want in zip(jax.tree_util.tree_leaves(ckpt.params),
                             jax.tree_util.tree_leaves(worker.snapshot(epoch))):
            np.testing.assert_array_equal(got, want)
    assert paths[-1].name == ("ckpt_0003.npz" if replaced else "ckpt_0002.npz")

    # The next save succeeds and removes every leftover temp file of ours.
    manager = CheckpointManager(folder, max_to_keep=worker.MAX_TO_KEEP)
    manager.save(params=worker.snapshot(3), epoch=3, key=worker.KEY, metadata={"epoch": 3})
    assert {p.name for p in folder.iterdir()} == {"ckpt_0002.npz", "ckpt_0003.npz", *NOT_OURS}
    ckpt = restore_checkpoint(folder / "ckpt_0003.npz", target={"params": worker.snapshot(0)})
    assert ckpt.epoch == 3
    np.testing.assert_array_equal(ckpt.params["w"], worker.snapshot(3)["w"])


def _run_workers(folders):
    """Save into ``folders[k]`` killed at kill point k (0: not killed), each in a process
    of its own (forked by the worker, which imports jaxnn once); ``(exit status, stdout,
    stderr)`` per folder."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [str(a) for k, folder in enumerate(folders) for a in (folder, k)]
    done = subprocess.run([sys.executable, str(WORKER_PATH), *argv], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = json.loads(done.stdout.strip().splitlines()[-1])
    return [types.SimpleNamespace(returncode=statuses[str(folder)],
                                  stdout=pathlib.Path(f"{folder}.out").read_text(),
                                  stderr=pathlib.Path(f"{folder}.err").read_text())
            for folder in folders]


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                    reason="needs POSIX fork and SIGKILL")
@pytest.mark.slow
def test_save_killed_at_every_step_loses_nothing(tmp_path):
    runs = range(len(KILL_POINTS) + 1)  # 0: a save that runs to the end
    folders = []
    for kill_at in runs:
        folders.append(tmp_path / f"kill_{kill_at:02d}")
        _prepare_folder(folders[-1])
    procs = _run_workers(folders)

    complete = procs[0]
    assert complete.returncode == 0, complete.stderr
    assert complete.stdout.splitlines() == [*KILL_POINTS, "done"]
    for kill_at, (folder, proc) in enumerate(zip(folders, procs)):
        if kill_at == 0:
            _check_folder(folder, len(KILL_POINTS))
            continue
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
        assert proc.stdout.splitlines() == KILL_POINTS[:kill_at]
        _check_folder(folder, kill_at)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, lambda: OSError(28, "No space left")],
                         ids=["ctrl-c", "disk-full"])
def test_an_exception_at_every_step_of_a_save_loses_nothing(tmp_path, monkeypatch, fault):
    for reached in range(1, len(KILL_POINTS) + 1):
        folder = tmp_path / f"at_{reached:02d}"
        _prepare_folder(folder)
        seen = []

        def hook(point, reached=reached, seen=seen):
            seen.append(point)
            if len(seen) == reached:
                raise fault()

        monkeypatch.setattr(checkpoint, "_crash_hook", hook)
        with pytest.raises((KeyboardInterrupt, OSError)):
            CheckpointManager(folder, max_to_keep=worker.MAX_TO_KEEP).save(
                params=worker.snapshot(3), epoch=3, key=worker.KEY, metadata={"epoch": 3})
        monkeypatch.setattr(checkpoint, "_crash_hook", None)
        assert seen == KILL_POINTS[:reached]
        # The save's own temp file is removed on the way out.
        assert not any(OWN_TEMP.fullmatch(p.name) and p.name not in STALE
                       for p in folder.iterdir())
        _check_folder(folder, reached)
