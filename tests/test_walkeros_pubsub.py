"""Events as walkerOS's own server-side GCP components put them on Pub/Sub arrive unchanged.

``@walkeros/server-destination-gcp`` (its ``pubsub`` destination, read in the walkerOS
repository: packages/server/destinations/gcp/src/pubsub/push.ts) publishes one message per
event: the data is ``JSON.stringify(event)`` of the whole collector-stamped event (or, when the
rule has a ``data`` mapping, the mapped object instead), the attributes are the string values of
its ``settings.attributes`` / rule ``attributes`` mappings, and ``orderingKey`` is set when
configured. ``@walkeros/server-source-gcp`` reads the same shape back (JSON-decoding the data).
This test publishes exactly that to the Pub/Sub emulator, with an ordering key and an
``event_id`` attribute mapped from the event's ``id`` (the attribute Dataflow's ``--id_label``
deduplicates on), and checks what reaches Segment against ``explain`` of the same bytes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import emulators
from support import WRITE_KEY, RunWatch, flow_document, stop_local_streaming, strip_sdk_fields

from decide.destination import compiled
from pipeline import cli
from pipeline.explain import explain_payloads

NAMESPACE = "walkeros-gcp"
WALKEROS_VERSION = "4.4.0"
# The destination's settings in the walkerOS flow that publishes (for the record; the test below
# publishes what they produce): {"projectId": ..., "topic": "events", "orderingKey": "user.id",
# "attributes": {"event_id": "id", "entity": "entity", "action": "action"}}
ATTRIBUTE_MAPPING = {"event_id": "id", "entity": "entity", "action": "action"}


def collector_event(name: str, event_id: str, timestamp: int, user: dict, data: dict, **extra) -> dict:
    """An event as a walkerOS server collector hands it to a destination: every field present,
    source stamped with the run's trace, count and the collector's release."""
    entity, action = name.split(" ")
    return {
        "name": name,
        "data": data,
        "context": {"shopping": ["checkout", 0]},
        "globals": {"lang": "en"},
        "custom": {},
        "user": user,
        "nested": [],
        "consent": {"functional": True, "analytics": True},
        "id": event_id,
        "trigger": "load",
        "entity": entity,
        "action": action,
        "timestamp": timestamp,
        "timing": 3.14,
        "group": "",
        "count": 1,
        "source": {
            "type": "express",
            "platform": "server",
            "schema": "4",
            "trace": "1a2b3c4d5e6f70819a2b3c4d5e6f7081",
            "count": 1,
            "release": {"server": WALKEROS_VERSION},
        },
        **extra,
    }


ORDER = collector_event(
    "order complete",
    "5f4a9c2e1b7d3e80",
    1767225600000,
    {"id": "usr-789", "session": "s-1"},
    {"id": "ORD-500", "total": 199.99, "currency": "EUR"},
)
PAGE = collector_event(
    "page view", "0a9b8c7d6e5f4a3b", 1767225601000, {"session": "s-2"}, {"id": "/docs", "title": "Documentation"}
)
MAPPED_DATA = {"order_id": "ORD-500", "revenue": 199.99, "currency": "EUR"}  # a rule with `data`: no event


def published_body(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()  # JSON.stringify


def published_attributes(event: dict) -> dict[str, str]:
    return {key: str(event[path]) for key, path in ATTRIBUTE_MAPPING.items()}


def flow_file(tmp_path: Path, host: str) -> str:
    doc = flow_document(
        host=host,
        settings={"flushInterval": 200},
        mapping={
            "order": {
                "complete": {
                    "name": "Order Completed",
                    "data": {"map": {"order_id": "data.id", "revenue": "data.total", "currency": "data.currency"}},
                }
            }
        },
    )
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_walkeros_gcp_destination_messages_arrive_unchanged(pubsub, unique, endpoint, monkeypatch, tmp_path):  # noqa: F811
    from google.cloud import pubsub_v1

    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    topic = pubsub.topic(f"walkeros-{unique}")
    subscription = pubsub.subscription(topic, f"walkeros-{unique}")
    dead_topic = pubsub.topic(f"dead-{unique}")
    dead_subscription = pubsub.subscription(dead_topic, f"dead-{unique}")
    # The walkerOS destination turns messageOrdering on for a publish with an ordering key.
    ordered = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    flow = flow_file(tmp_path, endpoint.url)
    options, spec = cli.prepare_run(
        [
            "--flow",
            flow,
            "--input_subscription",
            subscription,
            "--dead_letter_topic",
            dead_topic,
            "--message_id_namespace",
            NAMESPACE,
        ]
    )
    bodies = [published_body(ORDER), published_body(PAGE)]
    ordered.publish(topic, bodies[0], ordering_key=ORDER["user"]["id"], **published_attributes(ORDER)).result(30)
    pubsub.publish(topic, bodies[1], **published_attributes(PAGE))
    pubsub.publish(topic, published_body(MAPPED_DATA))  # default push with a `data` mapping
    result = cli.launch(options, spec)
    failure = RunWatch(result).failure
    started = time.monotonic()
    try:
        with pubsub.heartbeats(topic):
            assert endpoint.wait_until(2, timeout=30), failure
            dead = pubsub.pull(dead_subscription, count=1, timeout_s=20, idle_s=0.5)
    finally:
        stop_local_streaming(result, subscription=subscription)
        emulators.close_direct_runner_pubsub_clients()
        ordered.transport.close()
    assert not failure, failure

    # Exactly what explain makes of the same bytes: nothing in the message shape is lost or changed.
    expected = [call for line in explain_payloads(compiled(spec), bodies) for call in line["calls"]]
    received = sorted((strip_sdk_fields(m) for m in endpoint.accepted), key=lambda m: m["messageId"])
    assert received == sorted(expected, key=lambda m: m["messageId"])
    by_id = {m["messageId"]: m for m in received}
    order = by_id[f"{NAMESPACE}:{ORDER['id']}:track"]
    assert order["event"] == "Order Completed" and order["userId"] == "usr-789"
    assert order["properties"] == {"order_id": "ORD-500", "revenue": 199.99, "currency": "EUR"}
    assert f"{NAMESPACE}:{PAGE['id']}:track" in by_id
    # The id attribute is the event id: what --id_label deduplicates on is what messageIds are made of.
    assert published_attributes(ORDER)["event_id"] == ORDER["id"]
    # A body that is a rule's mapped `data`, not an event, is a dead letter that says so.
    [letter] = [json.loads(m.data) for m in dead]
    assert letter["reason"] == "invalid_name" and json.loads(letter["payload"]) == MAPPED_DATA
    assert time.monotonic() - started < 60
