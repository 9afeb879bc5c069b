"""Bidirectional: run a recurrent layer forwards and a copy backwards, and merge."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnn.errors import check_rank, layer_scope, where
from jaxnn.layers._base import Layer
from jaxnn.layers._recurrent import _LAYOUT, _step_mask

__all__ = ["Bidirectional"]

_MERGES = ("concat", "sum", "mean", "mul")


def _merge(mode: str, a, b):
    if mode == "concat":
        return jnp.concatenate([a, b], axis=-1)
    if a.shape != b.shape:
        raise ValueError(
            f"{where('Bidirectional')}: merge={mode!r} needs the two directions' outputs to "
            f"have the same shape, got {tuple(a.shape)} (forward) and {tuple(b.shape)} "
            "(backward); give both layers the same units, or use merge='concat'"
        )
    if mode == "sum":
        return a + b
    if mode == "mean":
        return (a + b) / 2
    return a * b


def _split_output(out: Any) -> tuple[Any, Any, bool]:
    """``(y, carry, has_state)`` from a recurrent layer's output ``y`` or ``(y, carry)``."""
    if isinstance(out, tuple) and len(out) == 2:
        return out[0], out[1], True
    return out, None, False


def Bidirectional(
    layer: Layer,
    *,
    merge: str = "concat",
    backward_layer: Layer | None = None,
    name: str | None = None,
) -> Layer:
    """Run a recurrent layer over the sequence forwards and a second one backwards.

    ``layer`` is a recurrent layer (``SimpleRNN``, ``LSTM``, ``GRU``, or any
    layer with their calling convention). The backward direction is a second
    copy of ``layer`` with its own parameters, or ``backward_layer`` if given;
    both must have the same ``return_sequences`` and ``return_state``.

    Shapes, with ``x`` of shape ``(batch, time, features)`` and ``u_f``, ``u_b``
    the units of the two directions:

    * ``return_sequences=True``: each direction gives ``(batch, time, u)``; the
      backward one reads the sequence from its end and its outputs are put back
      in the original time order, so position ``t`` holds the forward state after
      ``x[0..t]`` and the backward state after ``x[t..end]``.
    * ``return_sequences=False``: each direction gives ``(batch, u)``: the
      forward state after the last step, and the backward state after reading
      the whole sequence backwards, i.e. at time 0 (PyTorch's ``h_n[1]``,
      Keras' backward output).
    * ``merge``: ``"concat"`` (default) joins them on the last axis, forward
      first: ``u_f + u_b`` features. ``"sum"``, ``"mean"`` (the average) and
      ``"mul"`` (the elementwise product) need ``u_f == u_b``.
    * ``return_state=True``: the output is ``(merged, (forward_carry,
      backward_carry))``, each carry as the wrapped layer returns it (``h``, or
      ``(h, c)`` for LSTM), ``(batch, u)`` arrays.

    Keyword arguments to ``apply`` are those of the recurrent layers:
    ``lengths`` ``(batch,)`` or ``mask`` ``(batch, time)`` mark the real steps,
    and ``initial_state`` is the pair ``(forward_initial, backward_initial)``.
    With ``lengths`` each sequence is read backwards from its own last real step
    (step ``lengths[n] - 1``), as PyTorch's packed sequences are; with a
    ``mask`` the backward direction reads the real steps in reverse order.
    (The layer reverses the whole time axis together with the mask; padded steps
    leave the carry unchanged, so this is the same.) Padded positions of a
    sequence output are zeros.

    Parameters: ``{"forward": <layer's params>, "backward": <backward layer's
    params>}``.

    Weight transfer from PyTorch's ``nn.LSTM`` / ``nn.GRU`` with
    ``bidirectional=True, batch_first=True`` and one layer: the ``..._l0``
    weights go to ``params["forward"]`` and the ``..._l0_reverse`` weights to
    ``params["backward"]``, each as for a one-directional layer (see
    ``jaxnn.layers._recurrent``). For LSTM::

        forward  = {"kernel": weight_ih_l0.T, "recurrent_kernel": weight_hh_l0.T,
                    "bias": bias_ih_l0 + bias_hh_l0}
        backward = {"kernel": weight_ih_l0_reverse.T,
                    "recurrent_kernel": weight_hh_l0_reverse.T,
                    "bias": bias_ih_l0_reverse + bias_hh_l0_reverse}

    and for GRU the same with the gate blocks reordered from PyTorch's
    ``[r, z, n]`` to ``[z, r, n]``, and ``bias_hh`` as ``recurrent_bias``.
    PyTorch's ``output`` (``(batch, time, 2 * units)``, forward half first) is
    ``merge="concat", return_sequences=True``; its ``h_n`` ``(2, batch, units)``
    is ``concatenate([h_n[0], h_n[1]], -1)`` = our ``return_sequences=False``
    output. Sequences packed with ``pack_padded_sequence`` correspond to
    ``lengths``.

    Args:
      layer: the recurrent layer of the forward direction (and, copied, of the
        backward one).
      merge: ``"concat"``, ``"sum"``, ``"mean"`` or ``"mul"``.
      backward_layer: a different layer for the backward direction.
      name: the layer's name inside a container.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"Bidirectional: layer must be a jaxnn Layer (e.g. LSTM(32)), got "
                        f"{type(layer).__name__}: {layer!r}")
    if backward_layer is not None and not isinstance(backward_layer, Layer):
        raise TypeError(f"Bidirectional: backward_layer must be a jaxnn Layer or None, got "
                        f"{type(backward_layer).__name__}: {backward_layer!r}")
    if merge not in _MERGES:
        raise ValueError(f"Bidirectional: merge must be one of {', '.join(map(repr, _MERGES))}, "
                         f"got {merge!r}")
    forward_layer = layer
    backward = backward_layer if backward_layer is not None else layer

    def initialize(key, x: jax.ShapeDtypeStruct):
        check_rank(x, "Bidirectional", min_rank=3, max_rank=3, layout=_LAYOUT)
        params, state = {}, {}
        for index, (part, child) in enumerate((("forward", forward_layer),
                                               ("backward", backward))):
            with layer_scope(part):
                p, s = child.initialize(jax.random.fold_in(key, index), x)
            params[part] = p
            if jax.tree_util.tree_leaves(s):
                state[part] = s
        return params, state

    def forward(params, state, x, *, key=None, train=False, lengths=None, mask=None,
                initial_state=None):
        check_rank(x, "Bidirectional", min_rank=3, max_rank=3, layout=_LAYOUT)
        steps = _step_mask("Bidirectional", x, lengths, mask)
        if initial_state is None:
            initial = (None, None)
        elif isinstance(initial_state, tuple | list) and len(initial_state) == 2:
            initial = tuple(initial_state)
        else:
            raise TypeError(
                f"{where('Bidirectional')}: initial_state must be the pair "
                "(forward_initial, backward_initial), each the wrapped layer's carry, got "
                f"{type(initial_state).__name__}"
            )
        # Reversing the whole time axis with the mask: padded steps keep the carry, so
        # each sequence is read backwards from its own last real step.
        runs = (("forward", forward_layer, x, steps, initial[0]),
                ("backward", backward, jnp.flip(x, axis=1),
                 None if steps is None else jnp.flip(steps, axis=1), initial[1]))
        outs, new_state = [], {}
        for index, (part, child, xs, m, init) in enumerate(runs):
            kwargs = {}
            if m is not None:
                kwargs["mask"] = m
            if init is not None:
                kwargs["initial_state"] = init
            child_key = None if key is None else jax.random.fold_in(key, index)
            with layer_scope(part):
                out, s = child.forward(params.get(part, {}), state.get(part, {}), xs,
                                       key=child_key, train=train, **kwargs)
            outs.append(_split_output(out))
            if jax.tree_util.tree_leaves(s):
                new_state[part] = s
        (y_f, carry_f, state_f), (y_b, carry_b, state_b) = outs
        sequences = y_f.ndim == 3
        if state_f != state_b or sequences != (y_b.ndim == 3):
            def describe(y, with_state):
                return f"{tuple(y.shape)}{' and a carry' if with_state else ''}"

            raise ValueError(
                f"{where('Bidirectional')}: the forward layer {forward_layer!r} and the backward "
                f"layer {backward!r} must agree on return_sequences and return_state; they "
                f"returned {describe(y_f, state_f)} and {describe(y_b, state_b)}"
            )
        if sequences:
            y_b = jnp.flip(y_b, axis=1)
        y = _merge(merge, y_f, y_b)
        return ((y, (carry_f, carry_b)) if state_f else y), new_state

    spec = f"Bidirectional({layer!r}"
    if backward_layer is not None:
        spec += f", backward_layer={backward_layer!r}"
    if merge != "concat":
        spec += f", merge={merge!r}"
    return Layer(name or "bidirectional", initialize, forward, spec=spec + ")",
                 explicit_name=name is not None)
