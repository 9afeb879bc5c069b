"""Callbacks for :func:`jaxnn.fit`: early stopping and a checkpoint every epoch."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxnn._typing import Params, PRNGKey, State

if TYPE_CHECKING:
    from jaxnn.training import FitResult


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
    on disk yet.

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
        self._save(result.params, result.state, result.opt_state, result.epoch, result.key,
                   result.history)
