"""Convolution layers: Conv1D and Conv2D (channels-last).

Layouts (the ones Keras and TensorFlow use, and the fast path of
``jax.lax.conv_general_dilated``):

* inputs and outputs are channels-last: ``(N, W, C)`` for Conv1D,
  ``(N, H, W, C)`` (NHWC) for Conv2D;
* kernels put the window first, then input channels, then output channels:
  ``(kw, C_in, C_out)`` (WIO) for Conv1D, ``(kh, kw, C_in, C_out)`` (HWIO) for
  Conv2D.

Moving weights from PyTorch, whose ``Conv1d.weight`` is ``(C_out, C_in, kw)``
and ``Conv2d.weight`` is ``(C_out, C_in, kh, kw)`` (OIHW)::

    kernel_1d = w.permute(2, 1, 0)       # OIW  -> WIO
    kernel_2d = w.permute(2, 3, 1, 0)    # OIHW -> HWIO

(input images then go from NCHW to NHWC with ``x.transpose(0, 2, 3, 1)``).
Keras kernels are already in these layouts. Like both libraries, a
"convolution" here is a cross-correlation: the kernel is not flipped.

Grouped convolutions (``groups=g``, lax's ``feature_group_count``, Keras' and
PyTorch's ``groups``) split the ``C_in`` input channels and the ``filters``
output channels into ``g`` groups of consecutive channels and convolve group
``i`` of the input only into group ``i`` of the output; the kernel's input axis
then holds ``C_in // g`` channels: ``(*K, C_in // g, filters)``. PyTorch's grouped
weights, ``(C_out, C_in // g, *K)``, take the same permutations as above.

The helpers that turn ``int``-or-tuple arguments and padding specs into
tuples are shared with the pooling layers in :mod:`jaxnn.layers._pool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnn import initializers
from jaxnn._typing import DTypeLike
from jaxnn.errors import check_axis_size, check_floating, check_rank, where
from jaxnn.layers._base import Layer, param_dtype
from jaxnn.layers._conv_grad import conv_valid

PaddingLike = str | int | Sequence[tuple[int, int]]
"""``"VALID"``, ``"SAME"`` (any case), an int ``p`` (``p`` zeros on both sides of
every spatial axis) or one ``(low, high)`` pair per spatial axis."""

Pads = tuple[tuple[int, int], ...]

# Letters naming the spatial axes in lax's dimension-number strings.
_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}
_SPATIAL_NAMES = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def layout(ndim: int) -> str:
    """The axes of a channels-last input with ``ndim`` spatial axes, for messages."""
    return "(batch, " + ", ".join(_SPATIAL_NAMES[ndim]) + ", channels)"


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def as_tuple(value: Any, ndim: int, kind: str, arg: str) -> tuple[int, ...]:
    """``value`` (a positive int, or ``ndim`` positive ints) as a tuple of ``ndim`` ints."""
    if _is_int(value):
        values: tuple = (int(value),) * ndim
    elif isinstance(value, Sequence) and not isinstance(value, str) and all(
        _is_int(v) for v in value
    ):
        values = tuple(int(v) for v in value)
    else:
        values = ()
    if len(values) != ndim or any(v <= 0 for v in values):
        want = "a positive int"
        if ndim > 1:
            want += f" or a tuple of {ndim} positive ints"
        raise ValueError(f"{kind}: {arg} must be {want}, got {value!r}")
    return values


def as_padding(padding: PaddingLike, ndim: int, kind: str) -> str | Pads:
    """Normalise a padding argument: ``"VALID"``, ``"SAME"`` or ``ndim`` (low, high) pairs."""
    if isinstance(padding, str):
        if padding.upper() in ("VALID", "SAME"):
            return padding.upper()
    elif _is_int(padding):
        if padding >= 0:
            return ((int(padding), int(padding)),) * ndim
    elif isinstance(padding, Sequence) and len(padding) == ndim:
        pairs = []
        for pair in padding:
            if not (isinstance(pair, Sequence) and len(pair) == 2
                    and all(_is_int(p) and p >= 0 for p in pair)):
                break
            pairs.append((int(pair[0]), int(pair[1])))
        else:
            return tuple(pairs)
    raise ValueError(
        f"{kind}: padding must be 'VALID' or 'SAME' (any case), a non-negative int, or "
        f"{ndim} (low, high) pair{'s' if ndim > 1 else ''} of non-negative ints, "
        f"got {padding!r}"
    )


def resolve_padding(padding: str | Pads, spatial: Sequence[int], extent: Sequence[int],
                    strides: Sequence[int]) -> Pads:
    """The explicit ``(low, high)`` zero padding of each spatial axis.

    ``extent`` is the span of the window on each axis (for a kernel of size
    ``k`` with dilation ``d``: ``(k - 1) * d + 1``). ``"SAME"`` follows
    TensorFlow/Keras: the output has ``ceil(size / stride)`` positions and the
    total padding ``max((out - 1) * stride + extent - size, 0)`` is split with
    the extra element, if any, on the high side.
    """
    if padding == "VALID":
        return ((0, 0),) * len(spatial)
    if padding == "SAME":
        pads = []
        for size, k, s in zip(spatial, extent, strides):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple(padding)


def check_window_fits(x: Any, kind: str, pads: Pads, extent: Sequence[int],
                      window_desc: str) -> None:
    """Raise ``ValueError`` if a padded spatial axis of ``x`` is shorter than the window.

    XLA would otherwise fail (or produce an empty output) with a message that
    does not name the layer.
    """
    shape = tuple(np.shape(x))
    ndim = len(extent)
    for axis, (size, (lo, hi), k) in enumerate(zip(shape[1:-1], pads, extent)):
        if size + lo + hi < k:
            name = _SPATIAL_NAMES[ndim][axis]
            padded = f"{size} + padding {lo} + {hi} = {size + lo + hi}" if lo or hi else str(size)
            raise ValueError(
                f"{where(kind)}: input of shape {shape} is too small for the {window_desc}: "
                f"its {name} is {padded}, but the window spans {k}; use padding='SAME', "
                "a smaller window, or a larger input"
            )


def _describe(value: tuple[int, ...]) -> Any:
    return value[0] if len(value) == 1 else value


def _conv(
    kind: str,
    ndim: int,
    filters: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int],
    padding: PaddingLike,
    dilation: int | Sequence[int],
    use_bias: bool,
    kernel_init: initializers.Initializer | None,
    bias_init: initializers.Initializer | None,
    dtype: DTypeLike | None,
    name: str | None,
    groups: int = 1,
) -> Layer:
    if not _is_int(filters) or filters <= 0:
        raise ValueError(f"{kind}: filters must be a positive integer, got {filters!r}")
    if not _is_int(groups) or groups <= 0:
        raise ValueError(f"{kind}: groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    if filters % groups:
        raise ValueError(f"{kind}: filters ({filters}) must be a multiple of groups ({groups})")
    kernel_size = as_tuple(kernel_size, ndim, kind, "kernel_size")
    strides = as_tuple(strides, ndim, kind, "strides")
    dilation = as_tuple(dilation, ndim, kind, "dilation")
    pad_spec = as_padding(padding, ndim, kind)
    kernel_init = kernel_init or initializers.glorot_uniform()
    bias_init = bias_init or initializers.zeros()

    letters = _SPATIAL_LETTERS[ndim]
    dimension_numbers = (f"N{letters}C", f"{letters}IO", f"N{letters}C")
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    window_desc = f"kernel (kernel_size {_describe(kernel_size)}"
    window_desc += f", dilation {_describe(dilation)})" if any(d > 1 for d in dilation) else ")"
    input_layout = layout(ndim)
    unit_steps = all(v == 1 for v in (*strides, *dilation))

    def check_input(x) -> Pads:
        check_rank(x, kind, min_rank=ndim + 2, max_rank=ndim + 2, layout=input_layout)
        check_floating(x, kind)
        if x.shape[-1] % groups:
            raise ValueError(
                f"{where(kind)}: the input's {x.shape[-1]} channels (shape {tuple(x.shape)}) "
                f"are not divisible by groups={groups}"
            )
        pads = resolve_padding(pad_spec, x.shape[1:-1], extent, strides)
        check_window_fits(x, kind, pads, extent, window_desc)
        return pads

    def initialize(key, x: jax.ShapeDtypeStruct):
        check_input(x)
        dt = param_dtype(x, dtype)
        kernel_key, bias_key = jax.random.split(key)
        kernel_shape = (*kernel_size, x.shape[-1] // groups, filters)
        params = {"kernel": kernel_init(kernel_key, kernel_shape, dt)}
        if use_bias:
            params["bias"] = bias_init(bias_key, (filters,), dt)
        return params, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        kernel = params["kernel"]
        pads = check_input(x)
        check_axis_size(x, kind, axis=-1, expected=kernel.shape[-2] * groups,
                        what="last dimension (channels)")
        # lax requires equal dtypes; promote like jnp.matmul would.
        dt = jnp.result_type(x, kernel)
        x, kernel = x.astype(dt), kernel.astype(dt)
        if groups > 1:
            y = lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                         rhs_dilation=dilation,
                                         dimension_numbers=dimension_numbers,
                                         feature_group_count=groups)
        elif unit_steps:
            # Stride 1: explicit zero padding, then the VALID convolution whose kernel
            # gradient runs as matrix products on CPU (see _conv_grad).
            if any(p for pair in pads for p in pair):
                x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
            y = conv_valid(x, kernel)
        else:
            y = lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
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
    if any(d != 1 for d in dilation):
        extras.append(f"dilation={_describe(dilation)}")
    if groups != 1:
        extras.append(f"groups={groups}")
    if not use_bias:
        extras.append("use_bias=False")
    return Layer(name or kind.lower(), initialize, forward, spec=f"{kind}({', '.join(extras)})",
                 explicit_name=name is not None)


def Conv1D(
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: PaddingLike = "VALID",
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    kernel_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """A 1-D convolution over channels-last sequences.

    Shapes: ``x`` is ``(N, W, C_in)``, ``y`` is ``(N, W_out, filters)``. The
    batch axis is required (an unbatched ``(W, C)`` array is rejected rather
    than guessed at; use ``x[None]`` or :func:`jax.vmap`).

    With ``k = kernel_size``, ``s = strides``, ``d = dilation`` and ``x_pad``
    the input zero-padded along ``W``::

        y[n, i, o] = bias[o] + sum_{t < k, c < C_in} x_pad[n, i*s + t*d, c] * kernel[t, c, o]

    With ``groups = g``, output channel ``o`` sees only the ``C_in // g`` input
    channels of its group ``G = o // (filters // g)``::

        y[n, i, o] = bias[o] + sum_{t < k, c < C_in // g}
                     x_pad[n, i*s + t*d, G * (C_in // g) + c] * kernel[t, c, o]

    ``W_out = floor((W + pad_lo + pad_hi - (k - 1) * d - 1) / s) + 1``; with
    ``padding="SAME"`` (TensorFlow's rule) ``W_out = ceil(W / s)``.

    Args:
      filters: the number of output channels.
      kernel_size: the window width ``k``.
      strides: the step ``s`` between output positions.
      padding: ``"VALID"`` (none), ``"SAME"`` (any case), an int ``p`` (``p``
        zeros on both sides, as PyTorch's ``padding=p``) or ``((lo, hi),)``.
      dilation: the spacing ``d`` between kernel taps.
      groups: the number of channel groups ``g`` (default 1); ``C_in`` and
        ``filters`` must be multiples of it. ``groups == C_in`` is a depthwise
        convolution (``filters = m * C_in``: ``m`` filters per input channel).
      use_bias: whether to add a bias.
      kernel_init, bias_init: initializers (default Glorot uniform, zeros).
      dtype: the parameter dtype (default: the input's floating dtype).
      name: an explicit layer name (default stem ``"conv1d"``).

    Parameters: ``kernel`` ``(k, C_in // groups, filters)`` (WIO; from PyTorch's
    ``Conv1d.weight``, ``(C_out, C_in // groups, k)``: ``w.permute(2, 1, 0)``) and
    ``bias`` ``(filters,)``.
    """
    return _conv("Conv1D", 1, filters, kernel_size, strides, padding, dilation, use_bias,
                 kernel_init, bias_init, dtype, name, groups)


def Conv2D(
    filters: int,
    kernel_size: int | tuple[int, int],
    *,
    strides: int | tuple[int, int] = 1,
    padding: PaddingLike = "VALID",
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    use_bias: bool = True,
    kernel_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """A 2-D convolution over channels-last images (NHWC).

    Shapes: ``x`` is ``(N, H, W, C_in)``, ``y`` is ``(N, H_out, W_out, filters)``.
    The batch axis is required: a ``(H, W, C)`` image is rejected (it could not
    be told apart from a batch of single-channel images ``(N, H, W)``); use
    ``x[None]`` or :func:`jax.vmap`.

    With kernel size ``(kh, kw)``, strides ``(sh, sw)``, dilation ``(dh, dw)``
    and ``x_pad`` the zero-padded input::

        y[n, i, j, o] = bias[o] + sum_{p < kh, q < kw, c < C_in}
                        x_pad[n, i*sh + p*dh, j*sw + q*dw, c] * kernel[p, q, c, o]

    With ``groups = g``, output channel ``o`` sees only the ``C_in // g`` input
    channels of its group ``G = o // (filters // g)``::

        y[n, i, j, o] = bias[o] + sum_{p < kh, q < kw, c < C_in // g}
            x_pad[n, i*sh + p*dh, j*sw + q*dw, G * (C_in // g) + c] * kernel[p, q, c, o]

    On each spatial axis ``out = floor((size + pad_lo + pad_hi - (k - 1) * d - 1) / s) + 1``;
    with ``padding="SAME"`` (TensorFlow/Keras's rule) ``out = ceil(size / s)``,
    the padding split evenly with any odd element on the high side.

    Args:
      filters: the number of output channels.
      kernel_size: ``kh`` and ``kw``, an int for both or a pair.
      strides: ``(sh, sw)``, an int or a pair.
      padding: ``"VALID"`` (none), ``"SAME"`` (any case), an int ``p`` (``p``
        zeros on every side, as PyTorch's ``padding=p``) or explicit
        ``((top, bottom), (left, right))``.
      dilation: ``(dh, dw)``, the spacing between kernel taps.
      groups: the number of channel groups ``g`` (default 1); ``C_in`` and
        ``filters`` must be multiples of it. ``groups == C_in`` is a depthwise
        convolution (``filters = m * C_in``: ``m`` filters per input channel,
        Keras' ``DepthwiseConv2D`` with ``depth_multiplier=m``, whose kernel
        ``(kh, kw, C_in, m)`` reshapes to ``(kh, kw, 1, C_in * m)``).
      use_bias: whether to add a bias.
      kernel_init, bias_init: initializers (default Glorot uniform, zeros).
      dtype: the parameter dtype (default: the input's floating dtype).
      name: an explicit layer name (default stem ``"conv2d"``).

    Parameters: ``kernel`` ``(kh, kw, C_in // groups, filters)`` (HWIO, as in
    Keras; from PyTorch's ``Conv2d.weight``, OIHW ``(C_out, C_in // groups, kh, kw)``:
    ``w.permute(2, 3, 1, 0)``) and ``bias`` ``(filters,)``.

    ``groups=1`` takes the stride-1 fast path of :mod:`jaxnn.layers._conv_grad`
    when strides and dilation are 1; ``groups > 1`` runs XLA's grouped convolution
    (``feature_group_count``) and its derivatives.
    """
    return _conv("Conv2D", 2, filters, kernel_size, strides, padding, dilation, use_bias,
                 kernel_init, bias_init, dtype, name, groups)


__all__ = ["Conv1D", "Conv2D"]
