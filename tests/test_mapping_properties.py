"""Property-based tests of the mapping language: for random events and random mapping configs,
evaluation never raises and every result is undefined or a valid property value."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decide.mapping import UNDEFINED, DestinationMapping, compile_value, is_property
from decide.paths import to_plain

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

KEYS = st.sampled_from(["a", "b", "id", "name", "price", "consent", "*", "0", ""])
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-100, 100),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=4),
)
PROPERTIES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(KEYS, children, max_size=3)),
    max_leaves=6,
)
# Event data may hold null, which the mapping must turn into undefined, never pass on.
JSON_VALUES = st.recursive(
    st.one_of(SCALARS, st.none()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(KEYS, children, max_size=3)),
    max_leaves=8,
)
CONSENT = st.dictionaries(st.sampled_from(["functional", "marketing", "analytics"]), st.booleans(), max_size=3)

EVENTS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(
            ["product view", "order complete", "page view", "product add", "product", "a  b", "x y z", ""]
        )
    },
    optional={
        "data": st.dictionaries(KEYS, JSON_VALUES, max_size=4),
        "nested": st.lists(
            st.fixed_dictionaries(
                {"entity": st.sampled_from(["product", "gift"])},
                optional={"data": st.dictionaries(KEYS, JSON_VALUES, max_size=3)},
            ),
            max_size=3,
        ),
        "context": st.dictionaries(
            KEYS, st.one_of(st.tuples(SCALARS, st.integers(0, 3)).map(list), st.just([]), JSON_VALUES), max_size=2
        ),
        "globals": st.dictionaries(KEYS, JSON_VALUES, max_size=2),
        "user": st.dictionaries(st.sampled_from(["id", "session", "device", "email"]), SCALARS, max_size=3),
        "consent": CONSENT,
        "id": st.text(max_size=4),
        "trigger": st.one_of(st.text(max_size=4), st.none()),
        "timestamp": st.integers(0, 2**41),
        "timing": st.floats(0, 10),
        "source": st.dictionaries(KEYS, JSON_VALUES, max_size=2),
    },
)

PATHS = st.sampled_from(
    [
        "data",
        "data.a",
        "data.a.b",
        "data.*",
        "data.*.id",
        "nested",
        "nested.*",
        "nested.*.data.a",
        "nested.0.data.id",
        "nested.5",
        "nested.length",
        "user.id",
        "consent",
        "consent.marketing",
        "context.a.0",
        "globals",
        "name",
        "",
        "*",
        "this",
        "0",
        "data.0.a",
    ]
)
FUNCTIONS = st.sampled_from(
    [
        "$code:(value) => value",
        "$code:() => null",
        "$code:() => { throw new Error('no') }",
        "$code:(value) => [value, 1]",
        "$code:(value) => ({x: value, n: null})",
        "$code:() => NaN",
        "$code:() => new Date(0)",
        "$code:(value, context) => context.event.name",
        "$code:() => [undefined, 2]",
        "$code:(value, context) => context.consent",
        "$code:async (value) => value",
        "$code:(value) => ({f: () => 1, v: value})",
        "not code",
    ]
)
PREDICATES = st.sampled_from(
    [
        "$code:() => true",
        "$code:() => false",
        "$code:(value) => value",
        "$code:(value) => value.data",
        "$code:() => []",
        "$code:async () => false",
    ]
)


def _config(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {},
        optional={
            "key": PATHS,
            "value": PROPERTIES,
            "fn": FUNCTIONS,
            "condition": PREDICATES,
            "validate": PREDICATES,
            "consent": CONSENT,
            "loop": st.tuples(st.one_of(st.just("this"), children), children).map(list),
            "map": st.dictionaries(KEYS, children, max_size=3),
            "set": st.lists(children, max_size=3),
        },
    )


# Configs without containers are leaves too: small templates that isolate one feature each
# (so 200 examples reach them all), plus any mix of the leaf keys.
LEAF_CONFIGS = st.one_of(
    st.fixed_dictionaries({"fn": FUNCTIONS}),
    st.fixed_dictionaries({"fn": FUNCTIONS, "value": PROPERTIES}),
    st.fixed_dictionaries({"key": PATHS, "value": PROPERTIES}),
    st.fixed_dictionaries({"consent": CONSENT}, optional={"key": PATHS, "value": PROPERTIES}),
    st.fixed_dictionaries({"condition": PREDICATES}, optional={"key": PATHS, "value": PROPERTIES}),
    st.fixed_dictionaries({"validate": PREDICATES}, optional={"fn": FUNCTIONS, "value": PROPERTIES}),
    st.fixed_dictionaries(
        {},
        optional={
            "key": PATHS,
            "value": PROPERTIES,
            "fn": FUNCTIONS,
            "condition": PREDICATES,
            "validate": PREDICATES,
            "consent": CONSENT,
        },
    ),
)
VALUES = st.recursive(
    st.one_of(LEAF_CONFIGS, PATHS, st.integers(-2, 2), st.booleans()),
    lambda children: st.one_of(st.lists(children, max_size=3), _config(children)),
    max_leaves=8,
)

SECTIONS = st.lists(st.sampled_from(["data", "globals", "context", "user", "source", "event", "all"]), max_size=3)
POLICY = st.dictionaries(
    st.sampled_from(
        [
            "data.a",
            "user.id",
            "name",
            "data.new.deep",
            "nested.0.data.a",
            "nested.3.x",
            "context.a",
            "consent.marketing",
        ]
    ),
    VALUES,
    max_size=2,
)
RULES = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=6),
        "data": VALUES,
        "ignore": st.booleans(),
        "silent": st.booleans(),
        "condition": PREDICATES,
        "policy": POLICY,
        "include": SECTIONS,
        "remove": st.lists(PATHS, max_size=2),
        "consent": CONSENT,
        "settings": st.dictionaries(
            st.sampled_from(["page", "identify", "group"]), st.one_of(st.booleans(), VALUES), max_size=2
        ),
    },
)
SLOTS = st.one_of(RULES, st.lists(RULES, max_size=2))
MAPPINGS = st.dictionaries(
    st.sampled_from(["product", "order", "page", "*"]),
    st.dictionaries(st.sampled_from(["view", "complete", "add", "*"]), SLOTS, max_size=3),
    max_size=3,
)
CONFIGS = st.fixed_dictionaries(
    {}, optional={"mapping": MAPPINGS, "data": VALUES, "policy": POLICY, "include": SECTIONS}
)
COLLECTORS = st.fixed_dictionaries({}, optional={"consent": CONSENT, "globals": st.dictionaries(KEYS, SCALARS)})


def is_json_property(value: Any) -> bool:
    """A property in its JSON view: holes of lists show as null, nowhere else may null be."""
    if isinstance(value, list):
        return all(item is None or is_json_property(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json_property(v) for k, v in value.items())
    return is_property(value)


def _quiet(_place: str, _exc: BaseException) -> None:
    """Runtime errors of the generated functions are expected; keep the test log clean."""


@SETTINGS
@given(spec=VALUES, event=EVENTS, collector=COLLECTORS, use_event_as_input=st.booleans())
def test_a_value_is_undefined_or_a_property(spec: Any, event: dict, collector: dict, use_event_as_input: bool) -> None:
    value = compile_value(spec, "$.value", on_error=_quiet)
    untouched = copy.deepcopy(event)
    value_input = event if use_event_as_input else event.get("data", {})
    context = {"event": event, "collector": collector}
    raw = value.raw(value_input, context)
    assert raw is UNDEFINED or is_property(raw)
    public = value(value_input, context)
    assert public == (raw if raw is UNDEFINED else to_plain(raw))
    if public is not UNDEFINED:
        orjson.dumps(public)
    assert event == untouched


@SETTINGS
@given(config=CONFIGS, event=EVENTS, collector=COLLECTORS)
def test_processing_an_event_never_raises(config: dict, event: dict, collector: dict) -> None:
    mapping = DestinationMapping(config, on_error=_quiet)
    untouched = copy.deepcopy(event)
    result = mapping.process(event, collector)
    assert event == untouched
    orjson.dumps(result.event)
    assert result.ignored is bool(result.rule and result.rule.ignore)
    included = config.get("include") or (result.rule and result.rule.raw.get("include"))
    if result.data is not UNDEFINED:
        orjson.dumps(result.data)
        if not included and not result.ignored:
            # Without include every piece of data passed the Property check.
            assert is_json_property(result.data)
    for setting in result.rule.settings.values() if result.rule else ():
        if callable(setting):
            resolved = setting(
                result.event, {"event": result.event, "collector": collector, "mapping": result.rule.raw}
            )
            assert resolved is UNDEFINED or is_json_property(resolved)
