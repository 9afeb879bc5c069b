"""Data parallelism for ``fit``: a 1-D device mesh and its two shardings.

The model's parameters, state and optimizer state are replicated on every
device of the mesh; each step's batch is split along its leading (example)
axis over the mesh axis ``"data"``. The training program itself is unchanged:
XLA's SPMD partitioner splits the forward and backward passes by the batch and
inserts the all-reduce that sums the gradient over the devices, so the result
is the single-device result up to the order of float additions.
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

    def put(self, tree: Any) -> Any:
        """``tree`` copied onto every device of the mesh (a no-op for arrays already there)."""
        return jax.device_put(tree, self.replicated)

    def step(self, step: Callable) -> Callable:
        """``step(carry, (x, y, weights, key))`` with the batch split over the devices
        and the new carry kept replicated (constraints for XLA's partitioner)."""

        def sharded_step(carry, batch):
            x, y, weights, key = batch
            x, y, weights = jax.lax.with_sharding_constraint((x, y, weights), self.batch)
            carry, sums = step(carry, (x, y, weights, key))
            return jax.lax.with_sharding_constraint(carry, self.replicated), sums

        return sharded_step

    def on_first_device(self, fn: Callable) -> Callable:
        """``fn`` called with its array arguments taken to the mesh's first device
        (its own copy of replicated values), so it runs there alone."""
        first = self.mesh.devices.flat[0]
        return lambda *args: fn(*jax.device_put(args, first))


def data_parallel(devices: int | Sequence[jax.Device] | None) -> DataParallel | None:
    """The mesh for ``fit(devices=...)``, or None for the plain single-device path.

    ``None`` and ``1`` mean the default device (no sharding at all); an integer
    ``N`` means the first ``N`` of ``jax.devices()``; a sequence means those
    devices, in that order (a sequence holding just ``jax.devices()[0]`` is the
    plain path too).
    """
    if devices is None:
        return None
    available = jax.devices()
    if isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        count = int(devices)
        if count < 1:
            raise ValueError(f"devices must be a positive integer, a sequence of jax devices "
                             f"or None, got {devices!r}")
        if count > len(available):
            raise ValueError(
                f"devices={count} but only {len(available)} device(s) available "
                f"({', '.join(str(d) for d in available)}); {_FORCE_HINT}"
            )
        if count == 1:
            return None
        chosen = list(available[:count])
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
        if chosen == [available[0]]:
            return None
    else:
        raise TypeError(f"devices must be None, a positive integer or a sequence of jax "
                        f"devices, got {devices!r}")
    mesh = Mesh(np.array(chosen, dtype=object), (DATA_AXIS,))
    return DataParallel(mesh, NamedSharding(mesh, PartitionSpec()),
                        NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


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
