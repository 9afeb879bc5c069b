"""Params for tests, drawn by numpy in ``model.init``'s layout.

``model.init`` compiles a program of its own (1-3 s of CPU a model on a cold cache);
tests that are not about initialisation take their params from here instead.
"""

import jax
import jax.numpy as jnp
import numpy as np


def numpy_init(model, x, seed=0):
    """Params shaped as ``model.init(key, x)`` gives them (traced, not run): kernels
    normal / sqrt(fan-in), vectors (biases, scales) normal * 0.1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])
    rng = np.random.default_rng(seed)

    def draw(s):
        if len(s.shape) < 2:
            return jnp.asarray(np.asarray(0.1 * rng.normal(size=s.shape), s.dtype))
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(np.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype))

    return jax.tree_util.tree_map(draw, shapes)
