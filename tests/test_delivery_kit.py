"""Shared helpers of the delivery tests (tests/test_delivery*.py): flows tuned for fast SDK
retries, a batch run that also returns the Beam counters, and the "exactly one outcome per
event, exactly one accepted messageId per call" check. No tests of its own."""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.explain import explain_payloads
from pipeline.graph import build_pipeline
from pipeline.summary import counters
from support import _collect, flow_document, make_spec
from segment_api.connection import SendOptions
from decide.destination import compiled

T0 = 1767225600000  # 2026-01-01T00:00:00Z
# The track call's properties are the event's data, so a test can mark one message.
DATA_MAPPING = {"*": {"*": {"data": "data"}}}
IDENTIFY = {"map": {"traits": {"map": {"email": "user.email"}}}}


def event(i: int, *, user: dict | None = None, name: str = "product view", **fields) -> dict:
    """Event number ``i``: its own id (16 hex chars) and user, one second after the previous."""
    out = {"name": name, "id": f"de11{i:012x}", "timestamp": T0 + i * 1000,
           "user": {"session": f"s-{i}"} if user is None else user, "data": {"n": i}}
    out.update(fields)
    return out


def lines(events: list) -> list[str]:
    return [e if isinstance(e, str) else json.dumps(e) for e in events]


def spec_for(host: str, namespace: str = "delivery", *, flush_at: int = 100, flush_interval: int = 10_000,
             max_retries: int = 1, timeout_ms: int = 500, identify: bool = False, mapping: dict | None = None,
             config: dict | None = None, collector: dict | None = None, **settings):
    """A flow whose SDK gives up fast: 1 retry, 500 ms HTTP timeout."""
    settings = {"flushAt": flush_at, "flushInterval": flush_interval, "maxRetries": max_retries,
                "httpRequestTimeout": timeout_ms, **settings}
    if identify:
        settings["identify"] = IDENTIFY
    document = flow_document(settings, mapping if mapping is not None else DATA_MAPPING, host=host,
                             collector=collector, **(config or {}))
    return make_spec(document, namespace=namespace)


def fast(**overrides) -> SendOptions:
    """Send options for tests: a 5 s flush deadline, one shard (one batch at a time), no progress log."""
    return SendOptions(**{"flush_deadline_s": 5.0, "shards": 1, "progress_interval_s": 0.0, **overrides})


@dataclass
class Run:
    delivered: list[str]   # event ids, one per delivered event
    dead: list             # DeadLetter records
    counts: dict[str, int]  # the Beam counters (pipeline.summary.counters)


def run(spec, payloads: list | None = None, *, read: beam.PTransform | None = None,
        options: SendOptions | None = None, dead_letter_sink: beam.PTransform | None = None,
        previous_attempts: beam.PTransform | None = None, runner: str = "FnApiRunner") -> Run:
    """The whole pipeline, batch, on a named runner; outputs and counters."""
    collected: dict = {}
    p = beam.Pipeline(runner=runner, options=PipelineOptions([]))
    outputs = build_pipeline(p, spec, streaming=False, read=read or beam.Create(lines(payloads or [])),
                             send_options=options or fast(), dead_letter_sink=dead_letter_sink,
                             previous_attempts=previous_attempts)
    _collect(outputs.delivered | "IdsDelivered" >> beam.Map(lambda d: d.event["id"]), collected, "delivered")
    _collect(outputs.dead_letters, collected, "dead")
    result = p.run()
    result.wait_until_finish()
    return Run(collected.get("delivered", []), collected.get("dead", []), counters(result))


def planned_calls(spec, payloads: list) -> dict[str, list[str]]:
    """What ``explain`` plans for each event that should be sent: event id → its messageIds."""
    out = {}
    for line in explain_payloads(compiled(spec), lines(payloads)):
        if line["outcome"] == "delivered":
            out[line["id"]] = [c["messageId"] for c in line["calls"]]
    return out


def assert_exactly_once(endpoint, result: Run, planned: dict[str, list[str]],
                        dead_ids: set[str] = frozenset()) -> None:
    """Every planned event has exactly one outcome: delivered, with exactly one accepted
    messageId per call, or dead-lettered (``dead_ids``), with none of its calls accepted."""
    outcomes = collections.Counter(result.delivered) + collections.Counter(
        d.event_id for d in result.dead if d.stage == "send")
    assert set(outcomes) == set(planned), (sorted(set(planned) - set(outcomes)), sorted(set(outcomes) - set(planned)))
    assert all(n == 1 for n in outcomes.values()), [k for k, n in outcomes.items() if n != 1]
    assert set(result.delivered) == set(planned) - set(dead_ids)
    accepted = collections.Counter(m["messageId"] for m in endpoint.accepted)
    assert all(n == 1 for n in accepted.values())
    want = {message_id for event_id in result.delivered for message_id in planned[event_id]}
    assert set(accepted) == want, (sorted(want - set(accepted)), sorted(set(accepted) - want))


def request_sizes(endpoint) -> list[int]:
    """Messages per request that reached the endpoint, in arrival order."""
    return [r.messages for r in endpoint.requests]
