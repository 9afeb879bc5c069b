"""jaxnn.enable_compilation_cache: a second process loads its programs instead of compiling.

Turning the cache on changes JAX's process-wide configuration, so every run that
does it is a fresh interpreter (a subprocess); this process only checks the
folder rules and the argument checks, which change nothing.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxnn import compilation_cache
from jaxnn.datasets import write_idx

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Compiles a small program before the cache is on (JAX has then already looked for a
# cache and found none), turns it on twice (idempotent), compiles two programs, and
# prints the cache's counts and the folder's files.
SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
import jaxnn

jax.jit(lambda x: x * 2)(1.0)
folder = jaxnn.enable_compilation_cache(sys.argv[1])
assert jaxnn.enable_compilation_cache(sys.argv[1]) == folder

@jax.jit
def mlp(w, x):
    for _ in range(4):
        x = jnp.tanh(x @ w)
    return x.sum()

jax.grad(mlp)(jnp.ones((16, 16)), jnp.ones((8, 16))).block_until_ready()
print(json.dumps({**jaxnn.compilation_cache.cache_stats(), "dir": str(folder),
                  "files": sorted(p.name for p in folder.iterdir())}))
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") and k not in ("JAXNN_CACHE_DIR", "JAXNN_DATA_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _python(*argv, env=None, lines=1):
    """The JSON of the last line printed (of the last ``lines`` lines: a list)."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=300, env=env or _clean_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.strip().splitlines()[-lines:]]
    return printed[-1] if lines == 1 else printed


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXNN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.default_cache_dir() == (
        tmp_path / "xdg" / "jaxnn" / "jax-compilation-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert compilation_cache.default_cache_dir() == (
        pathlib.Path.home() / ".cache" / "jaxnn" / "jax-compilation-cache")
    monkeypatch.setenv("JAXNN_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache.default_cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("kwargs", [{"min_compile_seconds": -1.0},
                                    {"min_compile_seconds": float("nan")},
                                    {"min_entry_bytes": -1}, {"min_entry_bytes": 1.5}])
def test_bad_thresholds_are_errors_before_anything_changes(kwargs, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        compilation_cache.enable_compilation_cache(tmp_path / "cache", **kwargs)
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "cache").exists()


def test_second_process_loads_every_program_from_the_cache(tmp_path):
    folder = tmp_path / "cache"
    first = _python("-c", SCRIPT, str(folder))
    assert first["dir"] == str(folder) and oct(folder.stat().st_mode)[-3:] == "700"
    assert first["hits"] == 0 and first["misses"] >= 2, first
    assert any(name.startswith("jit_mlp") for name in first["files"]), first["files"]
    # The second process, then another folder after the first one: later programs go
    # to the new folder.
    second, other = _python("-c", SCRIPT + (
        "folder = jaxnn.enable_compilation_cache(sys.argv[1] + '-b')\n"
        "jax.jit(lambda x: x - 3)(1.0)\n"
        "print(json.dumps({'dir': str(folder), "
        "'files': sorted(p.name for p in folder.iterdir())}))\n"), str(folder), lines=2)
    assert second["misses"] == 0 and second["hits"] == first["misses"], second
    assert second["files"] == first["files"]  # nothing new was compiled
    assert other["files"] and other["dir"] == f"{folder}-b"
    assert all(name.startswith("jit__lambda") for name in other["files"]), other


def _tiny_mnist(folder, n_train=200, n_test=50):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz",
                  rng.integers(0, 10, n, dtype=np.uint8))
    return folder


@pytest.mark.slow
def test_mlp_example_starts_from_the_cache_the_second_time(tmp_path):
    data, cache = _tiny_mnist(tmp_path / "mnist"), tmp_path / "cache"
    argv = [str(ROOT / "examples" / "mnist_mlp.py"), "--data-dir", str(data), "--epochs", "1",
            "--json", "--quiet"]
    # $JAXNN_CACHE_DIR names the folder; --cache-dir would too.
    env = _clean_env(JAXNN_CACHE_DIR=str(cache))
    cold = _python(*argv, env=env)
    files = sorted(cache.iterdir())
    assert cold["compile_cache"] == {"dir": str(cache), "hits": 0, "misses": len(files)}
    assert files, "the first run wrote no programs"
    warm = _python(*argv, env=env)
    assert warm["compile_cache"] == {"dir": str(cache), "hits": len(files), "misses": 0}
    assert sorted(cache.iterdir()) == files
    assert warm["test_loss"] == cold["test_loss"]  # the same programs, the same numbers
