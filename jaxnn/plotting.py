"""Figures of training: history curves, a confusion matrix, misclassified images.

matplotlib is optional (``pip install 'jaxnn[examples]'``) and imported only
when a function here is called, so ``import jaxnn`` never loads it. Each
function returns a :class:`matplotlib.figure.Figure` that is not registered
with pyplot: no window opens and nothing accumulates in pyplot's figure list.
A notebook shows it as a cell's value; ``path=`` saves it as PNG through the
Agg backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_PIP = "pip install 'jaxnn[examples]' (or pip install matplotlib)"


def _figure(width: float, height: float) -> Any:
    """A new Figure drawn by Agg, outside pyplot; ImportError with the pip command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"jaxnn.plotting needs matplotlib: {_PIP}") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike | None) -> None:
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fig.savefig(path, format="png", dpi=100)


def _families(history: Mapping[str, Sequence[float]]) -> list[str]:
    """Panel names: ``loss`` first, then the other metrics in the history's order,
    ``learning_rate`` last; ``val_x`` joins ``x``'s panel; ``seconds`` is left out."""
    names: list[str] = []
    for name in history:
        base = name[4:] if name.startswith("val_") else name
        if base not in names and base != "seconds":
            names.append(base)
    last = [n for n in ("learning_rate",) if n in names]
    first = [n for n in ("loss",) if n in names]
    return first + [n for n in names if n not in first + last] + last


def plot_history(history: Any, path: str | os.PathLike | None = None) -> Any:
    """Draw the training curves of a history, one panel per metric.

    Each panel holds a value and its ``val_`` counterpart: ``loss`` with
    ``val_loss``, ``accuracy`` with ``val_accuracy``, ..., and
    ``learning_rate`` if logged, labelled "training" and "validation". The x
    axis is the epoch count from 1 (as the console's ``Epoch 3/10``) with
    integer ticks. ``seconds`` (time per epoch) is not drawn.

    Args:
      history: ``{"loss": [...], "val_loss": [...], ...}`` as in
        :attr:`jaxnn.FitResult.history`, or the :class:`~jaxnn.FitResult` itself.
      path: if given, the figure is also saved there as PNG.

    Returns:
      The :class:`matplotlib.figure.Figure`.

    Raises:
      ImportError: matplotlib is not installed (the message gives the pip command).
      ValueError: the history holds nothing to draw.
    """
    if not isinstance(history, Mapping):
        history = getattr(history, "history", history)
    if not isinstance(history, Mapping):
        raise TypeError("plot_history: history must be a dict of lists (FitResult.history) "
                        f"or a FitResult, got {type(history).__name__}")
    families = _families(history)
    if not families or not any(len(history.get(n, ())) for n in history):
        raise ValueError(f"plot_history: nothing to draw; history has {sorted(history)}")
    cols = min(len(families), 3)
    rows = math.ceil(len(families) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)  # first: the ImportError with the pip command
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, family in zip(axes, families):
        for name, label, style in ((family, "training", "-o"),
                                   ("val_" + family, "validation", "--s")):
            values = np.asarray(history.get(name, ()), dtype=float)
            if values.size:
                epochs = np.arange(1, values.size + 1)
                ax.plot(epochs, values, style, label=label, markersize=3)
        ax.set_title(family)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if family == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in axes[len(families):]:
        ax.set_visible(False)
    _save(fig, path)
    return fig


def plot_confusion_matrix(matrix: Any, path: str | os.PathLike | None = None,
                          class_names: Sequence[str] | None = None) -> Any:
    """Draw a confusion matrix as a heat map with the count in each cell.

    Args:
      matrix: ``(C, C)`` counts, ``matrix[i, j]`` = examples of true class ``i``
        predicted as ``j`` (rows true, columns predicted), as
        :func:`jaxnn.metrics.confusion_matrix` returns.
      path: if given, the figure is also saved there as PNG.
      class_names: ``C`` labels for the ticks; the class ids if None.

    Returns:
      The :class:`matplotlib.figure.Figure`.
    """
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError("plot_confusion_matrix: matrix must be square (C, C) counts with "
                         f"rows = true class, columns = predicted; got shape {m.shape}")
    c = m.shape[0]
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"plot_confusion_matrix: class_names has {len(names)} names for a "
                         f"{c}x{c} matrix")
    side = max(4.0, 0.5 * c + 2.0)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(m, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xticks(range(c), names, rotation=45 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(range(c), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = m.sum()
    correct = np.trace(m)
    accuracy = f", accuracy {correct / total:.2%}" if total else ""
    ax.set_title(f"confusion matrix ({int(total)} examples{accuracy})")
    if c <= 30:  # beyond that the numbers do not fit in the cells
        threshold = m.max() / 2 if m.size else 0
        integral = np.issubdtype(m.dtype, np.integer) or np.all(m == np.round(m))
        for i in range(c):
            for j in range(c):
                text = f"{int(m[i, j])}" if integral else f"{m[i, j]:.2g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > threshold else "black")
    _save(fig, path)
    return fig


def _as_images(images: Any) -> np.ndarray:
    """``(n, H, W)`` or ``(n, H, W, 3)`` from ``(n, H, W)``, ``(n, H*W)`` (square) or
    ``(n, H, W, 1)``."""
    x = np.asarray(images, dtype=float)
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError("plot_misclassified: flat images must have a square number of "
                             f"pixels (784 = 28x28); got shape {x.shape}")
        return x.reshape(x.shape[0], side, side)
    if x.ndim == 4 and x.shape[-1] == 1:
        return x[..., 0]
    if x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3):
        return x
    raise ValueError("plot_misclassified: images must be (n, 28, 28), (n, 784) or "
                     f"(n, H, W, 1); got shape {x.shape}")


def _as_classes(values: Any, n: int, what: str) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim == 2:  # scores or one-hot rows
        v = v.argmax(axis=-1) if v.shape[0] else v.reshape(0)
    if v.shape != (n,):
        raise ValueError(f"plot_misclassified: {what} must be (n,) class ids (or (n, C) "
                         f"scores) with n = {n} images; got shape {np.shape(values)}")
    return v.astype(int)


def plot_misclassified(images: Any, predicted: Any, true: Any,
                       path: str | os.PathLike | None = None, max_images: int = 25) -> Any:
    """Draw the misclassified examples in a grid, titled "predicted p / true t".

    Only the examples whose ``predicted`` differs from ``true`` are drawn, the
    first ``max_images`` of them in order. With none (or ``n = 0``) the figure
    says so.

    Args:
      images: ``(n, 28, 28)``, ``(n, 784)`` (any square number of pixels) or
        ``(n, H, W, 1)``.
      predicted: ``(n,)`` predicted class ids, or ``(n, C)`` scores (argmax taken).
      true: ``(n,)`` true class ids, or ``(n, C)`` one-hot.
      path: if given, the figure is also saved there as PNG.
      max_images: the most examples to draw.

    Returns:
      The :class:`matplotlib.figure.Figure`.
    """
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"plot_misclassified: max_images must be a positive int, "
                         f"got {max_images!r}")
    x = _as_images(images)
    n = x.shape[0]
    pred = _as_classes(predicted, n, "predicted")
    label = _as_classes(true, n, "true")
    wrong = np.flatnonzero(pred != label)
    shown = wrong[:max_images]
    if shown.size == 0:
        fig = _figure(4.0, 2.0)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified examples\n(of {n})", ha="center", va="center",
                fontsize=12, transform=ax.transAxes)
        _save(fig, path)
        return fig
    cols = min(5, shown.size)
    rows = math.ceil(shown.size / cols)
    fig = _figure(1.9 * cols, 2.1 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, i in zip(axes, shown):
        ax.imshow(x[i], cmap="gray_r" if x.ndim == 3 else None, interpolation="nearest")
        ax.set_title(f"predicted {pred[i]} / true {label[i]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[shown.size:]:
        ax.set_visible(False)
    fig.suptitle(f"{shown.size} of {wrong.size} misclassified (of {n} examples)")
    _save(fig, path)
    return fig
