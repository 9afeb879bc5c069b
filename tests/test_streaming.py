"""The streamed data path: data left on the host (arrays, memmaps, random-access
sources) trains exactly as data on the device, in bounded device memory; gradient
accumulation equals the large batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn import _sources

LOSS = "sparse_softmax_cross_entropy"
FEATURES = 64
# One model, optimizer, batch size and chunk size for every fit below, and 203 training
# examples for most: their compiled programs (the epoch plan, the training chunk, the
# validation) are the same XLA programs, compiled once and then loaded from the
# compilation cache. Dropout: the streamed paths must also hand each step the same key.
MODEL = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dropout(0.3), jaxnn.Dense(4)])
OPTIMIZER = optax.adam(1e-2)
BATCH = 8


def _data(n, features=FEATURES, classes=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(dtype)
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.3 * rng.normal(size=(n, classes)), axis=-1).astype(np.int32)
    return x, y


def _params_like(model, x, seed=0):
    """Parameters of the structure, shapes and dtypes ``model.init`` gives (traced, not
    run: the initialisers would compile a program of their own), drawn in numpy."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
        jax.eval_shape(model.init, jax.random.key(0), x[:1]))


X, Y = _data(203)
PARAMS = _params_like(MODEL, X)


def _kwargs(**kwargs):
    return {"loss": LOSS, "optimizer": OPTIMIZER, "key": jax.random.key(3), "epochs": 2,
            "batch_size": BATCH, "verbose": 0, **kwargs}


class Examples:
    """A random-access source of (x, y) examples, as tfds's and grain's sources are;
    ``on_read`` (if set) runs at each read, on fit's feeding thread."""

    def __init__(self, x, y, batched=True):
        self.x, self.y = x, y
        self.on_read = None
        if not batched:
            self.__getitems__ = None

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        if self.on_read is not None:
            self.on_read()
        return [(self.x[i], self.y[i]) for i in indices]


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _assert_identical(a, b):
    for u, v in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 3 steps of 8 examples of 64 float32 and a label (260 bytes): every epoch
    crosses many chunks and may end with a padded one."""
    monkeypatch.setattr(_sources, "CHUNK_BYTES", 3 * BATCH * (4 * FEATURES + 4))


def test_host_arrays_memmap_and_source_equal_the_device_path_bit_for_bit(tmp_path):
    # 203 examples in batches of 8: 26 steps, the last with 3 real rows; 8 chunks of 3
    # steps and a last one of 2 (padded to 3 steps of weight 0).
    device = jaxnn.fit(MODEL, PARAMS, X, Y, feed="device", **_kwargs())
    np.save(tmp_path / "x.npy", X)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    runs = {
        "host": jaxnn.fit(MODEL, PARAMS, X, Y, feed="host", **_kwargs()),
        "jax arrays, host": jaxnn.fit(MODEL, PARAMS, jnp.asarray(X), jnp.asarray(Y),
                                      feed="host", **_kwargs()),
        "memmap": jaxnn.fit(MODEL, PARAMS, mapped, Y, **_kwargs()),  # stays on the host
        "source": jaxnn.fit(MODEL, PARAMS, Examples(X, Y), **_kwargs()),
        "source, item by item": jaxnn.fit(MODEL, PARAMS, Examples(X, Y, batched=False),
                                          **_kwargs()),
    }
    for name, run in runs.items():
        _assert_identical((run.params, run.opt_state), (device.params, device.opt_state))
        assert run.epoch == 2, name
        np.testing.assert_allclose(run.history["loss"], device.history["loss"], rtol=1e-6)


def test_streamed_resume_equals_an_uninterrupted_run():
    source = Examples(X, Y)
    kwargs = _kwargs(key=jax.random.key(5))
    whole = jaxnn.fit(MODEL, PARAMS, source, **{**kwargs, "epochs": 3})
    first = jaxnn.fit(MODEL, PARAMS, source, **{**kwargs, "epochs": 1})
    resumed = jaxnn.fit(MODEL, first.params, source, initial_epoch=first.epoch,
                        opt_state=first.opt_state, **{**kwargs, "epochs": 3})
    _assert_identical((resumed.params, resumed.opt_state), (whole.params, whole.opt_state))


def test_the_device_never_holds_the_whole_dataset():
    # 4,000 examples of 64 float32 (1 MB) in chunks of 3 steps of 8: while fit trains,
    # the arrays alive on the device grow by a few chunks, the plan and the model only.
    x, y = _data(4000)
    example = x[0].nbytes + y[0].nbytes
    source = Examples(x, y)
    seen = []

    def live_bytes():
        seen.append(sum(a.nbytes for a in jax.live_arrays()))

    source.on_read = live_bytes
    before = sum(a.nbytes for a in jax.live_arrays())
    jaxnn.fit(MODEL, PARAMS, source, **_kwargs(epochs=1))
    # the first example, read to check the source, then every chunk of the 500 steps
    assert len(seen) == 1 + -(-500 // 3)
    model_bytes = 3 * sum(a.nbytes for a in jax.tree_util.tree_leaves(PARAMS))  # and Adam's
    plan = 4000 * (4 + 4) + 501 * 8  # the epoch plan: indices, weights, step keys
    chunk = 3 * 8 * (example + 4) + 3 * 8  # examples, weights, keys
    # the carry and the epoch's starting copy, the plan, at most 6 chunks (2 running or
    # queued, 2 prefetched, 1 being made, 1 being freed)
    bound = 2 * model_bytes + plan + 6 * chunk + 4096
    assert max(seen) - before < bound < (x.nbytes + y.nbytes) / 4, (max(seen) - before, bound)


def test_host_path_checks_labels_and_source_items():
    kwargs = _kwargs(epochs=1)
    bad = Y.copy()
    bad[197] = 9
    with pytest.raises(ValueError, match=r"label 9 at example 197 .* 4 classes"):
        jaxnn.fit(MODEL, PARAMS, Examples(X, bad), **kwargs)

    class Images(Examples):
        def __getitems__(self, indices):
            return [self.x[i] for i in indices]

    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        jaxnn.fit(MODEL, PARAMS, Images(X, Y), **kwargs)
    with pytest.raises(ValueError, match="feed='device' needs in-memory arrays"):
        jaxnn.fit(MODEL, PARAMS, Examples(X, Y), feed="device", **kwargs)
    with pytest.raises(ValueError, match="feed must be"):
        jaxnn.fit(MODEL, PARAMS, X, Y, feed="disk", **kwargs)
    with pytest.raises(ValueError, match="validation_split needs in-memory arrays"):
        jaxnn.fit(MODEL, PARAMS, Examples(X, Y), validation_split=0.2, **kwargs)


def test_an_error_in_the_source_reaches_the_caller():
    class Failing(Examples):
        reads = 0

        def __getitems__(self, indices):
            # the first example (the check), the first chunk; then the disk goes
            self.reads += 1
            if self.reads > 2:
                raise OSError("disk gone")
            return super().__getitems__(indices)

    with pytest.raises(OSError, match="disk gone"):
        jaxnn.fit(MODEL, PARAMS, Failing(X, Y), **_kwargs(epochs=1))


def test_accumulation_equals_one_step_on_the_large_batch(x64):
    # accumulate=4 micro-batches of 6 = one Adam step on 24 examples, in float64, on the
    # device and streamed from the host (chunks of 2 steps); 100 examples: 5 steps, the
    # last of 4 real examples (micro-batches of padding add nothing).
    x, y = _data(100, features=12, dtype=np.float64)
    model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dense(4)])
    params = _params_like(model, x)
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(2), epochs=2,
                  verbose=0, penalty=jaxnn.regularizers.l2(1e-3))
    large = jaxnn.fit(model, params, x, y, batch_size=24, feed="device", **kwargs)
    for feed in ("device", "host"):
        accumulated = jaxnn.fit(model, params, x, y, batch_size=6, accumulate=4, feed=feed,
                                **kwargs)
        for a, b in zip(_leaves(accumulated.params), _leaves(large.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13, err_msg=feed)
        np.testing.assert_allclose(accumulated.history["loss"], large.history["loss"],
                                   rtol=1e-12, err_msg=feed)
        np.testing.assert_allclose(accumulated.history["accuracy"],
                                   large.history["accuracy"], err_msg=feed)
        assert int(accumulated.opt_state[0].count) == 2 * 5  # one update per large batch


def test_accumulation_checks():
    x, y = X[:40], Y[:40]
    kwargs = _kwargs(epochs=1)
    del kwargs["batch_size"]
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        jaxnn.fit(MODEL, PARAMS, x, y, accumulate=0, **kwargs)
    with pytest.raises(ValueError, match=r"batch_size \* accumulate = 16 \* 4 = 64"):
        jaxnn.fit(MODEL, PARAMS, x, y, batch_size=16, accumulate=4, **kwargs)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    with pytest.raises(ValueError, match="first batch has 10 examples"):
        jaxnn.fit(MODEL, PARAMS, batches, accumulate=4, **kwargs)


def _held_out(seed):
    """253 examples: validation_split=0.2 holds out the last 50 and trains on 203."""
    return _data(253, seed=seed)


def test_memmap_larger_than_a_chunk_trains_like_numpy(tmp_path):
    # The training part and the held-out part of a memmap stay on the host.
    x, y = _held_out(1)
    path = tmp_path / "x.dat"
    mapped = np.memmap(path, np.float32, "w+", shape=x.shape)
    mapped[:] = x
    mapped.flush()
    mapped = np.memmap(path, np.float32, "r", shape=x.shape)
    a = jaxnn.fit(MODEL, PARAMS, mapped, y, validation_split=0.2, **_kwargs())
    b = jaxnn.fit(MODEL, PARAMS, x, y, validation_split=0.2, **_kwargs())
    _assert_identical(a.params, b.params)
    assert a.history["val_loss"] == pytest.approx(b.history["val_loss"], rel=1e-6)


def test_evaluate_predict_and_validation_read_sources_and_memmaps(tmp_path):
    # 2,300 examples in blocks of 1,000 (the last of 300): the same numbers as arrays.
    x, y = _data(2300)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    expected = jaxnn.evaluate(MODEL, PARAMS, x, y, loss=LOSS)
    assert jaxnn.evaluate(MODEL, PARAMS, Examples(x, y), loss=LOSS) == pytest.approx(
        expected, rel=1e-6)
    assert jaxnn.evaluate(MODEL, PARAMS, mapped, y, loss=LOSS) == pytest.approx(
        expected, rel=1e-6)
    logits = np.asarray(jaxnn.predict(MODEL, PARAMS, x))
    np.testing.assert_allclose(jaxnn.predict(MODEL, PARAMS, Examples(x, y)), logits,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(jaxnn.predict(MODEL, PARAMS, mapped, output="classes"),
                                  logits.argmax(-1))

    x_val, y_val = (a[203:] for a in _held_out(2))  # 50 examples
    by_arrays = jaxnn.fit(MODEL, PARAMS, X, Y, validation_data=(x_val, y_val), **_kwargs())
    by_source = jaxnn.fit(MODEL, PARAMS, X, Y, validation_data=Examples(x_val, y_val),
                          **_kwargs())
    assert by_source.history["val_loss"] == pytest.approx(by_arrays.history["val_loss"],
                                                          rel=1e-6)

    bad = y.copy()
    bad[1500] = -1
    with pytest.raises(ValueError, match="label -1 at example 1500"):
        jaxnn.evaluate(MODEL, PARAMS, Examples(x, bad), loss=LOSS)
    broken = x.copy()
    broken[2100, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        jaxnn.evaluate(MODEL, PARAMS, Examples(broken, y), loss=LOSS)
