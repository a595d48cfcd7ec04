"""The local Segment endpoint, driven by the real segment-analytics-python 2.4.0 SDK.

Nothing is mocked: every test sends HTTP over loopback, either through ``segment.analytics.Client``
or, for what the SDK refuses to send (oversized messages, missing keys, bad gzip), raw with
``http.client``.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from segment.analytics import Client

from local_segment import (
    LocalSegment,
    bad_request_when,
    delay,
    empty_2xx,
    main,
    reset,
    status,
)

REPO = Path(__file__).resolve().parents[1]
WRITE_KEY = "wk-test-0123456789"
EVENT_TIME = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    # A proxy from the environment must never see loopback traffic (the SDK honours HTTP(S)_PROXY).
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server():
    with LocalSegment(WRITE_KEY) as srv:
        yield srv


class Sdk:
    """The real SDK client, with short timings so failure paths finish in well under a second."""

    def __init__(self, url: str, write_key: str = WRITE_KEY, **options):
        self.errors: list[tuple[Exception, list]] = []
        settings = {"thread": 1, "max_retries": 1, "timeout": 2, "upload_interval": 0.05, "upload_size": 100}
        settings.update(options)
        self.client = Client(write_key, host=url, on_error=self._on_error, **settings)

    def _on_error(self, exc, batch):
        self.errors.append((exc, batch))


@pytest.fixture
def sdk_clients():
    made: list[Sdk] = []

    def make(target: LocalSegment | str, write_key=WRITE_KEY, **options) -> Sdk:
        sdk = Sdk(target.url if isinstance(target, LocalSegment) else target, write_key, **options)
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        sdk.client.join()


def track(sdk: Sdk, n: int = 1, **fields) -> list[str]:
    """Queue ``n`` track calls and flush; returns their messageIds."""
    ids = []
    for i in range(n):
        message_id = fields.get("message_id") or f"msg-{uuid.uuid4()}"
        ok, _ = sdk.client.track(
            user_id=fields.get("user_id", "user-1"),
            event=fields.get("event", "Order Completed"),
            properties=fields.get("properties", {"i": i}),
            timestamp=EVENT_TIME,
            message_id=message_id,
        )
        assert ok
        ids.append(message_id)
    sdk.client.flush()
    return ids


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def post(srv: LocalSegment, path: str, body, headers: dict | None = None, conn=None, method="POST"):
    """A raw request; returns (status, parsed JSON body or text). Reuses ``conn`` when given."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent_headers = {"Content-Type": "application/json", "Authorization": basic(WRITE_KEY)}
    sent_headers.update(headers or {})
    sent_headers = {k: v for k, v in sent_headers.items() if v is not None}
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, srv.path_prefix + path, body=data, headers=sent_headers)
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        if own:
            conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def message(i: int = 0, **overrides) -> dict:
    msg = {
        "type": "track",
        "userId": "user-1",
        "event": "Product Viewed",
        "properties": {"i": i},
        "timestamp": "2024-05-01T12:00:00.000Z",
        "messageId": f"raw-{i}-{uuid.uuid4()}",
    }
    msg.update(overrides)
    return {k: v for k, v in msg.items() if v is not ...}


def batch(*messages) -> dict:
    return {"batch": list(messages), "sentAt": datetime.now(timezone.utc).isoformat()}


# ---------------------------------------------------------------------------------------------
# The healthy path, with the SDK
# ---------------------------------------------------------------------------------------------


def test_sdk_batch_of_every_call_type_is_accepted_as_sent(server, sdk_clients):
    sdk = sdk_clients(server)
    c = sdk.client
    c.identify(user_id="u1", traits={"email": "a@example.com"}, timestamp=EVENT_TIME, message_id="id-identify")
    c.track(
        user_id="u1", event="Order Completed", properties={"total": 42.5}, timestamp=EVENT_TIME, message_id="id-track"
    )
    c.page(anonymous_id="anon-1", name="Home", properties={"url": "/"}, timestamp=EVENT_TIME, message_id="id-page")
    c.screen(user_id="u1", name="Settings", timestamp=EVENT_TIME, message_id="id-screen")
    c.group(user_id="u1", group_id="g1", traits={"plan": "pro"}, timestamp=EVENT_TIME, message_id="id-group")
    c.alias(previous_id="anon-1", user_id="u1", timestamp=EVENT_TIME, message_id="id-alias")
    c.flush()

    assert sdk.errors == []
    assert [m["messageId"] for m in server.accepted] == [
        "id-identify",
        "id-track",
        "id-page",
        "id-screen",
        "id-group",
        "id-alias",
    ]
    assert [m["type"] for m in server.accepted] == ["identify", "track", "page", "screen", "group", "alias"]
    for msg in server.accepted:
        assert msg["context"]["library"] == {"name": "analytics-python", "version": "2.4.0"}
        assert msg["timestamp"] == "2024-05-01T12:00:00.123+00:00"  # event time kept, ms precision
        assert "writeKey" not in msg
    track_msg = server.accepted[1]
    assert track_msg["event"] == "Order Completed" and track_msg["properties"] == {"total": 42.5}
    assert server.accepted[2]["anonymousId"] == "anon-1" and server.accepted[2]["userId"] is None
    assert server.accepted[4]["groupId"] == "g1"

    (request,) = server.requests
    assert (request.method, request.path, request.status) == ("POST", "/v1/batch", 200)
    assert request.user_agent == "analytics-python/2.4.0"
    assert request.auth == "ok" and request.retry_count is None and request.messages == 6
    assert server.counters["accepted"] == 6 and server.invalid == []


def test_records_carry_segment_clock_correction(server, sdk_clients):
    sdk = sdk_clients(server)
    track(sdk)
    (record,) = server.records
    assert record["originalTimestamp"] == "2024-05-01T12:00:00.123+00:00"
    assert record["sentAt"] is not None
    received = datetime.fromisoformat(record["receivedAt"])
    assert abs(received - datetime.now(timezone.utc)) < timedelta(seconds=5)
    # receivedAt - (sentAt - timestamp): the event time, shifted only by the loopback latency.
    corrected = datetime.fromisoformat(record["correctedTimestamp"])
    assert timedelta(0) <= corrected - EVENT_TIME < timedelta(seconds=2)


def test_same_message_id_twice_is_accepted_once(server, sdk_clients):
    sdk = sdk_clients(server)
    track(sdk, message_id="same-id")
    track(sdk, message_id="same-id", properties={"changed": True})
    assert [m["messageId"] for m in server.accepted] == ["same-id"]
    assert server.accepted[0]["properties"] == {"i": 0}  # the first one wins, as in Segment
    assert server.counters["duplicate"] == 1
    assert [(r.accepted, r.duplicates) for r in server.requests] == [(1, 0), (0, 1)]


def test_reset_keeps_dedup_memory_unless_asked(server):
    msg = message(1)
    assert post(server, "/v1/batch", batch(msg))[0] == 200
    server.reset()
    post(server, "/v1/batch", batch(msg))
    assert server.accepted == [] and server.counters["duplicate"] == 1
    server.reset(dedup=True)
    post(server, "/v1/batch", batch(msg))
    assert server.accepted == [msg]


def test_gzip_body_is_accepted(server, sdk_clients):
    sdk = sdk_clients(server, gzip=True)
    ids = track(sdk, 3)
    assert [m["messageId"] for m in server.accepted] == ids
    assert server.requests[0].content_encoding == "gzip"
    assert server.requests[0].raw_bytes < server.requests[0].decoded_bytes


def test_bad_gzip_is_400(server):
    code, body = post(server, "/v1/batch", b"not gzip at all", {"Content-Encoding": "gzip"})
    assert code == 400 and body["code"] == "invalid_gzip"


def test_gzip_is_measured_after_decompression(server):
    big = batch(*[message(i, properties={"pad": "x" * 20_000}) for i in range(30)])  # ~600 KB of JSON
    code, body = post(server, "/v1/batch", gzip.compress(json.dumps(big).encode()), {"Content-Encoding": "gzip"})
    assert code == 400 and "Exceed payload limit" in body["message"]


def test_keep_alive_is_fast(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    started = time.perf_counter()
    for i in range(200):
        assert post(server, "/v1/batch", batch(message(i)), conn=conn)[0] == 200
    elapsed = time.perf_counter() - started
    conn.close()
    assert len(server.accepted) == 200
    # Nagle plus delayed ACKs would cost ~40 ms a request (8 s here).
    assert elapsed < 2.0, elapsed


# ---------------------------------------------------------------------------------------------
# Write keys
# ---------------------------------------------------------------------------------------------


def test_missing_write_key_is_400(server):
    code, body = post(server, "/v1/batch", batch(message()), {"Authorization": None})
    assert code == 400 and body["code"] == "missing_write_key"
    assert server.requests[0].auth == "missing" and server.accepted == []


def test_body_write_key_alone_is_enough(server):
    code, _ = post(server, "/v1/batch", {**batch(message()), "writeKey": WRITE_KEY}, {"Authorization": None})
    assert code == 200 and len(server.accepted) == 1 and server.requests[0].auth == "ok"


def test_basic_and_body_keys_that_differ_are_recorded_as_mismatch():
    with LocalSegment() as srv:
        code, _ = post(srv, "/v1/batch", {**batch(message()), "writeKey": "another-key"})
        assert code == 200 and srv.requests[0].auth == "mismatch" and len(srv.accepted) == 1
    with LocalSegment(strict=True) as srv:
        code, body = post(srv, "/v1/batch", {**batch(message()), "writeKey": "another-key"})
        assert code == 401 and body["code"] == "write_key_mismatch"


def test_any_key_is_accepted_without_an_expected_key(sdk_clients):
    with LocalSegment() as srv:
        sdk = sdk_clients(srv, write_key="whatever-key")
        track(sdk, 2)
        assert len(srv.accepted) == 2 and srv.requests[0].auth == "ok"


def test_wrong_key_is_200_and_dropped_in_faithful_mode(server, sdk_clients):
    sdk = sdk_clients(server, write_key="not-the-key")
    track(sdk, 3)
    assert sdk.errors == []  # exactly why real Segment's silence is dangerous
    assert server.requests[0].status == 200 and server.requests[0].auth == "wrong_key"
    assert server.accepted == [] and server.counters["dropped:bad_write_key"] == 3


def test_wrong_key_is_401_in_strict_mode(sdk_clients):
    with LocalSegment(WRITE_KEY, strict=True) as srv:
        sdk = sdk_clients(srv, write_key="not-the-key", max_retries=3)
        ids = track(sdk, 2)
        assert [r.status for r in srv.requests] == [401]  # not retried
        assert len(sdk.errors) == 1 and [m["messageId"] for m in sdk.errors[0][1]] == ids
        assert sdk.errors[0][0].status == 401


def test_bearer_token_is_refused_unless_enabled(server):
    code, _ = post(server, "/v1/batch", {**batch(message()), "writeKey": WRITE_KEY}, {"Authorization": "Bearer tok"})
    assert code == 401
    with LocalSegment(WRITE_KEY, accept_bearer=True) as srv:
        code, _ = post(srv, "/v1/batch", {**batch(message()), "writeKey": WRITE_KEY}, {"Authorization": "Bearer tok"})
        assert code == 200 and len(srv.accepted) == 1


# ---------------------------------------------------------------------------------------------
# Request-level validation and limits
# ---------------------------------------------------------------------------------------------


def test_wrong_content_type_is_400(server):
    code, body = post(server, "/v1/batch", batch(message()), {"Content-Type": "text/plain"})
    assert code == 400 and body["code"] == "invalid_content_type"
    assert post(server, "/v1/batch", batch(message()), {"Content-Type": "application/json; charset=utf-8"})[0] == 200


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"batch": {}}', b"{}"])
def test_malformed_bodies_are_400(server, body):
    code, answer = post(server, "/v1/batch", body)
    assert code == 400 and set(answer) == {"code", "message"}


def test_oversized_message_fails_the_whole_request(server):
    small, huge = message(1), message(2, properties={"blob": "x" * 40_000})
    code, body = post(server, "/v1/batch", batch(small, huge))
    assert code == 400 and body["code"] == "payload_too_large"
    assert "Exceed payload limit" in body["message"]
    assert server.accepted == []


def test_request_over_500_kb_is_400_and_keeps_the_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    big = batch(*[message(i, properties={"pad": "y" * 25_000}) for i in range(24)])  # ~600 KB
    assert len(json.dumps(big)) > 500_000
    code, body = post(server, "/v1/batch", big, conn=conn)
    assert code == 400 and "Exceed payload limit" in body["message"]
    assert post(server, "/v1/batch", batch(message()), conn=conn)[0] == 200  # same connection
    conn.close()
    assert len(server.accepted) == 1


def test_more_than_2500_messages_accepts_the_first_2500(server):
    messages = [{"type": "track", "userId": "u", "event": "E", "messageId": f"m{i}"} for i in range(2_501)]
    code, body = post(server, "/v1/batch", batch(*messages))
    assert code == 200 and body == {"success": True}
    assert len(server.accepted) == 2_500 and server.accepted[-1]["messageId"] == "m2499"
    assert server.counters["dropped:batch_count"] == 1


def test_single_message_routes(server):
    code, body = post(server, "/v1/track", {**message(7, type=...), "writeKey": WRITE_KEY})
    assert (code, body) == (200, {"success": True})
    (msg,) = server.accepted
    assert msg["type"] == "track" and "writeKey" not in msg  # the type comes from the route
    code, body = post(server, "/v1/identify", message(8, properties=..., traits={"big": "z" * 33_000}))
    assert code == 400 and body["code"] == "payload_too_large"  # 32 KB for single routes


def test_unknown_paths_are_404_and_other_methods_405(server):
    assert post(server, "/v2/batch", batch(message()))[0] == 404
    assert post(server, "/v1/unknown", batch(message()))[0] == 404
    code, _ = post(server, "/v1/batch", b"", method="GET")
    assert code == 405
    assert server.accepted == []


def test_path_prefix(sdk_clients):
    with LocalSegment(WRITE_KEY, path_prefix="/segment/") as srv:
        assert srv.url.endswith("/segment")
        sdk = sdk_clients(srv)
        track(sdk)
        assert srv.requests[0].path == "/segment/v1/batch" and len(srv.accepted) == 1
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request(
            "POST", "/v1/batch", body=json.dumps(batch(message())), headers={"Content-Type": "application/json"}
        )
        assert conn.getresponse().status == 404
        conn.close()


# ---------------------------------------------------------------------------------------------
# Per-message problems: 200, silently dropped, recorded here
# ---------------------------------------------------------------------------------------------


def test_invalid_messages_are_recorded_and_not_accepted(server):
    cases = {
        "no_user_anon_id": message(1, userId=None),
        "missing_event": message(2, event=...),
        "invalid_type": message(3, type="purchase"),
        "missing_group_id": message(4, type="group", event=...),
        "invalid_properties": message(5, properties=[1, 2]),
        "message_id_too_long": message(6, messageId="m" * 101),
        "invalid_timestamp": message(7, timestamp="2024-05-01T12:00:00"),  # no offset
        "not_an_object": 42,
        "alias_missing_ids": message(8, type="alias", event=...),
        "invalid_consent": message(9, context={"consent": {"categoryPreferences": {"ads": "yes"}}}),
    }
    good = message(10)
    without_id = message(11, messageId=...)
    code, body = post(server, "/v1/batch", batch(*cases.values(), good, without_id))
    assert (code, body) == (200, {"success": True})
    assert [i["reason"] for i in server.invalid] == list(cases)
    assert [i["message"] for i in server.invalid] == list(cases.values())
    assert server.accepted == [good, without_id]
    assert server.records[1]["messageId"].startswith("local-segment-")  # Segment assigns one
    assert server.counters["dropped:missing_event"] == 1


def test_invalid_sent_at_drops_the_messages(server):
    code, _ = post(server, "/v1/batch", {"batch": [message(1)], "sentAt": "yesterday"})
    assert code == 200 and server.accepted == [] and server.invalid[0]["reason"] == "invalid_sent_at"


# ---------------------------------------------------------------------------------------------
# Fault injection, with the SDK's retry behaviour
# ---------------------------------------------------------------------------------------------


def test_500_then_success_is_retried_and_accepted_once(server, sdk_clients):
    server.fail_next(1, status(500))
    sdk = sdk_clients(server, max_retries=2)
    ids = track(sdk, 2)
    assert [(r.status, r.retry_count) for r in server.requests] == [(500, None), (200, 1)]
    assert server.requests[0].message_ids == ids and server.requests[0].fault == "status(500)"
    assert [m["messageId"] for m in server.accepted] == ids and sdk.errors == []
    assert server.pending_faults == 0


def test_429_with_retry_after_then_success(server, sdk_clients):
    server.script(status(429, retry_after=1))
    sdk = sdk_clients(server, max_retries=0)  # Retry-After waits are not counted retries
    ids = track(sdk)
    first, second = server.requests
    assert (first.status, second.status) == (429, 200)
    assert second.time - first.time >= 0.9
    assert [m["messageId"] for m in server.accepted] == ids and sdk.errors == []


def test_400_calls_on_error_once_and_accepts_nothing(server, sdk_clients):
    server.fail_next(1, status(400))
    sdk = sdk_clients(server, max_retries=3)
    ids = track(sdk, 3)
    assert [r.status for r in server.requests] == [400]
    assert len(sdk.errors) == 1 and [m["messageId"] for m in sdk.errors[0][1]] == ids
    assert server.accepted == []


def test_non_json_error_body(server, sdk_clients):
    server.fail_next(1, status(403, body="<html>denied</html>"))
    sdk = sdk_clients(server)
    track(sdk)
    ((exc, _),) = sdk.errors
    assert exc.status == 403 and exc.code == "unknown" and "denied" in exc.message


def test_delay_beyond_client_timeout_duplicates_requests_not_effects(server, sdk_clients):
    server.script(delay(1.0))
    sdk = sdk_clients(server, timeout=0.5, max_retries=2)
    ids = track(sdk, 2)
    first, second = server.requests
    assert first.message_ids == second.message_ids == ids  # the client sent it twice ...
    assert second.retry_count == 1 and first.accepted == 2 and second.duplicates == 2
    assert [m["messageId"] for m in server.accepted] == ids  # ... Segment kept it once
    assert server.counters["duplicate"] == 2 and sdk.errors == []


def test_reset_connection_then_success(server, sdk_clients):
    server.fail_next(1, reset())
    sdk = sdk_clients(server, max_retries=2)
    ids = track(sdk)
    assert [(r.outcome, r.status) for r in server.requests] == [("reset", None), ("answered", 200)]
    assert [m["messageId"] for m in server.accepted] == ids and sdk.errors == []


def test_reset_after_accepting_is_absorbed_by_dedup(server, sdk_clients):
    server.fail_next(1, reset(accept=True))
    sdk = sdk_clients(server, max_retries=2)
    ids = track(sdk)
    assert [r.status for r in server.requests] == [None, 200]
    assert [m["messageId"] for m in server.accepted] == ids and server.counters["duplicate"] == 1


def test_reset_is_a_real_tcp_reset(server):
    server.script(reset())
    with pytest.raises(ConnectionResetError):
        post(server, "/v1/batch", batch(message()))


def test_empty_2xx_counts_as_success(server, sdk_clients):
    server.fail_next(1, empty_2xx(202))
    sdk = sdk_clients(server)
    ids = track(sdk)
    assert [r.status for r in server.requests] == [202] and sdk.errors == []
    assert [m["messageId"] for m in server.accepted] == ids


def test_bad_message_rejects_every_batch_that_carries_it(server, sdk_clients):
    server.reject_when(lambda m: m.get("properties", {}).get("poison") is True)
    sdk = sdk_clients(server, max_retries=0)
    c = sdk.client
    for i, props in enumerate([{"n": 1}, {"poison": True}, {"n": 3}]):
        c.track(user_id="u", event="E", properties=props, message_id=f"iso-{i}", timestamp=EVENT_TIME)
    c.flush()
    assert [r.status for r in server.requests] == [400] and server.accepted == []
    ((exc, failed),) = sdk.errors
    assert len(failed) == 3 and exc.message == "Invalid message in batch"  # Segment never says which
    # Re-sending in halves, as the sink must, isolates the bad message.
    c.track(user_id="u", event="E", properties={"n": 1}, message_id="iso-0", timestamp=EVENT_TIME)
    c.flush()
    c.track(user_id="u", event="E", properties={"poison": True}, message_id="iso-1", timestamp=EVENT_TIME)
    c.track(user_id="u", event="E", properties={"n": 3}, message_id="iso-2", timestamp=EVENT_TIME)
    c.flush()
    assert [r.status for r in server.requests] == [400, 200, 400]
    server.clear_faults()
    c.track(user_id="u", event="E", properties={"n": 3}, message_id="iso-2", timestamp=EVENT_TIME)
    c.flush()
    assert [m["messageId"] for m in server.accepted] == ["iso-0", "iso-2"]


def test_scripted_bad_request_when_applies_once(server):
    server.script(bad_request_when(lambda m: m["messageId"] == "bad"))
    bad = message(1, messageId="bad")
    assert post(server, "/v1/batch", batch(message(0), bad))[0] == 400
    assert post(server, "/v1/batch", batch(bad))[0] == 200


def test_injected_headers_and_bodies_are_sent_verbatim(server):
    server.script(
        status(429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT", headers={"X-RateLimit-Reset": "5"}),
        status(502, body=["not", "an", "object"]),
    )
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("POST", "/v1/batch", body=json.dumps(batch(message())), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 429 and json.loads(response.read())["code"] == "too_many_requests"
    assert response.getheader("Retry-After") == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert response.getheader("X-RateLimit-Reset") == "5"
    assert post(server, "/v1/batch", batch(message()), conn=conn) == (502, ["not", "an", "object"])
    conn.close()
    assert server.accepted == [] and server.counters["faults"] == 2


def test_random_faults_follow_their_probability(server):
    server.fail_randomly(1.0, status(500), seed=1)
    assert post(server, "/v1/batch", batch(message(1)))[0] == 500
    server.fail_randomly(0.0, status(500))
    assert post(server, "/v1/batch", batch(message(2)))[0] == 200


def test_scripted_faults_are_consumed_once_each_under_concurrency(server):
    server.fail_next(5, status(503))
    results = []

    def send(i):
        results.append(post(server, "/v1/batch", batch(message(i)))[0])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 15 + [503] * 5
    assert len(server.accepted) == 15 and server.counters["faults"] == 5


def test_stop_drops_keep_alive_connections(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    assert post(server, "/v1/batch", batch(message()), conn=conn)[0] == 200
    server.stop()
    with pytest.raises((OSError, http.client.HTTPException)):
        post(server, "/v1/batch", batch(message(2)), conn=conn)
    conn.close()


def test_wait_until(server):
    assert server.wait_until(1, timeout=0.05) is False
    threading.Timer(0.1, post, args=(server, "/v1/batch", batch(message()))).start()
    assert server.wait_until(1, timeout=5) is True


# ---------------------------------------------------------------------------------------------
# The record file and the command line
# ---------------------------------------------------------------------------------------------


def test_record_file_holds_the_accepted_messages_and_no_write_key(tmp_path, sdk_clients):
    record = tmp_path / "received.jsonl"
    with LocalSegment(WRITE_KEY, record_path=str(record)) as srv:
        sdk = sdk_clients(srv)
        track(sdk, 4)
        post(srv, "/v1/batch", batch(message(9, writeKey=WRITE_KEY), message(10, userId=None)))
        lines = record.read_text().splitlines()  # flushed per request: readable while running
        assert len(lines) == 5
        accepted = list(srv.accepted)
    assert [json.loads(line) for line in lines] == accepted
    assert WRITE_KEY not in record.read_text()
    assert all("writeKey" not in m for m in accepted)


def _read_line(stream, timeout: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert got, "no startup line"
    return got[0]


def test_command_line_serves_until_sigint(tmp_path, sdk_clients):
    record = tmp_path / "out.jsonl"
    env = {**os.environ, "LOCAL_SEGMENT_WRITE_KEY": WRITE_KEY, "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "local_segment", "--port", "0", "--record", str(record)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc.stdout, timeout=20)
        match = re.fullmatch(
            r"local Segment endpoint listening on (http://127\.0\.0\.1:\d+) \(POST /v1/batch\); "
            r"recording accepted messages to (.+)\n",
            line,
        )
        assert match and match.group(2) == str(record), line
        sdk = sdk_clients(match.group(1))
        ids = track(sdk, 3)
        assert [json.loads(x)["messageId"] for x in record.read_text().splitlines()] == ids
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "3 accepted" in out
    assert "POST /v1/batch -> 200: 3 messages, 3 accepted" in err
    assert WRITE_KEY not in out + err + record.read_text()


def test_command_line_reports_a_busy_port(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with LocalSegment() as probe:  # SO_REUSEADDR alone must not let us share a listening port
            assert probe.port != port
        assert main(["--port", str(port), "--quiet"]) == 2
    assert "cannot listen" in capsys.readouterr().err
