"""The MNIST MLP example end to end: real MNIST, the offline fallback, checkpoints, plot."""

import importlib.util
import json
import pathlib

import pytest

from jaxnn.datasets import _mnist

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "mnist_mlp.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("mnist_mlp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_optax_flag_and_plot(offline, tmp_path):
    plot = tmp_path / "curves.png"
    summary = _load_example().main(["--epochs", "2", "--optax", "--optimizer", "sgd",
                                    "--l2", "1e-4", "--plot", str(plot), "--quiet"])
    assert summary["optimizer"] == "optax.sgd"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_dir_that_is_wrong_is_an_error_not_a_fallback(tmp_path, capsys):
    # one line naming the folder and status 1 (more cases in test_examples_cli.py)
    with pytest.raises(SystemExit) as exit_info:
        _load_example().main(["--data-dir", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --data-dir ") and err.count("\n") == 1
    assert str(tmp_path) in err and "train-images-idx3-ubyte" in err
