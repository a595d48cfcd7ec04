"""JavaScript value model and dot-path access, as walkerOS `@walkeros/core` does them.

The mapping language runs on JSON events, but its rules come from JavaScript: a missing
value is `undefined` (not `null`), truthiness follows JS (`{}` and `[]` are true), and paths
are walked the way `byPath.ts` walks them. This module holds those primitives so
`decide.mapping` can stay about the language itself.

Everything here is copy-on-write: no function mutates the objects it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "UNDEFINED",
    "js_truthy",
    "same_value_zero",
    "split_path",
    "compile_getter",
    "compile_checked_getter",
    "get_by_path",
    "set_by_path",
    "delete_by_path",
    "INCLUDE_SECTIONS",
    "flatten_include",
    "to_plain",
]


class _Undefined:
    """JS `undefined`: what a missing value is. Falsy, distinct from `None` (JSON null)."""

    __slots__ = ()
    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "undefined"

    # Beam pickles DoFns holding compiled mappings; the sentinel must stay a singleton.
    def __reduce__(self) -> str:
        return "UNDEFINED"

    def __copy__(self) -> _Undefined:
        return self

    def __deepcopy__(self, memo: dict) -> _Undefined:
        return self


UNDEFINED: Any = _Undefined()


def js_truthy(value: Any) -> bool:
    """JavaScript `Boolean(value)`: unlike Python, empty objects and arrays are true."""
    if value is True:  # what a predicate function gives, on every event
        return True
    if value is UNDEFINED or value is None or value is False:
        return False
    if isinstance(value, (dict, list)):
        return True
    if isinstance(value, float):
        return value != 0 and not math.isnan(value)
    if isinstance(value, (int, str)):
        return bool(value)
    return True


def same_value_zero(a: Any, b: Any) -> bool:
    """JS `Array.prototype.includes` equality: objects by identity, primitives by value and type."""
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)  # NaN includes NaN
    return type(a) is type(b) and a == b


# --- paths ---------------------------------------------------------------------------------

_CANONICAL_INDEX = re.compile(r"0|[1-9][0-9]*")


def split_path(path: str) -> tuple[str, ...]:
    """`"nested.0.data.id"` → its keys. Splits on every dot, as JS `split('.')` does."""
    return tuple(path.split("."))


def _array_index(key: str) -> int | None:
    """The list index a key names in JS property access (`arr["1"]`), or None."""
    return int(key) if _CANONICAL_INDEX.fullmatch(key) else None


def _step(container: Any, key: str, index: int | None) -> Any:
    """One `values[k]` of getByPath: only objects and arrays are entered."""
    if isinstance(container, dict):
        return container.get(key, UNDEFINED)
    if isinstance(container, list):
        if index is not None:
            return container[index] if index < len(container) else UNDEFINED
        if key == "length":  # JS arrays answer `.length`; walkerOS paths can read it
            return len(container)
    return UNDEFINED


def get_by_path(value: Any, path: str | tuple[str, ...], default: Any = UNDEFINED) -> Any:
    """walkerOS `getByPath`: the value at a dot path, `default` when the path is missing.

    `*` on a list maps the rest of the path over every element and returns that list, each
    missing element being `default` (so UNDEFINED holes unless a default is given). `*` on
    anything else is an ordinary key. A `null` found at the end is returned as is.
    """
    keys = split_path(path) if isinstance(path, str) else path
    return compile_getter(keys)(value, default)


def compile_getter(keys: tuple[str, ...]) -> Callable[[Any, Any], Any]:
    """A `getter(value, default)` for a pre-split path. This runs for every path of every
    event, so the usual shapes (no `*`, one to three keys) get unrolled closures whose
    common case, a dict, costs one `.get` per key."""
    steps = tuple((key, _array_index(key)) for key in keys)
    if "*" in keys:

        def get_starred(value: Any, default: Any = UNDEFINED) -> Any:
            return _walk(value, steps, default)

        return get_starred
    if len(steps) == 1:
        return _getter_1(*steps[0])
    if len(steps) == 2:
        return _getter_2(*steps[0], *steps[1])
    if len(steps) == 3:
        return _getter_3(*steps[0], *steps[1], *steps[2])

    def get_plain(value: Any, default: Any = UNDEFINED) -> Any:
        for key, index in steps:
            value = value.get(key, UNDEFINED) if type(value) is dict else _step(value, key, index)
            if value is UNDEFINED:
                return default
        return value

    return get_plain


def _getter_1(k0: str, i0: int | None) -> Callable[[Any, Any], Any]:
    def get_1(value: Any, default: Any = UNDEFINED) -> Any:
        value = value.get(k0, UNDEFINED) if type(value) is dict else _step(value, k0, i0)
        return default if value is UNDEFINED else value

    return get_1


def _getter_2(k0: str, i0: int | None, k1: str, i1: int | None) -> Callable[[Any, Any], Any]:
    def get_2(value: Any, default: Any = UNDEFINED) -> Any:
        value = value.get(k0, UNDEFINED) if type(value) is dict else _step(value, k0, i0)
        if value is UNDEFINED:
            return default
        value = value.get(k1, UNDEFINED) if type(value) is dict else _step(value, k1, i1)
        return default if value is UNDEFINED else value

    return get_2


def _getter_3(k0: str, i0: int | None, k1: str, i1: int | None, k2: str, i2: int | None) -> Callable[[Any, Any], Any]:
    def get_3(value: Any, default: Any = UNDEFINED) -> Any:
        value = value.get(k0, UNDEFINED) if type(value) is dict else _step(value, k0, i0)
        if value is UNDEFINED:
            return default
        value = value.get(k1, UNDEFINED) if type(value) is dict else _step(value, k1, i1)
        if value is UNDEFINED:
            return default
        value = value.get(k2, UNDEFINED) if type(value) is dict else _step(value, k2, i2)
        return default if value is UNDEFINED else value

    return get_3


def compile_checked_getter(
    keys: tuple[str, ...], accept: Callable[[Any], bool], default: Any, fallback: Any
) -> Callable[[Any, Any], Any]:
    """`reader(value, _ctx)`: the value at the path (`default` when missing, which also
    fills the holes of a `*`) if `accept` takes it, else `fallback`. The caller guarantees
    that a missing path may give `fallback` directly (the default checked is the fallback).
    Strings, ints and booleans are always accepted.
    For paths of one or two plain keys, the read and the check are one closure: these are
    most paths in a mapping, read on every event."""
    steps = tuple((key, _array_index(key)) for key in keys)

    def finish(found: Any) -> Any:
        kind = type(found)
        if kind is str or kind is int or kind is bool:
            return found
        return fallback if found is UNDEFINED or not accept(found) else found

    if "*" in keys or len(steps) > 2:
        getter = compile_getter(keys)
        return lambda value, _ctx: finish(getter(value, default))
    if len(steps) == 1:
        ((k0, i0),) = steps

        def read_1(value: Any, _ctx: Any) -> Any:
            value = value.get(k0, UNDEFINED) if type(value) is dict else _step(value, k0, i0)
            kind = type(value)
            if kind is str or kind is int or kind is bool:
                return value
            return fallback if value is UNDEFINED or not accept(value) else value

        return read_1
    (k0, i0), (k1, i1) = steps

    def read_2(value: Any, _ctx: Any) -> Any:
        value = value.get(k0, UNDEFINED) if type(value) is dict else _step(value, k0, i0)
        if value is UNDEFINED:
            return fallback
        value = value.get(k1, UNDEFINED) if type(value) is dict else _step(value, k1, i1)
        kind = type(value)
        if kind is str or kind is int or kind is bool:
            return value
        return fallback if value is UNDEFINED or not accept(value) else value

    return read_2


_EMPTY_REST = (("", None),)


def _walk(value: Any, steps: tuple[tuple[str, int | None], ...], default: Any) -> Any:
    """getByPath with `*`: on a list it maps the rest of the path over the elements; on
    anything else `*` is a literal key."""
    for position, (key, index) in enumerate(steps):
        if key == "*" and isinstance(value, list):
            # JS joins the remaining keys and splits them again: no rest is the key "".
            rest = steps[position + 1 :] or _EMPTY_REST
            return [_walk(item, rest, default) for item in value]
        value = _step(value, key, index)
        if value is UNDEFINED:
            return default
    return value


def _copy_container(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value)


def set_by_path(obj: Any, keys: tuple[str, ...], value: Any) -> Any:
    """walkerOS `setByPath`, copy-on-write: a new object with `value` written at the path.

    Missing or non-object intermediates become `{}`. Writing UNDEFINED into an object
    removes the key (JS stores `undefined`, which no reader can tell from absent and JSON
    drops). Lists along the path are copied too; an index past the end pads with holes.
    Only the containers along the path are copied, never the whole event.
    """
    if not isinstance(obj, dict):
        return obj
    root = dict(obj)
    current: Any = root
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        if isinstance(current, list):
            index = _array_index(key)
            if index is None:
                return root  # a named property on a JS array: invisible in JSON
            if index >= len(current):
                current.extend([UNDEFINED] * (index + 1 - len(current)))
            if last:
                current[index] = value
                return root
            child = current[index]
            child = _copy_container(child) if isinstance(child, (dict, list)) else {}
            current[index] = child
            current = child
            continue
        if last:
            if value is UNDEFINED:
                current.pop(key, None)
            else:
                current[key] = value
            return root
        child = current.get(key)
        child = _copy_container(child) if isinstance(child, (dict, list)) else {}
        current[key] = child
        current = child
    return root


def _js_number_index(key: str) -> int | None:
    """`Number(k)` of deleteByPath when it is a non-negative integer (`""` is 0 in JS)."""
    text = key.strip()
    if not text:
        return 0
    try:
        if text[:2].lower() in ("0x", "0o", "0b"):
            number = float(int(text, 0))
        elif "_" in text or text.lower().lstrip("+-") in ("inf", "infinity", "nan"):
            return None  # Python accepts these, JS Number() does not (or not as integers)
        else:
            number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() and number >= 0 else None


def delete_by_path(obj: Any, keys: tuple[str, ...]) -> Any:
    """walkerOS `deleteByPath`, copy-on-write. A last list index splices (no hole is left);
    a missing path or a non-container on the way is a no-op."""
    if not isinstance(obj, (dict, list)):
        return obj
    root = _copy_container(obj)
    current: Any = root
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        if isinstance(current, list):
            index = _js_number_index(key)
            if index is None or index >= len(current):
                return root
            if last:
                del current[index]
                return root
            child = current[index]
            if not isinstance(child, (dict, list)):
                return root
            current[index] = child = _copy_container(child)
        elif last:
            current.pop(key, None)
            return root
        else:
            child = current.get(key, UNDEFINED)
            if not isinstance(child, (dict, list)):
                return root
            current[key] = child = _copy_container(child)
        current = child
    return root


# --- include ---------------------------------------------------------------------------------

_EVENT_FIELDS = ("entity", "action", "id", "timestamp", "name", "trigger", "timing")


def _event_section(event: dict) -> dict:
    """The `event` pseudo-section: the event's own scalar fields, in walkerOS's order."""
    return {field: event.get(field, UNDEFINED) for field in _EVENT_FIELDS}


# Section name → how to take it from the event. "all" means every one, in this order.
INCLUDE_SECTIONS: dict[str, Callable[[dict], Any]] = {
    "data": lambda event: event.get("data"),
    "globals": lambda event: event.get("globals"),
    "context": lambda event: event.get("context"),
    "user": lambda event: event.get("user"),
    "source": lambda event: event.get("source"),
    "event": _event_section,
}


def _flatten_into(out: dict, prefix: str, value: Any) -> bool:
    """Objects recurse with `_`-joined keys; everything else (lists too) is a leaf.
    Returns whether a key was produced, counting keys whose value is undefined."""
    if isinstance(value, dict):
        produced = False
        for key, item in value.items():
            if item is not UNDEFINED:
                produced = _flatten_into(out, f"{prefix}_{key}", item) or produced
        return produced
    if value is not UNDEFINED:
        out[prefix] = value
    return True


def flatten_include(event: dict, sections: Iterable[str]) -> tuple[dict, bool]:
    """walkerOS `flattenIncludeSections`: the listed sections as `<section>_<key>` leaves.

    Returns the flat object and whether walkerOS's object would have any key: an empty
    context tuple yields a key whose value is `undefined`, which counts for walkerOS's
    "include gave something" test but is dropped from the object here (JSON drops it too).
    """
    names = tuple(sections)
    if "all" in names:
        names = tuple(INCLUDE_SECTIONS)
    out: dict = {}
    produced = False
    for name in names:
        pick = INCLUDE_SECTIONS.get(name)
        bag = pick(event) if pick else None
        if not isinstance(bag, dict):
            continue
        for key, raw in bag.items():
            if raw is UNDEFINED:
                continue
            if name == "context" and isinstance(raw, list):
                raw = raw[0] if raw else UNDEFINED  # OrderedProperties: [value, order]
            produced = _flatten_into(out, f"{name}_{key}", raw) or produced
    return out, produced


# --- output ----------------------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """The JSON view of a mapped value (what `JSON.stringify` sends): holes in lists become
    None, undefined object values disappear. Returns a new structure where anything changed."""
    # Scalars are taken as they are, without a call: most values of mapped data are.
    if isinstance(value, list):
        return [item if type(item) in _SCALARS else None if item is UNDEFINED else to_plain(item) for item in value]
    if isinstance(value, dict):
        return {
            key: item if type(item) in _SCALARS else to_plain(item)
            for key, item in value.items()
            if item is not UNDEFINED
        }
    return value


_SCALARS = frozenset({str, int, float, bool, type(None)})
