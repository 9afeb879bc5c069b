"""What every part of the throughput benchmark shares: models, FLOPs, frameworks, timing.

This module imports only numpy, so the orchestrator (``throughput.py``) and each
framework's worker process can use it whatever else is installed.

The models (all trained with Adam 1e-3 on softmax cross-entropy with integer
labels, on MNIST-shaped data: 28x28 images, 10 classes):

* ``mlp32``, ``mlp128``: Flatten -> Dense(64) relu -> Dense(64) relu -> Dense(10),
  batch 32 and 128. Input ``(N, 784)``.
* ``cnn``: Conv2D(32, 3x3) relu -> MaxPool(2) -> Conv2D(64, 3x3) relu -> MaxPool(2)
  -> Flatten -> Dropout(0.5) -> Dense(10), valid convolutions, batch 128. Input
  ``(N, 28, 28, 1)`` (PyTorch: ``(N, 1, 28, 28)``).
* ``lstm``: LSTM(128) over the 28 rows of 28 pixels, the last hidden state ->
  Dense(10), batch 128. Input ``(N, 28, 28)``.
* ``transformer``: the 28 rows as 28 tokens -> Dense(64) -> + a learned position
  table (28, 64) -> 2 pre-norm Transformer encoder blocks (4 heads of 16, MLP 128,
  ReLU, no dropout; PyTorch's ``nn.TransformerEncoderLayer(norm_first=True)``) ->
  LayerNorm -> mean over the tokens -> Dense(10), batch 128 (the model of
  ``examples/mnist_transformer.py``, trained here at a constant rate). Input
  ``(N, 28, 28)``.

FLOPs are counted analytically: each multiply-add of a matmul or convolution is
2 FLOPs; bias adds, activations, pooling, softmax and the optimiser update are
left out (together under a few percent here; ``tests/test_benchmarks.py`` checks
the forward counts against XLA's own cost analysis). Training a layer costs its
forward pass, the same again for the weight gradient, and the same again for the
gradient with respect to its input, except where that input does not depend on
the parameters (the first layer's input; the LSTM's initial state ``h_0 = 0``)::

    dense(i, o)          = 2 * i * o
    conv(oh, ow, k, c, f) = 2 * oh * ow * k * k * c * f

    MLP   forward = dense(784, 64) + dense(64, 64) + dense(64, 10)   = 109,824
          train   = 3 * forward - dense(784, 64)                     = 229,120
    CNN   forward = conv(26, 26, 3, 1, 32) + conv(11, 11, 3, 32, 64)
                    + dense(1600, 10)                                = 4,881,920
          train   = 3 * forward - conv(26, 26, 3, 1, 32)             = 14,256,384
    LSTM  forward = 28 * (dense(28, 512) + dense(128, 512)) + dense(128, 10) = 4,475,392
          train   = 2 * forward + 27 * dense(128, 512) + dense(128, 10)      = 12,492,288

The Transformer, with L = 28 tokens, D = 64, MLP width M = 128 (the attention's two
products, Q K^T and A V, cost 2 * L * L * D each whatever the number of heads)::

    block = L * (4 * dense(D, D) + dense(D, M) + dense(M, D)) + 2 * (2 * L * L * D)
          = 1,835,008 + 200,704                                      = 2,035,712
    Transformer forward = L * dense(28, D) + 2 * block + dense(D, 10) = 4,173,056
                train   = 3 * forward - L * dense(28, D)              = 12,418,816

(both operands of each attention product depend on the parameters, so each has
both input gradients, like a matmul layer's weight and input gradients.)
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

IMAGE_SIDE = 28
CLASSES = 10
LEARNING_RATE = 1e-3


def dense_flops(n_in: int, n_out: int) -> int:
    """FLOPs of ``(1, n_in) @ (n_in, n_out)``: one multiply-add (2 FLOPs) per weight."""
    return 2 * n_in * n_out


def conv_flops(out_h: int, out_w: int, kernel: int, c_in: int, c_out: int) -> int:
    """FLOPs of a ``kernel x kernel`` convolution producing ``(out_h, out_w, c_out)``."""
    return 2 * out_h * out_w * kernel * kernel * c_in * c_out


def mlp_flops() -> tuple[int, int]:
    """``(forward, training)`` FLOPs per sample of the 784-64-64-10 MLP."""
    first, hidden, head = dense_flops(784, 64), dense_flops(64, 64), dense_flops(64, 10)
    forward = first + hidden + head
    return forward, 3 * forward - first


def cnn_flops() -> tuple[int, int]:
    """``(forward, training)`` FLOPs per sample of the two-block MNIST convnet."""
    conv1 = conv_flops(26, 26, 3, 1, 32)  # 28 -> 26, pool -> 13
    conv2 = conv_flops(11, 11, 3, 32, 64)  # 13 -> 11, pool -> 5
    head = dense_flops(5 * 5 * 64, CLASSES)
    forward = conv1 + conv2 + head
    return forward, 3 * forward - conv1


def lstm_flops(steps: int = 28, features: int = 28, units: int = 128) -> tuple[int, int]:
    """``(forward, training)`` FLOPs per sample of LSTM(units) over ``steps`` rows + Dense(10)."""
    projection = dense_flops(features, 4 * units)
    recurrent = dense_flops(units, 4 * units)
    head = dense_flops(units, CLASSES)
    forward = steps * (projection + recurrent) + head
    # The weight gradients cost the forward again; the gradients flowing back into
    # h_{t-1} cost one recurrent matmul per step but the first (h_0 is a constant),
    # and the head's input gradient one more; x needs no gradient.
    return forward, 2 * forward + (steps - 1) * recurrent + head


def transformer_flops(length: int = 28, features: int = 28, d_model: int = 64,
                      mlp: int = 128, blocks: int = 2) -> tuple[int, int]:
    """``(forward, training)`` FLOPs per sample of the row Transformer (see above)."""
    embed = length * dense_flops(features, d_model)
    projections = length * (4 * dense_flops(d_model, d_model) + dense_flops(d_model, mlp)
                            + dense_flops(mlp, d_model))
    attention = 2 * (2 * length * length * d_model)  # Q K^T and A V, all heads
    forward = embed + blocks * (projections + attention) + dense_flops(d_model, CLASSES)
    # x needs no gradient: the embedding's input gradient is not computed.
    return forward, 3 * forward - embed


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark row: a model kind at a batch size."""

    name: str
    kind: str  # "mlp", "cnn", "lstm" or "transformer"
    batch: int
    description: str

    @property
    def flops(self) -> tuple[int, int]:
        return {"mlp": mlp_flops, "cnn": cnn_flops, "lstm": lstm_flops,
                "transformer": transformer_flops}[self.kind]()


MODELS: dict[str, ModelSpec] = {
    "mlp32": ModelSpec("mlp32", "mlp", 32, "MLP 784-64-64-10, batch 32"),
    "mlp128": ModelSpec("mlp128", "mlp", 128, "MLP 784-64-64-10, batch 128"),
    "cnn": ModelSpec("cnn", "cnn", 128,
                     "CNN conv32-pool-conv64-pool-dropout0.5-dense10, batch 128"),
    "lstm": ModelSpec("lstm", "lstm", 128, "LSTM(128) over 28 rows, Dense 10, batch 128"),
    "transformer": ModelSpec("transformer", "transformer", 128,
                             "Transformer over 28 rows: Dense 64, position table, 2 pre-norm "
                             "blocks (4 heads, MLP 128), LayerNorm, mean, Dense 10, batch 128"),
}


class Framework(NamedTuple):
    """A column of the table: the module that trains the models and how to start it."""

    module: str  # under benchmarks/peers/
    label: str
    env: dict[str, str]
    uses_jax: bool  # gets XLA_FLAGS (forced device count)
    project: bool  # runs with the project's interpreter (not the peers' venv)


FRAMEWORKS: dict[str, Framework] = {
    "jaxnn": Framework("peers.jaxnn_fit", "jaxnn fit", {}, True, True),
    # jaxnn without its non-finite guard (fit(on_nonfinite="ignore")): the guard's cost.
    "jaxnn-noguard": Framework("peers.jaxnn_fit", "jaxnn fit, no NaN guard",
                               {"JAXNN_BENCH_ON_NONFINITE": "ignore"}, True, True),
    # jaxnn with fit(verbose=1), its progress bar updated from inside the compiled epoch:
    # the bar's cost. Written to the worker's stdout (a pipe: plain lines, no redraws), or
    # with "-tty" to a pseudo-terminal drained by a thread (the bar redrawn, as users see it).
    "jaxnn-progress": Framework("peers.jaxnn_fit", "jaxnn fit, verbose=1 (pipe)",
                                {"JAXNN_BENCH_VERBOSE": "1"}, True, True),
    "jaxnn-progress-tty": Framework("peers.jaxnn_fit", "jaxnn fit, verbose=1 (pty)",
                                    {"JAXNN_BENCH_VERBOSE": "1",
                                     "JAXNN_BENCH_PROGRESS_TO": "pty"}, True, True),
    # jaxnn with the data left on the host and streamed in prefetched chunks: numpy arrays
    # (fit(feed="host")), an np.memmap of a file, and a random-access source of examples
    # (len and __getitems__, as tfds's and grain's sources) reading that memmap.
    "jaxnn-host": Framework("peers.jaxnn_fit", "jaxnn fit, host arrays",
                            {"JAXNN_BENCH_FEED": "host"}, True, True),
    "jaxnn-memmap": Framework("peers.jaxnn_fit", "jaxnn fit, memmap",
                              {"JAXNN_BENCH_FEED": "memmap"}, True, True),
    "jaxnn-source": Framework("peers.jaxnn_fit", "jaxnn fit, source",
                              {"JAXNN_BENCH_FEED": "source"}, True, True),
    "jax": Framework("peers.jax_optax", "JAX+optax loop", {}, True, True),
    "jax-scan": Framework("peers.jax_scan", "JAX fused scan", {}, True, True),
    "torch": Framework("peers.torch_eager", "PyTorch eager", {}, False, False),
    "keras-tf": Framework("peers.keras_fit", "Keras 3 / TF", {"KERAS_BACKEND": "tensorflow"},
                          False, False),
    "keras-jax": Framework("peers.keras_fit", "Keras 3 / JAX", {"KERAS_BACKEND": "jax"},
                           True, False),
    "flax": Framework("peers.flax_nnx", "Flax NNX", {}, True, False),
    "equinox": Framework("peers.equinox_optax", "Equinox+optax", {}, True, False),
}

# The compute dtypes of ``--dtype``, and the frameworks that honour bfloat16 (mixed
# precision: float32 master weights, the forward and backward pass in bfloat16).
DTYPES = ("float32", "bfloat16")
MIXED_PRECISION_FRAMEWORKS = ("jaxnn", "jaxnn-noguard", "jaxnn-progress", "jaxnn-progress-tty",
                              "jax", "jax-scan")


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


class Data(NamedTuple):
    """Images ``(N, 28, 28)`` float32 in [0, 1] and int32 labels ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def random_data(n_train: int, n_test: int, seed: int = 0) -> Data:
    """Uniform random images and labels with MNIST's shapes (throughput ignores values)."""
    rng = np.random.default_rng(seed)

    def images(n):
        return rng.random((n, IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)

    return Data(images(n_train), rng.integers(0, CLASSES, n_train, dtype=np.int32),
                images(n_test), rng.integers(0, CLASSES, n_test, dtype=np.int32))


DATA_FILES = ("x_train", "y_train", "x_test", "y_test")


def save_data(data: Data, folder: Path) -> dict[str, str]:
    """Write the arrays as ``.npy`` files for the workers; returns ``{name: path}``."""
    paths = {}
    for name in DATA_FILES:
        path = folder / f"{name}.npy"
        np.save(path, np.ascontiguousarray(getattr(data, name)))
        paths[name] = str(path)
    return paths


def load_data(paths: dict[str, str]) -> Data:
    return Data(*(np.load(paths[name]) for name in DATA_FILES))


def model_inputs(kind: str, images: np.ndarray, *, channels_first: bool = False) -> np.ndarray:
    """Images ``(N, 28, 28)`` as the model takes them (see the module docstring)."""
    n = len(images)
    if kind == "mlp":
        return images.reshape(n, IMAGE_SIDE * IMAGE_SIDE)
    if kind == "cnn":
        shape = (n, 1, IMAGE_SIDE, IMAGE_SIDE) if channels_first else (n, IMAGE_SIDE,
                                                                         IMAGE_SIDE, 1)
        return images.reshape(shape)
    if kind in ("lstm", "transformer"):
        return images
    raise ValueError(f"unknown model kind {kind!r}")


# --------------------------------------------------------------------------
# What a worker is asked and what it answers
# --------------------------------------------------------------------------


@dataclass
class Plan:
    """How to run one model in a worker."""

    samples: int  # training samples per epoch (the first ``samples`` of x_train)
    epochs: int  # total epochs: ``warmup`` untimed ones then the timed ones
    warmup: int
    infer_samples: int
    infer_batch: int
    infer_repeats: int  # timed inference passes, after one untimed
    seed: int = 0
    # e.g. {"steps_per_call": "table", "dtype": "float32"} (dtype: one of DTYPES)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    """What a framework module returns for one model.

    ``epoch_seconds`` holds every epoch, the warm-up ones included; each counts
    everything the framework does in that epoch (shuffling, batching, syncing).
    ``wall_seconds`` is the whole training call from building nothing further to
    the end of the last epoch, used for the start-up overhead.
    """

    epoch_seconds: list[float]
    samples_per_epoch: int  # real samples trained per epoch (a dropped last batch not counted)
    wall_seconds: float
    infer_seconds: list[float]  # the timed inference passes over infer_samples
    infer_first_seconds: float  # the first (untimed) pass: compiling / tracing included
    infer_samples: int
    compile_seconds: float | None = None  # only where the framework reports it itself
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(spec: ModelSpec, m: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Derived figures from a measurement: samples/s, start-up overhead, FLOP rates.

    * ``train_samples_per_s`` = samples per epoch / median timed epoch.
    * ``startup_seconds`` = the training call's wall time minus the timed epochs'
      median times the number of epochs: compile, tracing, graph building, the
      data put on the device, all that the first epoch costs beyond a steady one.
    * ``infer_samples_per_s`` = inference samples / median timed pass.
    """
    timed = m["epoch_seconds"][warmup:] or m["epoch_seconds"]
    epoch = median(timed)
    forward, train = spec.flops
    train_sps = m["samples_per_epoch"] / epoch
    infer_sps = m["infer_samples"] / median(m["infer_seconds"])
    return {
        "epoch_seconds_median": epoch,
        "timed_epochs": len(timed),
        "train_samples_per_s": train_sps,
        "train_gflop_per_s": train_sps * train / 1e9,
        "startup_seconds": max(0.0, m["wall_seconds"] - epoch * len(m["epoch_seconds"])),
        "infer_samples_per_s": infer_sps,
        "infer_gflop_per_s": infer_sps * forward / 1e9,
    }


def time_passes(run: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Time ``run()`` once untimed (compile) then ``repeats`` times; ``run`` must block."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return first, seconds


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write atomically (the orchestrator may read a worker's file after a time-out)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False))
    tmp.replace(path)


def cpu_count() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
