"""Data checked once at the door of ``fit``, ``evaluate`` and ``predict``.

Each check names the argument (``x``, ``y``, ``validation_data[1]``, ...) and
what was expected. They run once per call on the host, before anything is
compiled: a type check per array, one vectorised pass for NaN/inf, and a
min/max of the labels.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# numpy dtype kinds no model takes: object, bytes, str, void (records), datetimes.
_NEVER = {"O": "object", "S": "bytes", "U": "str", "V": "void", "M": "datetime",
          "m": "timedelta"}


def check_array_tree(tree: Any, name: str, *, labels: bool = False) -> None:
    """Raise ``TypeError`` unless every leaf of ``tree`` is a numeric array with an
    examples axis (numpy or JAX; a dict of such arrays is fine).

    ``labels``: complex numbers are refused too (targets are real or integer).
    """
    if isinstance(tree, list | tuple):
        raise TypeError(f"{name}: expected an array (numpy or JAX) with the examples on its "
                        f"leading axis, got a Python {type(tree).__name__}; convert it, e.g. "
                        f"np.asarray({name.split('[')[0]}, dtype=np.float32)")
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise TypeError(f"{name}: expected an array, got {tree!r}")
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"{where}: expected an array (numpy or JAX), got "
                            f"{type(leaf).__name__} {leaf!r:.60}")
        dtype = np.dtype(leaf.dtype) if not isinstance(leaf, jax.Array) else None
        kind = dtype.kind if dtype is not None else None
        if kind in _NEVER:
            hint = (" (string class names: map them to integers 0..C-1 first)"
                    if kind in "SUO" and labels else "")
            raise TypeError(f"{where}: expected numbers, got an array of dtype {leaf.dtype} "
                            f"({_NEVER[kind]}){hint}")
        if labels and jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(f"{where}: expected real or integer targets, got dtype {leaf.dtype}")
        if len(leaf.shape) == 0:
            raise ValueError(f"{where}: expected examples on a leading axis, got a scalar")


def _first_nonfinite(a: np.ndarray) -> tuple[tuple[int, ...], Any]:
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
    return index, a[index]


def check_finite(tree: Any, name: str) -> None:
    """Raise ``ValueError`` naming the first NaN or inf in the floating leaves of ``tree``.

    One pass per array: the sum is finite exactly when no element is NaN or inf
    (unless the sum overflows, which the exact check then settles).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        on_host = not isinstance(leaf, jax.Array)
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.sum(leaf) if on_host else jnp.sum(leaf)
        if np.isfinite(total) or (on_host and bool(np.isfinite(leaf).all())) or (
                not on_host and bool(jnp.isfinite(leaf).all())):
            continue
        index, value = _first_nonfinite(np.asarray(leaf))
        raise ValueError(
            f"{name}{jax.tree_util.keystr(path)} holds {value} at index {index} (example "
            f"{index[0]}); training on it would turn the loss and the parameters into NaN. "
            "Clean or drop such examples first")


def _spec(tree: Any, batch: int | None = None) -> tuple:
    """A hashable description of ``tree``'s structure, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        ((np.shape(a) if batch is None else (batch, *np.shape(a)[1:])), str(jnp.result_type(a)))
        for a in leaves)


def class_scores_shape(model, params, state, x) -> tuple[int, ...] | None:
    """The model's output shape for one example, ``(1, ..., C)``, when it is one
    array with ``C >= 2`` scores on its last axis (a classifier); None otherwise.
    Cached per model and shapes, so repeated calls trace the model once."""
    return _class_scores_shape(model, _spec(params), _spec(state), _spec(x, batch=1))


@functools.lru_cache(maxsize=64)
def _class_scores_shape(model, params_spec, state_spec, x_spec):
    def structs(spec):
        treedef, leaves = spec
        return jax.tree_util.tree_unflatten(
            treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])

    try:
        out = jax.eval_shape(
            lambda p, s, xb: model.apply_with_state(p, s, xb, train=False)[0],
            structs(params_spec), structs(state_spec), structs(x_spec))
    except Exception:  # the model's own error surfaces, with its message, when fit runs it
        return None
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) < 2 or out.shape[-1] < 2:
        return None
    return tuple(out.shape)


def check_labels(y: Any, output_shape: tuple[int, ...] | None, name: str) -> None:
    """Integer class labels must lie in ``[0, C)``, ``C = output_shape[-1]``:
    ``ValueError`` naming the first bad value and its index. Applies when ``y`` is
    one integer array shaped like the model's output without its class axis
    (sparse labels); any other ``y`` passes."""
    if output_shape is None or not hasattr(y, "dtype"):
        return
    if not jnp.issubdtype(y.dtype, jnp.integer) or np.shape(y)[1:] != output_shape[1:-1]:
        return
    classes = output_shape[-1]
    labels = np.asarray(y)
    if labels.size == 0:
        return
    low, high = labels.min(), labels.max()
    if low >= 0 and high < classes:
        return
    bad = np.argwhere((labels < 0) | (labels >= classes))[0]
    index = tuple(int(i) for i in bad)
    shown = index[0] if len(index) == 1 else index
    raise ValueError(
        f"{name}: class label {labels[index]} at index {shown} is outside [0, {classes}) "
        f"(the model outputs {classes} classes; labels range from {low} to {high}). Labels "
        "must be integers 0..C-1; if these targets are not class ids, give them a floating "
        "dtype")
