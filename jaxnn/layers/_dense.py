"""Dense (fully connected) layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnn import initializers
from jaxnn._typing import DTypeLike
from jaxnn.errors import check_axis_size, check_floating, check_rank
from jaxnn.layers._base import Layer, param_dtype


def Dense(
    units: int,
    *,
    use_bias: bool = True,
    kernel_init: initializers.Initializer | None = None,
    bias_init: initializers.Initializer | None = None,
    dtype: DTypeLike | None = None,
    name: str | None = None,
) -> Layer:
    """A fully connected layer: ``y = x @ kernel + bias``.

    Shapes: ``x`` is ``(..., in_features)``, ``y`` is ``(..., units)``.

    Parameters (the layout Keras and TensorFlow use; PyTorch's ``Linear.weight``
    is ``kernel.T``):

    * ``kernel``: ``(in_features, units)``, default Glorot uniform.
    * ``bias``: ``(units,)``, default zeros (absent when ``use_bias=False``).
    """
    if not isinstance(units, int) or units <= 0:
        raise ValueError(f"Dense: units must be a positive integer, got {units!r}")
    kernel_init = kernel_init or initializers.glorot_uniform()
    bias_init = bias_init or initializers.zeros()

    def initialize(key, x: jax.ShapeDtypeStruct):
        check_rank(x, "Dense", min_rank=1, layout="(..., features)")
        check_floating(x, "Dense")
        dt = param_dtype(x, dtype)
        kernel_key, bias_key = jax.random.split(key)
        params = {"kernel": kernel_init(kernel_key, (x.shape[-1], units), dt)}
        if use_bias:
            params["bias"] = bias_init(bias_key, (units,), dt)
        return params, {}

    def forward(params, state, x, *, key=None, train=False):
        del key, train
        kernel = params["kernel"]
        check_rank(x, "Dense", min_rank=1, layout="(..., features)")
        check_floating(x, "Dense")
        check_axis_size(x, "Dense", axis=-1, expected=kernel.shape[0],
                        what="last dimension (features)")
        y = jnp.matmul(x, kernel)
        if use_bias:
            y = y + params["bias"]
        return y, state

    return Layer(name or "dense", initialize, forward, spec=f"Dense({units})",
                 explicit_name=name is not None)
