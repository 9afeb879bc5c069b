"""Checks of the arguments of ``fit``, ``evaluate`` and ``predict``: each error
names the argument and says what was expected."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn import _data_checks
from jaxnn.layers._base import Layer, _describe_keys


def check_arrays(x, y, x_name: str = "x", y_name: str = "y") -> int:
    """The number of examples in ``(x, y)``, after checking that both are numeric
    arrays (or dicts of them) with the same, nonzero, leading axis."""
    _data_checks.check_array_tree(x, x_name)
    _data_checks.check_array_tree(y, y_name, labels=True)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    for leaf in jax.tree_util.tree_leaves((x, y)):
        if leaf.shape[0] != n:
            raise ValueError(
                f"{x_name} and {y_name} must have the same number of examples: got "
                f"{n} and {leaf.shape[0]} (shapes "
                f"{[np.shape(a) for a in jax.tree_util.tree_leaves((x, y))]})"
            )
    if n == 0:
        raise ValueError(f"{x_name} has no examples (its leading axis has length 0)")
    return n


def check_data(model, params, state, x, y, x_name="x", y_name="y") -> None:
    """NaN/inf in ``x`` or ``y``, and class labels outside the model's range: errors
    naming the argument, the value and its index (see :mod:`jaxnn._data_checks`)."""
    _data_checks.check_finite(x, x_name)
    _data_checks.check_finite(y, y_name)
    if not isinstance(y, dict):
        _data_checks.check_labels(
            y, _data_checks.class_scores_shape(model, params, state, x), y_name)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_compute_dtype(compute_dtype) -> jnp.dtype | None:
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(f"compute_dtype must be a floating dtype such as jnp.bfloat16 or "
                        f"None, got {compute_dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype such as jnp.bfloat16 or "
                         f"None, got {dtype.name}")
    return dtype


def check_stateless(model: Layer, x, where: str = "fit") -> None:
    """Raise when ``model`` keeps state (BatchNorm) but ``where`` got no ``state=``."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    signature = tuple((tuple(np.shape(a)[1:]), jnp.result_type(a).name) for a in leaves)
    keys = _state_keys(model, treedef, signature)
    if keys:
        if where == "fit":
            advice = ("Create both with params, state = model.init_with_state(key, x[:1]) and "
                      "pass fit(..., state=state); the trained state is in the result's .state")
        else:
            advice = (f"Pass the trained state: {where}(..., state=result.state), with result "
                      "what fit returned (or the state from model.init_with_state)")
        raise ValueError(f"{where}: the model has state ({keys}: e.g. "
                         f"BatchNorm's running statistics) but no state= was given. {advice}")


@functools.lru_cache(maxsize=64)
def _state_keys(model: Layer, treedef, signature) -> str:
    """The model's state entries for inputs of this structure ("" when it has none),
    from an abstract init (cached: predict and evaluate call it every time)."""
    structs = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct((1, *shape), dtype) for shape, dtype in signature])
    try:
        _, state = jax.eval_shape(lambda k: model.initialize(k, structs), jax.random.key(0))
    except Exception:  # noqa: BLE001 - the model's own errors are raised later, with context
        return ""
    return _describe_keys(state) if jax.tree_util.tree_leaves(state) else ""


def check_optimizer(optimizer) -> None:
    if isinstance(optimizer, optax.GradientTransformation) or (
            hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        return
    if callable(optimizer):
        name = getattr(optimizer, "__name__", "the optimizer")
        raise TypeError(f"optimizer: got the function {name} itself, not an optimizer; call it "
                        f"with a learning rate, e.g. optimizer={name}(1e-3)")
    raise TypeError("optimizer must be an optax GradientTransformation such as "
                    f"optax.adam(1e-3) or jaxnn.optimizers.adam(1e-3), got {optimizer!r}")


def check_key(key) -> None:
    shape, dtype = np.shape(key), getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        ok = shape == ()
    else:
        ok = len(shape) == 1 and dtype == np.uint32  # a raw key, jax.random.PRNGKey(0)
    if not ok:
        raise TypeError(f"key must be one PRNG key such as jax.random.key(0), got {key!r}"[:300])


def check_not_pair(params) -> None:
    if isinstance(params, tuple) and len(params) == 2 and all(
            isinstance(part, dict) for part in params):
        raise TypeError("params is a pair (params, state), as init_with_state returns: unpack "
                        "it, params, state = model.init_with_state(key, x[:1]), and pass "
                        "fit(model, params, x, y, ..., state=state)")


ON_NONFINITE = ("raise", "warn", "ignore")
FEEDS = (None, "device", "host")


def check_fit_options(*, epochs, batch_size, initial_epoch, steps_per_call, validation_split,
                      validation_data, value_and_grad, penalty, compute_dtype, optimizer, key,
                      params, on_nonfinite, feed, accumulate):
    """Check ``fit``'s scalar options; returns ``(epochs, batch_size, steps_per_call,
    compute_dtype, accumulate)`` normalized (``steps_per_call="epoch"`` becomes 0)."""
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    accumulate = check_positive_int(accumulate, "accumulate")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    if feed not in FEEDS:
        raise ValueError(f"feed must be None (chosen by fit), 'device' (the dataset put on the "
                         f"device once) or 'host' (batches copied from the host in chunks), "
                         f"got {feed!r}")
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int | np.integer) or (
            initial_epoch < 0):
        raise ValueError(f"initial_epoch must be an integer >= 0 (the epoch to resume at, e.g. "
                         f"a previous result's .epoch), got {initial_epoch!r}")
    if isinstance(steps_per_call, str):
        if steps_per_call != "epoch":
            raise ValueError(f"steps_per_call must be a positive integer, 'epoch' or None, "
                             f"got {steps_per_call!r}")
        steps_per_call = 0
    elif steps_per_call is not None:
        steps_per_call = check_positive_int(steps_per_call, "steps_per_call")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if validation_split and validation_data is not None:
        raise ValueError("validation_data and validation_split: give one of them, not both")
    if value_and_grad is not None and penalty is not None:
        raise ValueError("give the penalty inside value_and_grad (its loss and gradient must "
                         "include it), not as penalty=, when using a custom value_and_grad")
    if value_and_grad is not None and not callable(value_and_grad):
        raise TypeError(f"value_and_grad must be a function (params, x, y, weights) -> "
                        f"(loss, grads, predictions), got {value_and_grad!r}")
    compute_dtype = check_compute_dtype(compute_dtype)
    if compute_dtype is not None and value_and_grad is not None:
        raise ValueError("compute_dtype does not apply to a custom value_and_grad (it computes "
                         "its own gradient); cast inside value_and_grad instead")
    check_optimizer(optimizer)
    check_key(key)
    check_not_pair(params)
    return epochs, batch_size, steps_per_call, compute_dtype, accumulate
