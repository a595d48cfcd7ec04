"""Test helpers: flows built from parts, pipelines on the DirectRunner (FnApiRunner for batch,
named: the default DirectRunner would first try to download Prism), message comparison."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline

from decide.flow import flow_from_document
from decide.calls import strip_sdk_fields
from decide.destination import Destination, DestinationSpec
from pipeline.graph import build_pipeline
from segment_api.connection import SendOptions

DATA = Path(__file__).resolve().parent / "data"
WRITE_KEY = "test-write-key"

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def flow_document(settings: dict | None = None, mapping: dict | None = None, host: str = "http://127.0.0.1:9",
                  collector: dict | None = None, **config) -> dict:
    return {"version": 4, "flows": {"default": {
        "destinations": {"segment": {
            "package": "@walkeros/server-destination-segment",
            "config": {"settings": {"writeKey": WRITE_KEY, "host": host, "userId": "user.id",
                                    "anonymousId": "user.session", **(settings or {})},
                       "mapping": mapping or {}, **config}}},
        "collector": collector or {}}}}


def make_spec(document: dict, namespace: str = "test", ttl_ms: int | None = 24 * 3600 * 1000) -> DestinationSpec:
    flow = flow_from_document(document, env={})
    return DestinationSpec.from_flow(flow, namespace=namespace, state_ttl_ms=ttl_ms)


def run_batch(spec: DestinationSpec, payloads: list, send_options: SendOptions | None = None,
              read: beam.PTransform | None = None, dead_letter_sink: beam.PTransform | None = None):
    """The whole pipeline on the batch DirectRunner; returns (delivered event ids, dead letters)."""
    collected = {}
    options = PipelineOptions([], runner="FnApiRunner")  # [] : not sys.argv (pytest's flags)
    with test_pipeline.TestPipeline(options=options, runner="FnApiRunner") as p:
        outputs = build_pipeline(p, spec, streaming=False, read=read or beam.Create(payloads),
                                 send_options=send_options or SendOptions(flush_deadline_s=30),
                                 dead_letter_sink=dead_letter_sink)
        _collect(outputs.delivered | "IdsDelivered" >> beam.Map(lambda d: d.event["id"]), collected, "delivered")
        _collect(outputs.dead_letters, collected, "dead")
    return collected.get("delivered", []), collected.get("dead", [])


# Outputs are gathered by a module-level function (pickled by reference, so the runner's copy
# appends to this very dict): the FnApiRunner runs the pipeline in this process.
_SINKS: dict[str, list] = {}


def _append(element, key: str):
    _SINKS[key].append(element)


def _collect(pcoll, into: dict, name: str):
    key = f"{id(into)}-{name}"
    _SINKS[key] = into.setdefault(name, [])
    pcoll | f"Collect{name}" >> beam.Map(_append, key)


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
