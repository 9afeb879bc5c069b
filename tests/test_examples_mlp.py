"""The MNIST MLP example end to end: real MNIST, the offline fallback, checkpoints, plots,
validation held out of the training set."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import jaxnn
from jaxnn import compilation_cache
from jaxnn.datasets import _mnist

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "mnist_mlp.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("mnist_mlp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_compile_cache(monkeypatch):
    """The example's persistent compilation cache stays off in this process (it would
    replace the tests' own, see conftest.py); tests/test_compile_cache.py runs it."""
    monkeypatch.setattr(compilation_cache, "enable_compilation_cache",
                        lambda path=None, **kwargs: pathlib.Path(path or "unused"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No MNIST anywhere: no data dir, an empty cache, downloads failing, no tfds."""

    def no_network(url, dest, timeout):
        raise OSError("network disabled in tests")

    monkeypatch.delenv("JAXNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(_mnist, "_fetch", no_network)
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)


@pytest.mark.slow
def test_classic_mlp_reaches_97_percent_on_real_mnist(mnist_dir, capsys):
    summary = _load_example().main(["--data-dir", str(mnist_dir), "--json", "--quiet"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_accuracy"] == summary["test_accuracy"]
    assert summary["dataset"] == "MNIST" and summary["epochs"] == 5
    assert summary["train_examples"] == 54_000 and summary["validation_examples"] == 6_000
    assert summary["test_examples"] == 10_000
    assert summary["test_accuracy"] >= 0.97, summary
    for field in ("test_loss", "train_seconds", "compile_seconds"):
        assert summary[field] > 0


def test_offline_fallback_trains_on_bundled_digits(offline, capsys):
    summary = _load_example().main(["--epochs", "5", "--json", "--quiet"])
    err = capsys.readouterr().err
    assert "Falling back to scikit-learn's bundled 8x8 handwritten digits" in err
    assert "JAXNN_DATA_DIR" in err
    assert summary["source"] == "scikit-learn" and "digits" in summary["dataset"]
    assert summary["test_accuracy"] > 0.9


def test_resumed_example_matches_uninterrupted_run(offline, tmp_path):
    example = _load_example()
    common = ["--json", "--quiet", "--seed", "3"]
    full = example.main(["--epochs", "3", *common])
    ckpt = str(tmp_path / "ckpt")
    example.main(["--epochs", "2", "--checkpoint-dir", ckpt, *common])
    resumed = example.main(["--epochs", "3", "--checkpoint-dir", ckpt, *common])
    assert resumed["epochs"] == 3 and len(resumed["history"]["loss"]) == 1
    assert resumed["test_loss"] == full["test_loss"]
    assert resumed["history"]["loss"][-1] == full["history"]["loss"][-1]


def test_optax_flag_and_plots(offline, tmp_path):
    plot = tmp_path / "mlp.png"
    summary = _load_example().main(["--epochs", "2", "--optax", "--optimizer", "sgd",
                                    "--l2", "1e-4", "--plot", str(plot), "--quiet"])
    assert summary["optimizer"] == "optax.sgd"
    for name in ("mlp.png", "mlp_confusion.png", "mlp_errors.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_validation_is_held_out_and_the_test_set_used_once_at_the_end(offline, monkeypatch):
    example = _load_example()
    seen = []  # (what, inputs) in call order
    fit, evaluate, predict = jaxnn.fit, jaxnn.evaluate, jaxnn.predict
    monkeypatch.setattr(jaxnn, "fit", lambda *a, **k: seen.append(("fit", k)) or fit(*a, **k))
    monkeypatch.setattr(jaxnn, "evaluate",
                        lambda *a, **k: seen.append(("evaluate", a[2])) or evaluate(*a, **k))
    monkeypatch.setattr(jaxnn, "predict",
                        lambda *a, **k: seen.append(("predict", a[2])) or predict(*a, **k))
    summary = example.main(["--epochs", "2", "--quiet"])
    data = example.load_data(None)
    n = len(data.x_train)
    n_val = int(n * 0.1)
    assert (summary["train_examples"], summary["validation_examples"]) == (n - n_val, n_val)
    assert [what for what, _ in seen] == ["fit", "evaluate", "predict"]
    x_val, y_val = seen[0][1]["validation_data"]
    np.testing.assert_array_equal(x_val, data.x_train[n - n_val:])  # the training set's end
    np.testing.assert_array_equal(y_val, data.y_train[n - n_val:])
    for _, x in seen[1:]:
        np.testing.assert_array_equal(x, data.x_test)
    assert summary["val_accuracy"] == summary["history"]["val_accuracy"][-1]
    unvalidated = example.main(["--epochs", "1", "--quiet", "--validation-split", "0"])
    assert unvalidated["train_examples"] == n and unvalidated["validation_examples"] == 0
    assert "val_loss" not in unvalidated["history"] and unvalidated["val_accuracy"] is None


def test_data_dir_that_is_wrong_is_an_error_not_a_fallback(tmp_path, capsys):
    # one line naming the folder and status 1 (more cases in test_examples_cli.py)
    with pytest.raises(SystemExit) as exit_info:
        _load_example().main(["--data-dir", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --data-dir ") and err.count("\n") == 1
    assert str(tmp_path) in err and "train-images-idx3-ubyte" in err
