"""Learning-rate schedules: values against their formulas (numpy float64), against
optax's schedules, inside our optimizers and optax's, and argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import optimizers

STEPS = [0, 1, 2, 5, 9, 10, 11, 37, 99, 100, 101, 150, 1000]


def _cosine(t, total):
    return (1 + np.cos(np.pi * min(t, total) / total)) / 2


def _warmup_cosine(t, init, peak, warmup, total, end):
    if t < warmup:
        return init + (peak - init) * t / warmup
    return end + (peak - end) * _cosine(t - warmup, total - warmup)


def _piecewise(t, boundaries, values):
    return values[sum(b <= t for b in boundaries)]


# name: (ours, numpy formula of t, optax's equivalent)
SCHEDULES = {
    "constant": (lambda: optimizers.constant(0.03), lambda t: 0.03,
                 lambda: optax.constant_schedule(0.03)),
    "exponential": (lambda: optimizers.exponential_decay(0.1, 10, 0.5),
                    lambda t: 0.1 * 0.5 ** (t / 10),
                    lambda: optax.exponential_decay(0.1, 10, 0.5)),
    "exponential_staircase": (
        lambda: optimizers.exponential_decay(0.1, 10, 0.5, staircase=True),
        lambda t: 0.1 * 0.5 ** math.floor(t / 10),
        lambda: optax.exponential_decay(0.1, 10, 0.5, staircase=True)),
    "cosine": (lambda: optimizers.cosine_decay(0.1, 100),
               lambda t: 0.1 * _cosine(t, 100),
               lambda: optax.cosine_decay_schedule(0.1, 100)),
    "cosine_alpha": (lambda: optimizers.cosine_decay(0.1, 100, alpha=0.2),
                     lambda t: 0.1 * (0.8 * _cosine(t, 100) + 0.2),
                     lambda: optax.cosine_decay_schedule(0.1, 100, alpha=0.2)),
    "warmup_cosine": (lambda: optimizers.warmup_cosine_decay(0.0, 0.1, 10, 100, 0.001),
                      lambda t: _warmup_cosine(t, 0.0, 0.1, 10, 100, 0.001),
                      lambda: optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, 0.001)),
    "warmup_cosine_no_warmup": (
        lambda: optimizers.warmup_cosine_decay(0.0, 0.1, 0, 100),
        lambda t: 0.1 * _cosine(t, 100),
        lambda: optax.warmup_cosine_decay_schedule(0.0, 0.1, 0, 100)),
    "piecewise": (lambda: optimizers.piecewise_constant([10, 100], [0.1, 0.01, 0.002]),
                  lambda t: _piecewise(t, [10, 100], [0.1, 0.01, 0.002]),
                  lambda: optax.piecewise_constant_schedule(0.1, {10: 0.1, 100: 0.2})),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_values_match_formula_and_optax(name, x64):
    ours, formula, theirs = SCHEDULES[name]
    schedule, reference = ours(), theirs()
    value = schedule(37)  # a Python int count gives a scalar
    assert value.shape == () and value.dtype == jnp.float64
    assert float(value) == pytest.approx(formula(37), rel=1e-12)
    steps = jnp.asarray(STEPS)  # all steps at once: schedules broadcast over counts
    expected = [formula(t) for t in STEPS]
    np.testing.assert_allclose(np.asarray(schedule(steps)), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(schedule(steps)), np.asarray(reference(steps)),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_traced_int32_count_under_jit(name):
    ours, formula, _ = SCHEDULES[name]
    schedule = ours()
    counts = jnp.asarray(STEPS, jnp.int32)
    got = jax.jit(jax.vmap(schedule))(counts)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), [formula(t) for t in STEPS], rtol=2e-6,
                               atol=1e-8)  # float32: cos near pi cancels


def test_piecewise_switches_at_the_boundary():
    schedule = optimizers.piecewise_constant([3], [1.0, 0.5])
    assert [float(schedule(t)) for t in range(5)] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert float(optimizers.piecewise_constant([], [0.25])(7)) == 0.25


# Our optimizers against optax's, both given the same schedule.
OPTIMIZERS = {
    "gradient_descent": (optimizers.gradient_descent, optax.sgd),
    "sgd_momentum": (lambda lr: optimizers.sgd(lr, momentum=0.9),
                     lambda lr: optax.sgd(lr, momentum=0.9)),
    "sgd_nesterov": (lambda lr: optimizers.sgd(lr, momentum=0.9, nesterov=True),
                     lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True)),
    "adam": (optimizers.adam, optax.adam),
    "adamw": (lambda lr: optimizers.adamw(lr, weight_decay=0.1),
              lambda lr: optax.adamw(lr, weight_decay=0.1)),
}
TRAINING_SCHEDULES = ["constant", "exponential", "cosine", "warmup_cosine", "piecewise"]


def _run(opt, steps=12):
    """A few steps on a fixed quadratic, jitted (the count is traced); the params after
    each step."""
    params = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.3, -0.7])}
    target = jax.tree_util.tree_map(lambda w: 0.1 * jnp.ones_like(w), params)
    loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2 * (i + 1))  # noqa: E731
                         for i, k in enumerate(sorted(p)))

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    _, history = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps))(
        params)
    return [jax.tree_util.tree_map(lambda h, i=i: h[i], history) for i in range(steps)]


# every optimizer with the warmup schedule; every schedule with plain gradient descent
CASES = ([(name, "warmup_cosine") for name in sorted(OPTIMIZERS)]
         + [("gradient_descent", name) for name in TRAINING_SCHEDULES if name != "warmup_cosine"]
         + [("adam", "piecewise")])


@pytest.mark.parametrize("opt_name, schedule_name", CASES)
def test_our_optimizers_match_optax_with_a_schedule(opt_name, schedule_name, x64):
    ours, theirs = OPTIMIZERS[opt_name]
    # short schedules, so a dozen steps cross the warmup and the boundaries
    schedule = {"constant": optimizers.constant(0.05),
                "exponential": optimizers.exponential_decay(0.05, 3, 0.5),
                "cosine": optimizers.cosine_decay(0.05, 8),
                "warmup_cosine": optimizers.warmup_cosine_decay(0.0, 0.05, 3, 10),
                "piecewise": optimizers.piecewise_constant([2, 6], [0.05, 0.02, 0.01])
                }[schedule_name]
    got, expected = _run(ours(schedule)), _run(theirs(schedule))
    assert not np.allclose(got[-1]["kernel"], got[0]["kernel"])  # it moved
    for step, (a, b) in enumerate(zip(got, expected)):
        for k in a:
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-12,
                                       atol=1e-14, err_msg=f"{k} after step {step + 1}")


@pytest.mark.parametrize("make", [optax.rmsprop, optax.adagrad, optax.lion, optax.adamax,
                                  optax.nadam, lambda lr: optax.adamw(lr, weight_decay=lr)])
def test_optax_optimizers_accept_ours(make, x64):
    ours = optimizers.warmup_cosine_decay(0.0, 0.05, 3, 10, 0.001)
    theirs = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, 10, 0.001)
    got, expected = _run(make(ours)), _run(make(theirs))
    # optax's warmup schedule rounds some intermediate steps through float32
    np.testing.assert_allclose(np.asarray(got[-1]["kernel"]), np.asarray(expected[-1]["kernel"]),
                               rtol=1e-6)


BAD_ARGUMENTS = [
    (lambda: optimizers.constant(-0.1), ValueError, r"constant: value must be a finite number "
                                                    r">= 0, got -0.1"),
    (lambda: optimizers.constant("0.1"), TypeError, "constant: value must be a number"),
    (lambda: optimizers.exponential_decay(0.1, -10, 0.5), ValueError,
     "exponential_decay: transition_steps must be >= 1, got -10"),
    (lambda: optimizers.exponential_decay(0.1, 0, 0.5), ValueError,
     "exponential_decay: transition_steps must be >= 1, got 0"),
    (lambda: optimizers.exponential_decay(0.1, 2.5, 0.5), TypeError,
     r"exponential_decay: transition_steps must be an int \(a number of steps\), got 2.5"),
    (lambda: optimizers.exponential_decay(0.1, 10, 0.0), ValueError,
     "exponential_decay: decay_rate must be > 0"),
    (lambda: optimizers.exponential_decay(float("nan"), 10, 0.5), ValueError,
     "exponential_decay: init_value must be a finite number >= 0, got nan"),
    (lambda: optimizers.cosine_decay(0.1, -5), ValueError,
     "cosine_decay: decay_steps must be >= 1, got -5"),
    (lambda: optimizers.cosine_decay(0.1, 100, alpha=1.5), ValueError,
     r"cosine_decay: alpha .* must be in \[0, 1\], got 1.5"),
    (lambda: optimizers.cosine_decay(0.1, True), TypeError, "cosine_decay: decay_steps must be"),
    (lambda: optimizers.warmup_cosine_decay(0.0, 0.1, 200, 100), ValueError,
     r"warmup_cosine_decay: warmup_steps \(200\) must be less than decay_steps \(100\), the "
     "total length"),
    (lambda: optimizers.warmup_cosine_decay(0.0, 0.1, 100, 100), ValueError,
     r"warmup_steps \(100\) must be less than decay_steps \(100\)"),
    (lambda: optimizers.warmup_cosine_decay(0.0, 0.1, -1, 100), ValueError,
     "warmup_cosine_decay: warmup_steps must be >= 0, got -1"),
    (lambda: optimizers.warmup_cosine_decay(0.0, -0.1, 10, 100), ValueError,
     "warmup_cosine_decay: peak_value must be a finite number >= 0"),
    (lambda: optimizers.warmup_cosine_decay(0.0, 0.1, 10, 100, end_value=float("inf")),
     ValueError, "warmup_cosine_decay: end_value must be a finite number >= 0, got inf"),
    (lambda: optimizers.piecewise_constant([10, 5], [1.0, 0.1, 0.01]), ValueError,
     r"piecewise_constant: boundaries must be strictly increasing, got boundaries\[0\] = 10 "
     r"and boundaries\[1\] = 5"),
    (lambda: optimizers.piecewise_constant([-3], [1.0, 0.1]), ValueError,
     r"piecewise_constant: boundaries\[0\] must be >= 1, got -3"),
    (lambda: optimizers.piecewise_constant([10], [1.0]), ValueError,
     r"piecewise_constant: values must have len\(boundaries\) \+ 1 = 2 entries, got 1"),
    (lambda: optimizers.piecewise_constant([10], [1.0, -0.1]), ValueError,
     r"piecewise_constant: values\[1\] must be a finite number >= 0, got -0.1"),
]


@pytest.mark.parametrize("make, error, match", BAD_ARGUMENTS,
                         ids=[f"bad{i}" for i in range(len(BAD_ARGUMENTS))])
def test_bad_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()
