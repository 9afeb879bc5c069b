"""apply/apply_with_state refuse params (and state) that do not match their model.

Each bad-input case builds a model, the params of some other model (or the
right params, edited), and the strings the error must contain: the layer path,
the parameter, and the expected and actual shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn import (
    GRU,
    LSTM,
    BatchNorm,
    Conv1D,
    Conv2D,
    Dense,
    Embedding,
    LayerNorm,
    Sequential,
    SimpleRNN,
    relu,
)
from jaxnn.errors import ParamsMismatchError
from jaxnn.layers import _base, _params_check

VEC = jax.ShapeDtypeStruct((2, 3), jnp.float32)
SEQ = jax.ShapeDtypeStruct((2, 4, 3), jnp.float32)
SIGNAL = jax.ShapeDtypeStruct((2, 8, 2), jnp.float32)
IMAGE = jax.ShapeDtypeStruct((2, 6, 6, 2), jnp.float32)
IDS = jax.ShapeDtypeStruct((2, 4), jnp.int32)


def built(model, *inputs):
    """``(params, state)`` of ``model`` for ``inputs``, as zeros (no compilation)."""
    trees = jax.eval_shape(model.initialize, jax.random.key(0), *inputs)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), trees)


def params_of(model, *inputs):
    return built(model, *inputs)[0]


def edit(tree, path: str, value: Any = None, *, delete: bool = False):
    """A copy of a nested dict with the entry at ``"a/b"`` replaced or deleted."""
    tree = dict(tree)
    head, _, rest = path.partition("/")
    if rest:
        tree[head] = edit(tree[head], rest, value, delete=delete)
    elif delete:
        del tree[head]
    else:
        tree[head] = value
    return tree


@jaxnn.model
def residual(nn, x):
    h = relu(nn(Dense(4), x))
    return x + nn(Dense(3), h)


@jaxnn.model
def residual_wide(nn, x):
    h = relu(nn(Dense(6), x))
    return x + nn(Dense(3), h)


@jaxnn.model
def normed(nn, x):
    return nn(LayerNorm(), nn(Dense(4), x))


MLP = Sequential([Dense(4), relu, Dense(3)])
CNN = Sequential([Conv2D(4, 3), relu, Conv2D(5, 3)])
NESTED = Sequential([Sequential([Dense(4), relu, Dense(4)]), Dense(2)])
BLOCKS = Sequential([Sequential([Conv2D(3, 3), relu], name="block_0"), Conv2D(2, 3)])
DENSE_BN = Sequential([Dense(4), BatchNorm()])


@dataclasses.dataclass
class Case:
    model: Any
    inputs: tuple
    params: Callable[[], Any]
    says: tuple[str, ...]
    state: Callable[[], Any] | None = None


def good(model, *inputs):
    return lambda: params_of(model, *inputs)


CASES = {
    # -- Dense
    "dense/wrong units": Case(Dense(4), (VEC,), good(Dense(5), VEC),
                              ("layer 'dense'", "'kernel'", "(3, 4)", "(3, 5)")),
    "dense/missing bias": Case(Dense(4), (VEC,),
                               lambda: edit(params_of(Dense(4), VEC), "bias", delete=True),
                               ("layer 'dense'", "'bias'", "(4,)")),
    "dense/extra parameter": Case(Dense(4), (VEC,),
                                  lambda: edit(params_of(Dense(4), VEC), "scale", jnp.ones(4)),
                                  ("layer 'dense'", "'scale'", "(4,)")),
    "dense/no bias layer given a bias": Case(
        Dense(4, use_bias=False), (VEC,), good(Dense(4), VEC), ("'bias'", "(4,)")),
    "dense/params of a Sequential": Case(Dense(4), (VEC,), good(MLP, VEC),
                                         ("layer 'dense'", "'kernel'", "(3, 4)",
                                                                       "another model")),
    # -- Conv1D
    "conv1d/wrong kernel size": Case(Conv1D(4, 3), (SIGNAL,), good(Conv1D(4, 5), SIGNAL),
                                     ("layer 'conv1d'", "'kernel'", "(3, 2, 4)", "(5, 2, 4)")),
    "conv1d/wrong filters": Case(Conv1D(4, 3), (SIGNAL,), good(Conv1D(6, 3), SIGNAL),
                                 ("layer 'conv1d'", "'kernel'", "(3, 2, 4)", "(3, 2, 6)")),
    # -- Conv2D
    "conv2d/wrong kernel size": Case(Conv2D(4, 3), (IMAGE,), good(Conv2D(4, 2), IMAGE),
                                     ("layer 'conv2d'", "'kernel'", "(3, 3, 2, 4)",
                                      "(2, 2, 2, 4)")),
    "conv2d/wrong channels": Case(
        CNN, (IMAGE,), good(Sequential([Conv2D(3, 3), relu, Conv2D(5, 3)]), IMAGE),
        ("layer 'conv2d_0'", "'kernel'", "(3, 3, 2, 4)", "(3, 3, 2, 3)")),
    "conv2d/wrong in-channels of the second conv": Case(
        CNN, (IMAGE,),
        lambda: edit(params_of(CNN, IMAGE), "conv2d_1/kernel", jnp.zeros((3, 3, 3, 5))),
        ("layer 'conv2d_1'", "'kernel'", "(3, 3, 4, 5)", "(3, 3, 3, 5)")),
    "conv2d/missing layer": Case(CNN, (IMAGE,),
                                 lambda: edit(params_of(CNN, IMAGE), "conv2d_1", delete=True),
                                 ("layer 'conv2d_1'", "kernel (3, 3, 4, 5)", "bias (5,)")),
    # -- BatchNorm (params and state)
    "batchnorm/wrong scale": Case(
        DENSE_BN, (VEC,), lambda: edit(built(DENSE_BN, VEC)[0], "batchnorm_0/scale",
                                       jnp.ones(5)),
        ("layer 'batchnorm_0'", "'scale'", "(4,)", "(5,)"), state=lambda: built(DENSE_BN, VEC)[1]),
    "batchnorm/wrong state": Case(
        DENSE_BN, (VEC,), lambda: built(DENSE_BN, VEC)[0],
        ("state", "layer 'batchnorm_0'", "'mean'", "(4,)", "(6,)"),
        state=lambda: edit(built(DENSE_BN, VEC)[1], "batchnorm_0/mean", jnp.zeros(6))),
    "batchnorm/missing offset": Case(
        BatchNorm(), (VEC,), lambda: edit(built(BatchNorm(), VEC)[0], "offset", delete=True),
        ("layer 'batchnorm'", "'offset'", "(3,)"), state=lambda: built(BatchNorm(), VEC)[1]),
    "batchnorm/extra state entry": Case(
        DENSE_BN, (VEC,), lambda: built(DENSE_BN, VEC)[0],
        ("layer 'batchnorm_0'", "'count'", "()"),
        state=lambda: edit(built(DENSE_BN, VEC)[1], "batchnorm_0/count", jnp.zeros(()))),
    # -- LayerNorm
    "layernorm/wrong shape": Case(normed, (VEC,),
                                  lambda: edit(params_of(normed, VEC), "layernorm_0/scale",
                                               jnp.ones(3)),
                                  ("layer 'layernorm_0'", "'scale'", "(4,)", "(3,)")),
    "layernorm/missing scale": Case(LayerNorm(), (VEC,), good(LayerNorm(use_scale=False), VEC),
                                    ("layer 'layernorm'", "'scale'", "(3,)")),
    # -- Embedding
    "embedding/wrong vocabulary": Case(Embedding(10, 4), (IDS,), good(Embedding(12, 4), IDS),
                                       ("layer 'embedding'", "'embedding'", "(10, 4)",
                                        "(12, 4)")),
    "embedding/wrong features": Case(Embedding(10, 4), (IDS,), good(Embedding(10, 6), IDS),
                                     ("layer 'embedding'", "'embedding'", "(10, 4)",
                                      "(10, 6)")),
    # -- recurrent
    "simple_rnn/wrong units": Case(SimpleRNN(5), (SEQ,), good(SimpleRNN(6), SEQ),
                                   ("layer 'simple_rnn'", "'kernel'", "(3, 5)", "(3, 6)")),
    "lstm/missing recurrent kernel": Case(
        LSTM(5), (SEQ,), lambda: edit(params_of(LSTM(5), SEQ), "recurrent_kernel", delete=True),
        ("layer 'lstm'", "'recurrent_kernel'", "(5, 20)")),
    "gru/wrong units": Case(GRU(5), (SEQ,), good(GRU(4), SEQ),
                            ("layer 'gru'", "'kernel'", "(3, 15)", "(3, 12)")),
    "lstm/params of a GRU": Case(LSTM(5), (SEQ,), good(GRU(5), SEQ),
                                 ("layer 'lstm'", "'kernel'", "(3, 20)", "(3, 15)")),
    "gru/extra parameter": Case(GRU(5), (SEQ,), good(GRU(5), SEQ), ()),  # placeholder, below
    # -- nested Sequential
    "nested/wrong units": Case(
        NESTED, (VEC,), good(Sequential([Sequential([Dense(4), relu, Dense(5)]), Dense(2)]), VEC),
        ("layer 'sequential_0/dense_1'", "'kernel'", "(4, 4)", "(4, 5)")),
    "nested/missing layer": Case(
        NESTED, (VEC,), lambda: edit(params_of(NESTED, VEC), "sequential_0/dense_0", delete=True),
        ("layer 'sequential_0/dense_0'", "kernel (3, 4)", "bias (4,)")),
    "nested/extra layer": Case(
        NESTED, (VEC,), lambda: edit(params_of(NESTED, VEC), "dense_9", params_of(Dense(2), VEC)),
        ("'dense_9'", "kernel (3, 2)", "bias (2,)")),
    "nested/named block, wrong kernel size": Case(
        BLOCKS, (IMAGE,),
        good(Sequential([Sequential([Conv2D(3, 1), relu], name="block_0"), Conv2D(2, 3)]), IMAGE),
        ("layer 'block_0/conv2d_0'", "'kernel'", "(3, 3, 2, 3)", "(1, 1, 2, 3)")),
    # -- functional model
    "model/wrong units": Case(residual, (VEC,), good(residual_wide, VEC),
                              ("layer 'dense_0'", "'kernel'", "(3, 4)", "(3, 6)")),
    "model/missing layer": Case(residual, (VEC,),
                                lambda: edit(params_of(residual, VEC), "dense_1", delete=True),
                                ("layer 'dense_1'", "kernel (4, 3)", "bias (3,)")),
    "model/extra parameter": Case(
        residual, (VEC,), lambda: edit(params_of(residual, VEC), "dense_0/scale", jnp.ones(4)),
        ("layer 'dense_0'", "'scale'", "(4,)")),
    "model/an array where a layer belongs": Case(
        residual, (VEC,), lambda: edit(params_of(residual, VEC), "dense_1", jnp.ones((4, 3))),
        ("'dense_1'", "dict", "(4, 3)")),
    # -- another model entirely
    "mlp/params of a CNN": Case(MLP, (VEC,), good(CNN, IMAGE),
                                ("layer 'dense_0'", "kernel (3, 4)", "bias (4,)", "another model")),
    "cnn/params of an MLP": Case(CNN, (IMAGE,), good(MLP, VEC),
                                 ("layer 'conv2d_0'", "kernel (3, 3, 2, 4)", "bias (4,)",
                                  "another model")),
    "mlp/empty params": Case(MLP, (VEC,), lambda: {}, ("empty", "kernel (3, 4)")),
}
CASES["gru/extra parameter"] = Case(
    GRU(5), (SEQ,), lambda: edit(params_of(GRU(5), SEQ), "peephole", jnp.zeros(5)),
    ("layer 'gru'", "'peephole'", "(5,)"))


def inputs_for(case: Case) -> tuple:
    return tuple(jnp.zeros(s.shape, s.dtype) for s in case.inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_mismatched_params_name_the_path_parameter_and_shapes(name):
    case = CASES[name]
    params, xs = case.params(), inputs_for(case)
    with pytest.raises(ParamsMismatchError) as info:
        if case.state is None:
            case.model.apply(params, *xs)
        else:
            case.model.apply_with_state(params, case.state(), *xs, train=True)
    message = str(info.value)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError)


def test_wrong_units_no_longer_pass_silently():
    x = jnp.ones((2, 3))
    with pytest.raises(ParamsMismatchError, match=r"'kernel': expected shape \(3, 4\), got "
                                                  r"\(3, 5\); 'bias': expected shape \(4,\)"):
        Dense(4).apply(params_of(Dense(5), VEC), x)


def test_mismatch_is_caught_under_jit_and_vmap():
    x = jnp.zeros((2, 3))
    bad = params_of(Sequential([Dense(4), relu, Dense(5)]), VEC)
    with pytest.raises(ParamsMismatchError, match="dense_1"):
        jax.jit(MLP.apply)(bad, x)
    # Under vmap the check sees one member's shapes.
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), bad)
    with pytest.raises(ParamsMismatchError, match=r"expected shape \(4, 3\), got \(4, 5\)"):
        jax.vmap(MLP.apply, in_axes=(0, None))(stacked, x)


def test_a_wrong_input_keeps_the_layers_own_message_with_a_note():
    params = params_of(MLP, VEC)
    with pytest.raises(ValueError, match=r"Dense layer 'dense_0': expected input with last "
                                         r"dimension \(features\) 3, got shape \(2, 7\)") as info:
        MLP.apply(params, jnp.zeros((2, 7)))
    assert not isinstance(info.value, ParamsMismatchError)
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "'kernel': expected shape (7, 4), got (3, 4)" in note


def test_input_derived_mismatch_the_model_accepts_is_still_an_error():
    # A BatchNorm scale of shape (1,) broadcasts over 3 channels: the layer would not
    # complain, so the check must.
    params, state = built(BatchNorm(), VEC)
    params = edit(params, "scale", jnp.ones(1))
    with pytest.raises(ParamsMismatchError, match=r"'scale': expected shape \(3,\), got \(1,\)"):
        BatchNorm().apply_with_state(params, state, jnp.zeros((2, 3)))


MODELS = {
    "dense": (Dense(4), VEC), "conv1d": (Conv1D(4, 3), SIGNAL), "blocks": (BLOCKS, IMAGE),
    "layernorm": (LayerNorm(), VEC), "embedding": (Embedding(10, 4), IDS),
    "simple_rnn": (SimpleRNN(5), SEQ), "lstm": (LSTM(5), SEQ), "gru": (GRU(5), SEQ),
    "nested": (NESTED, VEC), "model": (residual, VEC),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_matching_params_pass_under_jit_grad_and_vmap(name):
    model, struct = MODELS[name]
    params = params_of(model, struct)
    x = jnp.zeros(struct.shape, struct.dtype)

    @jax.jit
    def run(params, x):
        y = model.apply(params, x)
        grads = jax.grad(lambda p: jnp.sum(model.apply(p, x)))(params)
        members = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), params)
        return y, grads, jax.vmap(model.apply, in_axes=(0, None))(members, x)

    # Tracing is where the check runs; compiling would only slow the test down.
    y, grads, ys = jax.eval_shape(run, params, x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert ys.shape == (3, *y.shape)


@pytest.mark.parametrize("model", [MLP, NESTED, residual, normed])
def test_matching_params_pass_under_per_example_vmap(model):
    # The check then sees one example, without the batch axis.
    params = params_of(model, VEC)
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(jax.vmap(model.apply, in_axes=(None, 0))(params, x),
                               model.apply(params, x), rtol=1e-6)


def test_state_is_checked_and_stateful_models_run_under_jit():
    params, state = built(DENSE_BN, VEC)
    x = jnp.ones((2, 3))
    _, new_state = jax.jit(lambda p, s, x: DENSE_BN.apply_with_state(p, s, x, train=True))(
        params, state, x)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    # An empty state is left to the layer, whose message says what to do.
    with pytest.raises(ValueError, match="running statistics"):
        DENSE_BN.apply_with_state(params, {}, x)


def test_dtypes_are_not_checked():
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params_of(MLP, VEC))
    assert MLP.apply(params, jnp.ones((2, 3), jnp.bfloat16)).shape == (2, 3)


def test_the_check_adds_nothing_to_the_compiled_program():
    for model, struct in [(MLP, VEC), (BLOCKS, IMAGE), (residual, VEC), (LSTM(5), SEQ)]:
        params = params_of(model, struct)
        checked = jax.make_jaxpr(jax.jit(model.apply))(params, struct)
        raw = jax.make_jaxpr(jax.jit(lambda p, x, m=model: m.forward(p, {}, x)[0]))(params, struct)
        assert str(checked.jaxpr.eqns[0].params["jaxpr"]) == str(raw.jaxpr.eqns[0].params["jaxpr"])


def test_eager_calls_reuse_the_expected_tree():
    calls = []
    dense = Dense(3)

    def initialize(key, x):
        calls.append(x.shape)
        return dense.initialize(key, x)

    counted = jaxnn.Layer("counted", initialize, dense.forward, spec="Counted")
    params = params_of(dense, VEC)
    x = jnp.ones((2, 3))
    counted.apply(params, x)
    counted.apply(params, x)
    assert calls == [(2, 3)]
    counted.apply(params, jnp.ones((5, 3)))  # new input shape: computed once more
    counted.apply(params, jnp.ones((5, 3)))
    assert calls == [(2, 3), (5, 3)]


def test_check_stands_aside_when_initialize_cannot_run():
    def initialize(key, x):
        raise RuntimeError("this layer is only ever built by hand")

    def forward(params, state, x, *, key=None, train=False):
        return x * params["w"], state

    by_hand = jaxnn.Layer("by_hand", initialize, forward)
    assert by_hand.apply({"w": jnp.array(2.0)}, jnp.ones(3)).shape == (3,)
    # Inputs that are not arrays (a dict): nothing to check against.
    keyed = jaxnn.Layer("keyed", lambda key, d: ({"w": jnp.ones(())}, {}),
                        lambda params, state, d, **kw: (d["a"] * params["w"], state))
    assert keyed.apply({"w": jnp.array(2.0)}, {"a": jnp.ones(3)}).shape == (3,)


def test_keyword_inputs_still_reach_the_layer():
    params = params_of(LSTM(5), SEQ)
    x = jnp.ones((2, 4, 3))
    y = jax.jit(lambda p, x, n: LSTM(5).apply(p, x, lengths=n))(params, x, jnp.array([2, 4]))
    assert y.shape == (2, 5)


def test_summary_is_unchanged_by_the_check(monkeypatch):
    # A layer whose forward calls another model's apply runs the check inside the summary.
    inner = Sequential([Dense(4), relu, Dense(3)])

    def forward(params, state, x, *, key=None, train=False):
        return inner.apply(params, x), state

    wrapped = Sequential([jaxnn.Layer("wrapped", inner.initialize, forward), Dense(2)])
    checked = wrapped.summary(jnp.ones((2, 3)))
    monkeypatch.setattr(_base, "check_params", lambda *a, **k: None)
    _params_check.expected_trees.cache_clear()
    _params_check._signature.cache_clear()
    assert wrapped.summary(jnp.ones((2, 3))) == checked
    assert checked.count("dense_0") == 2  # wrapped/dense_0 (inner) and dense_0, once each
