"""Delivery under faults, with the real segment-analytics-python SDK against the local endpoint:
for every input event exactly one outcome, and for a delivered one exactly one accepted
messageId per call. SDK retries are kept fast (1-2 retries, a 500 ms HTTP timeout)."""

from __future__ import annotations

import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from support import (
    WRITE_KEY,
    assert_exactly_once,
    collect,
    event,
    fast,
    lines,
    planned_calls,
    request_sizes,
    run_pipeline,
    spec_for,
)

from decide.wire import EventMessages
from local_segment import LocalSegment, close, delay, reset, status
from pipeline.graph import build_pipeline
from pipeline.summary import reconcile, render
from transforms import DEAD_LETTER_TAG
from transforms.batching import BatchDeliveries
from transforms.dead_letters import ReadPreviousAttempts, WriteDeadLetters
from transforms.read import ReadEvents
from transforms.send import SendToSegment

EVENTS = [event(i) for i in range(12)]


def test_a_500_then_success_is_retried_by_the_sdk(endpoint):
    spec = spec_for(endpoint.url, max_retries=2, timeout_ms=5_000)  # only the 500 may cause a retry
    endpoint.script(status(500))
    result = run_pipeline(spec, EVENTS)

    assert_exactly_once(endpoint, result, planned_calls(spec, EVENTS))
    assert [(r.status, r.retry_count) for r in endpoint.requests] == [(500, None), (200, 1)]
    assert request_sizes(endpoint) == [12, 12] and not result.dead


def test_a_burst_of_429_with_retry_after_waits_and_delivers(endpoint):
    spec = spec_for(endpoint.url, max_retries=1, timeout_ms=5_000)
    endpoint.script(status(429, retry_after=1), status(429, retry_after=1))
    started = time.monotonic()
    result = run_pipeline(spec, EVENTS)

    assert_exactly_once(endpoint, result, planned_calls(spec, EVENTS))
    assert [r.status for r in endpoint.requests] == [429, 429, 200]
    # Rate-limited attempts do not use up maxRetries (1 here); the SDK waited Retry-After each time.
    assert endpoint.requests[2].time - endpoint.requests[0].time >= 1.9
    assert time.monotonic() - started < 10


def test_a_400_batch_is_narrowed_to_its_bad_message(endpoint):
    events = [event(i) for i in range(8)]
    events[5]["data"]["poison"] = True
    spec = spec_for(endpoint.url, timeout_ms=5_000)
    endpoint.reject_when(
        lambda m: (m.get("properties") or {}).get("poison") is True, message="Invalid message in batch: property poison"
    )
    result = run_pipeline(spec, events)

    planned = planned_calls(spec, events)
    assert_exactly_once(endpoint, result, planned, dead_ids={events[5]["id"]})
    [dead] = result.dead
    assert (dead.reason, dead.stage, dead.http_status, dead.event_id) == ("rejected", "send", 400, events[5]["id"])
    assert "Invalid message in batch: property poison" in dead.error and "HTTP 400" in dead.error
    assert dead.attempts == 1 and '"poison":true' in dead.payload
    # Halving 8 → 4+4 → 2+2 → 1+1: 7 requests, the 4 refused ones all held the bad message.
    assert len(endpoint.requests) == 7
    assert sum(r.status == 400 for r in endpoint.requests) == 4
    assert result.counts["dead_letter_rejected"] == 1 and result.counts["events_delivered"] == 7


@pytest.mark.parametrize(
    "fault",
    [
        status(503),
        status(502, body="<html>bad gateway</html>"),
        reset(),
        reset(accept=True),
        close(accept=True),
    ],
    ids=["503", "502-text", "reset", "reset-after-accepting", "close-after-accepting"],
)
def test_transient_faults_are_retried_without_duplicate_effect(endpoint, fault):
    spec = spec_for(endpoint.url, max_retries=1)
    endpoint.script(fault)
    result = run_pipeline(spec, EVENTS)

    assert_exactly_once(endpoint, result, planned_calls(spec, EVENTS))
    assert len(endpoint.requests) == 2 and not result.dead


def test_latency_beyond_the_client_timeout_duplicates_requests_not_effects(endpoint):
    spec = spec_for(endpoint.url, max_retries=2, timeout_ms=400)
    endpoint.script(delay(1.0))  # accepted at once, answered after the client gave up
    result = run_pipeline(spec, EVENTS)

    assert_exactly_once(endpoint, result, planned_calls(spec, EVENTS))
    assert endpoint.counters["duplicate"] == len(EVENTS)  # the retry carried the same messageIds
    assert len(endpoint.accepted) == len(EVENTS)
    assert endpoint.requests[0].accepted == len(EVENTS) and endpoint.requests[1].duplicates == len(EVENTS)


def test_retries_used_up_give_delivery_failed_dead_letters(endpoint):
    spec = spec_for(endpoint.url, max_retries=1)
    endpoint.fail_next(2, status(503))
    result = run_pipeline(spec, EVENTS)

    assert_exactly_once(endpoint, result, planned_calls(spec, EVENTS), dead_ids={e["id"] for e in EVENTS})
    assert {(d.reason, d.http_status) for d in result.dead} == {("delivery_failed", 503)}
    assert len(endpoint.requests) == 2  # the first try and maxRetries=1 retry
    assert result.counts["dead_letter_delivery_failed"] == len(EVENTS)


def test_fail_bundle_on_delivery_error_raises_instead_of_dead_lettering(endpoint):
    spec = spec_for(endpoint.url, max_retries=0)
    endpoint.fail_next(1, status(500))
    with pytest.raises(Exception, match="could not be delivered to Segment; failing the bundle"):
        run_pipeline(spec, EVENTS, options=fast(fail_bundle_on_error=True))


def test_a_dead_endpoint_then_replay_delivers_everything_once(endpoint, tmp_path):
    dead_server = LocalSegment(WRITE_KEY).start()
    dead_url = dead_server.url
    dead_server.stop()  # nothing listens there any more: connection refused
    inputs = [*EVENTS, "not json at all {"]

    first = run_pipeline(spec_for(dead_url), inputs, dead_letter_sink=WriteDeadLetters(str(tmp_path / "run1/dead")))
    assert {d.reason for d in first.dead} == {"delivery_failed", "not_json"} and not first.delivered
    assert all(d.attempts == 1 for d in first.dead)

    # Replay against the dead endpoint again: failing a second time counts a second attempt.
    second = run_pipeline(
        spec_for(dead_url),
        read=ReadEvents(str(tmp_path / "run1/dead*"), "dead_letter"),
        previous_attempts=ReadPreviousAttempts(str(tmp_path / "run1/dead*")),
        dead_letter_sink=WriteDeadLetters(str(tmp_path / "run2/dead")),
    )
    assert len(second.dead) == len(inputs) and all(d.attempts == 2 for d in second.dead)
    assert second.counts["dead_letters_failed_again"] == len(inputs)

    # Replay against a healthy endpoint, through the whole pipeline: everything delivered once.
    spec = spec_for(endpoint.url)
    third = run_pipeline(
        spec,
        read=ReadEvents(str(tmp_path / "run2/dead*"), "dead_letter"),
        previous_attempts=ReadPreviousAttempts(str(tmp_path / "run2/dead*")),
    )
    assert_exactly_once(endpoint, third, planned_calls(spec, EVENTS))
    [still_bad] = third.dead  # the input that is not JSON stays what it was, never wrapped
    assert (still_bad.reason, still_bad.payload, still_bad.attempts) == ("not_json", "not json at all {", 3)
    assert reconcile(third.counts).balanced


def test_delivered_plus_dead_lettered_plus_dropped_equals_the_inputs(endpoint):
    too_big = event(20, data={"blob": "x" * 40_000})
    poison = event(21, data={"poison": True})
    inputs = lines(
        [
            *[event(i) for i in range(10)],  # 10 delivered
            [event(30), event(31), "not an event"],  # an envelope: 2 events + 1 bad item
            "{not json",  # 1 input, never an event
            event(40, name="debug ping"),  # ignored by a rule
            event(41, consent={"analytics": False}),  # consent denied
            event(42, user={}),  # no identity
            too_big,
            poison,  # too_large, rejected
            {"name": "noaction", "id": "de11000000000099"},  # invalid name
        ]
    )
    mapping = {"*": {"*": {"data": "data"}}, "debug": {"*": {"ignore": True}}}
    # The destination requires analytics consent; the collector grants it unless an event says no.
    spec = spec_for(
        endpoint.url,
        mapping=mapping,
        config={"consent": {"analytics": True}},
        collector={"consent": {"analytics": True}},
    )
    endpoint.reject_when(lambda m: (m.get("properties") or {}).get("poison") is True)
    result = run_pipeline(spec, inputs, options=fast(shards=3))

    counts = result.counts
    check = reconcile(counts)
    assert check.balanced, check.line()
    assert counts["inputs_read"] == 18  # 18 inputs ...
    assert check.units == 20  # ... of 20 units: the envelope held 3 parts
    assert (check.delivered, check.dead_lettered, check.dropped) == (12, 6, 2)
    assert counts["dead_letters_stage_parse"] == 3 and counts["dead_letters_stage_send"] == 2
    assert counts["events_ignored"] == 1 and counts["events_consent_denied"] == 1
    assert sorted(d.reason for d in result.dead) == sorted(
        ["not_an_event", "not_json", "invalid_name", "no_identity", "too_large", "rejected"]
    )
    table = render(counts)
    assert "delivered 12 + dead-lettered 6 + dropped 2 = 20" in table and "balanced" in table


# -- a bundle's events reach Segment before the bundle can commit ---------------------------------
ENDPOINTS: dict[str, LocalSegment] = {}
FINISHED: list[tuple[int, bool]] = []  # (calls sent in the bundle, all of them at the endpoint)


class _ArrivedAlready(beam.DoFn):
    """Downstream of SendToSegment: at the moment a delivered event is emitted (inside
    SendToSegment.process, so before its bundle can finish), its calls are at the endpoint."""

    def __init__(self, url: str):
        self.url = url

    def process(self, delivery):
        accepted = {m["messageId"] for m in ENDPOINTS[self.url].accepted}
        yield all(m["messageId"] in accepted for m in delivery.messages)


class _SendAndCheckOnFinish(SendToSegment):
    """SendToSegment whose finish_bundle checks that everything it was given already arrived."""

    def start_bundle(self):
        self._seen = []

    def process(self, batch, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        batch = list(batch)
        self._seen.extend(m["messageId"] for d in batch for m in d.messages)
        yield from super().process(batch, timestamp, window)

    def finish_bundle(self):
        yield from super().finish_bundle()  # batches still on the wire settle here
        accepted = {m["messageId"] for m in ENDPOINTS[self.settings.host].accepted}
        FINISHED.append((len(self._seen), all(i in accepted for i in self._seen)))


def _as_delivery(e: dict) -> EventMessages:
    return EventMessages(
        e,
        [
            {
                "type": "track",
                "anonymousId": "a",
                "event": "x",
                "messageId": f"fin:{e['id']}",
                "timestamp": "2026-01-01T00:00:00.000+00:00",
            }
        ],
    )


def test_a_bundles_events_reach_the_endpoint_before_the_bundle_finishes(endpoint):
    ENDPOINTS[endpoint.url] = endpoint
    FINISHED.clear()
    try:
        spec = spec_for(endpoint.url, flush_at=5, identify=True)
        events = [event(i, user={"session": f"s-{i % 4}", "email": f"u{i % 4}@example.com"}) for i in range(30)]
        arrived: dict = {}
        p = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([]))
        outputs = build_pipeline(p, spec, streaming=False, read=beam.Create(lines(events)), send_options=fast(shards=2))
        collect(outputs.delivered | beam.ParDo(_ArrivedAlready(endpoint.url)), arrived, "arrived")
        # The same check at finish_bundle, on a SendToSegment of its own.
        (
            p
            | "Again" >> beam.Create([event(100 + i) for i in range(7)])
            | "Calls" >> beam.Map(_as_delivery)
            | "Batch" >> BatchDeliveries(3, fast())
            | "SendChecked"
            >> beam.ParDo(_SendAndCheckOnFinish(spec.settings, "default", fast())).with_outputs(
                DEAD_LETTER_TAG, main="delivered"
            )
        )
        p.run().wait_until_finish()
        assert len(arrived["arrived"]) == 30 and all(arrived["arrived"])
        assert FINISHED and all(ok for _, ok in FINISHED) and sum(n for n, _ in FINISHED) == 7
    finally:
        ENDPOINTS.pop(endpoint.url, None)
