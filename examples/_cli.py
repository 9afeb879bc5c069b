"""The command line shared by the MNIST examples: flag types, path checks, one-line errors.

A bad flag prints one line ``error: ...`` naming the flag and what was expected, and
exits with status 2 (a usage error, as argparse does). A bad data folder or file
(missing, unreadable, corrupt) prints one line ``error: ...`` naming it and exits with
status 1. The examples run every check before they load any data or build any model,
so a mistyped flag fails at once instead of after minutes of loading or training.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import numpy as np

from jaxnn import compilation_cache
from jaxnn.checkpoint import CheckpointError
from jaxnn.datasets import DatasetError

USAGE_ERROR = 2  # a bad flag (argparse's own status for usage errors)
DATA_ERROR = 1  # a bad data folder or file, or a checkpoint that cannot be resumed

DATA_DIR_ENV = "JAXNN_DATA_DIR"  # read by jaxnn.datasets.mnist when no folder is given
# The four files of the MNIST release; jaxnn.datasets.mnist also accepts each one
# uncompressed and with the dotted name (train-images.idx3-ubyte[.gz]).
MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CACHE_DIR_ENV = compilation_cache.CACHE_DIR_ENV  # the compilation cache's folder
DEFAULT_VALIDATION_SPLIT = 0.1  # Keras's habit: 6,000 of MNIST's 60,000 training images
MAX_SEED = 2**32 - 1  # jax.random.key(seed) uses the low 32 bits: larger seeds repeat


def fail(message, status: int):
    """Print ``error: <message>`` on one line to stderr and exit with ``status``."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(status)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with each option's default appended to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # an on/off flag
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line ``error: ...`` (status 2), no usage."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        fail(message, USAGE_ERROR)


# -- flag types: argparse reports "argument --flag: <message>" -------------------------


def _number(text: str, kind, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    expected = f"an integer from 0 to {MAX_SEED}"
    value = _number(text, int, expected)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a positive finite number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def validation_fraction(text: str) -> float:
    value = _number(text, float, "a fraction from 0 to below 1")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to below 1, got {text!r}")
    return value


# -- the flags every example has ------------------------------------------------------


def add_data_flags(parser, *, epochs: int, batch_size: int, optimizers, default_lr):
    """--data-dir, --epochs, --batch-size, --optimizer, --lr, --optax, --l2,
    --validation-split, --train-limit, --test-limit."""
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder with the four MNIST IDX files (default: "
                        f"${DATA_DIR_ENV}, the cache, a download, tensorflow-datasets, "
                        "else scikit-learn's 8x8 digits)")
    parser.add_argument("--epochs", type=positive_int, default=epochs, metavar="N",
                        help="epochs to train in all, counting those of a resumed checkpoint")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                        help="examples per optimisation step")
    parser.add_argument("--optimizer", choices=sorted(optimizers), default="adam",
                        help="the optimizer")
    lrs = ", ".join(f"{lr:g} for {name}" for name, lr in default_lr.items())
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"learning rate (default: {lrs})")
    parser.add_argument("--optax", action="store_true",
                        help="use optax's optimizer instead of jaxnn's own")
    parser.add_argument("--l2", type=non_negative_float, default=0.0,
                        help="L2 penalty on the kernels (jaxnn.regularizers.l2)")
    parser.add_argument("--validation-split", type=validation_fraction,
                        default=DEFAULT_VALIDATION_SPLIT, metavar="FRACTION",
                        help="hold out this fraction of the training examples (the last "
                        "ones) to validate on after each epoch; the test set is used "
                        "once, at the end; 0: no validation")
    parser.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                        help="train (and validate) on the first N training examples only "
                        "(quick runs, tests)")
    parser.add_argument("--test-limit", type=positive_int, default=None, metavar="N",
                        help="test on the first N test examples only")


def add_output_flags(parser):
    """--seed, --plot, --checkpoint-dir, --json, --quiet, --cache-dir, --no-compile-cache."""
    parser.add_argument("--seed", type=seed, default=0,
                        help=f"random seed for initialisation, shuffling and dropout, "
                        f"0 to {MAX_SEED}")
    parser.add_argument("--plot", metavar="FILE",
                        help="save three PNG images: the training curves to FILE (a .png "
                        "name), the test set's confusion matrix to STEM_confusion.png and "
                        "the test digits the model gets wrong to STEM_errors.png beside it")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="save a checkpoint every epoch here, and resume from the "
                        "latest one found there")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the results as the last line")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="JAX's persistent compilation cache: compiled programs are "
                        "saved here and reused by the next run, which then starts faster "
                        f"(default: ${CACHE_DIR_ENV}, else ~/.cache/jaxnn/jax-compilation-cache)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every program afresh: no persistent compilation cache")


def check_paths(parser, args):
    """Check --plot, --checkpoint-dir, --cache-dir and --data-dir (or $JAXNN_DATA_DIR)
    before any work.

    A bad --plot, --checkpoint-dir or --cache-dir is a usage error (status 2); a data folder that is
    missing, unreadable or lacks the MNIST files is a data error (status 1).
    """
    if args.data_dir == "":
        parser.error("--data-dir: expected a folder, got an empty name")
    if args.plot is not None:
        check_plot_file(parser, "--plot", args.plot)
    if args.checkpoint_dir is not None:
        check_output_dir(parser, "--checkpoint-dir", args.checkpoint_dir)
    if args.cache_dir is not None:
        if args.no_compile_cache:
            parser.error("--cache-dir: not with --no-compile-cache (which turns the cache off)")
        check_output_dir(parser, "--cache-dir", args.cache_dir)
    if args.data_dir is not None:
        check_data_dir("--data-dir", args.data_dir)
    elif os.environ.get(DATA_DIR_ENV):
        check_data_dir(DATA_DIR_ENV, os.environ[DATA_DIR_ENV])


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def plot_files(name) -> tuple[Path, Path, Path]:
    """``--plot FILE``'s three images: FILE (the curves), STEM_confusion.png and
    STEM_errors.png in FILE's folder."""
    path = Path(name)
    return (path, path.with_name(f"{path.stem}_confusion{path.suffix}"),
            path.with_name(f"{path.stem}_errors{path.suffix}"))


def check_plot_file(parser, flag: str, name: str) -> None:
    """A .png name in a folder that exists, where its three images can be written."""
    if not name:
        parser.error(f"{flag}: expected a file name, got an empty name")
    path = Path(name)
    if path.is_dir():
        parser.error(f"{flag} {name}: is a folder; expected a file name")
    if path.suffix.lower() != ".png":
        parser.error(f"{flag} {name}: expected a .png file name (the images are PNG)")
    folder = path.parent
    if not folder.exists():
        parser.error(f"{flag} {name}: the folder {folder} does not exist")
    if not folder.is_dir():
        parser.error(f"{flag} {name}: {folder} is not a folder")
    if not _writable(folder) or any(p.exists() and not os.access(p, os.W_OK)
                                    for p in plot_files(path)):
        parser.error(f"{flag} {name}: cannot write there (permission denied)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error(f"{flag} needs matplotlib, which is not installed: pip install matplotlib")


def save_plots(name, history, images, predicted, labels, num_classes=10):
    """Write ``--plot``'s three images (see :func:`plot_files`) and return their paths:
    the training curves, the test set's confusion matrix (rows true, columns
    predicted) and the first 25 test images the model gets wrong."""
    from jaxnn import metrics, plotting

    curves, confusion, errors = plot_files(name)
    plotting.plot_history(history, curves)
    matrix = np.asarray(metrics.confusion_matrix(predicted, labels, num_classes))
    plotting.plot_confusion_matrix(matrix, confusion)
    plotting.plot_misclassified(images, predicted, labels, errors)
    return curves, confusion, errors


def check_output_dir(parser, flag: str, name: str) -> None:
    """A folder that exists and is writable, or that can be created."""
    if not name:
        parser.error(f"{flag}: expected a folder, got an empty name")
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            parser.error(f"{flag} {name}: is a file, not a folder")
        if not _writable(path):
            parser.error(f"{flag} {name}: cannot write there (permission denied)")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        parser.error(f"{flag} {name}: cannot be created, {ancestor} is a file")
    if not _writable(ancestor):
        parser.error(f"{flag} {name}: cannot be created in {ancestor} (permission denied)")


def check_data_dir(origin: str, name: str) -> None:
    """The folder holds the four MNIST files, readable; else exit with status 1.

    Only the names and permissions are checked here; the contents are checked as
    they are read (see ``data_errors``).
    """
    path = Path(name).expanduser()
    if not path.exists():
        fail(f"{origin} {name}: no such folder", DATA_ERROR)
    if not path.is_dir():
        fail(f"{origin} {name}: is a file, not a folder", DATA_ERROR)
    if not os.access(path, os.R_OK | os.X_OK):
        fail(f"{origin} {name}: cannot read the folder (permission denied)", DATA_ERROR)
    missing = []
    for stem in MNIST_STEMS:
        dotted = stem.replace("-idx", ".idx")
        candidates = (stem + ".gz", stem, dotted + ".gz", dotted)
        found = next((path / c for c in candidates if (path / c).is_file()), None)
        if found is None:
            missing.append(f"{stem}[.gz]")
        elif not os.access(found, os.R_OK):
            fail(f"{found}: cannot read the file (permission denied)", DATA_ERROR)
    if missing:
        fail(f"{origin} {name}: the folder lacks the MNIST file(s) {', '.join(missing)}",
             DATA_ERROR)


@contextlib.contextmanager
def data_errors():
    """Turn a data file that cannot be read (corrupt, truncated, unreadable) into one
    ``error:`` line naming it and exit status 1, instead of a traceback."""
    try:
        yield
    except (DatasetError, OSError, ImportError) as error:
        fail(error, DATA_ERROR)


@contextlib.contextmanager
def checkpoint_errors(flag: str, directory):
    """Turn a checkpoint that cannot be resumed (corrupt, another model's) into one
    ``error:`` line and exit status 1, instead of a traceback."""
    try:
        yield
    except (CheckpointError, OSError) as error:
        fail(f"{flag} {directory}: cannot resume: {error}", DATA_ERROR)


# -- validation, and the compilation cache ---------------------------------------------


def hold_out(x, y, fraction):
    """``(x_train, y_train, x_val, y_val)``: the last ``fraction`` of the examples held
    out for validation (as Keras's ``validation_split``), before any shuffling.

    Model choices (epochs, learning rate, architecture) are made on the validation
    scores; the test set is used once, at the end, so that its score is an honest
    estimate. ``fraction`` 0: no validation, ``x_val`` and ``y_val`` are None.
    """
    if not fraction:
        return x, y, None, None
    n_val = int(len(x) * fraction)
    if not 0 < n_val < len(x):
        fail(f"--validation-split {fraction:g} of {len(x):,} training examples leaves "
             f"{n_val} for validation; choose a fraction that leaves both sides, or 0",
             USAGE_ERROR)
    cut = len(x) - n_val
    return x[:cut], y[:cut], x[cut:], y[cut:]


def enable_compile_cache(args):
    """Turn on JAX's persistent compilation cache (``--cache-dir``, else
    ``$JAXNN_CACHE_DIR``, else ``~/.cache/jaxnn/jax-compilation-cache``) unless
    ``--no-compile-cache``. Returns what :func:`cache_summary` takes.

    The cache only saves time: a default folder that cannot be created is a
    one-line warning, and the example runs without it.
    """
    if args.no_compile_cache:
        return None, None
    try:
        folder = compilation_cache.enable_compilation_cache(args.cache_dir)
    except OSError as error:
        if args.cache_dir is not None:
            fail(f"--cache-dir {args.cache_dir}: {error}", USAGE_ERROR)
        text = " ".join(str(error).split())
        print(f"warning: no compilation cache ({text}); pass --cache-dir DIR or "
              "--no-compile-cache", file=sys.stderr)
        return None, None
    return folder, compilation_cache.cache_stats()


def cache_line(summary) -> str:
    """One line for the console: what the compilation cache saved this run."""
    if summary["dir"] is None:
        return "compilation cache: off"
    return (f"compilation cache: {summary['hits']} programs loaded, {summary['misses']} "
            f"compiled and saved ({summary['dir']})")


def cache_summary(cache) -> dict:
    """``{"dir", "hits", "misses"}`` for the JSON summary: the programs this run loaded
    from the compilation cache, and those it compiled (and saved there)."""
    folder, before = cache
    if folder is None:
        return {"dir": None, "hits": 0, "misses": 0}
    now = compilation_cache.cache_stats()
    return {"dir": str(folder), **{k: now[k] - before[k] for k in now}}
