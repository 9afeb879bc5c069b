"""jaxnn: a functional neural-network toolkit for JAX.

A model is a pure function over a parameter pytree::

    import jax, jaxnn
    model = jaxnn.Sequential([jaxnn.Dense(64), jaxnn.relu, jaxnn.Dense(10)])
    params = model.init(jax.random.key(0), x_sample)
    logits = model.apply(params, x)
"""

from jaxnn import initializers
from jaxnn.layers import (
    Dense,
    Flatten,
    Layer,
    Reshape,
    Scope,
    Sequential,
    as_layer,
    model,
    stateless,
)
from jaxnn.summary import count_params, summarize

__version__ = "0.1.0"

__all__ = [
    "Dense",
    "Flatten",
    "Layer",
    "Reshape",
    "Scope",
    "Sequential",
    "as_layer",
    "count_params",
    "initializers",
    "model",
    "stateless",
    "summarize",
]
