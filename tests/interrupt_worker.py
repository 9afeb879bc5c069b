"""Worker for tests/test_interrupt.py: Ctrl-C (a real SIGINT) during fit, at chosen points.

    python tests/interrupt_worker.py FOLDER MODE [MODE ...]

For each MODE, fit trains a small MLP for 6 epochs with a ModelCheckpoint in
FOLDER/MODE, and the process sends itself SIGINT at one point:

* ``compile``: right after the first program of the first epoch is compiled;
* ``epoch``: after the third epoch's compiled calls are dispatched, before its
  results are read back;
* ``save``: inside the third epoch's checkpoint save, between writing the
  temporary file and renaming it onto its final name;
* ``external``: none: the parent sends SIGINT once the worker prints that the
  second epoch ended (the run is slowed by a callback so the signal lands inside
  training).

Per mode it prints one JSON line: what was raised, the epoch the exception's
result holds, what the checkpoint folder holds, and whether the result equals
the latest checkpoint and an uninterrupted fit of that many epochs.
"""

import json
import os
import pathlib
import signal
import sys
import time

import jax
import numpy as np
import optax

import jaxnn
from jaxnn import _chunks

EPOCHS = 6


def sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def patched(owner, name, after_calls, before=False):
    """Replace ``owner.name`` by a wrapper that sends SIGINT at its call number
    ``after_calls`` (after the original returns, or ``before`` it runs)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == after_calls:
            sigint()
        out = original(*args, **kwargs)
        if not before and calls[0] == after_calls:
            sigint()
        return out

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


class Slow(jaxnn.callbacks.Callback):
    """Prints each epoch's end and sleeps, so an outside signal lands mid-training."""

    def on_epoch_end(self, info):
        print(f"epoch {info.epoch + 1} ended", flush=True)
        time.sleep(0.3)
        return False


def main() -> None:
    # Python raises KeyboardInterrupt on SIGINT only when SIGINT was not ignored at its
    # start; a test run started in the background (`cmd &`) passes SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    folder = pathlib.Path(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=256).astype(np.int32)
    model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dense(4)])
    params = model.init(jax.random.key(0), x[:1])
    kwargs = dict(loss="sparse_softmax_cross_entropy", optimizer=optax.adam(1e-2),
                  key=jax.random.key(1), batch_size=32, verbose=0)

    for mode in sys.argv[2:]:
        directory = folder / mode
        callbacks = [jaxnn.callbacks.ModelCheckpoint(directory, max_to_keep=None)]
        if mode == "compile":
            undo = patched(jax.stages.Lowered, "compile", 1)
        elif mode == "epoch":
            undo = patched(_chunks.ChunkRunner, "run", 3)
        elif mode == "save":
            undo = patched(os, "replace", 3, before=True)
        else:
            undo = lambda: None
            callbacks.append(Slow())
            print("ready", flush=True)
        raised, result = None, None
        try:
            jaxnn.fit(model, params, x, y, epochs=EPOCHS, callbacks=callbacks, **kwargs)
        except KeyboardInterrupt as error:
            raised = error
            result = getattr(error, "result", None)
        finally:
            undo()
        report = {"mode": mode, "raised": type(raised).__name__,
                  "is_keyboard_interrupt": isinstance(raised, KeyboardInterrupt)}
        if result is not None:
            report["epoch"] = result.epoch
            report["history"] = len(result.history.get("loss", []))
            saved = jaxnn.checkpoint.list_checkpoints(directory)
            report["checkpoints"] = [p.name for p in saved]
            report["leftovers"] = sorted(p.name for p in directory.iterdir()
                                         if p not in saved) if directory.exists() else []
            latest = jaxnn.resume(directory, params=params,
                                  opt_state=optax.adam(1e-2).init(params)) if saved else None
            report["latest_epoch"] = None if latest is None else latest.epoch

            def same(a, b):
                return all(np.array_equal(p, q) for p, q in zip(jax.tree_util.tree_leaves(a),
                                                                jax.tree_util.tree_leaves(b)))

            report["equals_latest_checkpoint"] = latest is not None and same(
                (result.params, result.opt_state), (latest.params, latest.opt_state))
            if result.epoch:
                straight = jaxnn.fit(model, params, x, y, epochs=result.epoch, **kwargs).params
            else:
                straight = params
            report["equals_uninterrupted"] = same(result.params, straight)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
