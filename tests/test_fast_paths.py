"""Each fast path against the reference path it short-cuts, on generated input: the quick event
check vs the ordered validation, the specialised (inlined) map vs the general map, the
timestamp formatter vs datetime.isoformat, and to_plain vs the plain recursion."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decide.mapping as mapping_module
from decide.calls import format_timestamp, timestamp_datetime
from decide.consent import ConsentContexts, category_preferences
from decide.event import InvalidEvent, _plainly_valid, _validate, _validate_in_order, normalise
from decide.identity import IdentityResolver
from decide.mapping import UNDEFINED, compile_value
from decide.paths import to_plain

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)
JSON = st.recursive(
    SCALARS,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c, max_size=3)),
    max_leaves=6,
)
FIELDS = [
    "data",
    "globals",
    "custom",
    "user",
    "source",
    "context",
    "entity",
    "action",
    "trigger",
    "id",
    "timestamp",
    "timing",
    "nested",
    "consent",
    "name",
]
EVENTS = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(
        JSON,
        st.dictionaries(st.sampled_from(["a", "marketing"]), st.booleans(), max_size=2),
        st.lists(st.dictionaries(st.text(max_size=2), JSON, max_size=2), max_size=2),
        st.sampled_from(["product view", "a b c", "a  b", "x", "0123456789abcdef"]),
    ),
    max_size=10,
)


def _ordered(event: dict) -> Any:
    try:
        return _validate_in_order(event, event.get("name"))
    except InvalidEvent as exc:
        return ("invalid", exc.reason)
    except (OverflowError, ValueError, TypeError) as exc:
        return ("raised", type(exc).__name__)


def _fast(event: dict) -> Any:
    try:
        return _validate(event)
    except InvalidEvent as exc:
        return ("invalid", exc.reason)
    except (OverflowError, ValueError, TypeError) as exc:
        return ("raised", type(exc).__name__)


@SETTINGS
@given(EVENTS)
def test_the_quick_event_check_decides_as_the_ordered_validation(event: dict) -> None:
    assert _fast(event) == _ordered(event)
    if _plainly_valid(event) and isinstance(event.get("name"), str):
        # "plainly valid" is never said of an event the ordered checks refuse for its fields
        assert _ordered({**event, "name": "a b"}) == ("a", "b")


READS = st.sampled_from(
    [
        "data.id",
        "data",
        "id",
        "user.id",
        "data.missing",
        "nested",
        "a.b",
        "data.price",
        "globals.x",
        "consent.marketing",
    ]
)
MAP_VALUES = st.one_of(
    READS,
    READS.map(lambda k: {"key": k}),
    st.tuples(READS, SCALARS.filter(lambda v: v is not None)).map(lambda kv: {"key": kv[0], "value": kv[1]}),
    st.just({"fn": "$code:(v) => typeof v"}),
    st.just({"value": "static"}),
    st.just({"key": "data.*.x"}),
)
MAPS = st.dictionaries(st.text(min_size=1, max_size=3), MAP_VALUES, min_size=1, max_size=5)
INPUTS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "data": st.one_of(JSON, st.dictionaries(st.sampled_from(["id", "price", "x"]), JSON, max_size=3)),
            "user": st.one_of(JSON, st.fixed_dictionaries({"id": JSON})),
            "id": JSON,
            "nested": JSON,
            "a": JSON,
            "consent": JSON,
        },
    ),
)


@SETTINGS
@given(MAPS, INPUTS)
def test_the_specialised_map_gives_what_the_general_map_gives(spec: dict, value: Any) -> None:
    fast = compile_value({"map": spec}, "$.v")
    original = mapping_module._specialised_map
    mapping_module._specialised_map = lambda entries, general: general
    try:
        general = compile_value({"map": spec}, "$.v")
    finally:
        mapping_module._specialised_map = original
    context = {"event": {"name": "a b"}}
    assert _same(fast.raw(value, context), general.raw(value, context))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b if a is UNDEFINED or b is UNDEFINED else (type(a) is type(b) and a == b)


LIMIT_MS = int(
    (
        dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.timezone.utc)
        - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    )
    / dt.timedelta(milliseconds=1)
)


@SETTINGS
@given(
    st.one_of(
        st.integers(-62135596800000, LIMIT_MS),
        st.floats(-62135596800000, LIMIT_MS, allow_nan=False),
        st.integers(0, 4102444800000),
    )
)
def test_timestamp_formatting_is_isoformat(ms: int | float) -> None:
    assert format_timestamp(ms) == timestamp_datetime(ms).isoformat(timespec="milliseconds")


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, -1, 1_700_000_000_123, 253402300799999, -62135596800000])
def test_timestamp_formatting_corners(ms: int) -> None:
    assert format_timestamp(ms) == timestamp_datetime(ms).isoformat(timespec="milliseconds")


@pytest.mark.parametrize("ms", [253402300800000, -62135596800001, 1e20, -1e20, 2**70])
def test_timestamp_formatting_out_of_range_raises_as_datetime(ms: int | float) -> None:
    with pytest.raises(OverflowError):
        timestamp_datetime(ms)
    with pytest.raises(OverflowError):
        format_timestamp(ms)


# --- ids read from one section vs the two readers ---------------------------------------------------
ID_VALUES = st.one_of(JSON, st.sampled_from(["", "u1", "s1"]))
IDENTITY_EVENTS = st.one_of(
    EVENTS,
    st.fixed_dictionaries(
        {}, optional={"user": st.one_of(JSON, st.dictionaries(st.sampled_from(["id", "session", "0"]), ID_VALUES))}
    ),
)


@SETTINGS
@given(
    IDENTITY_EVENTS, st.sampled_from([("user.id", "user.session"), ("user.0", "user.session"), ("user.id", "user.id")])
)
def test_ids_read_from_one_section_are_what_the_two_readers_give(event: dict, specs: tuple[str, str]) -> None:
    resolver = IdentityResolver(specs[0], specs[1], "$.settings")
    assert resolver._one_section is not None
    assert resolver.resolve(event, {}) == resolver._resolve(event, {})


# --- consent contexts, made once per consent state, vs category_preferences ---------------------------
CONSENT_MAP = {"analytics": "Analytics", "marketing": "Advertising", "personalization": "Personalization"}


@SETTINGS
@given(st.lists(st.dictionaries(st.sampled_from(["analytics", "marketing", "functional", "x"]), st.booleans())))
def test_shared_consent_contexts_are_the_category_preferences(states: list[dict]) -> None:
    contexts = ConsentContexts(CONSENT_MAP)
    for state in states + states:  # the second time from what was made
        preferences = category_preferences(CONSENT_MAP, state)
        expected = {"consent": {"categoryPreferences": preferences}} if preferences else None
        assert contexts.context_for(state) == expected


# --- an event normalised in place (decoded here) vs a normalised copy ----------------------------------
@SETTINGS
@given(EVENTS, st.sampled_from([None, {"globals": {"env": "prod"}, "consent": {}, "user": {"id": "c"}}]))
def test_normalising_in_place_gives_the_copy(event: dict, collector: dict | None) -> None:
    def outcome(in_place: bool) -> Any:
        given = copy.deepcopy(event)
        try:
            return normalise(given, collector, 1_700_000_000_000, True, in_place)
        except InvalidEvent as exc:
            assert given == event  # an invalid event is never half changed
            return ("invalid", exc.reason)
        except (OverflowError, ValueError, TypeError) as exc:
            return ("raised", type(exc).__name__)

    assert _same(outcome(True), outcome(False))


# --- to_plain: scalars taken without a call, against the plain recursion --------------------------


def _to_plain_reference(value: Any) -> Any:
    if isinstance(value, list):
        return [None if item is UNDEFINED else _to_plain_reference(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_plain_reference(item) for key, item in value.items() if item is not UNDEFINED}
    return value


WITH_HOLES = st.recursive(
    st.one_of(SCALARS, st.just(UNDEFINED)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c, max_size=3)),
    max_leaves=8,
)


@SETTINGS
@given(value=WITH_HOLES)
def test_to_plain_matches_the_plain_recursion(value: Any) -> None:
    expected = _to_plain_reference(value)
    got = to_plain(value)
    assert repr(got) == repr(expected)  # repr: NaN compares unequal to itself
