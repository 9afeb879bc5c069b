"""fit over several processes (``jax.distributed.initialize``) against one process.

Two real processes on localhost, 2 forced CPU devices each, train the MNIST MLP
together with ``fit(devices="all")``; a third process, alone with 4 forced CPU
devices, trains it with ``fit(devices=4)``, the same global batch and key
(tests/multiprocess_worker.py). The three run at once.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
TRAIN, BATCH, EPOCHS = 1024, 32, 2  # as in the worker

# float32: the gradients of the 4 devices are summed in another order (by gloo, across
# processes) than in one process. Measured after the 64 Adam steps: at most 1.8e-7
# apart (kernel entries up to ~0.3); 3.8e-7 after 288 steps, 7.7e-7 after 384.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy")  # the coordinator is on localhost
           and not k.startswith("JAX_COMPILATION_CACHE") and not k.startswith(
               "JAX_PERSISTENT_CACHE")}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_all(commands, folder, timeout):
    """Start every ``(name, argv, env)`` at once and wait for all (killing what is left at
    ``timeout`` s); returns ``{name: (returncode, output)}``."""
    started = {}
    for name, argv, env in commands:
        log = open(folder / f"{name}.out", "w")  # noqa: SIM115 - closed below
        started[name] = (subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=WORKER.parent, start_new_session=True), log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p, _ in started.values()):
        time.sleep(0.2)
    results = {}
    for name, (process, log) in started.items():
        if process.poll() is None:
            os.killpg(process.pid, 9)
        code = process.wait()
        log.close()
        results[name] = (code, (folder / f"{name}.out").read_text())
    return results


@pytest.mark.slow  # 3 processes at once: 22 s of CPU with a cold cache (2 epochs of 32 steps)
def test_two_processes_train_as_one_process_over_4_devices(mnist_dir, tmp_path):
    port = _free_port()
    base = [sys.executable, str(WORKER), str(mnist_dir), str(tmp_path)]
    results = _run_all(
        [("reference", [*base, "reference"], _env(4)),
         *((f"process_{i}", [*base, str(i), "2", str(port)], _env(2)) for i in range(2))],
        tmp_path, timeout=300)
    for name, (code, output) in results.items():
        assert code == 0, f"{name} exited with {code}:\n{output[-4000:]}"

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in results}
    saved = {name: np.load(tmp_path / f"{name}.npz") for name in results}
    for i in range(2):
        report = reports[f"process_{i}"]
        assert (report["process_index"], report["process_count"]) == (i, 2)
        assert report["device_count"] == 4
        assert report["params_fully_replicated"]
        assert len(report["params_on_devices"]) == 4  # the devices of both processes

    # The same params as one process over 4 devices, within float32 rounding; the two
    # processes hold identical copies.
    names = [k for k in saved["reference"].files if k.startswith("param ")]
    assert len(names) == 6
    for name in names:
        reference = saved["reference"][name]
        np.testing.assert_array_equal(saved["process_0"][name], saved["process_1"][name])
        np.testing.assert_allclose(saved["process_0"][name], reference, rtol=RTOL, atol=ATOL,
                                   err_msg=name)

    # The history: global means, the same in both processes (``seconds`` is each
    # process's own clock), equal to the reference's within rounding.
    histories = {name: r["history"] for name, r in reports.items()}
    assert sorted(histories["process_0"]) == ["accuracy", "loss", "seconds", "val_accuracy",
                                              "val_loss"]
    for key in ("accuracy", "loss", "val_accuracy", "val_loss"):
        assert histories["process_0"][key] == histories["process_1"][key], key
        np.testing.assert_allclose(histories["process_0"][key], histories["reference"][key],
                                   rtol=RTOL, err_msg=key)

    # Each process read half of every batch: together, each epoch's examples once.
    half = TRAIN // 2
    for i in range(2):
        assert len(saved[f"process_{i}"]["rows"]) == EPOCHS * half
    assert len(saved["reference"]["rows"]) == EPOCHS * TRAIN
    for epoch in range(EPOCHS):
        part = slice(epoch * half, (epoch + 1) * half)
        together = np.concatenate([saved[f"process_{i}"]["rows"][part] for i in range(2)])
        np.testing.assert_array_equal(np.sort(together), np.arange(TRAIN))
        # process 0 holds the first half of each batch of the reference's plan
        plan = saved["reference"]["rows"][epoch * TRAIN:(epoch + 1) * TRAIN].reshape(-1, BATCH)
        np.testing.assert_array_equal(saved["process_0"]["rows"][part],
                                      plan[:, :BATCH // 2].reshape(-1))

    # Only process 0 prints and writes logs and checkpoints.
    def epoch_lines(name):
        return [line for line in results[name][1].splitlines() if line.startswith("Epoch ")]

    assert len(epoch_lines("process_0")) == len(epoch_lines("reference")) == EPOCHS
    assert epoch_lines("process_1") == []
    assert (tmp_path / "process_0" / "log.csv").exists()
    assert len(list((tmp_path / "process_0" / "checkpoints").glob("ckpt_*.npz"))) == EPOCHS
    assert not (tmp_path / "process_1" / "log.csv").exists()
    assert list((tmp_path / "process_1" / "checkpoints").iterdir()) == []

    # What a multi-process run refuses, said in every process.
    for i in range(2):
        errors = reports[f"process_{i}"]["errors"]
        assert "devices='all'" in errors["devices=None"], errors
        assert "2 processes" in errors["devices=None"], errors
        assert "devices='all'" in errors["devices=2"], errors
        assert "random-access source" in errors["batches"], errors
        assert f"no device of process(es) [{1 - i}]" in errors["local devices"], errors
        assert "interleaves processes" in errors["interleaved"], errors
        assert errors["columns, other process first"] == [BATCH // 2, BATCH], errors


def test_devices_all_in_one_process_is_every_device():
    import jax

    from jaxnn._sharding import data_parallel

    parallel = data_parallel("all")
    if jax.device_count() == 1:
        assert parallel is None  # the plain single-device path
    else:
        assert list(parallel.mesh.devices.flat) == jax.devices()
        assert parallel.columns(8 * jax.device_count()) == slice(0, 8 * jax.device_count())
    with pytest.raises(TypeError, match="'all'"):
        data_parallel("cpu")
