"""Optimizers: number for number against optax and against numpy update rules,
schedules, chaining, jit without recompiles, dtypes, convergence, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn
from jaxnn import optimizers
from jaxnn.regularizers import kernels_only, mask_fn

STEPS = 100

# (name, ours, optax's counterpart): factories, so each test gets fresh objects.
PAIRS = {
    "gradient_descent": (lambda: optimizers.gradient_descent(0.1), lambda: optax.sgd(0.1)),
    "sgd_momentum": (lambda: optimizers.sgd(0.05, momentum=0.9),
                     lambda: optax.sgd(0.05, momentum=0.9)),
    "sgd_nesterov": (lambda: optimizers.sgd(0.05, momentum=0.9, nesterov=True),
                     lambda: optax.sgd(0.05, momentum=0.9, nesterov=True)),
    "adam": (lambda: optimizers.adam(0.01), lambda: optax.adam(0.01)),
    "adamw": (lambda: optimizers.adamw(0.01, weight_decay=0.05),
              lambda: optax.adamw(0.01, weight_decay=0.05)),
    "adamw_mask_fn": (
        lambda: optimizers.adamw(0.01, weight_decay=0.05, mask=mask_fn(kernels_only)),
        lambda: optax.adamw(0.01, weight_decay=0.05, mask=mask_fn(kernels_only)),
    ),
}


def _model():
    return jaxnn.Sequential([jaxnn.Dense(16), jax.nn.tanh, jaxnn.Dense(3)])


def _cross_entropy(logits, labels):
    """Mean softmax cross-entropy, written out: -mean(logits[y] - logsumexp(logits))."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    log_z = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    picked = jnp.take_along_axis(shifted, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(log_z - picked)


def _data():
    """Inputs, labels and initial parameters, drawn in numpy (jax.random and the layers'
    initialisers would compile programs of their own; initialisation is tested elsewhere)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 5)))
    y = jnp.asarray(rng.integers(0, 3, size=32))
    shapes = jax.eval_shape(_model().init, jax.random.key(0), x)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
    return x, y, params


def _train(model, x, y, opt, params, steps=STEPS):
    """``steps`` steps of ``opt`` on the MLP, in a scan (to call inside a jitted function)."""

    def loss(p):
        return _cross_entropy(model.apply(p, x), y)

    def step(carry, _):
        p, s = carry
        updates, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return p


def _assert_trees_close(actual, expected, rtol=1e-6, atol=1e-10):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def _assert_moved(before, after):
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)))
    assert moved > 1e-3


# An optax schedule given to ours, on the MLP. Gradient descent and SGD with a schedule
# (the same _scale_by_learning_rate as adam's) are compared with optax step by step in
# tests/test_schedules.py::test_our_optimizers_match_optax_with_a_schedule.
SCHEDULED = {
    "adam": (optimizers.adam, optax.adam),
    "adamw_scheduled_decay": (
        lambda lr: optimizers.adamw(lr, weight_decay=optax.linear_schedule(0.1, 0.0, 50)),
        lambda lr: optax.adamw(lr, weight_decay=optax.linear_schedule(0.1, 0.0, 50)),
    ),
}


def _scheduled(make):
    return make(optax.exponential_decay(init_value=0.05, transition_steps=10, decay_rate=0.5))


# Every (ours, optax's) pair trained on the MLP: PAIRS, SCHEDULED, and adam after optax's
# clipping in a chain.
MLP_RUNS = {
    **{("pair", name): (ours(), theirs()) for name, (ours, theirs) in PAIRS.items()},
    **{("scheduled", name): (_scheduled(ours), _scheduled(theirs))
       for name, (ours, theirs) in SCHEDULED.items()},
    ("chain", "clip"): (optax.chain(optax.clip_by_global_norm(1.0), optimizers.adam(1e-2)),
                        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))),
}


@pytest.fixture(scope="module")
def mlp_runs():
    """``(initial params, {case: (ours, optax's final params)})`` after STEPS steps of each
    of MLP_RUNS in float64, all the runs in one jitted program (one program per run took
    about twice the CPU time)."""
    with jax.enable_x64(True):
        model = _model()
        x, y, params = _data()

        @jax.jit
        def run(params):
            return {case: tuple(_train(model, x, y, opt, params) for opt in pair)
                    for case, pair in MLP_RUNS.items()}

        return jax.device_get(params), jax.device_get(run(params))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_matches_optax_on_mlp(name, mlp_runs):
    initial, runs = mlp_runs
    ours_final, optax_final = runs["pair", name]
    assert ours_final["dense_0"]["kernel"].dtype == np.float64
    _assert_moved(initial, ours_final)
    _assert_trees_close(ours_final, optax_final)


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_schedule_matches_optax(name, mlp_runs):
    initial, runs = mlp_runs
    ours_final, optax_final = runs["scheduled", name]
    _assert_moved(initial, ours_final)
    _assert_trees_close(ours_final, optax_final)


def test_schedule_sees_count_before_increment():
    seen = []
    opt = optimizers.gradient_descent(lambda count: seen.append(int(count)) or 0.5)
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update({"w": jnp.ones(2)}, state)
    assert seen == [0, 1, 2]
    assert int(state.count) == 3
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.5, -0.5])


def test_chain_with_optax_clip(mlp_runs):
    initial, runs = mlp_runs
    ours_final, optax_final = runs["chain", "clip"]
    _assert_moved(initial, ours_final)
    _assert_trees_close(ours_final, optax_final)


def _numpy_reference(name, grads, params0, lr=0.1, momentum=0.9, b1=0.8, b2=0.95, eps=1e-6,
                     wd=0.01):
    """The docstring formulas in float64 numpy, for a fixed sequence of gradients."""
    w = params0.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if name in ("gradient_descent", "sgd_no_momentum"):
            d = g
        elif name in ("sgd_momentum", "sgd_nesterov"):
            m = g + momentum * m
            d = g + momentum * m if name == "sgd_nesterov" else m
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g**2
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            d = m_hat / (np.sqrt(v_hat) + eps)
            if name == "adamw":
                d = d + wd * w
        w = w - lr * d
    return w


NUMPY_CASES = {
    "gradient_descent": lambda: optimizers.gradient_descent(0.1),
    "sgd_no_momentum": lambda: optimizers.sgd(0.1),
    "sgd_momentum": lambda: optimizers.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: optimizers.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optimizers.adam(0.1, b1=0.8, b2=0.95, eps=1e-6),
    "adamw": lambda: optimizers.adamw(0.1, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(NUMPY_CASES))
def test_matches_numpy_formulas(name, x64):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(6, 4))
    params0 = rng.normal(size=4)
    opt = NUMPY_CASES[name]()
    params = {"w": jnp.asarray(params0)}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    expected = _numpy_reference(name, grads, params0)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-12, atol=1e-14)
    assert int(state.count) == len(grads)


def test_adamw_prefix_mask_matches_optax(x64):
    mask = {"dense_0": True, "dense_1": False}
    ours = optimizers.adamw(0.1, weight_decay=0.5, mask=mask)
    theirs = optax.adamw(0.1, weight_decay=0.5, mask=mask)
    params = {"dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.full(2, 2.0)},
              "dense_1": {"kernel": jnp.full((2, 1), 3.0)}}
    grads = jax.tree_util.tree_map(lambda p: 0.1 * jnp.cos(p), params)

    def run(opt, p):
        s = opt.init(p)
        for _ in range(3):
            updates, s = opt.update(grads, s, p)
            p = optax.apply_updates(p, updates)
        return p

    results = jax.jit(lambda p: (run(ours, p), run(theirs, p)))(params)  # one program
    _assert_trees_close(results[0], results[1], rtol=1e-12)


def test_jit_update_equals_eager(x64):
    opt = optimizers.adamw(0.1, weight_decay=0.01)
    params = {"a": jnp.arange(3.0), "b": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + 0.5, params)
    state = opt.init(params)
    eager = opt.update(grads, state, params)
    jitted = jax.jit(opt.update)(grads, state, params)
    _assert_trees_close(jitted, eager, rtol=1e-12)


# One of each kind, constant and scheduled learning rate (all four state types).
KINDS = {
    "gradient_descent": lambda lr: optimizers.gradient_descent(lr),
    "sgd_plain": lambda lr: optimizers.sgd(lr),
    "sgd_nesterov": lambda lr: optimizers.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optimizers.adam(lr),
    "adamw_masked": lambda lr: optimizers.adamw(
        lr, weight_decay=optax.linear_schedule(0.01, 0.001, 10), mask=mask_fn(kernels_only)),
}
LEARNING_RATES = {"constant": 0.1, "schedule": optax.exponential_decay(0.1, 10, 0.5)}


def _mixed_params():
    return {"dense_0": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "bias": jnp.zeros(3)},
            "dense_1": {"kernel": jnp.ones((3, 1), jnp.float32)}}


@pytest.mark.parametrize("lr", sorted(LEARNING_RATES))
@pytest.mark.parametrize("name", sorted(KINDS))
def test_jit_no_recompile_and_dtypes_preserved(name, lr):
    opt = KINDS[name](LEARNING_RATES[lr])
    traces = 0

    def step(params, state, grads):
        nonlocal traces
        traces += 1
        updates, state = opt.update(grads, state, params)
        for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params)):
            assert u.dtype == p.dtype, (u.dtype, p.dtype)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step)
    params = _mixed_params()
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.25), params)
    state = opt.init(params)
    for _ in range(3):
        params, state = step(params, state, grads)
    assert traces == 1
    assert int(state.count) == 3
    assert params["dense_0"]["kernel"].dtype == jnp.bfloat16
    assert params["dense_0"]["bias"].dtype == jnp.float32
    assert params["dense_1"]["kernel"].dtype == jnp.float32
    assert float(params["dense_1"]["kernel"][0, 0]) < 1.0
    for field in ("trace", "mu", "nu"):
        tree = getattr(state, field, None)
        if tree is not None:
            assert tree["dense_0"]["kernel"].dtype == jnp.bfloat16
            assert tree["dense_1"]["kernel"].dtype == jnp.float32
    assert state.count.dtype == jnp.int32


CONVERGENCE = {
    "gradient_descent": (lambda: optimizers.gradient_descent(0.1), 300),
    "sgd_momentum": (lambda: optimizers.sgd(0.05, momentum=0.9), 300),
    "sgd_nesterov": (lambda: optimizers.sgd(0.05, momentum=0.9, nesterov=True), 300),
    "adam": (lambda: optimizers.adam(optax.exponential_decay(0.3, 100, 0.3)), 600),
    "adamw": (lambda: optimizers.adamw(optax.exponential_decay(0.3, 100, 0.3),
                                       weight_decay=1e-4), 600),
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_converges_on_quadratic(name):
    make, steps = CONVERGENCE[name]
    opt = make()
    target = jnp.array([1.0, -2.0, 0.5])
    curvature = jnp.array([1.0, 3.0, 0.5])

    def f(params):
        return 0.5 * jnp.sum(curvature * (params["w"] - target) ** 2)

    @jax.jit
    def run(params):
        def body(_, carry):
            p, s = carry
            updates, s = opt.update(jax.grad(f)(p), s, p)
            return optax.apply_updates(p, updates), s

        return jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))[0]

    final = run({"w": jnp.zeros(3)})
    # AdamW's minimiser is shifted by the decay: curvature*(w - target) + wd*w = 0 (lr-scaled
    # decay, small); 1e-2 covers it.
    np.testing.assert_allclose(np.asarray(final["w"]), np.asarray(target), atol=1e-2)


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="sgd: learning_rate must be >= 0.0, got -0.1"):
        optimizers.sgd(-0.1)
    with pytest.raises(ValueError, match="sgd: momentum must be >= 0.0 and < 1.0, got 1.0"):
        optimizers.sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="adam: b2 must be >= 0.0 and < 1.0"):
        optimizers.adam(0.1, b2=1.5)
    with pytest.raises(ValueError, match="adamw: weight_decay must be >= 0.0"):
        optimizers.adamw(0.1, weight_decay=-1.0)
    with pytest.raises(TypeError, match="gradient_descent: learning_rate must be a number"):
        optimizers.gradient_descent(True)


def test_adamw_needs_params():
    opt = optimizers.adamw(0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="adamw: update needs the current params"):
        opt.update(params, opt.init(params))


def test_adamw_bad_mask_structure():
    opt = optimizers.adamw(0.1, mask={"a": True, "b": False})
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="adamw: mask must be a pytree of bools"):
        opt.update(params, opt.init(params), params)


def test_adamw_mask_skips_decay(x64):
    # With zero gradients Adam's direction is 0, so only masked-in leaves decay.
    opt = optimizers.adamw(0.1, weight_decay=0.5, mask=mask_fn(kernels_only))
    params = {"dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["dense_0"]["kernel"]), [-0.05, -0.05])
    np.testing.assert_allclose(np.asarray(updates["dense_0"]["bias"]), [0.0, 0.0])


def test_state_types_and_fields():
    params = {"w": jnp.ones(2)}
    assert isinstance(optimizers.gradient_descent(0.1).init(params),
                      optimizers.GradientDescentState)
    plain = optimizers.sgd(0.1).init(params)
    assert isinstance(plain, optimizers.SgdState) and plain.trace is None
    assert optimizers.sgd(0.1, 0.9).init(params).trace["w"].shape == (2,)
    adam_state = optimizers.adam(0.1).init(params)
    assert isinstance(adam_state, optimizers.AdamState)
    assert adam_state.count.dtype == jnp.int32 and int(adam_state.count) == 0
