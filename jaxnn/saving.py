"""Save and load a model's parameters in one line each.

::

    jaxnn.save("model.npz", params)                     # or params, state, **extra
    params = jaxnn.load("model.npz").params             # no template needed

The file is a :mod:`jaxnn.checkpoint` file (a plain ``.npz`` with a checksummed
manifest, written atomically), so :func:`load` also reads the checkpoints that
``fit``'s :class:`~jaxnn.callbacks.ModelCheckpoint` writes, and
:func:`~jaxnn.checkpoint.restore_checkpoint` reads what :func:`save` writes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from jaxnn._typing import Params, State
from jaxnn.checkpoint import (
    PathLike,
    _Archive,
    _describe_tree,
    _named_leaves,
    _read_section,
    _restore_section,
    _write_checkpoint,
)

__all__ = ["Saved", "load", "save"]

_EXTRA = "extra"


@dataclasses.dataclass(frozen=True)
class Saved:
    """What :func:`load` returns.

    Attributes:
      params: the parameters, as saved (nested dicts, lists and tuples of
        ``jax.Array``, same dtypes and bits), or in the template's structure.
      state: the model state as saved, or ``None`` when none was saved.
      extra: the extras passed to :func:`save` by name (arrays as
        ``jax.Array``, the rest as JSON gives it back: tuples become lists);
        for a training checkpoint, its metadata.
      path: the file read.
    """

    params: Params
    state: State | None
    extra: dict[str, Any]
    path: pathlib.Path


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def save(path: PathLike, params: Params, state: State | None = None,
         **extra: Any) -> pathlib.Path:
    """Write ``params`` (and ``state``, and extras) to ``path``; return the path.

    Example::

        jaxnn.save("model.npz", params, state, epochs=5, mean=x_train.mean(0))

    Args:
      path: the file to write (parent folders are created; written as named,
        no ``.npz`` is appended). An existing file is replaced atomically: a
        save that fails or is killed leaves it as it was.
      params: the parameter pytree (as ``model.init`` returns: nested dicts of
        arrays; lists and tuples also load without a template).
      state: the model state (e.g. BatchNorm statistics), or ``None``.
      **extra: anything else to keep, by name. A value that is an array
        (``jax.Array``, numpy array or scalar) or a pytree of arrays only
        (dicts, lists, tuples) is stored as arrays, bit for bit; any other value must be
        JSON-serialisable (numbers, strings, bools, None, lists, dicts with
        string keys) and is stored in the manifest.

    Raises:
      TypeError: an extra mixes arrays with other values, or is neither arrays
        nor JSON-serialisable; a leaf of ``params`` or ``state`` is not a
        numeric array. Nothing is written then.
    """
    path = pathlib.Path(path)
    arrays: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for name, value in extra.items():
        leaves = jax.tree_util.tree_leaves(value)
        flags = [_is_array(leaf) for leaf in leaves]
        if leaves and all(flags):
            names = [n for n, _ in _named_leaves(name, value)[0]]
            if _describe_tree(name, value, names) is None:
                raise TypeError(
                    f"jaxnn.save({str(path)!r}): extra {name!r} holds containers other "
                    "than dicts with string keys, lists and tuples (e.g. a NamedTuple), "
                    "which load could not rebuild; convert it (e.g. ._asdict())"
                )
            arrays[name] = value
        elif any(flags):
            raise TypeError(
                f"jaxnn.save({str(path)!r}): extra {name!r} mixes arrays with other values; "
                "pass the arrays and the other values as separate extras"
            )
        else:
            try:
                metadata[name] = json.loads(json.dumps(value))
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"jaxnn.save({str(path)!r}): extra {name!r} is neither arrays nor "
                    f"JSON-serialisable ({exc})"
                ) from exc
    trees = {"params": params, "state": state, _EXTRA: arrays or None}
    return _write_checkpoint(path, trees, epoch=0, key=None, metadata=metadata,
                             who=f"jaxnn.save({str(path)!r})")


def load(path: PathLike, *, params: Params | None = None,
         state: State | None = None) -> Saved:
    """Read a file written by :func:`save` (or a training checkpoint).

    Example::

        params = jaxnn.load("model.npz").params
        saved = jaxnn.load("model.npz")
        y, _ = model.apply_with_state(saved.params, saved.state, x)

    No template is needed: the structure (dicts, lists, tuples) is stored in
    the file. Arrays come back as ``jax.Array`` with the saved dtypes.

    Args:
      path: the file.
      params, state: optional templates (e.g. ``model.init(key, x)``; arrays or
        :class:`jax.ShapeDtypeStruct` leaves) to restore into their pytree
        types (NamedTuples too) and to check the structure, shapes and dtypes.

    Returns:
      A :class:`Saved` with ``params``, ``state``, ``extra`` and ``path``.

    Raises:
      FileNotFoundError: no file at ``path``.
      jaxnn.checkpoint.CheckpointError: naming the file: corrupt, truncated or
        not a jaxnn file; a template that is empty, or differs from the file
        (the parameter path with both shapes or dtypes, or the missing and
        extra paths); a template-free load of a tree saved with other
        container types; 64-bit arrays while ``jax_enable_x64`` is off.
    """
    path = pathlib.Path(path)
    with _Archive(path) as archive:
        sections = archive.manifest["sections"]
        if "params" not in sections:
            raise archive.error("holds no params")
        restored = {}
        for section, template in (("params", params), ("state", state)):
            if template is not None:
                restored[section] = _restore_section(archive, section, template)
            elif section in sections:
                restored[section] = _read_section(archive, section)
        extra = dict(archive.manifest["metadata"])
        if _EXTRA in sections:
            arrays = _read_section(archive, _EXTRA)
            if not isinstance(arrays, dict):
                raise archive.error(f"corrupt manifest: '{_EXTRA}' is not a dict")
            extra.update(arrays)
    return Saved(params=restored["params"], state=restored.get("state"), extra=extra,
                 path=path)

