"""The examples as command-line tools: every bad input is one ``error:`` line and a status.

A bad flag exits with status 2 before any data is loaded or any model built; a bad
data folder or file (missing, not a folder, lacking the MNIST files, corrupt) exits
with status 1. Either way stderr is a single line ``error: ...`` naming the flag or
the file, and never a traceback. Most cases call each example's ``main(argv)`` in
this process (fast); a few run ``python examples/mnist_mlp.py`` for real.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import optax
import pytest

import jaxnn.datasets
from jaxnn import compilation_cache
from jaxnn.datasets import write_idx

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
MLP, CNN, RNN, TX = "mnist_mlp", "mnist_cnn", "mnist_rnn", "mnist_transformer"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _load(name):
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _assert_one_error_line(err, *names):
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for name in names:
        assert str(name) in err, (name, err)


@pytest.fixture(autouse=True)
def cache_dirs(monkeypatch):
    """The folders the examples would turn the compilation cache on in (None: the
    default). Not turned on in this process: the tests keep conftest.py's cache."""
    seen = []

    def enable(path=None, **kwargs):
        seen.append(path)
        return pathlib.Path(path or "default-cache")

    monkeypatch.setattr(compilation_cache, "enable_compilation_cache", enable)
    return seen


@pytest.fixture
def calls(monkeypatch):
    """Record (without doing) any data loading or model building by the examples."""
    seen = []

    def recorder(what):
        def record(*args, **kwargs):
            seen.append(what)
            raise AssertionError(f"{what} was called")
        return record

    monkeypatch.setattr(jaxnn.datasets, "mnist", recorder("datasets.mnist"))
    monkeypatch.setattr(jaxnn.datasets, "digits", recorder("datasets.digits"))
    for name in (MLP, CNN, RNN, TX):
        monkeypatch.setattr(_load(name), "build_model", recorder(f"{name}.build_model"))
    return seen


@pytest.fixture
def places(tmp_path, monkeypatch):
    """``{placeholder: path}``: an existing file, an empty folder, a path that is not there."""
    monkeypatch.delenv("JAXNN_DATA_DIR", raising=False)
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    return {"{file}": tmp_path / "file.txt", "{dir}": tmp_path / "empty",
            "{missing}": tmp_path / "missing"}


def _fill(argv, places):
    out = []
    for arg in argv:
        for mark, path in places.items():
            arg = arg.replace(mark, str(path))
        out.append(arg)
    return out


def _run(name, argv, capsys):
    """``main(argv)``'s exit status and stderr; it must exit, printing nothing to stdout."""
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(argv)
    out, err = capsys.readouterr()
    assert out == "", out
    return exit_info.value.code, err


# (example, argv, what the error line must name). Placeholders: see ``places``.
BAD_FLAGS = [
    (MLP, ["--epochs", "-1"], "--epochs"),
    (MLP, ["--epochs", "0"], "--epochs"),
    (MLP, ["--epochs", "two"], "--epochs"),
    (MLP, ["--epochs"], "--epochs"),
    (MLP, ["--batch-size", "0"], "--batch-size"),
    (MLP, ["--batch-size", "3.5"], "--batch-size"),
    (MLP, ["--lr", "0"], "--lr"),
    (MLP, ["--lr=-0.01"], "--lr"),
    (MLP, ["--lr", "nan"], "--lr"),
    (MLP, ["--lr", "inf"], "--lr"),
    (MLP, ["--l2", "-1e-4"], "--l2"),
    (MLP, ["--l2", "nan"], "--l2"),
    (MLP, ["--seed", "-1"], "--seed"),
    (MLP, ["--seed", str(2**32)], "--seed"),
    (MLP, ["--optimizer", "adagrad"], "--optimizer"),
    (MLP, ["--grad", "numeric"], "--grad"),
    (MLP, ["--frobnicate"], "--frobnicate"),
    (MLP, ["--plot", "{missing}/curves.png"], "--plot"),
    (MLP, ["--plot", "{dir}"], "--plot"),
    (MLP, ["--plot", "{dir}/curves.txt"], "--plot"),
    (MLP, ["--plot", ""], "--plot"),
    (MLP, ["--plot", "{dir}/curves.pdf"], "--plot"),  # the images are PNG
    (MLP, ["--validation-split", "1"], "--validation-split"),
    (MLP, ["--validation-split", "-0.1"], "--validation-split"),
    (MLP, ["--validation-split", "nan"], "--validation-split"),
    (MLP, ["--train-limit", "0"], "--train-limit"),
    (MLP, ["--cache-dir", "{file}"], "--cache-dir"),
    (MLP, ["--cache-dir", "{dir}", "--no-compile-cache"], "--cache-dir"),
    (MLP, ["--checkpoint-dir", "{file}"], "--checkpoint-dir"),
    (MLP, ["--checkpoint-dir", "{file}/run"], "--checkpoint-dir"),
    (MLP, ["--checkpoint-dir", ""], "--checkpoint-dir"),
    (MLP, ["--data-dir", ""], "--data-dir"),
    (MLP, ["--steps-per-call", "4"], "--steps-per-call"),  # a CNN/RNN flag only
    (CNN, ["--epochs", "-3"], "--epochs"),
    (CNN, ["--batch-size", "-128"], "--batch-size"),
    (CNN, ["--train-limit", "0"], "--train-limit"),
    (CNN, ["--test-limit", "-5"], "--test-limit"),
    (CNN, ["--steps-per-call", "0"], "--steps-per-call"),
    (CNN, ["--steps-per-call", "many"], "--steps-per-call"),
    (CNN, ["--feed", "gpu"], "--feed"),
    (CNN, ["--lr", "nan"], "--lr"),
    (CNN, ["--l2", "-1e-4"], "--l2"),
    (CNN, ["--checkpoint-dir", "{file}"], "--checkpoint-dir"),
    (CNN, ["--plot", "{missing}/curves.png"], "--plot"),
    (CNN, ["--validation-split", "0.1.0"], "--validation-split"),
    (CNN, ["--cache-dir", "{file}/cache"], "--cache-dir"),
    (RNN, ["--epochs", "0"], "--epochs"),
    (RNN, ["--test-limit", "0"], "--test-limit"),
    (RNN, ["--seed", "-7"], "--seed"),
    (RNN, ["--lr", "-inf"], "--lr"),
    (RNN, ["--steps-per-call", "-1"], "--steps-per-call"),
    (RNN, ["--grad", "manual"], "--grad"),  # an MLP flag only
    (RNN, ["--optimizer", "rmsprop"], "--optimizer"),
    (RNN, ["--checkpoint-dir", "{file}/run"], "--checkpoint-dir"),
    (RNN, ["--validation-split", "1.5"], "--validation-split"),
    (RNN, ["--plot", "{dir}/curves"], "--plot"),
    (TX, ["--epochs", "0"], "--epochs"),
    (TX, ["--batch-size", "0"], "--batch-size"),
    (TX, ["--lr", "nan"], "--lr"),
    (TX, ["--steps-per-call", "0"], "--steps-per-call"),
    (TX, ["--feed", "tpu"], "--feed"),
    (TX, ["--grad", "manual"], "--grad"),  # an MLP flag only
    (TX, ["--validation-split", "1"], "--validation-split"),
    (TX, ["--checkpoint-dir", "{file}"], "--checkpoint-dir"),
    (TX, ["--plot", "{dir}/curves.pdf"], "--plot"),
]


@pytest.mark.parametrize("name, argv, named", BAD_FLAGS,
                         ids=[f"{n}:{' '.join(a) or 'none'}" for n, a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_status_2_before_any_work(name, argv, named, calls, places,
                                                          capsys):
    status, err = _run(name, _fill(argv, places), capsys)
    assert status == 2
    _assert_one_error_line(err, named)
    assert calls == []


# A bad data folder: found before anything is read (status 1, loader not called).
BAD_DATA_DIRS = [
    (MLP, "{missing}", "{missing}"),
    (MLP, "{file}", "{file}"),
    (MLP, "{dir}", "train-images-idx3-ubyte"),  # an empty folder
    (MLP, "{partial}", "t10k-labels-idx1-ubyte"),  # three of the four files
    (CNN, "{missing}", "{missing}"),
    (RNN, "{dir}", "{dir}"),
    (TX, "{missing}", "{missing}"),
]


def _mnist_folder(folder, n_train=4, n_test=3):
    """Four small, valid MNIST files in ``folder`` (n_train + n_test random images)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for (images, labels), n in zip((FILES[:2], FILES[2:]), (n_train, n_test)):
        write_idx(folder / images, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / labels, rng.integers(0, 10, n, dtype=np.uint8))
    return folder


@pytest.mark.parametrize("name, folder, named", BAD_DATA_DIRS,
                         ids=[f"{n}:{f}" for n, f, _ in BAD_DATA_DIRS])
def test_bad_data_dir_is_one_line_and_status_1_before_loading(name, folder, named, calls,
                                                               places, tmp_path, capsys):
    places["{partial}"] = _mnist_folder(tmp_path / "partial")
    (places["{partial}"] / FILES[3]).unlink()
    status, err = _run(name, ["--data-dir", *_fill([folder], places)], capsys)
    assert status == 1
    _assert_one_error_line(err, "--data-dir", *_fill([named], places))
    assert calls == []


def test_bad_jaxnn_data_dir_is_an_error_not_a_fallback(calls, places, monkeypatch, capsys):
    monkeypatch.setenv("JAXNN_DATA_DIR", str(places["{missing}"]))
    status, err = _run(MLP, ["--quiet"], capsys)
    assert status == 1
    _assert_one_error_line(err, "JAXNN_DATA_DIR", places["{missing}"])
    assert calls == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_mnist_file_is_one_line_and_status_1(calls, places, tmp_path, capsys):
    folder = _mnist_folder(tmp_path / "mnist")
    (folder / FILES[0]).chmod(0)
    status, err = _run(CNN, ["--data-dir", str(folder)], capsys)
    assert status == 1
    _assert_one_error_line(err, folder / FILES[0])
    assert calls == []


def _gzip_garbage(path):
    path.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 4)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-40])  # the uncompressed copy, cut short


def _labels_as_images(path):
    write_idx(path, np.zeros(4, np.uint8))  # a labels-shaped array where images belong


def _not_idx(path):
    path.write_bytes(b"P5\n28 28\n255\n" + bytes(28 * 28))  # a PGM image, not IDX


def _short_labels(path):
    write_idx(path, np.zeros(2, np.uint8))  # 2 labels for 3 test images


# A corrupt MNIST file, found as it is read (status 1; the model is never built).
CORRUPT_FILES = [
    (MLP, FILES[0], _gzip_garbage),
    (MLP, FILES[0], _labels_as_images),
    (MLP, FILES[1], _not_idx),
    (CNN, "train-images-idx3-ubyte", _truncate),
    (RNN, FILES[3], _short_labels),
    (TX, FILES[2], _gzip_garbage),
]


@pytest.mark.parametrize("name, file, damage", CORRUPT_FILES,
                         ids=[f"{n}:{f}:{d.__name__[1:]}" for n, f, d in CORRUPT_FILES])
def test_corrupt_mnist_file_is_one_line_and_status_1(name, file, damage, monkeypatch, tmp_path,
                                                      capsys):
    module = _load(name)
    built = []
    monkeypatch.setattr(module, "build_model", lambda *a: built.append(a))
    folder = _mnist_folder(tmp_path / "mnist")
    if not file.endswith(".gz"):  # the file uncompressed instead of the .gz
        gz = folder / f"{file}.gz"
        write_idx(folder / file, jaxnn.datasets.read_idx(gz))
        gz.unlink()
    damage(folder / file)
    status, err = _run(name, ["--data-dir", str(folder), "--quiet"], capsys)
    assert status == 1
    _assert_one_error_line(err, folder / file)
    assert built == []


def test_corrupt_checkpoint_is_one_line_and_status_1(tmp_path, capsys):
    # checkpointing() resumes for all three examples; a tiny model stands in for theirs.
    checkpoints = tmp_path / "run"
    checkpoints.mkdir()
    (checkpoints / "ckpt_0001.npz").write_bytes(b"PK\x03\x04 truncated")
    params = {"dense_0": {"kernel": np.zeros((2, 2), np.float32)}}
    with pytest.raises(SystemExit) as exit_info:
        _load(MLP).checkpointing(str(checkpoints), params, optax.sgd(0.1), None, 0)
    assert exit_info.value.code == 1
    _assert_one_error_line(capsys.readouterr().err, "--checkpoint-dir",
                           checkpoints / "ckpt_0001.npz")


@pytest.mark.parametrize("name", [MLP, CNN, RNN, TX])
def test_help_shows_every_flag_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    # One block per option: its line "  --flag ..." and the indented help lines below.
    blocks, current = [], None
    for line in options.splitlines():
        if line.startswith("  -"):
            current = [line]
            blocks.append(current)
        elif current is not None and line.strip():
            current.append(line.strip())
    flags = {b[0].split()[0].rstrip(","): " ".join(b) for b in blocks}
    # The same flags in all four examples (the MLP adds --grad; the CNN, RNN and
    # Transformer add --feed and --steps-per-call).
    assert {"--data-dir", "--epochs", "--batch-size", "--optimizer", "--lr", "--optax",
            "--l2", "--validation-split", "--train-limit", "--test-limit", "--seed", "--plot",
            "--checkpoint-dir", "--json", "--quiet", "--cache-dir",
            "--no-compile-cache"} <= set(flags)
    assert "_confusion.png" in flags["--plot"] and "_errors.png" in flags["--plot"]
    for flag, block in flags.items():
        if flag != "-h":
            assert "default" in block, (flag, block)
    epochs = {MLP: 5, CNN: 11, RNN: 6, TX: 5}[name]
    assert f"(default: {epochs})" in flags["--epochs"]


def test_validation_is_held_out_of_training_and_too_small_a_split_is_an_error(tmp_path,
                                                                           capsys):
    cli = _load(MLP)._cli
    x, y = np.arange(20)[:, None], np.arange(20)
    x_train, y_train, x_val, y_val = cli.hold_out(x, y, 0.25)
    np.testing.assert_array_equal(y_train, np.arange(15))  # the last quarter held out
    np.testing.assert_array_equal(x_val[:, 0], np.arange(15, 20))
    assert cli.hold_out(x, y, 0.0)[2:] == (None, None)
    folder = _mnist_folder(tmp_path / "mnist")  # 4 training images: 10% is none
    status, err = _run(MLP, ["--data-dir", str(folder), "--quiet"], capsys)
    assert status == 2
    _assert_one_error_line(err, "--validation-split", "0.1", "4 training examples")


@pytest.mark.parametrize("name", [MLP, CNN, RNN, TX])
def test_compile_cache_flags(name, cache_dirs, calls, tmp_path, monkeypatch):
    # parse and turn the cache on; stop at the data loading (the ``calls`` fixture)
    monkeypatch.delenv("JAXNN_DATA_DIR", raising=False)
    for argv, expected in ((["--cache-dir", str(tmp_path)], [str(tmp_path)]),
                           ([], [None]), (["--no-compile-cache"], [])):
        cache_dirs.clear()
        with pytest.raises(AssertionError, match="was called"):
            _load(name).main(["--quiet", "--epochs", "1", *argv])
        assert cache_dirs == expected, argv


# -- the real command line, in a fresh interpreter ------------------------------------


def _command(*argv, env=None):
    return subprocess.run([sys.executable, str(EXAMPLES / "mnist_mlp.py"), *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def test_command_line_bad_flag():
    done = _command("--epochs", "-1")
    assert done.returncode == 2 and done.stdout == ""
    _assert_one_error_line(done.stderr, "--epochs")


def test_command_line_bad_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAXNN_DATA_DIR"}
    done = _command("--data-dir", str(tmp_path / "nowhere"), env=env)
    assert done.returncode == 1 and done.stdout == ""
    _assert_one_error_line(done.stderr, "--data-dir", tmp_path / "nowhere")


def test_command_line_help_shows_defaults():
    done = _command("--help")
    assert done.returncode == 0 and done.stderr == ""
    for text in ("--epochs N", "(default: 5)", "(default: 32)", "(default: adam)",
                 "(default: autodiff)", "0.1 for sgd", "(default: off)", "(default: 0.1)",
                 "jax-compilation-cache"):
        assert text in done.stdout, text
