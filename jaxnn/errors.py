"""Input checks that raise errors naming the layer, the expected and the actual value.

Containers (``Sequential``, functional models) record the path of the layer
being run, e.g. ``"block_0/dense_1"``, so that a check deep inside a model can
say exactly which layer rejected its input. The checks run while JAX traces,
on static shapes and dtypes, so they cost nothing in a compiled program.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

_LAYER_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "jaxnn_layer_path", default=()
)


@contextlib.contextmanager
def layer_scope(name: str) -> Iterator[None]:
    """Run the body with ``name`` appended to the current layer path."""
    token = _LAYER_PATH.set(_LAYER_PATH.get() + (name,))
    try:
        yield
    finally:
        _LAYER_PATH.reset(token)


def current_path() -> str:
    """The path of the layer being run, e.g. ``"block_0/dense_1"`` ("" at top level)."""
    return "/".join(_LAYER_PATH.get())


def where(kind: str) -> str:
    """Describe the running layer: ``"Dense layer 'dense_0'"`` or ``"Dense layer"``."""
    path = current_path()
    return f"{kind} layer '{path}'" if path else f"{kind} layer"


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_floating(x, kind: str) -> None:
    """Raise ``TypeError`` unless ``x`` holds floating-point (or complex) numbers."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{where(kind)}: expected a floating-point input array, got dtype {dtype} "
            f"with shape {_shape(x)}; convert it first, e.g. x.astype(jnp.float32)"
        )


def check_integer(x, kind: str) -> None:
    """Raise ``TypeError`` unless ``x`` holds integers (e.g. token ids or labels)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where(kind)}: expected an integer input array, got dtype {dtype} "
            f"with shape {_shape(x)}"
        )


def check_rank(x, kind: str, *, min_rank: int, max_rank: int | None = None,
               layout: str = "") -> None:
    """Raise ``ValueError`` unless ``min_rank <= x.ndim <= max_rank``.

    ``layout`` describes the expected axes, e.g. ``"(batch, height, width, channels)"``.
    """
    ndim = len(_shape(x))
    hi = max_rank if max_rank is not None else ndim
    if not (min_rank <= ndim <= hi):
        if max_rank is None:
            want = f"rank >= {min_rank}"
        elif max_rank == min_rank:
            want = f"rank {min_rank}"
        else:
            want = f"rank {min_rank} to {max_rank}"
        hint = f" {layout}" if layout else ""
        raise ValueError(
            f"{where(kind)}: expected an input of {want}{hint}, "
            f"got shape {_shape(x)} (rank {ndim})"
        )


def check_axis_size(x, kind: str, *, axis: int, expected: int, what: str) -> None:
    """Raise ``ValueError`` unless ``x.shape[axis] == expected``.

    ``what`` names the axis, e.g. ``"last dimension (features)"``.
    """
    shape = _shape(x)
    if shape[axis] != expected:
        raise ValueError(
            f"{where(kind)}: expected input with {what} {expected}, got shape {shape}"
        )


class ParamsMismatchError(ValueError):
    """Params (or state) whose keys or shapes differ from those the model declares.

    Raised by ``apply`` and ``apply_with_state``; the message names the layer path
    (e.g. ``"block_0/conv2d_1"``), the parameter, and the expected and actual shapes.
    """
