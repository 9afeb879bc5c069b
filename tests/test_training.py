"""fit / evaluate / predict against a plain optax loop written here.

Most fits here train the same float64 model on the same 40 examples with the same
optimizer, penalty and batch size: one training program, compiled once and loaded from
the compilation cache by the other tests (they differ in what is checked, not in the
program).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_params import numpy_init

import jaxnn
from jaxnn.training import Callback, evaluate, fit, predict


def _data(n=40, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.1 * rng.normal(size=(n, classes)), axis=-1).astype(np.int32)
    return x, y


def _model():
    return jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dense(3)])


_init = numpy_init


def _np_logits(params, x):
    """The float64 numpy forward pass of :func:`_model`."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = np.tanh(np.asarray(x, np.float64) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    return h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# The common training setup (float64): adam(1e-2), an L2 penalty, batches of 16 from 40
# examples (2 full batches and one of 8).
L2 = 1e-3
COMMON = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy, batch_size=16, verbose=0)


def _common_fit(model, params, x, y, **kwargs):
    return fit(model, params, x, y, **{"optimizer": optax.adam(1e-2),
                                       "penalty": jaxnn.regularizers.l2(L2), **COMMON,
                                       **kwargs})


def _np_l2(params):
    return L2 * sum(np.sum(np.asarray(params[k]["kernel"]) ** 2) for k in params)


def _reference_loop(model, params, x, y, batch_size, epochs, optimizer, l2=0.0):
    """The textbook loop: in-order batches, the last one short, mean loss per batch."""

    def objective(p, xb, yb):
        logits = model.apply(p, xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce + l2 * sum(jnp.sum(p[k]["kernel"] ** 2) for k in p)

    grad = jax.jit(jax.grad(objective))

    @jax.jit  # optax's update, one program (op by op, each operation compiles its own)
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = jax.jit(optimizer.init)(params)
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            params, opt_state = update(grad(params, xb, yb), opt_state, params)
    return params


def _assert_trees_close(got, want, rtol=1e-9, atol=1e-12):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def plain_loop_case():
    """The data, initial params and the plain loop's result (3 epochs of the common setup,
    unshuffled), computed once for the tests below that compare fit with it."""
    with jax.enable_x64(True):
        x, y = _data()  # batch 16: 2 full batches and one of 8
        model = _model()
        params = _init(model, x)
        expected = _reference_loop(model, params, x, y, 16, 3, optax.adam(1e-2), l2=L2)
    return x, y, model, params, expected


# 3 steps an epoch: the whole epoch, one step a call, and chunks of 2 then 1 (a chunk and
# a remainder, whose 1-step program is the steps_per_call=1 case's, loaded from the cache).
@pytest.mark.parametrize("steps_per_call", [None, 1, 2])
def test_fit_equals_plain_loop_with_short_last_batch(x64, plain_loop_case, steps_per_call):
    x, y, model, params, expected = plain_loop_case
    result = _common_fit(model, params, x, y, key=jax.random.key(1), epochs=3, shuffle=False,
                         steps_per_call=steps_per_call)
    _assert_trees_close(result.params, expected)
    assert result.epoch == 3 and len(result.history["loss"]) == 3


def test_fit_with_our_adam_equals_optax_adam(x64, plain_loop_case):
    # jaxnn's adam in fit against optax's adam in the plain loop
    x, y, model, params, expected = plain_loop_case
    ours = _common_fit(model, params, x, y, optimizer=jaxnn.optimizers.adam(1e-2),
                       key=jax.random.key(3), epochs=3, shuffle=False)
    _assert_trees_close(ours.params, expected)


def test_shuffling_is_deterministic_per_key(x64, plain_loop_case):
    x, y, model, params, _ = plain_loop_case
    run = lambda k: _common_fit(model, params, x, y, key=jax.random.key(k),
                                epochs=1).params["dense_0"]["kernel"]
    first = run(5)
    np.testing.assert_array_equal(first, run(5))
    assert not np.allclose(first, run(6))


def test_history_matches_evaluate_and_validation(x64):
    # 50 examples, the last 10 held out: the 40 left train in the common program
    x, y = _data(n=50, seed=1)
    model = _model()
    params = _init(model, x)
    result = _common_fit(model, params, x, y, key=jax.random.key(1), epochs=2,
                         validation_split=0.2)
    assert set(result.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    penalty = jaxnn.regularizers.l2(L2)
    val = evaluate(model, result.params, x[40:], y[40:],
                   loss=jaxnn.losses.sparse_softmax_cross_entropy, penalty=penalty,
                   batch_size=7)  # batches of 7 and 3 (+ 4 padded rows)
    assert val["loss"] == pytest.approx(result.history["val_loss"][-1], rel=1e-9)
    # numpy float64: the held-out rows' mean cross-entropy plus the penalty, and accuracy
    logits = _np_logits(result.params, x[40:])
    assert val["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y[40:]))
    assert result.history["val_accuracy"][-1] == pytest.approx(val["accuracy"])
    want = -_np_log_softmax(logits)[np.arange(10), y[40:]].mean() + _np_l2(result.params)
    assert val["loss"] == pytest.approx(want, rel=1e-9)


def test_predict_outputs_and_batching():
    x, _ = _data(n=23)
    x = x.astype(np.float32)
    model = _model()
    params = _init(model, x)
    logits = _np_logits(params, x)  # numpy float64 on the float32 params
    np.testing.assert_allclose(predict(model, params, x, batch_size=5), logits, rtol=1e-5,
                               atol=1e-6)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(predict(model, params, x, output="probabilities", batch_size=5),
                               probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(model, params, x, output="classes"),
                                  logits.argmax(-1))
    with pytest.raises(ValueError, match="output must be"):
        predict(model, params, x, output="softmax")


def test_streaming_batches_equal_in_memory_fit(x64, plain_loop_case):
    # a list of batches (the last one short) against the plain loop over the same batches
    x, y, model, params, expected = plain_loop_case
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)]
    kwargs = dict(loss=jaxnn.losses.sparse_softmax_cross_entropy, optimizer=optax.adam(1e-2),
                  penalty=jaxnn.regularizers.l2(L2), key=jax.random.key(1), epochs=3,
                  verbose=0)
    streamed = fit(model, params, batches, **kwargs)
    _assert_trees_close(streamed.params, expected)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(model, params, iter(batches), **kwargs)


def test_no_recompilation_after_first_epoch(x64):
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

    x, y = _data()
    model = jaxnn.Sequential([jaxnn.Dense(8), traced_tanh, jaxnn.Dense(3)])
    params = _init(model, x)
    counter = CountTraces()
    # chunks of 2 steps and of 1 (two programs), and validation: all traced in epoch 1 only
    _common_fit(model, params, x, y, key=jax.random.key(1), epochs=4, steps_per_call=2,
                validation_data=(x[:10], y[:10]), callbacks=[counter])
    assert counter.counts[0] > 0
    assert counter.counts == [counter.counts[0]] * 4


def test_fit_argument_errors():
    x, y = _data(n=20)
    model = _model()
    params = _init(model, x.astype(np.float32))
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


def test_resume_from_checkpoint_gives_the_same_parameters(x64, tmp_path):
    from jaxnn.callbacks import ModelCheckpoint
    from jaxnn.checkpoint import resume

    x, y = _data()
    # dropout: the resumed epochs must draw the masks the uninterrupted run drew
    model = jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dropout(0.3), jaxnn.Dense(3)])
    params = _init(model, x)
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


def test_early_stopping_stops_and_restores_best(x64, plain_loop_case):
    from jaxnn.callbacks import EarlyStopping

    x, y, model, params, _ = plain_loop_case
    # Validation on wrong labels: the better the model learns y, the worse its val_loss.
    x_val, y_val = x[:10], (y[:10] + 1) % 3
    stopper = EarlyStopping("val_loss", patience=1, restore_best=True)
    result = _common_fit(model, params, x, y, key=jax.random.key(0), epochs=30,
                         validation_data=(x_val, y_val), callbacks=[stopper])
    losses = result.history["val_loss"]
    assert len(losses) < 30 and stopper.stopped_epoch == len(losses) - 1
    best = int(np.argmin(losses))
    assert stopper.best_epoch == best
    got = evaluate(model, result.params, x_val, y_val,
                   loss=jaxnn.losses.sparse_softmax_cross_entropy,
                   penalty=jaxnn.regularizers.l2(L2))
    assert got["loss"] == pytest.approx(losses[best], rel=1e-9)
    # the same setup as above: the same training program, from the cache
    with pytest.raises(KeyError, match="monitor 'val_auc' is not logged"):
        _common_fit(model, params, x, y, key=jax.random.key(0), epochs=2,
                    callbacks=[EarlyStopping("val_auc")])


def test_predict_and_evaluate_compile_once():
    traces = []

    def traced_tanh(x):
        traces.append(1)  # runs only while JAX traces
        return jnp.tanh(x)

    x, y = _data(n=30)
    x = x.astype(np.float32)
    model = jaxnn.Sequential([jaxnn.Dense(4), traced_tanh, jaxnn.Dense(3)])
    params = _init(model, x)
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
    # one batch of 4 an epoch, fewer steps than 4: one chunk of 1 step, straight-line code
    # (several steps a chunk, and a remainder, are checked against the plain loop above)
    x = rng.normal(size=(4, 6, 6, 1))
    y = rng.integers(0, 3, size=4)
    cnn = jaxnn.Sequential([jaxnn.Conv2D(2, 3), jaxnn.relu, jaxnn.Flatten(), jaxnn.Dense(3)])
    mlp = jaxnn.Sequential([jaxnn.Flatten(), jaxnn.Dense(4), jaxnn.relu, jaxnn.Dense(3)])
    cnn_params = _init(cnn, x)
    # only traced (the choice, and an argument error raised before any compilation)
    mlp_params = jax.eval_shape(mlp.init, jax.random.key(0), x[:1])
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
