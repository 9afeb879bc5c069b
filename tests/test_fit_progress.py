"""What fit prints (verbose 0, 1, 2) on a terminal and off one, its errors'
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

# The data, model and params of every fit here, in this process and in the worker's: the
# same programs, compiled once (the worker and this process share the compilation cache).
# The params are drawn in numpy (initialisation would compile a program of its own).
SETUP = """
import jax, jax.numpy as jnp, numpy as np, optax, jaxnn
x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32)
model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.relu, jaxnn.Dense(2)])
rng = np.random.default_rng(1)
params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                                jax.eval_shape(model.init, jax.random.key(0), x[:1]))
"""
_setup: dict = {}
exec(SETUP, _setup)
X, Y, MLP, PARAMS = (_setup[name] for name in ("x", "y", "model", "params"))

# Trains the MLP for two epochs of 50 steps with verbose=1.
WORKER = SETUP + """
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


def _fit(model=MLP, params=PARAMS, x=X, y=Y, **kwargs):
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


def test_no_carriage_return_off_a_terminal(capsys):
    # verbose=1 with stdout not a terminal (here pytest's capture, as a pipe or a file)
    _fit(epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0].startswith("compiled in ")
    assert [line.split(" - ")[0] for line in lines[1:]] == ["Epoch 1/2", "Epoch 2/2"]


def test_verbose_2_is_one_line_per_epoch_and_0_is_silent(capsys):
    _fit(epochs=3, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    _fit(epochs=2, verbose=0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("verbose", [3, -1, "yes", "auto", 1.0, None])
def test_bad_verbose_is_an_error_naming_it(verbose):
    with pytest.raises(ValueError, match=r"verbose must be 0 .* 1 .* or 2"):
        _fit(verbose=verbose)
    population = jax.tree_util.tree_map(lambda a: np.stack([a, a]), PARAMS)  # 2 members
    with pytest.raises(ValueError, match=r"fit_many: verbose must be 0"):
        jaxnn.fit_many(MLP, population, X, Y, loss="sparse_softmax_cross_entropy",
                       optimizer=optax.sgd(0.1), key=jax.random.key(1), verbose=verbose)


def test_learning_rate_in_history_is_the_schedules_value():
    # 400 examples, batch 8: 50 steps an epoch
    schedule = optax.linear_schedule(0.1, 0.01, transition_steps=200)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    result = _fit(epochs=3, optimizer=optimizer)
    # the rate the last step of each epoch used: steps counted from 0
    expected = [float(schedule(50 * (epoch + 1) - 1)) for epoch in range(3)]
    np.testing.assert_allclose(result.history["learning_rate"], expected, rtol=1e-6)
    assert len(set(expected)) == 3
    plain = _fit(epochs=1)
    assert "learning_rate" not in plain.history


def test_a_model_with_state_needs_state_and_says_how():
    model = jaxnn.Sequential([jaxnn.Dense(16), jaxnn.BatchNorm(), jaxnn.Dense(2)])
    # zeros of the shapes init_with_state gives: the errors come before anything runs
    params, state = jax.tree_util.tree_map(
        lambda s: np.zeros(s.shape, s.dtype),
        jax.eval_shape(model.init_with_state, jax.random.key(0), X[:1]))
    with pytest.raises(ValueError, match=r"has state .*fit\(\.\.\., state=state\)") as error:
        _fit(model, params)
    assert "model.init_with_state(key, x[:1])" in str(error.value)
    with pytest.raises(ValueError, match=r"predict\(\.\.\., state=result\.state\)"):
        jaxnn.predict(model, params, X)
    with pytest.raises(ValueError, match=r"evaluate\(\.\.\., state=result\.state\)"):
        jaxnn.evaluate(model, params, X, Y, loss="sparse_softmax_cross_entropy")
    with pytest.raises(TypeError, match=r"params is a pair .*state=state"):
        _fit(model, (params, state))


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": optax.adam}, r"got the function adam itself.*optimizer=adam\(1e-3\)"),
    ({"key": 0}, r"key must be one PRNG key such as jax.random.key\(0\)"),
    ({"metrics": "accuracy"}, r"metrics=\['accuracy'\]"),
])
def test_argument_errors_give_the_fix(kwargs, message):
    with pytest.raises(TypeError, match=message):
        _fit(**kwargs)
