"""The send layer (segment_api/http.py) against the local endpoint: the SDK's wire form,
headers and auth; its retry policy with Retry-After / X-RateLimit-Reset; gzip; endpoint-wide
errors (401/403/404, redirects) that blame no event; and the write key kept out of every error."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from support import ONE_OF_EACH_CALL, ONE_OF_EACH_CALL_IDS, WRITE_KEY, client_built, event, fast, spec_for

from decide.secrets import REDACTED, redact_secret
from decide.wire import EventMessages
from local_segment import LocalSegment, redirect, status
from segment_api.connection import SegmentConnection
from segment_api.http import USER_AGENT, EndpointConfigError

TS = "2026-01-01T00:00:00.000+00:00"


def one(message_id: str, **fields) -> EventMessages:
    return EventMessages(
        {"id": message_id},
        [
            {
                "type": "track",
                "anonymousId": "a-1",
                "event": "Tested",
                "messageId": message_id,
                "timestamp": TS,
                **fields,
            }
        ],
    )


def send(endpoint_url: str, deliveries: list[EventMessages], **settings):
    connection = SegmentConnection(spec_for(endpoint_url, **settings).settings, fast())
    try:
        return connection.send(deliveries, "default")
    finally:
        connection.close()


@pytest.mark.parametrize("message", ONE_OF_EACH_CALL, ids=ONE_OF_EACH_CALL_IDS)
def test_each_call_arrives_as_the_sdk_client_would_send_it(endpoint, message):
    message = {**message, "messageId": f"wire:{message['type']}", "timestamp": TS}
    result = send(endpoint.url, [EventMessages({"id": "w"}, [message])])
    assert len(result.delivered) == 1
    [received] = endpoint.accepted
    assert received == client_built(message)  # context.library, the null fields, everything
    [request] = endpoint.requests
    assert (request.user_agent, request.auth, request.content_type) == (USER_AGENT, "ok", "application/json")
    assert request.retry_count is None and request.content_encoding is None
    assert endpoint.records[0]["sentAt"]  # the envelope's sentAt, set when sent


def test_gzip_compresses_the_body_and_is_off_by_default(endpoint):
    send(endpoint.url, [one("plain:1")])
    send(endpoint.url, [one(f"gz:{i}", properties={"text": "walkerOS " * 50}) for i in range(20)], gzip=True)
    plain, zipped = endpoint.requests
    assert plain.content_encoding is None
    assert zipped.content_encoding == "gzip" and zipped.raw_bytes < zipped.decoded_bytes / 5
    assert zipped.accepted == 20 and zipped.auth == "ok"


def test_retry_after_is_waited_and_not_counted_as_a_retry(endpoint, retry_waits):
    endpoint.script(status(503, retry_after=1), status(429, retry_after=1))
    result = send(endpoint.url, [one("ra:1")], max_retries=0, timeout_ms=5_000)
    assert [d.event["id"] for d in result.delivered] == ["ra:1"]
    assert [(r.status, r.retry_count) for r in endpoint.requests] == [(503, None), (429, 1), (200, 2)]
    assert retry_waits == [1.0, 1.0]  # each Retry-After, no backoff of its own


def test_x_ratelimit_reset_is_honoured_without_retry_after(endpoint, retry_waits):
    endpoint.script(status(429, headers={"X-RateLimit-Reset": "1"}))
    result = send(endpoint.url, [one("rl:1")], max_retries=0, timeout_ms=5_000)
    assert len(result.delivered) == 1
    first, second = endpoint.requests
    assert (first.status, second.status) == (429, 200) and retry_waits == [1.0]


def test_a_wait_beyond_the_deadline_fails_the_batch_at_once(endpoint, retry_waits):
    endpoint.script(status(429, retry_after=120))
    result = send(endpoint.url, [one("late:1")], max_retries=3)
    assert retry_waits == [] and len(endpoint.requests) == 1  # no wait at all: given up at once
    [(_, dead)] = result.failed
    assert (dead.reason, dead.http_status) == ("delivery_failed", 429) and "120" in dead.error


def test_backoff_grows_and_max_retries_bounds_the_attempts(endpoint, retry_waits):
    endpoint.fail_next(4, status(500))
    result = send(endpoint.url, [one("bo:1")], max_retries=3, timeout_ms=5_000)
    assert [r.retry_count for r in endpoint.requests] == [None, 1, 2, 3]
    # The SDK's schedule: at once, then 0.5 s, then 1 s, each + up to 10% jitter.
    assert len(retry_waits) == 3 and retry_waits[0] == 0
    assert 0.5 <= retry_waits[1] <= 0.55 and 1.0 <= retry_waits[2] <= 1.1
    [(_, dead)] = result.failed
    assert (dead.reason, dead.http_status) == ("delivery_failed", 500)


# -- endpoint-wide errors --------------------------------------------------------------------------
@pytest.mark.parametrize("code, cause", [(401, "writeKey"), (403, "region host"), (404, "check host")])
def test_an_endpoint_wide_refusal_blames_no_event(endpoint, code, cause):
    endpoint.script(status(code))
    with pytest.raises(EndpointConfigError) as raised:
        send(endpoint.url, [one("ep:1"), one("ep:2")])
    message = str(raised.value)
    assert f"HTTP {code}" in message and endpoint.url in message and cause in message
    assert "\n" not in message and WRITE_KEY not in message
    assert len(endpoint.requests) == 1  # not retried, not bisected


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_nor_counted_as_success(endpoint, code):
    endpoint.script(redirect(code, "https://events.eu1.segmentapis.com/v1/batch"))
    with pytest.raises(EndpointConfigError) as raised:
        send(endpoint.url, [one(f"redir:{code}")])
    message = str(raised.value)
    assert f"HTTP {code}" in message and "https://events.eu1.segmentapis.com/v1/batch" in message
    assert "set host to https://events.eu1.segmentapis.com" in message
    assert [r.method for r in endpoint.requests] == ["POST"] and not endpoint.accepted


def test_a_batch_run_with_a_refused_key_sends_one_request_and_fails_fast(tmp_path, capsys):
    from pipeline import cli

    with LocalSegment("the-right-key", strict=True) as strict:
        url = strict.url
        flow = tmp_path / "flow.json"
        from support import flow_document

        flow.write_text(json.dumps(flow_document({"flushAt": 5, "maxRetries": 3}, host=strict.url)))
        events = tmp_path / "events.jsonl"
        events.write_text("\n".join(json.dumps(event(i)) for i in range(40)) + "\n")
        started = time.monotonic()
        code = cli.main(
            [
                "run",
                "--flow",
                str(flow),
                "--input",
                str(events),
                "--dead_letter",
                str(tmp_path / "dead"),
                "--progress_interval_seconds",
                "0",
            ]
        )
        elapsed = time.monotonic() - started
        err = capsys.readouterr().err
        assert code != 0 and elapsed < 60
        assert len(strict.requests) == 1 and strict.requests[0].status == 401
    lines = [line for line in err.splitlines() if "HTTP 401" in line]
    assert len(lines) == 1 and url in lines[0] and "writeKey" in lines[0]
    assert "Traceback" not in err and WRITE_KEY not in err
    assert not list(tmp_path.glob("dead*"))  # no dead letters: the input is still there to run again


def test_the_message_survives_a_runner_that_rewraps_it():
    from pipeline import cli

    error = EndpointConfigError(401, "http://h", "HTTP 401: unknown write key", "check writeKey")
    # As the FnApiRunner re-raises a step's error: the step appended, the original as context.
    rewrapped = RuntimeError(f"{error} [while running 'SendToSegment/ParDo(BatchAndSend)']")
    rewrapped.__context__ = error
    assert cli.describe_failure(rewrapped) == f"{error} (in step 'SendToSegment/ParDo(BatchAndSend)')"


# -- the write key in error texts --------------------------------------------------------------------
def test_an_echoed_key_never_reaches_a_dead_letter_in_any_form(endpoint):
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    echo = {
        "code": "bad_request",
        "message": f"refused key {WRITE_KEY} ({json.dumps({'k': WRITE_KEY})}) Authorization: Basic {basic}",
    }
    endpoint.script(status(400, body=echo))
    result = send(endpoint.url, [one("echo:1")])
    [(_, dead)] = result.failed
    assert dead.reason == "rejected" and "refused key" in dead.error and "Authorization: Basic" in dead.error
    assert WRITE_KEY not in dead.to_json() and basic not in dead.to_json() and basic.rstrip("=") not in dead.to_json()


def test_a_one_character_key_does_not_mangle_messages():
    text = "HTTP 400 max_exceeded: expected x-ray; key x refused, Basic eDo= given"
    assert (
        redact_secret(text, "x")
        == f"HTTP 400 max_exceeded: expected x-ray; key {REDACTED} refused, Basic {REDACTED} given"
    )
    assert redact_secret("exceeded the index", "x") == "exceeded the index"
    assert redact_secret('{"writeKey":"a\\"b"}', 'a"b') == f'{{"writeKey":"{REDACTED}"}}'


def test_a_one_character_key_run_reads_correctly(tmp_path):
    """With the write key ``x``, a refused event's dead letter still reads as Segment wrote it."""
    with LocalSegment("x") as server:
        server.reject_when(lambda m: True, message="max payload exceeded for this index")
        connection = SegmentConnection(spec_for(server.url, writeKey="x").settings, fast())
        try:
            result = connection.send([one("short:1")], "default")
        finally:
            connection.close()
    [(_, dead)] = result.failed
    assert "max payload exceeded for this index" in dead.error


@pytest.mark.parametrize(
    "extra", [[], ["--runner", "BundleBasedDirectRunner"], ["--input_subscription", "projects/p/subscriptions/s"]]
)
def test_fail_bundle_on_delivery_error_is_refused_where_bundles_are_not_retried(extra, capsys):
    from pipeline import cli

    examples = Path(__file__).resolve().parent.parent / "examples"
    events = ["--input", str(examples / "events.jsonl")]
    argv = [
        "run",
        "--flow",
        str(examples / "flow.json"),
        "--dead_letter_topic",
        "projects/p/topics/d",
        "--fail_bundle_on_delivery_error",
        *(extra or events),
    ]
    if extra and extra[0] == "--runner":
        argv += events
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--fail_bundle_on_delivery_error needs a runner that retries failed bundles" in err
    assert "Traceback" not in err


def test_a_worker_process_error_is_its_first_line_only():
    from pipeline import cli

    error = EndpointConfigError(401, "http://h", "HTTP 401: unknown write key", "check writeKey")
    # With --direct_running_mode=multi_processing the worker's error arrives as text, traceback and all.
    text = (
        f"segment_api.http.EndpointConfigError: {error} [while running 'SendToSegment/ParDo(BatchAndSend)']\n"
        'Traceback (most recent call last):\n  File "/work/transforms/send.py", line 188, in process\n'
        f"    yield from self._submit(batch)\nsegment_api.http.EndpointConfigError: {error}"
    )
    assert cli.describe_failure(RuntimeError(text)) == f"{error} (in step 'SendToSegment/ParDo(BatchAndSend)')"
    # The layout the FnApiRunner raises: the traceback first, the error last.
    text = (
        'Traceback (most recent call last):\n  File "apache_beam/runners/common.py", line 1512, in process\n'
        f"segment_api.http.EndpointConfigError: {error}\n\nDuring handling of the above exception, another "
        'exception occurred:\n\nTraceback (most recent call last):\n  File "/work/transforms/send.py", line 1\n'
        f"    yield from self._submit(batch)\nRuntimeError: segment_api.http.EndpointConfigError: {error} "
        "[while running 'SendToSegment/ParDo(BatchAndSend)']\n"
    )
    assert cli.describe_failure(RuntimeError(text)) == f"{error} (in step 'SendToSegment/ParDo(BatchAndSend)')"
