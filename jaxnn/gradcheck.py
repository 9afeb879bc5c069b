"""Gradient checking: ``jax.grad`` against central finite differences.

For a scalar function ``f`` of a parameter pytree ``w``, the central difference

    d f / d w_i  ~=  (f(w + eps e_i) - f(w - eps e_i)) / (2 eps)

has error O(eps^2); in float64 with ``eps = 1e-6`` it agrees with an exact
gradient to about 1e-9 relative on smooth functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or "<root>"


def check_grads(
    f: Callable[[Any], Any],
    params: Any,
    *,
    eps: float = 1e-6,
    max_coords: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Compare ``jax.grad(f)(params)`` with central finite differences.

    Args:
      f: a scalar function of ``params``.
      params: a pytree of floating-point arrays (use float64 for tight checks).
      eps: the finite-difference step.
      max_coords: per leaf, at most this many coordinates are perturbed (a
        random subset, chosen with ``seed``, when the leaf is larger).
      seed: seed for choosing the coordinates of large leaves.

    Returns:
      ``{leaf_path: relative_error}`` with, over the checked coordinates,
      ``relative_error = ||g_autodiff - g_fd||_2 / max(||g_autodiff||_2, ||g_fd||_2, 1e-12)``.
    """
    grads = jax.grad(f)(params)
    f_np = lambda p: float(f(p))
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_path]
    grad_leaves = jax.tree_util.tree_leaves(grads)
    rng = np.random.default_rng(seed)
    errors: dict[str, float] = {}
    for index, ((path, leaf), grad) in enumerate(zip(leaves_with_path, grad_leaves)):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(f"check_grads: leaf {_path_str(path)} has dtype {leaf.dtype}; "
                            "only floating-point leaves can be perturbed")
        size = leaf.size
        coords = np.arange(size) if size <= max_coords else rng.choice(size, max_coords,
                                                                       replace=False)
        flat = leaf.reshape(-1)
        ad = np.asarray(grad).reshape(-1)[coords]
        fd = np.empty(len(coords))
        def shifted(c, delta, index=index, flat=flat, shape=leaf.shape):
            new = list(leaves)
            new[index] = flat.at[c].add(delta).reshape(shape)
            return jax.tree_util.tree_unflatten(treedef, new)

        for j, c in enumerate(coords):
            fd[j] = (f_np(shifted(c, eps)) - f_np(shifted(c, -eps))) / (2 * eps)
        scale = max(np.linalg.norm(ad), np.linalg.norm(fd), 1e-12)
        errors[_path_str(path)] = float(np.linalg.norm(ad - fd) / scale)
    return errors
