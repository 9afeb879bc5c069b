"""Training checkpoints: save and restore params, state, optimizer state, epoch and key.

A checkpoint is one ``.npz`` file (a zip of ``.npy`` arrays, written by
:func:`numpy.savez`, readable by ``numpy.load(path, allow_pickle=False)``)::

    ckpt = save_checkpoint("run/ckpt_0003.npz", params=params, state=state,
                           opt_state=opt_state, epoch=3, key=key,
                           metadata={"history": history})
    ckpt = restore_checkpoint("run/ckpt_0003.npz",
                              target={"params": params0, "state": state0,
                                      "opt_state": opt.init(params0)})
    ckpt.params, ckpt.opt_state, ckpt.epoch, ckpt.key, ckpt.metadata

Or, one file per epoch keeping the last few::

    manager = CheckpointManager("run", max_to_keep=3)
    manager.save(params=params, opt_state=opt_state, epoch=epoch, key=key)
    ckpt = manager.restore_latest(target={"params": params0, "opt_state": opt_state0})

File format (version 1)
-----------------------
Entries of the ``.npz`` (each stored as ``<name>.npy`` inside the zip):

* One array per pytree leaf, named by its path: the section (``params``,
  ``state`` or ``opt_state``) then the keys down to the leaf, joined by ``/``.
  Dict keys are written as they are, sequence and tuple positions as numbers,
  NamedTuple fields by name: ``params/dense_0/kernel``,
  ``opt_state/0/mu/dense_0/kernel``, ``opt_state/0/count``. A section that is a
  single array is named by the section alone.
* ``key``: the PRNG key, if one was saved. A typed key (``jax.random.key``) is
  stored as its raw ``jax.random.key_data`` (uint32) with the implementation
  name in the manifest; a legacy ``jax.random.PRNGKey`` is stored as it is.
* ``__manifest__``: a uint8 array holding UTF-8 JSON::

      {"format": "jaxnn.checkpoint", "format_version": 1,
       "jaxnn_version": "0.1.0", "jax_version": "...", "numpy_version": "...",
       "epoch": 3,
       "key": {"impl": "threefry2x32"}   # null impl: legacy key; null: no key
       "sections": {"params": ["params/dense_0/bias", ...], "opt_state": [...]},
       "trees": {"params": {"dict": {"dense_0": {"dict": {"bias": "params/dense_0/bias",
                                                          "kernel": ...}}}},
                 "opt_state": null},
       "arrays": {"params/dense_0/kernel": {"shape": [784, 64], "dtype": "float32",
                  "stored_dtype": "float32", "sha256": "<hex digest>"}, ...},
       "metadata": {...}}

  ``sections`` lists the sections saved (an empty list for an empty tree such
  as ``state={}``; a section saved as ``None`` is absent). ``trees`` gives each
  section's structure, so :func:`jaxnn.load` needs no template: a leaf is its
  array's name, a container ``{"dict": {key: ...}}`` (string keys, sorted),
  ``{"list": [...]}``, ``{"tuple": [...]}`` or ``{"none": null}``; a section
  with any other node (a NamedTuple, as in optax states) is ``null`` and needs
  a template. ``trees`` was added without a version change (readers ignore
  fields they do not know); for files without it :func:`jaxnn.load` rebuilds
  nested dicts from the array names. ``sections`` may also hold ``extra``, the
  arrays passed to :func:`jaxnn.save` as extras. ``sha256`` is the
  digest of the stored array's bytes in C order. Dtypes numpy cannot save
  portably (``bfloat16``, the float8 types, ``int4``: numpy kind ``"V"``) are
  stored as unsigned integers of the same width (``stored_dtype`` ``uint16``
  for bfloat16) and viewed back as ``dtype`` on restore.

Integrity. Each zip member carries a CRC-32 that is checked on reading, and
each array is checked against its sha256 in the manifest, so a truncated file
or a flipped bit in anything that is restored raises :class:`CheckpointError`.

Atomic writes. A checkpoint is written to a temporary file in the same
directory (``.<name>.<8 random characters>.tmp``), flushed and ``fsync``-ed,
then renamed onto its final name with :func:`os.replace` (atomic on POSIX and
Windows), and the directory is ``fsync``-ed. A process killed part-way through
leaves the previous file with that name intact and, at worst, a stale ``.tmp``
file, which :func:`latest_checkpoint` ignores and the next save removes (a
save removes the stale temporary files of its own file name;
:meth:`CheckpointManager.save` those of every ``{prefix}NNNN.npz`` in its
folder). So one folder has one writer at a time.

One run per folder. :class:`jaxnn.callbacks.ModelCheckpoint` writes into a
folder only when the folder is empty or holds the run being continued (see
:meth:`CheckpointManager.check_continues`), and :class:`CheckpointManager`
skips, with a warning, a checkpoint holding NaN or inf, so rotation never
deletes the last good one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import operator
import os
import pathlib
import re
import secrets
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn._typing import Params, PRNGKey, State

__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointError",
    "CheckpointManager",
    "FORMAT_VERSION",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "resume",
    "restore_checkpoint",
    "save_checkpoint",
]

FORMAT_NAME = "jaxnn.checkpoint"
FORMAT_VERSION = 1
SECTIONS = ("params", "state", "opt_state")
_MANIFEST = "__manifest__"
_KEY = "key"

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file cannot be restored: corrupt, truncated, from an unknown
    format version, or not matching the target's structure, shapes or dtypes.
    The message starts with the file's path."""


class CheckpointConflictError(CheckpointError):
    """A checkpoint folder holds another run's checkpoints, so writing this run
    there would mix the two (see :meth:`CheckpointManager.check_continues`). The
    message starts with the folder's path and says what it holds and what to do."""


# Fault injection: when set, called with the name of each step of a save at which a
# crash leaves a different state on disk (tests/checkpoint_kill_worker.py kills its
# process at each in turn). None in normal use.
_crash_hook: Callable[[str], None] | None = None


def _reach(point: str) -> None:
    if _crash_hook is not None:
        _crash_hook(point)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A restored training snapshot.

    Attributes:
      params, state, opt_state: pytrees of ``jax.Array`` in the target's
        structure and dtypes (``None`` for a section not requested).
      epoch: the epoch saved.
      key: the PRNG key (typed if a typed key was saved, else legacy uint32),
        or ``None``.
      metadata: the user metadata (JSON types: tuples come back as lists).
      path: the file read.
      manifest: the file's full manifest (see the module docstring).
    """

    params: Params | None
    state: State | None
    opt_state: Any
    epoch: int
    key: PRNGKey | None
    metadata: dict[str, Any]
    path: pathlib.Path
    manifest: dict[str, Any] = dataclasses.field(repr=False)


# -- pytree paths -------------------------------------------------------------


def _key_str(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _leaf_name(section: str, path: tuple) -> str:
    return "/".join((section, *(_key_str(e) for e in path)))


def _named_leaves(section: str, tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """``([(name, leaf), ...], treedef)`` for a section's tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(_leaf_name(section, path), leaf) for path, leaf in leaves]
    return named, treedef


def _describe_tree(section: str, tree: Any, names: list[str]) -> Any:
    """The manifest's JSON description of ``tree`` (see the module docstring), or
    None when it holds a node other than a dict with string keys, a list, a tuple
    or None (a NamedTuple, say): such a tree is restored from a template only.
    ``names`` are the leaf names in flattening order, to check the description."""
    found: list[str] = []

    class _Unsupported(Exception):
        pass

    def describe(node: Any, name: str) -> Any:
        if node is None:
            return {"none": None}
        if type(node) is dict:
            if not all(isinstance(k, str) for k in node):
                raise _Unsupported
            return {"dict": {k: describe(node[k], f"{name}/{k}") for k in sorted(node)}}
        if type(node) in (list, tuple):
            kind = "list" if type(node) is list else "tuple"
            return {kind: [describe(v, f"{name}/{i}") for i, v in enumerate(node)]}
        if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
            raise _Unsupported
        found.append(name)
        return name

    try:
        description = describe(tree, section)
    except _Unsupported:
        return None
    return description if found == names else None


def _build_tree(description: Any, leaf: Callable[[str], Any]) -> Any:
    """The tree a :func:`_describe_tree` description stands for, its leaves
    ``leaf(name)``. Raises ValueError for a malformed description."""
    if isinstance(description, str):
        return leaf(description)
    if not isinstance(description, dict) or len(description) != 1:
        raise ValueError(f"malformed tree node {description!r:.80}")
    (kind, body), = description.items()
    if kind == "none" and body is None:
        return None
    if kind == "dict" and isinstance(body, dict):
        return {k: _build_tree(v, leaf) for k, v in body.items()}
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_build_tree(v, leaf) for v in body]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"malformed tree node {description!r:.80}")


def _tree_from_names(section: str, names: list[str]) -> Any:
    """The description of nested dicts rebuilt from leaf names
    (``params/dense_0/kernel``), for files written before the manifest described trees."""
    if names == [section]:
        return section
    tree: dict[str, Any] = {}
    for name in names:
        *parents, last = name.split("/")[1:]
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"'{name}' is below another array")
        node[last] = name

    def describe(node: Any) -> Any:
        if isinstance(node, str):
            return node
        return {"dict": {k: describe(v) for k, v in node.items()}}

    return describe(tree)


# -- arrays -------------------------------------------------------------------


def _sha256(stored: np.ndarray) -> str:
    flat = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    return hashlib.sha256(flat).hexdigest()


def _to_storable(name: str, leaf: Any, who: str) -> tuple[np.ndarray, np.dtype]:
    """``(stored array, logical dtype)``: ml_dtypes (kind "V") as same-width uints."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"{who}: leaf '{name}' is a typed PRNG key array; pass the key "
            "as key=... (or store jax.random.key_data(k) in the tree)"
        )
    array = np.asarray(leaf)
    if array.dtype.kind == "O" or array.dtype.fields is not None:
        raise TypeError(
            f"{who}: leaf '{name}' has dtype {array.dtype}; only numeric "
            "arrays can be saved"
        )
    if array.dtype.kind == "V":
        return array.view(np.dtype(f"uint{8 * array.dtype.itemsize}")), array.dtype
    return array, array.dtype


def _leaf_spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a target leaf (array, ShapeDtypeStruct or scalar)."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    array = jnp.asarray(leaf)
    return tuple(array.shape), np.dtype(array.dtype)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic | jax.Array):
        return np.asarray(obj).tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


# -- writing ------------------------------------------------------------------


# ``.<file name>.<8 random characters>.tmp``; the random part was made by
# tempfile.NamedTemporaryFile before (letters, digits, "_"), by secrets.token_hex now.
_TEMP_RANDOM = r"\.[a-z0-9_]{8}\.tmp"


def _temp_pattern(name_pattern: str) -> re.Pattern:
    """The temporary files of saves to the file names matching ``name_pattern``."""
    return re.compile(r"\." + name_pattern + _TEMP_RANDOM)


def _remove_temps(directory: pathlib.Path, pattern: re.Pattern) -> None:
    """Delete the files in ``directory`` whose names match ``pattern`` (temporary
    files left by a save that was killed)."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory)
                       if pattern.fullmatch(entry.name) and entry.is_file())
    except FileNotFoundError:
        return
    for name in names:
        _reach("cleanup.before_unlink")
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
        _reach("cleanup.after_unlink")


def _write_npz(file: Any, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``file`` as :func:`numpy.savez` does (a zip of ``.npy``
    members, stored uncompressed), one member at a time."""
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as archive:
        for name, array in arrays.items():
            _reach(f"write.member_start {name}")
            with archive.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            _reach(f"write.member_end {name}")


def _fsync_directory(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_savez(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an ``.npz`` at ``path``: temp file, fsync, rename.

    First removes the temporary files that killed saves to ``path`` left behind.
    """
    directory = path.parent
    _remove_temps(directory, _temp_pattern(re.escape(path.name)))
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # "x": created new, with the permissions of any new file (0666 less the umask).
        with open(tmp, "xb") as f:
            _reach("write.created")
            _write_npz(f, arrays)
            _reach("write.zip_closed")
            f.flush()
            os.fsync(f.fileno())
        _reach("write.synced")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _reach("write.replaced")
    _fsync_directory(directory)
    _reach("write.directory_synced")


def _is_typed_key(key: Any) -> bool:
    dtype = getattr(key, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def save_checkpoint(
    path: PathLike,
    *,
    params: Params,
    state: State | None = None,
    opt_state: Any = None,
    epoch: int,
    key: PRNGKey | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write a training snapshot to ``path`` atomically and return the path.

    Args:
      path: the file to write (parent directories are created). Written as it
        is (no ``.npz`` is appended); an existing file is replaced atomically.
      params: the parameter pytree.
      state: the model state pytree (e.g. BatchNorm statistics), or ``None``.
      opt_state: the optimizer state (an optax state: tuples and NamedTuples of
        arrays), or ``None``.
      epoch: the number of epochs completed (a non-negative integer).
      key: a PRNG key, typed (``jax.random.key``) or legacy uint32, or ``None``.
      metadata: a JSON-serialisable dict (e.g. ``{"history": {...}}``); numpy
        and JAX scalars and arrays in it are converted to numbers and lists.

    Raises:
      TypeError: a leaf is not a numeric array, or ``metadata`` is not
        JSON-serialisable.
      ValueError: two leaves have the same path name (a dict key containing
        ``/``), or ``epoch`` is negative.
    """
    path = pathlib.Path(path)
    epoch = operator.index(epoch)
    if epoch < 0:
        raise ValueError(f"save_checkpoint: epoch must be >= 0, got {epoch}")
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {}), default=_json_default))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_checkpoint: metadata must be JSON-serialisable: {exc}") from exc
    return _write_checkpoint(
        path, {"params": params, "state": state, "opt_state": opt_state},
        epoch=epoch, key=key, metadata=metadata_json, who="save_checkpoint")


def _write_checkpoint(
    path: pathlib.Path,
    trees: Mapping[str, Any],
    *,
    epoch: int,
    key: PRNGKey | None,
    metadata: dict[str, Any],
    who: str,
) -> pathlib.Path:
    """Write the sections ``trees`` (name -> pytree or None), the key and the
    JSON ``metadata`` as one checkpoint file; ``who`` starts the error messages."""
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    sections: dict[str, list[str]] = {}
    described: dict[str, Any] = {}

    def add(name: str, leaf: Any) -> None:
        if name in arrays or name == _MANIFEST:
            raise ValueError(
                f"{who}: two leaves are both named '{name}'; "
                "dict keys must not contain '/'"
            )
        stored, dtype = _to_storable(name, leaf, who)
        arrays[name] = stored
        entries[name] = {
            "shape": list(stored.shape),
            "dtype": dtype.name,
            "stored_dtype": stored.dtype.name,
            "sha256": _sha256(stored),
        }

    for section, tree in trees.items():
        if tree is None:
            continue
        named, _ = _named_leaves(section, tree)
        sections[section] = [name for name, _ in named]
        described[section] = _describe_tree(section, tree, sections[section])
        for name, leaf in named:
            add(name, leaf)

    key_info = None
    if key is not None:
        if not _is_typed_key(key):
            key = np.asarray(key)  # a legacy key: no device work (saves in a fresh process)
        if _is_typed_key(key):
            key_info = {"impl": str(jax.random.key_impl(key))}
            add(_KEY, jax.random.key_data(key))
        elif key.dtype == np.uint32:
            key_info = {"impl": None}
            add(_KEY, key)
        else:
            raise TypeError(
                f"{who}: key must be a typed key (jax.random.key) or a legacy "
                f"uint32 key (jax.random.PRNGKey), got dtype {key.dtype}"
            )

    from jaxnn import __version__ as jaxnn_version

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "jaxnn_version": jaxnn_version,
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "epoch": epoch,
        "key": key_info,
        "sections": sections,
        "trees": described,
        "arrays": entries,
        "metadata": metadata,
    }
    arrays[_MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(path, arrays)
    return path


# -- reading ------------------------------------------------------------------


class _Archive:
    """A checkpoint's zip, read entry by entry with CRC and sha256 checks."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        if not path.exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            self._zip = zipfile.ZipFile(path)
        except Exception as exc:
            raise self.error(f"not a valid .npz (zip) file; corrupt or truncated ({exc})") from exc
        try:
            self.manifest = self._read_manifest()
        except BaseException:
            self._zip.close()
            raise

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _read_raw(self, name: str) -> np.ndarray:
        try:
            data = self._zip.read(name + ".npy")  # checks the entry's CRC-32
        except KeyError:
            raise self.error(f"array '{name}' is missing from the file") from None
        except Exception as exc:
            raise self.error(f"corrupt or truncated entry '{name}' ({exc})") from exc
        try:
            return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise self.error(f"corrupt entry '{name}' ({exc})") from exc

    def _read_manifest(self) -> dict[str, Any]:
        if _MANIFEST + ".npy" not in self._zip.namelist():
            raise self.error("not a jaxnn checkpoint (a .npz without the '__manifest__' "
                             "entry that save_checkpoint writes)")
        raw = self._read_raw(_MANIFEST)
        try:
            manifest = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.error(f"corrupt manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise self.error("not a jaxnn checkpoint (the manifest has no format marker)")
        version = manifest.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise self.error(
                f"unknown checkpoint format version {version!r} (written by jaxnn "
                f"{manifest.get('jaxnn_version', '?')}); this jaxnn reads versions "
                f"1 to {FORMAT_VERSION}"
            )
        for field in ("epoch", "sections", "arrays", "metadata", "key"):
            if field not in manifest:
                raise self.error(f"corrupt manifest (no '{field}' field)")
        return manifest

    def read(self, name: str) -> np.ndarray:
        """The array ``name`` in its logical dtype, checked against the manifest."""
        entry = self.manifest["arrays"].get(name)
        if entry is None:
            raise self.error(f"array '{name}' is not listed in the manifest")
        stored = self._read_raw(name)
        if list(stored.shape) != entry["shape"] or stored.dtype.name != entry["stored_dtype"]:
            raise self.error(
                f"corrupt entry '{name}': the manifest says shape {tuple(entry['shape'])} "
                f"{entry['stored_dtype']}, the array is {stored.shape} {stored.dtype.name}"
            )
        if _sha256(stored) != entry["sha256"]:
            raise self.error(f"checksum mismatch for '{name}': the file is corrupt")
        if entry["dtype"] != entry["stored_dtype"]:
            stored = stored.view(jnp.dtype(entry["dtype"]))
        return stored

    def key(self) -> PRNGKey | None:
        """The saved PRNG key (typed or legacy, as saved), or None."""
        key_info = self.manifest["key"]
        if key_info is None:
            return None
        data = jnp.asarray(self.read(_KEY))
        impl = key_info.get("impl")
        return data if impl is None else jax.random.wrap_key_data(data, impl=impl)


def _format_names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _restore_section(archive: _Archive, section: str, target: Any) -> Any:
    sections = archive.manifest["sections"]
    if section not in sections:
        saved = ", ".join(sections) or "none"
        raise archive.error(
            f"the target asks for '{section}', which this checkpoint does not hold "
            f"(sections saved: {saved})"
        )
    named, treedef = _named_leaves(section, target)
    wanted = [name for name, _ in named]
    saved = list(sections[section])
    if not wanted and saved:
        raise archive.error(
            f"the '{section}' template is empty ({target!r:.40}) but the file holds "
            f"{len(saved)} arrays there ({_format_names(saved, 3)}); pass a template "
            f"of the saved structure (e.g. freshly initialised {section}) or none"
        )
    saved_set, wanted_set = set(saved), set(wanted)
    missing = [n for n in wanted if n not in saved_set]
    extra = [n for n in saved if n not in wanted_set]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_format_names(missing)}")
        if extra:
            parts.append(f"in the file but not in the target: {_format_names(extra)}")
        raise archive.error(f"'{section}' tree structure mismatch; " + "; ".join(parts))

    entries = archive.manifest["arrays"]
    for name, leaf in named:
        shape, dtype = _leaf_spec(leaf)
        entry = entries.get(name)
        if entry is None:
            raise archive.error(f"array '{name}' is not listed in the manifest")
        if tuple(entry["shape"]) != shape:
            raise archive.error(
                f"shape mismatch at '{name}': the target expects {shape}, "
                f"the file has {tuple(entry['shape'])}"
            )
        if entry["dtype"] != dtype.name:
            raise archive.error(
                f"dtype mismatch at '{name}': the target expects {dtype.name}, the file "
                f"has {entry['dtype']} (cast the target, or the restored tree, as needed)"
            )
    leaves = [jnp.asarray(archive.read(name)) for name, _ in named]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _read_section(archive: _Archive, section: str) -> Any:
    """The section as saved, without a template: its structure from the manifest's
    ``trees`` (or, in files written before it, nested dicts rebuilt from the names)."""
    names = archive.manifest["sections"][section]
    trees = archive.manifest.get("trees")
    if trees is None:
        try:
            description = _tree_from_names(section, names)
        except ValueError as exc:
            raise archive.error(f"corrupt manifest: '{section}': {exc}") from exc
    elif trees.get(section) is None:
        raise archive.error(
            f"'{section}' was saved from a pytree with nodes other than dicts, lists, "
            "tuples and None (e.g. a NamedTuple), so its structure is not in the file; "
            f"pass a template: {section}=..."
        )
    else:
        description = trees[section]

    def leaf(name: str) -> jax.Array:
        if name not in names:
            raise archive.error(f"corrupt manifest: the '{section}' tree names '{name}', "
                                "which its section does not list")
        stored = archive.read(name)
        array = jnp.asarray(stored)
        if array.dtype != stored.dtype:  # float64 or int64 while jax_enable_x64 is off
            raise archive.error(
                f"'{name}' is {stored.dtype.name}, which JAX would turn into "
                f"{array.dtype.name}: enable jax_enable_x64 to load it"
            )
        return array

    try:
        return _build_tree(description, leaf)
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise archive.error(f"corrupt manifest: '{section}' tree: {exc}") from exc


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path`` (epoch, arrays, metadata...),
    without reading the arrays. Raises :class:`CheckpointError` as restore does."""
    with _Archive(pathlib.Path(path)) as archive:
        return archive.manifest


def restore_checkpoint(path: PathLike, *, target: Mapping[str, Any]) -> Checkpoint:
    """Read the checkpoint at ``path`` into the structure of ``target``.

    Args:
      path: a file written by :func:`save_checkpoint`.
      target: a dict with some of the keys ``"params"``, ``"state"`` and
        ``"opt_state"``; each value is an example pytree of the same structure
        as the one saved (e.g. freshly initialised params and
        ``optimizer.init(params)``; arrays or :class:`jax.ShapeDtypeStruct`
        leaves). Sections left out (or ``None``) are not read and come back as
        ``None``. NamedTuples and other containers are rebuilt from the
        target's tree structure.

    Returns:
      A :class:`Checkpoint`; its arrays are ``jax.Array`` with the target's
      dtypes.

    Raises:
      FileNotFoundError: no file at ``path``.
      CheckpointError: naming the file: ``target`` names no section (``{}``, or
        only ``None`` values), not a zip or truncated, a checksum mismatch, a
        missing array, an unknown format version, a section the file lacks, an
        empty template for a saved section, a tree-structure mismatch (the
        missing and extra paths are listed), or a shape or dtype mismatch (the
        path, expected and actual).
    """
    unknown = sorted(set(target) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"restore_checkpoint: unknown target keys {unknown}; expected some of {SECTIONS}"
        )
    if all(target.get(section) is None for section in SECTIONS):
        raise CheckpointError(
            f"{path}: restore_checkpoint: the target names no section to restore "
            f"({dict(target)!r:.60}); give templates for some of {SECTIONS}, e.g. "
            "target={'params': params}, or read without one with jaxnn.load(path)"
        )
    with _Archive(pathlib.Path(path)) as archive:
        manifest = archive.manifest
        restored = {
            section: _restore_section(archive, section, target[section])
            for section in SECTIONS
            if target.get(section) is not None
        }
        key = archive.key()
    return Checkpoint(
        params=restored.get("params"),
        state=restored.get("state"),
        opt_state=restored.get("opt_state"),
        epoch=int(manifest["epoch"]),
        key=key,
        metadata=manifest["metadata"],
        path=archive.path,
        manifest=manifest,
    )


# -- a directory of per-epoch checkpoints --------------------------------------


def _numbered(directory: pathlib.Path, prefix: str) -> list[tuple[int, pathlib.Path]]:
    """``[(epoch, path), ...]`` of the files ``{prefix}{epoch}.npz``, oldest first."""
    if not directory.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.npz")
    found = []
    for entry in directory.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def list_checkpoints(directory: PathLike, *, prefix: str = "ckpt_") -> list[pathlib.Path]:
    """The files ``directory/{prefix}{epoch}.npz``, oldest epoch first.

    Other files (temporary ``*.tmp`` files left by an interrupted save
    included) are ignored; a missing directory gives ``[]``.
    """
    return [path for _, path in _numbered(pathlib.Path(directory), prefix)]


def latest_checkpoint(directory: PathLike, *, prefix: str = "ckpt_") -> pathlib.Path | None:
    """The checkpoint with the highest epoch in ``directory``, or ``None``."""
    found = list_checkpoints(directory, prefix=prefix)
    return found[-1] if found else None


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """One bool per array: every entry finite (one compiled reduction, one transfer)."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _nonfinite_arrays(trees: Mapping[str, Any]) -> list[str]:
    """The names (``params/dense_0/kernel``, ...) of the floating-point arrays in
    ``trees`` (section name -> pytree or None) that hold a NaN or an inf."""
    named = []
    for section, tree in trees.items():
        if tree is None:
            continue
        for name, leaf in _named_leaves(section, tree)[0]:
            dtype = getattr(leaf, "dtype", None)
            dtype = np.result_type(leaf) if dtype is None else dtype
            if jnp.issubdtype(dtype, jnp.inexact):
                named.append((name, leaf))
    # One reduction per set of devices the arrays live on (one set, as fit leaves them).
    by_devices: dict[frozenset, list[tuple[str, jax.Array]]] = {}
    for name, leaf in named:
        if isinstance(leaf, jax.Array):
            by_devices.setdefault(frozenset(leaf.sharding.device_set), []).append((name, leaf))
    bad = set()
    for group in by_devices.values():
        flags = np.asarray(_finite_flags([leaf for _, leaf in group]))
        bad.update(name for (name, _), ok in zip(group, flags) if not ok)
    for name, leaf in named:
        if not isinstance(leaf, jax.Array) and not np.isfinite(np.asarray(leaf)).all():
            bad.add(name)
    return [name for name, _ in named if name in bad]


def _key_identity(key: Any) -> tuple[str | None, np.ndarray] | None:
    """``(impl name or None for a legacy key, raw key data)``, or None for no key."""
    if key is None:
        return None
    if _is_typed_key(key):
        return str(jax.random.key_impl(key)), np.asarray(jax.random.key_data(key))
    return None, np.asarray(key)


def _same_key(a: Any, b: Any) -> bool:
    """Whether two PRNG keys (typed or legacy, or None) are the same key."""
    a, b = _key_identity(a), _key_identity(b)
    if a is None or b is None:
        return a is b
    (impl_a, data_a), (impl_b, data_b) = a, b
    if impl_a is not None and impl_b is not None and impl_a != impl_b:
        return False
    return data_a.shape == data_b.shape and bool(np.array_equal(data_a, data_b))


class CheckpointManager:
    """Save ``directory/ckpt_{epoch:04d}.npz`` each epoch, keeping the last few.

    Args:
      directory: where the checkpoints go (created on the first save).
      max_to_keep: how many checkpoints to keep (the highest epochs; the one
        just written and any later epoch are never removed), or ``None`` to
        keep all.
      prefix: the file-name prefix.

    The folder is meant for one run and one writer at a time: each save removes
    the temporary files that killed saves left in it (``.{prefix}NNNN.npz.*.tmp``),
    and :class:`jaxnn.callbacks.ModelCheckpoint` calls :meth:`check_continues`
    before training.

    Example::

        manager = CheckpointManager("run", max_to_keep=3)
        ckpt = manager.restore_latest(target={"params": params, "opt_state": opt_state})
        start = 0
        if ckpt is not None:
            params, opt_state, start = ckpt.params, ckpt.opt_state, ckpt.epoch
        for epoch in range(start, epochs):
            ...
            manager.save(params=params, opt_state=opt_state, epoch=epoch + 1)
    """

    def __init__(self, directory: PathLike, *, max_to_keep: int | None = 3,
                 prefix: str = "ckpt_"):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(
                f"CheckpointManager: max_to_keep must be a positive integer or None, "
                f"got {max_to_keep!r}"
            )
        self.directory = pathlib.Path(directory)
        self.max_to_keep = max_to_keep
        self.prefix = prefix

    def path_for(self, epoch: int) -> pathlib.Path:
        """``directory/{prefix}{epoch:04d}.npz``."""
        return self.directory / f"{self.prefix}{operator.index(epoch):04d}.npz"

    def save(
        self,
        *,
        params: Params,
        state: State | None = None,
        opt_state: Any = None,
        epoch: int,
        key: PRNGKey | None = None,
        metadata: Mapping[str, Any] | None = None,
        skip_nonfinite: bool = True,
    ) -> pathlib.Path | None:
        """Save the epoch's checkpoint (see :func:`save_checkpoint`), then delete
        the oldest ones beyond ``max_to_keep``. Returns the path written.

        Before writing, the temporary files of killed saves into this folder are
        removed. With ``skip_nonfinite`` (the default), a snapshot whose params,
        state or optimizer state hold NaN or inf is not written: a
        ``RuntimeWarning`` names the epoch and the arrays, nothing is deleted,
        and the return value is None. So rotation never removes the last good
        checkpoint.
        """
        epoch = operator.index(epoch)
        if skip_nonfinite:
            bad = _nonfinite_arrays({"params": params, "state": state, "opt_state": opt_state})
            if bad:
                latest = self.latest()
                kept = (f"the latest checkpoint there stays {latest.name}" if latest
                        else "there is no checkpoint there yet")
                warnings.warn(
                    f"{self.directory}: epoch {epoch} not saved: NaN or inf in "
                    f"{_format_names(bad, 3)}; {kept}", RuntimeWarning, stacklevel=2)
                return None
        _remove_temps(self.directory, _temp_pattern(re.escape(self.prefix) + r"\d+\.npz"))
        path = save_checkpoint(
            self.path_for(epoch), params=params, state=state, opt_state=opt_state,
            epoch=epoch, key=key, metadata=metadata,
        )
        if self.max_to_keep is not None:
            found = _numbered(self.directory, self.prefix)
            older = [p for e, p in found if e < epoch]
            later = sum(1 for e, _ in found if e > epoch)
            keep = max(0, self.max_to_keep - 1 - later)
            for old in older[: max(0, len(older) - keep)]:
                _reach("rotate.before_unlink")
                old.unlink(missing_ok=True)
                _reach("rotate.after_unlink")
        return path

    def checkpoints(self) -> list[pathlib.Path]:
        """The checkpoints in the directory, oldest epoch first."""
        return list_checkpoints(self.directory, prefix=self.prefix)

    def latest(self) -> pathlib.Path | None:
        """The checkpoint with the highest epoch, or ``None``."""
        return latest_checkpoint(self.directory, prefix=self.prefix)

    def latest_epoch(self) -> int | None:
        """The highest epoch among the checkpoints (from the file names), or ``None``."""
        found = _numbered(self.directory, self.prefix)
        return found[-1][0] if found else None

    def restore_latest(self, *, target: Mapping[str, Any]) -> Checkpoint | None:
        """Restore the latest checkpoint (see :func:`restore_checkpoint`), or
        return ``None`` when there is none."""
        path = self.latest()
        return None if path is None else restore_checkpoint(path, target=target)

    def check_continues(self, *, initial_epoch: int, key: PRNGKey | None) -> None:
        """Refuse a run that would mix with another run's checkpoints in this folder.

        A run starting at ``initial_epoch`` with ``key`` may write here when the
        folder holds no checkpoint, or when it continues the run there: the
        latest checkpoint has ``epoch == initial_epoch`` and the same key. A run
        starting at epoch 0 continues nothing.

        Raises:
          CheckpointConflictError: naming the folder, the checkpoints it holds,
            why this run does not continue them, and what to do.
          CheckpointError: the latest checkpoint cannot be read.
        """
        found = self.checkpoints()
        if not found:
            return
        with _Archive(found[-1]) as archive:
            saved_epoch = int(archive.manifest["epoch"])
            saved_key = archive.key()
        if initial_epoch == 0:
            why = "this run starts at epoch 0"
        elif saved_epoch != initial_epoch:
            why = (f"this run starts at epoch {initial_epoch}, not at the latest "
                   f"checkpoint's epoch {saved_epoch}")
        elif not _same_key(saved_key, key):
            why = (f"this run starts at epoch {initial_epoch} as the latest checkpoint "
                   "does, but with a different key")
        else:
            return
        held = found[0].stem if len(found) == 1 else (
            f"{found[0].stem}..{found[-1].stem}, {len(found)} files")
        raise CheckpointConflictError(
            f"{self.directory}: this folder holds another run's checkpoints ({held}; latest "
            f"epoch {saved_epoch}) and {why}, so writing here would mix the two runs. Use a "
            f"fresh folder, or continue that run: ckpt = jaxnn.resume({str(self.directory)!r}, "
            "params=..., opt_state=...), then fit(..., params=ckpt.params, state=ckpt.state, "
            "opt_state=ckpt.opt_state, initial_epoch=ckpt.epoch, key=ckpt.key)"
        )


def resume(path: PathLike, *, params: Params, state: State | None = None,
           opt_state: Any = None) -> Checkpoint | None:
    """Load the checkpoint to continue training from: the file ``path``, or the
    latest checkpoint in the folder ``path`` (as :class:`ModelCheckpoint` writes).

    ``params``, ``state`` and ``opt_state`` are templates (e.g. freshly
    initialised values) giving the structure to restore into. Continue with
    ``fit(..., params=ckpt.params, state=ckpt.state, opt_state=ckpt.opt_state,
    key=ckpt.key, initial_epoch=ckpt.epoch)``.

    Returns:
      The :class:`Checkpoint`, or None when ``path`` is a folder that holds no
      checkpoint (a first run: start from scratch).

    Raises:
      FileNotFoundError: nothing exists at ``path`` (create the folder first;
        ``ModelCheckpoint(folder)`` does).
      CheckpointError: naming the file: ``path`` is not a folder or a readable
        jaxnn checkpoint, or the checkpoint does not match the templates.
    """
    path = pathlib.Path(path)
    target: dict[str, Any] = {"params": params, "state": state or {}}
    if opt_state is not None:
        target["opt_state"] = opt_state
    if path.is_dir():
        latest = latest_checkpoint(path)
        return None if latest is None else restore_checkpoint(latest, target=target)
    if path.is_file():
        return restore_checkpoint(path, target=target)
    if not path.exists():
        raise FileNotFoundError(
            f"jaxnn.resume: {path} does not exist; give a checkpoint folder or a checkpoint "
            "file in one. For a first run create the folder first (ModelCheckpoint(folder) "
            "does); resume then returns None"
        )
    raise CheckpointError(f"{path}: neither a checkpoint file nor a folder")
