"""The training and inference loops shared by the JAX peers (plain JAX, Flax NNX, Equinox).

Written the way JAX tutorials write them: the dataset goes on the device once;
each epoch draws a permutation, gathers the shuffled arrays, and a Python loop
slices batch after batch from them and calls the jitted train step, which
returns the new state and the loss. The ragged last batch is dropped (a
different shape would compile the step again), so an epoch trains on
``(n // batch) * batch`` samples, and that is the count the figures use.
Nothing waits for the device inside an epoch; the end of each epoch does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import time_passes

Step = Callable[[Any, jax.Array, jax.Array, int], tuple[Any, jax.Array]]


def train(step: Step, state: Any, x: np.ndarray, y: np.ndarray, batch: int, epochs: int,
          seed: int) -> tuple[Any, list[float], int, float]:
    """Run ``epochs`` epochs of ``state, loss = step(state, xb, yb, i)``.

    Returns ``(state, seconds per epoch, samples per epoch, wall seconds)``; the
    wall time counts putting the data on the device.
    """
    start_all = time.perf_counter()
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = x.shape[0]
    steps = n // batch
    key = jax.random.key(seed)
    seconds = []
    i = 0
    for _ in range(epochs):
        start = time.perf_counter()
        key, shuffle_key = jax.random.split(key)
        perm = jax.random.permutation(shuffle_key, n)
        xs, ys = x[perm], y[perm]
        loss = None
        for b in range(steps):
            state, loss = step(state, xs[b * batch:(b + 1) * batch],
                               ys[b * batch:(b + 1) * batch], i)
            i += 1
        jax.block_until_ready(loss)
        jax.block_until_ready(jax.tree_util.tree_leaves(state))
        seconds.append(time.perf_counter() - start)
    return state, seconds, steps * batch, time.perf_counter() - start_all


def infer(predict: Callable[[jax.Array], jax.Array], x: np.ndarray, batch: int,
          repeats: int) -> tuple[float, list[float]]:
    """Time ``predict`` over ``x`` in batches (a Python loop; the last batch may be short).

    Returns ``(first pass seconds, timed pass seconds)``.
    """
    x = jnp.asarray(x)
    starts = range(0, x.shape[0], batch)

    def run():
        outputs = [predict(x[s:s + batch]) for s in starts]
        jax.block_until_ready(outputs)

    return time_passes(run, repeats)
