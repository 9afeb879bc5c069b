"""Run by tests/test_checkpoint_runs.py: CheckpointManager saves, each killed part-way.

    python tests/checkpoint_kill_worker.py FOLDER KILL_AT [FOLDER KILL_AT ...]

Each folder already holds the epochs 1 and 2 of a run (see :func:`snapshot`) and
some leftover temporary files; a process saves epoch 3 into it with
``max_to_keep=2``. Each step of the save at which a crash leaves a different state
on disk calls ``jaxnn.checkpoint._crash_hook`` with the step's name (the kill
points). The process prints each name as it is reached and, at the ``KILL_AT``-th
(counting from 1), sends itself SIGKILL. ``KILL_AT`` 0 runs the save to the end,
printing every kill point, then ``done``.

jaxnn is imported once; each save then runs in a child forked from this process
(importing jax in a fresh interpreter per save cost ~0.85 s of CPU each; the saves
use numpy arrays only, so no JAX backend or thread exists when it forks). A child's
stdout and stderr go to FOLDER.out and FOLDER.err; this process prints one JSON
line, ``{FOLDER: the child's exit status}`` (-9: killed by SIGKILL).
"""

import json
import os
import signal
import sys
import traceback

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


def fork_each(pairs: list[tuple[str, int]]) -> dict[str, int]:
    """Run ``main(folder, kill_at)`` for each pair in a child forked from this process."""
    import jaxnn.checkpoint  # noqa: F401  (imported once, before the forks)

    statuses = {}
    for folder, kill_at in pairs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: its output to the folder's files, then exit
            code = 1
            try:
                with open(f"{folder}.out", "w") as out, open(f"{folder}.err", "w") as err:
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    try:
                        main(folder, kill_at)
                        code = 0
                    except BaseException:
                        traceback.print_exc()
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        statuses[folder] = os.waitstatus_to_exitcode(status)
    return statuses


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(fork_each([(args[i], int(args[i + 1])) for i in range(0, len(args), 2)])))
