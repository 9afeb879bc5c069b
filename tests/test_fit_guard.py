"""fit and fit_many stop at the first non-finite loss or gradient, and hand back the
last good point; checked against a plain loop written here that stops the same way."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_params import numpy_init

import jaxnn
from jaxnn.training import NonFiniteError, fit

THRESHOLD = 3.0  # the loss below turns NaN once a logit's size passes this


def _data(n=50, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    y = np.argmax(x @ rng.normal(size=(features, classes)), axis=-1).astype(np.int32)
    return x, y


def _model():
    return jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dense(3)])


_init = numpy_init


def blowing_up(kind):
    """Cross-entropy that turns NaN (or whose gradient turns NaN) past THRESHOLD."""

    def loss(logits, labels, *, weights):
        ce = jaxnn.losses.sparse_softmax_cross_entropy(logits, labels, weights=weights)
        size = jnp.max(jnp.abs(logits))
        if kind == "loss":  # the value is NaN; the gradient of the added term is 0
            return ce + jax.lax.stop_gradient(jnp.where(size > THRESHOLD, jnp.nan, 0.0))
        # the value stays finite; d/ds sqrt(s - T) is inf at s = T, NaN below it
        return ce + 0.0 * jnp.sqrt(jnp.maximum(THRESHOLD + 1e-3 - size, 0.0))

    loss.kind = kind
    return loss


_REFERENCES = {}


def _reference(model, params, x, y, loss, optimizer, batch_size, epochs):
    """:func:`_plain_loop`, computed once per loss kind (every test here uses the
    same data, initial params, optimizer and batch size)."""
    kind = loss.kind
    if kind not in _REFERENCES:
        _REFERENCES[kind] = _plain_loop(model, params, x, y, loss, optimizer, batch_size,
                                        epochs)
    return _REFERENCES[kind]


def _plain_loop(model, params, x, y, loss, optimizer, batch_size, epochs):
    """In-order batches (shuffle=False), the short last batch weighted; stops before
    the first step whose loss or gradient is not finite: (params, opt_state, epoch, step)."""
    grad = jax.jit(jax.value_and_grad(
        lambda p, xb, yb, w: loss(model.apply(p, xb), yb, weights=w)))

    @jax.jit  # optax's update, one program (op by op, each operation compiles its own)
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = jax.jit(optimizer.init)(params)
    for epoch in range(epochs):
        for step, start in enumerate(range(0, len(x), batch_size)):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            value, grads = grad(params, xb, yb, np.ones(len(xb)))
            finite = np.isfinite(value) and all(
                np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
            if not finite:
                return params, opt_state, epoch, step
            params, opt_state = update(grads, opt_state, params)
    raise AssertionError("the reference never met a non-finite value: raise the learning rate")


def _assert_trees_close(got, want, rtol=1e-9, atol=1e-12):
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# The whole epoch in a loop, and chunks of 2 straight-line steps (the bad step may be in
# the second chunk of its epoch)
@pytest.mark.parametrize(("kind", "steps_per_call"), [("loss", "epoch"), ("gradient", 2)])
def test_fit_stops_at_the_first_bad_step_with_the_last_good_values(x64, kind, steps_per_call):
    x, y = _data()
    model = _model()
    params = _init(model, x)
    loss = blowing_up(kind)
    optimizer = optax.adam(0.05)
    want_params, want_opt, want_epoch, want_step = _reference(
        model, params, x, y, loss, optimizer, 16, 20)
    assert want_epoch >= 1  # the failing epoch is not the first: history has good epochs
    with pytest.raises(NonFiniteError) as caught:
        fit(model, params, x, y, loss=loss, optimizer=optimizer, key=jax.random.key(1),
            epochs=20, batch_size=16, shuffle=False, steps_per_call=steps_per_call, verbose=0)
    error = caught.value
    assert (error.epoch, error.step) == (want_epoch, want_step)
    assert error.what == ("the loss is" if kind == "loss" else "the gradient is")
    message = str(error)
    assert f"epoch {want_epoch + 1}/20" in message and f"step {want_step + 1}/4" in message
    assert error.result.epoch == want_epoch
    assert len(error.result.history["loss"]) == want_epoch
    assert all(np.isfinite(error.result.history["loss"]))
    _assert_trees_close(error.result.params, want_params)
    _assert_trees_close(error.result.opt_state, want_opt)


def test_warn_returns_the_last_good_point(x64):
    x, y = _data()
    model = _model()
    params = _init(model, x)
    loss, optimizer = blowing_up("loss"), optax.adam(0.05)
    want_params, _, want_epoch, _ = _reference(model, params, x, y, loss, optimizer, 16, 20)
    # the programs of the "loss" case above (the whole epoch), from the cache
    with pytest.warns(RuntimeWarning, match="NaN or inf at epoch"):
        result = fit(model, params, x, y, loss=loss, optimizer=optimizer, key=jax.random.key(1),
                     epochs=20, batch_size=16, shuffle=False, verbose=0, on_nonfinite="warn")
    _assert_trees_close(result.params, want_params)
    assert result.epoch == want_epoch


def test_ignore_trains_on_into_nan(x64):
    x, y = _data()
    model = _model()
    params = _init(model, x)
    loss, optimizer = blowing_up("loss"), optax.adam(0.05)
    _, _, bad_epoch, _ = _reference(model, params, x, y, loss, optimizer, 16, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fit(model, params, x, y, loss=loss, optimizer=optimizer, key=jax.random.key(1),
                     epochs=bad_epoch + 1, batch_size=16, shuffle=False, verbose=0,
                     on_nonfinite="ignore")
    assert np.isnan(result.history["loss"][-1])  # the old behaviour, asked for
    assert np.isfinite(result.history["loss"][:-1]).all()


def test_streamed_batches_stop_at_the_same_point(x64):
    x, y = _data()
    model = _model()
    params = _init(model, x)
    loss, optimizer = blowing_up("loss"), optax.adam(0.05)
    want_params, _, want_epoch, want_step = _reference(model, params, x, y, loss, optimizer,
                                                       16, 20)
    batches = [(x[s:s + 16], y[s:s + 16]) for s in range(0, len(x), 16)]
    with pytest.raises(NonFiniteError) as caught:
        fit(model, params, batches, loss=loss, optimizer=optimizer, key=jax.random.key(1),
            epochs=20, verbose=0)
    assert (caught.value.epoch, caught.value.step) == (want_epoch, want_step)
    _assert_trees_close(caught.value.result.params, want_params)


def test_checkpoints_keep_only_good_epochs(x64, tmp_path):
    x, y = _data()
    model = _model()
    params = _init(model, x)
    _, _, bad_epoch, _ = _reference(model, params, x, y, blowing_up("loss"), optax.adam(0.05),
                                    16, 20)
    with pytest.raises(NonFiniteError) as caught:
        fit(model, params, x, y, loss=blowing_up("loss"), optimizer=optax.adam(0.05),
            key=jax.random.key(1), epochs=20, batch_size=16, shuffle=False, verbose=0,
            callbacks=[jaxnn.callbacks.ModelCheckpoint(tmp_path, max_to_keep=2)])
    saved = jaxnn.checkpoint.list_checkpoints(tmp_path)
    assert len(saved) == min(2, bad_epoch)
    latest = jaxnn.resume(tmp_path, params=params)
    assert latest.epoch == bad_epoch  # the last epoch completed before the NaN
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(latest.params))
    # the failing epoch's starting point is the last checkpoint
    assert caught.value.epoch == bad_epoch


def test_fit_many_stops_for_the_population_naming_the_member(x64):
    x, y = _data()
    model = _model()
    params = _init(model, x)
    loss = blowing_up("loss")
    want_params, _, want_epoch, want_step = _reference(model, params, x, y, loss,
                                                       optax.adam(0.05), 16, 20)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), params)
    rates = jnp.array([1e-3, 0.05, 2e-3])  # member 1 is the reference; the others stay finite
    with pytest.raises(NonFiniteError) as caught:
        jaxnn.fit_many(model, stacked, x, y, loss=loss,
                       optimizer=lambda hp: optax.adam(hp["lr"]), hyperparams={"lr": rates},
                       key=jax.random.key(1), epochs=20, batch_size=16, shuffle=False,
                       verbose=0)
    assert "member(s) [1]" in str(caught.value)
    assert (caught.value.epoch, caught.value.step) == (want_epoch, want_step)
    member = jax.tree_util.tree_map(lambda a: a[1], caught.value.result.params)
    _assert_trees_close(member, want_params)


@pytest.mark.parametrize("value", ["stop", None])
def test_on_nonfinite_takes_three_words(value):
    x, y = _data(n=8)
    model = _model()
    params = _init(model, x)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        fit(model, params, x, y, loss="sparse_softmax_cross_entropy", optimizer=optax.sgd(0.1),
            key=jax.random.key(1), verbose=0, on_nonfinite=value)
