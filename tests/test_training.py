"""fit / evaluate / predict against a plain optax loop written here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn.training import Callback, evaluate, fit, predict


def _data(n=50, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.1 * rng.normal(size=(n, classes)), axis=-1).astype(np.int32)
    return x, y


def _model():
    return jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dense(3)])


def _reference_loop(model, params, x, y, batch_size, epochs, optimizer, l2=0.0):
    """The textbook loop: in-order batches, the last one short, mean loss per batch."""

    def objective(p, xb, yb):
        logits = model.apply(p, xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce + l2 * sum(jnp.sum(p[k]["kernel"] ** 2) for k in p)

    grad = jax.jit(jax.grad(objective))
    opt_state = optimizer.init(params)
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            grads = grad(params, xb, yb)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    return params


@pytest.fixture(scope="module")
def plain_loop_case():
    """The data, initial params and the plain loop's result, computed once for the three
    steps_per_call cases below (the loop runs op by op; it does not depend on the case)."""
    with jax.enable_x64(True):
        x, y = _data(n=50)  # batch 16: 3 full batches and one of 2
        model = _model()
        params = model.init(jax.random.key(0), x)
        expected = _reference_loop(model, params, x, y, 16, 3, optax.adam(1e-2), l2=1e-3)
    return x, y, model, params, expected


# 4 steps an epoch: the whole epoch, one step a call, and chunks of 3 then 1 (a chunk and
# a remainder, whose 1-step program is the steps_per_call=1 case's, loaded from the cache).
@pytest.mark.parametrize("steps_per_call", [None, 1, 3])
def test_fit_equals_plain_loop_with_short_last_batch(x64, plain_loop_case, steps_per_call):
    x, y, model, params, expected = plain_loop_case
    result = fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                 optimizer=optax.adam(1e-2), key=jax.random.key(1), epochs=3,
                 batch_size=16, shuffle=False, steps_per_call=steps_per_call, verbose=0,
                 penalty=jaxnn.regularizers.l2(1e-3))
    for got, want in zip(jax.tree_util.tree_leaves(result.params),
                         jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert result.epoch == 3 and len(result.history["loss"]) == 3


def test_fit_with_our_adam_equals_optax_adam(x64):
    x, y = _data(n=40)
    model = _model()
    params = model.init(jax.random.key(0), x)
    kwargs = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy, key=jax.random.key(3),
                  epochs=2, batch_size=8, verbose=0)
    ours = fit(model, params, x, y, optimizer=jaxnn.optimizers.adam(1e-2), **kwargs)
    theirs = fit(model, params, x, y, optimizer=optax.adam(1e-2), **kwargs)
    for a, b in zip(jax.tree_util.tree_leaves(ours.params),
                    jax.tree_util.tree_leaves(theirs.params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_shuffling_is_deterministic_per_key():
    x, y = _data(n=64)
    model = _model()
    params = model.init(jax.random.key(0), x.astype(np.float32))
    run = lambda k: fit(model, params, x.astype(np.float32), y,
                        loss=jaxnn.losses.sparse_softmax_cross_entropy,
                        optimizer=optax.sgd(0.1), key=jax.random.key(k), epochs=1,
                        batch_size=8, verbose=0).params["dense_0"]["kernel"]
    first = run(5)
    np.testing.assert_array_equal(first, run(5))
    assert not np.allclose(first, run(6))


def test_history_matches_evaluate_and_validation():
    x, y = _data(n=60)
    x = x.astype(np.float32)
    model = _model()
    params = model.init(jax.random.key(0), x)
    result = fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                 optimizer=optax.adam(1e-2), key=jax.random.key(1), epochs=2,
                 batch_size=16, validation_split=0.25, verbose=0)
    assert set(result.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    val = evaluate(model, result.params, x[45:], y[45:],
                   loss=jaxnn.losses.sparse_softmax_cross_entropy, batch_size=7)
    assert val["loss"] == pytest.approx(result.history["val_loss"][-1], rel=1e-5)
    logits = np.asarray(model.apply(result.params, x[45:]), np.float64)
    assert val["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y[45:]))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert val["loss"] == pytest.approx(-log_probs[np.arange(15), y[45:]].mean(), rel=1e-5)


def test_predict_outputs_and_batching():
    x, _ = _data(n=23)
    x = x.astype(np.float32)
    model = _model()
    params = model.init(jax.random.key(0), x)
    logits = np.asarray(model.apply(params, x), np.float64)
    np.testing.assert_allclose(predict(model, params, x, batch_size=5), logits, rtol=1e-5,
                               atol=1e-6)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(predict(model, params, x, output="probabilities", batch_size=5),
                               probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(model, params, x, output="classes"),
                                  logits.argmax(-1))
    with pytest.raises(ValueError, match="output must be"):
        predict(model, params, x, output="softmax")


def test_streaming_batches_equal_in_memory_fit(x64):
    x, y = _data(n=50)
    model = _model()
    params = model.init(jax.random.key(0), x)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    kwargs = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy, optimizer=optax.adam(1e-2),
                  key=jax.random.key(1), epochs=2, verbose=0)
    streamed = fit(model, params, batches, **kwargs)
    in_memory = fit(model, params, x, y, batch_size=16, shuffle=False, **kwargs)
    for a, b in zip(jax.tree_util.tree_leaves(streamed.params),
                    jax.tree_util.tree_leaves(in_memory.params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(model, params, iter(batches), **kwargs)


def test_no_recompilation_after_first_epoch():
    traces = []

    def traced_tanh(x):
        traces.append(1)  # runs only while JAX traces
        return jnp.tanh(x)

    class CountTraces(Callback):
        def __init__(self):
            self.counts = []

        def on_epoch_end(self, info):
            self.counts.append(len(traces))
            return False

    x, y = _data(n=50)
    x = x.astype(np.float32)
    model = jaxnn.Sequential([jaxnn.Dense(8), traced_tanh, jaxnn.Dense(3)])
    params = model.init(jax.random.key(0), x)
    counter = CountTraces()
    fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
        optimizer=optax.adam(1e-2), key=jax.random.key(1), epochs=4, batch_size=16,
        validation_data=(x, y), steps_per_call=2, callbacks=[counter], verbose=0)
    assert counter.counts[0] > 0
    assert counter.counts == [counter.counts[0]] * 4


def test_fit_argument_errors():
    x, y = _data(n=20)
    model = _model()
    params = model.init(jax.random.key(0), x.astype(np.float32))
    kwargs = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy, optimizer=optax.sgd(0.1),
                  key=jax.random.key(0), verbose=0)
    with pytest.raises(ValueError, match="same number of examples.*20 and 19"):
        fit(model, params, x, y[:19], **kwargs)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fit(model, params, x, y, batch_size=0, **kwargs)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(model, params, x, y, epochs=-1, **kwargs)
    with pytest.raises(ValueError, match="validation_split"):
        fit(model, params, x, y, validation_split=1.5, **kwargs)
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        fit(model, params, x, y, metrics=["acc"], **kwargs)


def test_resume_from_checkpoint_gives_the_same_parameters(tmp_path):
    from jaxnn.callbacks import ModelCheckpoint
    from jaxnn.checkpoint import resume

    x, y = _data(n=48)
    x = x.astype(np.float32)
    model = jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dropout(0.3), jaxnn.Dense(3)])
    params = model.init(jax.random.key(0), x)
    optimizer = jaxnn.optimizers.adam(1e-2)
    kwargs = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy, optimizer=optimizer,
                  batch_size=16, verbose=0)
    full = fit(model, params, x, y, key=jax.random.key(7), epochs=4, **kwargs)

    # An interrupted run: two epochs, a checkpoint after each, then a fresh process resumes.
    fit(model, params, x, y, key=jax.random.key(7), epochs=2,
        callbacks=[ModelCheckpoint(tmp_path, max_to_keep=2)], **kwargs)
    ckpt = resume(tmp_path, params=params, opt_state=optimizer.init(params))
    assert ckpt.epoch == 2 and len(ckpt.metadata["history"]["loss"]) == 2
    resumed = fit(model, ckpt.params, x, y, key=ckpt.key, opt_state=ckpt.opt_state,
                  initial_epoch=ckpt.epoch, epochs=4, **kwargs)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                    jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.history["loss"] == full.history["loss"][2:]


def test_early_stopping_stops_and_restores_best():
    from jaxnn.callbacks import EarlyStopping

    x, y = _data(n=40)
    x = x.astype(np.float32)
    model = _model()
    params = model.init(jax.random.key(0), x)
    # A learning rate this large makes the validation loss worsen quickly.
    stopper = EarlyStopping("val_loss", patience=1, restore_best=True)
    result = fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                 optimizer=optax.sgd(50.0), key=jax.random.key(0), epochs=30, batch_size=8,
                 validation_data=(x, y), callbacks=[stopper], verbose=0)
    losses = result.history["val_loss"]
    assert len(losses) < 30 and stopper.stopped_epoch == len(losses) - 1
    best = int(np.argmin(losses))
    assert stopper.best_epoch == best
    got = evaluate(model, result.params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy)
    assert got["loss"] == pytest.approx(losses[best], rel=1e-5)
    # the same optimizer and batch size as above: the same training program, from the cache
    with pytest.raises(KeyError, match="monitor 'val_auc' is not logged"):
        fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
            optimizer=optax.sgd(50.0), key=jax.random.key(0), epochs=2, batch_size=8,
            verbose=0, callbacks=[EarlyStopping("val_auc")])


def test_predict_and_evaluate_compile_once():
    traces = []

    def traced_tanh(x):
        traces.append(1)  # runs only while JAX traces
        return jnp.tanh(x)

    x, y = _data(n=30)
    x = x.astype(np.float32)
    model = jaxnn.Sequential([jaxnn.Dense(4), traced_tanh, jaxnn.Dense(3)])
    params = model.init(jax.random.key(0), x)
    for run in (predict, lambda m, p, x: evaluate(
            m, p, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy)):
        run(model, params, x)
        after_first = len(traces)
        run(model, params, x)
        run(model, params, 2 * x)
        assert len(traces) == after_first


def test_steps_per_call_default_is_chosen_per_model_on_cpu(x64):
    # On CPU a model with a convolution runs 4 straight-line steps per call by default
    # (a convolution inside a rolled loop runs many times slower on XLA:CPU); others,
    # the whole epoch. The choice changes the program, not the numbers.
    from jaxnn._chunks import CONV_STEPS_PER_CALL_ON_CPU, default_steps_per_call

    rng = np.random.default_rng(0)
    # 16 examples in batches of 4: one chunk of 4 steps, a single straight-line program
    # (chunks with a remainder are checked against the plain loop above)
    x = rng.normal(size=(16, 6, 6, 1))
    y = rng.integers(0, 3, size=16)
    cnn = jaxnn.Sequential([jaxnn.Conv2D(2, 3), jaxnn.relu, jaxnn.Flatten(), jaxnn.Dense(3)])
    mlp = jaxnn.Sequential([jaxnn.Flatten(), jaxnn.Dense(4), jaxnn.relu, jaxnn.Dense(3)])
    cnn_params = cnn.init(jax.random.key(0), x[:1])
    mlp_params = mlp.init(jax.random.key(0), x[:1])
    assert jax.default_backend() == "cpu"
    assert default_steps_per_call(cnn, cnn_params, {}, x, 4) == CONV_STEPS_PER_CALL_ON_CPU
    assert default_steps_per_call(mlp, mlp_params, {}, x, 4) is None

    kwargs = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy,
                  optimizer=jaxnn.optimizers.adam(1e-2), key=jax.random.key(1), epochs=2,
                  batch_size=4, verbose=0)
    by_default = fit(cnn, cnn_params, x, y, **kwargs)
    chunked = fit(cnn, cnn_params, x, y, steps_per_call=CONV_STEPS_PER_CALL_ON_CPU, **kwargs)
    whole = fit(cnn, cnn_params, x, y, steps_per_call="epoch", **kwargs)
    leaves = [jax.tree_util.tree_leaves(r.params) for r in (by_default, chunked, whole)]
    for a, b, c in zip(*leaves):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="steps_per_call must be a positive integer, 'epoch'"):
        fit(mlp, mlp_params, x, y, steps_per_call="chunks", **kwargs)
