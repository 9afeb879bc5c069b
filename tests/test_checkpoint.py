"""Checkpoints: round trips, the file format, corruption and mismatch errors, and the
per-epoch manager. Runs, resume, NaN and saves killed part-way: test_checkpoint_runs.py."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    restore_checkpoint,
    save_checkpoint,
)

MODEL = jaxnn.Sequential([jaxnn.Dense(4), jaxnn.Dense(2)])
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)), jnp.float32)
OPT = optax.adam(1e-2)
_SHAPES = jax.eval_shape(MODEL.init, jax.random.key(0), X)


def _init(seed):
    """Params with a bfloat16 leaf (``temperature``), and a model state. Drawn in numpy
    with init's shapes (init would compile a program of its own)."""
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape),
                                                          s.dtype), _SHAPES)
    params["temperature"] = jnp.asarray([1.0, 0.75], jnp.bfloat16)
    state = {"stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)},
             "steps": jnp.zeros((), jnp.int32)}
    return params, state


def _loss(params):
    dense = {k: v for k, v in params.items() if k != "temperature"}
    y = MODEL.apply(dense, X) * params["temperature"].astype(jnp.float32)
    return jnp.mean((y - Y) ** 2)


@jax.jit
def _step(params, opt_state):
    loss, grads = jax.value_and_grad(_loss)(params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _trained(steps=3):
    """Params, state and adam state after a few real optax updates, and the losses."""
    params, state = _init(0)
    opt_state = OPT.init(params)
    losses = []
    for i in range(steps):
        params, opt_state, loss = _step(params, opt_state)
        losses.append(float(loss))
        state = {"stats": {"mean": state["stats"]["mean"] + 0.5,
                           "var": state["stats"]["var"] * 2.0},
                 "steps": jnp.asarray(i + 1, jnp.int32)}
    return params, state, opt_state, losses


def _fresh_target():
    params, state = _init(1)
    return {"params": params, "state": state, "opt_state": OPT.init(params)}


def _assert_trees_equal(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert isinstance(a, jax.Array)
        assert a.dtype == e.dtype and a.shape == e.shape
        e = np.asarray(e)
        if e.dtype.kind == "V":  # bfloat16: compare the bits
            np.testing.assert_array_equal(np.asarray(a).view(np.uint16), e.view(np.uint16))
        else:
            np.testing.assert_array_equal(np.asarray(a), e)


def _simple_save(path, value=1.0, epoch=1):
    params = {"dense_0": {"kernel": jnp.full((6, 5), value, jnp.float32),
                          "bias": jnp.arange(5, dtype=jnp.float32) * value}}
    save_checkpoint(path, params=params, epoch=epoch)
    return params


def _rewrite(path, edit):
    """Re-save the npz with ``edit(arrays: dict, manifest: dict)`` applied (valid zip)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    manifest = json.loads(arrays["__manifest__"].tobytes().decode())
    edit(arrays, manifest)
    arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# -- round trips ----------------------------------------------------------------


def test_round_trip_training_snapshot(tmp_path):
    params, state, opt_state, losses = _trained()
    key = jax.random.key(42)
    metadata = {"history": {"loss": losses}, "lr": 1e-2, "note": "run a",
                "best": jnp.float32(0.5), "sizes": np.array([1, 2])}
    path = tmp_path / "snap.npz"
    assert save_checkpoint(path, params=params, state=state, opt_state=opt_state,
                           epoch=3, key=key, metadata=metadata) == path

    ckpt = restore_checkpoint(path, target=_fresh_target())
    assert isinstance(ckpt, Checkpoint) and ckpt.path == path
    _assert_trees_equal(ckpt.params, params)
    _assert_trees_equal(ckpt.state, state)
    _assert_trees_equal(ckpt.opt_state, opt_state)  # NamedTuples rebuilt
    assert type(ckpt.opt_state[0]) is type(opt_state[0])
    assert ckpt.params["temperature"].dtype == jnp.bfloat16
    assert ckpt.epoch == 3 and isinstance(ckpt.epoch, int)
    assert ckpt.metadata == {"history": {"loss": losses}, "lr": 1e-2, "note": "run a",
                             "best": 0.5, "sizes": [1, 2]}
    np.testing.assert_array_equal(jax.random.key_data(ckpt.key), jax.random.key_data(key))
    np.testing.assert_array_equal(jax.random.normal(ckpt.key, (3,)),
                                  jax.random.normal(key, (3,)))

    # Training resumes exactly: one more optax step from each agrees bit for bit.
    want = _step(params, opt_state)
    got = _step(ckpt.params, ckpt.opt_state)
    _assert_trees_equal(got, want)


@pytest.mark.parametrize("make_key", [
    lambda: jax.random.key(7),
    lambda: jax.random.key(7, impl="rbg"),
    lambda: jax.random.PRNGKey(7),
], ids=["typed-threefry", "typed-rbg", "legacy-uint32"])
def test_round_trip_keys(tmp_path, make_key):
    key = make_key()
    params = {"w": jnp.ones(2)}
    save_checkpoint(tmp_path / "k.npz", params=params, epoch=0, key=key)
    restored = restore_checkpoint(tmp_path / "k.npz", target={"params": params}).key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert jnp.issubdtype(restored.dtype, jax.dtypes.prng_key) == typed
    if typed:
        assert jax.random.key_impl(restored) == jax.random.key_impl(key)
        np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(key))
    else:
        assert restored.dtype == jnp.uint32
        np.testing.assert_array_equal(restored, key)
    np.testing.assert_array_equal(jax.random.uniform(restored, (4,)),
                                  jax.random.uniform(key, (4,)))


def test_optional_parts_and_partial_restore(tmp_path):
    params, state, opt_state, _ = _trained(1)
    path = tmp_path / "p.npz"
    save_checkpoint(path, params=params, state={}, epoch=5)
    # Only params requested; an empty state section round-trips as {}.
    ckpt = restore_checkpoint(path, target={"params": jax.eval_shape(lambda: params)})
    _assert_trees_equal(ckpt.params, params)
    assert ckpt.state is None and ckpt.opt_state is None and ckpt.key is None
    assert ckpt.metadata == {}
    assert restore_checkpoint(path, target={"state": {}}).state == {}
    with pytest.raises(CheckpointError, match="'opt_state'.*does not hold") as err:
        restore_checkpoint(path, target={"opt_state": opt_state})
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="unknown target keys"):
        restore_checkpoint(path, target={"parms": params})


# -- the file format -------------------------------------------------------------


def test_file_format_is_plain_npz_with_manifest(tmp_path):
    params, state, opt_state, _ = _trained(1)
    path = tmp_path / "f.npz"
    save_checkpoint(path, params=params, state=state, opt_state=opt_state, epoch=1,
                    key=jax.random.key(0), metadata={"a": 1})
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    manifest = json.loads(arrays.pop("__manifest__").tobytes().decode("utf-8"))
    assert manifest["format"] == "jaxnn.checkpoint" and manifest["format_version"] == 1
    assert manifest["jaxnn_version"] == jaxnn.__version__
    assert manifest["epoch"] == 1 and manifest["metadata"] == {"a": 1}
    assert manifest["key"] == {"impl": "threefry2x32"}
    assert read_manifest(path) == manifest
    for name in ["params/dense_0/kernel", "state/stats/mean", "state/steps",
                 "opt_state/0/count", "opt_state/0/mu/dense_0/kernel",
                 "opt_state/0/nu/temperature", "key"]:
        assert name in arrays
    assert set(arrays) == set(manifest["arrays"])
    assert manifest["sections"]["opt_state"] == [
        n for n in manifest["arrays"] if n.startswith("opt_state/")]
    for name, stored in arrays.items():
        entry = manifest["arrays"][name]
        assert hashlib.sha256(stored.tobytes()).hexdigest() == entry["sha256"]
        assert list(stored.shape) == entry["shape"] and stored.dtype.name == entry["stored_dtype"]
    bf16 = manifest["arrays"]["params/temperature"]
    assert bf16["dtype"] == "bfloat16" and bf16["stored_dtype"] == "uint16"
    np.testing.assert_array_equal(arrays["params/temperature"],
                                  np.asarray(params["temperature"]).view(np.uint16))
    np.testing.assert_array_equal(arrays["key"], jax.random.key_data(jax.random.key(0)))


def test_save_leaves_no_temp_files_and_replaces(tmp_path):
    path = tmp_path / "sub" / "ckpt.npz"
    _simple_save(path, 1.0, epoch=1)
    params = _simple_save(path, 2.0, epoch=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.npz"]
    ckpt = restore_checkpoint(path, target={"params": params})
    assert ckpt.epoch == 2
    _assert_trees_equal(ckpt.params, params)


# -- corrupt files ------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["empty", "half", "all-but-10"])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "t.npz"
    params = _simple_save(path)
    data = path.read_bytes()
    size = {"empty": 0, "half": len(data) // 2, "all-but-10": len(data) - 10}[keep]
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        restore_checkpoint(path, target={"params": params})
    assert str(path) in str(err.value)


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "n.npz"
    path.write_text("definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a valid .npz") as err:
        restore_checkpoint(path, target={"params": {}})
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        restore_checkpoint(tmp_path / "missing.npz", target={"params": {}})


@pytest.mark.parametrize("where", ["array-data", "manifest"])
def test_flipped_byte_is_refused(tmp_path, where):
    path = tmp_path / "b.npz"
    params = _simple_save(path)
    data = bytearray(path.read_bytes())
    if where == "array-data":
        offset = data.find(np.asarray(params["dense_0"]["bias"]).tobytes()) + 6
    else:
        offset = data.find(b'"format_version"') + 3
    assert offset > 10
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        restore_checkpoint(path, target={"params": params})
    assert str(path) in str(err.value)
    if where == "array-data":
        assert "params/dense_0/bias" in str(err.value)


def test_checksum_catches_corruption_with_valid_zip(tmp_path):
    # The array changed before zipping (so every CRC-32 is fine): the manifest's sha256
    # still catches it.
    path = tmp_path / "c.npz"
    params = _simple_save(path)

    def edit(arrays, manifest):
        arrays["params/dense_0/kernel"] = arrays["params/dense_0/kernel"].copy()
        arrays["params/dense_0/kernel"][2, 3] += 1e-3

    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match="checksum mismatch for 'params/dense_0/kernel'"):
        restore_checkpoint(path, target={"params": params})


def test_missing_array_and_unknown_version_are_refused(tmp_path):
    path = tmp_path / "m.npz"
    params = _simple_save(path)
    _rewrite(path, lambda arrays, manifest: arrays.pop("params/dense_0/bias"))
    with pytest.raises(CheckpointError, match="'params/dense_0/bias' is missing") as err:
        restore_checkpoint(path, target={"params": params})
    assert str(path) in str(err.value)

    _simple_save(path)
    _rewrite(path, lambda arrays, manifest: manifest.update(format_version=99))
    with pytest.raises(CheckpointError, match="unknown checkpoint format version 99") as err:
        restore_checkpoint(path, target={"params": params})
    assert str(path) in str(err.value)


# -- mismatches against the target -------------------------------------------------


def test_shape_and_dtype_mismatch_name_the_path(tmp_path):
    path = tmp_path / "s.npz"
    params = _simple_save(path)
    wrong = {"dense_0": {"kernel": jnp.zeros((6, 7)), "bias": params["dense_0"]["bias"]}}
    with pytest.raises(CheckpointError) as err:
        restore_checkpoint(path, target={"params": wrong})
    msg = str(err.value)
    assert str(path) in msg and "params/dense_0/kernel" in msg
    assert "(6, 7)" in msg and "(6, 5)" in msg

    wrong = {"dense_0": {"kernel": params["dense_0"]["kernel"],
                         "bias": params["dense_0"]["bias"].astype(jnp.float16)}}
    with pytest.raises(CheckpointError, match="dtype mismatch at 'params/dense_0/bias'.*"
                                              "float16.*float32"):
        restore_checkpoint(path, target={"params": wrong})


def test_tree_structure_mismatch_lists_missing_and_extra(tmp_path):
    path = tmp_path / "x.npz"
    params = _simple_save(path)
    wrong = {"dense_0": {"kernel": params["dense_0"]["kernel"]},
             "dense_1": {"kernel": jnp.zeros((5, 2))}}
    with pytest.raises(CheckpointError) as err:
        restore_checkpoint(path, target={"params": wrong})
    msg = str(err.value)
    assert str(path) in msg and "structure mismatch" in msg
    assert "missing from the file: 'params/dense_1/kernel'" in msg
    assert "in the file but not in the target: 'params/dense_0/bias'" in msg

    # A target with fewer leaves than the file is refused too (nothing silently dropped).
    with pytest.raises(CheckpointError, match="not in the target: 'params/dense_0/bias'"):
        restore_checkpoint(path, target={"params": {"dense_0": {
            "kernel": params["dense_0"]["kernel"]}}})


# -- a directory of checkpoints ------------------------------------------------------


def test_manager_keeps_the_last_n(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_to_keep=2)
    assert manager.latest() is None
    assert manager.restore_latest(target={"params": {"w": jnp.zeros(3)}}) is None
    for epoch in range(1, 6):
        path = manager.save(params={"w": jnp.full(3, float(epoch))}, epoch=epoch,
                            metadata={"epoch_loss": 1.0 / epoch})
        assert path.name == f"ckpt_{epoch:04d}.npz"
    assert [p.name for p in manager.checkpoints()] == ["ckpt_0004.npz", "ckpt_0005.npz"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "ckpt_0004.npz", "ckpt_0005.npz"]
    ckpt = manager.restore_latest(target={"params": {"w": jnp.zeros(3)}})
    assert ckpt.epoch == 5 and ckpt.metadata == {"epoch_loss": 0.2}
    np.testing.assert_array_equal(ckpt.params["w"], np.full(3, 5.0))

    keep_all = CheckpointManager(tmp_path / "all", max_to_keep=None)
    for epoch in range(3):
        keep_all.save(params={"w": jnp.zeros(1)}, epoch=epoch)
    assert len(keep_all.checkpoints()) == 3
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(tmp_path, max_to_keep=0)


def test_latest_checkpoint_ignores_temp_files_and_sorts_numerically(tmp_path):
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert latest_checkpoint(tmp_path) is None
    for epoch in (9999, 10000, 3):
        _simple_save(tmp_path / f"ckpt_{epoch:04d}.npz", epoch=epoch)
    for stale in (".ckpt_20000.npz.k3j2h1.tmp", "ckpt_20001.npz.tmp", "ckpt_20002.npz.part",
                  "ckpt_20003.npy", "other_20004.npz"):
        (tmp_path / stale).write_bytes(b"PK\x03\x04 half a file")
    (tmp_path / "ckpt_20005.npz").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_10000.npz"
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_0003.npz", "ckpt_9999.npz", "ckpt_10000.npz"]
    assert latest_checkpoint(tmp_path, prefix="other_") == tmp_path / "other_20004.npz"
