"""Poison messages on the Pub/Sub emulator, streaming: each costs its own message only (a dead
letter with a reason, small enough for the dead-letter topic), and its neighbours are delivered."""

from __future__ import annotations

import base64
import json

import orjson
from support import RunWatch, flow_document, stop_local_streaming

from pipeline import cli

T0 = 1767225600000  # 2026-01-01T00:00:00Z


def event(event_id: str, **fields) -> dict:
    return {"name": "page view", "id": event_id, "timestamp": T0, "user": {"session": f"s-{event_id}"}, **fields}


def deep(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


NOT_UTF8 = b'{"name": "page view", "data": {"title": "caf\xe9"}}'
# Big, and not UTF-8 (its dead letter holds it in base64, a third larger). The Python client's
# channel to the emulator receives at most 4 MB a pull (real Pub/Sub: 10 MB a message), so
# bigger is tested in batch below.
BIG = b"\xff" * 2_000_000


def test_poison_messages_cost_only_themselves(pubsub, unique, endpoint, tmp_path):  # noqa: F811
    topic = pubsub.topic(f"events-{unique}")
    subscription = pubsub.subscription(topic, f"events-{unique}")
    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")
    document = flow_document(host=endpoint.url, settings={"flushInterval": 200})
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(document))

    published = [
        (orjson.dumps(event("a000000000000001")), {}),
        (orjson.dumps(event("b000000000000001", timestamp=1700000000000000)), {}),  # microseconds
        (json.dumps(event("b000000000000002", data=deep(400))).encode(), {}),  # too deep
        (NOT_UTF8, {}),  # not UTF-8
        (orjson.dumps(event("b000000000000003")), {"ts": "yesterday"}),  # bad attribute
        (orjson.dumps(event("b000000000000004")), {"ts": "99999999999999999999"}),  # out of range
        (BIG, {}),  # big, not UTF-8
        (
            orjson.dumps({k: v for k, v in event("a000000000000002").items() if k != "timestamp"}),
            {"ts": "2026-01-02T00:00:00Z"},
        ),  # time from the attribute
        (orjson.dumps(event("a000000000000003")), {}),
    ]
    for data, attributes in published:
        pubsub.publish(topic, data, **attributes)

    prepared = cli.prepare_run(
        [
            "--flow",
            str(flow),
            "--input_subscription",
            subscription,
            "--timestamp_attribute",
            "ts",
            "--dead_letter_topic",
            dead_topic,
        ]
    )
    assert not isinstance(prepared, int)
    result = cli.launch(*prepared)
    failure = RunWatch(result).failure
    try:
        with pubsub.heartbeats(topic):
            assert endpoint.wait_until(3, timeout=30), (len(endpoint.accepted), failure)
            dead = pubsub.pull(dead_subscription, count=6, timeout_s=30, idle_s=0.5)
    finally:
        stop_local_streaming(result, subscription=subscription)
    assert not failure, failure

    assert sorted(m["messageId"].split(":")[1] for m in endpoint.accepted) == [
        "a000000000000001",
        "a000000000000002",
        "a000000000000003",
    ]
    [from_attribute] = [m for m in endpoint.accepted if "a000000000000002" in m["messageId"]]
    assert from_attribute["timestamp"].startswith("2026-01-02T00:00:00")

    assert all(len(m.data) < 10_000_000 for m in dead)
    records = [orjson.loads(m.data) for m in dead]
    by_reason = sorted((r["reason"], r.get("event_id") or "") for r in records)
    assert by_reason == [
        ("invalid_field", ""),
        ("invalid_field", ""),
        ("invalid_field", "b000000000000001"),
        ("not_json", ""),
        ("not_json", ""),
        ("too_deep", "b000000000000002"),
    ], by_reason
    attribute_errors = [r for r in records if r["reason"] == "invalid_field" and not r["event_id"]]
    assert all("ts=" in r["error"] for r in attribute_errors)
    assert sorted(orjson.loads(r["payload"])["id"] for r in attribute_errors) == [
        "b000000000000003",
        "b000000000000004",
    ]
    assert sorted(base64.b64decode(r["payload"]) for r in records if r.get("payload_encoding") == "base64") == sorted(
        [NOT_UTF8, BIG]
    )


def test_a_dead_letter_too_big_for_the_topic_is_cut_to_fit_and_the_run_goes_on(pubsub, unique, endpoint):  # noqa: F811
    from support import make_spec, run_pipeline

    from transforms.dead_letters import WriteDeadLetters

    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")
    huge = b"x" * 12_000_000  # one input over Pub/Sub's 10 MB message limit: not JSON
    spec = make_spec(flow_document(host=endpoint.url))
    result = run_pipeline(
        spec, [huge, orjson.dumps(event("a000000000000001"))], dead_letter_sink=WriteDeadLetters(topic=dead_topic)
    )
    assert result.delivered == ["a000000000000001"]
    [message] = _pull_big(pubsub, dead_subscription)
    assert len(message.data) <= 10_000_000
    record = orjson.loads(message.data)
    assert record["reason"] == "not_json" and record["payload_truncated_from"] == len(huge)
    assert huge.decode().startswith(record["payload"]) and len(record["payload"]) > 5_000_000


def _pull_big(pubsub, subscription: str) -> list:  # noqa: F811
    """Pull with a channel that takes 10 MB messages (the emulator's default channel: 4 MB)."""
    import os

    import grpc
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    channel = grpc.insecure_channel(
        os.environ["PUBSUB_EMULATOR_HOST"], options=[("grpc.max_receive_message_length", -1)]
    )
    client = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
    try:
        response = client.pull(subscription=subscription, max_messages=10, timeout=30)
        client.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
        return [m.message for m in response.received_messages]
    finally:
        client.close()
