"""Ctrl-C keeps the work: a real SIGINT during compile, during an epoch and during a
checkpoint save (tests/interrupt_worker.py), and one sent from outside."""

import json
import pathlib
import signal
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("interrupt_worker.py")
# (mode, the epochs the exception's result holds, checkpoints on disk after it)
EXPECTED = {"compile": (0, 0), "epoch": (2, 2), "save": (3, 3)}


def _reports(stdout: str) -> dict:
    return {r["mode"]: r for r in map(json.loads, (line for line in stdout.splitlines()
                                                     if line.startswith("{")))}


@pytest.fixture(scope="module")
def in_process_signals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupted")
    done = subprocess.run([sys.executable, str(WORKER), str(folder), *EXPECTED],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return _reports(done.stdout)


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_sigint_keeps_the_last_completed_epoch(in_process_signals, mode):
    report = in_process_signals[mode]
    epochs, saved = EXPECTED[mode]
    assert report["raised"] == "TrainingInterrupted" and report["is_keyboard_interrupt"]
    assert report["epoch"] == epochs and report["history"] == epochs
    assert report["equals_uninterrupted"]  # nothing lost, nothing half-applied
    assert len(report["checkpoints"]) == saved and report["leftovers"] == []
    if saved:  # the last completed epoch is on disk, exactly the values handed back
        assert report["latest_epoch"] == epochs and report["equals_latest_checkpoint"]


@pytest.mark.slow
def test_sigint_from_outside_mid_training(tmp_path):
    worker = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "external"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in worker.stdout:
            if line.startswith("epoch 2 ended"):
                worker.send_signal(signal.SIGINT)
                break
        stdout, stderr = worker.communicate(timeout=300)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr[-3000:]
    report = _reports(stdout)["external"]
    assert report["raised"] == "TrainingInterrupted"
    assert 2 <= report["epoch"] < 6 and report["history"] == report["epoch"]
    assert report["latest_epoch"] == report["epoch"] and report["equals_latest_checkpoint"]
    assert report["equals_uninterrupted"] and report["leftovers"] == []
