"""Train on a tensorflow-datasets image dataset, streamed example by example from disk.

The training split is opened with ``jaxnn.datasets.tfds_source`` (tfds's random-access
ArrayRecord source) and given to ``jaxnn.fit`` as ``x`` with ``y=None``: fit draws
each epoch's order, reads the examples in chunks through the source's
``__getitems__`` and streams them to the device, so the split never has to fit in
memory. The validation examples (the last ``--validation-split`` of the training
split) and the test split are read into arrays once, to be scored.

The model is built from the examples' shape and the number of classes:
``--model mlp`` (default), Flatten -> Dense(128, ReLU) -> Dense(classes); or
``--model cnn``, two 3x3-conv / 2x2-pool blocks -> Flatten -> Dense(classes).

    python examples/train_tfds.py                          # Fashion-MNIST, downloaded once
    python examples/train_tfds.py --dataset cifar10 --model cnn
    python examples/train_tfds.py --dataset mnist --manual-dir ../shared/data/mnist  # offline

A dataset is prepared once in tfds's data dir (``--data-dir``, default
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), in the ArrayRecord format:
downloaded by tfds, or offline from ``--manual-dir`` (a folder with the files tfds
would download; for MNIST the four ``.gz`` IDX files). When it is not prepared and
cannot be (``--no-download``, or no network), the example says how to prepare it and
exits with status 2. Needs ``pip install "jaxnn[tfds]"``.
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
from jaxnn import datasets

# examples/ is not a package: import the shared command-line helpers from this folder.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cli  # noqa: E402
from mnist_mlp import checkpointing  # noqa: E402

UNAVAILABLE = 2  # the dataset is not prepared and cannot be (or tfds is not installed)
READ_CHUNK = 2048  # examples per __getitems__ call when reading validation and test sets


def parse_args(argv=None):
    """The flags, every one checked: a bad one exits (see ``_cli``) before any work."""
    parser = _cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", metavar="NAME",
                        help="a tfds image-classification dataset with 'train' and 'test' "
                        "splits, e.g. fashion_mnist, mnist, kmnist, cifar10")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="tfds's folder of prepared datasets (default: $TFDS_DATA_DIR, "
                        "else ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", metavar="DIR",
                        help="prepare the dataset offline from the files in this folder "
                        "(those tfds would download)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download: exit with status 2 if the dataset is not "
                        "prepared and no --manual-dir is given")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the model")
    parser.add_argument("--epochs", type=_cli.positive_int, default=5, metavar="N",
                        help="epochs to train in all, counting those of a resumed checkpoint")
    parser.add_argument("--batch-size", type=_cli.positive_int, default=128, metavar="N",
                        help="examples per optimisation step")
    parser.add_argument("--lr", type=_cli.positive_float, default=1e-3,
                        help="Adam's learning rate")
    parser.add_argument("--validation-split", type=_cli.validation_fraction,
                        default=_cli.DEFAULT_VALIDATION_SPLIT, metavar="FRACTION",
                        help="hold out this fraction of the training examples (the last "
                        "ones) to validate on after each epoch; 0: no validation")
    parser.add_argument("--train-limit", type=_cli.positive_int, default=None, metavar="N",
                        help="train (and validate) on the first N training examples only")
    parser.add_argument("--test-limit", type=_cli.positive_int, default=None, metavar="N",
                        help="test on the first N test examples only")
    _cli.add_output_flags(parser)
    args = parser.parse_args(argv)
    if not args.dataset:
        parser.error("--dataset: expected a tfds dataset name, got an empty name")
    if args.manual_dir is not None and not Path(args.manual_dir).expanduser().is_dir():
        parser.error(f"--manual-dir {args.manual_dir}: no such folder")
    if args.data_dir == "":
        parser.error("--data-dir: expected a folder, got an empty name")
    if args.plot is not None:
        _cli.check_plot_file(parser, "--plot", args.plot)
    for flag, value in (("--checkpoint-dir", args.checkpoint_dir),
                        ("--cache-dir", args.cache_dir)):
        if value is not None:
            _cli.check_output_dir(parser, flag, value)
    if args.cache_dir is not None and args.no_compile_cache:
        parser.error("--cache-dir: not with --no-compile-cache (which turns the cache off)")
    return args


def open_splits(args):
    """``(train, validation, test)`` sources; ``validation`` is None without a split.

    The first one opened prepares the dataset if it must; a dataset that cannot be had
    ends the example here with status 2 and the message saying how to get it.
    """
    def source(split):
        return datasets.tfds_source(args.dataset, split, data_dir=args.data_dir,
                                    manual_dir=args.manual_dir, download=not args.no_download)

    try:
        full = source("train")
        n = min(len(full), args.train_limit or len(full))
        n_val = int(n * args.validation_split)
        if args.validation_split and not 0 < n_val < n:
            _cli.fail(f"--validation-split {args.validation_split:g} of {n:,} training "
                      f"examples leaves {n_val} for validation; choose a fraction that "
                      "leaves both sides, or 0", _cli.USAGE_ERROR)
        train = source(f"train[:{n - n_val}]") if n - n_val < len(full) else full
        validation = source(f"train[{n - n_val}:{n}]") if n_val else None
        test = source("test" if args.test_limit is None else f"test[:{args.test_limit}]")
    except (datasets.DatasetError, ImportError) as error:  # not prepared, cannot be, ...
        flags = ("" if isinstance(error, ImportError) else
                 " (Here: --manual-dir DIR prepares it offline; without --no-download "
                 "tfds downloads it.)")
        _cli.fail(f"{error}{flags}", UNAVAILABLE)
    except ValueError as error:  # tfds does not know the dataset, or it has no such split
        _cli.fail(f"--dataset {args.dataset}: {error}", _cli.USAGE_ERROR)
    return train, validation, test


def read_all(source):
    """A (small) source as two arrays ``(x, y)``, read ``READ_CHUNK`` examples at a time."""
    xs, ys = [], []
    for start in range(0, len(source), READ_CHUNK):
        pairs = source.__getitems__(np.arange(start, min(start + READ_CHUNK, len(source))))
        xs.append(np.stack([x for x, _ in pairs]))
        ys.append(np.stack([y for _, y in pairs]))
    return np.concatenate(xs), np.concatenate(ys)


def build_model(kind: str, image_shape, num_classes: int):
    """The MLP or the small CNN for images of ``image_shape`` (H, W, C)."""
    if kind == "mlp":
        return jaxnn.Sequential([jaxnn.Flatten(), jaxnn.Dense(128), jaxnn.relu,
                                 jaxnn.Dense(num_classes)])
    padding = "VALID" if min(image_shape[:2]) >= 16 else "SAME"
    return jaxnn.Sequential([
        jaxnn.Conv2D(32, 3, padding=padding), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Conv2D(64, 3, padding=padding), jaxnn.relu, jaxnn.MaxPool(2),
        jaxnn.Flatten(),
        jaxnn.Dense(num_classes),
    ])


def main(argv=None):
    args = parse_args(argv)
    cache = _cli.enable_compile_cache(args)
    train, validation, test = open_splits(args)
    x_val, y_val = read_all(validation) if validation is not None else (None, None)
    x_test, y_test = read_all(test)
    verbose = 0 if args.quiet else 1
    x0, _ = train[0]
    num_classes = train.num_classes or int(y_test.max()) + 1
    if verbose:
        held = f"{len(x_val):,} validation, " if x_val is not None else ""
        print(f"dataset: {args.dataset} from tensorflow-datasets ({len(train):,} train "
              f"streamed, {held}{len(x_test):,} test; images {x0.shape}, "
              f"{num_classes} classes)")

    model = build_model(args.model, x0.shape, num_classes)
    init_key, train_key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, x0[None])
    if verbose:
        print(model.summary(np.stack([x0] * min(args.batch_size, 8))))
    optimizer = optax.adam(args.lr)
    params, opt_state, initial_epoch, train_key, callbacks = checkpointing(
        args.checkpoint_dir, params, optimizer, train_key, verbose)

    start = time.perf_counter()
    result = jaxnn.fit(
        model, params, train, None,
        loss="sparse_softmax_cross_entropy", optimizer=optimizer, key=train_key,
        epochs=args.epochs, batch_size=args.batch_size, opt_state=opt_state,
        initial_epoch=initial_epoch, metrics=["accuracy"],
        validation_data=None if x_val is None else (x_val, y_val),
        callbacks=callbacks, verbose=verbose,
    )
    wall = time.perf_counter() - start

    test_logs = jaxnn.evaluate(model, result.params, x_test, y_test,
                               loss="sparse_softmax_cross_entropy")
    predicted = np.asarray(jaxnn.predict(model, result.params, x_test).argmax(-1))
    if verbose:
        print(f"test accuracy {test_logs['accuracy']:.4f}, test loss "
              f"{test_logs['loss']:.4f} ({wall:.1f} s training)")
    if args.plot:
        images = x_test.mean(-1)  # the grid draws grey images: colour ones are averaged
        saved = _cli.save_plots(args.plot, result.history, images, predicted, y_test,
                                num_classes)
        if verbose:
            print("saved", ", ".join(map(str, saved)))

    summary = {
        "dataset": args.dataset,
        "source": "tensorflow-datasets",
        "model": args.model,
        "input_shape": list(x0.shape),
        "num_classes": num_classes,
        "train_examples": len(train),
        "validation_examples": 0 if x_val is None else len(x_val),
        "test_examples": len(x_test),
        "epochs": result.epoch,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "val_accuracy": result.history.get("val_accuracy", [None])[-1],
        "test_accuracy": test_logs["accuracy"],
        "test_loss": test_logs["loss"],
        "train_seconds": float(sum(result.history.get("seconds", []))),
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
