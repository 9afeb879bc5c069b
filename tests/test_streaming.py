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


def _data(n, features=12, classes=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(dtype)
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.3 * rng.normal(size=(n, classes)), axis=-1).astype(np.int32)
    return x, y


def _mlp(classes=4):
    return jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dense(classes)])


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


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 steps of 8 examples of 12 float32 and a label (52 bytes): every epoch
    crosses many chunks and may end with a padded one."""
    monkeypatch.setattr(_sources, "CHUNK_BYTES", 3 * 8 * 52)


def test_host_arrays_memmap_and_source_equal_the_device_path_bit_for_bit(small_chunks,
                                                                          tmp_path):
    # 203 examples in batches of 8: 26 steps, the last with 3 real rows; 8 chunks of 3
    # steps and a last one of 2 (padded to 3 steps of weight 0).
    x, y = _data(203)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(3), epochs=2,
                  batch_size=8, verbose=0)
    device = jaxnn.fit(model, params, x, y, feed="device", **kwargs)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    runs = {
        "host": jaxnn.fit(model, params, x, y, feed="host", **kwargs),
        "memmap": jaxnn.fit(model, params, mapped, y, **kwargs),  # a memmap stays on the host
        "source": jaxnn.fit(model, params, Examples(x, y), **kwargs),
        "source, item by item": jaxnn.fit(model, params, Examples(x, y, batched=False),
                                          **kwargs),
    }
    for name, run in runs.items():
        _assert_identical((run.params, run.opt_state), (device.params, device.opt_state))
        assert run.epoch == 2, name
        np.testing.assert_allclose(run.history["loss"], device.history["loss"], rtol=1e-6)


def test_streamed_resume_equals_an_uninterrupted_run(small_chunks):
    x, y = _data(150)
    model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dropout(0.3), jaxnn.Dense(4)])
    params = model.init(jax.random.key(0), x[:1])
    source = Examples(x, y)
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(5), batch_size=8,
                  verbose=0)
    whole = jaxnn.fit(model, params, source, epochs=3, **kwargs)
    first = jaxnn.fit(model, params, source, epochs=1, **kwargs)
    resumed = jaxnn.fit(model, first.params, source, epochs=3, initial_epoch=first.epoch,
                        opt_state=first.opt_state, **kwargs)
    _assert_identical((resumed.params, resumed.opt_state), (whole.params, whole.opt_state))


def test_the_device_never_holds_the_whole_dataset(monkeypatch):
    # 4,000 examples of 64 float32 (1 MB) in chunks of 3 steps of 8: while fit trains,
    # the arrays alive on the device grow by a few chunks, the plan and the model only.
    x, y = _data(4000, features=64)
    example = x[0].nbytes + y[0].nbytes
    monkeypatch.setattr(_sources, "CHUNK_BYTES", 3 * 8 * example)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    source = Examples(x, y)
    seen = []

    def live_bytes():
        seen.append(sum(a.nbytes for a in jax.live_arrays()))

    source.on_read = live_bytes
    before = sum(a.nbytes for a in jax.live_arrays())
    jaxnn.fit(model, params, source, loss=LOSS, optimizer=optax.adam(1e-3),
              key=jax.random.key(0), epochs=1, batch_size=8, verbose=0)
    # the first example, read to check the source, then every chunk of the 500 steps
    assert len(seen) == 1 + -(-500 // 3)
    model_bytes = 3 * sum(a.nbytes for a in jax.tree_util.tree_leaves(params))  # and Adam's
    plan = 4000 * (4 + 4) + 501 * 8  # the epoch plan: indices, weights, step keys
    chunk = 3 * 8 * (example + 4) + 3 * 8  # examples, weights, keys
    # the carry and the epoch's starting copy, the plan, at most 6 chunks (2 running or
    # queued, 2 prefetched, 1 being made, 1 being freed)
    bound = 2 * model_bytes + plan + 6 * chunk + 4096
    assert max(seen) - before < bound < (x.nbytes + y.nbytes) / 4, (max(seen) - before, bound)


def test_host_path_checks_labels_and_source_items():
    x, y = _data(40)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(0), verbose=0,
                  batch_size=8)
    bad = y.copy()
    bad[37] = 9
    with pytest.raises(ValueError, match=r"label 9 at example 37 .* 4 classes"):
        jaxnn.fit(model, params, Examples(x, bad), **kwargs)

    class Images(Examples):
        def __getitems__(self, indices):
            return [self.x[i] for i in indices]

    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        jaxnn.fit(model, params, Images(x, y), **kwargs)
    with pytest.raises(ValueError, match="feed='device' needs in-memory arrays"):
        jaxnn.fit(model, params, Examples(x, y), feed="device", **kwargs)
    with pytest.raises(ValueError, match="feed must be"):
        jaxnn.fit(model, params, x, y, feed="disk", **kwargs)
    with pytest.raises(ValueError, match="validation_split needs in-memory arrays"):
        jaxnn.fit(model, params, Examples(x, y), validation_split=0.2, **kwargs)


def test_an_error_in_the_source_reaches_the_caller():
    x, y = _data(64)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])

    class Failing(Examples):
        def __getitems__(self, indices):
            if max(indices) >= 32:
                raise OSError("disk gone")
            return super().__getitems__(indices)

    with pytest.raises(OSError, match="disk gone"):
        jaxnn.fit(model, params, Failing(x, y), loss=LOSS, optimizer=optax.adam(1e-2),
                  key=jax.random.key(0), batch_size=8, verbose=0, shuffle=False)


@pytest.mark.parametrize("feed", ["device", "host"])
def test_accumulation_equals_one_step_on_the_large_batch(x64, feed):
    # accumulate=4 micro-batches of 6 = one Adam step on 24 examples, in float64; 100
    # examples: 5 steps, the last of 4 real examples (micro-batches of padding add nothing).
    x, y = _data(100, dtype=np.float64)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(2), epochs=2,
                  verbose=0, penalty=jaxnn.regularizers.l2(1e-3), feed=feed)
    large = jaxnn.fit(model, params, x, y, batch_size=24, **kwargs)
    accumulated = jaxnn.fit(model, params, x, y, batch_size=6, accumulate=4, **kwargs)
    for a, b in zip(_leaves(accumulated.params), _leaves(large.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(accumulated.history["loss"], large.history["loss"], rtol=1e-12)
    np.testing.assert_allclose(accumulated.history["accuracy"], large.history["accuracy"])
    assert int(accumulated.opt_state[0].count) == 2 * 5  # one update per large batch


def test_accumulation_checks():
    x, y = _data(40)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(0), verbose=0)
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        jaxnn.fit(model, params, x, y, accumulate=0, **kwargs)
    with pytest.raises(ValueError, match=r"batch_size \* accumulate = 16 \* 4 = 64"):
        jaxnn.fit(model, params, x, y, batch_size=16, accumulate=4, **kwargs)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    with pytest.raises(ValueError, match="first batch has 10 examples"):
        jaxnn.fit(model, params, batches, accumulate=4, **kwargs)


def test_memmap_larger_than_a_chunk_trains_like_numpy(tmp_path, small_chunks):
    # A dict of inputs (two arrays) from memmaps, with a model that takes the dict.
    x, y = _data(90)
    model = jaxnn.Sequential([jaxnn.Dense(8), jaxnn.relu, jaxnn.Dense(4)])
    params = model.init(jax.random.key(0), x[:1])
    path = tmp_path / "x.dat"
    mapped = np.memmap(path, np.float32, "w+", shape=x.shape)
    mapped[:] = x
    mapped.flush()
    mapped = np.memmap(path, np.float32, "r", shape=x.shape)
    kwargs = dict(loss=LOSS, optimizer=optax.sgd(0.1), key=jax.random.key(1), epochs=2,
                  batch_size=16, verbose=0)
    a = jaxnn.fit(model, params, mapped, y, validation_split=0.2, **kwargs)
    b = jaxnn.fit(model, params, x, y, validation_split=0.2, **kwargs)
    _assert_identical(a.params, b.params)
    assert a.history["val_loss"] == pytest.approx(b.history["val_loss"], rel=1e-6)


def test_jax_arrays_with_feed_host():
    x, y = _data(48)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(1), epochs=1,
                  batch_size=16, verbose=0)
    a = jaxnn.fit(model, params, jnp.asarray(x), jnp.asarray(y), feed="host", **kwargs)
    b = jaxnn.fit(model, params, x, y, **kwargs)
    _assert_identical(a.params, b.params)


def test_evaluate_predict_and_validation_read_sources_and_memmaps(tmp_path):
    # 2,300 examples in blocks of 1,000 (the last of 300): the same numbers as arrays.
    x, y = _data(2300)
    model = _mlp()
    params = model.init(jax.random.key(0), x[:1])
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    expected = jaxnn.evaluate(model, params, x, y, loss=LOSS)
    assert jaxnn.evaluate(model, params, Examples(x, y), loss=LOSS) == pytest.approx(
        expected, rel=1e-6)
    assert jaxnn.evaluate(model, params, mapped, y, loss=LOSS) == pytest.approx(
        expected, rel=1e-6)
    logits = np.asarray(jaxnn.predict(model, params, x))
    np.testing.assert_allclose(jaxnn.predict(model, params, Examples(x, y)), logits,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(jaxnn.predict(model, params, mapped, output="classes"),
                                  logits.argmax(-1))

    kwargs = dict(loss=LOSS, optimizer=optax.adam(1e-2), key=jax.random.key(1), epochs=1,
                  batch_size=64, verbose=0)
    by_arrays = jaxnn.fit(model, params, x[:2000], y[:2000], validation_data=(x[2000:], y[2000:]),
                          **kwargs)
    by_source = jaxnn.fit(model, params, x[:2000], y[:2000],
                          validation_data=Examples(x[2000:], y[2000:]), **kwargs)
    assert by_source.history["val_loss"] == pytest.approx(by_arrays.history["val_loss"],
                                                          rel=1e-6)

    bad = y.copy()
    bad[1500] = -1
    with pytest.raises(ValueError, match="label -1 at example 1500"):
        jaxnn.evaluate(model, params, Examples(x, bad), loss=LOSS)
    broken = x.copy()
    broken[2100, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        jaxnn.evaluate(model, params, Examples(broken, y), loss=LOSS)
