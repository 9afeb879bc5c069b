"""jaxnn.host_memory: glibc keeps freed memory, so XLA:CPU's temporaries stop page-faulting.

The settings are process-wide, so the checks on the real allocator run in a
fresh interpreter each; the checks of what is asked of ``mallopt`` use a fake.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxnn import host_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# One jitted program whose temporary block is 48 MiB (above the 32 MiB that glibc
# ever serves from its heap by default), run before and after keep_freed_memory;
# the page faults of a call are counted with getrusage.
FAULTS_SCRIPT = textwrap.dedent("""
    import json, resource
    import jax, jax.numpy as jnp
    from jaxnn import host_memory

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    @jax.jit
    def program(x):
        stacked = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.tanh(x)])
        return (stacked @ jnp.ones((x.shape[1], 4), x.dtype)).sum()

    x = jnp.ones((4096, 1024), jnp.float32)

    def per_call(calls):
        counts = []
        for _ in range(calls):
            start = faults()
            jax.block_until_ready(program(x))
            counts.append(faults() - start)
        return counts

    per_call(2)
    before = per_call(5)
    applied = host_memory.keep_freed_memory()
    per_call(4)  # each of the allocator's arenas may map its block once
    after = per_call(11)
    print(json.dumps({"before": before, "after": after, "applied": applied}))
""")

# Started with JAXNN_KEEP_FREED_MEMORY=0: fit leaves the allocator alone; with the variable
# then removed (fit reads it at each call), the next fit applies the settings. The params
# are zeros of init's shapes (init would compile a program of its own).
FIT_SCRIPT = textwrap.dedent("""
    import json, os
    import jax, numpy as np, jaxnn
    from jaxnn import host_memory

    model = jaxnn.Sequential([jaxnn.Dense(3)])
    x = np.ones((8, 4), np.float32)
    y = np.zeros(8, np.int32)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                    jax.eval_shape(model.init, jax.random.key(0), x))

    def fit():
        jaxnn.fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                  optimizer=jaxnn.optimizers.sgd(0.1), key=jax.random.key(1), verbose=0,
                  metrics=(), shuffle=False)
        return host_memory.applied()

    found = {"before": host_memory.applied(), "environment": os.environ[host_memory.ENV_VAR]}
    found["after"] = fit()
    del os.environ[host_memory.ENV_VAR]
    found["after, unset"] = fit()
    print(json.dumps(found))
""")


def _run(script: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter (jaxnn from this checkout, JAX on the CPU,
    JAXNN_KEEP_FREED_MEMORY unset unless ``env`` sets it); its last line, as JSON."""
    environment = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    environment.update({"JAX_PLATFORMS": "cpu", **(env or {})})
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [environment.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environment, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory acts on glibc's malloc only")
def test_xla_temporaries_stop_page_faulting():
    found = _run(FAULTS_SCRIPT)
    assert found["applied"] is True
    pages = 48 * 2**20 // 4096  # the block, in 4 KiB pages
    # Page faults per call, median of the calls: a fresh mapping touched page by
    # page before; the same pages reused after (a thread new to the allocator may
    # still map a block of its own once, hence the median).
    assert statistics.median(found["before"]) > pages / 2, found
    assert statistics.median(found["after"]) < pages / 50, found


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory acts on glibc's malloc only")
# The spellings that turn it off ("off", " OFF ", "no", ...) are read by the same function,
# checked in test_environment_switch.
def test_fit_applies_it_on_cpu_unless_the_environment_says_no():
    found = _run(FIT_SCRIPT, {host_memory.ENV_VAR: "0"})
    assert found == {"before": False, "environment": "0", "after": False,
                     "after, unset": True}


def test_settings_asked_of_mallopt(monkeypatch):
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: mallopt)
    assert host_memory.keep_freed_memory() is True
    assert host_memory.applied() is True
    # M_MMAP_MAX (-4) = 0: never mmap; M_TRIM_THRESHOLD (-1): keep up to 2 GiB - 1 free;
    # M_TOP_PAD (-2): grow the heap by 64 MiB at least
    assert sorted(calls) == sorted([(-4, 0), (-1, 2**31 - 1), (-2, 64 * 2**20)])
    assert host_memory.keep_freed_memory() is True  # idempotent: asks nothing more
    assert len(calls) == 3


def test_refused_setting_reports_false(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: (lambda param, value: 0))
    assert host_memory.keep_freed_memory() is False


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: None)
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("value, enabled", [
    (None, True), ("1", True), ("yes", True), ("On", True), ("0", False), ("false", False),
    (" OFF ", False), ("no", False),
])
def test_environment_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(host_memory.ENV_VAR, value)
    assert host_memory.enabled_by_environment() is enabled


@pytest.mark.parametrize("value", ["", "2", "maybe"])
def test_environment_switch_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv(host_memory.ENV_VAR, value)
    with pytest.raises(ValueError, match="JAXNN_KEEP_FREED_MEMORY"):
        host_memory.enabled_by_environment()
