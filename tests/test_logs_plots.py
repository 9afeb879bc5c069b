"""CSVLogger and TensorBoard read back against fit's history; the plots' files and axes."""

import csv
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn
from jaxnn.callbacks import CSVLogger, TensorBoard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _data(n=40, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(features, classes)), axis=-1).astype(np.int32)
    return x, y


def _fit(callbacks, epochs=3):
    x, y = _data()
    model = jaxnn.Sequential([jaxnn.Dense(8), jnp.tanh, jaxnn.Dense(3)])
    # numpy-drawn params of init's shapes (init would compile a program of its own); no
    # shuffling (its permutation is a program of its own): the loggers only read the history
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape),
                                                          s.dtype),
                                    jax.eval_shape(model.init, jax.random.key(0), x))
    return jaxnn.fit(model, params, x[:30], y[:30], loss="sparse_softmax_cross_entropy",
                     optimizer=jaxnn.optimizers.sgd(0.1), key=jax.random.key(1),
                     epochs=epochs, batch_size=8, verbose=0, shuffle=False,
                     validation_data=(x[30:], y[30:]), callbacks=callbacks)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One 3-epoch fit with both loggers: (result, csv path, logdir)."""
    folder = tmp_path_factory.mktemp("logs")
    path, logdir = folder / "sub" / "log.csv", folder / "tb"
    result = _fit([CSVLogger(path), TensorBoard(logdir)])
    return result, path, logdir


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_csv_rows_equal_history(logged):
    result, path, _ = logged
    header, rows = _read_csv(path)
    assert header[0] == "epoch"
    assert set(header[1:]) == set(result.history)  # loss, accuracy, val_*, seconds
    assert header.index("loss") < header.index("seconds")
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    for name in header[1:]:
        column = [float(r[header.index(name)]) for r in rows]
        assert column == [float(v) for v in result.history[name]], name  # exact: repr


def _epoch_end(epoch, logs, history):
    return jaxnn.callbacks.EpochEnd(epoch, logs, None, None, None, None, history)


def _run(logger, epochs, initial_epoch=0, start=1.0):
    """Drive ``logger`` as fit does, with loss = start / epoch count; returns the history."""
    begin = jaxnn.callbacks.TrainBegin(initial_epoch, epochs, None, None, None, None)
    logger.on_train_begin(begin)
    history = {}
    for epoch in range(initial_epoch, epochs):
        logs = {"loss": start / (epoch + 1), "accuracy": 0.1 * epoch}
        for name, value in logs.items():
            history.setdefault(name, []).append(value)
        history.setdefault("seconds", []).append(0.25)
        logger.on_epoch_end(_epoch_end(epoch, logs, history))
    return history


def test_csv_append_continues_and_drops_rows_after_the_resumed_epoch(tmp_path):
    path = tmp_path / "log.csv"
    first = _run(CSVLogger(path), epochs=3)
    # Resume from epoch 2: the file's row 3 came after that checkpoint and is replaced.
    second = _run(CSVLogger(path, append=True), epochs=4, initial_epoch=2, start=10.0)
    header, rows = _read_csv(path)
    assert header == ["epoch", "loss", "accuracy", "seconds"]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    loss = [float(r[1]) for r in rows]
    assert loss == first["loss"][:2] + second["loss"]
    # Appending to a missing file starts it with a header.
    _run(CSVLogger(tmp_path / "new.csv", append=True), epochs=1)
    assert _read_csv(tmp_path / "new.csv")[0] == header


def test_csv_append_to_a_different_header_raises_and_leaves_the_file(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(ValueError, match="has columns"):
        _run(CSVLogger(path, append=True), epochs=1)
    assert path.read_text() == "epoch,loss\n1,0.5\n"


def test_csv_new_name_after_the_first_epoch_raises(tmp_path):
    logger = CSVLogger(tmp_path / "log.csv")
    logger.on_train_begin(None)
    logger.on_epoch_end(_epoch_end(0, {"loss": 1.0}, {"loss": [1.0]}))
    with pytest.raises(ValueError, match=r"logs \['lr'\]"):
        logger.on_epoch_end(_epoch_end(1, {"loss": 0.5, "lr": 0.1},
                                       {"loss": [1.0, 0.5], "lr": [0.1]}))
    assert _read_csv(tmp_path / "log.csv") == (["epoch", "loss"], [["1", "1.0"]])


def _scalars(folder):
    """{tag: [(step, value)]} from the TFRecord event files in ``folder``, parsed here:
    length (u64), its masked crc32c, the Event proto, its masked crc32c."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    out = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for file in files:
        data = file.read_bytes()
        at = 0
        while at < len(data):
            header = data[at:at + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
            body = data[at + 12:at + 12 + length]
            assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == \
                masked_crc32c(body)
            at += 16 + length
            event = Event.FromString(body)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_events_equal_history(logged):
    pytest.importorskip("tensorboardX")
    result, _, logdir = logged
    train, validation = _scalars(logdir / "train"), _scalars(logdir / "validation")
    assert set(train) == {n for n in result.history if not n.startswith("val_")}
    assert set(validation) == {n[4:] for n in result.history if n.startswith("val_")}
    for name, values in result.history.items():
        run, tag = (validation, name[4:]) if name.startswith("val_") else (train, name)
        steps, got = zip(*run[tag])
        assert steps == (1, 2, 3)
        np.testing.assert_allclose(got, values, rtol=1e-6)  # stored as float32


def test_missing_optional_packages_raise_with_the_pip_command(monkeypatch):
    for name in ("tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'jaxnn\[tensorboard\]'"):
        TensorBoard("unused")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'jaxnn\[examples\]'"):
        jaxnn.plot_history({"loss": [1.0]})


def test_import_jaxnn_loads_neither_matplotlib_nor_tensorboardx():
    code = ("import sys, jaxnn, jaxnn.plotting, jaxnn.callbacks; "
            "print(sorted(m for m in ('matplotlib', 'tensorboardX') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def _assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes, len(data)


def test_plot_history_panels_legend_and_integer_ticks(logged, tmp_path):
    pytest.importorskip("matplotlib")
    result, _, _ = logged
    history = dict(result.history, learning_rate=[1e-2, 5e-3, 2.5e-3])
    path = tmp_path / "plots" / "history.png"
    fig = jaxnn.plot_history(history, path=path)
    _assert_png(path)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy", "learning_rate"]
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == (["training"] if ax.get_title() == "learning_rate"
                          else ["training", "validation"])
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(axes[0].get_lines()[1].get_ydata(), history["val_loss"])
    assert jaxnn.plot_history(result).axes  # a FitResult works too, nothing saved


def test_plot_confusion_matrix(tmp_path):
    pytest.importorskip("matplotlib")
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    matrix = jaxnn.metrics.confusion_matrix(np.array([0, 1, 1, 1, 2, 0, 2]), labels, 3)
    path = tmp_path / "cm.png"
    fig = jaxnn.plotting.plot_confusion_matrix(matrix, path=path,
                                               class_names=["cat", "dog", "eel"])
    _assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "eel"]
    cells = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert ((0, 2), "1") in cells  # row 2 (true eel), column 0 (predicted cat): one example
    with pytest.raises(ValueError, match="square"):
        jaxnn.plotting.plot_confusion_matrix(np.zeros((2, 3)))


@pytest.mark.parametrize("shape", [(40, 28, 28), (40, 784), (40, 28, 28, 1)])
def test_plot_misclassified_thirty_wrong(tmp_path, shape):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    images = rng.uniform(size=shape)
    true = rng.integers(0, 10, size=40)
    predicted = true.copy()
    wrong = rng.permutation(40)[:30]
    predicted[wrong] = (true[wrong] + 1) % 10
    path = tmp_path / "wrong.png"
    fig = jaxnn.plotting.plot_misclassified(images, predicted, true, path=path)
    _assert_png(path, min_bytes=20_000)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    first = np.sort(wrong)[:25]
    assert titles == [f"predicted {predicted[i]} / true {true[i]}" for i in first]
    assert "25 of 30 misclassified" in fig.get_suptitle()


@pytest.mark.parametrize("n", [0, 5])
def test_plot_misclassified_none_wrong(tmp_path, n):
    pytest.importorskip("matplotlib")
    labels = np.arange(n) % 10
    path = tmp_path / "none.png"
    fig = jaxnn.plotting.plot_misclassified(np.zeros((n, 784)), labels, labels, path=path)
    _assert_png(path, min_bytes=2_000)
    assert "no misclassified examples" in fig.axes[0].texts[0].get_text()
