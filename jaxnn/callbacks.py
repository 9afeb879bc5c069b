"""Callbacks for :func:`jaxnn.fit`: early stopping, a checkpoint every epoch, and logs
(CSV rows, TensorBoard scalars)."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn._typing import Params, PRNGKey, State

if TYPE_CHECKING:
    from jaxnn.results import FitResult


@dataclasses.dataclass
class TrainBegin:
    """What a callback sees before the first epoch.

    ``initial_epoch`` is the epoch training starts at (0, or the checkpoint's
    epoch when resuming) and ``epochs`` the epoch count it runs to; ``params``,
    ``state``, ``opt_state`` and ``key`` are the values training starts from.
    """

    initial_epoch: int
    epochs: int
    params: Params
    state: State
    opt_state: Any
    key: PRNGKey


@dataclasses.dataclass
class EpochEnd:
    """What a callback sees at the end of an epoch.

    ``epoch`` counts from 0 (the epoch just finished); ``logs`` holds that
    epoch's values (``loss``, ``accuracy``, ``val_loss``, ...). The arrays are
    only valid during the call: the next epoch reuses their buffers, so copy
    anything you keep (``jax.tree_util.tree_map(jnp.copy, info.params)``).
    """

    epoch: int
    logs: dict[str, float]
    params: Params
    state: State
    opt_state: Any
    key: PRNGKey
    history: dict[str, list[float]]


class Callback:
    """Base class for callbacks: override what you need."""

    def on_train_begin(self, info: TrainBegin | None = None) -> None:
        """Called once before the first epoch (``info`` may be None when called
        by code that predates it)."""

    def on_epoch_end(self, info: EpochEnd) -> bool:
        """Called after every epoch; return True to stop training."""
        return False

    def on_train_end(self, result: FitResult) -> FitResult:
        """Called once at the end; may replace the result."""
        return result

    def on_train_interrupted(self, result: FitResult) -> None:
        """Called when Ctrl-C (KeyboardInterrupt) stops training, with the result
        of the last completed epoch (its arrays are valid); ``fit`` then re-raises."""


def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.copy, tree)


def _split_between_processes(a: Any) -> bool:
    """Whether ``a`` is an array split over the devices of several processes
    (``fit(devices="all", shard_params=True)`` after ``jax.distributed.initialize``)."""
    return isinstance(a, jax.Array) and not a.is_fully_addressable and (
        not a.sharding.is_fully_replicated)


def _on_host(tree: Any) -> Any:
    """``tree`` with the arrays split between processes gathered, whole, into each
    process's host memory (a collective: every process calls it); others as they are."""
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(
        lambda a: multihost_utils.process_allgather(a, tiled=True)
        if _split_between_processes(a) else a, tree)


def _writes_files() -> bool:
    """Whether this process writes logs and checkpoints: the only process, or process
    0 of several (after ``jax.distributed.initialize``; every process has the same
    logs and replicated params, so one writes for all)."""
    return jax.process_index() == 0


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    Args:
      monitor: a logged value, e.g. ``"val_loss"`` or ``"val_accuracy"``.
      patience: epochs without improvement to tolerate.
      min_delta: the least change that counts as an improvement.
      mode: ``"min"``, ``"max"``, or ``"auto"`` (max for names with ``acc``, else min).
      restore_best: return the parameters of the best epoch instead of the last.
    """

    def __init__(self, monitor: str = "val_loss", *, patience: int = 3, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = False) -> None:
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"EarlyStopping: mode must be 'min', 'max' or 'auto', got {mode!r}")
        if patience < 0 or min_delta < 0:
            raise ValueError("EarlyStopping: patience and min_delta must be >= 0, got "
                             f"{patience!r} and {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.maximize = mode == "max" or (mode == "auto" and "acc" in monitor)
        self.restore_best = restore_best

    def on_train_begin(self, info: TrainBegin | None = None) -> None:
        self.best = -math.inf if self.maximize else math.inf
        self.best_epoch = -1
        self.wait = 0
        self.best_carry: tuple | None = None
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, info: EpochEnd) -> bool:
        if self.monitor not in info.logs:
            raise KeyError(f"EarlyStopping: monitor {self.monitor!r} is not logged; "
                           f"logged values are {sorted(info.logs)}")
        value = info.logs[self.monitor]
        gain = value - self.best if self.maximize else self.best - value
        if gain > self.min_delta:
            self.best, self.best_epoch, self.wait = value, info.epoch, 0
            if self.restore_best:
                self.best_carry = _copy((info.params, info.state, info.opt_state))
            return False
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = info.epoch
            return True
        return False

    def on_train_end(self, result: FitResult) -> FitResult:
        if self.restore_best and self.best_carry is not None:
            params, state, opt_state = self.best_carry
            return result._replace(params=params, state=state, opt_state=opt_state)
        return result


class ModelCheckpoint(Callback):
    """Save a checkpoint after every epoch into ``directory`` (``ckpt_0001.npz``, ...).

    Each file holds params, state, optimizer state, the number of epochs done,
    the training key and the history so far; writes are atomic (see
    :mod:`jaxnn.checkpoint`). Resume with :func:`jaxnn.resume`.

    The folder holds one run. It is created here (so ``jaxnn.resume(directory,
    ...)`` finds it, empty, on a first run). Before training, a folder holding
    checkpoints is accepted only if this run continues them: ``fit``'s
    ``initial_epoch`` is the latest checkpoint's epoch and its ``key`` the saved
    key (as after ``ckpt = jaxnn.resume(directory, ...)``); otherwise
    :class:`jaxnn.checkpoint.CheckpointConflictError` is raised before any epoch
    runs. An epoch whose params, state or optimizer state hold NaN or inf is
    not saved (a ``RuntimeWarning`` names it), so the last good checkpoint is
    never rotated out. On Ctrl-C the last completed epoch is saved if it is not
    on disk yet. Over several processes, process 0 writes (every process checks
    the folder before training); state split between them
    (``fit(shard_params=...)``) is first gathered by every process, so each host
    holds it whole while it is saved.

    Args:
      directory: the run's folder.
      max_to_keep: how many checkpoints to keep (the latest epochs), or None for all.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3) -> None:
        from jaxnn.checkpoint import CheckpointManager

        self.manager = CheckpointManager(directory, max_to_keep=max_to_keep)
        self.manager.directory.mkdir(parents=True, exist_ok=True)
        self._checked = False

    def on_train_begin(self, info: TrainBegin | None = None) -> None:
        self._checked = False
        if info is not None:
            self.manager.check_continues(initial_epoch=info.initial_epoch, key=info.key)
            self._checked = True

    def _save(self, params, state, opt_state, epoch, key, history) -> None:
        # Arrays split between processes are gathered by all of them, then process 0
        # writes (in one process, saving gathers a sharded array itself).
        params, state, opt_state = _on_host((params, state, opt_state))
        if not _writes_files():
            return
        self.manager.save(params=params, state=state, opt_state=opt_state, epoch=epoch,
                          key=key, metadata={"history": history})

    def on_epoch_end(self, info: EpochEnd) -> bool:
        if not self._checked:  # on_train_begin got no TrainBegin: check before writing
            self.manager.check_continues(initial_epoch=info.epoch, key=info.key)
            self._checked = True
        self._save(info.params, info.state, info.opt_state, info.epoch + 1, info.key,
                   info.history)
        return False

    def on_train_interrupted(self, result: FitResult) -> None:
        # Unchecked: on_train_begin got no TrainBegin and no epoch of this run ended, so
        # the folder was never checked and there is nothing new to save.
        if not self._checked or result.epoch <= 0:
            return
        latest = self.manager.latest_epoch()
        if latest is not None and latest >= result.epoch:
            return
        if any(map(_split_between_processes, jax.tree_util.tree_leaves(
                (result.params, result.state, result.opt_state)))):
            warnings.warn(f"{self.manager.directory}: epoch {result.epoch} not saved on "
                          "Ctrl-C: its state is split between processes, and gathering it "
                          "needs every process (the previous epochs' checkpoints are there)",
                          RuntimeWarning, stacklevel=2)
            return
        self._save(result.params, result.state, result.opt_state, result.epoch, result.key,
                   result.history)


def _epoch_row(info: EpochEnd) -> dict[str, float]:
    """The epoch's logged values, then what ``fit`` records only in the history
    (``seconds``, the epoch's training time), each the history's last entry."""
    row = dict(info.logs)
    for name, values in info.history.items():
        if name not in row and values:
            row[name] = values[-1]
    return row


class CSVLogger(Callback):
    """Write one CSV row per epoch: ``epoch`` and every logged value.

    ``epoch`` counts completed epochs from 1, as the console's ``Epoch 3/10``
    and :attr:`FitResult.epoch`. The other columns are the first epoch's logs
    (``loss``, ``accuracy``, ``val_loss``, ...) in their order, then ``seconds``
    (the epoch's training time, from the history). The columns are fixed by the
    first row: a value missing at a later epoch is left empty, and a name that
    first appears later raises ``ValueError`` (a CSV cannot grow a column
    without rewriting every row; start a new file instead). Each row is written
    and the file closed at the end of its epoch, so a crash keeps every
    finished epoch. Values are written with ``repr``, so they read back exactly.

    With ``append=True`` an existing file is continued (a resumed run): its
    header must list the same columns as this run's first row, else
    ``ValueError`` names both and the file is left as it was. Rows of the
    epochs this run writes again (those after its ``initial_epoch``, written
    after the checkpoint it resumes from) are dropped when its first row is
    written, so the file keeps one row per epoch and matches the resumed
    history. A missing or empty file is started with a header. Over several
    processes, process 0 writes.

    Args:
      path: the CSV file; its folder is created if needed.
      append: continue an existing file instead of overwriting it.
      separator: the field separator.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False,
                 separator: str = ",") -> None:
        self.path = pathlib.Path(path)
        self.append = append
        self.separator = separator
        self.columns: list[str] | None = None

    def _read(self) -> tuple[list[str] | None, list[list[str]]]:
        """The existing file's header and rows (``None, []`` when absent or empty)."""
        if not self.path.exists():
            return None, []
        with open(self.path, newline="") as f:
            lines = list(csv.reader(f, delimiter=self.separator))
        if not lines:
            return None, []
        return lines[0], lines[1:]

    def on_train_begin(self, info: TrainBegin | None = None) -> None:
        self.columns = None
        if not _writes_files():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.append:
            self.path.write_text("")  # a fresh file now, not rows of an older run

    def _drop_rows_after(self, epoch: int, header: list[str], rows: list[list[str]]) -> None:
        """Rewrite the file without the rows of epochs after ``epoch`` (atomically)."""
        kept = [row for row in rows if row and int(row[0]) <= epoch]
        if len(kept) < len(rows):
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f, delimiter=self.separator).writerows([header, *kept])
            os.replace(tmp, self.path)

    def on_epoch_end(self, info: EpochEnd) -> bool:
        if not _writes_files():
            return False
        row = {"epoch": info.epoch + 1, **_epoch_row(info)}
        header: list[str] | None = None
        mode = "a"
        if self.columns is None:
            columns = list(row)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existing, rows = self._read() if self.append else (None, [])
            if existing is None:
                header, mode = columns, "w"
            elif existing != columns:
                raise ValueError(
                    f"CSVLogger: {str(self.path)!r} has columns {existing}, but this run logs "
                    f"{columns}; append to a file written by the same kind of run, or use a "
                    "new path")
            else:
                self._drop_rows_after(info.epoch, existing, rows)
            self.columns = columns
        new = [name for name in row if name not in self.columns]
        if new:
            raise ValueError(
                f"CSVLogger: epoch {info.epoch + 1} logs {new}, which the first epoch did not; "
                f"the columns of {str(self.path)!r} are fixed at {self.columns}")
        with open(self.path, mode, newline="") as f:
            writer = csv.writer(f, delimiter=self.separator)
            if header is not None:
                writer.writerow(header)
            writer.writerow([_csv_value(row.get(name, "")) for name in self.columns])
        return False


def _csv_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | np.integer):
        return str(int(value))
    return repr(float(value))


def _summary_writer_class() -> Any:
    """tensorboardX's ``SummaryWriter``, else PyTorch's (which writes through the
    ``tensorboard`` package); ``ImportError`` with the pip command if neither."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "jaxnn.callbacks.TensorBoard needs tensorboardX: pip install 'jaxnn[tensorboard]' "
                "(or pip install tensorboardX)") from None
    return SummaryWriter


class TensorBoard(Callback):
    """Write every epoch's logged values as TensorBoard scalars.

    Training values go to ``logdir/train`` and the ``val_`` values, without
    the prefix, to ``logdir/validation``, so TensorBoard draws ``loss`` and
    ``val_loss`` as two runs on one chart. The step is the epoch count from 1
    (as the console's ``Epoch 3/10``); ``seconds`` (the epoch's training time)
    is written too. Scalars are stored as float32. Each epoch is flushed, so a
    crash keeps what was written. View with ``tensorboard --logdir LOGDIR``. Over
    several processes, process 0 writes.

    Needs tensorboardX (``pip install 'jaxnn[tensorboard]'``) or PyTorch's
    writer with ``tensorboard`` installed; without either, constructing this
    raises ``ImportError`` with the pip command.

    Args:
      logdir: the folder for the event files (created if needed).
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        self._writer_class = _summary_writer_class()
        self.logdir = pathlib.Path(logdir)
        self._writers: dict[str, Any] = {}

    def _writer(self, run: str) -> Any:
        if run not in self._writers:
            self._writers[run] = self._writer_class(str(self.logdir / run))
        return self._writers[run]

    def on_train_begin(self, info: TrainBegin | None = None) -> None:
        self._close()

    def on_epoch_end(self, info: EpochEnd) -> bool:
        if not _writes_files():
            return False
        step = info.epoch + 1
        for name, value in _epoch_row(info).items():
            run, tag = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
            self._writer(run).add_scalar(tag, float(value), global_step=step)
        for writer in self._writers.values():
            writer.flush()
        return False

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def on_train_end(self, result: FitResult) -> FitResult:
        self._close()
        return result

    def on_train_interrupted(self, result: FitResult) -> None:
        self._close()
