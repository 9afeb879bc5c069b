"""Where ``fit``'s batches come from: a data source, turned into chunks of steps.

Three kinds of source, one interface (``chunks(epoch, key)`` yields
:class:`jaxnn._chunks.Chunk` s for :class:`jaxnn._chunks.ChunkRunner`):

- :class:`ResidentArrays`: arrays put on the device once; each chunk gathers
  its batches there by the epoch's plan (nothing crosses from the host).
- :class:`HostExamples`: examples that stay on the host (numpy arrays, memmaps,
  random-access sources such as ``tfds.data_source``), read a chunk of batches
  at a time in the order of the same plan and copied to the device on a
  background thread while the previous chunk trains.
- :class:`BatchStream`: an iterable of ``(x, y)`` batches, taken in its order, a
  chunk at a time, on the same background thread.

The plan of epoch ``e`` (its permutation, padding and dropout keys) comes from
``fold_in(key, e)`` alone, so the host paths train on exactly the batches of the
device path, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxnn import _sharding
from jaxnn._chunks import Chunk, epoch_plan
from jaxnn._fit_checks import check_arrays

# A chunk copied to the device holds about this many bytes of batches (at least one
# step, at most an epoch): big enough that a call's fixed cost is small against its
# steps, small enough that a few chunks are a small part of the device's memory.
CHUNK_BYTES = 8 << 20
# Chunks read and copied ahead of the one training.
PREFETCH = 2


def is_example_source(x: Any) -> bool:
    """Whether ``x`` is a random-access source of examples: ``len(x)`` and ``x[i]``,
    and not an array, a dict, or a list/tuple (a list holds batches)."""
    return (hasattr(x, "__len__") and hasattr(x, "__getitem__")
            and not isinstance(x, list | tuple | dict | np.ndarray | jax.Array))


def chunk_steps_for(batch_bytes: int, steps: int | None) -> int:
    """Steps per host chunk: about :data:`CHUNK_BYTES` of batches, within ``[1, steps]``."""
    k = max(1, CHUNK_BYTES // max(batch_bytes, 1))
    return k if steps is None else max(1, min(k, steps))


def _nbytes(tree) -> int:
    return sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(tree))


class _Placement:
    """Where chunks go: the default device, or split by their batch axis over a mesh.

    Over the devices of several processes each process holds only its columns of
    every batch (``parallel.columns``); the chunk is assembled from every
    process's part, and ``batch_size`` is then the whole batch's size.
    """

    def __init__(self, parallel: _sharding.DataParallel | None, batch_size: int | None = None):
        self.parallel, self.batch_size = parallel, batch_size
        if parallel is not None:
            self.stacked = NamedSharding(parallel.mesh, PartitionSpec(None, _sharding.DATA_AXIS))

    def put(self, xs, ys, weights, keys):
        if self.parallel is None:
            return jax.device_put((xs, ys, weights)) + (keys,)
        if self.parallel.spans_processes:  # the step keys are replicated already
            def whole(a):
                shape = (a.shape[0], self.batch_size, *a.shape[2:])
                return jax.make_array_from_process_local_data(self.stacked, a, shape)

            return jax.tree_util.tree_map(whole, (xs, ys, weights)) + (keys,)
        # Each device receives only its part of every batch.
        return jax.device_put((xs, ys, weights), self.stacked) + (
            jax.device_put(keys, self.parallel.replicated),)


class _Plans:
    """The epoch plans of ``n`` examples (compiled once), with the step keys padded
    to whole chunks of ``chunk`` steps."""

    def __init__(self, n, batch_size, shuffle, chunk, parallel):
        self.steps = math.ceil(n / batch_size)
        padded = math.ceil(self.steps / chunk) * chunk
        shardings = {} if parallel is None else {"out_shardings": parallel.replicated}

        def plan(key):
            idx, weights, keys = epoch_plan(key, n, batch_size, shuffle)
            keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - self.steps, axis=0)])
            return idx, weights, keys

        self._plan = jax.jit(plan, **shardings)
        self._compiled = None
        self.compile_seconds = 0.0
        self.keys_of_chunk = jax.jit(
            lambda keys, start, size: jax.lax.dynamic_slice_in_dim(keys, start, size),
            static_argnums=(2,))


    def plan(self, key):
        """``(indices, weights, step_keys)`` of the epoch of ``key`` (compiled once, timed)."""
        if self._compiled is None:
            start = time.perf_counter()
            self._compiled = self._plan.lower(key).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled(key)


class ResidentArrays:
    """Arrays on the device; a chunk gathers its batches there by the epoch's plan.

    With ``parallel`` (``fit(devices=N, feed="device")``) every device holds a copy.
    """

    def __init__(self, x, y, batch_size, shuffle, chunk, straight_line, parallel=None):
        self.n = jax.tree_util.tree_leaves(x)[0].shape[0]
        self.batch_size = batch_size
        self.chunk, self.straight_line = chunk, straight_line
        self.data = (jax.tree_util.tree_map(jnp.asarray, (x, y)) if parallel is None
                     else parallel.put((x, y)))
        self.plans = _Plans(self.n, batch_size, shuffle, 1, parallel)
        self.steps = self.plans.steps

    @property
    def compile_seconds(self) -> float:
        return self.plans.compile_seconds

    def chunks(self, epoch: int, key) -> Iterator[Chunk]:
        idx, weights, keys = self.plans.plan(key)
        for start in range(0, self.steps, self.chunk):
            count = min(self.chunk, self.steps - start)
            yield Chunk("gathered", (self.data, idx, weights, keys, jnp.int32(start)), count,
                        count if self.straight_line else None)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data starts on an ``align``-byte boundary: on CPU,
    ``jax.device_put`` then uses the buffer as it is (a copy otherwise; numpy's own
    allocations are 16-byte aligned)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def take_rows(tree, rows, size: int):
    """The examples ``rows`` of host arrays, in new arrays of ``size >= len(rows)`` rows
    (the rest zeros). One copy: ``jax.device_put`` then takes the arrays without
    copying them again (on CPU, where the buffers are aligned)."""

    def take(a):
        out = aligned_empty((size, *a.shape[1:]), a.dtype)
        # mode="clip": the rows are in range, and "raise" would copy through a buffer
        np.take(a, rows, axis=0, out=out[:len(rows)], mode="clip")
        out[len(rows):] = 0
        return out

    return jax.tree_util.tree_map(take, tree)


def _stack(items, size: int | None = None):
    """``items`` stacked on a new leading axis, in aligned arrays of ``size`` rows
    (the rest zeros; default ``len(items)``)."""
    size = len(items) if size is None else size

    def stack(*leaves):
        first = np.asarray(leaves[0])
        out = aligned_empty((size, *first.shape), first.dtype)
        if first.ndim == 0:  # scalars (labels): numpy converts the list in one pass
            out[:len(leaves)] = np.asarray(leaves, first.dtype)
        else:  # one concatenation into the output, faster than np.stack's per-item views
            np.concatenate(leaves, axis=0,
                           out=out[:len(leaves)].reshape(-1, *first.shape[1:]))
        out[len(leaves):] = 0
        return out

    if isinstance(items[0], np.ndarray | np.generic | int | float):
        return stack(*items)
    return jax.tree_util.tree_map(stack, *items)


def read_source(source, rows: np.ndarray, size: int | None = None, name: str = "x"):
    """The examples ``rows`` of a random-access ``source``, stacked: ``(xb, yb)``, with
    zero rows up to ``size``. ``source.__getitems__`` reads them in one call when the
    source has it."""
    getitems = getattr(source, "__getitems__", None)
    items = (getitems(rows.tolist()) if getitems is not None
             else [source[int(i)] for i in rows])
    first = items[0] if len(items) else None
    if not (isinstance(first, tuple | list) and len(first) == 2):
        raise TypeError(f"{name}: a source's items must be (x, y) pairs of one example each, "
                        f"got {type(first).__name__} for item {int(rows[0])}; map the source, "
                        f"e.g. with jaxnn.datasets.tfds_source, or wrap it in a class whose "
                        f"__getitem__ returns (x, y)")
    return _stack([item[0] for item in items], size), _stack([item[1] for item in items], size)


def label_check(classes: int | None, name: str):
    """``check(y, rows)``: integer labels outside ``[0, classes)`` are an error naming
    the example (checked chunk by chunk, for data not checked as a whole)."""

    def check(y, rows):
        if classes is None or isinstance(y, dict) or not np.issubdtype(y.dtype, np.integer):
            return
        if rows is not None:
            y = y[:len(rows)]  # the rest is padding
        bad = (y < 0) | (y >= classes)
        if bad.any():
            at = np.unravel_index(int(np.argmax(bad)), y.shape)
            where = (f"example {int(rows[at[0]])}" if rows is not None
                     else f"row {at[0]} of a batch")
            raise ValueError(f"{name}: label {int(y[at])} at {where} is outside the model's "
                             f"{classes} classes (labels must be integers in [0, {classes}))")

    return check


def _pad_steps(tree, steps: int):
    """``tree`` (leading axis: steps) padded with zeros to ``steps`` steps."""
    def pad(a):
        extra = steps - a.shape[0]
        return a if extra == 0 else np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])

    return jax.tree_util.tree_map(pad, tree)


class HostExamples:
    """Examples on the host, read a chunk at a time by the epoch's plan and copied
    to the device ahead of use. ``read(rows) -> (xb, yb)`` gives the examples
    ``rows`` (an array of indices) as numpy arrays. Over several processes each
    reads only its own columns of every batch."""

    def __init__(self, read: Callable, n: int, example_bytes: int, batch_size: int,
                 shuffle: bool, straight_line_steps: int | None, parallel=None,
                 check_labels: Callable | None = None):
        self.read, self.n, self.batch_size = read, n, batch_size
        steps = math.ceil(n / batch_size)
        self.straight_line = straight_line_steps is not None
        self.chunk = (min(straight_line_steps, steps) if self.straight_line
                      else chunk_steps_for(example_bytes * batch_size, steps))
        self.plans = _Plans(n, batch_size, shuffle, self.chunk, parallel)
        self.steps = self.plans.steps
        self.placement = _Placement(parallel, batch_size)
        self.columns = slice(None) if parallel is None else parallel.columns(batch_size)
        self.check_labels = check_labels

    def _produce(self, key) -> Iterator[Chunk]:
        idx, weights, keys = self.plans.plan(key)
        # this process's columns of every batch (all of them in a single process)
        idx, weights = np.asarray(idx)[:, self.columns], np.asarray(weights)[:, self.columns]
        batch = idx.shape[1]
        for start in range(0, self.steps, self.chunk):
            count = min(self.chunk, self.steps - start)
            size = count if self.straight_line else self.chunk  # steps in the program
            rows = idx[start:start + count].reshape(-1)
            xb, yb = self.read(rows, size * batch)
            if self.check_labels is not None:
                self.check_labels(yb, rows)
            xs, ys = jax.tree_util.tree_map(
                lambda a, size=size: a.reshape(size, batch, *a.shape[1:]), (xb, yb))
            ws = _pad_steps(weights[start:start + count], size)
            args = self.placement.put(xs, ys, ws, self.plans.keys_of_chunk(keys, start, size))
            yield Chunk("stacked", args, count, count if self.straight_line else None)

    @property
    def compile_seconds(self) -> float:
        return self.plans.compile_seconds

    def chunks(self, epoch: int, key) -> Iterator[Chunk]:
        return prefetched(self._produce(key))


class BatchStream:
    """An iterable of ``(x, y)`` batches (``batches_for(epoch)`` gives the epoch's),
    in its order; step ``i`` of an epoch uses the dropout key ``fold_in(key, i)``.
    Batches smaller than the first are padded to its size with rows of weight 0."""

    steps = None  # not known ahead
    compile_seconds = 0.0

    def __init__(self, batches_for: Callable[[int], Iterable], configure: Callable,
                 parallel=None):
        self.batches_for = batches_for
        # configure(x_batch, size) -> (straight-line steps or None, label check), at the
        # first batch: what fit needs to know of the data before the first chunk.
        self.configure = configure
        self.placement = _Placement(parallel)
        self.parallel = parallel
        self.check_labels: Callable | None = None
        self.straight_line_steps: int | None = None
        self.batch_size: int | None = None  # the first batch's size, kept for every epoch
        self.chunk: int | None = None
        self._keys = jax.jit(lambda key, start, size: jax.vmap(
            lambda i: jax.random.fold_in(key, i))(start + jnp.arange(size)), static_argnums=(2,))

    def steps_of(self, epoch_batches) -> int | None:
        try:
            return len(epoch_batches)
        except TypeError:
            return None

    def _batch(self, index, xb, yb):
        m = check_arrays(xb, yb, f"batch {index} x", f"batch {index} y")
        if self.batch_size is None:
            if self.parallel is not None:
                _sharding.check_batch_size(m, self.parallel.size, m)
            self.straight_line_steps, self.check_labels = self.configure(xb, m)
            self.batch_size = m
            self.chunk = (self.straight_line_steps if self.straight_line_steps is not None
                          else chunk_steps_for(_nbytes((xb, yb)), None))
        if m > self.batch_size:
            raise ValueError(f"x (batches, with y=None): no batch may be larger than the first, "
                             f"which had {self.batch_size} examples; batch {index} has {m}. "
                             "Put the largest batch first or use one size")
        if self.check_labels is not None:
            self.check_labels(yb if isinstance(yb, dict) else np.asarray(yb), None)
        weights = (np.arange(self.batch_size) < m).astype(np.float32)
        pad = self.batch_size - m
        xb, yb = jax.tree_util.tree_map(
            lambda a: np.concatenate([np.asarray(a), np.zeros((pad, *np.shape(a)[1:]),
                                                              np.asarray(a).dtype)])
            if pad else np.asarray(a), (xb, yb))
        return xb, yb, weights

    def _produce(self, batches, key) -> Iterator[Chunk]:
        pending, start = [], 0
        for index, pair in enumerate(batches):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"x (batches, with y=None): each batch must be an (x_batch, "
                                f"y_batch) pair; batch {index} is {type(pair).__name__}")
            pending.append(self._batch(index, *pair))
            if len(pending) == self.chunk:
                yield self._chunk(pending, key, start)
                start += len(pending)
                pending = []
        if pending:
            yield self._chunk(pending, key, start)
        elif start == 0:
            raise ValueError("x (batches, with y=None) gave no batch this epoch; pass a list of "
                             "(x_batch, y_batch) pairs, or a function epoch -> iterable that "
                             "returns a fresh, non-empty iterable each time")

    def _chunk(self, batches, key, start):
        count = len(batches)
        straight = self.straight_line_steps is not None
        size = count if straight else self.chunk
        xs, ys, ws = (_stack([b[i] for b in batches], size) for i in range(3))
        args = self.placement.put(xs, ys, ws, self._keys(key, start, size))
        return Chunk("stacked", args, count, count if straight else None)

    def chunks(self, epoch: int, key, batches=None) -> Iterator[Chunk]:
        return prefetched(self._produce(self.batches_for(epoch) if batches is None else batches,
                                        key))


def prefetched(chunks: Iterator[Chunk], depth: int = PREFETCH) -> Iterator[Chunk]:
    """``chunks`` produced on a background thread, ``depth`` ahead of the consumer.

    An error in the producer is raised in the consumer; closing the consumer (or
    an error there, Ctrl-C included) stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    # JAX's context settings are per thread: the producer takes the consumer's.
    x64, device = jax.config.jax_enable_x64, jax.config.jax_default_device

    def produce():
        try:
            with jax.enable_x64(x64), jax.default_device(device):
                for chunk in chunks:
                    if not put(("chunk", chunk)):
                        return
            put(("end", None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(("error", error))

    thread = threading.Thread(target=produce, name="jaxnn-feed", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
