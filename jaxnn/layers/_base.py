"""The layer protocol: a named pair of pure functions.

A :class:`Layer` holds two pure functions, in the spirit of stax's
``(init_fun, apply_fun)`` pair:

* ``initialize(key, *inputs) -> (params, state)``: ``inputs`` are
  :class:`jax.ShapeDtypeStruct` (shape and dtype only); ``params`` and
  ``state`` are plain dicts of arrays (``{}`` when the layer has none).
* ``forward(params, state, *inputs, key=None, train=False, **kwargs)
  -> (outputs, new_state)``.

On top of those, every layer (and every model, which is a layer made of
layers) offers the user-facing methods ``init``, ``init_with_state``,
``apply``, ``apply_with_state`` and ``summary``. All of them are pure: the
only things that change are the values they return.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnn._typing import Array, Params, PRNGKey, State
from jaxnn.layers._params_check import check_params

InitializeFn = Callable[..., tuple[Params, State]]
ForwardFn = Callable[..., tuple[Any, State]]


def _as_struct(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, tuple) and all(isinstance(d, int) for d in x):
        raise TypeError(
            "init expects sample input arrays (or jax.ShapeDtypeStruct), got a bare shape "
            f"{x}; pass e.g. jnp.zeros({x}, jnp.float32)"
        )
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def param_dtype(x: jax.ShapeDtypeStruct, dtype: Any = None) -> Any:
    """The dtype a layer's parameters get: ``dtype`` if given, else the input's
    floating dtype, else JAX's default float (float32, or float64 under x64)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.dtype
    return jnp.result_type(float)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer: a name, a pure ``initialize`` and a pure ``forward`` function.

    Attributes:
      name: the name stem (``"dense"``), numbered by containers
        (``"dense_0"``), or an explicit name given by the user.
      initialize: ``(key, *input_structs) -> (params, state)``.
      forward: ``(params, state, *inputs, key=None, train=False, **kw) -> (y, state)``.
      spec: a short description for summaries, e.g. ``"Dense(64)"``.
      explicit_name: whether ``name`` was chosen by the user (used as-is).
      children: sub-layers known ahead of running, for ``Sequential``.
      container: whether this layer only composes other layers (summaries then
        list its children rather than the layer itself).
    """

    name: str
    initialize: InitializeFn = dataclasses.field(repr=False)
    forward: ForwardFn = dataclasses.field(repr=False)
    spec: str = ""
    explicit_name: bool = False
    children: tuple[Layer, ...] = dataclasses.field(default=(), repr=False)
    container: bool = False

    def __repr__(self) -> str:
        return self.spec or f"Layer({self.name!r})"

    # -- user-facing API -------------------------------------------------

    def init_with_state(self, key: PRNGKey, *inputs: Any) -> tuple[Params, State]:
        """Create ``(params, state)`` for inputs shaped like ``inputs``.

        Args:
          key: a PRNG key (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``).
          *inputs: sample input arrays (only their shape and dtype are used; the
            leading axis is the batch) or :class:`jax.ShapeDtypeStruct`.
        """
        structs = tuple(_as_struct(x) for x in inputs)
        # One compiled program for the whole initialisation (rather than one per
        # parameter shape, eagerly); shape errors still surface while tracing.
        return jax.jit(lambda key: self.initialize(key, *structs))(key)

    def init(self, key: PRNGKey, *inputs: Any) -> Params:
        """Create the parameter pytree for inputs shaped like ``inputs``.

        Raises ``ValueError`` if the model has state (e.g. BatchNorm's running
        statistics): use :meth:`init_with_state` for such models.
        """
        params, state = self.init_with_state(key, *inputs)
        if jax.tree_util.tree_leaves(state):
            raise ValueError(
                f"{self.spec or self.name} has state ({_describe_keys(state)}); "
                "use init_with_state(key, x) -> (params, state) and "
                "apply_with_state(params, state, x) instead of init/apply"
            )
        return params

    def apply_with_state(
        self,
        params: Params,
        state: State,
        *inputs: Any,
        key: PRNGKey | None = None,
        train: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, State]:
        """Run the layer: ``(outputs, new_state)``.

        Args:
          params, state: as returned by :meth:`init_with_state`.
          *inputs: input arrays.
          key: PRNG key for layers with randomness (Dropout) in training mode.
          train: training mode (Dropout active, BatchNorm uses and updates batch
            statistics) when True; inference mode when False.

        Raises:
          jaxnn.errors.ParamsMismatchError: ``params`` (or a non-empty ``state``)
            lack an entry the model declares for these inputs, hold one it does
            not declare, or hold an array of another shape. Checked while
            tracing, so a jitted call pays nothing for it.
        """
        check_params(self, params, state, inputs, key=key, train=train, kwargs=kwargs)
        return self.forward(params, state, *inputs, key=key, train=train, **kwargs)

    def apply(
        self,
        params: Params,
        *inputs: Any,
        key: PRNGKey | None = None,
        train: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run a stateless layer or model: ``outputs = f(params, inputs)``.

        A pure function of its arguments: ``jax.jit``, ``jax.grad`` and
        ``jax.vmap`` all apply to it. Raises
        :class:`jaxnn.errors.ParamsMismatchError` when ``params`` do not have the
        keys and shapes the model declares (see :meth:`apply_with_state`).
        """
        check_params(self, params, None, inputs, key=key, train=train, kwargs=kwargs)
        outputs, _ = self.forward(params, {}, *inputs, key=key, train=train, **kwargs)
        return outputs

    def summary(self, *inputs: Any, params: Params | None = None) -> str:
        """A table of each layer's output shape and parameter count, and the total.

        Needs no data: shapes are computed abstractly from ``inputs`` (arrays or
        :class:`jax.ShapeDtypeStruct`). Returns the table as a string.
        """
        from jaxnn.summary import summarize

        return summarize(self, *inputs, params=params)


def _describe_keys(tree: dict[str, Any]) -> str:
    paths = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]
    shown = ", ".join(paths[:3])
    return shown + (", ..." if len(paths) > 3 else "")


def stateless(name: str, fn: Callable[..., Array], spec: str | None = None) -> Layer:
    """Wrap a parameter-free function ``y = fn(x)`` as a layer (e.g. an activation)."""

    def initialize(key, *inputs):
        del key, inputs
        return {}, {}

    def forward(params, state, *inputs, key=None, train=False, **kwargs):
        del params, key, train
        return fn(*inputs, **kwargs), state

    return Layer(name, initialize, forward, spec=spec or name)


def as_layer(obj: Layer | Callable[..., Array]) -> Layer:
    """Return ``obj`` if it is a :class:`Layer`; wrap a plain function as a layer.

    This is what lets activations such as ``jaxnn.relu`` stand in a
    ``Sequential`` next to ``Dense``.
    """
    if isinstance(obj, Layer):
        return obj
    if callable(obj):
        base = getattr(obj, "func", obj)  # functools.partial
        name = getattr(base, "__name__", type(base).__name__).lower()
        if name == "<lambda>":
            name = "lambda"
        bound = getattr(obj, "keywords", None) or {}
        spec = f"{name}({', '.join(f'{k}={v!r}' for k, v in bound.items())})" if bound else name
        return stateless(name, obj, spec=spec)
    raise TypeError(f"expected a jaxnn Layer or a callable, got {type(obj).__name__}: {obj!r}")
