"""Parsing envelopes into events: every invalid input becomes a dead letter with a reason."""

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decide import dead_letter as dl
from decide.dead_letter import DeadLetter
from decide.event import derive_id, parse_payload

EVENT = {
    "name": "product view",
    "id": "0123456789abcdef",
    "timestamp": 1700000000000,
    "data": {"id": "ers"},
    "user": {"session": "s1"},
}


def parse(payload, **kw):
    return list(parse_payload(payload, flow="f", **kw))


@pytest.mark.parametrize(
    "payload",
    [
        orjson.dumps(EVENT),
        orjson.dumps(EVENT).decode(),
        EVENT,
    ],
)
def test_a_single_event_in_any_form(payload):
    [event] = parse(payload)
    assert event["entity"] == "product" and event["action"] == "view"
    assert event["id"] == "0123456789abcdef"
    assert event["data"] == {"id": "ers"}


def test_array_and_batch_envelopes_give_every_event_in_order():
    second = {**EVENT, "id": "fedcba9876543210", "name": "order complete"}
    for payload in ([EVENT, second], {"batch": [EVENT, second]}):
        events = parse(orjson.dumps(payload))
        assert [e["id"] for e in events] == ["0123456789abcdef", "fedcba9876543210"]


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b'{"name": "page view",', dl.NOT_JSON),
        (b"\xff\xfe not utf-8", dl.NOT_JSON),
        (b"", dl.NOT_JSON),
        (b"42", dl.NOT_AN_EVENT),
        (b'"page view"', dl.NOT_AN_EVENT),
        (b"null", dl.NOT_AN_EVENT),
        (b"[1]", dl.NOT_AN_EVENT),
        (b'{"batch": {"name": "page view"}}', dl.INVALID_ENVELOPE),
        (b"[]", dl.EMPTY_ENVELOPE),
        (b'{"batch": []}', dl.EMPTY_ENVELOPE),
        (b'{"data": {}}', dl.INVALID_NAME),
        (b'{"name": 5}', dl.INVALID_NAME),
        (b'{"name": "pageview"}', dl.INVALID_NAME),
        (b'{"name": "page "}', dl.INVALID_NAME),
        (b'{"name": "page view", "data": []}', dl.INVALID_FIELD),
        (b'{"name": "page view", "user": "u1"}', dl.INVALID_FIELD),
        (b'{"name": "page view", "timestamp": "2024-01-01"}', dl.INVALID_FIELD),
        (b'{"name": "page view", "timestamp": true}', dl.INVALID_FIELD),
        (b'{"name": "page view", "id": 7}', dl.INVALID_FIELD),
        (b'{"name": "page view", "nested": [1]}', dl.INVALID_FIELD),
        (b'{"name": "page view", "consent": {"analytics": "yes"}}', dl.INVALID_FIELD),
        (b'{"name": "page view", "trigger": 1}', dl.INVALID_FIELD),
    ],
)
def test_each_invalid_input_reason(payload, reason):
    [dead] = parse(payload)
    assert isinstance(dead, DeadLetter)
    assert dead.reason == reason
    assert dead.stage == dl.PARSE and dead.flow == "f" and dead.error
    if reason not in (dl.NOT_AN_EVENT,) and payload and payload[:1] != b"\xff":
        assert dead.payload == payload.decode()


def test_one_bad_event_in_a_batch_does_not_cost_the_others():
    items = parse(orjson.dumps({"batch": [EVENT, {"name": "oops"}, 3]}))
    assert [type(i).__name__ for i in items] == ["dict", "DeadLetter", "DeadLetter"]
    assert items[1].reason == dl.INVALID_NAME and orjson.loads(items[1].payload) == {"name": "oops"}
    assert items[2].reason == dl.NOT_AN_EVENT


def test_missing_id_is_derived_from_content_and_stable():
    event = {k: v for k, v in EVENT.items() if k != "id"}
    [a] = parse(orjson.dumps(event))
    [b] = parse(orjson.dumps(dict(reversed(list(event.items())))))  # key order does not matter
    assert a["id"] == b["id"] == derive_id(event)
    assert len(a["id"]) == 16 and int(a["id"], 16) >= 0
    [c] = parse(orjson.dumps({**event, "timestamp": 1}))
    assert c["id"] != a["id"]


def test_missing_timestamp_takes_the_record_time_then_now():
    event = {"name": "page view", "id": "x"}
    [e] = parse(event, default_timestamp_ms=1234)
    assert e["timestamp"] == 1234
    [e] = parse(event)
    assert e["timestamp"] > 1_700_000_000_000


def test_collector_state_is_merged_under_the_event():
    collector = {
        "globals": {"env": "prod", "lang": "de"},
        "user": {"device": "d0", "id": "c"},
        "consent": {"analytics": True, "marketing": True},
    }
    [e] = parse({**EVENT, "globals": {"lang": "en"}, "consent": {"marketing": False}}, collector=collector)
    assert e["globals"] == {"env": "prod", "lang": "en"}
    assert e["user"] == {"device": "d0", "id": "c", "session": "s1"}
    assert e["consent"] == {"analytics": True, "marketing": False}


def test_input_is_not_mutated():
    event = {"name": "page view", "data": {"a": 1}}
    before = orjson.dumps(event)
    parse(event, collector={"globals": {"x": 1}})
    assert orjson.dumps(event) == before


def _nested(children):
    """Lists and objects of the values below (Hypothesis's extend for recursive JSON)."""
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    _nested,
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: orjson.dumps(v)),
        st.dictionaries(
            st.sampled_from(["name", "data", "user", "id", "timestamp", "consent", "nested", "batch", "context"]),
            json_values,
            max_size=5,
        ),
    )
)
def test_any_input_gives_events_or_dead_letters_never_an_exception(payload):
    for item in parse(payload):
        if isinstance(item, DeadLetter):
            assert item.reason and item.stage == dl.PARSE and isinstance(item.payload, str)
        else:
            assert isinstance(item["name"], str) and item["entity"] and item["action"] and item["id"]
