"""Test helpers (no tests, no fixtures: those are in conftest.py): flows built from parts, events,
the one way tests run the pipeline (``run_pipeline``), and checks on what reached the endpoint.

Pipelines run in this process: batch on the FnApiRunner (named: the default DirectRunner would
first try to download Prism), streaming on the DirectRunner's streaming mode (TestStream)."""

from __future__ import annotations

import base64
import bz2
import collections
import datetime as dt
import json
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from decide.destination import DestinationSpec, compiled
from decide.flow import flow_from_document
from pipeline.explain import explain_payloads
from pipeline.graph import build_pipeline
from pipeline.summary import counters
from segment_api.connection import SendOptions

DATA = Path(__file__).resolve().parent / "data"
EXAMPLE_FLOW = Path(__file__).resolve().parent.parent / "examples" / "flow.json"
WRITE_KEY = "test-write-key"
T0 = 1767225600000  # 2026-01-01T00:00:00Z
# The track call's properties are the event's data, so a test can mark one message.
DATA_MAPPING = {"*": {"*": {"data": "data"}}}
IDENTIFY = {"map": {"traits": {"map": {"email": "user.email"}}}}
CONSENT = {"analytics": True, "marketing": False}

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


# -- flows -------------------------------------------------------------------------------------
def flow_document(
    settings: dict | None = None,
    mapping: dict | None = None,
    host: str = "http://127.0.0.1:9",
    collector: dict | None = None,
    **config,
) -> dict:
    return {
        "version": 4,
        "flows": {
            "default": {
                "destinations": {
                    "segment": {
                        "package": "@walkeros/server-destination-segment",
                        "config": {
                            "settings": {
                                "writeKey": WRITE_KEY,
                                "host": host,
                                "userId": "user.id",
                                "anonymousId": "user.session",
                                **(settings or {}),
                            },
                            "mapping": mapping or {},
                            **config,
                        },
                    }
                },
                "collector": collector or {},
            }
        },
    }


def make_spec(document: dict, namespace: str = "test", ttl_ms: int | None = 24 * 3600 * 1000) -> DestinationSpec:
    flow = flow_from_document(document, env={})
    return DestinationSpec.from_flow(flow, namespace=namespace, state_ttl_ms=ttl_ms)


def spec_for(
    host: str,
    namespace: str = "delivery",
    *,
    flush_at: int = 100,
    flush_interval: int = 10_000,
    max_retries: int = 1,
    timeout_ms: int = 500,
    identify: bool = False,
    mapping: dict | None = None,
    config: dict | None = None,
    collector: dict | None = None,
    **settings,
):
    """A flow whose SDK gives up fast: 1 retry, 500 ms HTTP timeout."""
    settings = {
        "flushAt": flush_at,
        "flushInterval": flush_interval,
        "maxRetries": max_retries,
        "httpRequestTimeout": timeout_ms,
        **settings,
    }
    if identify:
        settings["identify"] = IDENTIFY
    document = flow_document(
        settings, mapping if mapping is not None else DATA_MAPPING, host=host, collector=collector, **(config or {})
    )
    return make_spec(document, namespace=namespace)


# -- events ------------------------------------------------------------------------------------
def event(i: int, *, user: dict | None = None, name: str = "product view", **fields) -> dict:
    """Event number ``i``: its own id (16 hex chars) and user, one second after the previous."""
    out = {
        "name": name,
        "id": f"de11{i:012x}",
        "timestamp": T0 + i * 1000,
        "user": {"session": f"s-{i}"} if user is None else user,
        "data": {"n": i},
    }
    out.update(fields)
    return out


def timed_event(name: str, event_id: str, offset_s: int, user: dict, **fields) -> dict:
    """An event named ``name``, ``offset_s`` seconds after T0, with :data:`CONSENT`."""
    out = {"name": name, "id": event_id, "timestamp": T0 + offset_s * 1000, "user": user, "consent": CONSENT}
    out.update(fields)
    return out


def streaming_flow(tmp_path: Path) -> str:
    """The bundled example flow, flushing batches after 200 ms instead of 10 s."""
    document = json.loads(EXAMPLE_FLOW.read_text())
    document["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["flushInterval"] = 200
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(document))
    return str(path)


def lines(events: list) -> list[str]:
    """Input lines as a file or Pub/Sub carries them: events as JSON, text and bytes as they are."""
    return [e if isinstance(e, (str, bytes)) else json.dumps(e) for e in events]


def fast(**overrides) -> SendOptions:
    """Send options for tests: a 5 s flush deadline, one shard (one batch at a time), no progress log."""
    return SendOptions(**{"flush_deadline_s": 5.0, "shards": 1, "progress_interval_s": 0.0, **overrides})


# -- running the pipeline ----------------------------------------------------------------------
@dataclass
class Run:
    delivered: list[str]  # event ids, one per delivered event
    dead: list  # DeadLetter records
    counts: dict[str, int]  # the Beam counters (pipeline.summary.counters)


def run_pipeline(
    spec,
    payloads: list | None = None,
    *,
    read: beam.PTransform | None = None,
    options: SendOptions | None = None,
    dead_letter_sink: beam.PTransform | None = None,
    previous_attempts: beam.PTransform | None = None,
    streaming: bool = False,
    runner: str | None = None,
) -> Run:
    """The whole pipeline on ``payloads`` (events or raw lines) or ``read``; its outputs and counters.

    Batch runs on ``runner`` (the FnApiRunner unless named); ``streaming`` reads a TestStream on
    the DirectRunner, whose processing time starts at 0 (pass ``fast(clock=lambda: 0.0)``)."""
    if streaming:
        p = beam.Pipeline(runner=runner, options=PipelineOptions([], streaming=True))
    else:
        p = beam.Pipeline(runner=runner or "FnApiRunner", options=PipelineOptions([]))  # [] : not pytest's argv
    outputs = build_pipeline(
        p,
        spec,
        streaming=streaming,
        read=read or beam.Create(lines(payloads or [])),
        send_options=options or fast(),
        dead_letter_sink=dead_letter_sink,
        previous_attempts=previous_attempts,
    )
    collected: dict = {}
    collect(outputs.delivered | "IdsDelivered" >> beam.Map(lambda d: d.event["id"]), collected, "delivered")
    collect(outputs.dead_letters, collected, "dead")
    result = p.run()
    result.wait_until_finish()
    return Run(collected.get("delivered", []), collected.get("dead", []), counters(result))


class RunWatch:
    """Waits for a launched run (``cli.launch``) on a thread of its own, so the test can feed it and
    stop it; whatever the run raised is in ``failure``, for the test to assert on."""

    def __init__(self, result):
        self.failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._wait, args=(result,), name="run-watch", daemon=True)
        self._thread.start()

    def _wait(self, result) -> None:
        try:
            result.wait_until_finish()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure.append(exc)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)


# Outputs are gathered by a module-level function (pickled by reference, so the runner's copy
# appends to this very dict): the runners here run the pipeline in this process.
_SINKS: dict[str, list] = {}


def _append(element, key: str):
    _SINKS[key].append(element)


def collect(pcoll, into: dict, name: str):
    key = f"{id(into)}-{name}"
    _SINKS[key] = into.setdefault(name, [])
    pcoll | f"Collect{name}" >> beam.Map(_append, key)


def poll_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """True as soon as ``condition()`` holds, False once ``timeout_s`` passed without it.

    Only for what no event signals: another process starting, stopping, sending or creating
    something (in this process, wait on the thing itself: ``LocalSegment.wait_for``, a join).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def pickled_code(payload: bytes) -> bytes:
    """A transform's payload followed by its pickled DoFn as raw bytes (Beam base64-encodes a bz2
    or zlib stream), so a test can search what a job would ship to its workers."""
    from apache_beam.portability.api import beam_runner_api_pb2

    out = payload
    try:
        fn = beam_runner_api_pb2.ParDoPayload.FromString(payload).do_fn.payload
    except Exception:  # not a ParDo
        return out
    try:
        raw = base64.b64decode(fn)
    except Exception:
        return out + fn
    for decompress in (bz2.decompress, zlib.decompress):
        try:
            return out + decompress(raw)
        except Exception:
            continue
    return out + raw


# -- checks ------------------------------------------------------------------------------------
def planned_calls(spec, payloads: list) -> dict[str, list[str]]:
    """What ``explain`` plans for each event that should be sent: event id → its messageIds."""
    out = {}
    for line in explain_payloads(compiled(spec), lines(payloads)):
        if line["outcome"] == "delivered":
            out[line["id"]] = [c["messageId"] for c in line["calls"]]
    return out


def assert_exactly_once(endpoint, result: Run, planned: dict[str, list[str]], dead_ids: set[str] = frozenset()) -> None:
    """Every planned event has exactly one outcome: delivered, with exactly one accepted
    messageId per call, or dead-lettered (``dead_ids``), with none of its calls accepted."""
    outcomes = collections.Counter(result.delivered) + collections.Counter(
        d.event_id for d in result.dead if d.stage == "send"
    )
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


def client_built(message: dict) -> dict:
    """The message segment-analytics-python's Client builds for the same call."""
    from segment.analytics import Client

    from bench.sdk_client import client_call

    return client_call(Client("k", send=False), message)[1]


def comparable(message: dict) -> dict:
    """A message as received or explained, with the timestamp as an instant (vectors use Z)."""
    out = strip_sdk_fields(message)
    out.pop("messageId", None)
    if "timestamp" in out:
        out["timestamp"] = instant(out["timestamp"])
    return out


def instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def load_json(name: str):
    return json.loads((DATA / name).read_text())


def strip_sdk_fields(wire_message: dict) -> dict:
    """A message as received by Segment, reduced to our form: no nulls, no SDK-added fields.

    The SDK writes absent ids, names and categories as null, adds ``context.library``,
    ``sentAt`` and an empty ``integrations``; dropping exactly those gives back what
    ``explain`` prints, so the two can be compared for equality.
    """

    out = {k: v for k, v in wire_message.items() if v is not None and k != "sentAt"}
    context = {k: v for k, v in (out.get("context") or {}).items() if k != "library"}
    if context:
        out["context"] = context
    else:
        out.pop("context", None)
    if not out.get("integrations"):
        out.pop("integrations", None)
    return out


def stop_local_streaming(result, subscription: str | None = None, topic: str | None = None) -> None:
    """Cancel a streaming pipeline on the DirectRunner without waiting out its idle Pub/Sub pull
    (a heartbeat on the emulator makes the pull return at once)."""
    from pipeline.cli import wake_the_reader

    wake_the_reader(subscription, topic)
    result.cancel()


# One call of each type, with non-ASCII text and the optional fields: for the tests that compare
# our wire form with what the SDK Client builds and sends.
ONE_OF_EACH_CALL = [
    {"type": "track", "anonymousId": "a", "event": "Grüße ✓", "properties": {"title": "Köln", "n": 1.5}},
    {
        "type": "track",
        "userId": "u",
        "anonymousId": "a",
        "event": "e",
        "context": {"ip": "1.2.3.4"},
        "integrations": {"All": True},
    },
    {"type": "identify", "userId": "u", "traits": {"email": "e@x"}},
    {"type": "group", "anonymousId": "a", "groupId": "g", "traits": {"plan": "pro"}},
    {"type": "page", "anonymousId": "a", "name": "Home", "properties": {"path": "/"}},
    {"type": "screen", "anonymousId": "a"},
]
ONE_OF_EACH_CALL_IDS = ["track", "track-full", "identify", "group", "page", "screen"]
