"""Embedding: a lookup table from integer ids to feature vectors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn import initializers
from jaxnn._typing import DTypeLike
from jaxnn.errors import check_integer, where
from jaxnn.layers._base import Layer, param_dtype


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def Embedding(
    num_embeddings: int,
    features: int,
    *,
    embedding_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Map integer ids to learned vectors: ``y = embedding[ids]``.

    Shapes: ``ids`` is an integer array of any shape ``(...)``; ``y`` is
    ``(..., features)``.

    Parameters: ``embedding`` ``(num_embeddings, features)``, default
    U(-0.05, 0.05) as in Keras (PyTorch's ``Embedding.weight`` has the same
    layout). The gradient w.r.t. ``embedding`` adds up (scatter-adds) the
    upstream gradients of every position holding a given id.

    Out-of-range ids: when ``ids`` is a concrete array (not traced), ids outside
    ``[0, num_embeddings)`` raise ``ValueError``. Inside ``jax.jit``, ``grad`` or
    ``vmap`` the values are unknown while tracing and a compiled program cannot
    raise, so ids are clamped into range: negative ids read row 0 and ids
    ``>= num_embeddings`` read the last row (there is no Python-style wrapping
    of negative ids). Validate ids in the data pipeline if they can be invalid.

    Args:
      num_embeddings: the number of rows (vocabulary size).
      features: the length of each vector.
      embedding_init: initializer for the table.
      dtype: the table's dtype (default JAX's default float).
      name: the layer's name inside a container.
    """
    for arg, value in (("num_embeddings", num_embeddings), ("features", features)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"Embedding: {arg} must be a positive integer, got {value!r}")
    embedding_init = embedding_init or initializers.uniform(-0.05, 0.05)

    def initialize(key, ids: jax.ShapeDtypeStruct):
        check_integer(ids, "Embedding")
        dt = param_dtype(ids, dtype)
        return {"embedding": embedding_init(key, (num_embeddings, features), dt)}, {}

    def forward(params, state, ids, *, key=None, train=False):
        del key, train
        table = params["embedding"]
        check_integer(ids, "Embedding")
        if table.shape != (num_embeddings, features):
            raise ValueError(
                f"{where('Embedding')}: expected params['embedding'] of shape "
                f"{(num_embeddings, features)}, got {tuple(table.shape)}"
            )
        if _is_concrete(ids) and np.size(ids):
            values = np.asarray(ids)
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= num_embeddings:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{where('Embedding')}: ids must be in [0, {num_embeddings}), "
                    f"got {bad} (ids range over [{lo}, {hi}], shape {tuple(np.shape(ids))})"
                )
        return jnp.take(table, ids, axis=0, mode="clip"), state

    return Layer(name or "embedding", initialize, forward,
                 spec=f"Embedding({num_embeddings}, {features})",
                 explicit_name=name is not None)
