"""SendToSegment / SegmentConnection: values the SDK's JSON cannot hold, messages too large,
calls the SDK would refuse, a batch without an answer, ``disable``, the pooled connection, and
progress logging."""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import math
import threading
import time
from decimal import Decimal

import numpy as np
import pytest
from apache_beam.testing import test_stream
from hypothesis import given, settings
from hypothesis import strategies as st
from support import WRITE_KEY, assert_exactly_once, event, fast, lines, planned_calls, run_pipeline, spec_for

from decide import wire
from decide.secrets import key_forms
from decide.wire import EventMessages, to_wire
from local_segment import delay
from pipeline.summary import reconcile, render
from segment_api import connection
from segment_api.connection import SegmentConnection
from segment_api.http import SegmentHttp
from segment_api.sender import PipelinedSender

TS = "2026-01-01T00:00:00.000+00:00"


def track(message_id: str, **fields) -> dict:
    return {
        "type": "track",
        "anonymousId": "a-1",
        "event": "Tested",
        "messageId": message_id,
        "timestamp": TS,
        **fields,
    }


class Colour(enum.Enum):
    RED = "red"


class Opaque:
    def __str__(self):
        return "opaque!"


# -- values the SDK would drop ---------------------------------------------------------------------
def test_to_wire_turns_everything_into_json_types():
    value = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "day": dt.date(2026, 1, 2),
        "price": Decimal("9.95"),
        "tags": {"b", "a"},
        "pair": (1, 2),
        "raw": b"\xffok",
        "colour": Colour.RED,
        "nan": math.nan,
        "inf": -math.inf,
        "object": Opaque(),
        "np_int": np.int64(7),
        "np_float": np.float32(0.5),
        2: "int key",
        (1, 2): "tuple key",
        None: "none key",
        True: "bool key",
        "nested": [{"at": dt.time(12, 30)}, [Decimal("1")]],
    }
    wire = to_wire(value)
    json.dumps(wire, allow_nan=False)  # plain JSON: no NaN, no unknown types, string keys only
    assert wire["when"] == "2026-01-02T03:04:05+00:00" and wire["day"] == "2026-01-02"
    assert wire["price"] == 9.95 and wire["tags"] == ["a", "b"] and wire["pair"] == [1, 2]
    assert wire["raw"] == "\ufffdok" and wire["colour"] == "red" and wire["object"] == "opaque!"
    assert wire["nan"] is None and wire["inf"] is None
    assert wire["np_int"] == 7 and type(wire["np_int"]) is int and wire["np_float"] == 0.5
    assert wire["2"] == "int key" and wire["(1, 2)"] == "tuple key" and wire["null"] == "none key"
    assert wire["true"] == "bool key" and wire["nested"] == [{"at": "12:30:00"}, [1.0]]
    assert to_wire({"plain": [1, "x", True, None, 2.5, {"k": {}}]}) == {"plain": [1, "x", True, None, 2.5, {"k": {}}]}


class Label(str):
    pass


_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=8),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=2),
    st.decimals(allow_nan=False),
    st.sampled_from([Colour.RED, Opaque()]),
    st.builds(Label, st.text(max_size=4)),
    st.datetimes(),
    st.dates(),
    st.binary(max_size=4),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.frozensets(st.integers(), max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none(), st.booleans()), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES)
def test_the_fast_path_of_to_wire_gives_what_the_general_one_gives(value):
    """Plain JSON values take a C round trip through orjson; the result must not depend on it."""
    fast_result, general = to_wire(value), wire._to_wire_any(value)
    assert json.dumps(fast_result, sort_keys=False) == json.dumps(general, sort_keys=False)


def test_a_delivery_keeps_its_wire_form_out_of_beam_state():
    import pickle

    delivery = EventMessages({"id": "1"}, [track("m:1", properties={"pair": (1, 2)})])
    assert delivery.measure() > 0 and json.loads(delivery.wire[0])["properties"] == {"pair": [1, 2]}
    copy = pickle.loads(pickle.dumps(delivery))
    assert copy.wire is None and copy.size == delivery.size and copy == delivery
    assert copy.encoded() == delivery.encoded()


def test_without_conversion_the_sdk_would_silently_drop_values():
    from segment.analytics.utils import clean

    value = {"object": Opaque(), "list": [1, Opaque()], "keep": 1}
    assert clean(value) == {"keep": 1}  # both quietly gone (a warning in the log, nothing else)
    assert clean(to_wire(value)) == {"object": "opaque!", "list": [1, "opaque!"], "keep": 1}


def test_odd_values_arrive_converted(endpoint):
    spec = spec_for(endpoint.url)
    connection = SegmentConnection(spec.settings, fast())
    try:
        odd = EventMessages(
            {"id": "odd"},
            [track("odd:1", properties={"at": dt.date(2026, 5, 1), "tags": {"x"}, "obj": Opaque(), "nan": math.nan})],
        )
        result = connection.send([odd], "default")
    finally:
        connection.close()
    assert result.delivered == [odd] and not result.failed
    [received] = endpoint.accepted
    assert received["properties"] == {"at": "2026-05-01", "tags": ["x"], "obj": "opaque!", "nan": None}


# -- what never reaches Segment ------------------------------------------------------------------
def test_a_message_over_32_kb_is_dead_lettered_before_sending(endpoint):
    spec = spec_for(endpoint.url)
    events = [event(i) for i in range(5)] + [event(9, data={"blob": "x" * 33_000})]
    result = run_pipeline(spec, events)

    assert_exactly_once(endpoint, result, planned_calls(spec, events), dead_ids={events[-1]["id"]})
    [dead] = result.dead
    assert (dead.reason, dead.stage, dead.http_status) == ("too_large", "send", None)
    assert "32768-byte limit" in dead.error
    assert all(events[-1]["id"] not in str(r.message_ids) for r in endpoint.requests)  # never sent
    assert not endpoint.counters["rejected_requests"]


def test_a_call_the_sdk_refuses_is_dead_lettered_whole(endpoint):
    spec = spec_for(endpoint.url)
    connection = SegmentConnection(spec.settings, fast())
    try:
        good = EventMessages({"id": "good"}, [track("good:1")])
        # Its identify is fine, its group has no usable groupId: the event fails as a whole,
        # and its identify is not sent either.
        bad = EventMessages(
            {"id": "bad"},
            [{**track("bad:1"), "type": "identify"}, {**track("bad:2"), "type": "group", "groupId": {"no": "dict"}}],
        )
        result = connection.send([good, bad], "default")
    finally:
        connection.close()
    assert result.delivered == [good]
    [(failed, dead)] = result.failed
    assert failed is bad and dead.reason == "invalid_call" and "groupId" in dead.error
    assert [m["messageId"] for m in endpoint.accepted] == ["good:1"]


def test_disable_sends_nothing_and_counts_it(endpoint):
    spec = spec_for(endpoint.url, identify=True, disable=True)
    events = [event(i, user={"session": "s", "email": "e@x"}) for i in range(6)]
    result = run_pipeline(spec, events)

    assert not endpoint.requests and not result.delivered and not result.dead
    assert result.counts["events_disabled"] == 6
    assert result.counts["calls_disabled"] == 7  # one identify (then unchanged), six tracks
    check = reconcile(result.counts)
    assert check.balanced and check.dropped == 6
    assert "not sent (disable)" in render(result.counts)


# -- a flush that does not end ---------------------------------------------------------------------
def test_a_batch_over_the_flush_deadline_fails_and_a_new_client_takes_over(endpoint):
    spec = spec_for(endpoint.url, timeout_ms=10_000)
    connection = SegmentConnection(spec.settings, fast(flush_deadline_s=0.5))
    try:
        endpoint.script(delay(2.0))
        slow = connection.send([EventMessages({"id": "slow"}, [track("slow:1")])], "default")
        [(_, dead)] = slow.failed
        assert dead.reason == "delivery_failed" and "flush deadline" in dead.error
        fast_one = connection.send([EventMessages({"id": "next"}, [track("next:1")])], "default")
        assert [d.event["id"] for d in fast_one.delivered] == ["next"]
        assert connection.clients_built == 2
        # The abandoned request still lands later: the replay of "slow" will be a duplicate,
        # absorbed by messageId.
        assert endpoint.wait_until(2, timeout=5)
    finally:
        connection.close()


# -- sending while the next batch is prepared ------------------------------------------------------
def test_the_next_batch_is_prepared_while_the_previous_one_is_on_the_wire(endpoint):
    spec = spec_for(endpoint.url, timeout_ms=10_000)
    connection = SegmentConnection(spec.settings, fast())
    sender = PipelinedSender(connection, "default")
    batches = [[EventMessages({"id": f"{b}.{i}"}, [track(f"p:{b}:{i}")]) for i in range(3)] for b in range(3)]
    try:
        endpoint.script(delay(0.6))  # the first request answers slowly
        started = time.monotonic()
        assert sender.submit(batches[0]) == []  # returns at once: the batch is on the wire ...
        assert time.monotonic() - started < 0.3  # ... and the caller prepares the next one meanwhile
        settled = sender.submit(batches[1])  # the next waits for the first to settle
        assert time.monotonic() - started >= 0.5
        assert [sent.deliveries for sent, _ in settled] == [batches[0]]
        settled += sender.submit(batches[2]) + sender.drain()
        # Every batch settled once, in the order given, each event with its fate.
        assert [[d.event["id"] for d in result.delivered] for _, result in settled] == [
            [d.event["id"] for d in batch] for batch in batches
        ]
        assert len(endpoint.accepted) == 9 and sender.drain() == []
        assert [len(r.message_ids) for r in endpoint.requests] == [3, 3, 3]  # one request a batch
    finally:
        sender.close()
        connection.close()


def test_a_connection_takes_one_batch_at_a_time(endpoint):
    connection = SegmentConnection(spec_for(endpoint.url).settings, fast())
    try:
        first = connection.start([EventMessages({"id": "1"}, [track("one:1")])], "default")
        with pytest.raises(RuntimeError, match="still in flight"):
            connection.start([EventMessages({"id": "2"}, [track("two:1")])], "default")
        assert [d.event["id"] for d in connection.finish(first).delivered] == ["1"]
        assert [
            d.event["id"] for d in connection.send([EventMessages({"id": "2"}, [track("two:1")])], "default").delivered
        ] == ["2"]
    finally:
        connection.close()


def test_a_batch_run_batches_within_each_bundle_and_settles_all_of_it(endpoint):
    """The bundle-based runner makes many small bundles: each sends full batches, then its
    partial last one when it finishes, and nothing is left behind."""
    spec = spec_for(endpoint.url, flush_at=4, timeout_ms=5_000)
    events = [event(i) for i in range(50)]
    result = run_pipeline(spec, events, runner="BundleBasedDirectRunner")
    assert_exactly_once(endpoint, result, planned_calls(spec, events))
    assert all(n <= 4 for n in (len(r.message_ids) for r in endpoint.requests))
    assert result.counts["batches_flushed_in_bundle"] == len(endpoint.requests)


def test_debug_logging_never_shows_the_write_key(endpoint, caplog):
    """Nothing the send path logs, at any level, carries the key in any form it was sent in."""
    spec = spec_for(endpoint.url)
    connection = SegmentConnection(spec.settings, fast())
    try:
        with caplog.at_level(logging.DEBUG):
            result = connection.send([EventMessages({"id": "logged"}, [track("log:1")])], "default")
        assert [d.event["id"] for d in result.delivered] == ["logged"]
        assert caplog.records  # urllib3 and the endpoint log at DEBUG: there is something to check
        assert not any(form in caplog.text for form in key_forms(WRITE_KEY))
    finally:
        connection.close()


# -- the pooled connection --------------------------------------------------------------------------
def test_connections_are_pooled_per_configuration(endpoint):
    settings = spec_for(endpoint.url).settings
    options = fast()
    key, first = connection.acquire_connection(settings, options)
    _, second = connection.acquire_connection(settings, options)
    assert first is not second  # two DoFn instances at once: a client each
    connection.release_connection(key, first, grace_s=30)
    _, again = connection.acquire_connection(settings, options)
    assert again is first  # the next setup() reuses the idle one
    other_key, other = connection.acquire_connection(spec_for(endpoint.url, max_retries=3).settings, options)
    assert other is not first and other_key != key
    closed = threading.Event()
    close = first.close

    def close_and_tell() -> None:
        close()
        closed.set()

    first.close = close_and_tell
    for k, c in ((key, first), (key, second), (other_key, other)):
        connection.release_connection(k, c, grace_s=0.05)
    assert closed.wait(3) and first._http is None  # closed after the grace period
    assert WRITE_KEY not in key  # the pool's key is a hash


def test_the_streaming_runner_reuses_one_client_across_bundles(endpoint):
    spec = spec_for(endpoint.url, flush_at=2, namespace="pooled", timeout_ms=5_000)
    before = _clients_built()
    stream = test_stream.TestStream()
    for i in range(4):  # one bundle per add_elements: setup() and teardown() for each
        stream = stream.add_elements(lines([event(2 * i), event(2 * i + 1)]))
    run_pipeline(
        spec,
        read=stream.advance_watermark_to_infinity(),
        streaming=True,
        options=fast(clock=lambda: 0.0, flush_deadline_s=4.5),
    )
    assert len(endpoint.accepted) == 8 and len(endpoint.requests) == 4
    assert _clients_built() - before == 1


def _clients_built() -> int:
    return getattr(connection, "_test_built", 0)


@pytest.fixture(autouse=True)
def _count_clients(monkeypatch):
    original = SegmentHttp.__init__

    def counting(self, *args, **kwargs):
        connection._test_built = getattr(connection, "_test_built", 0) + 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(SegmentHttp, "__init__", counting)


# -- progress -----------------------------------------------------------------------------------------
def test_progress_is_logged_while_a_run_delivers(endpoint, caplog):
    spec = spec_for(endpoint.url, flush_at=5)
    with caplog.at_level(logging.INFO, logger="segment_api.progress"):
        run_pipeline(spec, [event(i) for i in range(40)], options=fast(progress_interval_s=1e-6))
    progress = [r.getMessage() for r in caplog.records if r.name == "segment_api.progress"]
    assert progress and all("delivery to Segment so far" in line for line in progress)
    assert len(progress) < 10  # a line per batch at most, never per event
    assert "events delivered" in progress[-1] and "requests" in progress[-1]
