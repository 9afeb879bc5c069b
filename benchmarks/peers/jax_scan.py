"""Plain JAX + optax with the whole epoch hand-fused into one jitted function.

The yardstick for jaxnn's own overhead: the same hand-written models, loss and
Adam as ``peers/jax_optax.py`` (imported from there), written the fastest way we
know by hand. One jitted call per epoch takes the device-resident dataset and
the epoch number, draws the permutation on the device, and runs the steps in a
``lax.scan``, each gathering its batch by index; it returns the new parameters,
optimizer state and the summed loss. The ragged last batch is dropped (as the
``jax`` peer does), so an epoch trains ``(n // batch) * batch`` samples. The
parameters and optimizer state are donated to each call.

The CNN is the exception: convolutions inside a rolled ``lax.scan`` run many
times slower on XLA:CPU, so for it a jitted function runs 4 steps as
straight-line code (a Python loop inside ``jit``) and a Python loop calls it
over the epoch's permutation (itself drawn by one jitted call), which is what
``jaxnn.fit`` does for the CNN too (``steps_per_call=4``).

Dropout keys are ``fold_in(key, global step)``; ``--dtype bfloat16`` casts params
and inputs inside the loss, as the ``jax`` peer does.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from bench_common import Data, Measurement, ModelSpec, Plan, model_inputs

from peers import _jax_loop
from peers.jax_optax import APPLY, cast, compute_dtype, setup, training, versions

__all__ = ["run", "setup", "versions"]

CNN_STEPS_PER_CALL = 4


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    apply = APPLY[spec.kind]
    dtype = compute_dtype(plan)
    state, train_step = training(spec, plan)
    shuffle_key = jax.random.key(plan.seed + 1)
    batch = spec.batch
    n = plan.samples
    steps = n // batch
    if steps == 0:
        raise ValueError(f"{n} samples make no full batch of {batch}")

    def step(state, x, y, idx, i):
        return train_step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), i)

    def permutation(epoch):
        perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)
        return perm[:steps * batch].reshape(steps, batch)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def scanned_epoch(state, x, y, epoch):
        def body(state, plan):
            idx, i = plan
            return step(state, x, y, idx, i)

        first = epoch * steps
        state, losses = jax.lax.scan(body, state, (permutation(epoch),
                                                   first + jnp.arange(steps)))
        return state, jnp.sum(losses)

    @functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("length",))
    def straight_steps(state, x, y, perm, epoch, start, length):
        total = jnp.zeros((), jnp.float32)
        for j in range(length):
            idx = jax.lax.dynamic_index_in_dim(perm, start + j, keepdims=False)
            state, loss = step(state, x, y, idx, epoch * steps + start + j)
            total = total + loss
        return state, total

    plan_of = jax.jit(permutation)

    def chunked_epoch(state, x, y, epoch):
        perm = plan_of(epoch)
        total = jnp.zeros((), jnp.float32)
        for start in range(0, steps, CNN_STEPS_PER_CALL):
            length = min(CNN_STEPS_PER_CALL, steps - start)
            state, loss = straight_steps(state, x, y, perm, epoch, jnp.int32(start),
                                         length=length)
            total = total + loss
        return state, total

    run_epoch = chunked_epoch if spec.kind == "cnn" else scanned_epoch

    start_all = time.perf_counter()
    x = jnp.asarray(model_inputs(spec.kind, data.x_train[:n]))
    y = jnp.asarray(data.y_train[:n])
    seconds = []
    for epoch in range(plan.epochs):
        start = time.perf_counter()
        state, loss = run_epoch(state, x, y, jnp.int32(epoch))
        jax.block_until_ready((state, loss))
        seconds.append(time.perf_counter() - start)
    wall = time.perf_counter() - start_all
    params = state[0]

    predict = jax.jit(apply)
    x_test = model_inputs(spec.kind, data.x_test[:plan.infer_samples])
    params = cast(params, dtype)
    first, infer_seconds = _jax_loop.infer(lambda xb: predict(params, xb),
                                           cast(jnp.asarray(x_test), dtype),
                                           plan.infer_batch, plan.infer_repeats)
    how = (f"{CNN_STEPS_PER_CALL} straight-line steps per jitted call from a Python loop "
           "(a rolled scan of convolutions is slow on XLA:CPU)" if spec.kind == "cnn" else
           "the whole epoch one jitted lax.scan")
    notes = [f"{how}; on-device shuffle and gather; ragged last batch dropped"]
    if dtype is not None:
        notes.append(f"mixed precision: {dtype.name} compute, float32 params")
    return Measurement(epoch_seconds=seconds, samples_per_epoch=steps * batch, wall_seconds=wall,
                       infer_seconds=infer_seconds, infer_first_seconds=first,
                       infer_samples=len(x_test), notes=notes)
