"""Data parallelism for ``fit``: a 1-D device mesh and its two shardings.

The model's parameters, state and optimizer state are replicated on every
device of the mesh (or split over them: :mod:`jaxnn._param_sharding`); each
step's batch is split along its leading (example) axis over the mesh axis
``"data"``. The training program itself is unchanged:
XLA's SPMD partitioner splits the forward and backward passes by the batch and
inserts the all-reduce that sums the gradient over the devices, so the result
is the single-device result up to the order of float additions.

In a run of several processes (after ``jax.distributed.initialize``) the mesh
spans the devices of every process, each process's devices side by side, and
each process holds its own columns of every batch (:meth:`DataParallel.columns`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

_FORCE_HINT = ("to get N CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count=N "
               "in the environment before jax is imported")


class DataParallel(NamedTuple):
    """A 1-D mesh over ``devices`` with the axis ``"data"``, and the two shardings used.

    Attributes:
      mesh: ``Mesh(devices, ("data",))``.
      replicated: ``NamedSharding(mesh, P())``, a full copy on every device
        (parameters, state, optimizer state, the dataset, the epoch plan).
      batch: ``NamedSharding(mesh, P("data"))``, the leading axis split in equal
        parts over the devices (each step's batch).
    """

    mesh: Mesh
    replicated: NamedSharding
    batch: NamedSharding

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def spans_processes(self) -> bool:
        """Whether the mesh holds devices of more than one process."""
        return len({d.process_index for d in self.mesh.devices.flat}) > 1

    def columns(self, batch_size: int) -> slice:
        """The examples of each batch that this process's devices hold: all of them
        in one process; over several, the part at its devices' place in the mesh
        (``[p * B / P, (p + 1) * B / P)`` for ``P`` processes of equal device counts)."""
        places = [i for i, d in enumerate(self.mesh.devices.flat)
                  if d.process_index == jax.process_index()]
        per_device = batch_size // self.size
        return slice(places[0] * per_device, (places[-1] + 1) * per_device)

    def local_copy(self, tree: Any) -> Any:
        """A copy of ``tree`` on one device of this process (the mesh's first there):
        over several processes, each process's own copy. Arrays split over the mesh
        (``fit(shard_params=...)``) are gathered first; over several processes that
        is a collective, which every process calls."""
        here = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        split = [a for a in jax.tree_util.tree_leaves(tree)
                 if isinstance(a, jax.Array) and not a.is_fully_addressable
                 and not a.sharding.is_fully_replicated]
        if split:
            tree = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)

        def local(a):
            if isinstance(a, jax.Array) and not a.is_fully_addressable:
                a = a.addressable_data(0)  # replicated: this shard is the whole value
            return jax.device_put(a, here[0])

        return jax.tree_util.tree_map(local, tree)

    def put(self, tree: Any, shardings: Any = None) -> Any:
        """``tree`` copied onto the mesh: onto every device, or with ``shardings``
        (a sharding per leaf, or one for all); a no-op for arrays already there."""
        return jax.device_put(tree, self.replicated if shardings is None else shardings)

    def step(self, step: Callable, carry_shardings: Any = None) -> Callable:
        """``step(carry, (x, y, weights, key))`` with the batch split over the devices
        and the new carry kept replicated, or with ``carry_shardings`` (constraints
        for XLA's partitioner)."""
        kept = self.replicated if carry_shardings is None else carry_shardings

        def sharded_step(carry, batch):
            x, y, weights, key = batch
            x, y, weights = jax.lax.with_sharding_constraint((x, y, weights), self.batch)
            carry, sums = step(carry, (x, y, weights, key))
            return jax.lax.with_sharding_constraint(carry, kept), sums

        return sharded_step

    def on_first_device(self, fn: Callable) -> Callable:
        """``fn`` called with its array arguments taken to the mesh's first device in
        this process (its own copy of replicated values), so it runs there alone."""
        return lambda *args: fn(*self.local_copy(args))


def data_parallel(devices: int | str | Sequence[jax.Device] | None) -> DataParallel | None:
    """The mesh for ``fit(devices=...)``, or None for the plain single-device path.

    ``None`` and ``1`` mean the default device (no sharding at all); ``"all"``
    every device (of every process); an integer ``N`` the first ``N`` of
    ``jax.devices()``; a sequence those devices, in that order (a sequence
    holding just ``jax.devices()[0]`` is the plain path too).

    In a run of several processes the mesh must span all of them: ``"all"``,
    ``N = jax.device_count()`` or a sequence holding devices of every process
    (each process's side by side, the same sequence in every process).
    """
    processes = jax.process_count()
    if devices is None:
        if processes > 1:
            raise ValueError(_several_processes("devices=None"))
        return None
    available = jax.devices()
    if isinstance(devices, str) and devices == "all":
        if len(available) == 1:
            return None
        chosen = _by_process(available)
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        count = int(devices)
        if count < 1:
            raise ValueError(f"devices must be a positive integer, a sequence of jax devices, "
                             f"'all' or None, got {devices!r}")
        if count > len(available):
            raise ValueError(
                f"devices={count} but only {len(available)} device(s) available "
                f"({', '.join(str(d) for d in available)}); {_FORCE_HINT}"
            )
        if processes > 1 and count != len(available):
            raise ValueError(_several_processes(f"devices={count}"))
        if count == 1:
            return None
        chosen = _by_process(available[:count])
    elif isinstance(devices, Sequence) and not isinstance(devices, str | bytes):
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices is an empty sequence; pass jax devices (e.g. "
                             "jax.devices()[:2]), a device count, or None for one device")
        for i, device in enumerate(chosen):
            if not isinstance(device, jax.Device):
                raise TypeError(f"devices[{i}] must be a jax.Device (an item of "
                                f"jax.devices()), got {device!r} of type "
                                f"{type(device).__name__}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"devices lists a device more than once: {chosen}")
        if processes > 1:
            _check_spans_processes(chosen, processes)
        elif chosen == [available[0]]:
            return None
    else:
        raise TypeError(f"devices must be None, a positive integer, 'all' or a sequence of "
                        f"jax devices, got {devices!r}")
    mesh = Mesh(np.array(chosen, dtype=object), (DATA_AXIS,))
    return DataParallel(mesh, NamedSharding(mesh, PartitionSpec()),
                        NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def _several_processes(given: str) -> str:
    return (f"{given} in a run of {jax.process_count()} processes (this is process "
            f"{jax.process_index()}, after jax.distributed.initialize): every process trains "
            f"the same model, so fit's devices must span them all; pass devices='all' (the "
            f"{jax.device_count()} devices of all processes)")


def _by_process(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """``devices`` with each process's side by side (in their order within a process),
    so that each process holds one contiguous part of every batch."""
    return sorted(devices, key=lambda d: d.process_index)


def _check_spans_processes(devices: Sequence[jax.Device], processes: int) -> None:
    """Raise unless ``devices`` hold devices of every process, each process's side by side."""
    order = [d.process_index for d in devices]
    missing = sorted(set(range(processes)) - set(order))
    if missing:
        raise ValueError(f"devices holds no device of process(es) {missing}; in a run of "
                         f"{processes} processes every process takes part (devices='all' "
                         f"takes every device)")
    runs = [p for i, p in enumerate(order) if i == 0 or p != order[i - 1]]
    if len(runs) != len(set(runs)):
        raise ValueError(f"devices interleaves processes (process of each device: {order}); "
                         f"list each process's devices side by side, each process then holds "
                         f"one contiguous part of every batch")


def check_batch_size(batch_size: int, count: int, n: int) -> None:
    """Raise unless ``batch_size`` splits evenly over ``count`` devices (``n``: the
    number of training examples, which caps the batch size)."""
    if batch_size % count:
        capped = f" (capped at the {n} training examples)" if batch_size == n else ""
        raise ValueError(
            f"batch_size={batch_size}{capped} is not divisible by the {count} devices given "
            f"as devices=: each device takes an equal part of every batch; choose a batch "
            f"size that is a multiple of {count}"
        )
