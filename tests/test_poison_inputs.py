"""Poison inputs: whatever an input holds, it ends as an event or a dead letter with a reason,
in parsing, in explain and in the Beam pipeline; nothing in it can stop a run."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import flow_document, make_spec, run_pipeline

from decide import dead_letter as dl
from decide.dead_letter import DeadLetter
from decide.destination import compiled
from decide.event import MAX_DEPTH, MAX_TIMESTAMP_MS, parse_payload
from pipeline.explain import explain_payloads

GOOD = {"name": "page view", "id": "0000000000000001", "timestamp": 1700000000000, "user": {"session": "s1"}}


def parse(payload, **kw):
    return list(parse_payload(payload, flow="f", **kw))


# -- timestamps ---------------------------------------------------------------------------------
OUT_OF_RANGE = [1700000000000000, 1e20, -1, -1700000000000, 2**62, -(2**62), 2**64, MAX_TIMESTAMP_MS + 1, 1e300]


@pytest.mark.parametrize("timestamp", OUT_OF_RANGE)
def test_a_timestamp_outside_the_valid_range_is_an_invalid_field(timestamp):
    [dead] = parse({**GOOD, "timestamp": timestamp})
    assert isinstance(dead, DeadLetter)
    assert dead.reason == dl.INVALID_FIELD and "timestamp" in dead.error
    assert dead.event_id == GOOD["id"]


def test_a_zero_timestamp_counts_as_absent_as_in_walkeros():
    [event] = parse({**GOOD, "timestamp": 0}, default_timestamp_ms=1767225600000)
    assert event["timestamp"] == 1767225600000


@pytest.mark.parametrize("timestamp", [1, 1700000000000, 1700000000000.7, MAX_TIMESTAMP_MS])
def test_a_timestamp_inside_the_range_is_kept(timestamp):
    [event] = parse({**GOOD, "timestamp": timestamp})
    assert event["timestamp"] == timestamp


def test_a_microsecond_epoch_is_named_as_such():
    [dead] = parse({**GOOD, "timestamp": 1700000000000000})
    assert "microseconds" in dead.error


def test_a_record_time_outside_the_range_does_not_stand_in_for_a_missing_timestamp():
    event = {k: v for k, v in GOOD.items() if k != "timestamp"}
    [dead] = parse(event, default_timestamp_ms=2**62)
    assert isinstance(dead, DeadLetter) and dead.reason == dl.INVALID_FIELD and "timestamp" in dead.error


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True)))
def test_every_numeric_timestamp_is_explained_without_an_exception(timestamp):
    destination = compiled(make_spec(flow_document()))
    [line] = explain_payloads(destination, [{**GOOD, "timestamp": timestamp}])
    assert line["outcome"] in ("delivered", "dead_letter")
    if line["outcome"] == "dead_letter":
        assert line["reason"] == "invalid_field"


def test_bad_timestamps_cost_their_event_only_in_a_batch_run(endpoint):
    spec = make_spec(flow_document(host=endpoint.url))
    payloads = [orjson.dumps({**GOOD, "id": f"{i:016x}", "timestamp": t}) for i, t in enumerate(OUT_OF_RANGE[:5])]
    payloads.append(orjson.dumps(GOOD))
    result = run_pipeline(spec, payloads)
    assert result.delivered == [GOOD["id"]]
    assert sorted(d.reason for d in result.dead) == ["invalid_field"] * 5
    assert len(endpoint.accepted) == 1


# -- depth --------------------------------------------------------------------------------------
def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("as_text", [False, True])
def test_a_decoded_event_or_a_list_nested_beyond_the_limit_is_too_deep(as_text):
    deep_list: list = [1]
    for _ in range(MAX_DEPTH):
        deep_list = [deep_list]
    event = {**GOOD, "data": {"x": deep_list}}
    [dead] = parse(orjson.dumps(event).decode() if as_text else event)
    assert isinstance(dead, DeadLetter) and dead.reason == dl.TOO_DEEP


def test_an_event_nested_beyond_the_limit_is_a_too_deep_dead_letter():
    payload = orjson.dumps({**GOOD, "data": nested(MAX_DEPTH)})
    [dead] = parse(payload)
    assert isinstance(dead, DeadLetter) and dead.reason == dl.TOO_DEEP
    assert str(MAX_DEPTH) in dead.error and dead.payload == payload.decode()


def test_an_event_at_the_limit_passes():
    # The event object is level 1: its data's innermost object is level MAX_DEPTH.
    [event] = parse({**GOOD, "data": nested(MAX_DEPTH - 1)})
    assert event["data"] == nested(MAX_DEPTH - 1)


def test_a_too_deep_event_in_an_envelope_costs_itself_only_and_keeps_its_text():
    deep = {**GOOD, "id": "0000000000000002", "data": {"x": [nested(900)]}}
    items = parse(b'{"batch": [' + orjson.dumps(GOOD) + b"," + _dumps_deep(deep) + b"]}")
    assert isinstance(items[0], dict)
    dead = items[1]
    assert dead.reason == dl.TOO_DEEP and dead.event_id == "0000000000000002"
    assert _loads_deep(dead.payload) == deep


def _dumps_deep(value) -> bytes:
    import json
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        return json.dumps(value).encode()
    finally:
        sys.setrecursionlimit(limit)


def _loads_deep(text):
    return orjson.loads(text)


def test_deeply_nested_input_through_the_pipeline_is_dead_lettered_not_a_crash(endpoint):
    mapping = {"page": {"view": {"data": {"map": {"deep": "data"}}}}}
    spec = make_spec(flow_document(host=endpoint.url, mapping=mapping))
    deep = {**GOOD, "id": "0000000000000002", "data": nested(400)}
    result = run_pipeline(spec, [orjson.dumps(GOOD), _dumps_deep(deep)])
    assert result.delivered == [GOOD["id"]]
    assert [d.reason for d in result.dead] == [dl.TOO_DEEP]


def test_an_event_at_the_depth_limit_is_delivered_with_all_its_properties(endpoint):
    """What passes the limit is sent whole: never pickling errors, never properties: {}."""
    mapping = {"page": {"view": {"data": {"map": {"deep": "data"}}}}}
    spec = make_spec(flow_document(host=endpoint.url, mapping=mapping))
    data = nested(MAX_DEPTH - 1)  # the event is level 1: its data reaches the limit
    result = run_pipeline(spec, [orjson.dumps({**GOOD, "data": data})])
    assert result.delivered == [GOOD["id"]] and not result.dead
    [message] = endpoint.accepted
    assert message["properties"] == {"deep": data}


def test_an_avro_long_timestamp_near_2_62_is_an_invalid_field_in_explain_and_batch(tmp_path, endpoint):
    import json

    import fastavro

    import schemas
    from transforms.files import iter_payloads
    from transforms.read import ReadEvents

    records = [
        {**GOOD, "user": json.dumps(GOOD["user"]), "id": "0000000000000009", "timestamp": 2**62 - 1},
        {**GOOD, "user": json.dumps(GOOD["user"])},
    ]
    path = tmp_path / "events.avro"
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(schemas.load("event.avsc")), records)
    spec = make_spec(flow_document(host=endpoint.url))
    lines = list(explain_payloads(compiled(spec), iter_payloads(str(path))))
    assert [(l["outcome"], l["reason"]) for l in lines] == [("dead_letter", "invalid_field"), ("delivered", None)]
    result = run_pipeline(spec, read=ReadEvents(str(path)))
    assert result.delivered == [GOOD["id"]] and [d.event_id for d in result.dead] == ["0000000000000009"]


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["a", "\x01", "é", '"', "😀", "\\"]), st.integers(0, 12_000_000), st.booleans())
def test_a_dead_letter_record_always_fits_a_pubsub_message(char, size, as_bytes):
    text = char * (size // len(char.encode()))
    raw = text.encode()
    if as_bytes:
        raw = raw[:-1] + b"\xff" if raw else b"\xff"  # not UTF-8: stored as base64
    [dead] = parse(raw)
    record = orjson.dumps(dead.to_dict())
    assert len(record) <= 10_000_000
    original = base64.b64decode(dead.payload) if dead.payload_encoding == "base64" else dead.payload.encode()
    assert raw.startswith(original)
    assert (dead.payload_truncated_from is None) == (original == raw)
    if dead.payload_truncated_from is not None:
        # Cut to fit, not to nothing: most of the room is used.
        assert dead.payload_truncated_from == len(raw) and len(orjson.dumps(dead.payload)) > 7_000_000
