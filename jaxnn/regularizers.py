"""Weight penalties: plain functions of the parameter pytree.

A penalty is composed with a loss by the user::

    penalty = jaxnn.regularizers.l2(1e-4)          # kernels only, by default

    def objective(params, x, y):
        return loss(model.apply(params, x), y) + penalty(params)

Which leaves a penalty touches is chosen by a filter ``where``:

* a function ``where(path, leaf) -> bool``, where ``path`` is the leaf's
  ``/``-joined key path, e.g. ``"dense_0/kernel"`` or ``"block_1/conv2d_0/bias"``
  (list and tuple positions appear as numbers); or
* a pytree of bools with the structure of the params (or a prefix of it:
  ``{"dense_0": True, "dense_1": False}`` covers whole layers).

The default, :func:`kernels_only`, selects the weight matrices of Dense,
convolution and recurrent layers and leaves biases, normalisation scales and
offsets, and embedding tables alone. The same filter gives an optax mask
(:func:`mask_from`, :func:`mask_fn`), so weight decay in ``adamw`` and a
penalty can select the same parameters.

A penalty whose filter selects none of the parameters raises ``ValueError``
naming the filter and the parameter paths (a layer whose weights are not
called ``kernel`` would otherwise go unpenalised without a word). A model with
no parameters at all gets a penalty of 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn._typing import Array, Params

Filter: TypeAlias = Callable[[str, Any], bool]
Penalty: TypeAlias = Callable[[Params], Array]

__all__ = [
    "Filter",
    "Penalty",
    "all_leaves",
    "elastic_net",
    "kernels_only",
    "l1",
    "l2",
    "leaf_paths",
    "mask_fn",
    "mask_from",
]


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path: tuple) -> str:
    return "/".join(_key_str(k) for k in path)


def leaf_paths(params: Any) -> dict[str, Any]:
    """All leaves of ``params`` by path: ``{"dense_0/kernel": array, ...}``.

    Paths join dict keys (and list/tuple positions) with ``/``, in the order of
    :func:`jax.tree_util.tree_leaves`.
    """
    return {_path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def kernels_only(path: str, leaf: Any) -> bool:
    """The default filter: true for leaves named ``kernel`` or ``*_kernel``.

    That selects the weights of Dense and convolution layers (``kernel``) and
    of recurrent layers (e.g. ``recurrent_kernel``). It leaves out biases,
    normalisation parameters (``scale``, ``offset``) and embedding tables
    (``embedding``): an embedding row only receives gradient when its token
    occurs, so decaying every row each step shrinks rare tokens' vectors; to
    include embeddings, pass e.g. ``where=lambda p, w: kernels_only(p, w) or
    p.endswith("embedding")``.
    """
    del leaf
    name = path.rsplit("/", 1)[-1]
    return name == "kernel" or name.endswith("_kernel")


def all_leaves(path: str, leaf: Any) -> bool:
    """A filter selecting every leaf."""
    del path, leaf
    return True


def mask_from(where: Filter | Any, params: Any, *, owner: str = "mask_from") -> Any:
    """The bool pytree (structure of ``params``) that ``where`` selects.

    Args:
      where: a filter ``(path, leaf) -> bool`` or a pytree of bools with the
        structure of ``params`` or a prefix of it.
      params: the parameter pytree.
      owner: the name used in error messages.

    Returns:
      A pytree of Python bools shaped like ``params``, usable as an optax mask
      (``optax.adamw(..., mask=mask_from(kernels_only, params))``).
    """
    if callable(where):
        def decide(path, leaf):
            chosen = where(_path_str(path), leaf)
            if not isinstance(chosen, bool | np.bool_):
                raise TypeError(
                    f"{owner}: the where filter must return a Python bool, got "
                    f"{type(chosen).__name__} ({chosen!r}) for leaf {_path_str(path)!r}"
                )
            return bool(chosen)

        return jax.tree_util.tree_map_with_path(decide, params)

    def expand(choice, subtree):
        if not isinstance(choice, bool | np.bool_):
            raise TypeError(
                f"{owner}: where must be a filter function (path, leaf) -> bool or a pytree "
                f"of bools; found a leaf {choice!r} of type {type(choice).__name__}"
            )
        return jax.tree_util.tree_map(lambda _: bool(choice), subtree)

    try:
        return jax.tree_util.tree_map(expand, where, params)
    except ValueError as error:
        raise ValueError(
            f"{owner}: where must be a filter function (path, leaf) -> bool or a pytree of "
            "bools with the structure of the params (or a prefix of it); where has structure "
            f"{jax.tree_util.tree_structure(where)}, params have "
            f"{jax.tree_util.tree_structure(params)}"
        ) from error


def mask_fn(where: Filter | Any) -> Callable[[Any], Any]:
    """``params -> mask_from(where, params)``: an optax mask function.

    Example: ``jaxnn.optimizers.adamw(1e-3, mask=mask_fn(kernels_only))``
    (works with ``optax.adamw`` too).
    """
    return lambda params: mask_from(where, params, owner="mask_fn")


def _check_strength(strength: Any, owner: str, what: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(
        strength, int | float | np.integer | np.floating | np.ndarray | jax.Array
    ):
        raise TypeError(f"{owner}: {what} must be a number, got {strength!r}")
    if np.ndim(strength) != 0:
        raise ValueError(f"{owner}: {what} must be a scalar, got shape {np.shape(strength)}")
    value = float(strength)  # raises for a traced value: penalties take fixed strengths
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {what} must be a finite number >= 0, got {value!r}")
    return value


def _check_where(where: Any, owner: str) -> None:
    if where is None or isinstance(where, str | int | float):
        raise TypeError(
            f"{owner}: where must be a filter function (path, leaf) -> bool or a pytree of "
            f"bools, got {where!r}"
        )


_PATHS_SHOWN = 12  # parameter paths listed in the no-match error


def _filter_name(where: Any) -> str:
    """How an error message names a filter: its function name, or its pytree's repr."""
    if callable(where):
        base = getattr(where, "func", where)  # functools.partial
        return getattr(base, "__qualname__", None) or repr(where)
    text = repr(where)
    return text if len(text) <= 120 else text[:117] + "..."


def _no_match_error(where: Any, paths: list[str], owner: str) -> ValueError:
    shown = ", ".join(repr(p) for p in paths[:_PATHS_SHOWN])
    if len(paths) > _PATHS_SHOWN:
        shown += f", ... ({len(paths) - _PATHS_SHOWN} more)"
    hint = (" (kernels_only, the default, selects leaves named 'kernel' or '*_kernel')"
            if where is kernels_only else "")
    return ValueError(
        f"{owner}: the filter where={_filter_name(where)} selects none of the "
        f"{len(paths)} parameters{hint}, so the penalty would always be 0; the parameter "
        f"paths are: {shown}. Pass a where= that selects the leaves to penalise, e.g. "
        "where=lambda path, w: path.endswith('/weight'), or leave the penalty out"
    )


def _selected(where: Any, params: Any, owner: str) -> list[Array]:
    """The leaves ``where`` selects. Raises if there are leaves and it selects none.

    Decided from the tree's paths and static leaf metadata, so under ``jit`` the
    check runs once, while tracing, and costs nothing per call. A tree with no
    leaves at all (a model without parameters) selects nothing and is not an error.
    """
    mask = mask_from(where, params, owner=owner)
    leaves = jax.tree_util.tree_leaves(params)
    chosen = jax.tree_util.tree_leaves(mask)
    if leaves and not any(chosen):
        raise _no_match_error(where, list(leaf_paths(params)), owner)
    return [jnp.asarray(w) for w, on in zip(leaves, chosen) if on]


def _acc_dtype(w: Array) -> Any:
    """Sum in the leaf's dtype, but at least float32 (bfloat16 sums lose digits)."""
    return jnp.promote_types(w.dtype, jnp.float32)


def _abs(w: Array) -> Array:
    # |w| written as w * sign(w): its gradient is sign(w), i.e. 0 at w == 0
    # (jnp.abs has gradient 1 there), the usual subgradient choice for L1.
    return w * jnp.sign(w)


def _sum_penalty(terms: list[Array]) -> Array:
    if not terms:
        return jnp.zeros((), jnp.result_type(float))
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def l1(strength: float, where: Filter | Any = kernels_only) -> Penalty:
    """L1 penalty (lasso): ``penalty(params) = strength * sum |w|``.

    The sum runs over every element of every selected leaf (Keras' ``L1``
    convention). Its gradient is ``strength * sign(w)``, taken as 0 at
    ``w == 0``.

    Args:
      strength: ``>= 0``.
      where: which leaves are penalised (see the module docstring); default
        :func:`kernels_only`.

    Returns:
      ``penalty(params) -> scalar`` (float32, or wider if the leaves are).
      Calling it raises ``ValueError`` if ``where`` selects none of the leaves
      of a non-empty ``params``.
    """
    strength = _check_strength(strength, "l1")
    _check_where(where, "l1")

    def penalty(params: Params) -> Array:
        terms = [
            strength * jnp.sum(_abs(w), dtype=_acc_dtype(w))
            for w in _selected(where, params, "l1")
        ]
        return _sum_penalty(terms)

    return penalty


def l2(strength: float, where: Filter | Any = kernels_only) -> Penalty:
    """L2 penalty (ridge): ``penalty(params) = strength * sum w^2``.

    This is Keras' ``L2`` convention: there is no factor 1/2, so the gradient
    is ``2 * strength * w``. (Under plain gradient descent with rate ``lr``
    this is weight decay with rate ``2 * strength``; under Adam it is not
    equivalent to AdamW's decoupled decay.)

    Args:
      strength: ``>= 0``.
      where: which leaves are penalised; default :func:`kernels_only`.

    Returns:
      ``penalty(params) -> scalar``; raises ``ValueError`` as :func:`l1` does
      when ``where`` selects no leaf.
    """
    strength = _check_strength(strength, "l2")
    _check_where(where, "l2")

    def penalty(params: Params) -> Array:
        terms = [
            strength * jnp.sum(jnp.square(w), dtype=_acc_dtype(w))
            for w in _selected(where, params, "l2")
        ]
        return _sum_penalty(terms)

    return penalty


def elastic_net(
    l1_strength: float, l2_strength: float, where: Filter | Any = kernels_only
) -> Penalty:
    """Elastic net: ``l1_strength * sum |w| + l2_strength * sum w^2``.

    The gradient is ``l1_strength * sign(w) + 2 * l2_strength * w``.

    Args:
      l1_strength, l2_strength: ``>= 0``.
      where: which leaves are penalised; default :func:`kernels_only`.

    Returns:
      ``penalty(params) -> scalar``; raises ``ValueError`` as :func:`l1` does
      when ``where`` selects no leaf.
    """
    a = _check_strength(l1_strength, "elastic_net", "l1_strength")
    b = _check_strength(l2_strength, "elastic_net", "l2_strength")
    _check_where(where, "elastic_net")

    def penalty(params: Params) -> Array:
        terms = [
            a * jnp.sum(_abs(w), dtype=_acc_dtype(w))
            + b * jnp.sum(jnp.square(w), dtype=_acc_dtype(w))
            for w in _selected(where, params, "elastic_net")
        ]
        return _sum_penalty(terms)

    return penalty
