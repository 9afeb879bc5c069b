"""Pooling layers over channels-last inputs: max, average and global average/max.

The number of spatial axes is fixed by the layer, never guessed from the
input: ``MaxPool``/``AvgPool`` pool images ``(N, H, W, C)`` and
``MaxPool1D``/``AvgPool1D`` pool sequences ``(N, W, C)``. (Inferring it from
the input's rank would silently treat a batch of single-channel images
``(N, H, W)`` as sequences with ``W`` channels.) The global pools reduce
every axis between the batch and the channels, so they take either.

Padding follows the convolution layers (:mod:`jaxnn.layers._conv`):
``"VALID"``, ``"SAME"`` (TensorFlow's rule: ``ceil(size / stride)`` outputs),
an int, or explicit ``(low, high)`` pairs. Padded positions never win a max
and are not counted in an average (Keras's behaviour; PyTorch's ``AvgPool2d``
counts them unless ``count_include_pad=False``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnn.errors import check_floating, check_rank, where
from jaxnn.layers._base import Layer
from jaxnn.layers._conv import (
    PaddingLike,
    Pads,
    as_padding,
    as_tuple,
    check_window_fits,
    layout,
    resolve_padding,
)


def _crop_to_windows(x, window):
    """``x`` without the trailing rows that fill no window, and its windowed shape
    ``(N, o_1, k_1, o_2, k_2, ..., C)``."""
    out = tuple(size // k for size, k in zip(x.shape[1:-1], window))
    x = x[(slice(None), *(slice(0, o * k) for o, k in zip(out, window)), slice(None))]
    split = [x.shape[0]]
    for o, k in zip(out, window):
        split += [o, k]
    return x, (*split, x.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max(x, window):
    """Max over non-overlapping windows: ``(N, *S, C) -> (N, *S//w, C)``.

    The same values as ``reduce_window`` with stride = window and VALID padding
    (trailing rows that fill no window are dropped), which computes them. The
    derivative is written over the windows laid out by a reshape: each window
    passes on the tangent of its maximum, the mean of the tangents of tied maxima,
    so in reverse mode a window's gradient goes to its maximum, shared equally
    between ties (``reduce_window``'s own gradient gives all of it to one, and its
    select-and-scatter runs several times slower on XLA:CPU).
    """
    dims = (1, *window, 1)
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, dims, dims, "VALID")


@_tiled_max.defjvp
def _tiled_max_jvp(window, primals, tangents):
    (x,), (tx,) = primals, tangents
    y = _tiled_max(x, window)
    cropped, windowed = _crop_to_windows(x, window)
    spread = [y.shape[0]]  # y laid out to broadcast over the window axes 2, 4, ...
    for o in y.shape[1:-1]:
        spread += [o, 1]
    spread.append(y.shape[-1])
    is_max = cropped.reshape(windowed) == y.reshape(spread)
    # Counted from the boolean mask: XLA:CPU then keeps the mask as one byte per
    # element for the backward pass instead of a float copy of x (MNIST CNN, first
    # pooling at batch 128: 1.1 ms against 2.7-3.3 ms to write it, 0.9 against
    # 1.3-1.9 ms to read it back).
    ties = _window_sum(is_max, window, x.dtype)
    tangent, _ = _crop_to_windows(tx, window)
    picked = jnp.where(is_max, tangent.reshape(windowed), jnp.zeros((), tx.dtype))
    return y, _window_sum(picked, window) / ties


def _window_sum(a, window, dtype=None):
    """Sum over the window axes 2, 4, ... of the windowed layout ``(N, o_1, k_1, ..., C)``,
    in ``dtype`` (default: ``a``'s), each element converted before it is added.

    Written as a sum of the windows' positions (one strided view each) for small
    windows: XLA:CPU fuses that into one loop, where its reduction over the
    non-minor window axes ran several times slower (1.65 ms against 0.3 ms for the
    MNIST CNN's first pooling at batch 128).
    """
    window_axes = tuple(2 + 2 * i for i in range(len(window)))
    dtype = a.dtype if dtype is None else dtype
    if math.prod(window) > 16:
        return jnp.sum(a, axis=window_axes, dtype=dtype)
    total = None
    for position in itertools.product(*(range(k) for k in window)):
        index = [slice(None)] * a.ndim
        for axis, p in zip(window_axes, position):
            index[axis] = p
        part = a[tuple(index)].astype(dtype)
        total = part if total is None else total + part
    return total


def _pool(
    kind: str,
    stem: str,
    ndim: int,
    reduction: str,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: PaddingLike,
    name: str | None,
) -> Layer:
    window = as_tuple(window, ndim, kind, "window")
    strides = window if strides is None else as_tuple(strides, ndim, kind, "strides")
    pad_spec = as_padding(padding, ndim, kind)
    if not isinstance(pad_spec, str):
        # Keeps every window over at least one real element (no empty max or average).
        for (lo, hi), k in zip(pad_spec, window):
            if lo >= k or hi >= k:
                raise ValueError(
                    f"{kind}: explicit padding must be smaller than the window on each side, "
                    f"got padding {padding!r} for window {window}"
                )
    dims = (1, *window, 1)
    steps = (1, *strides, 1)
    tiled = tuple(strides) == tuple(window)  # windows that neither overlap nor skip
    window_desc = f"pooling window {window[0] if ndim == 1 else window}"
    input_layout = layout(ndim)

    def check_input(x) -> Pads:
        check_rank(x, kind, min_rank=ndim + 2, max_rank=ndim + 2, layout=input_layout)
        check_floating(x, kind)
        pads = resolve_padding(pad_spec, x.shape[1:-1], window, strides)
        check_window_fits(x, kind, pads, window, window_desc)
        return pads

    def initialize(key, x):
        del key
        check_input(x)
        return {}, {}

    def forward(params, state, x, *, key=None, train=False):
        del params, key, train
        pads = ((0, 0), *check_input(x), (0, 0))
        # The initial values must be concrete (numpy) constants: lax then uses its
        # differentiable max/sum window reductions.
        if reduction == "max":
            if tiled and all(p == (0, 0) for p in pads):
                return _tiled_max(x, window), state
            y = lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, dims, steps, pads)
            return y, state
        zero = np.array(0, x.dtype)
        total = lax.reduce_window(x, zero, lax.add, dims, steps, pads)
        if all(p == (0, 0) for p in pads):
            return total / math.prod(window), state
        ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
        counts = lax.reduce_window(ones, zero, lax.add, dims, steps, pads)
        return total / counts, state

    args = [f"{window[0] if ndim == 1 else window}"]
    if strides != window:
        args.append(f"strides={strides[0] if ndim == 1 else strides}")
    if pad_spec != "VALID":
        args.append(f"padding={pad_spec!r}")
    return Layer(name or stem, initialize, forward, spec=f"{kind}({', '.join(args)})",
                 explicit_name=name is not None)


def MaxPool(
    window: int | tuple[int, int],
    *,
    strides: int | tuple[int, int] | None = None,
    padding: PaddingLike = "VALID",
    name: str | None = None,
) -> Layer:
    """2-D max pooling over images: ``(N, H, W, C) -> (N, H_out, W_out, C)``.

    ``y[n, i, j, c] = max_{p < wh, q < ww} x_pad[n, i*sh + p, j*sw + q, c]``,
    where padded positions are ``-inf`` (they never win).

    On each axis ``out = floor((size + pad_lo + pad_hi - window) / stride) + 1``,
    or ``ceil(size / stride)`` with ``padding="SAME"``.

    Gradient: it flows to the maximum of each window. With non-overlapping,
    unpadded windows (the default) it is computed by a reshape, which is much
    faster on CPU, and tied maxima share a window's gradient equally.

    Args:
      window: ``(wh, ww)``, an int for both or a pair.
      strides: ``(sh, sw)``; default: the window (non-overlapping windows).
      padding: ``"VALID"``, ``"SAME"`` (any case), an int or
        ``((top, bottom), (left, right))``; explicit padding must be smaller
        than the window.
      name: an explicit layer name (default stem ``"max_pool"``).
    """
    return _pool("MaxPool", "max_pool", 2, "max", window, strides, padding, name)


def AvgPool(
    window: int | tuple[int, int],
    *,
    strides: int | tuple[int, int] | None = None,
    padding: PaddingLike = "VALID",
    name: str | None = None,
) -> Layer:
    """2-D average pooling over images: ``(N, H, W, C) -> (N, H_out, W_out, C)``.

    ``y[n, i, j, c]`` is the mean of ``x[n, i*sh - top + p, j*sw - left + q, c]``
    over the window taps ``p < wh, q < ww`` that fall inside the input: padded
    positions are not counted (as in Keras and TensorFlow; PyTorch's
    ``AvgPool2d`` default, ``count_include_pad=True``, differs at the borders).

    Output sizes, arguments and padding as for :func:`MaxPool` (default stem
    ``"avg_pool"``).
    """
    return _pool("AvgPool", "avg_pool", 2, "avg", window, strides, padding, name)


def MaxPool1D(
    window: int,
    *,
    strides: int | None = None,
    padding: PaddingLike = "VALID",
    name: str | None = None,
) -> Layer:
    """1-D max pooling over sequences: ``(N, W, C) -> (N, W_out, C)``.

    ``y[n, i, c] = max_{t < window} x_pad[n, i*stride + t, c]`` (padding is
    ``-inf``). Arguments as for :func:`MaxPool`, with ints (default stem
    ``"max_pool1d"``).
    """
    return _pool("MaxPool1D", "max_pool1d", 1, "max", window, strides, padding, name)


def AvgPool1D(
    window: int,
    *,
    strides: int | None = None,
    padding: PaddingLike = "VALID",
    name: str | None = None,
) -> Layer:
    """1-D average pooling over sequences: ``(N, W, C) -> (N, W_out, C)``.

    The mean over the window taps that fall inside the input (padding is not
    counted). Arguments as for :func:`MaxPool`, with ints (default stem
    ``"avg_pool1d"``).
    """
    return _pool("AvgPool1D", "avg_pool1d", 1, "avg", window, strides, padding, name)


def _global(kind: str, stem: str, reduce, name: str | None) -> Layer:
    def check_input(x) -> None:
        check_rank(x, kind, min_rank=3, layout="(batch, *spatial, channels)")
        check_floating(x, kind)
        if 0 in tuple(x.shape[1:-1]):
            raise ValueError(f"{where(kind)}: input of shape {tuple(x.shape)} has an empty "
                             "spatial axis")

    def initialize(key, x):
        del key
        check_input(x)
        return {}, {}

    def forward(params, state, x, *, key=None, train=False):
        del params, key, train
        check_input(x)
        return reduce(x, axis=tuple(range(1, x.ndim - 1))), state

    return Layer(name or stem, initialize, forward, spec=f"{kind}()",
                 explicit_name=name is not None)


def GlobalAvgPool(*, name: str | None = None) -> Layer:
    """Mean over all spatial axes: ``(N, *spatial, C) -> (N, C)``.

    ``y[n, c] = mean over positions of x[n, ..., c]``; takes ``(N, W, C)``,
    ``(N, H, W, C)`` and higher ranks alike (default stem ``"global_avg_pool"``).
    """
    return _global("GlobalAvgPool", "global_avg_pool", jnp.mean, name)


def GlobalMaxPool(*, name: str | None = None) -> Layer:
    """Maximum over all spatial axes: ``(N, *spatial, C) -> (N, C)``.

    ``y[n, c] = max over positions of x[n, ..., c]`` (default stem
    ``"global_max_pool"``).
    """
    return _global("GlobalMaxPool", "global_max_pool", jnp.max, name)


__all__ = ["AvgPool", "AvgPool1D", "GlobalAvgPool", "GlobalMaxPool", "MaxPool", "MaxPool1D"]
