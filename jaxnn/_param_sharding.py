"""Sharded parameters and optimizer state for ``fit(devices=N, shard_params=...)``.

Over a data-parallel mesh (:mod:`jaxnn._sharding`) the params and the optimizer
state may be split over the devices instead of copied to each (FSDP-style):
each parameter is cut along one of its dimensions over the mesh axis
``"data"``, and each device keeps its part. The step is the same program;
XLA's partitioner gathers a parameter where the forward and backward passes
need it whole and reduce-scatters its gradient, so each device updates only its
part of the params and of the optimizer state.

Which dimension (a :class:`~jax.sharding.PartitionSpec` per parameter):

- by default the largest dimension whose length the device count divides
  (the first of equal ones), e.g. ``P("data", None)`` for a ``(784, 64)``
  kernel over 4 devices; a parameter with no such dimension (a scalar, a bias
  of 10 over 4 devices) is replicated;
- ``shard_params={pattern: spec}`` overrides that for the parameters whose path
  (``"dense_0/kernel"``, as in checkpoints, without ``params/``) matches the
  pattern (:func:`fnmatch.fnmatchcase`: ``*`` also matches ``/``); the first
  matching pattern wins, ``P()`` replicates.

An optimizer-state leaf takes the spec of the parameter it mirrors: the one
whose path ends its own path and whose shape it has (Adam's ``mu`` and ``nu``,
momentum traces); every other leaf (step counts, injected hyperparameters,
factored statistics) is replicated. The model state (BatchNorm statistics) is
replicated.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxnn._sharding import DATA_AXIS, DataParallel


def check_shard_params(shard_params: Any) -> dict[str, PartitionSpec] | None:
    """``fit``'s ``shard_params`` as a table of overrides (``{}``: the default rule
    alone), or None for replicated params."""
    if shard_params is None or shard_params is False:
        return None
    if shard_params is True:
        return {}
    if not isinstance(shard_params, Mapping):
        raise TypeError(f"shard_params must be True, False or a dict from parameter path "
                        f"patterns to PartitionSpecs (e.g. {{'*/kernel': P('data', None)}}), "
                        f"got {shard_params!r}")
    table = {}
    for pattern, spec in shard_params.items():
        if not isinstance(pattern, str):
            raise TypeError(f"shard_params: pattern {pattern!r} must be a string such as "
                            f"'*/kernel' (matched against paths like 'dense_0/kernel')")
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"shard_params[{pattern!r}] must be a jax.sharding.PartitionSpec "
                            f"such as P('data', None) (or P() to replicate), got {spec!r}")
        for axis in spec:
            names = axis if isinstance(axis, tuple) else (axis,)
            if any(name not in (None, DATA_AXIS) for name in names):
                raise ValueError(f"shard_params[{pattern!r}] = {spec} names a mesh axis other "
                                 f"than {DATA_AXIS!r}; fit's mesh has the one axis "
                                 f"{DATA_AXIS!r}")
        table[pattern] = spec
    return table


def _entry(entry: Any) -> str:
    for field in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(entry, field):
            return str(getattr(entry, field))
    return str(entry)


def path_name(path: tuple) -> str:
    """``"dense_0/kernel"`` for the key path of a leaf."""
    return "/".join(_entry(e) for e in path)


def default_spec(shape: tuple[int, ...], count: int) -> PartitionSpec:
    """The largest dimension of ``shape`` that ``count`` divides, over ``"data"``
    (the first of equal lengths); ``P()`` when none does."""
    by_length = sorted(range(len(shape)), key=lambda d: -shape[d])
    for dim in by_length:
        if shape[dim] % count == 0 and shape[dim] >= count:
            return PartitionSpec(*([None] * dim), DATA_AXIS)
    return PartitionSpec()


def _check_spec(name: str, shape: tuple[int, ...], spec: PartitionSpec, count: int,
                pattern: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"shard_params[{pattern!r}] = {spec} has {len(spec)} entries but "
                         f"parameter {name!r} has shape {shape} ({len(shape)} dimensions)")
    for dim, axis in enumerate(spec):
        if axis is not None and shape[dim] % count:
            raise ValueError(f"shard_params[{pattern!r}] = {spec} splits dimension {dim} of "
                             f"parameter {name!r} (shape {shape}, length {shape[dim]}) over "
                             f"{count} devices, which do not divide it; choose another "
                             f"dimension or P() to replicate it")


def param_specs(params: Any, table: Mapping[str, PartitionSpec], count: int) -> Any:
    """A PartitionSpec per leaf of ``params`` over a mesh of ``count`` devices."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(path) for path, _ in leaves]
    used = {pattern: False for pattern in table}
    specs = []
    for name, (_, leaf) in zip(names, leaves):
        shape = tuple(np.shape(leaf))
        for pattern, spec in table.items():
            if fnmatch.fnmatchcase(name, pattern):
                _check_spec(name, shape, spec, count, pattern)
                used[pattern] = True
                break
        else:
            spec = default_spec(shape, count)
        specs.append(spec)
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"shard_params: the pattern(s) {', '.join(map(repr, unused))} match no "
                         f"parameter (the parameters' paths: {shown})")
    return jax.tree_util.tree_unflatten(treedef, specs)


def mirrored_specs(opt_state: Any, params: Any, specs: Any) -> Any:
    """A PartitionSpec per leaf of ``opt_state``: a parameter's spec for a leaf whose
    path ends with that parameter's path and that has its shape, else ``P()``."""
    by_path = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree_util.tree_leaves(
                                      specs, is_leaf=lambda s: isinstance(s, PartitionSpec))):
        by_path[tuple(_entry(e) for e in path)] = (tuple(np.shape(leaf)), spec)

    def spec_of(path, leaf):
        names = tuple(_entry(e) for e in path)
        shape = tuple(np.shape(leaf))
        for start in range(len(names) + 1):
            found = by_path.get(names[start:])
            if found is not None and found[0] == shape:
                return found[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, opt_state)


def carry_shardings(parallel: DataParallel, table: Mapping[str, PartitionSpec] | None,
                    params: Any, state: Any, opt_state: Any) -> Any:
    """The shardings of fit's carry ``(params, state, opt_state)``: one replicated
    sharding for all without ``table``; else a NamedSharding per leaf."""
    if table is None:
        return parallel.replicated
    specs = param_specs(params, table, parallel.size)
    opt_specs = mirrored_specs(opt_state, params, specs)

    def named(spec):
        return NamedSharding(parallel.mesh, spec)

    def to_shardings(tree):
        return jax.tree_util.tree_map(named, tree,
                                      is_leaf=lambda s: isinstance(s, PartitionSpec))

    state_shardings = jax.tree_util.tree_map(lambda _: parallel.replicated, state)
    return to_shardings(specs), state_shardings, to_shardings(opt_specs)
