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
:func:`conv_valid` has a custom JVP whose tangent in the kernel is a matrix
product on CPU (XLA's convolution on other backends, chosen by
``lax.platform_dependent``). Reverse mode transposes that linear tangent into
products with ``dL/dy``; the input gradient stays XLA's convolution. When the
kernel is being differentiated (training), the matrix the kernel's tangent
needs gives the forward values too, by one more product, in one of three forms:

* few input channels (``C < 8``, a first layer): the taps stacked channels-first
  into one ``(K*C, M)`` matrix for the kernel's tangent; the values, when
  ``K*C <= 32``, as ``sum_k sum_c x_k[..., c] * w[k, c]``, a loop XLA:CPU fuses
  with the bias and activation that follow, so the layer's output is written
  once (MNIST CNN, first layer, batch 128: about 1.5 ms a step less than the
  product, which itself saved 3.5 ms of XLA's convolution); larger kernels use
  the stacked product for the values too;
* otherwise, the patch matrix ``P = [x_1 | x_2 | ... | x_K]`` of shape
  ``(M, K*C)`` (im2col), built as a sum of zero-padded windows so that XLA:CPU
  writes it in one pass (2.1 ms for the CNN's second layer at batch 128, against
  6.8 ms for a concatenation), then ``y = P @ w`` and ``dL/dw = P^T @ dL/dy``: a
  training step of the MNIST CNN 11-18% faster than XLA's forward convolution
  with per-tap kernel products;
* when ``P`` would exceed :data:`PATCHES_MAX_BYTES` (large images): XLA's forward
  convolution and one product per tap, each over a window that lives only as
  long as its product.

Inference keeps XLA's convolution, which is faster on large batches.

Values equal ``lax.conv_general_dilated``'s and its derivatives up to the order
of float summation, and forward mode (``jax.jvp``, ``jax.hessian``) works.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

_FEW_CHANNELS = 8
_ELEMENTWISE_TERMS = 32  # most kernel entries per output summed as a fused loop
PATCHES_MAX_BYTES = 1 << 27  # largest im2col matrix (128 MiB) built for a training step


def _dimension_numbers(ndim: int) -> tuple[str, str, str]:
    letters = {1: "W", 2: "HW", 3: "DHW"}[ndim]
    return (f"N{letters}C", f"{letters}IO", f"N{letters}C")


def _xla_conv(x, w):
    ndim = x.ndim - 2
    return lax.conv_general_dilated(x, w, (1,) * ndim, "VALID",
                                    dimension_numbers=_dimension_numbers(ndim))


def _taps(x, window):
    """The kernel taps' offsets in row-major order and the output's spatial shape
    ``S_in - window + 1`` for input ``x`` ``(N, *S_in, C)``."""
    out_shape = tuple(s - k + 1 for s, k in zip(x.shape[1:-1], window))
    return list(itertools.product(*(range(k) for k in window))), out_shape


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
    taps, out_shape = _taps(x, window)
    m = x.shape[0] * math.prod(out_shape)
    if c < _FEW_CHANNELS:
        channels_first = jnp.moveaxis(x, -1, 0)  # (C, N, *S_in)
        stacked = jnp.stack([_window(channels_first, offs, out_shape, 2) for offs in taps])
        y = lax.dot_general(stacked.reshape(len(taps) * c, m), w.reshape(len(taps) * c, f),
                            (((0,), (0,)), ((), ())))
    else:
        products = [_window(x, offs, out_shape, 1).reshape(m, c) @ w[offs] for offs in taps]
        y = sum(products[1:], products[0])
    return y.reshape(x.shape[0], *out_shape, f)


def patches(x, window):
    """The im2col matrix of ``x`` for a kernel of spatial shape ``window``.

    Args: x ``(N, *S_in, C)``. Returns ``(N, *S_out, K*C)`` with
    ``S_out = S_in - window + 1`` and ``K = prod(window)``: entry ``[n, *s, k*C + c]``
    is ``x[n, *(s + offset_k), c]`` for the ``k``-th tap in row-major order, so that
    ``patches(x) @ w.reshape(K*C, F)`` is the convolution. Written as a sum of
    windows each zero-padded into its own block of channels (one fused loop on
    XLA:CPU, where a concatenation copies every window first).
    """
    taps, out_shape = _taps(x, window)
    c = x.shape[-1]
    total = None
    for index, offsets in enumerate(taps):
        spread = [(0, 0)] * (x.ndim - 1) + [(index * c, (len(taps) - 1 - index) * c)]
        part = jnp.pad(_window(x, offsets, out_shape, 1), spread)
        total = part if total is None else total + part
    return total


def _values_and_kernel_tangent(x, w, tw):
    """``(conv(x, w), conv(x, tw))`` from one patch matrix: ``P @ w`` and ``P @ tw``."""
    *window, c, f = w.shape
    p = patches(x, window)
    rows = p.reshape(-1, p.shape[-1])
    out_shape = p.shape[:-1] + (f,)
    return ((rows @ w.reshape(-1, f)).reshape(out_shape),
            (rows @ tw.reshape(-1, f)).reshape(out_shape))


def _xla_values_and_kernel_tangent(x, w, tw):
    return _xla_conv(x, w), _xla_conv(x, tw)


def _patches_fit(x, w) -> bool:
    *window, c, _ = w.shape
    taps, out_shape = _taps(x, window)
    rows = x.shape[0] * math.prod(out_shape)
    return rows * len(taps) * c * x.dtype.itemsize <= PATCHES_MAX_BYTES


def conv_elementwise(x, w):
    """``conv(x, w)`` as ``sum_k sum_c x_k[..., c] * w[k, c, :]``: one multiply-add per
    kernel entry and output, no matrix product (for few input channels).

    Args: x ``(N, *S_in, C)``, w ``(*K, C, F)``. Returns ``(N, *S_out, F)``.
    """
    *window, c, f = w.shape
    taps, out_shape = _taps(x, window)
    total = None
    for offsets in taps:
        seen = _window(x, offsets, out_shape, 1)
        for channel in range(c):
            term = seen[..., channel:channel + 1] * w[offsets + (channel,)]
            total = term if total is None else total + term
    return total


@jax.custom_jvp
def conv_valid(x, w):
    """``lax.conv_general_dilated(x, w)``, stride 1, VALID, channels-last (``N...C``, ``...IO``)."""
    return _xla_conv(x, w)


def _conv_valid_jvp(primals, tangents):
    x, w = primals
    tx, tw = tangents
    terms = []
    if isinstance(tw, SymbolicZero):
        y = _xla_conv(x, w)
    elif x.shape[-1] < _FEW_CHANNELS:
        # Training a first layer (on CPU): the values as a fused loop, or from the
        # stacked taps the kernel's tangent needs, by one more product.
        few_terms = w.size // w.shape[-1] <= _ELEMENTWISE_TERMS
        y = lax.platform_dependent(x, w, cpu=conv_elementwise if few_terms else conv_by_taps,
                                   default=_xla_conv)
        terms.append(lax.platform_dependent(x, tw, cpu=conv_by_taps, default=_xla_conv))
    elif _patches_fit(x, w):
        y, t = lax.platform_dependent(x, w, tw, cpu=_values_and_kernel_tangent,
                                      default=_xla_values_and_kernel_tangent)
        terms.append(t)
    else:
        y = _xla_conv(x, w)
        terms.append(lax.platform_dependent(x, tw, cpu=conv_by_taps, default=_xla_conv))
    if not isinstance(tx, SymbolicZero):
        terms.append(_xla_conv(tx, w))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, sum(terms[1:], terms[0])


conv_valid.defjvp(_conv_valid_jvp, symbolic_zeros=True)
