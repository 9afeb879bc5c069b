"""A stride-1 convolution whose kernel gradient runs as matrix products on CPU.

For ``y = conv(x, w)`` (channels-last ``x: (N, *S, C)``, kernel ``w: (*K, C, F)``,
stride 1, no dilation, VALID), write ``x_k = x[:, k_0 : k_0 + S_0, ..., :]`` for
the input seen by tap ``k`` of the window, reshaped to ``(M, C)`` with
``M = N * prod(S_out)``. Then

    y = sum_k x_k @ w[k]                    (as an (M, F) matrix)
    dL/dw[k] = x_k^T @ dL/dy                (one product per tap)

XLA:CPU lowers the kernel gradient of ``lax.conv_general_dilated`` to a generic
convolution that runs far below the machine's matrix-product rate (measured on
2 cores, MNIST CNN, batch 128: 17-19 ms for the 3x3x32x64 layer against 10 ms as
per-tap products; 7-9 ms against 1.4 ms for the 3x3x1x32 layer). So
:func:`conv_valid` has a custom JVP whose tangent in the kernel is the sum of
per-tap products above (on CPU; XLA's convolution on other backends, chosen by
``lax.platform_dependent``). Reverse mode transposes that linear tangent, which
turns it into exactly the products ``x_k^T @ dL/dy``; the forward pass and the
input gradient stay XLA's convolution. With few input channels (``C < 8``) the
taps are stacked into one ``(K*C, M)`` matrix for a single product, and when
the kernel is being differentiated (training a first layer) that matrix gives
the forward values too, by one more product (3.5 ms of XLA's convolution per
step measured in the CNN's first layer at batch 128); inference keeps XLA's
convolution, which is faster on large batches.

Values equal ``lax.conv_general_dilated``'s and its derivatives up to the order
of float summation, and forward mode (``jax.jvp``, ``jax.hessian``) works.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

_FEW_CHANNELS = 8


def _dimension_numbers(ndim: int) -> tuple[str, str, str]:
    letters = {1: "W", 2: "HW", 3: "DHW"}[ndim]
    return (f"N{letters}C", f"{letters}IO", f"N{letters}C")


def _xla_conv(x, w):
    ndim = x.ndim - 2
    return lax.conv_general_dilated(x, w, (1,) * ndim, "VALID",
                                    dimension_numbers=_dimension_numbers(ndim))


def _window(x, offsets, out_shape, first):
    """The input seen by one kernel tap: spatial axes ``first, first + 1, ...`` of
    ``x`` sliced to ``o_i : o_i + S_i``, the other axes whole."""
    starts = [0] * x.ndim
    limits = list(x.shape)
    for axis, (o, s) in enumerate(zip(offsets, out_shape), start=first):
        starts[axis], limits[axis] = o, o + s
    return lax.slice(x, starts, limits)


def conv_by_taps(x, w):
    """``conv(x, w)`` as the sum over kernel taps of ``x_k @ w[k]`` (see module doc).

    Linear in ``w``; its transpose in ``w`` is the per-tap products ``x_k^T @ dy``.
    Args: x ``(N, *S_in, C)``, w ``(*K, C, F)``. Returns ``(N, *S_out, F)``.
    """
    *window, c, f = w.shape
    out_shape = tuple(s - k + 1 for s, k in zip(x.shape[1:-1], window))
    m = x.shape[0]
    for s in out_shape:
        m *= s
    taps = list(itertools.product(*(range(k) for k in window)))
    if c < _FEW_CHANNELS:
        channels_first = jnp.moveaxis(x, -1, 0)  # (C, N, *S_in)
        stacked = jnp.stack([_window(channels_first, offs, out_shape, 2) for offs in taps])
        y = lax.dot_general(stacked.reshape(len(taps) * c, m), w.reshape(len(taps) * c, f),
                            (((0,), (0,)), ((), ())))
    else:
        products = [_window(x, offs, out_shape, 1).reshape(m, c) @ w[offs] for offs in taps]
        y = sum(products[1:], products[0])
    return y.reshape(x.shape[0], *out_shape, f)


@jax.custom_jvp
def conv_valid(x, w):
    """``lax.conv_general_dilated(x, w)``, stride 1, VALID, channels-last (``N...C``, ``...IO``)."""
    return _xla_conv(x, w)


def _conv_valid_jvp(primals, tangents):
    x, w = primals
    tx, tw = tangents
    if x.shape[-1] < _FEW_CHANNELS and not isinstance(tw, SymbolicZero):
        # Training a first layer: the stacked taps the kernel's tangent needs give
        # the values too, by one more product (on CPU).
        y = lax.platform_dependent(x, w, cpu=conv_by_taps, default=_xla_conv)
    else:
        y = _xla_conv(x, w)
    terms = []
    if not isinstance(tx, SymbolicZero):
        terms.append(_xla_conv(tx, w))
    if not isinstance(tw, SymbolicZero):
        terms.append(lax.platform_dependent(x, tw, cpu=conv_by_taps, default=_xla_conv))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, sum(terms[1:], terms[0])


conv_valid.defjvp(_conv_valid_jvp, symbolic_zeros=True)
