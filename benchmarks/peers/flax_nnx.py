"""Flax NNX: ``nnx.Module`` models, ``nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)``
and an ``nnx.jit`` train step, called from the loop of ``_jax_loop``.

The LSTM is ``nnx.RNN`` over an ``nnx.OptimizedLSTMCell`` (the cell that fuses
its gate matmuls); the CNN's dropout draws from the model's own ``nnx.Rngs``
stream; the Transformer's blocks are ``nnx.MultiHeadAttention`` and
``nnx.LayerNorm`` / ``nnx.Linear``, pre-norm, written out. Inference calls an
``nnx.jit`` forward with the model in eval mode.
"""

from __future__ import annotations

import jax
import optax
from bench_common import LEARNING_RATE, Data, Measurement, ModelSpec, Plan, model_inputs

from peers import _jax_loop


def versions() -> dict[str, str]:
    import flax

    return {"flax": flax.__version__, "jax": jax.__version__, "optax": optax.__version__}


def setup(cores: int) -> dict:
    return {"jax_devices": [str(d) for d in jax.devices()]}


def build(kind: str, seed: int):
    from flax import nnx

    rngs = nnx.Rngs(params=seed, dropout=seed + 1)

    class MLP(nnx.Module):
        def __init__(self):
            self.l1 = nnx.Linear(784, 64, rngs=rngs)
            self.l2 = nnx.Linear(64, 64, rngs=rngs)
            self.l3 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

    class CNN(nnx.Module):
        def __init__(self):
            self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), padding="VALID", rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), padding="VALID", rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.dense = nnx.Linear(1600, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
            x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
            return self.dense(self.dropout(x.reshape(x.shape[0], -1)))

    class LSTM(nnx.Module):
        def __init__(self):
            self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(28, 128, rngs=rngs))
            self.dense = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.rnn(x)[:, -1])

    class Block(nnx.Module):
        """Pre-norm: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

        def __init__(self):
            self.norm0 = nnx.LayerNorm(64, epsilon=1e-5, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
            self.norm1 = nnx.LayerNorm(64, epsilon=1e-5, rngs=rngs)
            self.mlp0 = nnx.Linear(64, 128, rngs=rngs)
            self.mlp1 = nnx.Linear(128, 64, rngs=rngs)

        def __call__(self, x):
            x = x + self.attention(self.norm0(x))
            return x + self.mlp1(jax.nn.relu(self.mlp0(self.norm1(x))))

    class Transformer(nnx.Module):
        def __init__(self):
            self.embed = nnx.Linear(28, 64, rngs=rngs)
            self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (28, 64)))
            self.blocks = nnx.List([Block(), Block()])
            self.norm = nnx.LayerNorm(64, epsilon=1e-5, rngs=rngs)
            self.dense = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            h = self.embed(x) + self.position[...]
            for block in self.blocks:
                h = block(h)
            return self.dense(self.norm(h).mean(axis=1))

    return {"mlp": MLP, "cnn": CNN, "lstm": LSTM, "transformer": Transformer}[kind]()


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    from flax import nnx

    model = build(spec.kind, plan.seed)
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def step(state, x, y, i):
        return state, train_step(model, optimizer, x, y)

    model.train()
    x = model_inputs(spec.kind, data.x_train[:plan.samples])
    _, seconds, samples, wall = _jax_loop.train(step, (), x, data.y_train[:plan.samples],
                                                spec.batch, plan.epochs, plan.seed)

    model.eval()
    forward = nnx.jit(lambda model, x: model(x))
    x_test = model_inputs(spec.kind, data.x_test[:plan.infer_samples])
    first, infer_seconds = _jax_loop.infer(lambda xb: forward(model, xb), x_test,
                                           plan.infer_batch, plan.infer_repeats)
    return Measurement(epoch_seconds=seconds, samples_per_epoch=samples, wall_seconds=wall,
                       infer_seconds=infer_seconds, infer_first_seconds=first,
                       infer_samples=len(x_test),
                       notes=["ragged last batch dropped (tutorial style)"])
