"""The MNIST convnet and LSTM examples: their models' parameter counts, and short real runs.

The fast tests build each example's model and check the summary's parameter
counts against the textbook formulas. The slow ones run each example's
``main`` on a slice of the real MNIST (the ``mnist_dir`` fixture; skipped when
the files are absent) and check the accuracy reached and the ``--json`` line.
"""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

import jaxnn.datasets
from jaxnn import compilation_cache

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def no_compile_cache(monkeypatch):
    """The examples' persistent compilation cache stays off in this process (it would
    replace the tests' own, see conftest.py); tests/test_compile_cache.py runs it."""
    monkeypatch.setattr(compilation_cache, "enable_compilation_cache",
                        lambda path=None, **kwargs: pathlib.Path(path or "unused"))


@pytest.fixture(scope="module", autouse=True)
def mnist_read_once():
    """The examples' runs here share one reading of each MNIST folder (each read
    decompresses and converts all 70,000 images: about a second); the first run of
    each folder reads it."""
    read, loaded = jaxnn.datasets.mnist, {}

    def mnist(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = read(*args, **kwargs)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jaxnn.datasets, "mnist", mnist)
        yield


def _load(name):
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _summary_counts(text):
    """``{layer label: parameter count}`` from the rows of a ``model.summary`` table."""
    counts = {}
    for line in text.splitlines()[2:]:
        if line.startswith("-"):
            break
        counts[line.split()[0]] = int(line.split()[-1].replace(",", ""))
    total = int(text.splitlines()[-1].rsplit(" ", 1)[-1].replace(",", ""))
    return counts, total


def _conv(kh, kw, cin, cout):
    return kh * kw * cin * cout + cout


def _dense(fan_in, units):
    return fan_in * units + units


def _lstm(features, units):
    # Four gates, each with an input kernel, a recurrent kernel and a bias.
    return 4 * (features * units + units * units + units)


@pytest.mark.parametrize("side, flat", [(28, 5 * 5 * 64), (8, 2 * 2 * 64)])
def test_cnn_summary_counts_match_formulas(side, flat):
    cnn = _load("mnist_cnn")
    model = cnn.build_model(side)
    x = jax.ShapeDtypeStruct((4, side, side, 1), np.float32)
    counts, total = _summary_counts(model.summary(x))
    expected = {"conv2d_0": _conv(3, 3, 1, 32), "conv2d_1": _conv(3, 3, 32, 64),
                "dense_0": _dense(flat, 10)}
    assert {k: v for k, v in counts.items() if v} == expected
    assert total == sum(expected.values())
    if side == 28:
        assert total == 34_826  # the Keras MNIST convnet's published parameter total
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    assert params["conv2d_1"]["kernel"].shape == (3, 3, 32, 64)
    assert params["dense_0"]["kernel"].shape == (flat, 10)


def test_rnn_summary_counts_match_formulas():
    rnn = _load("mnist_rnn")
    model = rnn.build_model()
    x = jax.ShapeDtypeStruct((4, 28, 28), np.float32)
    counts, total = _summary_counts(model.summary(x))
    assert counts == {"lstm_0": _lstm(28, 128), "dense_0": _dense(128, 10)}
    assert total == _lstm(28, 128) + _dense(128, 10)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    assert params["lstm_0"]["kernel"].shape == (28, 4 * 128)
    assert params["lstm_0"]["recurrent_kernel"].shape == (128, 4 * 128)


def test_steps_per_call_argument():
    cnn = _load("mnist_cnn")
    assert cnn.parse_args(["--steps-per-call", "epoch"]).steps_per_call == "epoch"
    assert cnn.parse_args(["--steps-per-call", "16"]).steps_per_call == 16
    for bad in (["--steps-per-call", "0"], ["--steps-per-call", "x"], ["--train-limit", "0"]):
        with pytest.raises(SystemExit):
            cnn.parse_args(bad)


def _run_main(name, args, capsys):
    summary = _load(name).main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    for key in ("test_accuracy", "test_loss", "train_seconds", "compile_seconds", "epochs",
                "dataset"):
        assert key in last
    assert last["test_accuracy"] == summary["test_accuracy"]
    assert last["dataset"] == "MNIST"
    assert math.isfinite(last["test_loss"]) and last["compile_seconds"] > 0
    return last


class _StopBeforeTraining(Exception):
    """Raised by the stand-in ``fit`` below, where the real one would start training."""


def test_cnn_feed_flag_reaches_fit(monkeypatch, mnist_dir):
    # --feed host streams the arrays from the host: the example passes them to fit as
    # they are (numpy, not copied to the device first), with the flags. Training stops
    # there: fit(feed='host') itself is tested in tests/test_streaming.py, and a real
    # run of the example in the slow tests below.
    cnn = _load("mnist_cnn")
    seen = []

    def fit(model, params, x, y, **kwargs):
        seen.append((type(x), type(y), kwargs["feed"], kwargs["steps_per_call"],
                     kwargs["epochs"], len(x)))
        raise _StopBeforeTraining

    monkeypatch.setattr(cnn.jaxnn, "fit", fit)
    with pytest.raises(_StopBeforeTraining):
        cnn.main(["--data-dir", str(mnist_dir), "--epochs", "1", "--train-limit", "600",
                  "--test-limit", "100", "--json", "--quiet", "--feed", "host",
                  "--steps-per-call", "2"])
    # 10% of the 600 held out for validation
    assert seen == [(np.ndarray, np.ndarray, "host", 2, 1, 540)]


# The convnet's runs train on the first 1,024 MNIST images and score the first 500 test
# images: the same shapes, hence the same compiled programs (the tests' compilation
# cache), in every run.
CNN_SUBSET = ["--train-limit", "1024", "--test-limit", "500"]


# Thresholds: measured 0.916 / 0.896 / 0.910 (CNN: 12 epochs of 922 images, 96 steps)
# and 0.901 / 0.891 / 0.906 (RNN) for seeds 0 / 1 / 2.
@pytest.mark.slow
def test_cnn_example_learns_mnist_subset(mnist_dir, capsys):
    out = _run_main("mnist_cnn", ["--data-dir", str(mnist_dir), "--epochs", "12", *CNN_SUBSET,
                                  "--json"], capsys)
    # 10% of the 1,024 held out for validation; the test set scored once, at the end
    assert out["epochs"] == 12 and out["train_examples"] == 922
    assert out["validation_examples"] == 102 and out["test_examples"] == 500
    assert out["test_accuracy"] >= 0.85


@pytest.mark.slow
def test_rnn_example_learns_mnist_subset(mnist_dir, capsys):
    out = _run_main("mnist_rnn", ["--data-dir", str(mnist_dir), "--epochs", "3",
                                  "--train-limit", "12000", "--test-limit", "1000", "--json",
                                  "--quiet"], capsys)
    assert out["epochs"] == 3 and out["test_examples"] == 1000
    assert out["test_accuracy"] >= 0.85


@pytest.mark.slow
def test_cnn_example_resumes_like_an_uninterrupted_run(mnist_dir, tmp_path, capsys):
    # The batches of epoch e depend only on (key, e), so stopping after one
    # epoch and resuming from the checkpoint must give the two-epoch run's numbers.
    common = ["--data-dir", str(mnist_dir), *CNN_SUBSET, "--json", "--quiet"]
    straight = _run_main("mnist_cnn", [*common, "--epochs", "2"], capsys)
    ckpt = str(tmp_path / "ckpt")
    _run_main("mnist_cnn", [*common, "--epochs", "1", "--checkpoint-dir", ckpt], capsys)
    plot = tmp_path / "cnn.png"
    resumed = _run_main("mnist_cnn", [*common, "--epochs", "2", "--checkpoint-dir", ckpt,
                                      "--plot", str(plot)], capsys)
    assert resumed["epochs"] == 2
    np.testing.assert_allclose(resumed["history"]["loss"], straight["history"]["loss"][1:],
                               rtol=1e-5)
    np.testing.assert_allclose(resumed["test_loss"], straight["test_loss"], rtol=1e-5)
    for name in ("cnn.png", "cnn_confusion.png", "cnn_errors.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
