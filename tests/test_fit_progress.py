"""What fit prints (verbose 0, 1, 2) on a terminal and through a pipe, its errors'
advice, and the learning rate in the history."""

import os
import pty
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import jaxnn

# Trains a small MLP for two epochs of 50 steps with verbose=1.
WORKER = """
import jax, numpy as np, optax, jaxnn
x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32)
model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dense(2)])
params = model.init(jax.random.key(0), x[:1])
jaxnn.fit(model, params, x, y, loss="sparse_softmax_cross_entropy", optimizer=optax.sgd(0.1),
          key=jax.random.key(1), epochs=2, batch_size=8, verbose=1)
"""


def _run_on_terminal() -> str:
    """The worker's stdout when it is a pseudo-terminal (the tty turns "\\n" into "\\r\\n")."""
    master, replica = pty.openpty()
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdout=replica,
                              stderr=subprocess.PIPE)
    os.close(replica)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the worker closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 0, stderr.decode()[-2000:]
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.fixture
def data():
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32)


@pytest.fixture
def mlp():
    return jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dense(2)])


def _fit(model, params, x, y, **kwargs):
    options = {"loss": "sparse_softmax_cross_entropy", "optimizer": optax.sgd(0.1),
               "key": jax.random.key(1), "batch_size": 8, "verbose": 0, **kwargs}
    return jaxnn.fit(model, params, x, y, **options)


def test_the_bar_moves_on_a_terminal_within_the_epoch():
    out = _run_on_terminal()
    lines = out.split("\n")
    assert lines[0].startswith("compiled in ") and lines[0].endswith(" s"), out[:200]
    first_epoch = out[:out.index("Epoch 1/2 - ")]
    drawn = [part for part in first_epoch.split("\r") if part.startswith("Epoch 1/2 [")]
    steps = [int(part.split("] ")[1].split("/")[0]) for part in drawn]
    assert len(steps) >= 10 and steps == sorted(steps) and len(set(steps)) >= 10, drawn
    assert max(steps) <= 50  # the steps of this epoch, not of the run
    # the summary line of each epoch stays, on a line of its own
    summaries = [line.split("\r")[-1] for line in lines if "s - loss: " in line]
    assert [s.split(" - ")[0] for s in summaries] == ["Epoch 1/2", "Epoch 2/2"]


def test_no_carriage_return_through_a_pipe():
    done = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith("compiled in ")
    assert [line.split(" - ")[0] for line in lines[1:]] == ["Epoch 1/2", "Epoch 2/2"]


def test_verbose_2_is_one_line_per_epoch_and_0_is_silent(mlp, data, capsys):
    x, y = data
    params = mlp.init(jax.random.key(0), x[:1])
    _fit(mlp, params, x, y, epochs=3, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    _fit(mlp, params, x, y, epochs=2, verbose=0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("verbose", [3, -1, "yes", "auto", 1.0, None])
def test_bad_verbose_is_an_error_naming_it(mlp, data, verbose):
    x, y = data
    params = mlp.init(jax.random.key(0), x[:1])
    with pytest.raises(ValueError, match=r"verbose must be 0 .* 1 .* or 2"):
        _fit(mlp, params, x, y, verbose=verbose)
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError, match=r"fit_many: verbose must be 0"):
        jaxnn.fit_many(mlp, jaxnn.init_many(mlp, keys, x[:1]), x, y,
                       loss="sparse_softmax_cross_entropy", optimizer=optax.sgd(0.1),
                       key=jax.random.key(1), verbose=verbose)


def test_learning_rate_in_history_is_the_schedules_value(mlp, data):
    x, y = data  # 64 examples, batch 8: 8 steps an epoch
    schedule = optax.linear_schedule(0.1, 0.01, transition_steps=40)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    params = mlp.init(jax.random.key(0), x[:1])
    result = _fit(mlp, params, x, y, epochs=3, optimizer=optimizer)
    # the rate the last step of each epoch used: steps counted from 0
    expected = [float(schedule(8 * (epoch + 1) - 1)) for epoch in range(3)]
    np.testing.assert_allclose(result.history["learning_rate"], expected, rtol=1e-6)
    assert len(set(expected)) == 3
    plain = _fit(mlp, params, x, y, epochs=1)
    assert "learning_rate" not in plain.history


def test_a_model_with_state_needs_state_and_says_how(data):
    x, y = data
    model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.BatchNorm(), jaxnn.Dense(2)])
    params, state = model.init_with_state(jax.random.key(0), x[:1])
    with pytest.raises(ValueError, match=r"has state .*fit\(\.\.\., state=state\)") as error:
        _fit(model, params, x, y)
    assert "model.init_with_state(key, x[:1])" in str(error.value)
    with pytest.raises(ValueError, match=r"predict\(\.\.\., state=result\.state\)"):
        jaxnn.predict(model, params, x)
    with pytest.raises(ValueError, match=r"evaluate\(\.\.\., state=result\.state\)"):
        jaxnn.evaluate(model, params, x, y, loss="sparse_softmax_cross_entropy")
    with pytest.raises(TypeError, match=r"params is a pair .*state=state"):
        _fit(model, (params, state), x, y)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": optax.adam}, r"got the function adam itself.*optimizer=adam\(1e-3\)"),
    ({"key": 0}, r"key must be one PRNG key such as jax.random.key\(0\)"),
    ({"metrics": "accuracy"}, r"metrics=\['accuracy'\]"),
])
def test_argument_errors_give_the_fix(mlp, data, kwargs, message):
    x, y = data
    params = mlp.init(jax.random.key(0), x[:1])
    with pytest.raises(TypeError, match=message):
        _fit(mlp, params, x, y, **kwargs)
