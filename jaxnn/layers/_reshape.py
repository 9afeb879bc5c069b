"""Shape-only layers: Flatten and Reshape."""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxnn.errors import check_rank, where
from jaxnn.layers._base import Layer


def _no_params(key, *inputs):
    del key, inputs
    return {}, {}


def Flatten(*, name: str | None = None) -> Layer:
    """Flatten all axes but the first (the batch): ``(N, d1, d2, ...) -> (N, d1*d2*...)``."""

    def forward(params, state, x, *, key=None, train=False):
        check_rank(x, "Flatten", min_rank=1, layout="(batch, ...)")
        return x.reshape(x.shape[0], -1), state

    return Layer(name or "flatten", _no_params, forward, spec="Flatten()",
                 explicit_name=name is not None)


def Reshape(target_shape: Sequence[int], *, name: str | None = None) -> Layer:
    """Reshape each example (the batch axis is kept): ``(N, ...) -> (N, *target_shape)``.

    One entry of ``target_shape`` may be ``-1`` (inferred), as in ``numpy.reshape``.
    """
    target = tuple(int(d) for d in target_shape)
    if sum(d == -1 for d in target) > 1 or any(d == 0 or d < -1 for d in target):
        raise ValueError(
            f"Reshape: target_shape must hold positive sizes and at most one -1, got {target}"
        )

    def forward(params, state, x, *, key=None, train=False):
        check_rank(x, "Reshape", min_rank=1, layout="(batch, ...)")
        size = math.prod(x.shape[1:])
        known = math.prod(d for d in target if d != -1)
        if (-1 in target and size % known) or (-1 not in target and size != known):
            raise ValueError(
                f"{where('Reshape')}: cannot reshape examples of shape {tuple(x.shape[1:])} "
                f"({size} values) to {target}"
            )
        return x.reshape(x.shape[0], *target), state

    return Layer(name or "reshape", _no_params, forward, spec=f"Reshape({target})",
                 explicit_name=name is not None)
