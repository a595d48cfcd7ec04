"""Batching: cut at flushAt, before the request limits (2,500 messages, 450 KB as the SDK
serialises), the calls of one event never split and in order. Batch runs cut batches within the
bundle (BatchAndSend, the last one in finish_bundle); streaming gathers them in Beam state
(BatchDeliveries), flushed after flushInterval and at the end of the window."""

from __future__ import annotations

import json
import statistics

import orjson
import pytest
from apache_beam.testing import test_stream
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from support import (
    ONE_OF_EACH_CALL,
    ONE_OF_EACH_CALL_IDS,
    assert_exactly_once,
    client_built,
    event,
    fast,
    lines,
    planned_calls,
    request_sizes,
    run_pipeline,
    spec_for,
)

from decide.wire import (
    LIBRARY,
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    EventMessages,
    encode_message,
    exceeds_request_limits,
    json_text_size,
    split_batches,
)


def delivery(i: int, calls: int = 1, blob: int = 0) -> EventMessages:
    messages = [
        {
            "type": "track",
            "anonymousId": f"s-{i}",
            "event": "e",
            "messageId": f"m:{i}:{c}",
            "timestamp": "2026-01-01T00:00:00.000+00:00",
            "properties": {"blob": "x" * blob},
        }
        for c in range(calls)
    ]
    return EventMessages({"id": str(i)}, messages)


# -- the rules, without Beam ---------------------------------------------------------------------
def test_flush_at_counts_calls_and_never_splits_an_event():
    batches = list(split_batches([delivery(i, calls=2) for i in range(7)], flush_at=5))
    # 2+2 = 4 < 5, +2 = 6 >= 5: flush; an event's two calls always travel together.
    assert [sum(len(d.messages) for d in b) for b in batches] == [6, 6, 2]
    assert [[d.event["id"] for d in b] for b in batches] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]


def test_the_request_limits_cut_before_flush_at():
    # Tiny messages (sizes set by hand: through the SDK, whose own fields take ~170 bytes a
    # message, 450 KB is always reached before 2,500 messages).
    tiny = [EventMessages({"id": str(i)}, [{"messageId": str(i)}], size=50) for i in range(MAX_BATCH_MESSAGES + 10)]
    assert [len(b) for b in split_batches(tiny, flush_at=10**6)] == [MAX_BATCH_MESSAGES, 10]
    big = [delivery(i, blob=20_000) for i in range(50)]
    cut = list(split_batches(big, flush_at=10**6))
    assert all(sum(d.measure() for d in b) <= MAX_BATCH_BYTES for b in cut)
    assert len(cut) == 3 and sum(len(b) for b in cut) == 50
    assert exceeds_request_limits(MAX_BATCH_MESSAGES - 1, 0, 2, 0)
    assert not exceeds_request_limits(MAX_BATCH_MESSAGES - 1, 0, 1, 0)
    assert exceeds_request_limits(1, MAX_BATCH_BYTES - 10, 1, 11)


@pytest.mark.parametrize("message", ONE_OF_EACH_CALL, ids=ONE_OF_EACH_CALL_IDS)
def test_the_size_estimate_is_never_below_what_the_sdk_measures(message):
    """The SDK measures json.dumps of the message it builds (context.library, null fields, escaped
    non-ASCII); the estimate must never be below it (or a request could pass 500 KB), and close."""
    message = {**message, "messageId": "m", "timestamp": "2026-01-01T00:00:00.000+00:00"}
    sdk_size = len(json.dumps(client_built(message)))
    # Close: ':' and ',' inside strings (the timestamp's, say) count as separators too.
    assert 0 <= encode_message(message)[1] - sdk_size <= 16 + sdk_size // 50


def _nested(children):
    """Lists and objects of the values below (Hypothesis's extend for recursive JSON)."""
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    _nested,
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None)
@given(_JSON_VALUES)
@example(1e-09)
@example([1.5e-07, 1e-05, 1e22, "\x7f", "é✓😀", {"a:b": "c,d"}])
def test_the_fast_json_size_is_never_below_json_dumps(value):
    """Batches are cut on this measure: below the truth, a request could pass Segment's 500 KB."""
    try:
        written = orjson.dumps(value)
    except TypeError:  # a lone surrogate, which no mapping output holds
        assume(False)
    exact = len(json.dumps(value))
    assert exact <= json_text_size(written) <= exact * 2 + 16


def test_the_library_version_is_the_installed_sdks():
    from segment.analytics.version import VERSION

    assert LIBRARY == {"name": "analytics-python", "version": VERSION}


# -- in Beam, batch ------------------------------------------------------------------------------
def test_flush_at_is_respected_with_a_saturating_input(endpoint):
    spec = spec_for(endpoint.url, flush_at=10, timeout_ms=5_000)  # no timeout retry may add requests
    events = [event(i) for i in range(300)]
    result = run_pipeline(spec, events, options=fast(shards=4))

    assert_exactly_once(endpoint, result, planned_calls(spec, events))
    sizes = request_sizes(endpoint)
    assert max(sizes) == 10 and sum(sizes) == 300
    assert len(sizes) <= 30 + 4  # full batches, plus at most a few partial ones (one per bundle)
    assert statistics.mean(sizes) >= 300 / 34
    assert result.counts["requests_to_segment"] == len(sizes)


def test_a_flush_at_beyond_the_limits_is_cut_by_them(endpoint):
    spec = spec_for(endpoint.url, flush_at=5000, timeout_ms=10_000)  # big requests: no client timeout
    events = [event(i) for i in range(1_800)]
    result = run_pipeline(spec, events)

    sizes = request_sizes(endpoint)
    assert sum(sizes) == 1_800 and len(sizes) >= 2 and max(sizes) <= MAX_BATCH_MESSAGES
    assert all(r.status == 200 and r.raw_bytes < 500_000 for r in endpoint.requests)
    assert max(r.raw_bytes for r in endpoint.requests) > 400_000  # filled up to the byte limit
    assert len(result.delivered) == len(events) and not endpoint.counters["dropped:batch_count"]


def test_no_request_passes_the_size_limit(endpoint):
    spec = spec_for(endpoint.url, flush_at=1000, timeout_ms=10_000)
    events = [event(i, data={"blob": "é" * 4_000}) for i in range(40)]  # ~24 KB each as the SDK writes it
    result = run_pipeline(spec, events)

    assert_exactly_once(endpoint, result, planned_calls(spec, events))
    assert request_sizes(endpoint) == [18, 18, 4]  # one request per batch: the SDK never cut one
    assert result.counts["requests_to_segment"] == 3
    assert all(r.status == 200 and r.raw_bytes < 500_000 for r in endpoint.requests)


def test_the_calls_of_one_event_are_never_split_and_stay_in_order(endpoint):
    spec = spec_for(endpoint.url, flush_at=3, identify=True, timeout_ms=5_000)
    events = [event(i, user={"session": f"s-{i % 7}", "email": f"{i}@example.com"}) for i in range(40)]
    result = run_pipeline(spec, events, options=fast(shards=3))

    planned = planned_calls(spec, events)
    assert_exactly_once(endpoint, result, planned)
    where = {}
    for request in endpoint.requests:
        for position, message_id in enumerate(request.message_ids):
            where[message_id] = (request.index, position)
    for event_id, message_ids in planned.items():
        assert len({where[m][0] for m in message_ids}) == 1, event_id  # one request
        assert [where[m][1] for m in message_ids] == sorted(where[m][1] for m in message_ids)  # in order
    assert all(2 <= n <= 4 for n in request_sizes(endpoint)[:-3])  # flushAt 3 reached by whole events


def test_the_bundle_based_runner_flushes_everything_at_the_end(endpoint):
    """Its bundles are small: each bundle's partial last batch is sent when the bundle finishes."""
    spec = spec_for(endpoint.url, flush_at=7)
    events = [event(i) for i in range(30)]
    result = run_pipeline(spec, events, options=fast(shards=2), runner="BundleBasedDirectRunner")
    assert_exactly_once(endpoint, result, planned_calls(spec, events))


# -- in Beam, streaming (TestStream) ----------------------------------------------------------------
def _stream(spec, stream: test_stream.TestStream) -> None:
    # Under TestStream processing time starts at 0: the batching clock must say so too.
    run_pipeline(spec, read=stream, streaming=True, options=fast(clock=lambda: 0.0))


def test_streaming_the_flush_interval_timer_sends_a_partial_batch(endpoint):
    spec = spec_for(endpoint.url, flush_at=100, flush_interval=2_000, timeout_ms=5_000)
    first, second = lines([event(i) for i in range(3)]), lines([event(i) for i in range(3, 5)])
    _stream(
        spec,
        test_stream.TestStream()
        .add_elements(first)
        .advance_processing_time(3)  # past flushInterval: the 3 waiting events leave
        .add_elements(second)
        .advance_watermark_to_infinity(),
    )
    assert request_sizes(endpoint) == [3, 2]
    assert len(endpoint.accepted) == 5


def test_streaming_without_the_interval_passing_the_batch_waits(endpoint):
    spec = spec_for(endpoint.url, flush_at=100, flush_interval=2_000, timeout_ms=5_000)
    _stream(
        spec,
        test_stream.TestStream()
        .add_elements(lines([event(i) for i in range(3)]))
        .advance_processing_time(1)  # less than flushInterval
        .add_elements(lines([event(i) for i in range(3, 5)]))
        .advance_watermark_to_infinity(),
    )
    assert request_sizes(endpoint) == [5]  # one batch, flushed at the end of the window
