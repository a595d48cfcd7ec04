"""ReadEvents: raw payloads from files (JSON Lines, JSON, Avro, dead letters) or Pub/Sub.

A payload is what one input record holds: one line of JSON Lines, one whole JSON file, one
Avro record (decoded), one dead letter's original payload, or one Pub/Sub message. Parsing
them into events is ParseEvents' job (PlanEvents' in a batch run, which reads files as lists of
payloads: ``chunked``, see :mod:`transforms.chunks`). The same readers serve ``explain`` (in file order,
without Beam) and the pipeline.

Pub/Sub messages are read with their attributes (``PubsubMessage``: data, attributes,
message_id, publish_time). A message carrying the attribute ``walkeros_heartbeat`` (any value)
is not an input: it is dropped first thing and counted as ``pubsub_heartbeats``. Publishing one
wakes up the local streaming DirectRunner, whose pull otherwise blocks for about 30 s on an
idle subscription (so timers fire late and ``cancel()`` waits); see :func:`publish_heartbeat`.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from decide.dead_letter import INVALID_FIELD
from decide.event import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, RejectedInput
from transforms import NAMESPACE
from transforms.chunks import Chunk, GatherChunks, LineChunkSource
from transforms.files import (
    ReadLimits,
    detect_format,
    ignore_damage,
    is_compressed,
    line_payload,
    payloads_of_file,
    report_damage,
)

# A Pub/Sub message with this attribute is a heartbeat, never an event (see the module doc).
HEARTBEAT_ATTRIBUTE = "walkeros_heartbeat"


# -- Beam ------------------------------------------------------------------------------------
class ReadEvents(beam.PTransform):
    """Files (``--input``) in batch, or Pub/Sub (``--input_subscription``/``--input_topic``)."""

    def __init__(
        self,
        input_pattern: str | None = None,
        input_format: str = "auto",
        subscription: str | None = None,
        topic: str | None = None,
        id_label: str | None = None,
        timestamp_attribute: str | None = None,
        limits: ReadLimits = ReadLimits(),
        *,
        spread: bool = True,
        report: bool = True,
        chunked: bool = False,
    ):
        """``spread``: reshuffle what is read whole (Dataflow spreads it over workers; a local
        runner would only hold every payload in memory for it). ``report``: count and log a
        damaged file; off for a second read of the same files (batch deduplication's).
        ``chunked`` (files, for a batch run): lists of payloads, not one payload an element
        (see :mod:`transforms.chunks`)."""
        super().__init__()
        self.spread = spread
        self.report = report
        self.chunked = chunked and not (subscription or topic)
        self.input_pattern = input_pattern
        self.input_format = input_format
        self.subscription = subscription
        self.topic = topic
        self.id_label = id_label
        self.timestamp_attribute = timestamp_attribute
        self.limits = limits

    def expand(self, pbegin):
        if self.subscription or self.topic:
            if self.subscription and self.topic:
                raise ValueError("give --input_subscription or --input_topic, not both")
            # The timestamp attribute is read here, not by Beam's reader: there one bad value fails
            # the whole pull it came in (and, acknowledged or not, every retry of it).
            messages = (
                pbegin
                | "ReadPubSub"
                >> beam.io.ReadFromPubSub(
                    subscription=self.subscription,
                    topic=None if self.subscription else self.topic,
                    with_attributes=True,
                    id_label=self.id_label,
                )
                | "DropHeartbeats" >> beam.ParDo(_DropHeartbeats())
            )
            if self.timestamp_attribute:
                messages = messages | "EventTime" >> beam.ParDo(_TimestampFromAttribute(self.timestamp_attribute))
            return messages
        if not self.input_pattern:
            raise ValueError("give --input (files) or --input_subscription / --input_topic (Pub/Sub)")
        fmt = detect_format(self.input_pattern, self.input_format)
        # Plain JSON Lines files are split across workers and read as bytes (a line that is not
        # UTF-8 is a dead letter, not a crash). Compressed ones cannot be split, and are read by
        # the file reader, which notices a truncated or corrupt stream (Beam's text reader stops
        # at the cut as if the file ended there).
        if fmt == "jsonl" and not self._matches_compressed_files():
            if self.chunked:
                return pbegin | "ReadLines" >> beam.io.Read(LineChunkSource(self.input_pattern)).with_output_types(
                    Chunk
                )
            return (
                pbegin
                | "ReadLines" >> beam.io.ReadFromText(self.input_pattern, coder=beam.coders.BytesCoder())
                | "Payloads" >> beam.FlatMap(_line_payloads)
            )
        files = pbegin | "MatchFiles" >> fileio.MatchFiles(self.input_pattern)
        whole_files = files
        if fmt == "jsonl":
            lines = (
                files
                | "PlainFiles" >> beam.Filter(lambda metadata: not is_compressed(metadata.path))
                | "Paths" >> beam.Map(lambda metadata: metadata.path)
                | "ReadLines" >> beam.io.ReadAllFromText(coder=beam.coders.BytesCoder())
                | "Payloads" >> beam.FlatMap(_line_payloads)
            )
            whole_files = files | "CompressedFiles" >> beam.Filter(lambda metadata: is_compressed(metadata.path))
        payloads = (
            whole_files
            | "ReadMatches" >> fileio.ReadMatches()
            | "FilePayloads" >> beam.ParDo(_FilePayloads(fmt, self.limits, self.report))
        )
        if self.chunked:
            payloads = payloads | "GatherPayloads" >> beam.ParDo(GatherChunks()).with_output_types(Chunk)
            if fmt == "jsonl":
                lines = lines | "GatherLines" >> beam.ParDo(GatherChunks()).with_output_types(Chunk)
        if self.spread:
            # One worker reads each whole file from start to end; without a shuffle it would
            # also parse, map and send all of it, so a backfill of a few large files would
            # use a few workers. The reshuffle spreads its records over all of them.
            payloads = payloads | "Spread" >> beam.Reshuffle()
        if fmt != "jsonl":
            return payloads
        return (lines, payloads) | "AllPayloads" >> beam.Flatten()

    def second_read(self) -> ReadEvents:
        """The same files again, for a step that only decides (batch deduplication): damage is
        counted once, by the main read, and nothing is spread (one small record per event follows)."""
        return ReadEvents(
            self.input_pattern,
            self.input_format,
            self.subscription,
            self.topic,
            self.id_label,
            self.timestamp_attribute,
            self.limits,
            spread=False,
            report=False,
            chunked=self.chunked,
        )

    def _matches_compressed_files(self) -> bool:
        """Whether the input matches a compressed file now (as the graph is built: Beam's text
        reader checks its pattern then too). Only plain files: the plain text reader, as fast
        as it gets; else the general graph (ReadAllFromText of the plain ones costs a shuffle)."""
        try:
            matched = FileSystems.match([self.input_pattern])[0].metadata_list
        except Exception:  # noqa: BLE001 - whatever the file system says, the general graph copes
            return True
        return any(is_compressed(metadata.path) for metadata in matched)


class _FilePayloads(beam.DoFn):
    """Each payload of one whole file; a damaged file counts once in ``input_files_damaged``
    and is logged with how far it was read (its payloads before the damage go on)."""

    def __init__(self, fmt: str, limits: ReadLimits, report: bool = True):
        self.fmt = fmt
        self.limits = limits
        self.report = report

    def process(self, readable):
        metadata = readable.metadata
        yield from payloads_of_file(
            metadata.path,
            detect_format(metadata.path, self.fmt),
            limits=self.limits,
            size=metadata.size_in_bytes,
            on_damage=report_damage if self.report else ignore_damage,
        )


def _line_payloads(line: bytes):
    payload = line_payload(line)
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


class _TimestampFromAttribute(beam.DoFn):
    """A message's element time from its attribute (milliseconds since the epoch, or RFC 3339,
    as Beam's own reader takes it); without the attribute, its publish time. A value that is not
    a time, or out of range, makes that message (only) an ``invalid_field`` dead letter."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def process(self, message):
        value = (message.attributes or {}).get(self.attribute)
        if value is None:
            yield message
            return
        millis = attribute_millis(value)
        if millis is None:
            yield RejectedInput(
                message.data,
                INVALID_FIELD,
                f"Pub/Sub attribute {self.attribute}={value[:100]!r} (--timestamp_attribute) is "
                "not a time: milliseconds since the epoch (1970 to 9999) or RFC 3339",
            )
            return
        yield window.TimestampedValue(message, Timestamp(micros=millis * 1000))


def attribute_millis(value: str) -> int | None:
    """Milliseconds since the epoch from a timestamp attribute, or None when it is not a valid time."""
    try:
        millis = int(value)
    except ValueError:
        try:
            millis = Timestamp.from_rfc3339(value).nanos // 1_000_000
        except (ValueError, OverflowError):
            return None
    return millis if MIN_TIMESTAMP_MS <= millis <= MAX_TIMESTAMP_MS else None


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
