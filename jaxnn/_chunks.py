"""The plan of an epoch and the compiled programs that run its steps in chunks.

An epoch's plan (:func:`epoch_plan`) is drawn from ``fold_in(key, epoch)``: which
examples each step takes, their weights (0 for the padding of a short last
batch) and a dropout key per step. :class:`ChunkRunner` runs a chunk of steps as
one compiled program, with the batches gathered on the device from a resident
dataset or handed over already stacked from the host (:mod:`jaxnn._sources`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn._steps import take
from jaxnn._typing import Params, PRNGKey
from jaxnn.layers._base import Layer


def _epoch_plan(n: int, batch_size: int, key: PRNGKey, shuffle: bool):
    """Indices ``(steps, batch)`` and weights ``(steps, batch)`` for one epoch."""
    steps = math.ceil(n / batch_size)
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    pad = steps * batch_size - n
    order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    weights = (jnp.arange(steps * batch_size) < n).astype(jnp.float32)
    return order.reshape(steps, batch_size), weights.reshape(steps, batch_size)


def epoch_plan(key: PRNGKey, n: int, batch_size: int, shuffle: bool = True):
    """The plan of one epoch from its key: ``(indices, weights, step_keys)``.

    ``indices`` and ``weights`` are ``(steps, batch_size)`` (padded rows weigh 0);
    ``step_keys`` holds one dropout key per step. The same key gives the same
    plan, which is what makes a resumed run repeat an uninterrupted one.
    """
    shuffle_key, dropout_key = jax.random.split(key)
    idx, weights = _epoch_plan(n, batch_size, shuffle_key, shuffle)
    return idx, weights, jax.random.split(dropout_key, idx.shape[0])


def scan_steps(step, carry, data, plan, *, straight_line: bool = False, unroll: int = 1):
    """Run ``step`` over the batches of ``plan``, gathering each batch from the
    device-resident ``data = (x, y)``; returns the carry and the summed per-step logs.

    A rolled ``lax.scan`` running ``unroll`` steps per loop iteration by default;
    ``straight_line=True`` writes the steps out as straight-line code instead
    (XLA:CPU runs convolutions slower inside a loop than outside one, even a loop
    of one step).
    """

    def body(carry, batch):
        idx, weights, key = batch
        x, y = take(data, idx)
        return step(carry, (x, y, weights, key))

    if not straight_line:
        carry, sums = jax.lax.scan(body, carry, plan, unroll=unroll)
        return carry, jax.tree_util.tree_map(jnp.sum, sums)
    totals = None
    for i in range(plan[0].shape[0]):
        carry, sums = body(carry, jax.tree_util.tree_map(lambda a, i=i: a[i], plan))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return carry, totals


# On CPU, a model with a convolution runs this many straight-line steps per call by
# default: XLA:CPU runs a convolution slower inside a loop (RESULTS.md, "steps per call").
CONV_STEPS_PER_CALL_ON_CPU = 4


def _has_convolution(jaxpr) -> bool:
    """Whether a jaxpr (or any jaxpr nested in its equations) holds a convolution."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(inner, "eqns") and _has_convolution(inner):
                    return True
    return False


def default_steps_per_call(model: Layer, params, state, x, batch_size: int) -> int | None:
    """``steps_per_call`` when the caller left it to ``fit``: see CONV_STEPS_PER_CALL_ON_CPU."""
    if jax.default_backend() != "cpu":
        return None
    batch = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((batch_size, *np.shape(a)[1:]), jnp.result_type(a)), x)
    jaxpr = jax.make_jaxpr(lambda p, s, xb: model.apply_with_state(p, s, xb, train=False))(
        params, state, batch)
    return CONV_STEPS_PER_CALL_ON_CPU if _has_convolution(jaxpr.jaxpr) else None


# A loop runs this many steps per iteration when a step is small (about 2 * batch *
# parameters FLOPs under _SMALL_STEP_FLOPS) and an epoch long (at least
# _UNROLL_MIN_STEPS steps): faster per step, for about twice the compile time, which
# only a long epoch earns back (RESULTS.md).
_SMALL_STEP_UNROLL = 2
_SMALL_STEP_FLOPS = 8e6
_UNROLL_MIN_STEPS = 1024


def epoch_unroll(params: Params, batch_size: int, steps: int | None) -> int:
    """Steps per loop iteration for a model with ``params`` at ``batch_size``, over
    epochs of ``steps`` steps (None: not known ahead)."""
    count = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    small = 2 * batch_size * count < _SMALL_STEP_FLOPS
    return _SMALL_STEP_UNROLL if small and (steps or 0) >= _UNROLL_MIN_STEPS else 1


def run_steps(step, carry, sums, batch_at, count, *, length=None, unroll=1):
    """Run ``count`` steps of ``step`` from ``carry``, adding their logs to ``sums``.

    ``batch_at(i)`` gives step ``i``'s batch ``(x, y, weights, key)``. With a static
    ``length`` the steps are written out straight-line (``count`` is ignored);
    otherwise ``count`` may be traced: one compiled loop serves every chunk length,
    ``unroll`` steps per iteration and a second loop for the rest.
    """

    def add(sums, new):
        return jax.tree_util.tree_map(jnp.add, sums, new)

    if length is not None:
        for i in range(length):
            carry, new = step(carry, batch_at(i))
            sums = add(sums, new)
        return carry, sums

    def unrolled(i, acc):
        carry, sums = acc
        for j in range(unroll):
            carry, new = step(carry, batch_at(i * unroll + j))
            sums = add(sums, new)
        return carry, sums

    def single(i, acc):
        carry, new = step(acc[0], batch_at(i))
        return carry, add(acc[1], new)

    acc = jax.lax.fori_loop(0, count // unroll, unrolled, (carry, sums))
    if unroll > 1:
        acc = jax.lax.fori_loop(count // unroll * unroll, count, single, acc)
    return acc


def _batch(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


class Chunk(NamedTuple):
    """One compiled call's worth of steps.

    ``kind`` is ``"gathered"`` (``args = (data, idx, weights, keys, start)``: the
    batches are taken from the device-resident ``data`` by the epoch's plan from
    step ``start`` on) or ``"stacked"`` (``args = (xs, ys, weights, keys)``, each
    with a leading axis of steps). ``count`` steps run; ``length`` is the static
    step count of a straight-line program (None: a loop over ``count``).
    """

    kind: str
    args: tuple
    count: int
    length: int | None = None


def _gathered(step, carry, sums, data, idx, weights, keys, start, count, length, unroll):
    def batch_at(i):
        j = start + i
        return (*take(data, idx[j]), weights[j], keys[j])

    carry, sums = run_steps(step, carry, sums, batch_at, count, length=length, unroll=unroll)
    return carry, sums, start + count


def _stacked(step, carry, sums, xs, ys, weights, keys, count, length, unroll):
    def batch_at(i):
        return _batch(xs, i), _batch(ys, i), weights[i], keys[i]

    carry, sums = run_steps(step, carry, sums, batch_at, count, length=length, unroll=unroll)
    return carry, sums, count


class ChunkRunner:
    """The compiled programs of one ``fit`` call, and the loop that runs an
    epoch's chunks through them, carrying ``(params, state, opt_state)``.

    ``steps`` maps a variant name to its step (``"fast"`` trains, ``"halting"``
    replays an epoch to find its first NaN/inf); each (kind, variant, length)
    compiles once, ahead of its first run, and the time is added to
    ``compile_seconds``. At most two chunks are queued on the device at a time.
    """

    def __init__(self, steps: dict[str, Callable], *, unroll: int = 1,
                 wait_each_call: bool = False, replicated=None):
        self.steps = steps
        self.unroll = unroll
        # Over several CPU devices each call finishes before the next is dispatched:
        # with calls queued ahead, XLA:CPU's all-reduce could deadlock (RESULTS.md).
        self.wait_each_call = wait_each_call
        self.replicated = replicated  # the carry's sharding over several devices
        self.compile_seconds = 0.0
        self._compiled: dict[tuple, Any] = {}
        self._zeros: dict[tuple, Any] = {}
        self._jitted = {
            kind: jax.jit(fn, static_argnums=(0,), static_argnames=("length", "unroll"),
                          donate_argnums=(1, 2))
            for kind, fn in (("gathered", _gathered), ("stacked", _stacked))
        }

    def _program(self, chunk: Chunk, variant: str, carry, sums):
        key = (chunk.kind, variant, chunk.length)
        program = self._compiled.get(key)
        if program is None:
            start = time.perf_counter()
            program = self._jitted[chunk.kind].lower(
                self.steps[variant], carry, sums, *chunk.args, jnp.int32(chunk.count),
                length=chunk.length, unroll=self.unroll).compile()
            self.compile_seconds += time.perf_counter() - start
            self._compiled[key] = program
        return program

    def zero_sums(self, variant, carry, chunk: Chunk):
        """Zeros shaped like one step's logs (traced once per variant and kind)."""
        zeros = self._zeros.get((variant, chunk.kind))
        if zeros is None:
            zeros = self._zeros[variant, chunk.kind] = self._zero_sums(variant, carry, chunk)
        return jax.tree_util.tree_map(jnp.copy, zeros)  # the programs donate their sums

    def _zero_sums(self, variant, carry, chunk: Chunk):
        def struct(a, shape):
            return jax.ShapeDtypeStruct(shape, a.dtype)

        if chunk.kind == "gathered":
            data, idx, weights, keys, _ = chunk.args
            batch = (*jax.tree_util.tree_map(lambda a: struct(a, (idx.shape[1], *a.shape[1:])),
                                             data),
                     struct(weights, weights.shape[1:]), struct(keys, keys.shape[1:]))
        else:
            batch = jax.tree_util.tree_map(lambda a: struct(a, a.shape[1:]), chunk.args)
        shapes = jax.eval_shape(self.steps[variant], carry, batch)[1]
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return zeros if self.replicated is None else jax.device_put(zeros, self.replicated)

    def run(self, variant: str, carry, chunks, on_done=None, on_compiled=None):
        """Run ``chunks`` (an iterable of :class:`Chunk`) from ``carry``: returns
        ``(carry, sums)``, the logs summed over every step.

        ``on_done(steps)`` is called as chunks finish (steps done so far);
        ``on_compiled()`` once the first chunk's program is compiled, before it runs.
        """
        sums, done, pending = None, 0, None
        for chunk in chunks:
            if sums is None:
                sums = self.zero_sums(variant, carry, chunk)
            program = self._program(chunk, variant, carry, sums)
            if on_compiled is not None:
                on_compiled()
                on_compiled = None
            count = jnp.int32(chunk.count)
            # ``marker`` (a step count) is the one output not donated to the next call
            carry, sums, marker = program(carry, sums, *chunk.args, count)
            if self.wait_each_call:
                jax.block_until_ready(marker)
            # Wait for the previous chunk before taking the next: the device then holds
            # at most this chunk, the next one and those prefetched.
            if pending is not None:
                jax.block_until_ready(pending)
                if on_done is not None:
                    on_done(done)
            done += chunk.count
            pending = marker
        if pending is not None and on_done is not None:
            jax.block_until_ready(pending)
            on_done(done)
        return carry, sums
