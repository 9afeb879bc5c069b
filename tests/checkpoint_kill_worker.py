"""Run by tests/test_checkpoint_runs.py: one CheckpointManager save, killed part-way.

    python tests/checkpoint_kill_worker.py FOLDER KILL_AT

The folder already holds the epochs 1 and 2 of a run (see :func:`snapshot`) and
some leftover temporary files; this process saves epoch 3 with ``max_to_keep=2``.
Each step of the save at which a crash leaves a different state on disk calls
``jaxnn.checkpoint._crash_hook`` with the step's name (the kill points). The
worker prints each name as it is reached and, at the ``KILL_AT``-th (counting
from 1), sends itself SIGKILL. ``KILL_AT`` 0 runs the save to the end, printing
every kill point, then ``done``.
"""

import os
import signal
import sys

import numpy as np

MAX_TO_KEEP = 2
KEY = np.array([0, 7], np.uint32)  # a legacy (uint32) PRNG key: saved as it is


def snapshot(epoch: int) -> dict:
    """The params saved at ``epoch``: different values at every epoch."""
    return {"b": np.full(3, epoch, np.float32),
            "w": np.arange(6, dtype=np.float32).reshape(2, 3) * epoch}


def main(folder: str, kill_at: int) -> None:
    import jaxnn.checkpoint as checkpoint

    reached = 0

    def hook(point: str) -> None:
        nonlocal reached
        reached += 1
        print(point, flush=True)
        if reached == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._crash_hook = hook
    manager = checkpoint.CheckpointManager(folder, max_to_keep=MAX_TO_KEEP)
    manager.save(params=snapshot(3), epoch=3, key=KEY, metadata={"epoch": 3})
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
