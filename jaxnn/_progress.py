"""What ``verbose`` prints: a progress bar per epoch (``verbose=1``), moved by
``fit`` after each compiled chunk of steps."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

_VERBOSE = (0, 1, 2)


# verbose=1: the device-resident epoch runs as about this many chunks, the bar moved after each
PROGRESS_UPDATES = 20


# Without a terminal (a pipe, a log file) a progress line is written at most this often
_PLAIN_LINE_SECONDS = 10.0


def check_verbose(verbose, where: str = "fit") -> int:
    """``verbose`` as 0, 1 or 2; ``True``/``False`` count as 1/0 (Python's bools are ints)."""
    if isinstance(verbose, bool | int | np.integer) and int(verbose) in _VERBOSE:
        return int(verbose)
    raise ValueError(f"{where}: verbose must be 0 (silent), 1 (a progress bar per epoch) or 2 "
                     f"(one line per epoch), got {verbose!r}")


class Progress:
    """The progress bar of ``verbose=1``, one per epoch, drawn on ``stream``.

    On a terminal: tqdm's bar when tqdm is importable, else a line redrawn with
    ``\\r``. Elsewhere (a pipe, a file): no ``\\r`` ever, a plain progress line at
    most every :data:`_PLAIN_LINE_SECONDS`. :meth:`update` may be called from
    XLA's callback thread while the compiled epoch runs; updates for another
    epoch than the current one are ignored.
    """

    def __init__(self, epochs: int, stream=None):
        self.stream = sys.stdout if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.epochs = epochs
        self.lock = threading.Lock()
        self.epoch: int | None = None
        self.steps: int | None = None
        self.drawn = False  # a partial bar line is on the terminal
        self.bar = None  # tqdm's bar, when tqdm draws it
        self.tqdm = None
        if self.terminal:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            self.tqdm = tqdm

    def start(self, epoch: int, steps: int | None) -> None:
        """A new bar for ``epoch`` (counting from 0) of ``steps`` steps (None: unknown)."""
        with self.lock:
            self.epoch, self.steps, self.done = epoch, steps, 0
            self.started = self.last_line = time.perf_counter()
            if self.tqdm is not None:
                self.bar = self.tqdm(total=steps, desc=f"Epoch {epoch + 1}/{self.epochs}",
                                     file=self.stream, leave=False, unit="step")
            elif self.terminal:
                self._draw()

    def update(self, epoch: int, done: int) -> None:
        """``done`` steps of ``epoch`` have run."""
        with self.lock:
            if epoch != self.epoch or done <= self.done:
                return
            if self.bar is not None:
                self.bar.update(done - self.done)
                self.done = done
                return
            self.done = done
            if self.terminal:
                self._draw()
            elif time.perf_counter() - self.last_line >= _PLAIN_LINE_SECONDS:
                self.last_line = time.perf_counter()
                self.stream.write(self._text() + "\n")
                self.stream.flush()

    def _text(self) -> str:
        elapsed = time.perf_counter() - self.started
        head = f"Epoch {self.epoch + 1}/{self.epochs}"
        if not self.steps:
            return f"{head} - step {self.done} - {elapsed:.1f}s"
        width = 30
        filled = width * self.done // self.steps
        arrow = ">" if filled < width else ""
        bar = "=" * filled + arrow + "." * (width - filled - len(arrow))
        eta = elapsed / self.done * (self.steps - self.done) if self.done else float("nan")
        return (f"{head} [{bar}] {self.done}/{self.steps} - {elapsed:.1f}s"
                + (f" - ETA {eta:.1f}s" if self.done < self.steps and self.done else ""))

    def _draw(self) -> None:
        text = self._text()
        self.stream.write("\r" + text.ljust(getattr(self, "width", 0)))
        self.width = len(text)
        self.stream.flush()
        self.drawn = True

    def _clear(self) -> None:
        """Remove the bar (caller holds the lock)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.drawn:
            self.stream.write("\r" + " " * getattr(self, "width", 0) + "\r")
            self.drawn = False

    def finish(self, line: str | None = None) -> None:
        """End the current bar and write ``line`` (the epoch's summary) in its place."""
        with self.lock:
            self._clear()
            self.epoch = None
            if line is not None:
                self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, line: str) -> None:
        """A line of its own (e.g. the compile time), outside any bar."""
        with self.lock:
            self._clear()
            self.stream.write(line + "\n")
            self.stream.flush()
