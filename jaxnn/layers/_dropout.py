"""Dropout: randomly zero units in training mode (inverted dropout)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxnn.errors import check_floating, current_path
from jaxnn.layers._base import Layer


def _no_params(key, *inputs):
    del key, inputs
    return {}, {}


def Dropout(rate: float, *, name: str | None = None) -> Layer:
    """Inverted dropout; ``rate`` is the fraction of units DROPPED.

    Note: this is the Keras/PyTorch/Flax meaning. stax's ``Dropout(rate)``
    takes the probability of *keeping* a unit, the opposite.

    Shapes: ``y`` has the shape and dtype of ``x``.

    * train=True: each entry is kept independently with probability
      ``1 - rate``; ``y = x * mask / (1 - rate)``, so ``E[y] = x`` and nothing
      needs rescaling at inference. Needs ``key=``: under ``Sequential`` (and
      functional models) each child gets its own key folded from the model's
      key and its position, so one key per training step is enough. The same
      key gives the same mask.
    * train=False (the default), or ``rate == 0``: the identity; no key needed.

    No parameters, no state.

    Args:
      rate: the drop probability, in [0, 1).
      name: the layer's name inside a container.
    """
    if (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
            or not 0.0 <= float(rate) < 1.0):
        raise ValueError(
            f"Dropout: rate is the fraction of units dropped and must be a number in [0, 1), "
            f"got {rate!r}"
        )
    rate = float(rate)

    def forward(params, state, x, *, key=None, train=False):
        del params
        check_floating(x, "Dropout")
        if not train or rate == 0.0:
            return x, state
        if key is None:
            path = current_path() or name
            who = f"Dropout layer '{path}'" if path else "Dropout layer"
            raise ValueError(
                f"{who} needs a PRNG key in training mode: pass key=... to apply "
                "(e.g. key=jax.random.fold_in(base_key, step))"
            )
        keep = jax.random.bernoulli(key, 1.0 - rate, jnp.shape(x))
        y = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
        return y, state

    return Layer(name or "dropout", _no_params, forward, spec=f"Dropout({rate})",
                 explicit_name=name is not None)
