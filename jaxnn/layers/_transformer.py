"""The pre-norm Transformer encoder block, built from jaxnn's own layers."""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxnn.errors import check_floating, check_rank, layer_scope
from jaxnn.layers._attention import MultiHeadAttention
from jaxnn.layers._base import Layer
from jaxnn.layers._container import _child_key, _not_recording, call_child
from jaxnn.layers._dense import Dense
from jaxnn.layers._dropout import Dropout
from jaxnn.layers._norm import LayerNorm

_KIND = "TransformerEncoderBlock"


def TransformerEncoderBlock(
    num_heads: int,
    mlp_size: int,
    *,
    key_size: int | None = None,
    dropout_rate: float = 0.0,
    activation: Callable = jax.nn.relu,
    epsilon: float = 1e-5,
    causal: bool = False,
    name: str | None = None,
) -> Layer:
    """A pre-norm Transformer encoder block (self-attention, then an MLP).

    Shapes: ``x`` is ``(N, L, D)`` (any batch axes, or none); ``y`` has the shape of
    ``x``. With ``LN`` layer normalisation over ``D`` and ``drop`` dropout at
    ``dropout_rate``::

        x = x + drop(MHA(LN_0(x)))
        y = x + drop(W_1 drop(act(W_0 LN_1(x) + b_0)) + b_1)

    ``MHA`` is :func:`MultiHeadAttention` with ``num_heads`` heads (output size
    ``D``) and attention dropout at ``dropout_rate``; ``W_0`` is ``(D, mlp_size)``
    and ``W_1`` ``(mlp_size, D)``. The keywords ``mask=`` and ``causal=`` of a call
    go to the attention (see :func:`MultiHeadAttention` for the mask convention:
    boolean, True = may attend, broadcastable to ``(N, num_heads, L, L)``).

    Parameters, by child (each child's own layout)::

        {"norm_0":    {"scale": (D,), "offset": (D,)},          # LayerNorm
         "attention": {"query": ..., "key": ..., "value": ..., "output": ...},
         "norm_1":    {"scale": (D,), "offset": (D,)},
         "mlp_0":     {"kernel": (D, mlp_size), "bias": (mlp_size,)},   # Dense
         "mlp_1":     {"kernel": (mlp_size, D), "bias": (D,)}}

    The dropouts are the children ``dropout_0`` (after the attention),
    ``dropout_1`` (after the activation) and ``dropout_2`` (after ``mlp_1``).

    PyTorch: ``nn.TransformerEncoderLayer(D, num_heads, dim_feedforward=mlp_size,
    dropout=dropout_rate, batch_first=True, norm_first=True)`` computes the same,
    with ``norm1, self_attn, norm2, linear1, linear2`` as ``norm_0, attention,
    norm_1, mlp_0, mlp_1`` (weights transposed, attention as in
    :func:`MultiHeadAttention`; ``layer_norm_eps`` is ``epsilon``). Its
    ``activation="gelu"`` is ``functools.partial(jax.nn.gelu, approximate=False)``.

    Args:
      num_heads: the attention's number of heads.
      mlp_size: the hidden size of the MLP.
      key_size: the size of each attention head; default ``D // num_heads``.
      dropout_rate: the rate of the three dropouts and of the attention dropout.
      activation: the MLP's activation, a function of one array.
      epsilon: the layer norms' epsilon.
      causal: whether the attention is causal by default.
      name: the layer's name inside a container.
    """
    if isinstance(mlp_size, bool) or not isinstance(mlp_size, int) or mlp_size <= 0:
        raise ValueError(f"{_KIND}: mlp_size must be a positive integer, got {mlp_size!r}")
    attention = MultiHeadAttention(num_heads, key_size, dropout_rate=dropout_rate,
                                   causal=causal)
    norms = (LayerNorm(epsilon=epsilon), LayerNorm(epsilon=epsilon))
    drops = tuple(Dropout(dropout_rate) for _ in range(3))
    mlp_0 = Dense(mlp_size)

    def _check(x):
        check_rank(x, _KIND, min_rank=2, layout="(..., length, features)")
        check_floating(x, _KIND)

    @_not_recording()
    def initialize(key, x: jax.ShapeDtypeStruct):
        _check(x)
        d = x.shape[-1]
        hidden = jax.ShapeDtypeStruct((*x.shape[:-1], mlp_size), x.dtype)
        plan = (("norm_0", norms[0], x), ("attention", attention, x),
                ("norm_1", norms[1], x), ("mlp_0", mlp_0, x), ("mlp_1", Dense(d), hidden))
        params = {}
        for index, (child_name, child, struct) in enumerate(plan):
            with layer_scope(child_name):
                p, _ = child.initialize(jax.random.fold_in(key, index), struct)
            params[child_name] = p
        return params, {}

    def forward(params, state, x, *, key=None, train=False, mask=None, causal=None):
        _check(x)
        d = x.shape[-1]

        def run(index, child_name, child, *inputs, **kwargs):
            y, _ = call_child(child_name, child, params.get(child_name, {}), {}, inputs,
                              key=_child_key(key, index), train=train, kwargs=kwargs)
            return y

        h = run(0, "norm_0", norms[0], x)
        h = run(1, "attention", attention, h, mask=mask, causal=causal)
        x = x + run(5, "dropout_0", drops[0], h)
        h = run(2, "norm_1", norms[1], x)
        h = activation(run(3, "mlp_0", mlp_0, h))
        h = run(6, "dropout_1", drops[1], h)
        h = run(4, "mlp_1", Dense(d), h)
        return x + run(7, "dropout_2", drops[2], h), state

    args = [str(num_heads), str(mlp_size)]
    if key_size is not None:
        args.append(f"key_size={key_size}")
    if dropout_rate:
        args.append(f"dropout_rate={dropout_rate}")
    if causal:
        args.append("causal=True")
    return Layer(name or "transformer_encoder_block", initialize, forward,
                 spec=f"{_KIND}({', '.join(args)})", explicit_name=name is not None,
                 container=True)
