"""Transposed convolutions: Conv1DTranspose and Conv2DTranspose (channels-last).

A transposed ("fractionally strided") convolution is the gradient of a
convolution with respect to its input: every input position scatters a copy of
the kernel, scaled by its value, into the output, the copies ``strides`` apart.
It upsamples, as in decoders and generators.

Layouts: inputs and outputs ``(N, W, C)`` / ``(N, H, W, C)``; the kernel is
``(*K, C_in, filters)``, window first, then this layer's input channels, then
its output channels (HWIO, like :func:`jaxnn.Conv2D`'s). From PyTorch's
``ConvTranspose2d.weight``, ``(C_in, C_out, kh, kw)``, and ``ConvTranspose1d``'s
``(C_in, C_out, k)``::

    kernel_2d = w.permute(2, 3, 0, 1)    # (C_in, C_out, kh, kw) -> (kh, kw, C_in, C_out)
    kernel_1d = w.permute(2, 0, 1)       # (C_in, C_out, k) -> (k, C_in, C_out)

with no flip: like PyTorch's, the formula below scatters ``kernel[p]`` to
offset ``p`` (the flip that computing it as a cross-correlation needs happens
inside). Keras' ``Conv2DTranspose`` kernel is ``(kh, kw, filters, C_in)``, the
kernel of the convolution being transposed: swap its last two axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnn import initializers
from jaxnn._typing import DTypeLike
from jaxnn.errors import check_axis_size, check_floating, check_rank, where
from jaxnn.layers._base import Layer, param_dtype
from jaxnn.layers._conv import (
    _SPATIAL_LETTERS,
    _SPATIAL_NAMES,
    PaddingLike,
    _describe,
    _is_int,
    as_padding,
    as_tuple,
    layout,
)


def _as_output_padding(value, ndim: int, kind: str, strides, dilation, pad_spec):
    """``output_padding`` as ``ndim`` ints, each below ``max(stride, dilation)`` (PyTorch's
    rule)."""
    if value is None:
        return (0,) * ndim
    if _is_int(value):
        values: tuple = (int(value),) * ndim
    elif isinstance(value, Sequence) and not isinstance(value, str) and all(
        _is_int(v) for v in value
    ):
        values = tuple(int(v) for v in value)
    else:
        values = ()
    if len(values) != ndim or any(v < 0 for v in values):
        want = "a non-negative int" + (f" or a tuple of {ndim} non-negative ints"
                                       if ndim > 1 else "")
        raise ValueError(f"{kind}: output_padding must be {want}, got {value!r}")
    for v, s, d in zip(values, strides, dilation):
        if v >= max(s, d):
            raise ValueError(
                f"{kind}: output_padding {_describe(values)} must be smaller than the stride "
                f"or the dilation on every axis (strides {_describe(strides)}, dilation "
                f"{_describe(dilation)})"
            )
    if pad_spec == "SAME" and any(values):
        raise ValueError(
            f"{kind}: output_padding is not supported with padding='SAME' (whose output "
            "is input * strides); use an int or explicit (low, high) padding"
        )
    return values


def _conv_transpose(kind, ndim, filters, kernel_size, strides, padding, output_padding,
                    dilation, use_bias, kernel_init, bias_init, dtype, name) -> Layer:
    if not _is_int(filters) or filters <= 0:
        raise ValueError(f"{kind}: filters must be a positive integer, got {filters!r}")
    kernel_size = as_tuple(kernel_size, ndim, kind, "kernel_size")
    strides = as_tuple(strides, ndim, kind, "strides")
    dilation = as_tuple(dilation, ndim, kind, "dilation")
    pad_spec = as_padding(padding, ndim, kind)
    output_padding = _as_output_padding(output_padding, ndim, kind, strides, dilation,
                                        pad_spec)
    kernel_init = kernel_init or initializers.glorot_uniform()
    bias_init = bias_init or initializers.zeros()

    letters = _SPATIAL_LETTERS[ndim]
    dimension_numbers = (f"N{letters}C", f"{letters}IO", f"N{letters}C")
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    input_layout = layout(ndim)

    # What is cut from the low and high ends of the full scatter output
    # ((size - 1) * s + extent positions); a negative high crop appends zeros.
    if pad_spec == "SAME":
        crops = []
        for e, s in zip(extent, strides):
            lo = max(e - s, 0) // 2
            crops.append((lo, e - s - lo))
    elif pad_spec == "VALID":
        crops = [(0, -op) for op in output_padding]
    else:
        crops = [(lo, hi - op) for (lo, hi), op in zip(pad_spec, output_padding)]
    crops = tuple(crops)
    # The same as a stride-1 cross-correlation of the input dilated by the strides
    # with the flipped kernel, padded by extent - 1 less the crops (lax accepts
    # negative padding, which cuts).
    lax_padding = tuple((e - 1 - lo, e - 1 - hi) for e, (lo, hi) in zip(extent, crops))

    def check_input(x) -> None:
        check_rank(x, kind, min_rank=ndim + 2, max_rank=ndim + 2, layout=input_layout)
        check_floating(x, kind)
        shape = tuple(np.shape(x))
        for axis, (size, s, e, (lo, hi)) in enumerate(zip(shape[1:-1], strides, extent, crops)):
            if (size - 1) * s + e - lo - hi < 1:
                raise ValueError(
                    f"{where(kind)}: input of shape {shape} gives an empty output: its "
                    f"{_SPATIAL_NAMES[ndim][axis]} {size} would become "
                    f"({size} - 1) * stride {s} + window {e} - cropped {lo + hi} = "
                    f"{(size - 1) * s + e - lo - hi}; use less padding or a larger input"
                )

    def initialize(key, x: jax.ShapeDtypeStruct):
        check_input(x)
        dt = param_dtype(x, dtype)
        kernel_key, bias_key = jax.random.split(key)
        params = {"kernel": kernel_init(kernel_key, (*kernel_size, x.shape[-1], filters), dt)}
        if use_bias:
            params["bias"] = bias_init(bias_key, (filters,), dt)
        return params, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        kernel = params["kernel"]
        check_input(x)
        check_axis_size(x, kind, axis=-1, expected=kernel.shape[-2],
                        what="last dimension (channels)")
        dt = jnp.result_type(x, kernel)
        x, kernel = x.astype(dt), kernel.astype(dt)
        flipped = lax.rev(kernel, tuple(range(ndim)))
        y = lax.conv_general_dilated(x, flipped, window_strides=(1,) * ndim,
                                     padding=lax_padding, lhs_dilation=strides,
                                     rhs_dilation=dilation,
                                     dimension_numbers=dimension_numbers)
        if use_bias:
            y = y + params["bias"]
        return y, state

    extras = [f"{filters}", f"{_describe(kernel_size)}"]
    if any(s != 1 for s in strides):
        extras.append(f"strides={_describe(strides)}")
    if pad_spec != "VALID":
        extras.append(f"padding={pad_spec!r}")
    if any(output_padding):
        extras.append(f"output_padding={_describe(output_padding)}")
    if any(d != 1 for d in dilation):
        extras.append(f"dilation={_describe(dilation)}")
    if not use_bias:
        extras.append("use_bias=False")
    stem = {"Conv1DTranspose": "conv1d_transpose", "Conv2DTranspose": "conv2d_transpose"}[kind]
    return Layer(name or stem, initialize, forward, spec=f"{kind}({', '.join(extras)})",
                 explicit_name=name is not None)


def Conv1DTranspose(
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: PaddingLike = "VALID",
    output_padding: int | None = None,
    dilation: int = 1,
    use_bias: bool = True,
    kernel_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """A 1-D transposed convolution over channels-last sequences.

    Shapes: ``x`` is ``(N, W, C_in)``, ``y`` is ``(N, W_out, filters)``; the
    formula and the padding rules are :func:`Conv2DTranspose`'s on one axis::

        full[n, i*s + t*d, o] += x[n, i, c] * kernel[t, c, o]
        y[n, j, o] = bias[o] + full[n, lo + j, o]

    Parameters: ``kernel`` ``(k, C_in, filters)`` (from PyTorch's
    ``ConvTranspose1d.weight``, ``(C_in, C_out, k)``: ``w.permute(2, 0, 1)``) and
    ``bias`` ``(filters,)``. Default name stem ``"conv1d_transpose"``.
    """
    return _conv_transpose("Conv1DTranspose", 1, filters, kernel_size, strides, padding,
                           output_padding, dilation, use_bias, kernel_init, bias_init, dtype,
                           name)


def Conv2DTranspose(
    filters: int,
    kernel_size: int | tuple[int, int],
    *,
    strides: int | tuple[int, int] = 1,
    padding: PaddingLike = "VALID",
    output_padding: int | tuple[int, int] | None = None,
    dilation: int | tuple[int, int] = 1,
    use_bias: bool = True,
    kernel_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """A 2-D transposed convolution over channels-last images (NHWC).

    Shapes: ``x`` is ``(N, H, W, C_in)``, ``y`` is ``(N, H_out, W_out, filters)``.
    The batch axis is required.

    Each input pixel scatters the kernel, scaled, into a full output; with
    strides ``(sh, sw)`` and dilation ``(dh, dw)``::

        full[n, i*sh + p*dh, j*sw + q*dw, o] += x[n, i, j, c] * kernel[p, q, c, o]
        y[n, a, b, o] = bias[o] + full[n, top + a, left + b, o]

    ``full`` has ``(size - 1) * s + (k - 1) * d + 1`` positions per axis; the
    padding says how many are cut from each end (positions past the end of
    ``full`` are zeros):

    * ``"VALID"``: none, ``out = (size - 1) * s + (k - 1) * d + 1``. (Keras'
      VALID gives ``size * s`` where the window is shorter than the stride;
      ``output_padding`` gives that here.)
    * ``"SAME"`` (Keras' rule): ``out = size * s``; where the window
      ``e = (k - 1) * d + 1`` is longer than the stride, ``e - s`` positions are
      cut, the odd one from the high end.
    * an int ``p`` or pairs ``((top, bottom), (left, right))``: PyTorch's
      ``padding``, ``out = (size - 1) * s - top - bottom + (k - 1) * d + 1 +
      output_padding``. ``output_padding`` (an int or a pair, each smaller than
      the stride or the dilation) keeps that many more positions at the high end.

    The layer is the gradient, with respect to its input, of
    ``Conv2D(C_in, kernel_size, strides=..., padding=..., dilation=...)`` whose
    kernel is this one with the last two axes swapped, on an input of this
    layer's output shape.

    Args:
      filters: the number of output channels.
      kernel_size: ``kh`` and ``kw``, an int for both or a pair.
      strides: ``(sh, sw)``, the upsampling factors.
      padding: ``"VALID"``, ``"SAME"`` (any case), an int or explicit pairs (above).
      output_padding: extra positions at the high end (default none); not with SAME.
      dilation: ``(dh, dw)``, the spacing between kernel taps.
      use_bias: whether to add a bias.
      kernel_init, bias_init: initializers (default Glorot uniform, zeros).
      dtype: the parameter dtype (default: the input's floating dtype).
      name: an explicit layer name (default stem ``"conv2d_transpose"``).

    Parameters: ``kernel`` ``(kh, kw, C_in, filters)`` (from PyTorch's
    ``ConvTranspose2d.weight``, ``(C_in, C_out, kh, kw)``: ``w.permute(2, 3, 0, 1)``,
    no flip; from Keras' ``(kh, kw, filters, C_in)``: ``k.transpose(0, 1, 3, 2)``)
    and ``bias`` ``(filters,)``. ``nn.ConvTranspose2d(C_in, C_out, k, stride=s,
    padding=p, output_padding=op, dilation=d)`` is
    ``Conv2DTranspose(C_out, k, strides=s, padding=p, output_padding=op, dilation=d)``.
    """
    return _conv_transpose("Conv2DTranspose", 2, filters, kernel_size, strides, padding,
                           output_padding, dilation, use_bias, kernel_init, bias_init, dtype,
                           name)


__all__ = ["Conv1DTranspose", "Conv2DTranspose"]
