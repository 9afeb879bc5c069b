"""Plain JAX + optax, the way JAX tutorials write it: hand-written models over
parameter dicts, a ``jax.jit`` train step called from a Python loop over batches
sliced from shuffled device arrays (``_jax_loop``).

The models use ``x @ w``, ``lax.conv_general_dilated`` (NHWC/HWIO), ``lax.reduce_window``
for max pooling, ``jax.random.bernoulli`` for dropout (its key folded from the
step number inside the step), an LSTM cell computing ``x_t @ W_x + h @ W_h + b``
at every step of a ``lax.scan``, as a tutorial writes it, and the Transformer's
attention as two ``jnp.einsum`` with a softmax between, heads split by reshaping.

With ``--dtype bfloat16`` (the plan's ``options["dtype"]``) the loss casts the
float32 params and the inputs to bfloat16 before the forward pass and the
logits back to float32 (mixed precision: the params and Adam stay float32);
inference runs on params and inputs cast to bfloat16 beforehand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from bench_common import LEARNING_RATE, Data, Measurement, ModelSpec, Plan, model_inputs

from peers import _jax_loop


def versions() -> dict[str, str]:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__}


def setup(cores: int) -> dict:
    return {"jax_devices": [str(d) for d in jax.devices()], "device_count": jax.device_count()}


def _glorot(key, shape):
    fan_in = 1
    for d in shape[:-1]:
        fan_in *= d
    limit = jnp.sqrt(6.0 / (fan_in + shape[-1]))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def _dense(key, n_in, n_out):
    return {"w": _glorot(key, (n_in, n_out)), "b": jnp.zeros((n_out,), jnp.float32)}


def init(kind: str, key):
    keys = jax.random.split(key, 4)
    if kind == "mlp":
        return [_dense(keys[0], 784, 64), _dense(keys[1], 64, 64), _dense(keys[2], 64, 10)]
    if kind == "cnn":
        return {
            "conv1": {"w": _glorot(keys[0], (3, 3, 1, 32)), "b": jnp.zeros((32,))},
            "conv2": {"w": _glorot(keys[1], (3, 3, 32, 64)), "b": jnp.zeros((64,))},
            "dense": _dense(keys[2], 1600, 10),
        }
    if kind == "lstm":
        return {"wx": _glorot(keys[0], (28, 512)), "wh": _glorot(keys[1], (128, 512)),
                "b": jnp.zeros((512,)), "dense": _dense(keys[2], 128, 10)}
    if kind == "transformer":
        return _init_transformer(keys[0])
    raise ValueError(kind)


D_MODEL, HEADS, MLP_WIDTH, BLOCKS, TOKENS = 64, 4, 128, 2, 28


def _norm(d):
    return {"scale": jnp.ones((d,), jnp.float32), "offset": jnp.zeros((d,), jnp.float32)}


def _init_transformer(key):
    keys = iter(jax.random.split(key, 3 + 6 * BLOCKS))
    blocks = []
    for _ in range(BLOCKS):
        blocks.append({
            "norm0": _norm(D_MODEL), "norm1": _norm(D_MODEL),
            **{name: _dense(next(keys), D_MODEL, D_MODEL) for name in ("q", "k", "v", "o")},
            "mlp0": _dense(next(keys), D_MODEL, MLP_WIDTH),
            "mlp1": _dense(next(keys), MLP_WIDTH, D_MODEL),
        })
    return {"embed": _dense(next(keys), 28, D_MODEL),
            "position": 0.02 * jax.random.normal(next(keys), (TOKENS, D_MODEL)),
            "blocks": blocks, "norm": _norm(D_MODEL),
            "dense": _dense(next(keys), D_MODEL, 10)}


def mlp(params, x, key=None):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _conv(x, p):
    y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["b"])


def _max_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cnn(params, x, key=None):
    x = _max_pool(_conv(x, params["conv1"]))
    x = _max_pool(_conv(x, params["conv2"]))
    x = x.reshape(x.shape[0], -1)
    if key is not None:  # training: dropout 0.5
        keep = jax.random.bernoulli(key, 0.5, x.shape)
        x = jnp.where(keep, x / 0.5, 0.0)
    return x @ params["dense"]["w"] + params["dense"]["b"]


def lstm(params, x, key=None):
    n = x.shape[0]

    def cell(carry, x_t):
        h, c = carry
        z = x_t @ params["wx"] + h @ params["wh"] + params["b"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), None

    zeros = jnp.zeros((n, 128), x.dtype)
    (h, _), _ = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return h @ params["dense"]["w"] + params["dense"]["b"]


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["offset"]


def _linear(x, p):
    return x @ p["w"] + p["b"]


def _attention(x, p):
    n, length, d = x.shape
    q, k, v = (_linear(x, p[name]).reshape(n, length, HEADS, d // HEADS)
               for name in ("q", "k", "v"))
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k) * (d // HEADS) ** -0.5
    weights = jax.nn.softmax(logits, axis=-1)
    return _linear(jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, length, d), p["o"])


def transformer(params, x, key=None):
    h = _linear(x, params["embed"]) + params["position"]
    for p in params["blocks"]:  # pre-norm
        h = h + _attention(_layer_norm(h, p["norm0"]), p)
        h = h + _linear(jax.nn.relu(_linear(_layer_norm(h, p["norm1"]), p["mlp0"])), p["mlp1"])
    return _linear(_layer_norm(h, params["norm"]).mean(axis=1), params["dense"])


APPLY = {"mlp": mlp, "cnn": cnn, "lstm": lstm, "transformer": transformer}


def compute_dtype(plan: Plan):
    """The plan's compute dtype: None for float32 (no casts), else e.g. ``jnp.bfloat16``."""
    name = plan.options.get("dtype", "float32")
    return None if name == "float32" else jnp.dtype(name)


def cast(tree, dtype):
    """``tree`` with every leaf cast to ``dtype`` (a no-op for ``dtype=None``)."""
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def make_loss(apply, dtype):
    """Mean softmax cross-entropy; with ``dtype``, the forward pass in it (mixed precision)."""

    def loss_fn(params, x, y, key):
        logits = apply(cast(params, dtype), cast(x, dtype), key)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), y).mean()

    return loss_fn


def training(spec: ModelSpec, plan: Plan):
    """``(state, step)``: the initial ``(params, opt_state)`` and the Adam step
    ``step(state, x, y, i) -> (state, loss)`` (dropout key folded from step ``i``),
    not jitted; shared with the hand-fused peer (``peers/jax_scan.py``)."""
    apply = APPLY[spec.kind]
    init_key, dropout_key = jax.random.split(jax.random.key(plan.seed))
    params = init(spec.kind, init_key)
    optimizer = optax.adam(LEARNING_RATE)
    uses_dropout = spec.kind == "cnn"
    grad_fn = jax.value_and_grad(make_loss(apply, compute_dtype(plan)))

    def step(state, x, y, i):
        params, opt_state = state
        key = jax.random.fold_in(dropout_key, i) if uses_dropout else None
        loss, grads = grad_fn(params, x, y, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return (params, optimizer.init(params)), step


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    apply = APPLY[spec.kind]
    dtype = compute_dtype(plan)
    state, step = training(spec, plan)
    train_step = jax.jit(step)

    x = model_inputs(spec.kind, data.x_train[:plan.samples])
    (params, _), seconds, samples, wall = _jax_loop.train(
        train_step, state, x, data.y_train[:plan.samples], spec.batch,
        plan.epochs, plan.seed)

    predict = jax.jit(apply)
    x_test = model_inputs(spec.kind, data.x_test[:plan.infer_samples])
    params = cast(params, dtype)
    first, infer_seconds = _jax_loop.infer(lambda xb: predict(params, xb),
                                           cast(jnp.asarray(x_test), dtype),
                                           plan.infer_batch, plan.infer_repeats)
    return Measurement(epoch_seconds=seconds, samples_per_epoch=samples, wall_seconds=wall,
                       infer_seconds=infer_seconds, infer_first_seconds=first,
                       infer_samples=len(x_test),
                       notes=["ragged last batch dropped (tutorial style)"]
                       + ([f"mixed precision: {dtype.name} compute, float32 params"]
                          if dtype is not None else []))
