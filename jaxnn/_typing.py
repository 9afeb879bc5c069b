"""Type aliases shared across jaxnn.

A parameter or state pytree is a nested ``dict`` of arrays whose keys are
readable names, e.g. ``{"dense_0": {"kernel": ..., "bias": ...}}``.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
DTypeLike: TypeAlias = jax.typing.DTypeLike
PRNGKey: TypeAlias = jax.Array
Shape: TypeAlias = tuple[int, ...]
Params: TypeAlias = dict[str, Any]
State: TypeAlias = dict[str, Any]
