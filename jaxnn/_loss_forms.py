"""Losses and metrics as users write them, turned into the one form ``fit`` calls.

``fit`` and ``evaluate`` call every loss and metric as ``fn(predictions, targets,
weights=w)`` and expect the weighted mean over the batch (``w`` is 0 for the
padded rows of a short last batch). Users write losses in three forms:

* a name from :mod:`jaxnn.losses` (or :mod:`jaxnn.metrics`), e.g.
  ``"sparse_softmax_cross_entropy"``;
* a function with a ``weights=`` keyword returning the weighted mean, as every
  loss in :mod:`jaxnn.losses` does: used as it is;
* a function of ``(predictions, targets)`` returning one value per example,
  shape ``(batch,)``, as optax's losses do: ``fit`` weights it,
  ``sum_i w_i l_i / sum_i w_i`` (padded rows contribute exactly 0). Trailing
  axes, e.g. optax's element-wise ``l2_loss`` of shape ``(batch, d)``, are
  averaged per example first.

A function that takes no ``weights`` and returns a scalar is refused: its mean
would count the padded rows.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax.numpy as jnp

WeightedFn = Callable[..., jnp.ndarray]


def _describe(fn) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def _takes_weights(fn) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): assume the weights form
        return True
    return any(p.name == "weights" or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in parameters)


def _module_names(module) -> list[str]:
    return sorted(name for name in getattr(module, "__all__", dir(module))
                  if not name.startswith("_") and callable(getattr(module, name, None)))


def weighted(fn: str | Callable, what: str = "loss") -> WeightedFn:
    """``fn`` (a name or a function in one of the forms above) as
    ``f(predictions, targets, *, weights) -> weighted mean``; cached per ``fn`` when
    ``fn`` is hashable, so repeated calls reuse compiled programs.

    ``what`` names the argument in errors (``"loss"``, ``"metrics"``).
    """
    try:
        hash(fn)
    except TypeError:  # e.g. a callable object defining __eq__ without __hash__
        return _weighted(fn, what)
    return _weighted_cached(fn, what)


def _weighted(fn: str | Callable, what: str) -> WeightedFn:
    if isinstance(fn, str):
        from jaxnn import losses, metrics

        module = losses if what == "loss" else metrics
        found = getattr(module, fn, None)
        if fn.startswith("_") or found is None or not callable(found):
            raise ValueError(f"{what}: unknown name {fn!r}; pass a function or one of "
                             f"{_module_names(module)}")
        return found
    if not callable(fn):
        module = "jaxnn.losses" if what == "loss" else "jaxnn.metrics"
        raise TypeError(f"{what}: expected a function or a name from {module}, got {fn!r} "
                        f"of type {type(fn).__name__}")
    if _takes_weights(fn):
        return fn
    name = _describe(fn)

    def per_example_mean(predictions, targets, *, weights):
        values = jnp.asarray(fn(predictions, targets))
        batch = weights.shape[0]
        if values.ndim == 0:
            raise TypeError(
                f"{what} {name} takes no weights= keyword and returns a scalar, so fit cannot "
                "leave out the padded rows of a short last batch. Use one of: (1) a function "
                "returning one value per example, shape (batch,) (as optax's losses do); "
                "(2) a function with a weights= keyword returning the weighted mean (as "
                "jaxnn.losses do); (3) a name from jaxnn.losses, e.g. "
                "'sparse_softmax_cross_entropy'")
        if values.shape[0] != batch:
            raise ValueError(f"{what} {name} returned shape {values.shape}; expected one value "
                             f"per example, shape ({batch},), or ({batch}, ...)")
        values = values.reshape(batch, -1).mean(axis=1)
        values = jnp.where(weights > 0, values, 0)  # padded rows: 0, even if not finite
        return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)

    per_example_mean.__name__ = name
    return per_example_mean


_weighted_cached = functools.lru_cache(maxsize=256)(_weighted)
