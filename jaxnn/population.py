"""Many models at once: train K independent models in one compiled program.

``fit_many`` runs ``jax.vmap`` over the members of a population: each member
has its own parameters, optimizer state and training key, and may have its own
hyperparameters (learning rate, penalty strength, ...). All members share the
dataset, which is put on the device once. Every member follows exactly the
recipe of :func:`jaxnn.fit` (its own shuffles and dropout keys from its key),
so member ``k`` ends where ``fit`` alone would end with the same seed and
hyperparameters: the population is a speed-up, not a different algorithm.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn import _loss_forms, _steps, host_memory
from jaxnn._chunks import epoch_plan, scan_steps
from jaxnn._fit_checks import ON_NONFINITE, check_arrays, check_data, check_positive_int
from jaxnn._progress import check_verbose
from jaxnn._steps import LossFn, MetricFn, all_finite, make_step, metric_table, no_halt
from jaxnn._typing import Array, Params, PRNGKey
from jaxnn.evaluation import evaluation_sums
from jaxnn.layers._base import Layer
from jaxnn.results import FitResult, NonFiniteError
from jaxnn.training import NONFINITE_WHAT

Hyperparams = Mapping[str, Array]


def init_many(model: Layer, keys: PRNGKey, *inputs: Any) -> Params:
    """Initialise one model per key: every leaf gets a leading axis of size ``len(keys)``."""
    structs = tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in inputs)

    def one(key):
        params, state = model.initialize(key, *structs)
        if jax.tree_util.tree_leaves(state):
            raise ValueError("init_many: this model has state; fit_many supports stateless "
                             "models only for now")
        return params

    return jax.jit(jax.vmap(one))(keys)


def _is_single_key(key: Any) -> bool:
    """One PRNG key (typed, shape ``()``; or raw uint32, shape ``(2,)``), not a stack."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 0
    return key.ndim == 1


def _population_size(params: Params, keys: PRNGKey, hyperparams: Hyperparams) -> int:
    """K, the shared leading axis of every params leaf, the keys and each hyperparameter."""
    leading = [("params", np.shape(leaf)[:1]) for leaf in jax.tree_util.tree_leaves(params)]
    if not _is_single_key(keys):
        leading.append(("key", np.shape(keys)[:1]))
    leading += [(f"hyperparams[{name!r}]", np.shape(v)[:1]) for name, v in hyperparams.items()]
    sizes = {shape for _, shape in leading}
    if len(sizes) != 1 or sizes == {()}:
        described = ", ".join(f"{name}: {shape[0] if shape else 'scalar'}"
                              for name, shape in dict(leading).items())
        raise ValueError("fit_many: params (every leaf), key and each hyperparameter need the "
                         f"same leading population axis; got {described}")
    return sizes.pop()[0]


def fit_many(
    model: Layer,
    params: Params,
    x: Any,
    y: Any,
    *,
    loss: LossFn,
    optimizer: optax.GradientTransformation | Callable[[Hyperparams], Any],
    key: PRNGKey,
    hyperparams: Hyperparams | None = None,
    penalty: Callable[..., Array] | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    metrics: Sequence[str | MetricFn] = ("accuracy",),
    validation_data: tuple[Any, Any] | None = None,
    shuffle: bool = True,
    verbose: int = 1,
    on_nonfinite: str = "raise",
) -> FitResult:
    """Train a population of K models of the same architecture in one program.

    Args:
      model: the (stateless) model every member uses.
      params: stacked parameters, leading axis K (see :func:`init_many`).
      x, y: the training data, shared by all members.
      loss, metrics, epochs, batch_size, shuffle: as in :func:`jaxnn.fit`.
      optimizer: one optax gradient transformation for all members, or a function
        ``hyperparams -> transformation`` called with each member's
        hyperparameters, e.g. ``lambda hp: jaxnn.optimizers.adam(hp["lr"])``.
      key: one PRNG key shared by all members, or stacked keys, one per member
        (``jax.random.split(key, K)``). Member ``k`` shuffles (and draws dropout
        masks) exactly as ``fit(..., key=key)``, respectively ``fit(...,
        key=key[k])``, would. One shared key is the fast path: every member sees
        the same batch at each step, so the first layer of all K members runs as
        one matrix product ``(batch, d) @ (d, K * units)`` instead of K small ones;
        the members still differ in their initial parameters and hyperparameters.
      hyperparams: ``{name: array of shape (K,)}``, per-member values passed to
        ``optimizer`` and ``penalty``.
      penalty: ``penalty(params)`` as in ``fit``; when ``hyperparams`` is given,
        ``penalty(params, hyperparams)`` (e.g. ``lambda p, hp: hp["l2"] * l2(1.0)(p)``).
      validation_data: ``(x_val, y_val)`` evaluated for every member each epoch.
      verbose: 1 or 2 (default 1): one line per epoch (the best and the mean loss of
        the members); 0: silent. ``True``/``False`` mean 1/0.
      on_nonfinite: as in :func:`jaxnn.fit`: at the first step where the loss or
        the gradient of any member is NaN or inf, training stops for the whole
        population; :class:`jaxnn.NonFiniteError` (or, with ``"warn"``,
        a warning and the returned result) names the members, the epoch and the
        step, and its ``result`` holds every member's values from before that step.
        ``"ignore"``: no check.

    Returns:
      A :class:`jaxnn.FitResult` whose params and optimizer state have the
      leading axis K, and whose history holds, per logged name, one list of K
      values per epoch.
    """
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    verbose = check_verbose(verbose, "fit_many")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    guard = on_nonfinite != "ignore"
    loss = _loss_forms.weighted(loss, "loss")
    hyperparams = dict(hyperparams or {})
    members = _population_size(params, key, hyperparams)
    n = check_arrays(x, y)
    first_member = jax.tree_util.tree_map(lambda a: a[0], params)
    check_data(model, first_member, {}, x, y)
    batch_size = min(batch_size, n)
    metric_fns = metric_table(metrics)
    hyperparams = {name: jnp.asarray(v) for name, v in hyperparams.items()}
    host_memory.prepare_cpu()

    def parts(hp):
        opt = optimizer if isinstance(optimizer, optax.GradientTransformation) else optimizer(hp)
        if penalty is None:
            pen = None
        elif hyperparams:
            pen = lambda p: penalty(p, hp)
        else:
            pen = penalty
        return opt, pen

    def member_epoch(carry, hp, member_key, epoch, data, length=None, halting=False):
        opt, pen = parts(hp)
        step = make_step(model, loss, opt, pen, metric_fns, guard=halting)
        plan = epoch_plan(jax.random.fold_in(member_key, epoch), n, batch_size, shuffle)
        if length is not None:  # the epoch's first `length` steps (to replay up to a bad step)
            plan = jax.tree_util.tree_map(lambda a: a[:length], plan)
        if halting:  # find the member's first non-finite step (see jaxnn._steps.halting)
            (carry, (code, at, _)), sums = scan_steps(_steps.halting(step),
                                                      (carry, no_halt()),
                                                      data, plan)
            return carry, (code, at)
        return scan_steps(step, carry, data, plan)

    def member_init(p, hp):
        return parts(hp)[0].init(p)

    key_axis = None if _is_single_key(key) else 0

    @functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("length", "halting"))
    def run_epoch(carry, hp, member_key, epoch, data, length=None, halting=False):
        one = functools.partial(member_epoch, length=length, halting=halting)
        return jax.vmap(one, in_axes=(0, 0, key_axis, None, None))(carry, hp, member_key,
                                                                   epoch, data)

    data = jax.tree_util.tree_map(jnp.asarray, (x, y))
    opt_state = jax.jit(jax.vmap(member_init))(params, hyperparams)
    carry = (jax.tree_util.tree_map(jnp.array, params), {}, opt_state)

    validate = None
    if validation_data is not None:
        n_val = check_arrays(*validation_data, "validation_data[0]", "validation_data[1]")
        check_data(model, first_member, {}, *validation_data, "validation_data[0]",
                    "validation_data[1]")
        val_data = jax.tree_util.tree_map(jnp.asarray, tuple(validation_data))

        def member_eval(p, hp, xv, yv):
            sums = evaluation_sums(model, loss, parts(hp)[1], metric_fns,
                                   min(max(batch_size, 1000), n_val))
            return sums(p, {}, xv, yv)

        validate = jax.jit(jax.vmap(member_eval, in_axes=(0, 0, None, None)))

    def means(sums, prefix=""):
        sums = jax.device_get(sums)
        return {prefix + name: (np.asarray(sums[name]) / np.asarray(sums["_weight"])).tolist()
                for name in ("loss", *metric_fns)}

    start = time.perf_counter()
    compiled = run_epoch.lower(carry, hyperparams, key, 0, data).compile()
    compile_seconds = time.perf_counter() - start
    history: dict[str, list] = {}
    for epoch in range(epochs):
        start = time.perf_counter()
        # `carry` is donated to the epoch: keep its start for a replay after a NaN/inf
        epoch_start = jax.tree_util.tree_map(jnp.copy, carry) if guard else None
        carry, sums = compiled(carry, hyperparams, key, epoch, data)
        sums = jax.device_get(sums)
        # A NaN/inf loss shows in the epoch's sums, a NaN/inf gradient in the values it
        # updated; only then is the epoch replayed with halting steps to find the step.
        bad = np.array([], dtype=int)
        if guard and not (np.isfinite(sums["loss"]).all() and bool(all_finite(carry))):
            again = jax.tree_util.tree_map(jnp.copy, epoch_start)
            _, (codes, ats) = run_epoch(again, hyperparams, key, epoch, data, halting=True)
            codes, ats = np.asarray(codes), np.asarray(ats)
            bad = np.flatnonzero(codes)
        if bad.size:
            step = int(np.min(ats[bad]))
            first = bad[ats[bad] == step]
            good = epoch_start if step == 0 else run_epoch(epoch_start, hyperparams, key, epoch,
                                                           data, length=step)[0]
            result = FitResult(*good, history, epoch, key, compile_seconds)
            what = NONFINITE_WHAT[int(codes[first[0]])]
            message = (f"fit_many: {what} NaN or inf for member(s) {first.tolist()} at epoch "
                       f"{epoch + 1}/{epochs}, step {step + 1} (counting from 1); training "
                       f"stopped there for all {members} members. Members that fail: "
                       f"{bad.tolist()}. The values from before that step are in "
                       f"{'the returned result' if on_nonfinite == 'warn' else 'error.result'}")
            if on_nonfinite == "raise":
                raise NonFiniteError(message, result, epoch, step, what)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return result
        logs = means(sums)
        seconds = time.perf_counter() - start
        if validate is not None:
            logs.update(means(validate(carry[0], hyperparams, *val_data), "val_"))
        for name, values in logs.items():
            history.setdefault(name, []).append(values)
        history.setdefault("seconds", []).append(seconds)
        if verbose:
            best = min(logs["loss"])
            print(f"Epoch {epoch + 1}/{epochs} - {seconds:.2f}s - {members} models - "
                  f"loss: best {best:.4f}, mean {float(np.mean(logs['loss'])):.4f}",
                  file=sys.stdout, flush=True)
    return FitResult(carry[0], carry[1], carry[2], history, epochs, key, compile_seconds)


__all__ = ["fit_many", "init_many"]
