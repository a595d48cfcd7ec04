"""The walkerOS mapping language (`@walkeros/core` mapping.ts), compiled once into closures.

A destination `config` holds `mapping` (rules by entity and action), `data`, `policy` and
`include`. `DestinationMapping` compiles all of it when the flow loads; per event it only runs
closures, so nothing walks the config's dicts again. The semantics are walkerOS 4.4.0's,
corners included (SPEC section 3); where this port has to decide something walkerOS leaves
to JavaScript, the decision is written next to the code.

Values are evaluated in two layers that mirror walkerOS's two functions:
  * `getMappingValue`: a list is a fallback chain, the first result that is not undefined;
  * `processMappingValue`: one config item; a nested list there is a chain of the first
    *truthy* result (JS `if (acc) return acc`), and a `set` evaluates its items this way.

Missing values are `UNDEFINED` (JS undefined), never `None` (JSON null). Inside lists, holes
stay UNDEFINED while evaluating, because walkerOS's property check accepts `undefined` but not
`null`; everything handed out publicly is converted to its JSON view (holes become None).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from decide.functions import (
    JS_PREFIX,
    PY_PREFIX,
    FunctionNotAllowed,
    Functions,
    FunctionSyntaxError,
    UserFunction,
    describe_failure,
    failed_call,
)
from decide.paths import (
    INCLUDE_SECTIONS,
    UNDEFINED,
    compile_checked_getter,
    compile_getter,
    delete_by_path,
    flatten_include,
    js_truthy,
    same_value_zero,
    set_by_path,
    split_path,
    to_plain,
)

__all__ = [
    "UNDEFINED",
    "MappingConfigError",
    "compile_value",
    "CompiledValue",
    "DestinationMapping",
    "CompiledRule",
    "MappingResult",
    "is_property",
]

logger = logging.getLogger(__name__)

CODE_PREFIX = JS_PREFIX
VALUE_CONFIG_KEYS = frozenset({"key", "value", "fn", "condition", "consent", "validate", "loop", "map", "set"})
RULE_KEYS = frozenset(
    {
        "name",
        "data",
        "settings",
        "ignore",
        "silent",
        "condition",
        "consent",
        "policy",
        "include",
        "remove",
        "batch",
        "extend",
    }
)


class MappingConfigError(ValueError):
    """A mapping that cannot be compiled; `path` is the JSON path of the fault."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


# --- the Property check (property.ts) -----------------------------------------------------------


def _is_property_type(value: Any) -> bool:
    """walkerOS `isPropertyType`: JSON-like values without null; `undefined` passes (so holes
    in lists are fine), NaN and non-JSON objects do not.

    Loop scopes and `data: "data"` put whole event sections through this on every event, so
    it walks containers level by level instead of a Python call per element. Nesting deeper
    than orjson can serialize fails, which also ends cycles a user function might return."""
    kind = type(value)
    if kind is str or kind is bool or kind is int:
        return True
    if kind is float:
        return value == value
    if kind is not dict and kind is not list:
        return value is UNDEFINED or _is_property_subclass(value)
    level = [value]
    for _depth in range(_MAX_DEPTH):
        deeper = []
        for container in level:
            if type(container) is dict:
                for key in container:
                    if type(key) is not str:
                        return False
                items: Any = container.values()
            else:
                items = container
            for item in items:
                kind = type(item)
                if kind is str or kind is int or kind is bool:
                    continue
                if kind is dict or kind is list:
                    deeper.append(item)
                elif kind is float:
                    if item != item:
                        return False
                elif item is not UNDEFINED and not _is_property_subclass(item):
                    return False
        if not deeper:
            return True
        level = deeper
    return False


_MAX_DEPTH = 255  # orjson's nesting limit


def _is_property_subclass(value: Any) -> bool:
    """The slow path for subclasses of the JSON types (e.g. an IntEnum a user function returns)."""
    if isinstance(value, (bool, str, int)):
        return True
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_property_type(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_property_type(item) for item in value)
    return False


def is_property(value: Any) -> bool:
    """A defined walkerOS Property: bool, str, number (not NaN), or a dict/list of properties.

    None (null) is not one, anywhere inside. Holes (UNDEFINED) inside lists and objects are
    accepted as walkerOS accepts them; UNDEFINED itself is not a property.
    """
    return value is not UNDEFINED and _is_property_type(value)


# --- runtime errors of user functions -------------------------------------------------------------


class _ErrorLog:
    """Counts user-function failures by place; logs the first one of each place only."""

    def __init__(self, on_error: Callable[[str, BaseException], None] | None = None):
        self.counts: dict[str, int] = {}
        self._on_error = on_error

    def report(self, place: str, exc: BaseException) -> None:
        count = self.counts.get(place, 0) + 1
        self.counts[place] = count
        if self._on_error is not None:
            self._on_error(place, exc)
        elif count == 1:
            logger.warning(
                "mapping function at %s failed: %s (the value is undefined; "
                "later errors at this place are only counted)",
                place,
                describe_failure(exc),
            )


# --- $code functions ----------------------------------------------------------------------------


def _compile_function(
    spec: Any,
    path: str,
    functions: Functions,
    mapping: Any,
    predicate: bool,
    awaited: bool = True,
    on_error: Callable[[BaseException], None] | None = None,
) -> UserFunction | None:
    """`fn`/`condition`/`validate` → a callable ``f(value, ctx)`` (see Functions.compile), or
    None when absent (JS-falsy, like "").

    `mapping` is what the function sees as `context.mapping`. A string without a function
    prefix stays a string in walkerOS and fails when called; it is kept as a function that
    fails, so that value is undefined at run time. Nothing of the function runs here.
    """
    if spec is None or spec == "":
        return None
    if callable(spec):
        return functions.python_callable(spec, mapping, predicate, on_error)
    if not isinstance(spec, str):
        raise MappingConfigError(path, f'expected a function (a "$code:" string), got {type(spec).__name__}')
    if not spec.startswith((CODE_PREFIX, PY_PREFIX)):
        message = f'{spec!r} is not a function: function strings start with "{CODE_PREFIX}"'

        def not_a_function(_value: Any, _ctx: Any) -> Any:
            return failed_call(TypeError(message), on_error, predicate)

        return not_a_function
    try:
        return functions.compile(spec, path, mapping, predicate, awaited, on_error)
    except FunctionSyntaxError as exc:
        language = "JavaScript" if spec.startswith(CODE_PREFIX) else "Python"
        prefix = CODE_PREFIX if spec.startswith(CODE_PREFIX) else PY_PREFIX
        raise MappingConfigError(path, f"{prefix[:-1]} is not valid {language}: {exc}") from None
    except FunctionNotAllowed as exc:
        raise MappingConfigError(path, str(exc)) from None


_FUNCTION_KEYS = ("fn", "condition", "validate")


def function_syntax_errors(config: Any, path: str, functions: Functions) -> list[str]:
    """Every `$code:`/`$py:` function in a destination config that does not compile, as
    "path: message" lines, so `validate` reports all of them at once. Only parses."""
    errors: list[str] = []
    _collect_function_errors(config, path, functions, errors)
    return errors


def _collect_function_errors(node: Any, path: str, functions: Functions, errors: list[str]) -> None:
    if isinstance(node, list):
        for index, item in enumerate(node):
            _collect_function_errors(item, _child_path(path, index), functions, errors)
        return
    if not isinstance(node, dict):
        return
    for key, item in node.items():
        where = _child_path(path, key)
        if key == "value":
            continue  # a static value is data, whatever it holds
        if key in _FUNCTION_KEYS and isinstance(item, str) and item.startswith((CODE_PREFIX, PY_PREFIX)):
            try:
                _compile_function(item, where, Functions(functions.policy), {}, predicate=False)
            except MappingConfigError as exc:
                errors.append(str(exc))
        else:
            _collect_function_errors(item, where, functions, errors)


# --- evaluation context -------------------------------------------------------------------------


class _Ctx:
    """What walkerOS's Mapping.Context carries down a value: the event, the collector and the
    consent resolved at the nearest getMappingValue. Only functions and `consent` read it, so
    values without them are run with no context at all (None)."""

    __slots__ = ("event", "collector", "consent")

    def __init__(self, event: Any, collector: dict, consent: Any):
        self.event = event
        self.collector = collector
        self.consent = consent


def _resolve_consent(value: Any, given: Any, collector: Any) -> Any:
    """The consent in force: the input's own `consent` (when the input is an object), else the
    context's, else the collector's. The first truthy one wins whole; JS `{}` is truthy."""
    if isinstance(value, dict):
        own = value.get("consent")
        if own is not None and (type(own) is dict or js_truthy(own)):  # an object is truthy
            return own
    if given is not None and js_truthy(given):
        return given
    if isinstance(collector, dict):
        base = collector.get("consent")
        if base is not None and js_truthy(base):
            return base
    return UNDEFINED


def _context_for(value: Any, context: dict | None) -> _Ctx:
    """getMappingValue's context: event = context.event, else the input; consent as above."""
    context = context or {}
    collector = context.get("collector") or {}
    event = context.get("event")
    if event is None:
        event = value if isinstance(value, dict) else {}
    return _Ctx(event, collector, _resolve_consent(value, context.get("consent"), collector))


def _event_context(event: dict, collector: dict) -> _Ctx:
    """The context processEventMapping gives the values it resolves on the event."""
    return _Ctx(event, collector, _resolve_consent(event, None, collector))


def _granted(required_keys: tuple[str, ...], state: Any) -> bool:
    """walkerOS `getGrantedConsent` for a non-empty requirement: any required key granted."""
    if not isinstance(state, dict):
        return False
    return any(js_truthy(state.get(key)) for key in required_keys)


# --- compiled value nodes ---------------------------------------------------------------------

Run = Callable[[Any, "_Ctx | None"], Any]


@dataclass(frozen=True, slots=True)
class _Node:
    run: Run
    checked: bool  # the result is UNDEFINED or a valid property (no raw static passes through)
    holes: bool  # the result may hold UNDEFINED inside lists (needs `to_plain` for output)
    contextual: bool  # it reads the context (functions, consent): build one before running it
    # When `run` is just a read of a path without `*`: (keys, fallback), where the fallback
    # (UNDEFINED or a valid property) stands in for a missing value or one that is no property.
    # Containers use it to do the read inline rather than through a call.
    read: tuple[tuple[str, ...], Any] | None = None


def _undefined_run(_value: Any, _ctx: _Ctx | None) -> Any:
    return UNDEFINED


def _passthrough_run(value: Any, _ctx: _Ctx | None) -> Any:
    return value if _is_property_type(value) else UNDEFINED


_UNDEFINED_NODE = _Node(_undefined_run, True, False, False)
_EMPTY_MAP_NODE = _Node(lambda _value, _ctx: {}, True, False, False)
# A config item with no effective key returns its input, if that is a property.
_PASSTHROUGH_NODE = _Node(_passthrough_run, True, False, False)


def _child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z0-9_*$-]+", key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _copy_json(value: Any) -> Any:
    """A fresh copy of a JSON container, so a constant handed out can never be altered."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def _has_holes(value: Any) -> bool:
    if isinstance(value, list):
        return any(item is UNDEFINED or _has_holes(item) for item in value)
    if isinstance(value, dict):
        return any(item is UNDEFINED or _has_holes(item) for item in value.values())
    return False


class _Compiler:
    """Turns mapping specs into `_Node` closures; user-function errors go to `log`."""

    def __init__(self, log: _ErrorLog, functions: Functions):
        self.log = log
        self.functions = functions

    # getMappingValue: a list is a chain of alternatives, the first *defined* result wins.
    def value(self, spec: Any, path: str) -> _Node:
        if not isinstance(spec, list):
            return self.process(spec, path)
        alternatives = [self.process(item, _child_path(path, i)) for i, item in enumerate(spec)]
        if len(alternatives) == 1:
            return alternatives[0]
        runs = tuple(node.run for node in alternatives)

        def first_defined(value: Any, ctx: _Ctx | None) -> Any:
            for run in runs:
                result = run(value, ctx)
                if result is not UNDEFINED:
                    return result
            return UNDEFINED

        return _combined(first_defined, alternatives)

    # processMappingValue: a list here is a chain where the first *truthy* result wins (else
    # the last result), and each of its items is taken as one config item, even a list.
    def process(self, spec: Any, path: str) -> _Node:
        if not isinstance(spec, list):
            return self.item(spec, path)
        items = [self.item(item, _child_path(path, i)) for i, item in enumerate(spec)]
        if not items:
            return _UNDEFINED_NODE
        runs = tuple(node.run for node in items)

        def first_truthy(value: Any, ctx: _Ctx | None) -> Any:
            result = UNDEFINED
            for run in runs:
                result = run(value, ctx)
                if js_truthy(result):
                    return result
            return result

        return _combined(first_truthy, items)

    def item(self, spec: Any, path: str) -> _Node:
        """One config item: a path string, a config object, or (bare) a number or boolean."""
        if isinstance(spec, str):
            # "" is {key: ""}: a falsy key is skipped, so the input itself comes back.
            return self.path_item(spec) if spec else _PASSTHROUGH_NODE
        if isinstance(spec, dict):
            return self.config(spec, path)
        if isinstance(spec, (bool, int, float)):
            # Object.keys(5) is empty: constants must be written {"value": 5}.
            return _UNDEFINED_NODE
        if isinstance(spec, list):  # only reached inside a list
            # A list inside a list is destructured as a config object: of the known keys it
            # has only `map`, which is Array.prototype.map, a function without entries; so a
            # non-empty one maps to {} (found against walkerOS), and an empty one is like {}.
            return _EMPTY_MAP_NODE if spec else _UNDEFINED_NODE
        if spec is None:
            raise MappingConfigError(path, "null is not a mapping value")
        if callable(spec):
            # Convenience for Python callers: a bare function means {"fn": function}.
            return self.config({"fn": spec}, path)
        raise MappingConfigError(
            path, f"expected a path string, a value config object or a list, got {type(spec).__name__}"
        )

    @staticmethod
    def path_item(source: str) -> _Node:
        """A string is `{key: source}`: a path read and the Property check."""
        keys = split_path(source)
        starred = "*" in keys
        return _Node(
            compile_checked_getter(keys, _is_property_type, UNDEFINED, UNDEFINED),
            True,
            starred,
            False,
            None if starred else (keys, UNDEFINED),
        )

    def function(self, spec: dict, name: str, path: str, predicate: bool, awaited: bool = True) -> Callable | None:
        """A guarded user function ``f(value, ctx)``: a failed call is reported and gives
        undefined (False for a predicate, whose results are bools)."""
        place = _child_path(path, name)
        log = self.log
        return _compile_function(
            spec.get(name),
            place,
            self.functions,
            spec,
            predicate,
            awaited,
            lambda exc: log.report(place, exc),
        )

    def config(self, spec: dict, path: str) -> _Node:
        unknown = sorted(set(spec) - VALUE_CONFIG_KEYS)
        if unknown:
            raise MappingConfigError(
                path,
                f"unknown key(s) {', '.join(map(repr, unknown))} in a value config; "
                f"allowed: {', '.join(sorted(VALUE_CONFIG_KEYS))}",
            )
        if not spec:
            return _UNDEFINED_NODE  # {} → undefined
        return _ConfigCompiler(self, spec, path).build()


def _combined(run: Run, children: list[_Node]) -> _Node:
    return _Node(
        run, all(n.checked for n in children), any(n.holes for n in children), any(n.contextual for n in children)
    )


class _Container:
    """A compiled loop, map or set: `run` gives the new result, or _NOT_PRODUCED (a loop
    whose scope is not a list leaves the result as it was)."""

    __slots__ = ("run", "checked", "holes", "contextual", "always_produces")

    def __init__(self, run: Run, children: list[_Node], holes: bool, always_produces: bool):
        self.run = run
        self.checked = all(n.checked for n in children)
        self.holes = holes
        self.contextual = any(n.contextual for n in children)
        self.always_produces = always_produces


_NOT_PRODUCED = object()


class _ConfigCompiler:
    """Compiles one value config object into a closure following processMappingValue's order:
    condition → consent → start value → fn → key → loop | map | set → validate → Property check.
    The common shapes ({map}, {value}, {key, value}) get closures without the unused steps."""

    def __init__(self, compiler: _Compiler, spec: dict, path: str):
        self.compiler = compiler
        self.spec = spec
        self.path = path

    def build(self) -> _Node:
        spec, compiler, path = self.spec, self.compiler, self.path
        self.has_static = "value" in spec
        self.static = spec["value"] if self.has_static else UNDEFINED
        self.static_valid = self.has_static and is_property(self.static)
        self.condition = compiler.function(spec, "condition", path, predicate=True)
        self.fn = compiler.function(spec, "fn", path, predicate=False)
        # A JavaScript function's result is a property or undefined already (the sandbox checks).
        fn_spec = spec.get("fn")
        self.fn_checked = isinstance(fn_spec, str) and fn_spec.startswith(CODE_PREFIX)
        self.validate = compiler.function(spec, "validate", path, predicate=True)
        self.consent_keys = self._consent()
        self.keys = self._key()
        self.getter = compile_getter(self.keys) if self.keys else None
        key_holes = self.keys is not None and "*" in self.keys
        self.container = self._container()

        container = self.container
        holes = (
            key_holes
            or (container is not None and container.holes)
            # A user function may hand back holes too (UNDEFINED in a list is a property).
            or self.fn is not None
            or (self.has_static and _has_holes(self.static))
        )
        contextual = (
            self.condition is not None
            or self.fn is not None
            or self.validate is not None
            or self.consent_keys is not None
            or (container is not None and container.contextual)
        )
        returns_raw_static = self.consent_keys is not None and self.has_static and not self.static_valid
        return _Node(
            self._lean_run() or self._full_run(), not returns_raw_static, holes, contextual, self._plain_read()
        )

    def _plain_read(self) -> tuple[tuple[str, ...], Any] | None:
        """(keys, fallback) when `_lean_run` made this config a checked read of its key."""
        if (
            self.condition
            or self.fn
            or self.validate
            or self.consent_keys is not None
            or self.container is not None
            or self.getter is None
            or isinstance(self.static, (dict, list))
            or self.keys is None
            or "*" in self.keys
        ):
            return None
        return self.keys, self.static if self.static_valid else UNDEFINED

    def _static_result(self) -> Callable[[], Any]:
        """The static value as handed out: containers copied, so callers may change results."""
        static = self.static
        if isinstance(static, (dict, list)):
            return lambda: _copy_json(static)
        return lambda: static

    def _lean_run(self) -> Run | None:
        """A closure for configs made of `value`, `key` or one container only, or None."""
        if (
            self.fn is not None
            and self.fn_checked
            and not (self.condition or self.validate or self.has_static or self.keys or self.container)
            and self.consent_keys is None
        ):
            return self.fn  # {"fn": JavaScript}: its result, a property or undefined, is the value
        if self.condition or self.fn or self.validate or self.consent_keys is not None:
            return None
        static_result = self._static_result()
        fallback = self.static if self.static_valid else UNDEFINED
        container = self.container
        if container is None and self.getter is None:
            if not self.has_static:
                # Only keys that do nothing ({"key": ""}, {"consent": {}}): walkerOS starts from
                # the input and nothing changes it, so the input comes back if it is a property.
                return _passthrough_run
            constant = fallback  # {"value": v}
            return (lambda _value, _ctx: static_result()) if constant is not UNDEFINED else _undefined_run
        if container is None and not isinstance(self.static, (dict, list)):
            # {"key"[, "value"]}: a missing path gives the default, which is the static value:
            # valid, it is the result; invalid, the check fails; so missing → fallback.
            return compile_checked_getter(self.keys or (), _is_property_type, self.static, fallback)
        if (
            container is not None
            and self.getter is None
            and not self.has_static
            and container.always_produces
            and container.checked
        ):
            return container.run  # {"map": ...} or {"set": ...}
        return None

    def _full_run(self) -> Run:
        condition, fn, validate, fn_checked = self.condition, self.fn, self.validate, self.fn_checked
        consent_keys, getter = self.consent_keys, self.getter
        has_static, static, static_valid = self.has_static, self.static, self.static_valid
        static_result = self._static_result()
        container = self.container.run if self.container is not None else None
        container_checked = self.container is not None and self.container.checked

        def run(value: Any, ctx: _Ctx | None) -> Any:
            if condition is not None and not condition(value, ctx):
                return UNDEFINED
            # (a config with consent is contextual: ctx is given)
            if consent_keys is not None and not _granted(consent_keys, ctx.consent):  # type: ignore[union-attr]
                # as configured, not property-checked: walkerOS returns it raw
                return static_result() if has_static else UNDEFINED
            result = static if has_static else value
            checked = static_valid
            if fn is not None:
                result = fn(value, ctx)
                checked = fn_checked
            if getter is not None:
                result = getter(value, static)  # the key reads the original input; wins over fn
                checked = False
            if container is not None:
                produced = container(value, ctx)
                if produced is not _NOT_PRODUCED:
                    result, checked = produced, container_checked
            if validate is not None and not validate(result, ctx):
                result = UNDEFINED
            if not checked and not _is_property_type(result):
                result = UNDEFINED
            if result is UNDEFINED:
                return static_result() if static_valid else UNDEFINED
            return static_result() if result is static else result

        return run

    def _consent(self) -> tuple[str, ...] | None:
        """Required keys of a value-level consent; None when there is no requirement."""
        consent = self.spec.get("consent")
        if consent is None:
            return None
        if not isinstance(consent, dict):
            raise MappingConfigError(
                _child_path(self.path, "consent"), f"expected an object of consent states, got {type(consent).__name__}"
            )
        if not consent:
            return None  # {} requires nothing: always granted
        return tuple(name for name, required in consent.items() if js_truthy(required))

    def _key(self) -> tuple[str, ...] | None:
        key = self.spec.get("key")
        if key is None or key == "":
            return None  # JS-falsy: no key
        if not isinstance(key, str):
            raise MappingConfigError(_child_path(self.path, "key"), f"expected a path string, got {type(key).__name__}")
        return split_path(key)

    def _container(self) -> _Container | None:
        """loop, else map, else set (the first one present wins, as in walkerOS)."""
        spec = self.spec
        if spec.get("loop") is not None:
            return self._loop(spec["loop"], _child_path(self.path, "loop"))
        if spec.get("map") is not None:
            return self._map(spec["map"], _child_path(self.path, "map"))
        if spec.get("set") is not None:
            return self._set(spec["set"], _child_path(self.path, "set"))
        return None

    def _loop(self, loop: Any, path: str) -> _Container:
        if not isinstance(loop, list) or len(loop) != 2:
            raise MappingConfigError(path, "expected [scope, item mapping]")
        scope_spec, item_spec = loop
        item = self.compiler.value(item_spec, _child_path(path, 1))
        item_run = _entering(item)
        scope = None if scope_spec == "this" else self.compiler.value(scope_spec, _child_path(path, 0))
        scope_run = scope.run if scope is not None else None

        def run_loop(value: Any, ctx: _Ctx | None) -> Any:
            items = [value] if scope_run is None else scope_run(value, ctx)
            if not isinstance(items, list):
                return _NOT_PRODUCED  # the result stays what it was before the loop
            mapped = []
            for element in items:
                result = item_run(element, ctx)
                if result is not UNDEFINED:
                    mapped.append(result)
            return mapped

        children = [item] if scope is None else [item, scope]
        # Elements of a scope list with holes may carry holes into the item mapping.
        return _Container(run_loop, children, any(n.holes for n in children), False)

    def _map(self, mapping: Any, path: str) -> _Container:
        if not isinstance(mapping, dict):
            raise MappingConfigError(path, f"expected an object of mapping values, got {type(mapping).__name__}")
        entries = [(key, self.compiler.value(spec, _child_path(path, key))) for key, spec in mapping.items()]
        runs = tuple((key, node.run) for key, node in entries)

        def run_map(value: Any, ctx: _Ctx | None) -> Any:
            mapped = {}
            for key, run in runs:
                result = run(value, ctx)
                if result is not UNDEFINED:
                    mapped[key] = result
            return mapped

        children = [node for _, node in entries]
        return _Container(_specialised_map(entries, run_map), children, any(n.holes for n in children), True)

    def _set(self, items_spec: Any, path: str) -> _Container:
        if not isinstance(items_spec, list):
            raise MappingConfigError(path, f"expected a list of mapping values, got {type(items_spec).__name__}")
        items = [self.compiler.process(spec, _child_path(path, i)) for i, spec in enumerate(items_spec)]
        runs = tuple(node.run for node in items)

        def run_set(value: Any, ctx: _Ctx | None) -> Any:
            return [run(value, ctx) for run in runs]  # undefined results stay, as holes

        return _Container(run_set, items, True, True)


def _specialised_map(entries: list[tuple[str, _Node]], general: Run) -> Run:
    """`general` (a map's run) with the path reads of its values done inline. Maps are most of a
    mapping's work per event and their values mostly plain reads ("data.id"): a call per value
    costs more than the read itself.

    Gives what `general` gives: anything but an object input goes to `general`; a value that is
    not a read of one or two keys, or whose section is not an object, runs its own run (whose
    result is already checked: the check below leaves it as it is). Each read starts afresh, as
    other values may run user code that replaces a section. (This module is compiled, so a loop
    over the values' steps costs less than the straight-line Python this once generated.)"""
    steps = tuple((key, *_inline_read(node), node.run) for key, node in entries)

    def run_map(value: Any, ctx: _Ctx | None) -> Any:
        if type(value) is not dict:
            return general(value, ctx)
        return _map_object(steps, value, ctx)

    return run_map


def _map_object(steps: tuple, value: dict, ctx: Any) -> dict:
    """A specialised map's run on an object input (see `_specialised_map`). A function of its
    own, not part of the closure: compiled, its arguments are typed, so the reads are C calls."""
    mapped = {}
    for key, first, second, fallback, run in steps:
        if first is None:
            found = run(value, ctx)
            if found is not UNDEFINED:
                mapped[key] = found
            continue
        found = value.get(first, UNDEFINED)
        if second is not None:
            found = _get_or_undefined(found, second) if type(found) is dict else run(value, ctx)
        # the property check of the read, its common cases first
        kind = type(found)
        if (
            kind is str
            or kind is int
            or kind is bool
            or (kind is float and found == found)
            or (found is not UNDEFINED and _is_property_type(found))
        ):
            mapped[key] = found
        elif fallback is not UNDEFINED:
            mapped[key] = fallback
    return mapped


def _get_or_undefined(section: dict, key: str) -> Any:
    return section.get(key, UNDEFINED)


def _inline_read(node: _Node) -> tuple[str | None, str | None, Any]:
    """(first key, second key or None, fallback) of a node that reads a path of one or two
    keys, for containers to read inline; (None, None, None) for any other node."""
    if node.read is None or len(node.read[0]) > 2:
        return None, None, None
    keys, fallback = node.read
    return keys[0], keys[1] if len(keys) == 2 else None, fallback


def _entering(node: _Node) -> Run:
    """A nested getMappingValue on a new input (a loop element): an undefined input gives
    undefined, and the element's own `consent` object replaces the consent in force."""
    run = node.run
    if not node.contextual:
        return lambda value, ctx: UNDEFINED if value is UNDEFINED else run(value, ctx)

    def enter(value: Any, ctx: Any) -> Any:  # a contextual node: ctx is a _Ctx
        if value is UNDEFINED:
            return UNDEFINED
        consent = _resolve_consent(value, ctx.consent, None)
        if consent is not ctx.consent:
            ctx = _Ctx(ctx.event, ctx.collector, consent)
        return run(value, ctx)

    return enter


# --- public: one value -------------------------------------------------------------------------


class CompiledValue:
    """A mapping value compiled once. Call it as `compiled(input, context)`.

    The result is the value's JSON view (holes in lists as None) or UNDEFINED. `raw()` gives
    the walkerOS-internal value, holes kept as UNDEFINED.
    """

    __slots__ = ("spec", "path", "_node", "_log", "_functions")

    def __init__(self, spec: Any, path: str, node: _Node, log: _ErrorLog, functions: Functions):
        self.spec = spec
        self.path = path
        self._node = node
        self._log = log
        self._functions = functions

    def raw(self, value: Any, context: dict | None = None) -> Any:
        if value is UNDEFINED:
            return UNDEFINED
        ctx = _context_for(value, context) if self._node.contextual else None
        return self._node.run(value, ctx)

    def __call__(self, value: Any, context: dict | None = None) -> Any:
        if value is UNDEFINED:
            return UNDEFINED
        node = self._node
        result = node.run(value, _context_for(value, context) if node.contextual else None)
        return to_plain(result) if node.holes else result

    def evaluator(self) -> Callable[[Any, Any], Any]:
        """A function `f(value, context)` doing what calling this value does, for a value
        that is never UNDEFINED (an event, say), with the steps that cannot apply to this
        value left out: for callers that run it on every event."""
        node = self._node
        if node.contextual or node.holes:
            return self
        # A node that reads no context never looks at its second argument.
        return node.run

    @property
    def error_counts(self) -> dict[str, int]:
        return dict(self._log.counts)

    def __reduce__(self) -> tuple:
        # Closures do not pickle portably; Beam workers recompile from the spec instead.
        return (compile_value, (self.spec, self.path, self._log._on_error, self._functions))

    def __repr__(self) -> str:
        return f"CompiledValue({self.spec!r}, path={self.path!r})"


def compile_value(
    spec: Any,
    path: str,
    on_error: Callable[[str, BaseException], None] | None = None,
    functions: Functions | None = None,
) -> CompiledValue:
    """Compile a mapping value (path string, value config, list; numbers/booleans give a
    value that is always undefined). Raises MappingConfigError naming the JSON path.
    `functions` compiles its `$code:`/`$py:` functions (share one per destination)."""
    log = _ErrorLog(on_error)
    functions = functions if functions is not None else Functions()
    return CompiledValue(spec, path, _Compiler(log, functions).value(spec, path), log, functions)


def _compile_shared(compiler: _Compiler, spec: Any, path: str) -> CompiledValue:
    return CompiledValue(spec, path, compiler.value(spec, path), compiler.log, compiler.functions)


# --- rules --------------------------------------------------------------------------------------


class CompiledRule:
    """One mapping rule, compiled. `raw` is the rule as configured (walkerOS's context.mapping)."""

    __slots__ = (
        "key",
        "name",
        "ignore",
        "silent",
        "consent",
        "settings",
        "raw",
        "_condition",
        "_policy",
        "_data",
        "_include",
        "_remove",
    )

    def __init__(self, raw: dict, key: str, path: str, compiler: _Compiler):
        unknown = sorted(set(raw) - RULE_KEYS)
        if unknown:
            raise MappingConfigError(
                path,
                f"unknown key(s) {', '.join(map(repr, unknown))} in a rule; allowed: {', '.join(sorted(RULE_KEYS))}",
            )
        self.raw = raw
        self.key = key
        self.name = _optional(raw, "name", str, path)
        self.ignore = js_truthy(raw.get("ignore"))
        self.silent = js_truthy(raw.get("silent"))
        self.consent = _optional(raw, "consent", dict, path)
        self.settings = _compile_settings(compiler, raw.get("settings"), _child_path(path, "settings"))
        # walkerOS does not await a rule condition: a promise (any async function) matches.
        self._condition = compiler.function(raw, "condition", path, predicate=True, awaited=False)
        self._policy = _compile_policy(compiler, raw.get("policy"), _child_path(path, "policy"))
        data = raw.get("data")
        # walkerOS: `if (eventMapping.data)`, so a falsy rule data ("" or 0) is no data at all.
        self._data = compiler.value(data, _child_path(path, "data")) if js_truthy(data) else None
        self._include = _compile_include(raw.get("include"), _child_path(path, "include"))
        self._remove = _compile_remove(raw.get("remove"), _child_path(path, "remove"))

    def __repr__(self) -> str:
        return f"CompiledRule({self.key!r}, name={self.name!r})"


def _optional(raw: dict, field: str, kind: type, path: str) -> Any:
    value = raw.get(field)
    if value is not None and not isinstance(value, kind):
        raise MappingConfigError(_child_path(path, field), f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _compile_settings(compiler: _Compiler, settings: Any, path: str) -> dict:
    """Per-rule destination settings: mapping values, except literal booleans and nulls which
    destinations test as flags (Segment's `page: true`)."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise MappingConfigError(path, f"expected an object, got {type(settings).__name__}")
    return {
        key: spec if spec is None or isinstance(spec, bool) else _compile_shared(compiler, spec, _child_path(path, key))
        for key, spec in settings.items()
    }


_PolicyEntry = tuple[tuple[str, ...], _Node]


def _compile_policy(compiler: _Compiler, policy: Any, path: str) -> tuple[_PolicyEntry, ...]:
    if policy is None:
        return ()
    if not isinstance(policy, dict):
        raise MappingConfigError(path, f'expected an object of "dot.path": value, got {type(policy).__name__}')
    return tuple(
        (split_path(target), compiler.value(spec, _child_path(path, target))) for target, spec in policy.items()
    )


def _compile_include(include: Any, path: str) -> tuple[str, ...] | None:
    if include is None:
        return None
    if not isinstance(include, list) or not all(isinstance(s, str) for s in include):
        raise MappingConfigError(path, "expected a list of section names")
    unknown = [s for s in include if s not in INCLUDE_SECTIONS and s != "all"]
    if unknown:
        raise MappingConfigError(
            path, f"unknown section(s) {', '.join(map(repr, unknown))}; known: {', '.join(INCLUDE_SECTIONS)}, all"
        )
    return tuple(include)


def _compile_remove(remove: Any, path: str) -> tuple[tuple[str, ...], ...]:
    if remove is None:
        return ()
    if not isinstance(remove, list) or not all(isinstance(s, str) for s in remove):
        raise MappingConfigError(path, "expected a list of dot paths")
    return tuple(split_path(target) for target in remove)


def _compile_config_data(compiler: _Compiler, config: dict, path: str) -> tuple[_Node | None, Any]:
    """walkerOS: `data = config.data && getMappingValue(...)`: a falsy data (null, false, 0,
    "") is the data as it is; an absent one is undefined."""
    if "data" not in config:
        return None, UNDEFINED
    data = config["data"]
    if not js_truthy(data):
        return None, data
    return compiler.value(data, path), UNDEFINED


def _apply_policy(entries: tuple[_PolicyEntry, ...], event: dict, collector: dict) -> dict:
    """Every entry is resolved against the event as it was before this policy (walkerOS runs
    them concurrently), then written in order; only containers on written paths are copied."""
    ctx = _event_context(event, collector) if any(n.contextual for _, n in entries) else None
    resolved = [(keys, node.run(event, ctx)) for keys, node in entries]
    for keys, value in resolved:
        event = set_by_path(event, keys, value)
    return event


def _assign(target: dict, source: dict) -> dict:
    """walkerOS `assign` (merge, shallow, extend): source wins per key, except that two lists
    under one key are united: the target's items, then the source's not already included."""
    merged = dict(target)
    for key, source_value in source.items():
        target_value = target.get(key, UNDEFINED)
        if isinstance(target_value, list) and isinstance(source_value, list):
            union = list(target_value)
            for item in source_value:
                if not any(same_value_zero(item, present) for present in union):
                    union.append(item)
            merged[key] = union
        else:
            merged[key] = source_value
    return merged


# --- public: a destination's whole mapping ---------------------------------------------------


class MappingResult:
    """What processEventMapping gives for one event. A plain class, not a dataclass: compiled,
    it is an extension type (mapping.pxd), one made for every event."""

    __slots__ = ("event", "rule", "ignored", "data")

    def __init__(self, event: dict, rule: CompiledRule | None, ignored: bool, data: Any):
        self.event = event  # the event as the destination sees it (policies, `name` applied)
        self.rule = rule
        self.ignored = ignored
        self.data = data  # the produced data, or UNDEFINED

    def __repr__(self) -> str:
        return f"MappingResult(event={self.event!r}, rule={self.rule!r}, ignored={self.ignored!r}, data={self.data!r})"


_RuleTable = dict[str, dict[str, tuple[CompiledRule, ...]]]
_CANDIDATES_MAX = 4096


class DestinationMapping:
    """A destination `config`'s mapping (`mapping`, `data`, `policy`, `include`), compiled.

    `process(event)` runs walkerOS's processEventMapping. Results may share nested objects
    with the input event (nothing here mutates them): treat them as read-only.
    """

    def __init__(
        self,
        config: dict,
        path: str = "$.config",
        on_error: Callable[[str, BaseException], None] | None = None,
        functions: Functions | None = None,
    ):
        if not isinstance(config, dict):
            raise MappingConfigError(path, f"expected an object, got {type(config).__name__}")
        self._config = config
        self._path = path
        self._on_error = on_error
        self._functions = functions if functions is not None else Functions()
        self._log = _ErrorLog(on_error)
        compiler = _Compiler(self._log, self._functions)
        self._policy = _compile_policy(compiler, config.get("policy"), _child_path(path, "policy"))
        self._data_node, self._data_literal = _compile_config_data(compiler, config, _child_path(path, "data"))
        self._include = _compile_include(config.get("include"), _child_path(path, "include"))
        self.rules = self._compile_rules(compiler, config.get("mapping"), _child_path(path, "mapping"))
        self._plain_event, self._plain_data = self._holes_possible()
        # Rules whose events need no more than the rule's own name and data (holes cleared,
        # if it can have any): no policy, no include or remove, no config data. Most rules are
        # like this, and process takes a short way for them (the same steps, the ones that do
        # nothing left out).
        simple_config = not self._policy and not self._include and self._data_node is None
        simple_config = simple_config and self._data_literal is UNDEFINED and not self._plain_event
        self._simple_rules = frozenset(
            rule
            for rule in self.all_rules()
            if simple_config and not rule._policy and rule._include is None and not rule._remove and not rule.ignore
        )
        # Rule lookup by event name: the rules getMappingEvent would try, in order, up to
        # the first that has no condition. Names repeat, so this is worked out once per name.
        self._candidates: dict[str, tuple[CompiledRule, ...]] = {}

    def _compile_rules(self, compiler: _Compiler, mapping: Any, path: str) -> _RuleTable:
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            raise MappingConfigError(path, f"expected an object of entities, got {type(mapping).__name__}")
        table: _RuleTable = {}
        for entity, actions in mapping.items():
            entity_path = _child_path(path, entity)
            if not js_truthy(actions):
                continue  # walkerOS `if (!mapping[entity])`: as if absent
            if not isinstance(actions, dict):
                raise MappingConfigError(entity_path, f"expected an object of actions, got {type(actions).__name__}")
            table[entity] = {}
            for action, slot in actions.items():
                if js_truthy(slot):
                    table[entity][action] = self._compile_slot(
                        compiler, slot, f"{entity} {action}", _child_path(entity_path, action)
                    )
        return table

    @staticmethod
    def _compile_slot(compiler: _Compiler, slot: Any, key: str, path: str) -> tuple[CompiledRule, ...]:
        rules = slot if isinstance(slot, list) else [slot]
        compiled = []
        for index, rule in enumerate(rules):
            rule_path = _child_path(path, index) if isinstance(slot, list) else path
            if not isinstance(rule, dict):
                raise MappingConfigError(rule_path, f"expected a rule object, got {type(rule).__name__}")
            compiled.append(CompiledRule(rule, key, rule_path, compiler))
        return tuple(compiled)

    def all_rules(self) -> list[CompiledRule]:
        """Every compiled rule, in the config's order (the same in every process)."""
        return [rule for actions in self.rules.values() for slot in actions.values() for rule in slot]

    def _holes_possible(self) -> tuple[bool, dict[CompiledRule | None, bool]]:
        """Whether results can hold UNDEFINED holes and so need `to_plain` before output: for
        the event, and for the data by the rule that made it (None: no rule). Known at compile
        time, so plain configs and rules pay nothing per event."""
        rules = self.all_rules()
        policies = list(self._policy) + [entry for rule in rules for entry in rule._policy]
        # A policy may write holes into the event (a `*` path, or an index past a list's end).
        event_holes = any(node.holes or any(_is_index(k) for k in keys) for keys, node in policies)
        # Include flattens event sections and remove only deletes: neither adds holes.
        base = event_holes or (self._data_node is not None and self._data_node.holes)
        data_holes: dict[CompiledRule | None, bool] = {None: base}
        for rule in rules:
            data_holes[rule] = base or (rule._data is not None and rule._data.holes)
        return event_holes, data_holes

    # -- per event --

    def find_rule(self, event: dict, collector: dict) -> CompiledRule | None:
        """walkerOS getMappingEvent (rule conditions see the collector and its consent)."""
        return self._rule_for(event, collector)[0]

    def _rule_for(self, event: dict, collector: dict) -> tuple[CompiledRule | None, _Ctx | None]:
        """The rule, and the event's context if a condition needed one (the values resolved on
        the same event get the same context)."""
        name = event.get("name")
        if not isinstance(name, str):
            return None, None
        candidates = self._candidates.get(name)
        if candidates is None:
            candidates = self._candidates_for(name)
        ctx = None
        for rule in candidates:
            if rule._condition is None:
                return rule, ctx
            if ctx is None:
                ctx = _event_context(event, collector)
            # The rule's condition(event, context): a bool; one that raises is counted and does
            # not match (walkerOS would let the whole push fail).
            if rule._condition(event, ctx):
                return rule, ctx
        return None, ctx

    def _candidates_for(self, name: str) -> tuple[CompiledRule, ...]:
        """The rules to try for an event name, in getMappingEvent's order: the entity's (else
        "*") slot for the action (else "*"), then "* *"; none after one without a condition."""
        candidates: tuple[CompiledRule, ...] = ()
        parts = name.split(" ")  # one space exactly: "a  b" has an empty action
        if len(parts) >= 2 and parts[0] and parts[1]:
            entity, action = parts[0], parts[1]
            actions = self.rules.get(entity)
            if actions is None:
                actions = self.rules.get("*")
            if actions is not None:
                slot = actions.get(action)
                if slot is None:
                    slot = actions.get("*")
                candidates = slot or ()
            # Straight to "* *": walkerOS does not try mapping["*"][action] here.
            candidates += self.rules.get("*", {}).get("*") or ()
            for position, rule in enumerate(candidates):
                if rule._condition is None:
                    candidates = candidates[: position + 1]
                    break
        if len(self._candidates) >= _CANDIDATES_MAX:
            self._candidates.clear()  # arbitrary names: keep the memory bounded
        self._candidates[name] = candidates
        return candidates

    def process(self, event: dict, collector: dict | None = None, with_data: bool = True) -> MappingResult:
        """walkerOS processEventMapping: config policy → rule → rule policy → config data →
        ignore → name → rule data (merged) → include → remove. Without ``with_data``, only what
        decides the event's fate and name: policies, the rule, ignore and name (the result's
        data is UNDEFINED)."""
        collector = collector if collector is not None else {}
        event = dict(event)  # our own top level: `name` is renamed on it, never on the caller's
        if self._policy:
            event = _apply_policy(self._policy, event, collector)
        rule, ctx = self._rule_for(event, collector)
        if rule in self._simple_rules:
            if rule.name:
                event["name"] = rule.name
            node = rule._data
            if node is None or not with_data:
                return self._result(event, rule, False, UNDEFINED)
            if node.contextual and ctx is None:
                ctx = _event_context(event, collector)
            return self._result(event, rule, False, node.run(event, ctx if node.contextual else None))
        if rule is not None and rule._policy:
            event = _apply_policy(rule._policy, event, collector)
            ctx = None  # another event now
        if not with_data:
            if rule is not None and rule.name and not rule.ignore:
                event["name"] = rule.name
            return self._result(event, rule, rule is not None and rule.ignore, UNDEFINED)
        data = self._data_literal
        node = self._data_node
        if node is not None:
            if node.contextual and ctx is None:
                ctx = _event_context(event, collector)
            data = node.run(event, ctx if node.contextual else None)
        if rule is not None:
            if rule.ignore:
                return self._result(event, rule, True, data)
            if rule.name:  # a str or None: JS truthiness is plain truthiness here
                event["name"] = rule.name  # on our copy; context.event is this same object
            node = rule._data
            if node is not None:
                if node.contextual and ctx is None:
                    ctx = _event_context(event, collector)
                rule_data = node.run(event, ctx if node.contextual else None)
                both_objects = isinstance(data, dict) and isinstance(rule_data, dict)
                data = _assign(data, rule_data) if both_objects else rule_data
        data = self._include_sections(rule, event, data)
        if rule is not None and rule._remove and isinstance(data, dict):
            for keys in rule._remove:
                data = delete_by_path(data, keys)
        return self._result(event, rule, False, data)

    def _include_sections(self, rule: CompiledRule | None, event: dict, data: Any) -> Any:
        """Rule `include` replaces the config's (even an empty list does); flattened sections
        go under the data: data wins on conflicts, and with no data they become the data."""
        include = rule._include if rule is not None and rule._include is not None else self._include
        if not include:
            return data
        flat, produced = flatten_include(event, include)
        if not produced:
            return data
        if isinstance(data, dict):
            return _assign(flat, data)
        return flat if data is None or data is UNDEFINED else data

    def _result(self, event: dict, rule: CompiledRule | None, ignored: bool, data: Any) -> MappingResult:
        if self._plain_event:
            event = to_plain(event)
        if data is not UNDEFINED and self._plain_data[rule]:
            data = to_plain(data)
        return MappingResult(event, rule, ignored, data)

    @property
    def error_counts(self) -> dict[str, int]:
        """Runtime errors of user functions by JSON path, for metrics."""
        return dict(self._log.counts)

    def __reduce__(self) -> tuple:
        return (DestinationMapping, (self._config, self._path, self._on_error, self._functions))


def _is_index(key: str) -> bool:
    return key.isdigit()
