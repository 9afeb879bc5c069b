"""The classic MNIST multilayer perceptron, trained by a jitted jaxnn loop.

784 -> Dense(64, ReLU) -> Dense(64, ReLU) -> Dense(10, softmax), Adam,
sparse categorical cross-entropy, accuracy, 5 epochs of batch 32, then predict.
The last 10% of the training images (``--validation-split``) are held out and
scored after each epoch; the test set is scored once, at the end.

The model outputs logits and the softmax sits inside the loss
(``sparse_softmax_cross_entropy``): the same maths as a softmax layer followed by
cross-entropy, computed stably. ``predict(..., output="probabilities")`` applies
the softmax for you.

    python examples/mnist_mlp.py                       # MNIST from the usual sources
    python examples/mnist_mlp.py --data-dir DIR --json # a folder of the four IDX files
    python examples/mnist_mlp.py --grad manual         # hand-written backprop (jaxnn.manual)
    python examples/mnist_mlp.py --plot runs/mlp.png   # curves, confusion matrix, errors

Compiled programs are kept in JAX's persistent compilation cache
(``~/.cache/jaxnn/jax-compilation-cache``, ``--cache-dir``, ``$JAXNN_CACHE_DIR``),
so a second run starts without compiling; ``--no-compile-cache`` turns it off.

Every flag is checked before any data is loaded: a bad one stops the example at once
with one line ``error: ...`` and status 2; a bad data folder or file, with status 1
(see ``_cli.py``, shared by the three examples).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxnn
from jaxnn import datasets, manual

# examples/ is not a package: import the shared command-line helpers from this folder.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cli  # noqa: E402

OPTIMIZERS = {
    # name: (jaxnn's own, optax's counterpart)
    "adam": (jaxnn.optimizers.adam, optax.adam),
    "adamw": (jaxnn.optimizers.adamw, optax.adamw),
    "sgd": (jaxnn.optimizers.gradient_descent, optax.sgd),
    "momentum": (lambda lr: jaxnn.optimizers.sgd(lr, momentum=0.9),
                 lambda lr: optax.sgd(lr, momentum=0.9)),
    "nesterov": (lambda lr: jaxnn.optimizers.sgd(lr, momentum=0.9, nesterov=True),
                 lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True)),
}
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.1, "momentum": 0.01, "nesterov": 0.01}


def parse_args(argv=None):
    """The flags, every one checked: a bad one exits (see ``_cli``) before any work."""
    parser = _cli.ArgumentParser(description=__doc__.splitlines()[0])
    _cli.add_data_flags(parser, epochs=5, batch_size=32, optimizers=OPTIMIZERS,
                        default_lr=DEFAULT_LR)
    parser.add_argument("--grad", choices=("autodiff", "manual"), default="autodiff",
                        help="gradients by jax.grad or by the hand-written backward pass "
                        "of jaxnn.manual.MLP")
    _cli.add_output_flags(parser)
    args = parser.parse_args(argv)
    _cli.check_paths(parser, args)
    return args


def load_data(data_dir):
    """MNIST flattened to (N, 784); the bundled 8x8 digits when MNIST can't be had."""
    try:
        return datasets.mnist(data_dir, flatten=True)
    except datasets.DatasetUnavailableError as error:
        if data_dir:
            raise
        print(f"MNIST is not available here:\n{error}\n", file=sys.stderr)
        print("Falling back to scikit-learn's bundled 8x8 handwritten digits (1,797 images) "
              "so that the example still runs. For MNIST, pass --data-dir with the four "
              "IDX files or set JAXNN_DATA_DIR.", file=sys.stderr)
        return datasets.digits(flatten=True)


def build_model():
    return jaxnn.Sequential([
        jaxnn.Dense(64), jaxnn.relu,
        jaxnn.Dense(64), jaxnn.relu,
        jaxnn.Dense(10),
    ])


# build_model() with its backward pass written by hand (same parameter layout)
MANUAL_MODEL = manual.MLP(units=(64, 64, 10), activation="relu")


def checkpointing(directory, params, optimizer, key, verbose):
    """Checkpoint every epoch into ``directory`` and resume from the latest one there.

    Returns ``(params, opt_state, initial_epoch, key, callbacks)`` for ``jaxnn.fit``:
    the checkpoint's values when one exists, else the fresh ones (``opt_state=None``).
    """
    if not directory:
        return params, None, 0, key, []
    callbacks = [jaxnn.callbacks.ModelCheckpoint(directory)]
    with _cli.checkpoint_errors("--checkpoint-dir", directory):
        ckpt = jaxnn.resume(directory, params=params, opt_state=optimizer.init(params))
    if ckpt is None:
        return params, None, 0, key, callbacks
    if verbose:
        print(f"resuming from {ckpt.path} (epoch {ckpt.epoch})")
    return ckpt.params, ckpt.opt_state, ckpt.epoch, ckpt.key, callbacks


def main(argv=None):
    args = parse_args(argv)
    cache = _cli.enable_compile_cache(args)  # a second run loads its programs, not compiles
    with _cli.data_errors():
        data = load_data(args.data_dir)
    x_train, y_train = data.x_train[:args.train_limit], data.y_train[:args.train_limit]
    x_test, y_test = data.x_test[:args.test_limit], data.y_test[:args.test_limit]
    # Validate on examples held out of the training set, not on the test set: choices
    # made while watching a score (epochs, learning rate) tune the model to its data.
    x_train, y_train, x_val, y_val = _cli.hold_out(x_train, y_train, args.validation_split)
    verbose = 0 if args.quiet else 1
    if verbose:
        held = f"{len(x_val):,} validation, " if x_val is not None else ""
        print(f"dataset: {data.name} from {data.source} "
              f"({len(x_train):,} train, {held}{len(x_test):,} test)")

    model = build_model()
    key = jax.random.key(args.seed)
    init_key, train_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])
    if verbose:
        print(model.summary(x_train[:args.batch_size]))

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    ours, theirs = OPTIMIZERS[args.optimizer]
    optimizer = (theirs if args.optax else ours)(lr)
    penalty = jaxnn.regularizers.l2(args.l2) if args.l2 else None
    value_and_grad = None
    if args.grad == "manual":  # the same loss + L2, differentiated by hand
        value_and_grad = MANUAL_MODEL.value_and_grad("softmax_cross_entropy", l2=args.l2)
        penalty = None
    params, opt_state, initial_epoch, train_key, callbacks = checkpointing(
        args.checkpoint_dir, params, optimizer, train_key, verbose)

    start = time.perf_counter()
    result = jaxnn.fit(
        model, params, x_train, y_train,
        loss=jaxnn.losses.sparse_softmax_cross_entropy,
        optimizer=optimizer, key=train_key, epochs=args.epochs, batch_size=args.batch_size,
        opt_state=opt_state, initial_epoch=initial_epoch, penalty=penalty,
        metrics=["accuracy"], validation_data=None if x_val is None else (x_val, y_val),
        callbacks=callbacks, verbose=verbose, value_and_grad=value_and_grad,
    )
    wall = time.perf_counter() - start

    # The test set, once, at the end.
    test = jaxnn.evaluate(model, result.params, x_test, y_test,
                          loss=jaxnn.losses.sparse_softmax_cross_entropy)
    probabilities = jaxnn.predict(model, result.params, x_test, output="probabilities")
    predicted = np.asarray(probabilities.argmax(-1))
    if verbose:
        print(f"test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f} "
              f"({result.compile_seconds:.1f} s compiling the training programs)")
        print("first predictions:", predicted[:10].tolist(), "labels:", y_test[:10].tolist())
    if args.plot:
        saved = _cli.save_plots(args.plot, result.history, x_test, predicted, y_test)
        if verbose:
            print("saved", ", ".join(map(str, saved)))

    summary = {
        "dataset": data.name,
        "source": data.source,
        "train_examples": len(x_train),
        "validation_examples": 0 if x_val is None else len(x_val),
        "test_examples": len(x_test),
        "epochs": result.epoch,
        "batch_size": args.batch_size,
        "optimizer": f"{'optax' if args.optax else 'jaxnn'}.{args.optimizer}",
        "learning_rate": lr,
        "l2": args.l2,
        "seed": args.seed,
        "grad": args.grad,
        "val_accuracy": result.history.get("val_accuracy", [None])[-1],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_seconds": float(sum(result.history.get("seconds", []))),
        "compile_seconds": result.compile_seconds,
        "compile_cache": _cli.cache_summary(cache),
        "wall_seconds": wall,
        "history": result.history,
    }
    if verbose:
        print(_cli.cache_line(summary["compile_cache"]))
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
