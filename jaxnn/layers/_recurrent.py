"""Recurrent layers: SimpleRNN, LSTM and GRU, run over a sequence with ``jax.lax.scan``.

Each comes in two forms:

* a cell, a pure function for one time step,
  ``simple_rnn_step / lstm_step / gru_step(params, carry, x_t) -> (carry, h_t)``,
  with ``x_t`` of shape ``(..., features)`` and ``h_t`` of shape ``(..., units)``;
* a layer (``SimpleRNN``, ``LSTM``, ``GRU``) that runs the cell over a
  batch-major sequence ``x`` of shape ``(batch, time, features)``.

The carry is the array ``h`` for SimpleRNN and GRU, and the pair ``(h, c)`` for
LSTM, each of shape ``(..., units)``.

Parameter layout (the Keras layout; ``G`` is the number of gates: 1 for
SimpleRNN, 4 for LSTM, 3 for GRU, stored side by side along the last axis)::

    kernel            (features, G * units)   input weights W
    recurrent_kernel  (units, G * units)      recurrent weights U
    bias              (G * units,)            input bias b
    recurrent_bias    (G * units,)            GRU only: recurrent bias rb

Gate order along the last axis: LSTM ``[i, f, g, o]`` (input, forget, cell
candidate, output), GRU ``[z, r, n]`` (update, reset, candidate).

Weight transfer:

* Keras ``SimpleRNN`` / ``LSTM``: the same names, shapes and gate order.
* Keras ``GRU(reset_after=True)`` (its default): ``kernel`` and
  ``recurrent_kernel`` as they are; Keras stores the two biases as one
  ``(2, 3 * units)`` array: ``bias = keras_bias[0]``, ``recurrent_bias = keras_bias[1]``.
  (Keras' ``reset_after=False`` variant is a different function; not supported.)
* PyTorch ``nn.RNN`` / ``nn.LSTM`` (``batch_first=True``, one layer, one
  direction): ``kernel = weight_ih_l0.T``, ``recurrent_kernel = weight_hh_l0.T``,
  ``bias = bias_ih_l0 + bias_hh_l0`` (PyTorch keeps two biases that only ever
  appear as their sum). PyTorch's LSTM gate order is ours, ``[i, f, g, o]``.
* PyTorch ``nn.GRU``: its blocks are in the order ``[r, z, n]``. With
  ``P(a) = concatenate([a[u:2u], a[0:u], a[2u:3u]])`` along the first axis,
  which reorders them to ``[z, r, n]``: ``kernel = P(weight_ih_l0).T``,
  ``recurrent_kernel = P(weight_hh_l0).T``, ``bias = P(bias_ih_l0)``,
  ``recurrent_bias = P(bias_hh_l0)``. PyTorch applies the reset gate after the
  recurrent matmul, as we do.

Performance: where the input projection ``x_t @ kernel + bias`` runs depends on
the backend. On GPU and TPU the layers compute it for all time steps in one
matmul before the scan, so only ``h @ recurrent_kernel`` and the elementwise
gate maths remain inside the scan body. On CPU each step projects its own
``x_t`` inside the scan: measured on 2 cores (LSTM(128) over MNIST's 28 rows of
28, batch 128, a whole training epoch), that ran 15-25% faster than the
projection outside, which writes and reads the ``(time, batch, 4 * units)``
projection and its gradient through memory (``lax.platform_dependent`` picks
the branch when the program is compiled). Both compute the same values. The
option ``projection="each_step"`` or ``"all_at_once"`` fixes the placement on
every backend (None, the default: by backend as above).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn import initializers
from jaxnn._typing import Array, DTypeLike, Params
from jaxnn.errors import check_axis_size, check_floating, check_rank, where
from jaxnn.layers._base import Layer, param_dtype

__all__ = [
    "GRU",
    "LSTM",
    "SimpleRNN",
    "gru_step",
    "lstm_step",
    "simple_rnn_step",
]

Carry = Any  # an array h, or the pair (h, c) for LSTM
# core(params, carry, xw_t) -> (carry, h_t), where xw_t = x_t @ kernel + bias.
_Core = Callable[[Params, Carry, Array], tuple[Carry, Array]]

_LAYOUT = "(batch, time, features)"

_PROJECTIONS = (None, "each_step", "all_at_once")  # see the module docstring


# -- the cells ---------------------------------------------------------------
#
# Each cell is split in two: the input projection xw_t = x_t @ kernel + bias,
# and a "core" that takes xw_t and does the rest. The layers project the whole
# sequence at once and scan only the core.


def _project(params: Params, x: Array) -> Array:
    return jnp.matmul(x, params["kernel"]) + params["bias"]


def _split(a: Array, parts: int) -> list[Array]:
    return jnp.split(a, parts, axis=-1)


def _simple_rnn_core(activation: Callable[[Array], Array]) -> _Core:
    def core(params, h, xw_t):
        h = activation(xw_t + jnp.matmul(h, params["recurrent_kernel"]))
        return h, h

    return core


def _lstm_core(params, carry, xw_t):
    h, c = carry
    i, f, g, o = _split(xw_t + jnp.matmul(h, params["recurrent_kernel"]), 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def _gru_core(params, h, xw_t):
    x_z, x_r, x_n = _split(xw_t, 3)
    h_z, h_r, h_n = _split(jnp.matmul(h, params["recurrent_kernel"]) + params["recurrent_bias"], 3)
    z = jax.nn.sigmoid(x_z + h_z)
    r = jax.nn.sigmoid(x_r + h_r)
    n = jnp.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


def simple_rnn_step(
    params: Params,
    carry: Array,
    x_t: Array,
    *,
    activation: Callable[[Array], Array] = jnp.tanh,
) -> tuple[Array, Array]:
    """One step of a simple (Elman) RNN: ``h' = activation(x_t W + b + h U)``.

    Args:
      params: ``{"kernel": (F, u), "recurrent_kernel": (u, u), "bias": (u,)}``.
      carry: ``h``, shape ``(..., u)``.
      x_t: shape ``(..., F)``.

    Returns:
      ``(h', h')``: the new carry and the output, both ``(..., u)``.
    """
    return _simple_rnn_core(activation)(params, carry, _project(params, x_t))


def lstm_step(params: Params, carry: tuple[Array, Array], x_t: Array
              ) -> tuple[tuple[Array, Array], Array]:
    """One LSTM step. With ``s = x_t W + h U + b`` split into gates ``[i, f, g, o]``::

        i = sigmoid(s_i)   f = sigmoid(s_f)   g = tanh(s_g)   o = sigmoid(s_o)
        c' = f * c + i * g
        h' = o * tanh(c')

    Args:
      params: ``{"kernel": (F, 4u), "recurrent_kernel": (u, 4u), "bias": (4u,)}``.
      carry: ``(h, c)``, each ``(..., u)``.
      x_t: shape ``(..., F)``.

    Returns:
      ``((h', c'), h')``.
    """
    return _lstm_core(params, carry, _project(params, x_t))


def gru_step(params: Params, carry: Array, x_t: Array) -> tuple[Array, Array]:
    """One GRU step, the "reset after" variant (PyTorch, cuDNN, Keras' default).

    With ``W, U, b, rb`` split into gates ``[z, r, n]``::

        z  = sigmoid(x_t W_z + b_z + h U_z + rb_z)
        r  = sigmoid(x_t W_r + b_r + h U_r + rb_r)
        n  = tanh(x_t W_n + b_n + r * (h U_n + rb_n))
        h' = (1 - z) * n + z * h

    Args:
      params: ``{"kernel": (F, 3u), "recurrent_kernel": (u, 3u), "bias": (3u,),
        "recurrent_bias": (3u,)}``.
      carry: ``h``, shape ``(..., u)``.
      x_t: shape ``(..., F)``.

    Returns:
      ``(h', h')``.
    """
    return _gru_core(params, carry, _project(params, x_t))


# -- running a cell over a sequence ------------------------------------------


def _step_mask(kind: str, x: Array, lengths: Any, mask: Any) -> Array | None:
    """The (batch, time) boolean mask of real (not padded) steps, or None."""
    n, t = x.shape[0], x.shape[1]
    if lengths is not None and mask is not None:
        raise ValueError(f"{where(kind)}: pass either lengths= or mask=, not both")
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        dtype = lengths.dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{where(kind)}: lengths must hold integers, got dtype {dtype}")
        if np.shape(lengths) != (n,):
            raise ValueError(
                f"{where(kind)}: lengths must have shape (batch,) = ({n},) for an input of "
                f"shape {tuple(x.shape)}, got shape {tuple(np.shape(lengths))}"
            )
        return jnp.arange(t)[None, :] < lengths[:, None]
    if mask is not None:
        mask = jnp.asarray(mask)
        dtype = mask.dtype
        if dtype != jnp.bool_:
            raise TypeError(
                f"{where(kind)}: mask must be a boolean array (True = real step), got dtype "
                f"{dtype}; e.g. mask = (tokens != pad_id)"
            )
        if np.shape(mask) != (n, t):
            raise ValueError(
                f"{where(kind)}: mask must have shape (batch, time) = ({n}, {t}) for an input "
                f"of shape {tuple(x.shape)}, got shape {tuple(np.shape(mask))}"
            )
        return mask
    return None


def _initial_carry(kind: str, initial_state: Any, lstm: bool, n: int, units: int,
                   dtype: Any) -> Carry:
    shape = (n, units)
    if initial_state is None:
        zeros = jnp.zeros(shape, dtype)
        return (zeros, zeros) if lstm else zeros
    if lstm:
        if not (isinstance(initial_state, tuple | list) and len(initial_state) == 2):
            raise TypeError(
                f"{where(kind)}: initial_state must be the pair (h, c), each of shape "
                f"{shape}, got {type(initial_state).__name__}"
            )
        parts, names = tuple(initial_state), ("h", "c")
    else:
        parts, names = (initial_state,), ("initial_state",)
    for part, part_name in zip(parts, names):
        if np.shape(part) != shape:
            label = f"initial_state {part_name}" if lstm else part_name
            raise ValueError(
                f"{where(kind)}: {label} must have shape (batch, units) = {shape}, "
                f"got shape {tuple(np.shape(part))}"
            )
    carry = tuple(jnp.asarray(p).astype(dtype) for p in parts)
    return carry if lstm else carry[0]


def _run(
    kind: str,
    core: _Core,
    params: Params,
    x: Array,
    *,
    units: int,
    lstm: bool,
    return_sequences: bool,
    return_state: bool,
    lengths: Any,
    mask: Any,
    initial_state: Any,
    unroll: int,
    projection: str | None,
) -> Any:
    check_rank(x, kind, min_rank=3, max_rank=3, layout=_LAYOUT)
    check_floating(x, kind)
    check_axis_size(x, kind, axis=-1, expected=params["kernel"].shape[0],
                    what="last dimension (features)")
    step_mask = _step_mask(kind, x, lengths, mask)
    dtype = jnp.result_type(x, params["kernel"])
    carry = _initial_carry(kind, initial_state, lstm, x.shape[0], units, dtype)

    def scan(params, x, carry, step_mask, project_each_step):
        x = jnp.swapaxes(x, 0, 1)  # time-major (T, N, F) for the scan
        if project_each_step:
            project = lambda x_t: _project(params, x_t)  # noqa: E731
        else:  # one matmul for all steps: (T, N, G*u)
            x = _project(params, x)
            project = lambda xw_t: xw_t  # noqa: E731

        if step_mask is None:
            def body(carry, x_t):
                carry, h = core(params, carry, project(x_t))
                return carry, (h if return_sequences else None)

            return jax.lax.scan(body, carry, x, unroll=unroll)

        def masked_body(carry, inputs):
            x_t, m_t = inputs
            m_t = m_t[:, None]
            new_carry, h = core(params, carry, project(x_t))
            carry = jax.tree_util.tree_map(lambda a, b: jnp.where(m_t, a, b), new_carry, carry)
            return carry, (jnp.where(m_t, h, jnp.zeros_like(h)) if return_sequences else None)

        return jax.lax.scan(masked_body, carry, (x, step_mask.T), unroll=unroll)

    if projection is not None:
        carry, ys = scan(params, x, carry, step_mask, projection == "each_step")
    else:
        carry, ys = jax.lax.platform_dependent(
            params, x, carry, step_mask,
            cpu=lambda *args: scan(*args, project_each_step=True),
            default=lambda *args: scan(*args, project_each_step=False),
        )
    y = jnp.swapaxes(ys, 0, 1) if return_sequences else (carry[0] if lstm else carry)
    return (y, carry) if return_state else y


def _check_units(kind: str, units: Any) -> None:
    if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
        raise ValueError(f"{kind}: units must be a positive integer, got {units!r}")


def _spec(kind: str, units: int, return_sequences: bool, return_state: bool) -> str:
    extra = "".join(
        f", {flag}=True"
        for flag, on in (("return_sequences", return_sequences), ("return_state", return_state))
        if on
    )
    return f"{kind}({units}{extra})"


def _recurrent_layer(
    kind: str,
    stem: str,
    units: int,
    gates: int,
    core: _Core,
    *,
    lstm: bool,
    recurrent_bias: bool,
    return_sequences: bool,
    return_state: bool,
    kernel_init: initializers.Initializer | None,
    recurrent_init: initializers.Initializer | None,
    bias_init: initializers.Initializer | None,
    forget_bias: bool,
    dtype: DTypeLike | None,
    unroll: int,
    projection: str | None,
    name: str | None,
) -> Layer:
    _check_units(kind, units)
    if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 1:
        raise ValueError(f"{kind}: unroll must be a positive integer, got {unroll!r}")
    if not isinstance(projection, str | None) or projection not in _PROJECTIONS:
        raise ValueError(f"{kind}: projection must be None (by backend), 'each_step' or "
                         f"'all_at_once', got {projection!r}")
    kernel_init = kernel_init or initializers.glorot_uniform()
    recurrent_init = recurrent_init or initializers.orthogonal()
    bias_init = bias_init or initializers.zeros()
    width = gates * units

    def initialize(key, x: jax.ShapeDtypeStruct):
        check_rank(x, kind, min_rank=3, max_rank=3, layout=_LAYOUT)
        check_floating(x, kind)
        dt = param_dtype(x, dtype)
        k_kernel, k_recurrent, k_bias, k_rbias = jax.random.split(key, 4)
        params = {
            "kernel": kernel_init(k_kernel, (x.shape[-1], width), dt),
            "recurrent_kernel": recurrent_init(k_recurrent, (units, width), dt),
            "bias": bias_init(k_bias, (width,), dt),
        }
        if forget_bias:  # LSTM gate order [i, f, g, o]: the forget block starts 1.0
            params["bias"] = params["bias"].at[units:2 * units].set(1.0)
        if recurrent_bias:
            params["recurrent_bias"] = bias_init(k_rbias, (width,), dt)
        return params, {}

    def forward(params, state, x, *, key=None, train=False, lengths=None, mask=None,
                initial_state=None):
        del key, train
        y = _run(kind, core, params, x, units=units, lstm=lstm,
                 return_sequences=return_sequences, return_state=return_state,
                 lengths=lengths, mask=mask, initial_state=initial_state, unroll=unroll,
                 projection=projection)
        return y, state

    return Layer(name or stem, initialize, forward,
                 spec=_spec(kind, units, return_sequences, return_state),
                 explicit_name=name is not None)


def SimpleRNN(
    units: int,
    *,
    activation: Callable[[Array], Array] = jnp.tanh,
    return_sequences: bool = False,
    return_state: bool = False,
    kernel_init: initializers.Initializer | None = None,
    recurrent_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    unroll: int = 1,
    projection: str | None = None,
    name: str | None = None,
) -> Layer:
    """A simple (Elman) RNN layer: ``h_t = activation(x_t W + b + h_{t-1} U)``.

    Parameters: ``kernel`` ``(features, units)``, ``recurrent_kernel``
    ``(units, units)``, ``bias`` ``(units,)``. ``activation`` defaults to tanh.

    Input and output shapes (batch-major; for time-major data, swap axes first):

    * ``x``: ``(batch, time, features)``, floating point.
    * output: ``(batch, units)``, the last hidden state ``h``; or
      ``(batch, time, units)``, the hidden state at every step, when
      ``return_sequences=True``.
    * with ``return_state=True`` the layer returns ``(output, final_carry)``,
      where the carry is the array ``h``, ``(batch, units)``.

    Keyword arguments to ``apply`` (``layer.apply(params, x, lengths=lengths)``):

    * ``lengths``: ``(batch,)`` integers, the number of real steps of each
      sequence (padding at the end); steps ``t >= lengths[n]`` are padding.
    * ``mask``: ``(batch, time)`` booleans, True at real steps (any pattern).
      Give ``lengths`` or ``mask``, not both.
    * ``initial_state``: the starting carry, the array ``h`` (default zeros).

    At a padded step the carry is left unchanged and the step's output is zeros.
    So the "last state" is the state after the last real step (step
    ``lengths[n] - 1``; the initial state when the length is 0), and padded
    positions of a ``return_sequences`` output are zeros.

    Options: ``kernel_init`` (default Glorot uniform), ``recurrent_init``
    (default orthogonal), ``bias_init`` (default zeros), ``dtype`` of the
    parameters (default: the input's floating dtype), ``unroll`` (steps per
    scan iteration, passed to :func:`jax.lax.scan`), ``projection`` (where
    ``x_t @ kernel + bias`` runs: ``"each_step"`` inside the scan,
    ``"all_at_once"`` before it, or None to choose by backend, see the module
    docstring), ``name``.

    The parameter layout and weight transfer from Keras and PyTorch are described
    in the module docstring of ``jaxnn.layers._recurrent``.
    """
    if not callable(activation):
        raise TypeError(f"SimpleRNN: activation must be callable, got {activation!r}")
    return _recurrent_layer(
        "SimpleRNN", "simple_rnn", units, 1, _simple_rnn_core(activation),
        lstm=False, recurrent_bias=False, return_sequences=return_sequences,
        return_state=return_state, kernel_init=kernel_init, recurrent_init=recurrent_init,
        bias_init=bias_init, forget_bias=False, dtype=dtype, unroll=unroll,
        projection=projection, name=name,
    )


def LSTM(
    units: int,
    *,
    return_sequences: bool = False,
    return_state: bool = False,
    kernel_init: initializers.Initializer | None = None,
    recurrent_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    unit_forget_bias: bool = True,
    dtype: DTypeLike | None = None,
    unroll: int = 1,
    projection: str | None = None,
    name: str | None = None,
) -> Layer:
    """A long short-term memory layer.

    At each step, with ``s = x_t W + h U + b`` split into gates ``[i, f, g, o]``::

        i = sigmoid(s_i)   f = sigmoid(s_f)   g = tanh(s_g)   o = sigmoid(s_o)
        c' = f * c + i * g
        h' = o * tanh(c')

    Parameters: ``kernel`` ``(features, 4 * units)``, ``recurrent_kernel``
    ``(units, 4 * units)``, ``bias`` ``(4 * units,)``, gate order ``[i, f, g, o]``
    (Keras' and PyTorch's). With ``unit_forget_bias=True`` (default, as in
    Keras) the forget-gate block of the bias starts at 1.0.

    Input and output shapes (batch-major; for time-major data, swap axes first):

    * ``x``: ``(batch, time, features)``, floating point.
    * output: ``(batch, units)``, the last hidden state ``h``; or
      ``(batch, time, units)``, the hidden state at every step, when
      ``return_sequences=True``.
    * with ``return_state=True`` the layer returns ``(output, final_carry)``,
      where the carry is the pair ``(h, c)``, each ``(batch, units)``.

    Keyword arguments to ``apply`` (``layer.apply(params, x, lengths=lengths)``):

    * ``lengths``: ``(batch,)`` integers, the number of real steps of each
      sequence (padding at the end); steps ``t >= lengths[n]`` are padding.
    * ``mask``: ``(batch, time)`` booleans, True at real steps (any pattern).
      Give ``lengths`` or ``mask``, not both.
    * ``initial_state``: the starting carry, the pair ``(h, c)`` (default zeros).

    At a padded step the carry is left unchanged and the step's output is zeros.
    So the "last state" is the state after the last real step (step
    ``lengths[n] - 1``; the initial state when the length is 0), and padded
    positions of a ``return_sequences`` output are zeros.

    Options: ``kernel_init`` (default Glorot uniform), ``recurrent_init``
    (default orthogonal), ``bias_init`` (default zeros), ``dtype`` of the
    parameters (default: the input's floating dtype), ``unroll`` (steps per
    scan iteration, passed to :func:`jax.lax.scan`), ``projection`` (where
    ``x_t @ kernel + bias`` runs: ``"each_step"`` inside the scan,
    ``"all_at_once"`` before it, or None to choose by backend, see the module
    docstring), ``name``.

    The parameter layout and weight transfer from Keras and PyTorch are described
    in the module docstring of ``jaxnn.layers._recurrent``.
    """
    return _recurrent_layer(
        "LSTM", "lstm", units, 4, _lstm_core,
        lstm=True, recurrent_bias=False, return_sequences=return_sequences,
        return_state=return_state, kernel_init=kernel_init, recurrent_init=recurrent_init,
        bias_init=bias_init, forget_bias=unit_forget_bias, dtype=dtype, unroll=unroll,
        projection=projection, name=name,
    )


def GRU(
    units: int,
    *,
    return_sequences: bool = False,
    return_state: bool = False,
    kernel_init: initializers.Initializer | None = None,
    recurrent_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    unroll: int = 1,
    projection: str | None = None,
    name: str | None = None,
) -> Layer:
    """A gated recurrent unit layer, the "reset after" variant.

    This is the variant of PyTorch, cuDNN and Keras' default (``reset_after=True``):
    the reset gate multiplies the recurrent projection, bias included. With
    ``W, U, b, rb`` split into gates ``[z, r, n]``::

        z  = sigmoid(x_t W_z + b_z + h U_z + rb_z)
        r  = sigmoid(x_t W_r + b_r + h U_r + rb_r)
        n  = tanh(x_t W_n + b_n + r * (h U_n + rb_n))
        h' = (1 - z) * n + z * h

    Parameters: ``kernel`` ``(features, 3 * units)``, ``recurrent_kernel``
    ``(units, 3 * units)``, ``bias`` ``(3 * units,)``, ``recurrent_bias``
    ``(3 * units,)``, gate order ``[z, r, n]`` (Keras'; PyTorch's is ``[r, z, n]``).

    Input and output shapes (batch-major; for time-major data, swap axes first):

    * ``x``: ``(batch, time, features)``, floating point.
    * output: ``(batch, units)``, the last hidden state ``h``; or
      ``(batch, time, units)``, the hidden state at every step, when
      ``return_sequences=True``.
    * with ``return_state=True`` the layer returns ``(output, final_carry)``,
      where the carry is the array ``h``, ``(batch, units)``.

    Keyword arguments to ``apply`` (``layer.apply(params, x, lengths=lengths)``):

    * ``lengths``: ``(batch,)`` integers, the number of real steps of each
      sequence (padding at the end); steps ``t >= lengths[n]`` are padding.
    * ``mask``: ``(batch, time)`` booleans, True at real steps (any pattern).
      Give ``lengths`` or ``mask``, not both.
    * ``initial_state``: the starting carry, the array ``h`` (default zeros).

    At a padded step the carry is left unchanged and the step's output is zeros.
    So the "last state" is the state after the last real step (step
    ``lengths[n] - 1``; the initial state when the length is 0), and padded
    positions of a ``return_sequences`` output are zeros.

    Options: ``kernel_init`` (default Glorot uniform), ``recurrent_init``
    (default orthogonal), ``bias_init`` (default zeros), ``dtype`` of the
    parameters (default: the input's floating dtype), ``unroll`` (steps per
    scan iteration, passed to :func:`jax.lax.scan`), ``projection`` (where
    ``x_t @ kernel + bias`` runs: ``"each_step"`` inside the scan,
    ``"all_at_once"`` before it, or None to choose by backend, see the module
    docstring), ``name``.

    The parameter layout and weight transfer from Keras and PyTorch are described
    in the module docstring of ``jaxnn.layers._recurrent``.
    """
    return _recurrent_layer(
        "GRU", "gru", units, 3, _gru_core,
        lstm=False, recurrent_bias=True, return_sequences=return_sequences,
        return_state=return_state, kernel_init=kernel_init, recurrent_init=recurrent_init,
        bias_init=bias_init, forget_bias=False, dtype=dtype, unroll=unroll,
        projection=projection, name=name,
    )

