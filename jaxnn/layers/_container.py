"""Composition: ``Sequential`` and functional models written as plain Python.

Both containers give each child a readable, stable name (``dense_0``,
``dense_1``, ``conv2d_0``; or the name the user chose) and store the child's
parameters and state under that name. A child's PRNG key is derived from the
container's key and the child's position, so it is the same on every call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnn._typing import Params, PRNGKey, State
from jaxnn.errors import current_path, layer_scope
from jaxnn.layers._base import Layer, as_layer

# A summary sets this to a list; every child call then appends a record.
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "jaxnn_summary_recorder", default=None
)


@contextlib.contextmanager
def record_calls() -> Iterator[list]:
    """Collect ``(path, layer, params, outputs)`` for every leaf-layer call."""
    records: list = []
    token = _RECORDER.set(records)
    try:
        yield records
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def _not_recording() -> Iterator[None]:
    """Initialisation runs children only for shapes: keep those runs out of summaries."""
    token = _RECORDER.set(None)
    try:
        yield
    finally:
        _RECORDER.reset(token)


def _child_key(key: PRNGKey | None, index: int) -> PRNGKey | None:
    return None if key is None else jax.random.fold_in(key, index)


def call_child(
    name: str,
    layer: Layer,
    params: Params,
    state: State,
    inputs: tuple,
    *,
    key: PRNGKey | None,
    train: bool,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Any, State]:
    """Run ``layer`` as the child ``name`` of the running container."""
    with layer_scope(name):
        outputs, new_state = layer.forward(
            params, state, *inputs, key=key, train=train, **(kwargs or {})
        )
        records = _RECORDER.get()
        if records is not None and not layer.container:
            records.append((current_path(), layer, params, outputs))
    return outputs, new_state


class _Namer:
    """Hands out ``stem_0, stem_1, ...`` and refuses duplicate explicit names."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.counts: dict[str, int] = {}
        self.taken: set[str] = set()

    def __call__(self, layer: Layer) -> str:
        if layer.explicit_name:
            name = layer.name
            if name in self.taken:
                raise ValueError(
                    f"{self.owner}: two layers are named {name!r}; names must be unique"
                )
        else:
            while True:
                index = self.counts.get(layer.name, 0)
                self.counts[layer.name] = index + 1
                name = f"{layer.name}_{index}"
                if name not in self.taken:
                    break
        self.taken.add(name)
        return name


def _put(tree: dict, name: str, value: dict) -> None:
    if value:
        tree[name] = value


def _struct_of(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), x)


def Sequential(layers: Sequence[Layer | Callable], *, name: str | None = None) -> Layer:
    """Chain layers: ``y = f_n(... f_2(f_1(x)))``.

    Args:
      layers: layers or plain functions of one array (activations such as
        ``jaxnn.relu`` are wrapped as parameter-free layers).
      name: the name of this model when nested in another container.

    Parameters are stored per child under its name, e.g.
    ``params["dense_0"]["kernel"]``; children without parameters get no entry.
    Initialisation needs only shapes: each child's output shape is computed
    abstractly with :func:`jax.eval_shape`, so no data is run at init.
    """
    children = tuple(as_layer(layer) for layer in layers)
    if not children:
        raise ValueError("Sequential needs at least one layer, got an empty list")
    namer = _Namer(f"Sequential{f' {name!r}' if name else ''}")
    names = tuple(namer(child) for child in children)

    @_not_recording()
    def initialize(key: PRNGKey, x: jax.ShapeDtypeStruct) -> tuple[Params, State]:
        params: Params = {}
        state: State = {}
        for index, (child_name, child) in enumerate(zip(names, children)):
            with layer_scope(child_name):
                p, s = child.initialize(jax.random.fold_in(key, index), x)
            _put(params, child_name, p)
            _put(state, child_name, s)
            if index + 1 < len(children):
                x, _ = jax.eval_shape(
                    lambda p, s, x, child_name=child_name, child=child: call_child(
                        child_name, child, p, s, (x,), key=None, train=False
                    ),
                    p,
                    s,
                    x,
                )
        return params, state

    def forward(params, state, x, *, key=None, train=False, **kwargs):
        if kwargs:
            raise TypeError(
                f"Sequential got unexpected keyword arguments {sorted(kwargs)}; "
                "use a functional model (jaxnn.model) to pass extra inputs to a layer"
            )
        new_state: State = {}
        for index, (child_name, child) in enumerate(zip(names, children)):
            x, s = call_child(
                child_name,
                child,
                params.get(child_name, {}),
                state.get(child_name, {}),
                (x,),
                key=_child_key(key, index),
                train=train,
            )
            _put(new_state, child_name, s)
        return x, new_state

    spec = "Sequential(" + ", ".join(repr(c) for c in children) + ")"
    return Layer(
        name or "sequential",
        initialize,
        forward,
        spec=spec,
        explicit_name=name is not None,
        children=children,
        container=True,
    )


class Scope:
    """The handle a functional model's function receives as its first argument.

    ``scope(layer, *inputs, **kwargs)`` runs ``layer`` as a named child of the
    model: at init it creates the child's parameters, at apply it uses them.
    Children are named in call order (``dense_0``, ``dense_1``, ...), so the
    function must call its layers in the same order every time (no
    data-dependent Python branching around layer calls).

    Attributes:
      train: whether the model runs in training mode.
    """

    def __init__(self, mode: str, params: Params, state: State, key: PRNGKey | None,
                 train: bool, owner: str) -> None:
        self._mode = mode
        self._params = params
        self._state = state
        self._new_state: State = {}
        self._key = key
        self.train = train
        self._namer = _Namer(owner)
        self._index = 0

    def __call__(self, layer: Layer | Callable, *inputs: Any, **kwargs: Any) -> Any:
        layer = as_layer(layer)
        child_name = self._namer(layer)
        index = self._index
        self._index += 1
        if self._mode == "init":
            with layer_scope(child_name):
                p, s = layer.initialize(
                    jax.random.fold_in(self._key, index), *_struct_of(inputs)
                )
            _put(self._params, child_name, p)
            _put(self._state, child_name, s)
            key = None
        else:
            p = self._params.get(child_name, {})
            s = self._state.get(child_name, {})
            key = _child_key(self._key, index)
        outputs, s = call_child(child_name, layer, p, s, inputs, key=key,
                                train=self.train, kwargs=kwargs)
        _put(self._new_state, child_name, s)
        return outputs


def model(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Turn a plain Python function of sub-layers into a model (a :class:`Layer`).

    The function receives a :class:`Scope` and the model's inputs; it calls
    ``scope(layer, x)`` wherever it uses a layer, and may do anything else JAX
    allows in between: residual sums, several inputs, several outputs.

    Example::

        @jaxnn.model
        def residual_mlp(nn, x):
            h = jaxnn.relu(nn(jaxnn.Dense(64), x))
            return x + nn(jaxnn.Dense(64), h)

        params = residual_mlp.init(key, x)      # {"dense_0": ..., "dense_1": ...}
        y = residual_mlp.apply(params, x)

    Initialisation runs the function once on zeros shaped like the sample inputs.
    """
    if fn is None:
        return lambda f: model(f, name=name)
    model_name = name or getattr(fn, "__name__", "model")
    owner = f"model {model_name!r}"

    @_not_recording()
    def initialize(key, *inputs):
        params: Params = {}
        state: State = {}
        scope = Scope("init", params, state, key, False, owner)
        zeros = tuple(jnp.zeros(x.shape, x.dtype) for x in inputs)
        fn(scope, *zeros)
        return params, state

    def forward(params, state, *inputs, key=None, train=False, **kwargs):
        scope = Scope("apply", params, state, key, train, owner)
        outputs = fn(scope, *inputs, **kwargs)
        return outputs, scope._new_state

    return Layer(
        model_name,
        initialize,
        forward,
        spec=f"model({model_name})",
        explicit_name=name is not None,
        container=True,
    )
