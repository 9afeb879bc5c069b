"""Equinox + optax: ``eqx.nn`` layers (single-sample modules, ``jax.vmap`` over the
batch), ``eqx.filter_value_and_grad`` and an ``eqx.filter_jit`` train step,
called from the loop of ``_jax_loop``.

The CNN takes CHW images per sample (``eqx.nn.Conv2d``); the LSTM is an
``eqx.nn.LSTMCell`` in a ``lax.scan`` over the rows; the Transformer is written out
from ``eqx.nn.MultiheadAttention`` (all four biases on), ``eqx.nn.LayerNorm`` and
``eqx.nn.Linear``, pre-norm; the CNN's dropout key is carried in the train state,
split once per step and once per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from bench_common import LEARNING_RATE, Data, Measurement, ModelSpec, Plan, model_inputs

from peers import _jax_loop


def versions() -> dict[str, str]:
    import equinox

    return {"equinox": equinox.__version__, "jax": jax.__version__, "optax": optax.__version__}


def setup(cores: int) -> dict:
    return {"jax_devices": [str(d) for d in jax.devices()]}


def build(kind: str, key):
    import equinox as eqx

    keys = jax.random.split(key, 3)

    class MLP(eqx.Module):
        mlp: eqx.nn.MLP

        def __init__(self):
            self.mlp = eqx.nn.MLP(784, 10, 64, depth=2, activation=jax.nn.relu, key=keys[0])

        def __call__(self, x, key=None):
            return self.mlp(x)

    class CNN(eqx.Module):
        conv1: eqx.nn.Conv2d
        conv2: eqx.nn.Conv2d
        pool: eqx.nn.MaxPool2d
        dropout: eqx.nn.Dropout
        dense: eqx.nn.Linear

        def __init__(self):
            self.conv1 = eqx.nn.Conv2d(1, 32, 3, key=keys[0])
            self.conv2 = eqx.nn.Conv2d(32, 64, 3, key=keys[1])
            self.pool = eqx.nn.MaxPool2d(2, stride=2)
            self.dropout = eqx.nn.Dropout(0.5)
            self.dense = eqx.nn.Linear(1600, 10, key=keys[2])

        def __call__(self, x, key=None):  # x: (1, 28, 28)
            x = self.pool(jax.nn.relu(self.conv1(x)))
            x = self.pool(jax.nn.relu(self.conv2(x)))
            x = self.dropout(x.reshape(-1), key=key, inference=key is None)
            return self.dense(x)

    class LSTM(eqx.Module):
        cell: eqx.nn.LSTMCell
        dense: eqx.nn.Linear

        def __init__(self):
            self.cell = eqx.nn.LSTMCell(28, 128, key=keys[0])
            self.dense = eqx.nn.Linear(128, 10, key=keys[1])

        def __call__(self, x, key=None):  # x: (28, 28), rows in time order
            def step(carry, row):
                return self.cell(row, carry), None

            zeros = jnp.zeros((128,), x.dtype)
            (h, _), _ = jax.lax.scan(step, (zeros, zeros), x)
            return self.dense(h)

    class Block(eqx.Module):
        """Pre-norm: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``, on one ``(28, 64)``
        sequence (the layer norms and linears mapped over its tokens)."""

        norm0: eqx.nn.LayerNorm
        attention: eqx.nn.MultiheadAttention
        norm1: eqx.nn.LayerNorm
        mlp0: eqx.nn.Linear
        mlp1: eqx.nn.Linear

        def __init__(self, key):
            k0, k1, k2 = jax.random.split(key, 3)
            self.norm0 = eqx.nn.LayerNorm(64, eps=1e-5)
            self.attention = eqx.nn.MultiheadAttention(
                4, 64, use_query_bias=True, use_key_bias=True, use_value_bias=True,
                use_output_bias=True, key=k0)
            self.norm1 = eqx.nn.LayerNorm(64, eps=1e-5)
            self.mlp0 = eqx.nn.Linear(64, 128, key=k1)
            self.mlp1 = eqx.nn.Linear(128, 64, key=k2)

        def __call__(self, x):
            y = jax.vmap(self.norm0)(x)
            x = x + self.attention(y, y, y)
            y = jax.vmap(self.mlp0)(jax.vmap(self.norm1)(x))
            return x + jax.vmap(self.mlp1)(jax.nn.relu(y))

    class Transformer(eqx.Module):
        embed: eqx.nn.Linear
        position: jax.Array
        blocks: list
        norm: eqx.nn.LayerNorm
        dense: eqx.nn.Linear

        def __init__(self):
            k0, k1, k2, k3 = jax.random.split(keys[0], 4)
            self.embed = eqx.nn.Linear(28, 64, key=k0)
            self.position = 0.02 * jax.random.normal(k1, (28, 64))
            self.blocks = [Block(k) for k in jax.random.split(k2, 2)]
            self.norm = eqx.nn.LayerNorm(64, eps=1e-5)
            self.dense = eqx.nn.Linear(64, 10, key=k3)

        def __call__(self, x, key=None):  # x: (28, 28), rows as tokens
            h = jax.vmap(self.embed)(x) + self.position
            for block in self.blocks:
                h = block(h)
            return self.dense(jax.vmap(self.norm)(h).mean(axis=0))

    return {"mlp": MLP, "cnn": CNN, "lstm": LSTM, "transformer": Transformer}[kind]()


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    import equinox as eqx

    init_key, dropout_key = jax.random.split(jax.random.key(plan.seed))
    model = build(spec.kind, init_key)
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    uses_dropout = spec.kind == "cnn"

    def loss_fn(model, x, y, key):
        if uses_dropout:
            logits = jax.vmap(model)(x, jax.random.split(key, x.shape[0]))
        else:
            logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @eqx.filter_jit
    def train_step(state, x, y):
        model, opt_state, key = state
        key, step_key = jax.random.split(key)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y, step_key)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return (eqx.apply_updates(model, updates), opt_state, key), loss

    def step(state, x, y, i):  # filter_jit would make the int i static: keep the key in the state
        return train_step(state, x, y)

    x = model_inputs(spec.kind, data.x_train[:plan.samples], channels_first=True)
    (model, _, _), seconds, samples, wall = _jax_loop.train(
        step, (model, opt_state, dropout_key), x, data.y_train[:plan.samples], spec.batch,
        plan.epochs, plan.seed)

    forward = eqx.filter_jit(lambda model, x: jax.vmap(model)(x))
    x_test = model_inputs(spec.kind, data.x_test[:plan.infer_samples], channels_first=True)
    first, infer_seconds = _jax_loop.infer(lambda xb: forward(model, xb), x_test,
                                           plan.infer_batch, plan.infer_repeats)
    return Measurement(epoch_seconds=seconds, samples_per_epoch=samples, wall_seconds=wall,
                       infer_seconds=infer_seconds, infer_first_seconds=first,
                       infer_samples=len(x_test),
                       notes=["ragged last batch dropped (tutorial style)"])
