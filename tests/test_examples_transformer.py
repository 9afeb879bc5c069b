"""The MNIST Transformer example: its model's parameter count, and its default run.

The fast test builds the example's model and checks the summary's parameter counts
against the formulas. The slow one runs ``examples/mnist_transformer.py`` as a
subprocess in its default configuration on the real MNIST (the ``mnist_dir``
fixture; skipped when the files are absent) and checks, from its ``--json`` line,
the test accuracy the example's docstring promises (>= 0.98).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "mnist_transformer.py"


def _load(name):
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _dense(fan_in, units):
    return fan_in * units + units


def _block(d, mlp):
    norms = 2 * 2 * d                  # two LayerNorms: scale and offset
    attention = 4 * _dense(d, d)       # query, key, value and output projections
    return norms + attention + _dense(d, mlp) + _dense(mlp, d)


def test_transformer_param_count_matches_formulas():
    tx = _load("mnist_transformer")
    model = tx.build_model()
    x = jax.ShapeDtypeStruct((4, 28, 28), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    d, mlp = tx.D_MODEL, tx.MLP_SIZE
    expected = (_dense(28, d) + 28 * d + tx.NUM_BLOCKS * _block(d, mlp) + 2 * d
                + _dense(d, 10))
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    assert total == expected == 71_370
    assert model.summary(x).splitlines()[-1].endswith("71,370")
    # the 8x8 digits fallback: 8 rows, a position table of 8
    small = jax.eval_shape(tx.build_model(8).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((2, 8, 8), np.float32))
    assert small["position_embedding_0"]["embedding"].shape == (8, d)
    assert params["position_embedding_0"]["embedding"].shape == (28, d)


@pytest.mark.slow
def test_default_run_reaches_98_percent_on_mnist(mnist_dir):
    # The example as a user runs it (its default flags: epochs, batch, schedule, the
    # validation split), with the tests' compilation cache instead of the user's.
    command = [sys.executable, str(SCRIPT), "--data-dir", str(mnist_dir), "--json", "--quiet",
               "--cache-dir", os.environ["JAX_COMPILATION_CACHE_DIR"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["dataset"] == "MNIST" and out["test_examples"] == 10_000
    assert out["train_examples"] == 54_000 and out["validation_examples"] == 6_000
    assert out["epochs"] == _load("mnist_transformer").EPOCHS
    assert out["params"] == 71_370 and out["lr_schedule"] == "warmup_cosine"
    assert out["test_accuracy"] >= 0.98, out["test_accuracy"]
