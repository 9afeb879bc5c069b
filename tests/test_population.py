"""fit_many: each member of a population equals the same model trained alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.population import fit_many, init_many


def _data(n=60, features=5, classes=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features))
    y = np.argmax(x @ rng.normal(size=(features, classes)), axis=-1).astype(np.int32)
    return x, y


@pytest.mark.parametrize("shared_key", [False, True], ids=["key-per-member", "shared-key"])
def test_each_member_equals_fit_alone(x64, shared_key):
    x, y = _data()
    model = jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dropout(0.2), jaxnn.Dense(3)])
    K = 3
    init_keys = jax.random.split(jax.random.key(0), K)
    # One shared training key (same batches and dropout masks for every member), or one each.
    train_key = jax.random.key(1)
    train_keys = [train_key] * K if shared_key else jax.random.split(train_key, K)
    params = init_many(model, init_keys, x[:1])
    lrs = np.array([1e-3, 1e-2, 3e-2])  # numpy: indexed below without compiling a program
    l2s = np.array([0.0, 1e-3, 1e-2])
    base_l2 = jaxnn.regularizers.l2(1.0)
    result = fit_many(
        model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
        optimizer=lambda hp: jaxnn.optimizers.adam(hp["lr"]),
        hyperparams={"lr": lrs, "l2": l2s}, penalty=lambda p, hp: hp["l2"] * base_l2(p),
        key=train_key if shared_key else train_keys, epochs=2, batch_size=16,
        validation_data=(x, y), verbose=0,
    )
    assert len(result.history["loss"]) == 2 and len(result.history["loss"][0]) == K
    # Members against fit alone (each a program of its own: lr and l2 are constants in it).
    # With a key each, the first and the last (a member mixed up with another, or the
    # population axis reversed, shows in one of them); with the shared key (the same code
    # path, the key broadcast) the last, whose lr and l2 both differ from the first's.
    for k in [0, K - 1] if not shared_key else [K - 1]:
        alone = jaxnn.fit(
            model, model.init(init_keys[k], x[:1]), x, y,
            loss=jaxnn.losses.sparse_softmax_cross_entropy,
            optimizer=jaxnn.optimizers.adam(float(lrs[k])),
            penalty=jaxnn.regularizers.l2(float(l2s[k])), key=train_keys[k], epochs=2,
            batch_size=16, validation_data=(x, y), verbose=0,
        )
        member = jax.tree_util.tree_map(lambda a, k=k: np.asarray(a)[k], result.params)
        for got, want in zip(jax.tree_util.tree_leaves(member),
                             jax.tree_util.tree_leaves(alone.params)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose([e[k] for e in result.history[name]],
                                       alone.history[name], rtol=1e-9)


def test_population_size_mismatch_is_explained():
    x, y = _data()
    model = jaxnn.Sequential([jaxnn.Dense(3)])
    # Four members' params, zeros in init_many's layout (traced, not compiled: the check
    # runs before anything is)
    shapes = jax.eval_shape(lambda keys: init_many(model, keys, x[:1].astype(np.float32)),
                            jax.random.split(jax.random.key(0), 4))
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(ValueError, match="same leading population axis.*key: 3"):
        fit_many(model, params, x.astype(np.float32), y,
                 loss=jaxnn.losses.sparse_softmax_cross_entropy,
                 optimizer=jaxnn.optimizers.sgd(0.1), key=jax.random.split(jax.random.key(1), 3),
                 verbose=0)
