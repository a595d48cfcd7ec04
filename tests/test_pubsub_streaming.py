"""Streaming from Pub/Sub, end to end, against the real Pub/Sub emulator (started and stopped
here) and the local Segment endpoint: the pipeline runs in streaming mode on the DirectRunner
(BundleBasedDirectRunner), exactly as ``walkeros-segment run --input_subscription ...`` builds it.

The streaming DirectRunner never finishes by itself and its Pub/Sub pull blocks about 30 s on
an idle subscription; a heartbeat message (attribute ``walkeros_heartbeat``, dropped by
ReadEvents) makes the pull in flight return, so ``cancel()`` is immediate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import emulators
import orjson
import pytest
from support import (
    CONSENT,
    T0,
    WRITE_KEY,
    RunWatch,
    poll_until,
    stop_local_streaming,
    streaming_flow,
    strip_sdk_fields,
    timed_event,
)

from decide.destination import compiled
from pipeline import cli
from pipeline.explain import explain_payloads
from transforms.read import HEARTBEAT_ATTRIBUTE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLOW = str(ROOT / "examples" / "flow.json")
NAMESPACE = "streaming-test"


ANNA = {"session": "s-anna", "email": "anna@example.com"}
BEN = {"session": "s-ben"}
CARL = {"id": "carl-7", "session": "s-carl"}
DORA = {"session": "s-dora"}

# Phase 1: every envelope form, invalid inputs, a dropped-by-policy event each way.
PHASE_1 = [
    # one event object
    json.dumps(
        timed_event(
            "page view", "e000000000000001", 0, ANNA, data={"id": "/", "title": "Home"}, globals={"pagegroup": "home"}
        )
    ),
    # a JSON array of events (one user: order inside a message is kept)
    json.dumps(
        [
            timed_event("product view", "e000000000000002", 1, BEN, data={"id": "p1", "name": "Cap", "price": 42}),
            timed_event(
                "product add", "e000000000000003", 2, BEN, data={"id": "p1", "name": "Cap", "price": 42, "quantity": 2}
            ),
        ]
    ),
    # the multi-event envelope {"batch": [...]}
    json.dumps(
        {
            "batch": [
                timed_event(
                    "order complete",
                    "e000000000000004",
                    3,
                    CARL,
                    data={"id": "o-1", "total": 84, "currency": "EUR"},
                    nested=[{"entity": "product", "data": {"id": "p1", "name": "Cap", "price": 42}}],
                ),
                timed_event(
                    "user login",
                    "e000000000000005",
                    4,
                    DORA,
                    data={"user_id": "dora-1", "email": "dora@example.com", "plan": "pro"},
                ),
                {"name": "broken", "id": "e000000000000006"},  # invalid_name, inside an envelope
            ]
        }
    ),
    "this is not json {",  # not_json
    json.dumps(timed_event("product view", "e000000000000007", 5, {}, data={"id": "p2"})),  # no_identity
    json.dumps(timed_event("debug ping", "e000000000000008", 6, BEN)),  # ignored by the rule
    json.dumps(
        {**timed_event("product view", "e000000000000009", 7, BEN, data={"id": "p3"}), "consent": {"analytics": False}}
    ),  # consent denied
]
# Phase 2, after phase 1 was delivered: the same users again (identify state across bundles),
# and an event without a timestamp, which takes the message's publish time.
PHASE_2 = [
    json.dumps(timed_event("product view", "e00000000000000a", 60, ANNA, data={"id": "p9", "name": "Hat", "price": 7})),
    json.dumps(
        timed_event(
            "product view",
            "e00000000000000b",
            61,
            {**BEN, "email": "ben@example.com"},
            data={"id": "p1", "name": "Cap", "price": 42},
        )
    ),
    json.dumps(
        {"name": "product view", "id": "e00000000000000c", "user": CARL, "consent": CONSENT, "data": {"id": "p4"}}
    ),
]
NO_TIMESTAMP_ID = "e00000000000000c"


def expected_calls(spec) -> list[dict]:
    """What ``explain`` says the same inputs, in publish order, become."""
    lines = list(explain_payloads(compiled(spec), [*PHASE_1, *PHASE_2]))
    return [call for line in lines for call in line["calls"]]


def by_id(messages: list[dict]) -> dict[str, dict]:
    return {m["messageId"]: m for m in messages}


def without_timestamp(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "timestamp"}


def test_streaming_from_pubsub_end_to_end(pubsub, unique, endpoint, monkeypatch, tmp_path):  # noqa: F811
    started = time.monotonic()
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    topic = pubsub.topic(f"events-{unique}")
    subscription = pubsub.subscription(topic, f"events-{unique}")
    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")

    # Published before the job starts: a subscription keeps them (a topic read would not).
    for payload in PHASE_1[:3]:
        pubsub.publish(topic, payload, source="test")
    pubsub.publish(topic, b"", **{HEARTBEAT_ATTRIBUTE: "1"})  # dropped, never a dead letter
    for payload in PHASE_1[3:]:
        pubsub.publish(topic, payload)

    prepared = cli.prepare_run(
        [
            "--flow",
            streaming_flow(tmp_path),
            "--input_subscription",
            subscription,
            "--dead_letter_topic",
            dead_topic,
            "--message_id_namespace",
            NAMESPACE,
        ]
    )
    assert not isinstance(prepared, int), "the run flags were refused"
    options, spec = prepared
    expected = expected_calls(spec)
    phase_1_count = sum(len(line["calls"]) for line in explain_payloads(compiled(spec), PHASE_1))

    result = cli.launch(options, spec)
    watch = RunWatch(result)
    failure = watch.failure
    try:
        with pubsub.heartbeats(topic):
            assert endpoint.wait_until(phase_1_count, timeout=20), (
                f"phase 1: {len(endpoint.accepted)} of {phase_1_count} calls arrived; failure: {failure}"
            )
            before = time.time()
            for payload in PHASE_2:
                pubsub.publish(topic, payload)
            after = time.time()
            assert endpoint.wait_until(len(expected), timeout=20), (
                f"{len(endpoint.accepted)} of {len(expected)} calls arrived; failure: {failure}"
            )
            dead = pubsub.pull(dead_subscription, count=3, timeout_s=15, idle_s=0.5)
    finally:
        stop_started = time.monotonic()
        stop_local_streaming(result, subscription=subscription)
        stop_took = time.monotonic() - stop_started
        watch.join(0.5)  # wait_until_finish() may not return after cancel(): its errors are what counts
    assert not failure, failure
    assert stop_took < 5, f"stopping took {stop_took:.1f} s"

    # Exactly the calls explain predicts, each once, whatever the bundles were.
    received = [strip_sdk_fields(m) for m in endpoint.accepted]
    assert len(received) == len(expected) and endpoint.counters["duplicate"] == 0 and not endpoint.invalid
    got, want = by_id(received), by_id(expected)
    assert sorted(got) == sorted(want)
    for message_id, message in want.items():
        if f":{NO_TIMESTAMP_ID}:" in message_id:
            assert without_timestamp(got[message_id]) == without_timestamp(message)
        else:
            assert got[message_id] == message, message_id
    # The event without a timestamp got its message's publish time (so, months after phase 1,
    # Carl's identify memory had expired in event time: identify fires again).
    no_ts = [m for m in received if f":{NO_TIMESTAMP_ID}:" in m["messageId"]]
    assert [m["type"] for m in no_ts] == ["identify", "track"]
    assert all(before - 1 <= _instant(m["timestamp"]) <= after + 1 for m in no_ts)
    # Per event, its calls stay together and in order; identify fires only on change.
    types = {}
    for m in received:
        types.setdefault(m["messageId"].split(":")[1], []).append(m["type"])
    assert types["e000000000000001"] == ["identify", "page"]
    assert types["e000000000000002"] == ["identify", "track"] and types["e000000000000003"] == ["track"]
    assert types["e00000000000000a"] == ["track"]  # anna's traits unchanged since phase 1
    assert types["e00000000000000b"] == ["identify", "track"]  # ben's email is new: identify again
    assert "e000000000000008" not in types and "e000000000000009" not in types

    # Dead letters: one per bad input or event, on the topic, with the original payload.
    records = [orjson.loads(m.data) for m in dead]
    assert sorted(r["reason"] for r in records) == ["invalid_name", "no_identity", "not_json"], records
    reasons = {r["reason"]: r for r in records}
    assert reasons["not_json"]["payload"] == "this is not json {" and reasons["not_json"]["stage"] == "parse"
    assert reasons["invalid_name"]["event_id"] == "e000000000000006"
    assert json.loads(reasons["invalid_name"]["payload"]) == {"name": "broken", "id": "e000000000000006"}
    assert reasons["no_identity"]["event_id"] == "e000000000000007" and reasons["no_identity"]["stage"] == "identity"
    assert all(WRITE_KEY not in m.data.decode() for m in dead)
    # Each carries what a subscription filters on: reason, stage, flow, and the event id when known.
    attributes = {orjson.loads(m.data)["reason"]: dict(m.attributes) for m in dead}
    assert attributes["invalid_name"] == {
        "reason": "invalid_name",
        "stage": "parse",
        "flow": "default",
        "event_id": "e000000000000006",
    }
    assert attributes["no_identity"] == {
        "reason": "no_identity",
        "stage": "identity",
        "flow": "default",
        "event_id": "e000000000000007",
    }
    assert attributes["not_json"] == {"reason": "not_json", "stage": "parse", "flow": "default"}
    # (No counter totals here: on the streaming DirectRunner, Beam's counters stop at the first
    # bundle of each step -- measured, see the README's "Running on Dataflow". The calls and dead letters above
    # are the accounting: every input ended delivered, dead-lettered or dropped by policy.)
    assert time.monotonic() - started < 45


def test_streaming_from_a_topic(pubsub, unique, endpoint, monkeypatch, tmp_path):  # noqa: F811
    """--input_topic: Beam reads through a temporary subscription of its own, created when the
    job starts, so only messages published after that are seen."""
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    topic = pubsub.topic(f"events-{unique}")
    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")
    pubsub.publish(topic, PHASE_1[0])  # before the job: nobody subscribed, so never seen
    options, spec = cli.prepare_run(
        [
            "--flow",
            streaming_flow(tmp_path),
            "--input_topic",
            topic,
            "--dead_letter_topic",
            dead_topic,
            "--message_id_namespace",
            NAMESPACE,
        ]
    )
    result = cli.launch(options, spec)
    failure = RunWatch(result).failure
    try:
        subscribed = poll_until(
            lambda: failure or list(pubsub.publisher.list_topic_subscriptions(topic=topic)), timeout_s=20
        )
        assert subscribed and not failure, f"no temporary subscription; {failure}"
        with pubsub.heartbeats(topic):
            pubsub.publish(topic, PHASE_2[0])
            pubsub.publish(topic, "[1, 2]")
            assert endpoint.wait_until(1, timeout=20), failure
            dead = pubsub.pull(dead_subscription, count=2, timeout_s=15, idle_s=0.5)
    finally:
        stop_local_streaming(result, topic=topic)
        emulators.close_direct_runner_pubsub_clients()  # deletes the temporary subscription
    assert not failure, failure
    assert not list(pubsub.publisher.list_topic_subscriptions(topic=topic))
    assert [m["messageId"] for m in endpoint.accepted] == [
        f"{NAMESPACE}:e00000000000000a:identify",
        f"{NAMESPACE}:e00000000000000a:track",
    ]
    assert sorted(orjson.loads(m.data)["reason"] for m in dead) == ["not_an_event", "not_an_event"]


def test_id_label_is_refused_on_the_direct_runner(capsys):
    code = cli.main(
        [
            "run",
            "--flow",
            EXAMPLE_FLOW,
            "--input_subscription",
            "projects/walkeros-test/subscriptions/s",
            "--id_label",
            "event_id",
            "--dead_letter_topic",
            "projects/walkeros-test/topics/d",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--id_label is supported on Dataflow only" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input_subscription", "subscriptions/s"], "--input_subscription: PubSub subscription must be in the form"),
        (["--input_topic", "projects/x/topics/t"], "Invalid PubSub project name"),
        (["--input", "a.jsonl", "--input_subscription", "projects/walkeros-test/subscriptions/s"], "give one input"),
        (["--input", "a.jsonl", "--timestamp_attribute", "ts"], "apply to Pub/Sub input only"),
        (
            ["--input_subscription", "projects/walkeros-test/subscriptions/s", "--runner", "FnApiRunner"],
            "FnApiRunner cannot read Pub/Sub",
        ),
        (["--input", "events/*.jsonl", "--runner", "DataflowRunner"], "files must be on gs://"),
    ],
)
def test_run_refuses_pubsub_flag_mistakes(argv, message, capsys):
    assert cli.main(["run", "--flow", EXAMPLE_FLOW, "--dead_letter", "/tmp/never", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jsonl", "avro"])
def test_streaming_dead_letters_to_files(tmp_path, fmt):
    """In streaming, dead-letter files are written per window (TestStream: the Pub/Sub reader's
    watermark is the wall clock, so a window would take a minute to close)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing import test_stream
    from apache_beam.utils.timestamp import Timestamp
    from support import flow_document, make_spec

    from pipeline.graph import build_pipeline
    from transforms.dead_letters import STREAMING_FILE_WINDOW_S, WriteDeadLetters
    from transforms.files import dead_letter_records

    spec = make_spec(flow_document())
    start = T0 / 1000
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(Timestamp.of(start))
        .add_elements(
            [
                test_stream.TimestampedValue(b"not json", start),
                test_stream.TimestampedValue(b'{"name": "x"}', start + 1),
            ]
        )
        .advance_watermark_to(Timestamp.of(start + STREAMING_FILE_WINDOW_S + 1))
        .add_elements([test_stream.TimestampedValue(b"[]", start + STREAMING_FILE_WINDOW_S + 2)])
        .advance_watermark_to(Timestamp.of(start + 3 * STREAMING_FILE_WINDOW_S))
        .advance_watermark_to_infinity()
    )
    prefix = tmp_path / "dead"
    p = beam.Pipeline(options=PipelineOptions([], streaming=True, runner="BundleBasedDirectRunner"))
    build_pipeline(
        p, spec, streaming=True, read=stream, dead_letter_sink=WriteDeadLetters(str(prefix), fmt, streaming=True)
    )
    p.run().wait_until_finish()

    files = sorted(prefix.glob(f"dead-letters*.{fmt}"))
    assert len(files) == 2, files  # one per window that had dead letters
    records = [r for f in files for r in dead_letter_records(str(f))]
    assert sorted(r["reason"] for r in records) == ["empty_envelope", "invalid_name", "not_json"]


def _instant(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_stopping_a_local_streaming_run_drains_it(stop, pubsub, unique, endpoint, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C (or SIGTERM) on ``walkeros-segment run`` in streaming: it stops reading, sends
    what waits in Beam state (here only a drain would: flushInterval is 10 minutes), prints a
    balanced summary and exits with the status that applies. A real subprocess, as a user runs it."""
    import os
    import signal
    import subprocess
    import sys

    topic = pubsub.topic(f"events-{unique}")
    subscription = pubsub.subscription(topic, f"events-{unique}")
    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")
    events = PHASE_1[:2] + [PHASE_1[4]]  # 3 events of Anna and Ben, and one without identity
    for payload in events:
        pubsub.publish(topic, payload)
    flow = json.loads(Path(EXAMPLE_FLOW).read_text())
    flow["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["flushInterval"] = 600_000
    (tmp_path / "flow.json").write_text(json.dumps(flow))
    env = {**os.environ, "SEGMENT_WRITE_KEY": WRITE_KEY, "SEGMENT_HOST": endpoint.url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--flow",
            str(tmp_path / "flow.json"),
            "--input_subscription",
            subscription,
            "--dead_letter_topic",
            dead_topic,
            "--message_id_namespace",
            NAMESPACE,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The dead letter is out once the messages were read; the events wait in state.
        dead = pubsub.pull(dead_subscription, count=1, timeout_s=90)
        assert [orjson.loads(m.data)["reason"] for m in dead] == ["no_identity"], proc.poll()
        assert not endpoint.accepted
        proc.send_signal(getattr(signal, stop))
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    spec = cli.load_spec(str(tmp_path / "flow.json"), namespace=NAMESPACE)
    expected = [call for line in explain_payloads(compiled(spec), events) for call in line["calls"]]
    assert sorted(m["messageId"] for m in endpoint.accepted) == sorted(m["messageId"] for m in expected), out + err
    assert "draining" in err and "Traceback" not in err
    assert "(from 3 inputs): balanced" in out, out
    assert "exit status 3 (dead_letters): 1 of 4 ended as dead letters" in out
    assert proc.returncode == 3
