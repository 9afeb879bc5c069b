"""jaxnn.save / jaxnn.load: template-free round trips for every layer type, extras,
templates, and a failed save leaving the previous file intact. The file format
itself (checksums, atomic writes, corruption): test_checkpoint.py."""

import functools
import json
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn import checkpoint
from jaxnn.checkpoint import CheckpointError, read_manifest, restore_checkpoint, save_checkpoint
from jaxnn.layers._attention import MultiHeadAttention
from jaxnn.layers._bidirectional import Bidirectional
from jaxnn.layers._conv_transpose import Conv2DTranspose
from jaxnn.layers._norm import GroupNorm, RMSNorm
from jaxnn.layers._position import PositionEmbedding, SinusoidalPositionEmbedding
from jaxnn.layers._transformer import TransformerEncoderBlock

BF16 = jnp.bfloat16
_rng = np.random.default_rng(0)
IMAGES = jnp.asarray(_rng.normal(size=(2, 6, 6, 3)), jnp.float32)
SERIES = jnp.asarray(_rng.normal(size=(2, 5, 3)), jnp.float32)
TOKENS = jnp.asarray(_rng.integers(0, 7, size=(2, 5)), jnp.int32)
VECTORS = jnp.asarray(_rng.normal(size=(2, 3)), jnp.float32)


@jaxnn.model
def residual(nn, x):
    h = jaxnn.relu(nn(jaxnn.Dense(3), x))
    return nn(jaxnn.LayerNorm(), x + nn(jaxnn.Dense(3, dtype=BF16), h).astype(x.dtype))


# (id, layer, sample input): every layer type, a nested Sequential and a functional model.
CASES = [
    ("dense", jaxnn.Dense(4), VECTORS),
    ("dense_bf16", jaxnn.Dense(4, dtype=BF16), VECTORS),
    ("conv1d", jaxnn.Conv1D(4, 3), SERIES),
    ("conv2d", jaxnn.Conv2D(4, 3, padding="SAME"), IMAGES),
    ("conv2d_groups", jaxnn.Sequential([jaxnn.Conv2D(4, 1), jaxnn.Conv2D(6, 3, groups=2)]),
     IMAGES),
    ("depthwise_conv2d", jaxnn.Conv2D(6, 3, groups=3, padding="SAME"), IMAGES),
    ("conv2d_transpose", Conv2DTranspose(4, 3, strides=2, padding=1, output_padding=1), IMAGES),
    ("batchnorm", jaxnn.BatchNorm(), IMAGES),
    ("layernorm", jaxnn.LayerNorm(), SERIES),
    ("rmsnorm", RMSNorm(), SERIES),
    ("groupnorm", GroupNorm(3), IMAGES),
    ("embedding", jaxnn.Embedding(7, 4), TOKENS),
    ("simple_rnn", jaxnn.SimpleRNN(4), SERIES),
    ("lstm", jaxnn.LSTM(4, return_sequences=True), SERIES),
    ("gru", jaxnn.GRU(4), SERIES),
    ("bidirectional_lstm", Bidirectional(jaxnn.LSTM(4, return_sequences=True)), SERIES),
    ("dropout", jaxnn.Dropout(0.5), VECTORS),
    ("max_pool", jaxnn.MaxPool(2), IMAGES),
    ("avg_pool", jaxnn.AvgPool(2), IMAGES),
    ("max_pool_1d", jaxnn.MaxPool1D(2), SERIES),
    ("avg_pool_1d", jaxnn.AvgPool1D(2), SERIES),
    ("global_avg_pool", jaxnn.GlobalAvgPool(), IMAGES),
    ("global_max_pool", jaxnn.GlobalMaxPool(), IMAGES),
    ("multi_head_attention", MultiHeadAttention(2, key_size=2, causal=True), SERIES),
    ("transformer_encoder_block", TransformerEncoderBlock(3, 8), SERIES),
    ("position_embedding", PositionEmbedding(6), SERIES),
    ("sinusoidal_position_embedding", SinusoidalPositionEmbedding(), SERIES),
    ("nested_sequential", jaxnn.Sequential([
        jaxnn.Conv2D(4, 3), jaxnn.BatchNorm(), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Sequential([jaxnn.Flatten(), jaxnn.Dense(5, dtype=BF16), jaxnn.Dropout(0.1)]),
        jaxnn.Dense(2),
    ]), IMAGES),
    ("functional_model", residual, VECTORS),
]


def _assert_same_bits(actual, expected):
    """Same tree structure (container types included), dtypes, shapes and bytes."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert isinstance(a, jax.Array)
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def _perturbed(tree, seed):
    """A tree of the same structure, shapes and dtypes (arrays or ShapeDtypeStructs) with
    random values in [0.5, 1.5) (positive: valid variances), drawn in numpy: no device
    work, and no zeros and ones of default initialisers as all a round trip is checked on."""
    rng = np.random.default_rng(seed)

    def values(leaf):
        drawn = rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
        return jnp.asarray(drawn.astype(leaf.dtype))

    return jax.tree_util.tree_map(values, tree)


@functools.cache
def _initialised(case):
    """``(layer, x, params, state)`` for the case named ``case``, made once: the structure,
    shapes and dtypes of ``init_with_state`` (traced, not run: the initialisers would
    compile a program per layer) with random values."""
    layer, x = {name: (layer, x) for name, layer, x in CASES}[case]
    params, state = jax.eval_shape(layer.init_with_state, jax.random.key(0), x)
    return layer, x, _perturbed(params, 1), _perturbed(state, 2)


@pytest.mark.parametrize("case", [name for name, _, _ in CASES])
def test_round_trip_without_template(tmp_path, case):
    layer, x, params, state = _initialised(case)
    path = jaxnn.save(tmp_path / "model.npz", params, state)

    loaded = jaxnn.load(path)

    _assert_same_bits(loaded.params, params)
    _assert_same_bits(loaded.state, state)
    assert loaded.extra == {} and loaded.path == path
    apply = jax.jit(layer.apply_with_state)  # compiled once, run on both
    y, new_state = apply(params, state, x)
    y_loaded, new_state_loaded = apply(loaded.params, loaded.state, x)
    _assert_same_bits(y_loaded, y)
    _assert_same_bits(new_state_loaded, new_state)


def test_one_line_each_and_no_state(tmp_path):
    _, _, params, _ = _initialised("functional_model")
    jaxnn.save(tmp_path / "model.npz", params)
    loaded = jaxnn.load(tmp_path / "model.npz")
    _assert_same_bits(loaded.params, params)
    assert loaded.state is None
    apply = jax.jit(residual.apply)  # one program, not one per operation
    _assert_same_bits(apply(loaded.params, VECTORS), apply(params, VECTORS))


def test_lists_tuples_none_empty_and_bare_arrays(tmp_path):
    params = {"blocks": [{"w": jnp.ones((2, 3))}, (jnp.arange(3), None, {})],
              "scale": jnp.asarray(0.5, BF16), "empty": {}, "nothing": None}
    jaxnn.save(tmp_path / "a.npz", params, state={})
    loaded = jaxnn.load(tmp_path / "a.npz")
    _assert_same_bits(loaded.params, params)
    assert isinstance(loaded.params["blocks"], list)
    assert isinstance(loaded.params["blocks"][1], tuple)
    assert loaded.params["nothing"] is None and loaded.state == {}

    jaxnn.save(tmp_path / "b.npz", jnp.arange(4.0))
    _assert_same_bits(jaxnn.load(tmp_path / "b.npz").params, jnp.arange(4.0))


def test_extra_metadata_and_arrays_round_trip(tmp_path):
    params = {"w": jnp.ones(2)}
    mean = np.linspace(0, 1, 3, dtype=np.float32)
    ema = {"w": jnp.asarray([0.25, 0.5], BF16)}
    jaxnn.save(tmp_path / "m.npz", params, epochs=5, lr=1e-3, classes=["cat", "dog"],
               config={"units": (64, 10), "act": "relu", "norm": None},
               mean=mean, ema=ema, step=np.int32(7))

    extra = jaxnn.load(tmp_path / "m.npz").extra

    assert extra.keys() == {"epochs", "lr", "classes", "config", "mean", "ema", "step"}
    assert extra["epochs"] == 5 and extra["lr"] == 1e-3 and extra["classes"] == ["cat", "dog"]
    assert extra["config"] == {"units": [64, 10], "act": "relu", "norm": None}  # JSON: lists
    _assert_same_bits(extra["mean"], mean)
    _assert_same_bits(extra["ema"], ema)
    _assert_same_bits(extra["step"], np.int32(7))
    manifest = read_manifest(tmp_path / "m.npz")
    assert manifest["metadata"]["epochs"] == 5 and "extra/mean" in manifest["arrays"]


def test_extra_errors_name_the_extra(tmp_path):
    with pytest.raises(TypeError, match="'mixed' mixes arrays"):
        jaxnn.save(tmp_path / "m.npz", {"w": jnp.ones(2)}, mixed={"a": jnp.ones(2), "b": "x"})
    with pytest.raises(TypeError, match="'when' is neither arrays nor JSON"):
        jaxnn.save(tmp_path / "m.npz", {"w": jnp.ones(2)}, when=object())
    assert not list(tmp_path.iterdir())


class Affine(typing.NamedTuple):
    kernel: jax.Array
    bias: jax.Array


def test_template_restores_other_pytree_types(tmp_path):
    params = {"affine": Affine(jnp.ones((2, 3)), jnp.zeros(3)), "b": jnp.arange(2.0)}
    path = jaxnn.save(tmp_path / "p.npz", params)
    with pytest.raises(CheckpointError, match=r"p\.npz.*NamedTuple.*pass a template"):
        jaxnn.load(path)
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    loaded = jaxnn.load(path, params=template)
    _assert_same_bits(loaded.params, params)
    assert isinstance(loaded.params["affine"], Affine)


def test_matching_template_is_checked_and_used(tmp_path):
    _, _, params, state = _initialised("nested_sequential")  # BatchNorm state, bfloat16
    path = jaxnn.save(tmp_path / "model.npz", params, state)
    loaded = jaxnn.load(path, params=_perturbed(params, 3), state=_perturbed(state, 4))
    _assert_same_bits(loaded.params, params)
    _assert_same_bits(loaded.state, state)


def test_wrong_or_empty_template_is_an_error_naming_file_and_path(tmp_path):
    params = {"dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    path = jaxnn.save(tmp_path / "model.npz", params)
    wrong = {"dense_0": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(4)}}
    with pytest.raises(CheckpointError, match=r"model\.npz: shape mismatch at "
                       r"'params/dense_0/kernel': the target expects \(3, 5\), "
                       r"the file has \(3, 4\)"):
        jaxnn.load(path, params=wrong)
    with pytest.raises(CheckpointError, match=r"model\.npz: the 'params' template is empty"):
        jaxnn.load(path, params={})
    with pytest.raises(CheckpointError, match=r"model\.npz.*missing from the file: "
                       r"'params/dense_1/bias'"):
        jaxnn.load(path, params={**params, "dense_1": {"bias": jnp.zeros(4)}})
    with pytest.raises(CheckpointError, match=r"model\.npz: the target asks for 'state'"):
        jaxnn.load(path, state={"bn": {"mean": jnp.zeros(4)}})


def test_restore_checkpoint_without_sections_is_an_error(tmp_path):
    path = jaxnn.save(tmp_path / "model.npz", {"w": jnp.ones(2)})
    for target in ({}, {"params": None}):
        with pytest.raises(CheckpointError, match=r"model\.npz: restore_checkpoint: the "
                           "target names no section"):
            restore_checkpoint(path, target=target)
    with pytest.raises(CheckpointError, match="template is empty"):
        restore_checkpoint(path, target={"params": {}})
    # What jaxnn.save writes, restore_checkpoint reads.
    _assert_same_bits(restore_checkpoint(path, target={"params": {"w": jnp.zeros(2)}}).params,
                      {"w": jnp.ones(2)})


def test_load_reads_training_checkpoints_and_files_without_trees(tmp_path):
    params = {"dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.arange(4.0)}}
    state = {"batch_norm_0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
    opt_state = (Affine(jnp.ones(1), jnp.zeros(1)),)
    path = save_checkpoint(tmp_path / "ckpt_0003.npz", params=params, state=state,
                           opt_state=opt_state, epoch=3, metadata={"history": {"loss": [1.0]}})
    assert read_manifest(path)["trees"]["opt_state"] is None  # a NamedTuple: template only
    loaded = jaxnn.load(path)
    _assert_same_bits(loaded.params, params)
    _assert_same_bits(loaded.state, state)
    assert loaded.extra == {"history": {"loss": [1.0]}}

    # A version-1 file from before the manifest described trees: nested dicts
    # are rebuilt from the array names.
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    manifest = json.loads(arrays["__manifest__"].tobytes().decode())
    del manifest["trees"]
    arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    assert read_manifest(old)["format_version"] == 1
    loaded = jaxnn.load(old)
    _assert_same_bits(loaded.params, params)
    _assert_same_bits(loaded.state, state)


def test_failed_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    params = {"w": jnp.arange(3.0)}
    jaxnn.save(path, params, note="first")
    before = path.read_bytes()

    with pytest.raises(TypeError, match="'bad' is neither arrays nor JSON"):
        jaxnn.save(path, {"w": jnp.zeros(3)}, bad={1, 2})

    def crash(point):  # fail half-way through writing the new file
        if point.startswith("write.member_end"):
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_crash_hook", crash)
    with pytest.raises(OSError, match="disk full"):
        jaxnn.save(path, {"w": jnp.zeros(3)})
    monkeypatch.setattr(checkpoint, "_crash_hook", None)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    loaded = jaxnn.load(path)
    _assert_same_bits(loaded.params, params)
    assert loaded.extra == {"note": "first"}


def test_64_bit_arrays_need_x64_instead_of_being_narrowed(tmp_path, x64):
    params = {"w": np.arange(3, dtype=np.float64), "n": np.arange(2, dtype=np.int64)}
    path = jaxnn.save(tmp_path / "wide.npz", params)
    _assert_same_bits(jaxnn.load(path).params, params)
    with jax.enable_x64(False):
        with pytest.raises(CheckpointError, match=r"wide\.npz: 'params/n' is int64.*"
                           "jax_enable_x64"):
            jaxnn.load(path)
