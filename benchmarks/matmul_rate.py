"""The machine's float32 matmul rate, measured with JAX (the ceiling the table compares with).

* ``square``: one ``(n, n) @ (n, n)`` product, ``2 n^3`` FLOPs, jitted; timed
  ``repeats`` times after one untimed call (the compile).
* ``small``: the MLP's shapes, ``(b, 784) @ (784, 64)`` (first layer forward) and
  ``x^T @ dh`` with ``x: (b, 784)``, ``dh: (b, 64)`` (its weight gradient, as
  reverse mode computes it: contracting the batch axis of both) for ``b`` = 32
  and 128, run ``count`` times inside one jitted ``lax.scan`` (each product on
  different slices, summed into the carry) so that dispatch costs nothing: the
  best rate a fused MLP epoch could reach on those shapes. (Until 2026-11-29 the
  gradient's line timed ``(784, b) @ (b, 64)`` from an already transposed copy
  of ``x``, a slower layout: 45-48 against 62-77 GFLOP/s at ``b = 32``.)

XLA:CPU runs products this small on one core: pinned to one core
(``taskset -c 0``) the ``b = 32`` forward ran at the same rate (61 GFLOP/s) as
on both, and two independent products in one scan step took twice as long as one.

Each rate is reported from the fastest repeat (``gflop_per_s``: what the machine
can do; other jobs only ever slow a repeat down) and the median one.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def _seconds(fn, args, repeats: int) -> np.ndarray:
    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def square_rate(n: int, repeats: int) -> np.ndarray:
    """FLOP/s of an ``n x n`` float32 matmul, one per repeat."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    return 2 * n**3 / _seconds(jax.jit(jnp.matmul), (a, b), repeats)


def scanned_rate(m: int, k: int, n: int, count: int, repeats: int) -> np.ndarray:
    """FLOP/s of ``count`` products ``(m, k) @ (k, n)`` inside one compiled scan, per repeat."""
    ka, kb = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(ka, (count, m, k), jnp.float32)
    w = jax.random.normal(kb, (k, n), jnp.float32)

    @jax.jit
    def run(xs, w):
        def body(total, x):
            return total + x @ w, None

        total, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32), xs)
        return total

    return 2 * m * k * n * count / _seconds(run, (xs, w), repeats)


def gradient_rate(b: int, k: int, n: int, count: int, repeats: int) -> np.ndarray:
    """FLOP/s of ``count`` weight gradients ``x^T @ dh`` (``x: (b, k)``, ``dh: (b, n)``)
    inside one compiled scan, per repeat."""
    ka, kb = jax.random.split(jax.random.key(2))
    xs = jax.random.normal(ka, (count, b, k), jnp.float32)
    dhs = jax.random.normal(kb, (count, b, n), jnp.float32)

    @jax.jit
    def run(xs, dhs):
        def body(total, pair):
            x, dh = pair
            return total + x.T @ dh, None

        total, _ = jax.lax.scan(body, jnp.zeros((k, n), jnp.float32), (xs, dhs))
        return total

    return 2 * b * k * n * count / _seconds(run, (xs, dhs), repeats)


def measure(square: int = 4096, count: int = 1000, repeats: int = 3) -> dict:
    """All the rates in GFLOP/s (best and median repeat), with the shapes measured."""
    rates = {f"square_{square}": square_rate(square, repeats) / 1e9}
    for b in (32, 128):
        rates[f"mlp_fwd_{b}x784x64"] = scanned_rate(b, 784, 64, count, repeats) / 1e9
        rates[f"mlp_wgrad_784x{b}x64"] = gradient_rate(b, 784, 64, count, repeats) / 1e9
    return {
        "gflop_per_s": {k: float(v.max()) for k, v in rates.items()},
        "gflop_per_s_median": {k: float(np.median(v)) for k, v in rates.items()},
        "peak_key": f"square_{square}",
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "config": {"square": square, "count": count, "repeats": repeats},
    }
