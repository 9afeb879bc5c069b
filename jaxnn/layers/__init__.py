"""Layers: each a :class:`Layer`, a named pair of pure functions."""

from jaxnn.layers._base import Layer, as_layer, stateless
from jaxnn.layers._container import Scope, Sequential, model
from jaxnn.layers._dense import Dense
from jaxnn.layers._reshape import Flatten, Reshape

__all__ = [
    "Dense",
    "Flatten",
    "Layer",
    "Reshape",
    "Scope",
    "Sequential",
    "as_layer",
    "model",
    "stateless",
]
