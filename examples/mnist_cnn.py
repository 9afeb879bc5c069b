"""The classic MNIST convnet, trained by jaxnn's fit.

(28, 28, 1) -> Conv2D(32, 3x3, ReLU) -> MaxPool(2) -> Conv2D(64, 3x3, ReLU) -> MaxPool(2)
-> Flatten -> Dropout(0.5) -> Dense(10), Adam 1e-3, batch 128, sparse categorical
cross-entropy on logits (the softmax sits in the loss). Trained on all 60,000
images (``--validation-split 0``, seed 0, 11 epochs) it reached 99.17% test accuracy
(98.56% after 3, 99.00% after 9), at about 20 s an epoch on 2 CPU cores (measured
2026-11-28: 3.7 minutes of training). By default the last 10% of the training images
are held out for validation (``--validation-split``); the test set is scored once,
at the end.

Shapes through the network (valid convolutions, non-overlapping pools)::

    (N, 28, 28, 1) -conv-> (N, 26, 26, 32) -pool-> (N, 13, 13, 32)
                   -conv-> (N, 11, 11, 64) -pool-> (N, 5, 5, 64) -flatten-> (N, 1600)
                   -dense-> (N, 10)

How batches reach the model (``--feed``): by default the dataset sits on the device;
``--feed host`` leaves it on the host and ``fit`` streams it in chunks (the path for
data larger than the device's memory; the same batches, the same result). Either way
``fit`` runs ``--steps-per-call 4`` optimisation steps per compiled call, written out
straight-line: on XLA:CPU a convolution step inside a loop ran several times slower
than the same step outside one (``benchmarks/RESULTS.md``).

    python examples/mnist_cnn.py                       # MNIST from the usual sources
    python examples/mnist_cnn.py --data-dir DIR --json # a folder of the four IDX files
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

import jaxnn

# examples/ is not a package: import the sibling example's helpers from its folder.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cli  # noqa: E402
from mnist_mlp import DEFAULT_LR, OPTIMIZERS, checkpointing, load_data  # noqa: E402

DEFAULT_FEED = "device"
DEFAULT_STEPS_PER_CALL = 4  # measured fastest on CPU, see above


def steps_per_call_arg(text: str) -> int | str:
    """``--steps-per-call``: a positive int, or ``epoch`` (one call per epoch)."""
    if text.lower() in ("epoch", "none"):
        return "epoch"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'epoch', got {text!r}")
    return value


def parse_args(argv=None, *, description=None, epochs=11, batch_size=128, feed=DEFAULT_FEED,
               steps_per_call=DEFAULT_STEPS_PER_CALL, default_lr=DEFAULT_LR):
    """The command line shared by the CNN, RNN and Transformer examples (defaults differ
    per example; ``default_lr``: the learning rate per optimizer when ``--lr`` is not given).

    Every flag is checked here: a bad one exits (see ``_cli``) before any work.
    """
    parser = _cli.ArgumentParser(description=description or __doc__.splitlines()[0])
    _cli.add_data_flags(parser, epochs=epochs, batch_size=batch_size, optimizers=OPTIMIZERS,
                        default_lr=default_lr)
    parser.add_argument("--feed", choices=("host", "device"), default=feed,
                        help="device: the dataset put on the device once; host: left on the "
                        "host and streamed to the device in chunks")
    parser.add_argument("--steps-per-call", type=steps_per_call_arg, default=steps_per_call,
                        metavar="N|epoch",
                        help="optimisation steps per compiled call, a positive int or 'epoch' "
                        "(a compiled loop over the epoch's steps)")
    _cli.add_output_flags(parser)
    args = parser.parse_args(argv)
    _cli.check_paths(parser, args)
    return args


def load_images(data_dir, train_limit=None, test_limit=None):
    """``(data, x_train, y_train, x_test, y_test)`` with images as (N, side, side).

    MNIST (side 28), or the 8x8 digits when MNIST can't be had (see
    ``mnist_mlp.load_data``); only the first ``train_limit`` / ``test_limit``
    examples when given.
    """
    data = load_data(data_dir)  # flattened rows (N, side * side)

    def square(x):
        side = math.isqrt(x.shape[1])
        return x.reshape(len(x), side, side)

    return (data, square(data.x_train[:train_limit]), data.y_train[:train_limit],
            square(data.x_test[:test_limit]), data.y_test[:test_limit])


def build_model(image_side=28):
    """The Keras-example convnet, for (N, side, side, 1) images.

    Images smaller than 16 pixels (the 8x8 digits fallback) get "SAME" convolutions
    so that two 3x3-conv / 2x2-pool blocks still fit.
    """
    padding = "VALID" if image_side >= 16 else "SAME"
    return jaxnn.Sequential([
        jaxnn.Conv2D(32, 3, padding=padding), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Conv2D(64, 3, padding=padding), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Flatten(),
        jaxnn.Dropout(0.5),
        jaxnn.Dense(10),
    ])


def train(args, model, data, x_train, y_train, x_test, y_test, cache=(None, None), *,
          schedule=None, default_lr=DEFAULT_LR):
    """Fit, evaluate and summarise (shared with the RNN and Transformer examples); returns
    the summary dict.

    The last ``--validation-split`` of the training examples are held out and scored
    after each epoch; the test examples are scored once, after training. ``cache``:
    what ``_cli.enable_compile_cache`` returned, for the summary. ``schedule``: None for
    a constant learning rate, else ``schedule(lr, total_steps)`` returning the rate
    schedule given to the optimizer (``lr`` its peak, ``total_steps`` those of all
    ``--epochs``). ``default_lr``: the rate per optimizer when ``--lr`` is not given
    (as given to :func:`parse_args`).
    """
    # Validate on examples held out of the training set, not on the test set: choices
    # made while watching a score (epochs, learning rate) tune the model to its data.
    x_train, y_train, x_val, y_val = _cli.hold_out(x_train, y_train, args.validation_split)
    verbose = 0 if args.quiet else 1
    if verbose:
        held = f"{len(x_val):,} validation, " if x_val is not None else ""
        print(f"dataset: {data.name} from {data.source} "
              f"({len(x_train):,} train, {held}{len(x_test):,} test)")

    key = jax.random.key(args.seed)
    init_key, train_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])
    if verbose:
        print(model.summary(x_train[:args.batch_size]))

    lr = args.lr if args.lr is not None else default_lr[args.optimizer]
    ours, theirs = OPTIMIZERS[args.optimizer]
    total_steps = args.epochs * math.ceil(len(x_train) / args.batch_size)  # fit keeps the
    rate = lr if schedule is None else schedule(lr, total_steps)  # ragged last batch
    optimizer = (theirs if args.optax else ours)(rate)
    params, opt_state, initial_epoch, train_key, callbacks = checkpointing(
        args.checkpoint_dir, params, optimizer, train_key, verbose)

    start = time.perf_counter()
    result = jaxnn.fit(
        model, params, x_train, y_train, feed=args.feed,
        loss=jaxnn.losses.sparse_softmax_cross_entropy,
        optimizer=optimizer, key=train_key, epochs=args.epochs, batch_size=args.batch_size,
        opt_state=opt_state, initial_epoch=initial_epoch,
        penalty=jaxnn.regularizers.l2(args.l2) if args.l2 else None, metrics=["accuracy"],
        validation_data=None if x_val is None else (x_val, y_val),
        callbacks=callbacks, steps_per_call=args.steps_per_call, verbose=verbose,
    )
    wall = time.perf_counter() - start
    train_seconds = float(sum(result.history.get("seconds", [])))
    compile_seconds = result.compile_seconds

    # The test set, once, at the end.
    test = jaxnn.evaluate(model, result.params, x_test, y_test,
                          loss=jaxnn.losses.sparse_softmax_cross_entropy)
    predicted = np.asarray(jaxnn.predict(model, result.params, x_test, output="classes"))
    if verbose:
        print(f"test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f} "
              f"({train_seconds:.1f} s training, {compile_seconds:.1f} s compiling)")
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
        "lr_schedule": "constant" if schedule is None else schedule.__name__,
        "l2": args.l2,
        "feed": args.feed,
        "steps_per_call": args.steps_per_call if args.feed == "device" else 1,
        "seed": args.seed,
        "params": jaxnn.count_params(result.params),
        "val_accuracy": result.history.get("val_accuracy", [None])[-1],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "compile_cache": _cli.cache_summary(cache),
        "wall_seconds": wall,
        "history": result.history,
    }
    if verbose:
        print(_cli.cache_line(summary["compile_cache"]))
    if args.json:
        print(json.dumps(summary))
    return summary


def main(argv=None):
    args = parse_args(argv)
    cache = _cli.enable_compile_cache(args)  # a second run loads its programs, not compiles
    with _cli.data_errors():
        data, x_train, y_train, x_test, y_test = load_images(
            args.data_dir, args.train_limit, args.test_limit)
    # Conv2D takes channels-last images: add the single grey channel.
    x_train, x_test = x_train[..., None], x_test[..., None]
    return train(args, build_model(x_train.shape[1]), data, x_train, y_train, x_test, y_test,
                 cache)


if __name__ == "__main__":
    main()
