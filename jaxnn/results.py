"""What :func:`jaxnn.fit` returns, and the two ways it can stop early with its work kept."""

from __future__ import annotations

from typing import Any, NamedTuple

from jaxnn._typing import Params, PRNGKey, State


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params, state, opt_state: the trained values.
      history: ``{"loss": [...], "accuracy": [...], "val_loss": [...], ...}``, one
        entry per epoch run.
      epoch: the number of epochs completed (the ``initial_epoch`` to resume from).
      key: the key training used (epoch ``e`` used ``fold_in(key, e)``).
      compile_seconds: time spent compiling the training programs (it is not
        counted in ``history["seconds"]``, the training time of each epoch).
    """

    params: Params
    state: State
    opt_state: Any
    history: dict[str, list[float]]
    epoch: int
    key: PRNGKey
    compile_seconds: float = 0.0


class NonFiniteError(FloatingPointError):
    """Training met a loss or a gradient that is NaN or inf.

    Attributes:
      result: a :class:`FitResult` at the last good point: the params, state and
        optimizer state before the failing step (``step`` steps into epoch
        ``epoch``), and the history of the epochs completed before it.
      epoch: the failing epoch, counting from 0 (``result.epoch`` equals it).
      step: the failing step within that epoch, counting from 0.
      what: ``"the loss is"``, ``"the gradient is"`` or ``"the loss and the gradient
        are"`` (NaN or inf).
    """

    def __init__(self, message: str, result: FitResult, epoch: int, step: int, what: str):
        super().__init__(message)
        self.result = result
        self.epoch = epoch
        self.step = step
        self.what = what


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) stopped :func:`fit`; ``result`` is the
    :class:`FitResult` of the last completed epoch (``result.epoch`` epochs done),
    ready to resume from with ``initial_epoch=result.epoch``. A ``except
    KeyboardInterrupt`` clause catches it as before."""

    def __init__(self, result: FitResult):
        super().__init__(f"training interrupted after {result.epoch} completed epoch(s); "
                         "the exception's .result holds them")
        self.result = result
