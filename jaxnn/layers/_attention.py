"""Multi-head (scaled dot-product) attention."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn import initializers
from jaxnn._typing import DTypeLike
from jaxnn.errors import current_path
from jaxnn.layers._base import Layer, param_dtype

_KIND = "MultiHeadAttention"
_ROLES = ("query", "key", "value")


def _who(name: str | None) -> str:
    """``"MultiHeadAttention layer 'block_0/attention'"``: the path inside a container,
    else the explicit ``name``, else just ``"MultiHeadAttention layer"``."""
    path = current_path() or name
    return f"{_KIND} layer '{path}'" if path else f"{_KIND} layer"


def _split_inputs(inputs: tuple, name: str | None) -> tuple:
    """``(query, key_input, value_input)`` from 1, 2 or 3 positional inputs."""
    if len(inputs) == 1:
        return inputs[0], inputs[0], inputs[0]
    if len(inputs) == 2:
        return inputs[0], inputs[1], inputs[1]
    if len(inputs) == 3:
        return inputs
    raise TypeError(
        f"{_who(name)}: expected 1 input (self-attention), 2 (query, key_value) or 3 "
        f"(query, key, value), got {len(inputs)}"
    )


def _check_inputs(q, k, v, name: str | None) -> None:
    """Real floating inputs of rank >= 2, ``(..., length, features)``, with the same
    batch axes; key and value of the same length."""
    for role, x in zip(_ROLES, (q, k, v)):
        shape = tuple(x.shape)
        if len(shape) < 2:
            raise ValueError(
                f"{_who(name)}: expected the {role} input to have rank >= 2 "
                f"(..., length, features), got shape {shape} (rank {len(shape)})"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"{_who(name)}: expected a real floating-point {role} input, got dtype "
                f"{x.dtype} with shape {shape}; convert it first, e.g. x.astype(jnp.float32)"
            )
    for role, x in (("key", k), ("value", v)):
        if tuple(x.shape[:-2]) != tuple(q.shape[:-2]):
            raise ValueError(
                f"{_who(name)}: the {role} input's batch axes {tuple(x.shape[:-2])} differ "
                f"from the query's {tuple(q.shape[:-2])} (query shape {tuple(q.shape)}, "
                f"{role} shape {tuple(x.shape)})"
            )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"{_who(name)}: key and value must have the same length (axis -2), got key "
            f"shape {tuple(k.shape)} and value shape {tuple(v.shape)}"
        )


def _project(p: dict, x, role: str, name: str | None):
    kernel = p["kernel"]
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"{_who(name)}: expected the {role} input with last dimension (features) "
            f"{kernel.shape[0]} (params['{role}']['kernel'] is {tuple(kernel.shape)}), "
            f"got shape {tuple(x.shape)}"
        )
    y = jnp.matmul(x, kernel)
    return y + p["bias"] if "bias" in p else y


def _prepare_mask(mask, batch: tuple[int, ...], heads: int, lq: int, lk: int,
                  name: str | None):
    """The boolean mask as a 4-D array broadcastable to ``(B, heads, lq, lk)``, with
    ``B = prod(batch)``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    target = (*batch, heads, lq, lk)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"{_who(name)}: mask must be a boolean array (True = may attend), got dtype "
            f"{mask.dtype} with shape {tuple(mask.shape)}; an additive float mask is not "
            "accepted, use e.g. mask=(additive == 0)"
        )
    try:
        fits = np.broadcast_shapes(tuple(mask.shape), target) == target
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{_who(name)}: mask of shape {tuple(mask.shape)} does not broadcast to "
            f"(*batch, heads, query length, key length) = {target}; a key padding mask "
            "of shape (N, Lk) is passed as mask[:, None, None, :]"
        )
    if len(batch) == 1:
        return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return jnp.broadcast_to(mask, target).reshape((-1, heads, lq, lk))


def _allowed(mask, causal: bool, lq: int, lk: int):
    """The combined boolean mask (4-D, broadcastable to ``(B, H, lq, lk)``) or None."""
    if causal:
        lower = jnp.tril(jnp.ones((lq, lk), jnp.bool_))[None, None]
        return lower if mask is None else jnp.logical_and(mask, lower)
    return mask


def attend_explicit(q, k, v, mask=None, causal: bool = False, *, dropout_rate: float = 0.0,
                    dropout_key=None):
    """The attention formula written out: ``(B, Lq, H, V)`` from ``q (B, Lq, H, K)``,
    ``k (B, Lk, H, K)``, ``v (B, Lk, H, V)`` and a boolean ``mask`` broadcastable to
    ``(B, H, Lq, Lk)``. Logits and softmax in float32 or wider. With ``dropout_key``,
    the attention weights are dropped with probability ``dropout_rate`` (and the kept
    ones scaled by ``1 / (1 - dropout_rate)``). Fully masked rows are not yet zeroed."""
    compute = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=compute)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), compute)
    allowed = _allowed(mask, causal, q.shape[1], k.shape[1])
    if allowed is not None:
        # The lowest finite number rather than -inf: exp gives exactly 0 beside any
        # allowed logit, and a row with none allowed stays finite (uniform weights).
        logits = jnp.where(allowed, logits, jnp.finfo(compute).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_key is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - dropout_rate, compute),
                            jnp.zeros((), compute))
    return jnp.einsum("bhqs,bshv->bqhv", weights.astype(v.dtype), v)


def attend_fused(q, k, v, mask=None, causal: bool = False):
    """The same as :func:`attend_explicit` without dropout, by
    :func:`jax.nn.dot_product_attention` (needs ``K == V`` and one dtype)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        scale=1.0 / math.sqrt(q.shape[-1]))


def zero_empty_rows(out, mask, causal: bool, lk: int):
    """Set the output of queries that may attend to none of the ``lk`` keys to zero
    (both paths give finite but meaningless values there). ``out`` is ``(B, Lq, H, V)``."""
    if mask is None:
        return out  # a causal mask alone always allows key 0
    allowed = _allowed(mask, causal, out.shape[1], lk)
    any_key = jnp.any(allowed, axis=-1)                       # (B|1, H|1, Lq|1)
    any_key = jnp.transpose(any_key, (0, 2, 1))[..., None]    # (B|1, Lq|1, H|1, 1)
    return jnp.where(any_key, out, jnp.zeros((), out.dtype))


def can_fuse(dtype, key_size: int, value_size: int, dropout_active: bool) -> bool:
    """Whether :func:`jax.nn.dot_product_attention` computes what the formula says.

    Not when attention dropout is active (it needs the weights), when key and value
    heads differ in size (it takes one head size), or in float64 (its XLA
    implementation computes the softmax in float32, losing float64's precision).
    """
    return (not dropout_active and key_size == value_size
            and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                     jnp.dtype(jnp.float16)))


def _positive_int_or_none(value, arg: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value <= 0):
        raise ValueError(f"{_KIND}: {arg} must be a positive integer or None, got {value!r}")


def MultiHeadAttention(
    num_heads: int,
    key_size: int | None = None,
    value_size: int | None = None,
    output_size: int | None = None,
    *,
    use_bias: bool = True,
    dropout_rate: float = 0.0,
    causal: bool = False,
    kernel_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Multi-head scaled dot-product attention (Vaswani et al., 2017).

    Inputs, ``(..., length, features)`` with the same batch axes ``...``:

    * ``layer.apply(params, x)``: self-attention, query = key = value = ``x``;
    * ``layer.apply(params, q, kv)``: cross-attention, key = value = ``kv``;
    * ``layer.apply(params, q, k, v)``: three separate inputs.

    Shapes: query ``(N, Lq, Dq)``, key ``(N, Lk, Dk)``, value ``(N, Lk, Dv)``; output
    ``(N, Lq, Dout)``. ``N`` may be any number of batch axes, or none.

    With ``H = num_heads`` heads of sizes ``K = key_size`` and ``V = value_size``, for
    each head ``h`` (``[h]`` takes the columns ``h*K:(h+1)*K``, resp. ``h*V:(h+1)*V``)::

        Q = query @ Wq + bq      (N, Lq, H*K)
        K_ = key @ Wk + bk       (N, Lk, H*K)
        V_ = value @ Wv + bv     (N, Lk, H*V)
        A[h] = softmax(Q[h] @ K_[h]^T / sqrt(K) + M)      (N, Lq, Lk), over keys
        O[h] = A[h] @ V_[h]                               (N, Lq, V)
        y = concat_h(O[h]) @ Wo + bo                      (N, Lq, Dout)

    ``M`` is 0 where the query may attend to the key and -inf where it may not.

    Masks: keyword ``mask=``, a boolean array broadcastable to
    ``(N, H, Lq, Lk)``, True where the query may attend to the key (the convention
    of :func:`jax.nn.dot_product_attention`; PyTorch's boolean masks mean the
    opposite). A key padding mask ``valid (N, Lk)`` is passed as
    ``mask=valid[:, None, None, :]``. ``causal=True`` (at construction, or as a
    keyword at call, which overrides it) also lets query ``i`` attend only to keys
    ``j <= i`` (counted from the start of both sequences). A query that may attend
    to no key at all gets ``O = 0`` (so ``y = bo``) in every head that masks it
    fully, with zero gradients, on both computation paths; PyTorch returns NaN there.

    Computation: by :func:`jax.nn.dot_product_attention` (``implementation=None``:
    JAX chooses; jax 0.10 uses its XLA implementation), except where it cannot give
    the formula above, where the formula is computed as written: with attention
    dropout in training (it needs the weights), when ``key_size != value_size``, and
    in float64 (its softmax runs in float32). Logits and softmax are computed in
    float32 for float16/bfloat16 inputs.

    Dropout: with ``train=True`` and ``dropout_rate > 0`` each attention weight
    ``A[h][n, i, j]`` is zeroed with probability ``dropout_rate`` and the others
    scaled by ``1 / (1 - dropout_rate)`` (as PyTorch's ``dropout=``); this needs
    ``key=``. The same key gives the same result.

    Parameters, four Dense-like entries (``kernel`` ``(in, out)``, ``bias`` ``(out,)``,
    biases absent when ``use_bias=False``)::

        {"query":  {"kernel": (Dq, H*K), "bias": (H*K,)},
         "key":    {"kernel": (Dk, H*K), "bias": (H*K,)},
         "value":  {"kernel": (Dv, H*V), "bias": (H*V,)},
         "output": {"kernel": (H*V, Dout), "bias": (Dout,)}}

    Kernels default to Glorot uniform, biases to zeros. PyTorch's
    ``nn.MultiheadAttention(E, H, batch_first=True)`` (``K = V = E / H``) maps as
    ``query/kernel = in_proj_weight[:E].T``, ``key/kernel = in_proj_weight[E:2E].T``,
    ``value/kernel = in_proj_weight[2E:].T``, the biases ``in_proj_bias[:E]``,
    ``[E:2E]``, ``[2E:]``, and ``output/kernel = out_proj.weight.T``,
    ``output/bias = out_proj.bias``. With ``kdim``/``vdim`` set, PyTorch keeps
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` instead (each a kernel
    transposed). Its ``add_bias_kv`` and ``add_zero_attn`` have no counterpart.

    Args:
      num_heads: the number of heads ``H``.
      key_size: ``K``, the size of each query/key head; default ``Dq // H`` (``Dq``
        must then be divisible by ``H``).
      value_size: ``V``, the size of each value head; default ``K``.
      output_size: ``Dout``; default ``Dq``.
      use_bias: whether the four projections have biases.
      dropout_rate: the fraction of attention weights dropped in training, in [0, 1).
      causal: apply a causal mask on every call (unless the call says ``causal=``).
      kernel_init, bias_init: initializers of the kernels and biases.
      dtype: dtype of the parameters (default: the query's float dtype).
      name: the layer's name inside a container.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{_KIND}: num_heads must be a positive integer, got {num_heads!r}")
    _positive_int_or_none(key_size, "key_size")
    _positive_int_or_none(value_size, "value_size")
    _positive_int_or_none(output_size, "output_size")
    if (isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real)
            or not 0.0 <= float(dropout_rate) < 1.0):
        raise ValueError(
            f"{_KIND}: dropout_rate is the fraction of attention weights dropped and must "
            f"be a number in [0, 1), got {dropout_rate!r}"
        )
    dropout_rate = float(dropout_rate)
    default_causal = bool(causal)
    kernel_init = kernel_init or initializers.glorot_uniform()
    bias_init = bias_init or initializers.zeros()

    def initialize(key, *inputs: jax.ShapeDtypeStruct):
        q, k, v = _split_inputs(inputs, name)
        _check_inputs(q, k, v, name)
        features = q.shape[-1]
        if key_size is None and features % num_heads:
            raise ValueError(
                f"{_who(name)}: the query's {features} features are not divisible by "
                f"num_heads={num_heads}; pass key_size= (the size of each head), or a "
                f"number of heads that divides {features}"
            )
        ks = key_size or features // num_heads
        vs = value_size or ks
        out = output_size or features
        dt = param_dtype(q, dtype)
        shapes = {"query": (q.shape[-1], num_heads * ks), "key": (k.shape[-1], num_heads * ks),
                  "value": (v.shape[-1], num_heads * vs), "output": (num_heads * vs, out)}
        params = {}
        for index, (role, shape) in enumerate(shapes.items()):
            kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, index))
            params[role] = {"kernel": kernel_init(kernel_key, shape, dt)}
            if use_bias:
                params[role]["bias"] = bias_init(bias_key, shape[1:], dt)
        return params, {}

    def forward(params, state, *inputs, key=None, train=False, mask=None, causal=None):
        q_in, k_in, v_in = _split_inputs(inputs, name)
        _check_inputs(q_in, k_in, v_in, name)
        is_causal = default_causal if causal is None else bool(causal)
        heads_k = params["query"]["kernel"].shape[1]
        heads_v = params["value"]["kernel"].shape[1]
        if heads_k % num_heads or heads_v % num_heads or (
                params["key"]["kernel"].shape[1] != heads_k):
            raise ValueError(
                f"{_who(name)}: params do not fit num_heads={num_heads}: query, key and "
                f"value kernels have {heads_k}, {params['key']['kernel'].shape[1]} and "
                f"{heads_v} columns (query and key must match; each a multiple of "
                f"{num_heads})"
            )
        ks, vs = heads_k // num_heads, heads_v // num_heads
        batch = tuple(q_in.shape[:-2])
        lq, lk = q_in.shape[-2], k_in.shape[-2]
        mask4 = _prepare_mask(mask, batch, num_heads, lq, lk, name)
        dropout_active = train and dropout_rate > 0.0
        if dropout_active and key is None:
            raise ValueError(
                f"{_who(name)} needs a PRNG key in training mode (dropout_rate="
                f"{dropout_rate}): pass key=... to apply "
                "(e.g. key=jax.random.fold_in(base_key, step))"
            )
        q = _project(params["query"], q_in, "query", name)
        k = _project(params["key"], k_in, "key", name)
        v = _project(params["value"], v_in, "value", name)
        dt = jnp.result_type(q, k, v)
        q = q.astype(dt).reshape((-1, lq, num_heads, ks))
        k = k.astype(dt).reshape((-1, lk, num_heads, ks))
        v = v.astype(dt).reshape((-1, lk, num_heads, vs))
        if can_fuse(dt, ks, vs, dropout_active):
            o = attend_fused(q, k, v, mask4, is_causal)
        else:
            o = attend_explicit(q, k, v, mask4, is_causal, dropout_rate=dropout_rate,
                                dropout_key=key if dropout_active else None)
        o = zero_empty_rows(o, mask4, is_causal, lk)
        o = o.reshape((*batch, lq, num_heads * vs))
        return _project(params["output"], o, "output", name), state

    args = [str(num_heads)]
    args += [f"{a}={v}" for a, v in (("key_size", key_size), ("value_size", value_size),
                                      ("output_size", output_size)) if v is not None]
    if dropout_rate:
        args.append(f"dropout_rate={dropout_rate}")
    if default_causal:
        args.append("causal=True")
    return Layer(name or "multi_head_attention", initialize, forward,
                 spec=f"{_KIND}({', '.join(args)})", explicit_name=name is not None)
