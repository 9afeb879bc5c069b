"""Hand-written backpropagation (jaxnn.manual) against jax.grad, finite differences and numpy."""

import importlib.util
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import compilation_cache, losses, regularizers
from jaxnn.gradcheck import check_grads
from jaxnn.manual import (
    ACTIVATIONS,
    LOSSES,
    MLP,
    activation_backward,
    activation_forward,
    cross_entropy,
    dense_backward,
    dense_forward,
    l1,
    l2,
    mse,
    softmax_cross_entropy,
)
from jaxnn.optimizers import sgd
from jaxnn.training import fit

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "mnist_mlp.py"
DEPTHS = {1: (3,), 2: (5, 3), 4: (5, 5, 5, 3)}


def _rel_errors(grads, reference):
    """``{path: ||g - r|| / ||r||}`` over the leaves of two pytrees of equal structure."""
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(reference)
    out = {}
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree_util.tree_leaves(reference)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        out[jax.tree_util.keystr(path)] = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
    return out


def _problem(loss, units, seed):
    """Random float64 inputs ``(9, 4)``, targets for ``loss`` and per-example weights."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(9, 4)))
    if loss == "mse":
        y = jnp.asarray(rng.normal(size=(9, units[-1])))
    else:
        y = jnp.asarray(rng.integers(0, units[-1], size=9), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, size=9)).at[3].set(0.0)
    return x, y, weights


def _random_params(units, in_features, seed):
    """Float64 params in the layout of ``MLP(units).init`` (without compiling an init)."""
    rng = np.random.default_rng(seed)
    params, fan_in = {}, in_features
    for index, width in enumerate(units):
        params[f"dense_{index}"] = {"bias": jnp.asarray(rng.normal(size=width) * 0.5),
                                    "kernel": jnp.asarray(rng.normal(size=(fan_in, width)))}
        fan_in = width
    return params


def _autodiff_loss(net, loss, x, y, weights):
    """The same loss built from jaxnn's functional pieces, for jax.grad."""
    model = net.sequential()
    loss_fn = losses.mean_squared_error if loss == "mse" else losses.sparse_softmax_cross_entropy
    return lambda params: loss_fn(model.apply(params, x), y, weights=weights)


# -- the whole network ----------------------------------------------------------


def test_hand_written_gradients_equal_jax_grad(x64):
    """Every activation x both losses, each without and with L1 + L2; depths 1, 2, 4 in turn.

    The depth cycles over the pairs (each loss meets every depth, and MSE both output
    activations) rather than multiplying them: the depth loop does not depend on the
    activation. All 10 cases are one jitted program holding both sides of each (jax.grad
    of the autodiff loss and of the penalty, the hand-written value and gradient without
    and with the penalty): one program per case took 2.3x the CPU time of one for all,
    and op by op (every operation compiled on its own) 2.5x that again.
    test_value_and_grad_under_jit_and_vmap checks the hand-written gradient eager too.
    """
    a, b = 0.03, 0.02
    penalty = regularizers.elastic_net(a, b)
    depths = list(DEPTHS)
    cases, args = [], []
    for seed, (act, loss) in enumerate(itertools.product(ACTIVATIONS, LOSSES)):
        depth = depths[seed % len(depths)]
        units = DEPTHS[depth]
        # sigmoid on the output for MSE every other activation, so it is exercised too
        out_act = "sigmoid" if loss == "mse" and (seed // 2) % 2 == 0 else "identity"
        net = MLP(units, activation=act, output_activation=out_act)
        x, y, weights = _problem(loss, units, seed)
        cases.append((act, loss, depth, out_act, net))
        args.append((_random_params(units, x.shape[1], seed), x, y, weights))

    @jax.jit
    def both_sides(args):
        out = []
        for (_, loss, _, _, net), (params, x, y, weights) in zip(cases, args):
            reference = jax.value_and_grad(_autodiff_loss(net, loss, x, y, weights))(params)
            hand = [net.value_and_grad(loss, l1=l1, l2=l2)(params, x, y, weights)
                    for l1, l2 in ((0.0, 0.0), (a, b))]
            out.append((reference, jax.value_and_grad(penalty)(params), hand,
                        net.sequential().apply(params, x)))
        return out

    for (act, loss, depth, out_act, _), sides in zip(cases, both_sides(args)):
        (ref_value, ref_grads), (ref_penalty, ref_penalty_grads), hand, twin = sides
        for strengths, (value, grads, predictions), ref_v, ref_g in zip(
            ((0.0, 0.0), (a, b)), hand,
            (ref_value, ref_value + ref_penalty),
            (ref_grads, jax.tree_util.tree_map(np.add, ref_grads, ref_penalty_grads)),
        ):
            where = f"{act}, {loss}, depth {depth}, output {out_act}, l1/l2={strengths}"
            assert float(value) == pytest.approx(float(ref_v), rel=1e-12, abs=1e-12), where
            errors = _rel_errors(grads, ref_g)
            assert max(errors.values()) < 1e-6, (where, errors)
            np.testing.assert_allclose(predictions, twin, rtol=1e-12)


def test_hand_written_gradients_equal_finite_differences(x64):
    """The manual gradient, installed as a custom VJP, passes check_grads (no jax.grad inside)."""
    net = MLP((5, 4, 3), activation=("tanh", "sigmoid"), output_activation="softmax")
    x, y, weights = _problem("mse", net.units, 0)
    params = _random_params(net.units, x.shape[1], 0)
    value_and_grad = net.value_and_grad("mse", l1=0.01, l2=0.05)

    @jax.custom_vjp
    def objective(p):
        return value_and_grad(p, x, y, weights)[0]

    def fwd(p):
        value, grads, _ = value_and_grad(p, x, y, weights)
        return value, grads

    def bwd(grads, cotangent):
        return (jax.tree_util.tree_map(lambda g: cotangent * g, grads),)

    objective.defvjp(fwd, bwd)
    errors = check_grads(jax.jit(objective), params)  # one program, not one per operation
    assert max(errors.values()) < 1e-6, errors


def test_one_hot_labels_match_integer_labels(x64):
    net = MLP((6, 4), activation="relu")
    x, y, weights = _problem("softmax_cross_entropy", net.units, 1)
    params = _random_params(net.units, x.shape[1], 1)
    fn = net.value_and_grad("softmax_cross_entropy")
    both = jax.jit(lambda p, labels, hot: (fn(p, x, labels, weights), fn(p, x, hot, weights)))
    (v_int, g_int, _), (v_hot, g_hot, _) = both(params, y, np.eye(4)[np.asarray(y)])
    assert float(v_int) == pytest.approx(float(v_hot), rel=1e-14)
    assert max(_rel_errors(g_hot, g_int).values()) < 1e-14


def test_params_have_the_layout_of_the_sequential_twin(key):
    from jaxnn.activations import relu, tanh
    from jaxnn.layers import Dense, Sequential

    net = MLP((8, 8, 10), activation=("relu", "tanh"))
    x = jnp.zeros((2, 5))
    params = jax.eval_shape(lambda: net.init(key, x))
    written = Sequential([Dense(8), relu, Dense(8), tanh, Dense(10)])
    twin = jax.eval_shape(lambda: written.init(key, x))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(twin)
    assert jax.tree_util.tree_leaves(params) == jax.tree_util.tree_leaves(twin)
    assert sorted(params) == ["dense_0", "dense_1", "dense_2"]
    assert params["dense_0"]["kernel"].shape == (5, 8) and params["dense_2"]["bias"].shape == (10,)
    assert [c.name for c in net.sequential().children] == [c.name for c in written.children]


def test_value_and_grad_under_jit_and_vmap(x64):
    net = MLP((5, 3), activation="tanh")
    x, y, _ = _problem("softmax_cross_entropy", net.units, 2)
    params = _random_params(net.units, x.shape[1], 2)
    fn = net.value_and_grad("softmax_cross_entropy", l2=0.0)
    value, grads, _ = fn(params, x, y)  # eager, op by op
    # jitted, and per-example gradients by vmap (in the same program)
    (jit_value, jit_grads, _), per_example = jax.jit(lambda p, x, y: (
        fn(p, x, y), jax.vmap(lambda xi, yi: fn(p, xi[None], yi[None])[1])(x, y)))(params, x, y)
    assert float(jit_value) == pytest.approx(float(value), rel=1e-13)
    assert max(_rel_errors(jit_grads, grads).values()) < 1e-13
    # the mean of the per-example gradients is the batch gradient of the mean loss
    mean = jax.tree_util.tree_map(lambda g: np.mean(np.asarray(g), axis=0), per_example)
    assert max(_rel_errors(mean, grads).values()) < 1e-12


# -- the pieces ------------------------------------------------------------------


def test_dense_backward_is_the_transposed_products(x64):
    rng = np.random.default_rng(0)
    x, kernel, bias, dz = (rng.normal(size=s) for s in ((6, 4), (4, 3), (3,), (6, 3)))
    params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    np.testing.assert_allclose(dense_forward(params, jnp.asarray(x)), x @ kernel + bias,
                               rtol=1e-13)
    grads, dx = dense_backward(params, jnp.asarray(x), jnp.asarray(dz))
    # numpy loops over the definition dL/dW[j,k] = sum_i x[i,j] dz[i,k], etc.
    d_kernel = np.zeros_like(kernel)
    d_x = np.zeros_like(x)
    for i, j, k in itertools.product(range(6), range(4), range(3)):
        d_kernel[j, k] += x[i, j] * dz[i, k]
        d_x[i, j] += dz[i, k] * kernel[j, k]
    np.testing.assert_allclose(grads["kernel"], d_kernel, rtol=1e-12)
    np.testing.assert_allclose(grads["bias"], dz.sum(0), rtol=1e-12)
    np.testing.assert_allclose(dx, d_x, rtol=1e-12)
    assert dense_backward(params, jnp.asarray(x), jnp.asarray(dz), input_grad=False)[1] is None


@pytest.fixture(scope="module")
def activation_backwards():
    """``{name: (activation_backward, jax.vjp's)}`` for every activation at the same
    ``z`` and ``da``, all in one jitted program."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        z, da = rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 4))

        @jax.jit
        def both(z, da):
            out = {}
            for name in ACTIVATIONS:
                a, vjp = jax.vjp(lambda t, name=name: activation_forward(name, t), z)
                out[name] = (activation_backward(name, z, a, da), vjp(da)[0])
            return out

        return jax.device_get(both(z, da))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_backward_equals_vjp(activation_backwards, name):
    hand, vjp = activation_backwards[name]
    assert hand.dtype == vjp.dtype == np.float64
    np.testing.assert_allclose(hand, vjp, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_gradient_is_the_long_way_simplified(x64):
    """p - y equals softmax's Jacobian applied to the cross-entropy gradient -y / p."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 5))
    labels = rng.integers(0, 5, size=6).astype(np.int32)
    weights = rng.uniform(0, 1, size=6)

    @jax.jit  # one program (op by op, each operation compiles its own)
    def both_ways(z, labels, weights):
        value, dz = softmax_cross_entropy(z, labels, weights)
        p = activation_forward("softmax", z)
        long_value, dp = cross_entropy(p, labels, weights)
        return value, dz, long_value, activation_backward("softmax", z, p, dp)

    value, dz, long_value, long_dz = both_ways(z, labels, weights)
    np.testing.assert_allclose(long_dz, dz, rtol=1e-10)
    assert float(long_value) == pytest.approx(float(value), rel=1e-12)


def test_loss_values_and_gradients_against_numpy(x64):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 4))
    t = rng.normal(size=(6, 4))
    labels = rng.integers(0, 4, size=6)
    w = rng.uniform(0, 2, size=6)
    w[2] = 0.0

    @jax.jit  # one program (op by op, each operation compiles its own)
    def losses_of(z, t, labels, w):
        return (mse(z, t, w), softmax_cross_entropy(z, labels, w),
                losses.sparse_softmax_cross_entropy(z, labels, weights=w))

    (value, grad), softmax_ce, reference_ce = losses_of(z, t, labels, w)
    # mse: weighted mean over examples of the mean over values
    assert float(value) == pytest.approx(np.sum(w * np.mean((z - t) ** 2, 1)) / w.sum(), rel=1e-12)
    np.testing.assert_allclose(grad, 2 * w[:, None] * (z - t) / (4 * w.sum()), rtol=1e-12)
    # softmax cross-entropy
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.eye(4)[labels]
    value, grad = softmax_ce
    expected = np.sum(w * -np.log(p[np.arange(6), labels])) / w.sum()
    assert float(value) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, w[:, None] * (p - y) / w.sum(), rtol=1e-12)
    assert np.all(np.asarray(grad)[2] == 0)  # a zero-weight example contributes nothing
    # the losses agree with jaxnn.losses
    assert float(value) == pytest.approx(float(reference_ce), rel=1e-12)


def test_all_zero_weights_give_zero_loss_and_gradient(x64):
    both = jax.jit(lambda z, t, labels, w: (mse(z, t, w), softmax_cross_entropy(z, labels, w)))
    for value, grad in both(np.ones((3, 4)), np.zeros((3, 4)), np.array([0, 1, 2]), np.zeros(3)):
        assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_penalties_against_numpy(x64):
    rng = np.random.default_rng(4)
    params = {f"dense_{i}": {"kernel": jnp.asarray(rng.normal(size=(3, 2))),
                             "bias": jnp.asarray(rng.normal(size=2))} for i in range(2)}
    kernels = [np.asarray(params[f"dense_{i}"]["kernel"]) for i in range(2)]
    # one program (op by op, each operation compiles its own)
    (value, grads), (l2_value, l2_grads), reference = jax.jit(
        lambda p: (l1(0.3, p), l2(0.2, p), regularizers.l2(0.2)(p)))(params)
    assert float(value) == pytest.approx(0.3 * sum(np.abs(k).sum() for k in kernels), rel=1e-12)
    np.testing.assert_allclose(grads["dense_1"]["kernel"], 0.3 * np.sign(kernels[1]))
    assert not np.any(np.asarray(grads["dense_0"]["bias"]))
    assert float(l2_value) == pytest.approx(0.2 * sum((k ** 2).sum() for k in kernels),
                                            rel=1e-12)
    np.testing.assert_allclose(l2_grads["dense_0"]["kernel"], 0.4 * kernels[0], rtol=1e-12)
    assert float(l2_value) == pytest.approx(float(reference), rel=1e-12)


# -- errors ------------------------------------------------------------------------


def test_errors_name_the_argument_and_the_value():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MLP((4, 2), activation="gelu")
    with pytest.raises(ValueError, match=r"one per hidden layer \(2 for units"):
        MLP((4, 4, 2), activation=("relu",))
    with pytest.raises(ValueError, match="units must be a non-empty sequence"):
        MLP((4, 0))
    net = MLP((4, 2))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        net.value_and_grad("hinge")
    with pytest.raises(ValueError, match="l2 must be a number >= 0, got -1"):
        net.value_and_grad(l2=-1.0)
    params = _random_params(net.units, 3, 0)  # init's layout (init would compile a program)
    with pytest.raises(ValueError, match="x has 5 features but dense_0/kernel expects 3"):
        net.apply(params, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"shape \(batch, features\), got shape \(3,\)"):
        net.apply(params, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"params must hold the layers \['dense_0', 'dense_1'\]"):
        net.apply({"dense_0": params["dense_0"]}, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        mse(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\)"):
        softmax_cross_entropy(jnp.zeros((2, 2)), jnp.array([0, 2]))


# -- fit with the hand-written gradient ---------------------------------------------


@pytest.fixture(scope="module")
def fits_with_both_gradients():
    """``(start, autodiff, hand in memory, hand from batches)``: fit with the penalty and
    jax.grad, and with the hand-written gradient on the arrays and on a list of batches
    (50 examples in batches of 16: the last one padded with weight-0 rows). Unshuffled,
    so that the three train on the same batches."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x = rng.normal(size=(50, 6))
        y = rng.integers(0, 3, size=50).astype(np.int32)
        net = MLP((8, 3), activation="tanh")
        model = net.sequential()
        start = _random_params(net.units, x.shape[1], 0)
        common = dict(loss=losses.sparse_softmax_cross_entropy,
                      optimizer=sgd(0.1, momentum=0.9), key=jax.random.key(1), epochs=2,
                      batch_size=16, verbose=0)
        hand_vg = net.value_and_grad("softmax_cross_entropy", l1=1e-3, l2=1e-2)
        auto = fit(model, start, x, y, penalty=regularizers.elastic_net(1e-3, 1e-2),
                   shuffle=False, **common)
        hand = fit(model, start, x, y, value_and_grad=hand_vg, shuffle=False, **common)
        batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
        streamed = fit(model, start, batches, value_and_grad=hand_vg, **common)
        return start, auto, hand, streamed


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "batches"])
def test_fit_with_manual_gradient_equals_fit_with_autodiff(x64, fits_with_both_gradients,
                                                           streaming):
    start, auto, hand, streamed = fits_with_both_gradients
    hand = streamed if streaming else hand
    assert max(_rel_errors(hand.params, auto.params).values()) < 1e-9
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(hand.history[name], auto.history[name], rtol=1e-9)
    # the parameters moved: the comparison is not between two untouched copies
    assert min(_rel_errors(hand.params, start).values()) > 1e-3


def test_fit_refuses_a_penalty_beside_a_custom_gradient():
    net = MLP((3,))
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
    params = jax.tree_util.tree_map(  # init's layout (init would compile a program)
        lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(net.init, jax.random.key(0), x))
    with pytest.raises(ValueError, match="give the penalty inside value_and_grad"):
        fit(net.sequential(), params, x, y, loss=losses.sparse_softmax_cross_entropy,
            optimizer=optax.sgd(0.1), key=jax.random.key(0), verbose=0,
            penalty=regularizers.l2(1e-3), value_and_grad=net.value_and_grad())


# -- the example's --grad flag ------------------------------------------------------


@pytest.fixture
def no_compile_cache(monkeypatch):
    """The example's persistent compilation cache stays off in this process (it would
    replace the tests' own, see conftest.py); tests/test_compile_cache.py runs it."""
    monkeypatch.setattr(compilation_cache, "enable_compilation_cache",
                        lambda path=None, **kwargs: pathlib.Path(path or "unused"))


def _load_example():
    spec = importlib.util.spec_from_file_location("mnist_mlp_example_manual", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_grad_manual_matches_autodiff_on_real_mnist(mnist_dir, capsys,
                                                           no_compile_cache):
    # The example's --grad flag end to end (its fast stand-in is
    # test_fit_with_manual_gradient_equals_fit_with_autodiff): with --l2, which the
    # hand-written gradient takes inside value_and_grad, autodiff as a penalty.
    example = _load_example()
    common = ["--data-dir", str(mnist_dir), "--json", "--quiet", "--seed", "0", "--l2", "1e-4"]
    auto = example.main([*common, "--grad", "autodiff"])
    hand = example.main([*common, "--grad", "manual"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["grad"] == "manual" and hand["l2"] == auto["l2"] == 1e-4
    assert abs(hand["test_accuracy"] - auto["test_accuracy"]) <= 0.003, (hand, auto)
    assert hand["test_accuracy"] >= 0.97
