"""A streaming job whose write key Segment refuses (401) loses nothing: the batch is held, the
endpoint probed again, the cause logged at most once a minute, and once the key is right (here:
the endpoint restarted with the key the job sends) everything is delivered, once, with no dead
letter. On the Pub/Sub emulator and the local endpoint, as ``walkeros-segment run`` builds it."""

from __future__ import annotations

import json
import logging

from support import WRITE_KEY, RunWatch, stop_local_streaming, streaming_flow, timed_event

from decide.destination import compiled
from local_segment import LocalSegment
from pipeline import cli
from pipeline.explain import explain_payloads
from transforms import send

USERS = [{"session": f"s-{i}"} for i in range(3)]


def test_a_refused_key_holds_the_stream_until_it_is_fixed(pubsub, unique, monkeypatch, tmp_path, caplog):  # noqa: F811
    # Held at most this long: should an assertion fail, stopping the job does not wait 10 minutes.
    monkeypatch.setattr(send, "DEFAULT_ENDPOINT_ERROR_HOLD_S", 90.0)
    refusing = LocalSegment("the-key-segment-expects", strict=True).start()
    port = refusing.port
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", refusing.url)
    topic = pubsub.topic(f"events-{unique}")
    subscription = pubsub.subscription(topic, f"events-{unique}")
    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")
    events = [
        timed_event("product view", f"f00000000000000{i}", i, USERS[i % 3], data={"id": f"p{i}"}) for i in range(6)
    ]
    for e in events:
        pubsub.publish(topic, json.dumps(e))

    options, spec = cli.prepare_run(
        [
            "--flow",
            streaming_flow(tmp_path),
            "--input_subscription",
            subscription,
            "--dead_letter_topic",
            dead_topic,
            "--message_id_namespace",
            "held",
        ]
    )
    planned = [
        call["messageId"]
        for line in explain_payloads(compiled(spec), [json.dumps(e) for e in events])
        for call in line["calls"]
    ]
    fixed = None
    with caplog.at_level(logging.ERROR, logger="segment_api.connection"):
        result = cli.launch(options, spec)
        failure = RunWatch(result).failure
        try:
            with pubsub.heartbeats(topic):
                refused_twice = refusing.wait_for(lambda s: sum(r.status == 401 for r in s.requests) >= 2, timeout=60)
                assert refused_twice, failure  # refused, then probed again
                assert not refusing.accepted
                refusing.stop()
                fixed = LocalSegment(WRITE_KEY, port=port).start()  # the key is right now
                assert fixed.wait_until(len(planned), timeout=60), (len(fixed.accepted), failure)
                dead = pubsub.pull(dead_subscription, count=1, timeout_s=2, idle_s=0.5)
        finally:
            stop_local_streaming(result, subscription=subscription)
            refusing.stop()
            if fixed is not None:
                fixed.stop()
    assert not failure, failure
    assert not dead  # nothing was blamed on the events
    ids = [m["messageId"] for m in fixed.accepted]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(planned)
    assert {m.split(":")[1] for m in ids} == {e["id"] for e in events}
    refusals = [r for r in caplog.records if "answered HTTP 401" in r.getMessage()]
    assert len(refusals) == 1 and "held" in refusals[0].getMessage()  # once, however often it was probed
    assert WRITE_KEY not in caplog.text
