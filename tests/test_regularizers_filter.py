"""A penalty whose filter selects no parameter raises, naming the filter and the paths."""

import functools

import jax
import jax.numpy as jnp
import pytest

import jaxnn
from jaxnn import regularizers
from jaxnn.regularizers import all_leaves, kernels_only

# A custom layer's params whose weights are not called "kernel".
PARAMS = {"prelu_0": {"slope": jnp.full((3,), 0.25)},
          "scaled_dense_0": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
PATHS = ("'prelu_0/slope'", "'scaled_dense_0/b'", "'scaled_dense_0/w'")
PENALTIES = {
    "l1": lambda where: regularizers.l1(0.1, where),
    "l2": lambda where: regularizers.l2(0.1, where),
    "elastic_net": lambda where: regularizers.elastic_net(0.1, 0.2, where),
}


def _ends_with(path, leaf, suffix):
    del leaf
    return path.endswith(suffix)


def never(path, leaf):
    del path, leaf
    return False


BAD_FILTERS = {  # (where, how the message names it)
    "default_kernels_only": (kernels_only, "where=kernels_only selects none of the 3 parameters "
                                           "(kernels_only, the default, selects leaves named"),
    "function": (never, "where=never selects none"),
    "lambda": (lambda path, w: path.endswith("embedding"), "where=<lambda> selects none"),
    "partial": (functools.partial(_ends_with, suffix="/weight"), "where=_ends_with selects none"),
    "shape_based": (lambda path, w: w.ndim > 2, "where=<lambda> selects none"),
    "bool_prefix": ({"prelu_0": False, "scaled_dense_0": False},
                    "where={'prelu_0': False, 'scaled_dense_0': False} selects none"),
    "bool_full": ({"prelu_0": {"slope": False},
                   "scaled_dense_0": {"w": False, "b": False}}, "selects none of the 3"),
}


@pytest.mark.parametrize("name", sorted(PENALTIES))
@pytest.mark.parametrize("filter_id", sorted(BAD_FILTERS))
def test_filter_matching_nothing_raises(name, filter_id):
    where, names_it = BAD_FILTERS[filter_id]
    with pytest.raises(ValueError) as info:
        PENALTIES[name](where)(PARAMS)
    message = str(info.value)
    assert message.startswith(f"{name}: the filter "), message
    assert names_it in message, message
    for path in PATHS:
        assert path in message, message


def test_default_filter_raises_while_tracing_under_jit_and_grad():
    penalty = regularizers.l2(1e-2)  # where=kernels_only by default
    with pytest.raises(ValueError, match="l2: the filter where=kernels_only selects none"):
        jax.jit(penalty)(PARAMS)
    with pytest.raises(ValueError, match="'scaled_dense_0/w'"):
        jax.jit(jax.grad(lambda p: penalty(p)))(PARAMS)


def test_long_path_lists_are_shortened():
    params = {f"layer_{i:02d}": {"w": jnp.ones(2)} for i in range(20)}
    with pytest.raises(ValueError) as info:
        regularizers.l2(0.1)(params)
    message = str(info.value)
    assert "selects none of the 20 parameters" in message
    assert "'layer_00/w'" in message and "'layer_11/w'" in message
    assert "'layer_12/w'" not in message and "... (8 more)" in message


@pytest.mark.parametrize("params", [{}, {"relu_0": {}, "flatten_0": {}}, []],
                         ids=["empty_dict", "layers_without_params", "empty_list"])
def test_no_params_at_all_is_zero(params):
    for name, make in PENALTIES.items():
        value = make(kernels_only)(params)
        assert float(value) == 0.0, name
        assert float(jax.jit(make(all_leaves))(params)) == 0.0, name


def test_model_without_params_gets_zero():
    model = jaxnn.Sequential([jaxnn.relu, jaxnn.Flatten()])
    params = model.init(jax.random.key(0), jnp.ones((2, 3, 4)))
    assert float(regularizers.l2(1e-2)(params)) == 0.0


def test_a_filter_that_matches_something_is_fine():
    where = lambda path, w: path.endswith("/w")  # noqa: E731
    value = regularizers.l2(0.5, where)(PARAMS)
    assert float(value) == pytest.approx(0.5 * 6.0)
    partly = {"dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "prelu_0": PARAMS["prelu_0"]}
    assert float(regularizers.l1(1.0)(partly)) == pytest.approx(4.0)
