"""Model summaries: each layer's output shape and parameter count, as a table."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxnn._typing import Params
from jaxnn.layers._base import Layer, _as_struct
from jaxnn.layers._container import call_child, record_calls


def count_params(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def _shape_str(tree: Any) -> str:
    shapes = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)]
    if len(shapes) == 1:
        return str(shapes[0])
    return "[" + ", ".join(str(s) for s in shapes) + "]"


def summarize(model: Layer, *inputs: Any, params: Params | None = None) -> str:
    """Return a table of ``(layer, output shape, parameter count)`` rows and the total.

    Only shapes are computed (with :func:`jax.eval_shape`); nothing is run.
    ``params`` may be given to report an existing model; otherwise a model is
    initialised abstractly from ``inputs`` (arrays or :class:`jax.ShapeDtypeStruct`).
    """
    structs = tuple(_as_struct(x) for x in inputs)
    key = jax.random.key(0)
    if params is None:
        params, state = jax.eval_shape(model.initialize, key, *structs)
    else:
        _, state = jax.eval_shape(model.initialize, key, *structs)

    with record_calls() as records:
        jax.eval_shape(
            lambda p, s, *xs: call_child(model.name, model, p, s, xs, key=None, train=False)[0],
            params,
            state,
            *structs,
        )

    prefix = model.name + "/"
    rows = [("Layer (type)", "Output shape", "Params")]
    for path, layer, layer_params, outputs in records:
        label = path[len(prefix):] if path.startswith(prefix) else path
        rows.append((f"{label} ({layer.spec or layer.name})", _shape_str(outputs),
                     f"{count_params(layer_params):,}"))
    total = count_params(params)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "-" * (sum(widths) + 4)

    def line(row):
        return f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}"

    out = [line(rows[0]), rule, *(line(row) for row in rows[1:]), rule,
           f"Total params: {total:,}"]
    return "\n".join(out)
