"""JAX's persistent compilation cache, on in one call: a fast second start.

Each new Python process compiles its jitted programs afresh: for the MNIST
examples on CPU that is a few seconds before the first step. With the persistent
cache on, JAX writes every compiled program to a folder, and a later process that
builds the same program (same code, shapes, dtypes, flags, JAX version and
device) loads it from there instead of compiling it::

    import jaxnn
    jaxnn.enable_compilation_cache()   # ~/.cache/jaxnn/jax-compilation-cache
    ...                                # jit, fit, predict as usual

It may be called after ``jax`` was imported, and even after programs were
compiled (those are not written back; later ones are). Calling it again with the
same arguments changes nothing; with another folder, later programs go there.

The folder is trusted: a program found there is run. Do not point it at a folder
that other users can write to.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

__all__ = ["CACHE_DIR_ENV", "cache_stats", "default_cache_dir", "enable_compilation_cache"]

CACHE_DIR_ENV = "JAXNN_CACHE_DIR"

# jax.monitoring events recorded by JAX for each program looked up in the cache.
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_MISS_EVENT = "/jax/compilation_cache/cache_misses"
_counts = {"hits": 0, "misses": 0}
_listening = False
_lock = threading.Lock()


def default_cache_dir() -> Path:
    """``$JAXNN_CACHE_DIR``; else ``$XDG_CACHE_HOME/jaxnn/jax-compilation-cache``; else
    ``~/.cache/jaxnn/jax-compilation-cache``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "jaxnn" / "jax-compilation-cache"


def _count(event: str, **kwargs) -> None:
    if event == _HIT_EVENT:
        _counts["hits"] += 1
    elif event == _MISS_EVENT:
        _counts["misses"] += 1


def cache_stats() -> dict[str, int]:
    """``{"hits": h, "misses": m}``: programs this process loaded from the persistent
    cache, and programs it looked up there in vain (and compiled), since the first
    :func:`enable_compilation_cache`."""
    return dict(_counts)


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    *,
    min_compile_seconds: float = 0.0,
    min_entry_bytes: int = 0,
) -> Path:
    """Turn on JAX's persistent compilation cache in ``path`` and return that folder.

    Args:
      path: the cache folder, created if needed (the last part private to the
        user, mode 0o700). None: :func:`default_cache_dir` (``$JAXNN_CACHE_DIR``,
        else ``~/.cache/jaxnn/jax-compilation-cache``).
      min_compile_seconds: only programs that took at least this long to compile
        are written (``jax_persistent_cache_min_compile_time_secs``; JAX's own
        default is 1 s, which on CPU leaves out most training steps of small
        models; 0 writes every program).
      min_entry_bytes: only programs whose serialized size is at least this are
        written (``jax_persistent_cache_min_entry_size_bytes``; 0 for all).

    Raises:
      OSError: the folder cannot be created (the message names it).
      ValueError: a negative ``min_compile_seconds`` or ``min_entry_bytes``.
    """
    if not min_compile_seconds >= 0:
        raise ValueError(f"min_compile_seconds must be >= 0, got {min_compile_seconds!r}")
    if isinstance(min_entry_bytes, bool) or int(min_entry_bytes) != min_entry_bytes or (
            min_entry_bytes < 0):
        raise ValueError(f"min_entry_bytes must be an integer >= 0, got {min_entry_bytes!r}")
    folder = (Path(path).expanduser() if path is not None else default_cache_dir()).absolute()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    global _listening
    with _lock:
        changed = (jax.config.jax_compilation_cache_dir != str(folder)
                   or not jax.config.jax_enable_compilation_cache)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_bytes))
        if changed:
            # JAX opens its cache once, at the first compilation: forget the one it
            # opened (none, or another folder) so that the next compilation uses this one.
            _jax_cache.reset_cache()
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _listening = True
    return folder
