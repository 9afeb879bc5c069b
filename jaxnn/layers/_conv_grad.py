"""A stride-1 convolution whose kernel gradient is written as matrix products on CPU.

For ``y = conv(x, w)`` (channels-last ``x: (N, *S, C)``, kernel ``w: (*K, C, F)``,
stride 1, no dilation, VALID), the kernel gradient is a sum over the output
positions ``m = (n, *s)``:

    dL/dw[k, c, f] = sum_m x[n, s + k, c] * dy[n, s, f]

i.e. for every tap ``k`` of the window, one matrix product
``x_k^T @ dy`` with ``x_k = x[:, k_0 : k_0 + S_0, ...]`` reshaped to ``(M, C)`` and
``dy`` to ``(M, F)``. XLA:CPU lowers the kernel gradient of
``lax.conv_general_dilated`` to a generic convolution that runs far below the
machine's matrix-product rate (measured on 2 cores, MNIST CNN, batch 128: 17 ms
for the 3x3x32x64 layer against 10 ms as per-tap products; 7 ms against 1.4 ms for
the 3x3x1x32 layer), so on CPU the gradient is taken as products:

* few input channels (``C < 8``): the taps stacked channel-first into one
  ``(K*C, M)`` matrix and one product with ``dy``;
* otherwise one ``(C, M) @ (M, F)`` product per tap.

Other backends (GPU, TPU) keep XLA's own convolution gradient
(``lax.platform_dependent``). The input gradient and the forward pass are XLA's
in every case. Values equal ``lax.conv_general_dilated``'s gradient up to the
order of float summation.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

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


def kernel_grad_products(x, dy, kernel_shape):
    """``dL/dw`` of a stride-1 VALID convolution as matrix products (see module doc).

    Args:
      x: ``(N, *S_in, C)``; dy: ``(N, *S_out, F)``; kernel_shape: ``(*K, C, F)``.
    Returns:
      ``(*K, C, F)``, in ``x``'s dtype.
    """
    *window, c, f = kernel_shape
    out_shape = dy.shape[1:-1]
    m = dy.shape[0]
    for s in out_shape:
        m *= s
    taps = list(itertools.product(*(range(k) for k in window)))
    dy_matrix = dy.reshape(m, f)
    if c < _FEW_CHANNELS:
        channels_first = jnp.moveaxis(x, -1, 0)  # (C, N, *S_in)
        stacked = jnp.stack([_window(channels_first, offs, out_shape, 2) for offs in taps])
        grads = stacked.reshape(len(taps) * c, m) @ dy_matrix  # (K*C, F)
        return grads.reshape(*window, c, f)
    grads = [_window(x, offs, out_shape, 1).reshape(m, c).T @ dy_matrix for offs in taps]
    return jnp.stack(grads).reshape(*window, c, f)


def _kernel_grad_xla(x, dy, w):
    return jax.vjp(lambda w: _xla_conv(x, w), w)[1](dy)[0]


@jax.custom_vjp
def conv_valid(x, w):
    """``lax.conv_general_dilated(x, w)``, stride 1, VALID, channels-last (``N...C``, ``...IO``)."""
    return _xla_conv(x, w)


def _conv_valid_fwd(x, w):
    return _xla_conv(x, w), (x, w)


def _conv_valid_bwd(residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda x: _xla_conv(x, w), x)[1](dy)[0]
    dw = lax.platform_dependent(
        x, dy, w,
        cpu=lambda x, dy, w: kernel_grad_products(x, dy, w.shape).astype(w.dtype),
        default=_kernel_grad_xla,
    )
    return dx, dw


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)
