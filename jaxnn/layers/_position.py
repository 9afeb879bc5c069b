"""Position embeddings added to sequences: learned, or Vaswani et al.'s sinusoids."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnn import initializers
from jaxnn._typing import DTypeLike
from jaxnn.errors import check_floating, check_rank, current_path
from jaxnn.layers._base import Layer, param_dtype

_LAYOUT = "(..., length, features)"


def _who(kind: str, name: str | None) -> str:
    path = current_path() or name
    return f"{kind} layer '{path}'" if path else f"{kind} layer"


def _no_params(key, *inputs):
    del key, inputs
    return {}, {}


def PositionEmbedding(
    max_length: int,
    *,
    init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Add a learned vector per position: ``y[..., p, :] = x[..., p, :] + embedding[p]``.

    Shapes: ``x`` is ``(N, L, D)`` (any batch axes, or none) with
    ``L <= max_length``; ``y`` has the shape of ``x``. Only the first ``L`` rows of
    the table are used.

    Parameters: ``embedding`` ``(max_length, D)``, default normal with standard
    deviation 0.02 (BERT's and GPT-2's choice); named like :func:`Embedding`'s
    table, so the default regularizers leave it alone. It is PyTorch's
    ``nn.Embedding(max_length, D).weight``, looked up with ``arange(L)``.

    Args:
      max_length: the longest sequence the layer accepts.
      init: initializer of the table.
      dtype: dtype of the table (default: the input's float dtype).
      name: the layer's name inside a container.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(
            f"PositionEmbedding: max_length must be a positive integer, got {max_length!r}"
        )
    init = init or initializers.normal(0.02)

    def check(x):
        check_rank(x, "PositionEmbedding", min_rank=2, layout=_LAYOUT)
        check_floating(x, "PositionEmbedding")
        if x.shape[-2] > max_length:
            raise ValueError(
                f"{_who('PositionEmbedding', name)}: the sequence length {x.shape[-2]} "
                f"(axis -2 of shape {tuple(x.shape)}) exceeds max_length={max_length}"
            )

    def initialize(key, x: jax.ShapeDtypeStruct):
        check(x)
        return {"embedding": init(key, (max_length, x.shape[-1]), param_dtype(x, dtype))}, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        check(x)
        table = params["embedding"]
        if table.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"{_who('PositionEmbedding', name)}: expected input with last dimension "
                f"(features) {table.shape[-1]} (params['embedding'] is "
                f"{tuple(table.shape)}), got shape {tuple(x.shape)}"
            )
        return x + table[: x.shape[-2]], state

    return Layer(name or "position_embedding", initialize, forward,
                 spec=f"PositionEmbedding({max_length})", explicit_name=name is not None)


def sinusoids(length: int, features: int, base: float = 10000.0, dtype=jnp.float32):
    """The ``(length, features)`` table ``PE[p, 2i] = sin(p / base^(2i / features))``,
    ``PE[p, 2i + 1] = cos(p / base^(2i / features))``."""
    positions = jnp.arange(length, dtype=dtype)[:, None]
    pairs = jnp.arange(features) // 2                      # i of column 2i and 2i + 1
    angles = positions / jnp.asarray(base, dtype) ** (2 * pairs / features).astype(dtype)
    return jnp.where(jnp.arange(features) % 2 == 0, jnp.sin(angles), jnp.cos(angles))


def SinusoidalPositionEmbedding(*, base: float = 10000.0, name: str | None = None) -> Layer:
    """Add the fixed sinusoidal encoding of Vaswani et al. (2017).

    Shapes: ``x`` is ``(N, L, D)`` (any batch axes, or none); ``y = x + PE[:L]``
    has the shape of ``x``, with, for position ``p`` and ``0 <= 2i < D``::

        PE[p, 2i]     = sin(p / base^(2i / D))
        PE[p, 2i + 1] = cos(p / base^(2i / D))

    An odd ``D`` is fine: its last column ``D - 1 = 2i`` is a sine with no cosine
    partner. The table is computed in float32 for float16/bfloat16 inputs, in the
    input's dtype otherwise, then cast to it. No parameters, no state; any length.

    Args:
      base: the wavelength scale (``10000`` in the paper); must be > 0.
      name: the layer's name inside a container.
    """
    if isinstance(base, bool) or not isinstance(base, int | float) or not base > 0:
        raise ValueError(f"SinusoidalPositionEmbedding: base must be > 0, got {base!r}")
    base = float(base)

    def forward(params, state, x, *, key=None, train=False):
        del params, key, train
        check_rank(x, "SinusoidalPositionEmbedding", min_rank=2, layout=_LAYOUT)
        check_floating(x, "SinusoidalPositionEmbedding")
        compute = jnp.promote_types(x.dtype, jnp.float32)
        table = sinusoids(x.shape[-2], x.shape[-1], base, compute)
        return x + table.astype(x.dtype), state

    spec = "SinusoidalPositionEmbedding()" if base == 10000.0 else (
        f"SinusoidalPositionEmbedding(base={base})")
    return Layer(name or "sinusoidal_position_embedding", _no_params, forward, spec=spec,
                 explicit_name=name is not None)
