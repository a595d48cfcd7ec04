"""ReadEvents: raw payloads from files (JSON Lines, JSON, Avro, dead letters) or Pub/Sub.

A payload is what one input record holds: one line of JSON Lines, one whole JSON file, one
Avro record (decoded), one dead letter's original payload, or one Pub/Sub message. Parsing
them into events is ParseEvents' job. The same readers serve ``explain`` (in file order,
without Beam) and the pipeline.

Pub/Sub messages are read with their attributes (``PubsubMessage``: data, attributes,
message_id, publish_time). A message carrying the attribute ``walkeros_heartbeat`` (any value)
is not an input: it is dropped first thing and counted as ``pubsub_heartbeats``. Publishing one
wakes up the local streaming DirectRunner, whose pull otherwise blocks for about 30 s on an
idle subscription (so timers fire late and ``cancel()`` waits); see :func:`publish_heartbeat`.
"""
from __future__ import annotations

import gzip
import io
from typing import Any, Iterator

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.metrics import NAMESPACE

_SECTIONS = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")

# A Pub/Sub message with this attribute is a heartbeat, never an event (see the module doc).
HEARTBEAT_ATTRIBUTE = "walkeros_heartbeat"


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".avro", "avro")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {path!r} from its name: pass --input_format "
                     "(jsonl, json, avro or dead_letter)")


# -- plain readers (explain, tests, and the per-file Beam readers) --------------------------
def iter_payloads(pattern: str, fmt: str = "auto") -> Iterator[Any]:
    """Every payload of every file matching ``pattern``, in file-name order then file order."""
    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"no file matches {pattern!r}")
    for path in sorted(m.path for m in matches):
        yield from payloads_of_file(path, detect_format(path, fmt))


def payloads_of_file(path: str, fmt: str) -> Iterator[Any]:
    with _open(path) as f:
        if fmt == "json":
            yield f.read()
        elif fmt == "avro":
            yield from avro_payloads(f)
        elif fmt == "dead_letter":
            yield from dead_letter_payloads(f)
        elif fmt == "jsonl":
            for line in f:
                payload = line_payload(line, fmt)
                if payload is not None:
                    yield payload
        else:
            raise ValueError(f"unknown input format {fmt!r}")


def line_payload(line: bytes | str, fmt: str) -> Any:
    """One JSON Lines line as a payload; None for a blank line. Dead letters give back their payload."""
    if not line.strip():
        return None
    if fmt != "dead_letter":
        return line.rstrip(b"\r\n") if isinstance(line, bytes) else line.rstrip("\r\n")
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line  # not a dead-letter record: parse it as it is, so it dead-letters with a reason
    if isinstance(record, dict) and isinstance(record.get("payload"), str) and "reason" in record:
        return record["payload"]  # replay the original, never a dead letter wrapped in another
    return line


def dead_letter_payloads(f) -> Iterator[Any]:
    """The original payloads of a dead-letter file, JSON Lines or Avro (told apart by content):
    replayed as they were received, never a dead letter wrapped in another. A line that is not a
    dead-letter record is passed on as it is, so it dead-letters with a reason."""
    from pipeline.dead_letters import dead_letter_items

    for item in dead_letter_items(f):
        yield item["payload"] if isinstance(item, dict) else item.rstrip(b"\r\n")


def avro_payloads(f) -> Iterator[dict]:
    import fastavro

    for record in fastavro.reader(f):
        yield avro_record_to_event(record)


def avro_record_to_event(record: dict) -> dict:
    """Sections stored as JSON text (schemas/event.avsc) decoded; absent fields left out."""
    event = {}
    for key, value in record.items():
        if value is None:
            continue
        if key in _SECTIONS and isinstance(value, (str, bytes)):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                pass  # left as text: ParseEvents reports the field as invalid
        event[key] = value
    return event


def _open(path: str):
    raw = FileSystems.open(path, compression_type="uncompressed")
    if path.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    return io.BufferedReader(raw) if not hasattr(raw, "readline") else raw


# -- Beam ------------------------------------------------------------------------------------
class ReadEvents(beam.PTransform):
    """Files (``--input``) in batch, or Pub/Sub (``--input_subscription``/``--input_topic``)."""

    def __init__(self, input_pattern: str | None = None, input_format: str = "auto",
                 subscription: str | None = None, topic: str | None = None,
                 id_label: str | None = None, timestamp_attribute: str | None = None):
        super().__init__()
        self.input_pattern = input_pattern
        self.input_format = input_format
        self.subscription = subscription
        self.topic = topic
        self.id_label = id_label
        self.timestamp_attribute = timestamp_attribute

    def expand(self, pbegin):
        if self.subscription or self.topic:
            if self.subscription and self.topic:
                raise ValueError("give --input_subscription or --input_topic, not both")
            return (pbegin
                    | "ReadPubSub" >> beam.io.ReadFromPubSub(
                        subscription=self.subscription, topic=None if self.subscription else self.topic,
                        with_attributes=True, id_label=self.id_label,
                        timestamp_attribute=self.timestamp_attribute)
                    | "DropHeartbeats" >> beam.ParDo(_DropHeartbeats()))
        if not self.input_pattern:
            raise ValueError("give --input (files) or --input_subscription / --input_topic (Pub/Sub)")
        fmt = detect_format(self.input_pattern, self.input_format)
        if fmt == "jsonl":
            # ReadFromText splits large files across workers and decompresses .gz by itself.
            payloads = (pbegin
                        | "ReadLines" >> beam.io.ReadFromText(self.input_pattern)
                        | "Payloads" >> beam.FlatMap(_line_payloads, fmt))
        else:
            payloads = (pbegin
                        | "MatchFiles" >> fileio.MatchFiles(self.input_pattern)
                        | "ReadMatches" >> fileio.ReadMatches()
                        | "Payloads" >> beam.FlatMap(
                            lambda readable, f: payloads_of_file(readable.metadata.path, f), fmt))
        if not read_splits(self.input_pattern, fmt):
            # One worker reads each such file from start to end; without a shuffle it would also
            # parse, map and send all of it, so a backfill of a few large files would use a few
            # workers. The reshuffle spreads its records over all of them.
            payloads = payloads | "Spread" >> beam.Reshuffle()
        return payloads


def read_splits(pattern: str, fmt: str) -> bool:
    """Whether Beam's reader splits these files across workers by itself: only uncompressed
    JSON Lines (ReadFromText). A .gz stream cannot be split, and whole-JSON, Avro and dead-letter
    files are read one whole file per worker (so that a damaged file is reported by name)."""
    # A pattern that does not end in a plain extension (dir/*, *.gz, ...) may match .gz files.
    return fmt == "jsonl" and pattern.lower().endswith((".jsonl", ".ndjson"))


def _line_payloads(line: str, fmt: str):
    payload = line_payload(line, fmt)
    if payload is not None:
        yield payload


# -- Pub/Sub ---------------------------------------------------------------------------------
def is_heartbeat(message: Any) -> bool:
    attributes = getattr(message, "attributes", None)
    return bool(attributes) and HEARTBEAT_ATTRIBUTE in attributes


class _DropHeartbeats(beam.DoFn):
    """Heartbeat messages out, everything else through unchanged (and uncounted: ParseEvents
    counts inputs)."""

    def process(self, message):
        if is_heartbeat(message):
            Metrics.counter(NAMESPACE, "pubsub_heartbeats").inc()
            return
        yield message


def check_pubsub_path(kind: str, path: str) -> str | None:
    """None when ``path`` is a valid full Pub/Sub path of ``kind`` ("topic" or
    "subscription"), else the problem, in Beam's own words (it checks the project id too)."""
    from apache_beam.io.gcp.pubsub import parse_subscription, parse_topic

    try:
        (parse_topic if kind == "topic" else parse_subscription)(path)
    except ValueError as exc:
        return str(exc)
    return None


def publish_heartbeat(*, topic: str | None = None, subscription: str | None = None, timeout_s: float = 10.0) -> str:
    """Publish one heartbeat message (empty data, attribute ``walkeros_heartbeat``) to ``topic``,
    or to the topic of ``subscription``; returns the topic. Honours ``PUBSUB_EMULATOR_HOST``."""
    from google.cloud import pubsub_v1

    if topic is None:
        if subscription is None:
            raise ValueError("publish_heartbeat needs a topic or a subscription")
        subscriber = pubsub_v1.SubscriberClient()
        try:
            topic = subscriber.get_subscription(subscription=subscription, timeout=timeout_s).topic
        finally:
            subscriber.close()
    publisher = pubsub_v1.PublisherClient()
    try:
        publisher.publish(topic, b"", **{HEARTBEAT_ATTRIBUTE: "1"}).result(timeout=timeout_s)
    finally:
        publisher.transport.close()
    return topic
