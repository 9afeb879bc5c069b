"""Normalisation layers: BatchNorm (with running statistics), LayerNorm, RMSNorm and
GroupNorm."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxnn._typing import DTypeLike
from jaxnn.errors import check_floating, check_rank, current_path
from jaxnn.layers._base import Layer, param_dtype

Axes = int | Sequence[int]


def _who(kind: str, name: str | None) -> str:
    """``"BatchNorm layer 'block_0/batchnorm_1'"``: the path inside a container, else the
    user's explicit ``name``, else just ``"BatchNorm layer"``."""
    path = current_path() or name
    return f"{kind} layer '{path}'" if path else f"{kind} layer"


def _as_axes(axis: Axes, kind: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or not all(isinstance(a, int) for a in axes):
        raise ValueError(f"{kind}: axis must be an int or a non-empty tuple of ints, got {axis!r}")
    return axes


def _resolve_axes(axes: tuple[int, ...], x, kind: str, name: str | None) -> tuple[int, ...]:
    """Turn possibly negative ``axes`` into sorted non-negative axes of ``x``."""
    ndim = len(x.shape)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(
            f"{_who(kind, name)}: axis {axes if len(axes) > 1 else axes[0]} is out of range "
            f"for an input of shape {tuple(x.shape)} (rank {ndim})"
        )
    resolved = tuple(sorted(a % ndim for a in axes))
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"{_who(kind, name)}: axis {axes} names the same axis twice")
    return resolved


def _check_feature_shape(x, axes: tuple[int, ...], expected: tuple[int, ...], kind: str,
                         name: str | None) -> None:
    got = tuple(x.shape[a] for a in axes)
    if got != expected:
        raise ValueError(
            f"{_who(kind, name)}: expected input with size {expected} along axes {axes} "
            f"(the shape the layer was initialised with), got shape {tuple(x.shape)}"
        )


def _broadcast(v, x_ndim: int, axes: tuple[int, ...]):
    """Reshape a vector laid out along ``axes`` so it broadcasts against ``x``."""
    shape = [1] * x_ndim
    for a, size in zip(axes, v.shape):
        shape[a] = size
    return v.reshape(shape)


def _compute_dtype(x):
    # Statistics of float16/bfloat16 inputs are computed in float32.
    return jnp.promote_types(x.dtype, jnp.float32)


def _normalise(x, mean, var, scale, offset, epsilon: float, axes: tuple[int, ...]):
    """``scale * (x - mean) / sqrt(var + epsilon) + offset``, with ``mean``/``var``
    already broadcastable to ``x`` and ``scale``/``offset`` laid out along ``axes``."""
    y = (x - mean) * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * _broadcast(scale, x.ndim, axes)
    if offset is not None:
        y = y + _broadcast(offset, x.ndim, axes)
    return y


def BatchNorm(
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    axis: Axes = -1,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Batch normalisation with running statistics (Keras conventions).

    Shapes: ``x`` is any array with a feature axis ``axis`` (default the last,
    i.e. NHWC images or ``(batch, features)``); ``y`` has the shape of ``x``.
    With ``C = x.shape[axis]`` (the product layout of the sizes when ``axis``
    is a tuple):

    * train=True: ``mean`` and ``var`` are the batch mean and the *biased*
      batch variance (divide by n) over every axis except ``axis``, and
      ``y = scale * (x - mean) / sqrt(var + epsilon) + offset``.
      The returned state holds the updated running statistics::

          running_mean = momentum * running_mean + (1 - momentum) * mean
          running_var  = momentum * running_var  + (1 - momentum) * var

    * train=False: the same formula with ``running_mean`` and ``running_var``;
      the state is returned unchanged.

    Parameters: ``scale`` (C,) initialised to ones (absent when
    ``use_scale=False``), ``offset`` (C,) initialised to zeros (absent when
    ``use_bias=False``). State: ``mean`` (C,) zeros and ``var`` (C,) ones.

    The layer has state, so initialise and run it (and any model containing it)
    with ``init_with_state`` / ``apply_with_state``; under ``Sequential`` the new
    state is nested under the layer's name, e.g. ``new_state["batchnorm_0"]``.

    Weight transfer: Keras' ``gamma, beta, moving_mean, moving_variance`` map to
    ``scale, offset, mean, var`` one to one. PyTorch's ``momentum`` is our
    ``1 - momentum`` (PyTorch's default 0.1 is our 0.9), its default ``eps`` is
    1e-5, and its ``running_var`` is updated with the *unbiased* batch variance
    (divide by n - 1), so running variances trained there are larger by a
    factor n / (n - 1) for a batch of n values per channel; ``weight, bias``
    map to ``scale, offset``.

    Args:
      momentum: weight of the old running statistics, in [0, 1].
      epsilon: added to the variance before the square root; must be > 0.
      axis: the feature axis (or axes) kept; statistics are reduced over all others.
      use_scale, use_bias: whether to learn ``scale`` / ``offset``.
      dtype: dtype of parameters and state. By default parameters take the
        input's float dtype and the state that dtype or float32, whichever is
        wider. Statistics of float16/bfloat16 inputs are computed in float32.
      name: the layer's name inside a container.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
    if not epsilon > 0:
        raise ValueError(f"BatchNorm: epsilon must be > 0, got {epsilon!r}")
    axes = _as_axes(axis, "BatchNorm")

    def initialize(key, x: jax.ShapeDtypeStruct):
        del key
        check_rank(x, "BatchNorm", min_rank=1)
        check_floating(x, "BatchNorm")
        feature_axes = _resolve_axes(axes, x, "BatchNorm", name)
        shape = tuple(x.shape[a] for a in feature_axes)
        dt = param_dtype(x, dtype)
        params = {}
        if use_scale:
            params["scale"] = jnp.ones(shape, dt)
        if use_bias:
            params["offset"] = jnp.zeros(shape, dt)
        # Running averages of half-precision inputs are kept in float32: a 1% update
        # is below bfloat16's resolution.
        state_dt = dt if dtype is not None else jnp.promote_types(dt, jnp.float32)
        state = {"mean": jnp.zeros(shape, state_dt), "var": jnp.ones(shape, state_dt)}
        return params, state

    def forward(params, state, x, *, key=None, train=False):
        del key
        if "mean" not in state or "var" not in state:
            raise ValueError(
                f"{_who('BatchNorm', name)} has no running statistics in its state "
                f"(got state keys {sorted(state)}): BatchNorm keeps state, so use "
                "init_with_state(key, x) -> (params, state) and "
                "apply_with_state(params, state, x, train=...) -> (y, new_state) "
                "instead of init/apply"
            )
        check_floating(x, "BatchNorm")
        feature_axes = _resolve_axes(axes, x, "BatchNorm", name)
        _check_feature_shape(x, feature_axes, tuple(state["mean"].shape), "BatchNorm", name)
        reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
        xc = x.astype(_compute_dtype(x))
        if train:
            if not reduce_axes:
                raise ValueError(
                    f"{_who('BatchNorm', name)}: in training mode the input needs an axis "
                    f"besides the feature axis {axis!r} to average over, got shape "
                    f"{tuple(x.shape)}"
                )
            mean = jnp.mean(xc, axis=reduce_axes, keepdims=True)
            var = jnp.var(xc, axis=reduce_axes, keepdims=True)
            feature_shape = tuple(state["mean"].shape)
            new_state = {
                "mean": (momentum * state["mean"]
                         + (1 - momentum) * mean.reshape(feature_shape)
                         ).astype(state["mean"].dtype),
                "var": (momentum * state["var"]
                        + (1 - momentum) * var.reshape(feature_shape)
                        ).astype(state["var"].dtype),
            }
        else:
            mean = _broadcast(state["mean"].astype(xc.dtype), x.ndim, feature_axes)
            var = _broadcast(state["var"].astype(xc.dtype), x.ndim, feature_axes)
            new_state = state
        y = _normalise(xc, mean, var, params.get("scale"), params.get("offset"), epsilon,
                       feature_axes)
        return y.astype(x.dtype), new_state

    spec_args = [] if momentum == 0.99 else [f"momentum={momentum}"]
    if axis != -1:
        spec_args.append(f"axis={axis}")
    spec = f"BatchNorm({', '.join(spec_args)})"
    return Layer(name or "batchnorm", initialize, forward, spec=spec,
                 explicit_name=name is not None)


def LayerNorm(
    *,
    epsilon: float = 1e-5,
    axis: Axes = -1,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Layer normalisation: normalise each example over its feature axes.

    Shapes: ``x`` is any array; ``y`` has the shape of ``x``. ``mean`` and the
    biased variance ``var`` are taken over the axes ``axis`` (default the last)
    separately for every position along the other axes, and::

        y = scale * (x - mean) / sqrt(var + epsilon) + offset

    Parameters, of the normalised shape ``S = tuple(x.shape[a] for a in axis)``
    (axes in increasing order): ``scale`` (S) initialised to ones (absent when
    ``use_scale=False``), ``offset`` (S) zeros (absent when ``use_bias=False``).
    With trailing axes this is PyTorch's ``normalized_shape`` layout
    (``weight, bias`` = ``scale, offset``). No state; train mode makes no
    difference.

    Args:
      epsilon: added to the variance; default 1e-5 as in PyTorch (Keras uses
        1e-3, Flax 1e-6); must be > 0.
      axis: the axis or tuple of axes to normalise over. Negative axes count
        from the end, so the layer also works on unbatched inputs under ``vmap``.
      use_scale, use_bias: whether to learn ``scale`` / ``offset``.
      dtype: dtype of the parameters (default: the input's float dtype).
        Statistics of float16/bfloat16 inputs are computed in float32.
      name: the layer's name inside a container.
    """
    if not epsilon > 0:
        raise ValueError(f"LayerNorm: epsilon must be > 0, got {epsilon!r}")
    axes = _as_axes(axis, "LayerNorm")

    def initialize(key, x: jax.ShapeDtypeStruct):
        del key
        check_rank(x, "LayerNorm", min_rank=1)
        check_floating(x, "LayerNorm")
        feature_axes = _resolve_axes(axes, x, "LayerNorm", name)
        shape = tuple(x.shape[a] for a in feature_axes)
        dt = param_dtype(x, dtype)
        params = {}
        if use_scale:
            params["scale"] = jnp.ones(shape, dt)
        if use_bias:
            params["offset"] = jnp.zeros(shape, dt)
        return params, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        check_floating(x, "LayerNorm")
        feature_axes = _resolve_axes(axes, x, "LayerNorm", name)
        known = params.get("scale", params.get("offset"))
        if known is not None:
            _check_feature_shape(x, feature_axes, tuple(known.shape), "LayerNorm", name)
        xc = x.astype(_compute_dtype(x))
        mean = jnp.mean(xc, axis=feature_axes, keepdims=True)
        var = jnp.var(xc, axis=feature_axes, keepdims=True)
        y = _normalise(xc, mean, var, params.get("scale"), params.get("offset"), epsilon,
                       feature_axes)
        return y.astype(x.dtype), state

    spec_args = [] if axis == -1 else [f"axis={axis}"]
    spec = f"LayerNorm({', '.join(spec_args)})"
    return Layer(name or "layernorm", initialize, forward, spec=spec,
                 explicit_name=name is not None)


def RMSNorm(
    *,
    epsilon: float = 1e-6,
    axis: Axes = -1,
    use_scale: bool = True,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Root-mean-square normalisation: LayerNorm without centring and without offset.

    Shapes: ``x`` is any array; ``y`` has the shape of ``x``. For every position
    along the axes not in ``axis`` (default: every position but the last axis)::

        y = x / sqrt(mean(x**2 over axis) + epsilon) * scale

    Parameters: ``scale`` of the normalised shape
    ``S = tuple(x.shape[a] for a in axis)`` (axes in increasing order),
    initialised to ones; absent when ``use_scale=False``. No state.

    Weight transfer from PyTorch's ``nn.RMSNorm(normalized_shape, eps,
    elementwise_affine=True)`` (normalising the trailing axes, as ``axis=-1``
    or ``axis=(-2, -1)`` here): ``scale = weight``. PyTorch's default
    ``eps=None`` means ``torch.finfo(x.dtype).eps`` (about 1.2e-7 for
    float32, 2.2e-16 for float64, 7.8e-3 for bfloat16); pass that value as
    ``epsilon`` to reproduce it exactly. Our default 1e-6 is T5's and Llama's.

    Args:
      epsilon: added to the mean square before the square root; must be > 0.
      axis: the axis or tuple of axes to normalise over (negative axes count
        from the end).
      use_scale: whether to learn ``scale``.
      dtype: dtype of the parameters (default: the input's float dtype).
        Statistics of float16/bfloat16 inputs are computed in float32.
      name: the layer's name inside a container.
    """
    if not epsilon > 0:
        raise ValueError(f"RMSNorm: epsilon must be > 0, got {epsilon!r}")
    axes = _as_axes(axis, "RMSNorm")

    def initialize(key, x: jax.ShapeDtypeStruct):
        del key
        check_rank(x, "RMSNorm", min_rank=1)
        check_floating(x, "RMSNorm")
        feature_axes = _resolve_axes(axes, x, "RMSNorm", name)
        shape = tuple(x.shape[a] for a in feature_axes)
        params = {"scale": jnp.ones(shape, param_dtype(x, dtype))} if use_scale else {}
        return params, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        check_floating(x, "RMSNorm")
        feature_axes = _resolve_axes(axes, x, "RMSNorm", name)
        scale = params.get("scale")
        if scale is not None:
            _check_feature_shape(x, feature_axes, tuple(scale.shape), "RMSNorm", name)
        xc = x.astype(_compute_dtype(x))
        mean_square = jnp.mean(jnp.square(xc), axis=feature_axes, keepdims=True)
        y = xc * jax.lax.rsqrt(mean_square + epsilon)
        if scale is not None:
            y = y * _broadcast(scale, x.ndim, feature_axes)
        return y.astype(x.dtype), state

    spec_args = [] if axis == -1 else [f"axis={axis}"]
    spec = f"RMSNorm({', '.join(spec_args)})"
    return Layer(name or "rmsnorm", initialize, forward, spec=spec,
                 explicit_name=name is not None)


def GroupNorm(
    groups: int,
    *,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """Group normalisation over channels-last inputs.

    Shapes: ``x`` is ``(batch, ..., C)`` (e.g. NHWC images, ``(batch, time,
    C)`` sequences or ``(batch, C)``), with ``C`` divisible by ``groups``;
    ``y`` has the shape of ``x``. The ``C`` channels are split into ``groups``
    consecutive groups of ``C // groups``. For each example and each group,
    ``mean`` and the biased variance ``var`` are taken over the group's
    channels at all positions of the axes between the first and the last, and::

        y = scale * (x - mean) / sqrt(var + epsilon) + offset

    with ``scale`` and ``offset`` per channel. ``groups=1`` normalises each
    example over all its values (with per-channel ``scale``); ``groups=C`` is
    instance normalisation. No state; train mode makes no difference.

    Parameters: ``scale`` (C,) initialised to ones (absent when
    ``use_scale=False``), ``offset`` (C,) zeros (absent when ``use_bias=False``).

    Weight transfer from PyTorch's ``nn.GroupNorm(num_groups, num_channels,
    eps)``: ``scale = weight``, ``offset = bias``, the same default ``eps``
    1e-5. PyTorch's inputs are channels-first ``(N, C, *)``: move the channel
    axis last, ``x = x_torch.movedim(1, -1)`` (NCHW -> NHWC:
    ``permute(0, 2, 3, 1)``), and move it back on the output,
    ``y.movedim(-1, 1)``. The groups are the same consecutive channel blocks.

    Args:
      groups: the number of groups, a positive integer dividing ``C``.
      epsilon: added to the variance; must be > 0.
      use_scale, use_bias: whether to learn ``scale`` / ``offset``.
      dtype: dtype of the parameters (default: the input's float dtype).
        Statistics of float16/bfloat16 inputs are computed in float32.
      name: the layer's name inside a container.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"GroupNorm: groups must be a positive integer, got {groups!r}")
    if not epsilon > 0:
        raise ValueError(f"GroupNorm: epsilon must be > 0, got {epsilon!r}")

    def check(x) -> int:
        check_rank(x, "GroupNorm", min_rank=2, layout="(batch, ..., channels)")
        check_floating(x, "GroupNorm")
        channels = x.shape[-1]
        if channels % groups:
            raise ValueError(
                f"{_who('GroupNorm', name)}: the number of channels C = {channels} (the last "
                f"axis of the input of shape {tuple(x.shape)}) is not divisible by "
                f"groups = {groups}"
            )
        return channels

    def initialize(key, x: jax.ShapeDtypeStruct):
        del key
        channels = check(x)
        dt = param_dtype(x, dtype)
        params = {}
        if use_scale:
            params["scale"] = jnp.ones((channels,), dt)
        if use_bias:
            params["offset"] = jnp.zeros((channels,), dt)
        return params, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        channels = check(x)
        known = params.get("scale", params.get("offset"))
        if known is not None:
            _check_feature_shape(x, (x.ndim - 1,), tuple(known.shape), "GroupNorm", name)
        xc = x.astype(_compute_dtype(x))
        # (N, ..., C) -> (N, ..., groups, C // groups); reduce over all but N and groups.
        grouped = xc.reshape(*x.shape[:-1], groups, channels // groups)
        reduce_axes = (*range(1, x.ndim - 1), x.ndim)
        mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
        var = jnp.var(grouped, axis=reduce_axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
        if "scale" in params:
            y = y * params["scale"]
        if "offset" in params:
            y = y + params["offset"]
        return y.astype(x.dtype), state

    return Layer(name or "groupnorm", initialize, forward, spec=f"GroupNorm({groups})",
                 explicit_name=name is not None)
