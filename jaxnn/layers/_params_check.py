"""Check that params (and state) have the keys and shapes their model declares.

``apply`` and ``apply_with_state`` call :func:`check_params` before running the
model. The expected tree is the model's own ``initialize`` run abstractly (with
:func:`jax.eval_shape`) on the inputs' shapes and dtypes, cached per
``(layer, input shapes)``: under ``jit`` the check runs once, while tracing, and
adds nothing to the compiled program; an eager call repeats only a walk over
the two trees. Dtypes are not compared (mixed precision casts params).

The check stands aside rather than guess: when the inputs are not plain arrays,
or ``initialize`` cannot run on them (a wrong rank, an input the model does not
take), the model runs unchecked and its layers report what is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxnn.errors import ParamsMismatchError

# Expected trees kept for this many (layer, input shapes) pairs.
_CACHE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One difference between the expected and the actual tree.

    ``kind`` is ``"shape"``, ``"missing"``, ``"extra"`` or ``"type"`` (an array
    where a dict was expected, or the reverse); ``path`` the keys leading to it.
    """

    kind: str
    path: tuple[Any, ...]
    expected: Any = None
    actual: Any = None


def _is_node(x: Any) -> bool:
    """Whether ``x`` holds entries (a dict, list, tuple, None or other pytree node)."""
    if isinstance(x, Mapping | list | tuple) or x is None:
        return True
    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _key_name(k: Any) -> Any:
    """The plain key of a JAX path entry (a dict key, an index, an attribute name)."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _is_empty(x: Any) -> bool:
    return _is_node(x) and not jax.tree_util.tree_leaves(x)


def _shape(x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(jnp.shape(x))


def compare(expected: Any, actual: Any, path: tuple[Any, ...] = ()) -> list[Mismatch]:
    """Every difference in keys and shapes, in the expected tree's order (extras last).

    Entries holding no arrays (``{}``, ``None``) count as absent on both sides.
    """
    if _is_empty(expected) and _is_empty(actual):
        return []
    if _is_empty(actual):
        return [Mismatch("missing", path, expected)]
    if _is_empty(expected):
        return [Mismatch("extra", path, actual=actual)]
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        out: list[Mismatch] = []
        for k, sub in expected.items():
            out += compare(sub, actual.get(k), (*path, k))
        for k, sub in actual.items():
            if k not in expected and not _is_empty(sub):
                out.append(Mismatch("extra", (*path, k), actual=sub))
        return out
    if (isinstance(expected, list | tuple) and isinstance(actual, list | tuple)
            and len(expected) == len(actual)):
        return [m for i, (e, a) in enumerate(zip(expected, actual))
                for m in compare(e, a, (*path, i))]
    if _is_node(expected) or _is_node(actual):
        same_kind = (type(expected) is type(actual)
                     and jax.tree_util.tree_structure(expected)
                     == jax.tree_util.tree_structure(actual))
        if not same_kind:
            return [Mismatch("type", path, expected, actual)]
        # Another pytree type (a dataclass, a NamedTuple) with the same structure.
        pairs = zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                    jax.tree_util.tree_leaves(actual))
        return [m for (p, e), a in pairs
                for m in compare(e, a, (*path, *map(_key_name, p)))]
    if _shape(expected) != _shape(actual):
        return [Mismatch("shape", path, expected, actual)]
    return []


# -- expected trees ----------------------------------------------------------


def _struct(x: Any) -> jax.ShapeDtypeStruct | None:
    """The shape and dtype of an array-like input, or None if it is not one."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) and not isinstance(
            x, bool | int | float | complex):
        return None
    try:
        return jax.ShapeDtypeStruct(tuple(jnp.shape(x)), jnp.result_type(x))
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _key_struct() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda: jax.random.key(0))


def _key_order(tree: Any) -> Any:
    """The dict keys of a tree in their insertion order, nested like the tree."""
    if isinstance(tree, Mapping):
        return {k: _key_order(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_key_order(v) for v in tree]
    return None


def _reorder(tree: Any, order: Any) -> Any:
    """``tree`` (whose dicts JAX returns with sorted keys) with its keys in ``order``."""
    if isinstance(tree, Mapping) and isinstance(order, Mapping):
        return {k: _reorder(tree[k], order[k]) for k in order if k in tree}
    if isinstance(tree, list | tuple) and isinstance(order, list):
        return type(tree)(_reorder(v, o) for v, o in zip(tree, order))
    return tree


@functools.lru_cache(maxsize=_CACHE_SIZE)
def expected_trees(layer: Any, structs: tuple[jax.ShapeDtypeStruct, ...]) -> tuple | None:
    """``(params, state)`` as ShapeDtypeStruct trees, keys in the order ``initialize``
    made them (the order the layers run in), or None when ``initialize`` cannot run
    on ``structs`` (the model then reports the problem itself)."""
    order = []

    def init(key):
        trees = layer.initialize(key, *structs)
        order.append(_key_order(trees))
        return trees

    try:
        trees = jax.eval_shape(init, _key_struct())
    except Exception:  # noqa: BLE001 - any failure means "cannot tell", not an error
        return None
    return _reorder(tuple(trees), order[0]) if order else tuple(trees)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _signature(layer: Any, structs: tuple[jax.ShapeDtypeStruct, ...], which: int) -> Any:
    """The tree structure and leaf shapes of an expected tree, for a quick first test."""
    trees = expected_trees(layer, structs)
    return None if trees is None else _signature_of(trees[which])


def _signature_of(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(_shape(leaf) for leaf in leaves)


# -- when the inputs, not the params, may be wrong ---------------------------


def _input_derived(layer: Any, structs: tuple, which: int, m: Mismatch) -> bool:
    """Whether every differing axis of a shape mismatch follows the input's shape.

    Found by initialising again with every input axis one longer: the axes of the
    expected parameter that change with it (a Dense kernel's ``in_features``, a
    BatchNorm's channels) come from the input; the others (units, kernel size,
    channels made by an earlier layer) are the model's own. With no way to tell,
    assume the input.
    """
    if m.kind != "shape":
        return False
    grown = tuple(jax.ShapeDtypeStruct(tuple(d + 1 for d in s.shape), s.dtype) for s in structs)
    other = expected_trees(layer, grown)
    if other is None:
        return True
    leaf = other[which]
    for k in m.path:
        try:
            leaf = leaf[k]
        except (KeyError, IndexError, TypeError):
            return True
    want, got, alt = _shape(m.expected), _shape(m.actual), _shape(leaf)
    if len(want) != len(got) or len(want) != len(alt):
        return True
    return all(w == a or w != b for w, a, b in zip(want, got, alt))


def _probe(layer: Any, params: Any, state: Any, inputs: tuple, key: Any, train: bool,
           kwargs: dict) -> Exception | None:
    """Run the model abstractly on the given values; the error it raises, if any."""
    leaves, treedef = jax.tree_util.tree_flatten((params, state, inputs, key, kwargs))
    arrays = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]

    def run(*values):
        filled = list(leaves)
        for i, v in zip(arrays, values):
            filled[i] = v
        p, s, xs, k, kw = jax.tree_util.tree_unflatten(treedef, filled)
        return layer.forward(p, s, *xs, key=k, train=train, **kw)

    try:
        jax.eval_shape(run, *(leaves[i] for i in arrays))
    except Exception as error:  # noqa: BLE001 - handed back to the caller
        return error
    return None


# -- messages ----------------------------------------------------------------


def _join(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path)


def _arrays(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, array)`` for every array of a tree, in the tree's own key order."""
    if isinstance(tree, Mapping):
        return [a for k, v in tree.items() for a in _arrays(v, (*path, k))]
    if isinstance(tree, list | tuple):
        return [a for i, v in enumerate(tree) for a in _arrays(v, (*path, i))]
    return [((*path, *map(_key_name, p)), leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _contents(tree: Any) -> str:
    """``"kernel (4, 3), bias (3,)"``: the arrays of a subtree, with their shapes."""
    items = [f"{_join(p) or 'array'} {_shape(leaf)}" for p, leaf in _arrays(tree)]
    shown = ", ".join(items[:4])
    return shown + (f", ... ({len(items)} arrays)" if len(items) > 4 else "")


def _describe(x: Any) -> str:
    if isinstance(x, Mapping):
        return f"a dict with keys {sorted(map(str, x))}"
    if isinstance(x, list | tuple):
        return f"a {type(x).__name__} of length {len(x)}"
    if _is_node(x):
        return f"a {type(x).__name__} holding {_contents(x)}"
    return f"an array of shape {_shape(x)}"


def _shapes(m: Mismatch) -> str:
    return f"expected shape {_shape(m.expected)}, got {_shape(m.actual)}"


def describe(m: Mismatch, model: str, tree: str, expected: Any) -> str:
    """One sentence naming the layer path, the entry and both shapes."""
    noun = "parameter" if tree == "params" else "state entry"
    layer = _join(m.path[:-1]) or model
    name = str(m.path[-1]) if m.path else ""
    if m.kind == "shape":
        return f"layer '{layer}', {noun} '{name}': {_shapes(m)}"
    if m.kind == "type":
        where = f"at '{_join(m.path)}'" if m.path else "at the top"
        return f"{where} expected {_describe(m.expected)}, got {_describe(m.actual)}"
    is_leaf = not _is_node(m.expected if m.kind == "missing" else m.actual)
    if m.kind == "missing":
        if is_leaf:
            return (f"layer '{layer}' is missing {noun} '{name}' "
                    f"(expected shape {_shape(m.expected)})")
        if not m.path:
            return f"the {tree} are empty; expected {_contents(m.expected)}"
        return f"no entry for layer '{_join(m.path)}' (it expects {_contents(m.expected)})"
    # extra
    parent = expected
    for k in m.path[:-1]:
        parent = parent[k]
    known = [str(k) for k, v in parent.items() if not _is_empty(v)] if isinstance(
        parent, Mapping) else []
    expects = f"; expected only {', '.join(known)}" if known else ""
    if is_leaf:
        return (f"layer '{layer}' has an unexpected {noun} '{name}' of shape "
                f"{_shape(m.actual)}{expects}")
    return (f"unexpected entry '{_join(m.path)}' ({_contents(m.actual)}), a layer the model "
            f"does not have{expects}")


def _short(layer: Any) -> str:
    text = layer.spec or layer.name
    return text if len(text) <= 80 else text[:77] + "..."


def check_params(layer: Any, params: Any, state: Any, inputs: tuple, *, key: Any = None,
                 train: bool = False, kwargs: dict | None = None) -> None:
    """Raise :class:`~jaxnn.errors.ParamsMismatchError` unless ``params`` (and
    ``state``, when it is given and not empty) have the keys and shapes that
    ``layer.initialize`` makes for ``inputs``.

    When every mismatch lies on axes that follow the input's shape (a wrong
    input is as likely as wrong params), or ``apply`` runs a model that has state,
    and the model's own checks reject the call with a ``ValueError``, that error
    is raised instead, with the mismatch added as a note.
    """
    structs = tuple(_struct(x) for x in inputs)
    if any(s is None for s in structs):
        return
    signature = _signature(layer, structs, 0)
    if signature is None:
        return
    check_state = state is not None and not _is_empty(state)
    if _signature_of(params) == signature and (
            not check_state or _signature_of(state) == _signature(layer, structs, 1)):
        return  # the common case, decided without walking the trees
    trees = expected_trees(layer, structs)
    tree, found = "params", compare(trees[0], params)
    if not found and check_state:
        tree, found = "state", compare(trees[1], state)
    if not found:
        return
    which = 0 if tree == "params" else 1
    expected = trees[which]
    model = _short(layer)
    first = describe(found[0], layer.name, tree, expected)
    # The other wrong shapes of the same layer (a Dense's bias after its kernel).
    same = [m for m in found[1:] if m.kind == "shape" == found[0].kind
            and m.path[:-1] == found[0].path[:-1]]
    first += "".join(f"; '{m.path[-1]!s}': {_shapes(m)}" for m in same)
    rest = len(found) - 1 - len(same)
    more = f" (and {rest} more mismatch{'es' if rest > 1 else ''})" if rest else ""
    shapes = ", ".join(str(s.shape) for s in structs)
    verb = "do" if tree == "params" else "does"
    message = (f"{model}: {tree} {verb} not match the model for inputs of shape {shapes}: "
               f"{first}{more}")
    actual = params if tree == "params" else state
    if isinstance(expected, Mapping) and isinstance(actual, Mapping) and actual and not any(
            k in actual for k in expected):
        held = ", ".join(str(k) for k in list(actual)[:4]) + (", ..." if len(actual) > 4 else "")
        message += f"; the {tree} hold {held} instead: made for another model?"
    # ``apply`` on a model with state fails for want of it, whatever the params: let
    # the model say so. Likewise when the inputs may be what is wrong.
    stateless_call = state is None and not _is_empty(trees[1])
    if stateless_call or all(_input_derived(layer, structs, which, m) for m in found):
        error = _probe(layer, params, state if state is not None else {}, inputs, key, train,
                       kwargs or {})
        if isinstance(error, ValueError):
            error.add_note(f"Also: {message}; if the inputs are right, the {tree} are not.")
            raise error
        raise ParamsMismatchError(message) from error
    raise ParamsMismatchError(message)
