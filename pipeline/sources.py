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
import logging
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from transforms.dead_letter import INVALID_FIELD, decode_payload
from transforms.event import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, RejectedInput
from transforms.metrics import DAMAGED_FILES_COUNTER, NAMESPACE

_SECTIONS = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")

# A Pub/Sub message with this attribute is a heartbeat, never an event (see the module doc).
HEARTBEAT_ATTRIBUTE = "walkeros_heartbeat"


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    if _is_compressed(name):
        name = name[:-3]
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".avro", "avro")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {path!r} from its name: pass --input_format "
                     "(jsonl, json, avro or dead_letter)")


# -- plain readers (explain, tests, and the per-file Beam readers) --------------------------
@dataclass(frozen=True)
class ReadLimits:
    """How far a compressed file may inflate before it is refused (a decompression bomb would
    otherwise exhaust memory or disk): beyond ``max_inflation_ratio`` times its compressed size
    (once past ``inflation_floor_bytes``), or ``max_inflated_bytes``."""
    max_inflation_ratio: float = 100.0
    max_inflated_bytes: int = 16 * 1024 ** 3
    # Below this, any ratio is fine: a small file of repeated events inflates far, and harmlessly.
    inflation_floor_bytes: int = 64 * 1024 ** 2


@dataclass(frozen=True)
class Damage:
    """A file that could not be read to its end: where reading stopped, and why."""
    path: str
    records: int          # payloads read (and processed) before the damage
    bytes_read: int       # bytes read before the damage (decompressed, for a compressed file)
    size: int | None      # the file's size on disk
    problem: str

    def line(self) -> str:
        size = f" of {self.size}" if self.size is not None and not _is_compressed(self.path) else ""
        what = "decompressed bytes" if _is_compressed(self.path) else "bytes"
        return (f"input file damaged: {self.path}: {self.problem}; read {self.records} records "
                f"({self.bytes_read}{size} {what}) before it; those were processed, the rest of the file was not")


class DamagedFile(Exception):
    def __init__(self, damage: Damage):
        super().__init__(damage.line())
        self.damage = damage


class _InflationRefused(Exception):
    pass


def iter_payloads(pattern: str, fmt: str = "auto", limits: ReadLimits = ReadLimits(),
                  on_damage=None) -> Iterator[Any]:
    """Every payload of every file matching ``pattern``, in file-name order then file order.
    A damaged file gives what was read before the damage, then ``on_damage(Damage)`` (default:
    raise DamagedFile); the next files are read either way."""
    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"no file matches {pattern!r}")
    for metadata in sorted(matches, key=lambda m: m.path):
        path = metadata.path
        yield from payloads_of_file(path, detect_format(path, fmt), limits=limits, size=metadata.size_in_bytes,
                                    on_damage=on_damage)


def payloads_of_file(path: str, fmt: str, *, limits: ReadLimits = ReadLimits(), size: int | None = None,
                     on_damage=None) -> Iterator[Any]:
    """The payloads of one file. Reading stops at the first damage (a truncated or corrupt
    file, one that is not what its name says, one that inflates too far): what was read
    before it is given, then ``on_damage(Damage)`` is called (or DamagedFile raised)."""
    if fmt not in ("json", "avro", "dead_letter", "dead_letter_records", "jsonl"):
        raise ValueError(f"unknown input format {fmt!r}")
    records = 0
    counted = None
    try:
        counted = _open_counted(path, limits, size)
        with counted.stream as f:
            if fmt == "json":
                payloads = iter([f.read()])
            elif fmt == "avro":
                payloads = avro_payloads(f)
            elif fmt == "dead_letter":
                payloads = dead_letter_payloads(f)
            elif fmt == "dead_letter_records":  # the records themselves (ReadPreviousAttempts)
                from pipeline.dead_letters import dead_letter_items

                payloads = dead_letter_items(f)
            else:
                payloads = (p for p in map(lambda line: line_payload(line, fmt), f) if p is not None)
            for payload in payloads:
                records += 1
                yield payload
    except _InflationRefused as exc:
        _damaged(Damage(path, records, counted.inflated if counted else 0, size, str(exc)), on_damage)
    except _DAMAGE_ERRORS as exc:
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _damaged(Damage(path, records, counted.inflated if counted else 0, size, problem), on_damage)


def _damaged(damage: Damage, on_damage) -> None:
    if on_damage is None:
        raise DamagedFile(damage)
    on_damage(damage)


# What a truncated, corrupt or mislabelled file raises while it is read and decoded (gzip,
# zlib, fastavro, the file system); errors of the pipeline's own logic are not among them.
_DAMAGE_ERRORS = (OSError, EOFError, ValueError, zlib.error, struct.error, IndexError, StopIteration)
def input_problem(pattern: str, fmt: str = "auto", format_by_file: bool = False) -> str | None:
    """None when ``pattern`` matches at least one readable file whose format is known, else the
    problem in one line (a usage error: a run on no input must not "succeed").

    Checked before anything starts, for every format, local or gs://: the pattern matches
    nothing, names a directory, or a matched local file cannot be opened. Every matched local
    file is opened once (cheap); on gs:// a match is an object the listing could see.
    ``format_by_file``: the format is told by each file's name (``explain``), not the pattern's
    (the pipeline's readers)."""
    import os

    local = "://" not in pattern
    if local and os.path.isdir(pattern):
        return (f"--input {pattern}: is a directory; give files or a glob, "
                f"e.g. {pattern.rstrip('/')}/*.jsonl")
    try:
        for name in ([] if format_by_file else [pattern]):
            detect_format(name, fmt)
    except ValueError as exc:
        return f"--input {pattern}: {exc}"
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as exc:  # noqa: BLE001 - Beam's BeamIOError and the cloud clients' own errors
        return f"--input {pattern}: cannot list it: {_one_line(exc)}"
    # Folder placeholders (gs://b/dir/) and local directories are not inputs.
    files = [m.path for m in matched if not m.path.endswith("/") and not (local and os.path.isdir(m.path))]
    if not files:
        what = "only directories" if matched else "no file"
        return f"--input {pattern}: {what} matches (check the path and the glob)"
    try:
        for path in (files if format_by_file else []):
            detect_format(path, fmt)
    except ValueError as exc:
        return f"--input {pattern}: {exc}"
    if local:
        import glob as globbing

        # Beam's local match skips entries it cannot stat (a broken link): they are inputs the
        # user meant, so they are checked too.
        for path in sorted(set(files) | set(globbing.glob(pattern))):
            if os.path.isdir(path):
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                return f"--input {path}: cannot read it: {exc.strerror or exc}"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


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
        return decode_payload(record)  # replay the original, never a dead letter wrapped in another
    return line


def dead_letter_payloads(f) -> Iterator[Any]:
    """The original payloads of a dead-letter file, JSON Lines or Avro (told apart by content):
    replayed as they were received, never a dead letter wrapped in another. A line that is not a
    dead-letter record is passed on as it is, so it dead-letters with a reason."""
    from pipeline.dead_letters import dead_letter_items

    for item in dead_letter_items(f):
        if not isinstance(item, dict):
            yield item.rstrip(b"\r\n")
        elif item.get("payload_truncated_from"):
            yield _unreplayable(item)
        else:
            yield decode_payload(item)


def _unreplayable(record: dict) -> RejectedInput:
    """A dead letter whose payload was cut to fit its sink: only its beginning is left, which
    must not pass for the input. It stays a dead letter, with its reason, marked as before."""
    return RejectedInput(decode_payload(record), record["reason"],
                         f"not replayable: only the first part of its payload was kept (it had "
                         f"{record['payload_truncated_from']} bytes); {record.get('error', '')}",
                         event_id=record.get("event_id"), payload_truncated_from=record["payload_truncated_from"])


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
    if _is_compressed(path):
        return gzip.GzipFile(fileobj=raw)
    return io.BufferedReader(raw) if not hasattr(raw, "readline") else raw


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(".gz")


class _Counted(io.RawIOBase):
    """A file's (decompressed) bytes, counted as they are read, and refused once they inflate
    beyond ``limits``: checked on every read, before a line or record is assembled in memory."""

    def __init__(self, inner, limits: ReadLimits, compressed_size: int | None, compressed: bool):
        super().__init__()
        self.inner = inner
        self.inflated = 0
        self.limit = None
        if compressed:
            by_ratio = limits.max_inflation_ratio * (compressed_size or 0)
            self.limit = min(limits.max_inflated_bytes, max(by_ratio, limits.inflation_floor_bytes))
            self.limits = limits
        self.stream = io.BufferedReader(self, 1 << 16)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.inflated += n
        if self.limit is not None and self.inflated > self.limit:
            raise _InflationRefused(
                f"refused: it inflates beyond {self.limit} bytes (--max_inflation_ratio "
                f"{self.limits.max_inflation_ratio:g} times its compressed size, at most --max_inflated_mb "
                f"{self.limits.max_inflated_bytes // 1024 ** 2})")
        return n

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            super().close()


def _open_counted(path: str, limits: ReadLimits, size: int | None) -> _Counted:
    return _Counted(_open(path), limits, size, _is_compressed(path))


# -- Beam ------------------------------------------------------------------------------------
class ReadEvents(beam.PTransform):
    """Files (``--input``) in batch, or Pub/Sub (``--input_subscription``/``--input_topic``)."""

    def __init__(self, input_pattern: str | None = None, input_format: str = "auto",
                 subscription: str | None = None, topic: str | None = None,
                 id_label: str | None = None, timestamp_attribute: str | None = None,
                 limits: ReadLimits = ReadLimits(), *, spread: bool = True, report: bool = True):
        """``spread``: reshuffle what is read whole (Dataflow spreads it over workers; a local
        runner would only hold every payload in memory for it). ``report``: count and log a
        damaged file; off for a second read of the same files (batch deduplication's)."""
        super().__init__()
        self.spread = spread
        self.report = report
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
            messages = (pbegin
                        | "ReadPubSub" >> beam.io.ReadFromPubSub(
                            subscription=self.subscription, topic=None if self.subscription else self.topic,
                            with_attributes=True, id_label=self.id_label)
                        | "DropHeartbeats" >> beam.ParDo(_DropHeartbeats()))
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
            return (pbegin
                    | "ReadLines" >> beam.io.ReadFromText(self.input_pattern, coder=beam.coders.BytesCoder())
                    | "Payloads" >> beam.FlatMap(_line_payloads, fmt))
        files = pbegin | "MatchFiles" >> fileio.MatchFiles(self.input_pattern)
        whole_files = files
        if fmt == "jsonl":
            lines = (files
                     | "PlainFiles" >> beam.Filter(lambda metadata: not _is_compressed(metadata.path))
                     | "Paths" >> beam.Map(lambda metadata: metadata.path)
                     | "ReadLines" >> beam.io.ReadAllFromText(coder=beam.coders.BytesCoder())
                     | "Payloads" >> beam.FlatMap(_line_payloads, fmt))
            whole_files = files | "CompressedFiles" >> beam.Filter(lambda metadata: _is_compressed(metadata.path))
        payloads = (whole_files
                    | "ReadMatches" >> fileio.ReadMatches()
                    | "FilePayloads" >> beam.ParDo(_FilePayloads(fmt, self.limits, self.report)))
        if self.spread:
            # One worker reads each whole file from start to end; without a shuffle it would
            # also parse, map and send all of it, so a backfill of a few large files would
            # use a few workers. The reshuffle spreads its records over all of them.
            payloads = payloads | "Spread" >> beam.Reshuffle()
        if fmt != "jsonl":
            return payloads
        return (lines, payloads) | "AllPayloads" >> beam.Flatten()

    def second_read(self) -> "ReadEvents":
        """The same files again, for a step that only decides (batch deduplication): damage is
        counted once, by the main read, and nothing is spread (one small record per event follows)."""
        return ReadEvents(self.input_pattern, self.input_format, self.subscription, self.topic, self.id_label,
                          self.timestamp_attribute, self.limits, spread=False, report=False)

    def _matches_compressed_files(self) -> bool:
        """Whether the input matches a compressed file now (as the graph is built: Beam's text
        reader checks its pattern then too). Only plain files: the plain text reader, as fast
        as it gets; else the general graph (ReadAllFromText of the plain ones costs a shuffle)."""
        try:
            matched = FileSystems.match([self.input_pattern])[0].metadata_list
        except Exception:  # noqa: BLE001 - whatever the file system says, the general graph copes
            return True
        return any(_is_compressed(metadata.path) for metadata in matched)


class _FilePayloads(beam.DoFn):
    """Each payload of one whole file; a damaged file counts once in ``input_files_damaged``
    and is logged with how far it was read (its payloads before the damage go on)."""

    def __init__(self, fmt: str, limits: ReadLimits, report: bool = True):
        self.fmt = fmt
        self.limits = limits
        self.report = report

    def process(self, readable):
        metadata = readable.metadata
        yield from payloads_of_file(metadata.path, detect_format(metadata.path, self.fmt), limits=self.limits,
                                    size=metadata.size_in_bytes,
                                    on_damage=report_damage if self.report else ignore_damage)


def ignore_damage(_damage: Damage) -> None:
    """For a read whose damage another read of the same files counts and logs."""


def report_damage(damage: Damage) -> None:
    Metrics.counter(NAMESPACE, DAMAGED_FILES_COUNTER).inc()
    logging.getLogger(__name__).error(damage.line())


def _line_payloads(line: bytes, fmt: str):
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
            yield RejectedInput(message.data, INVALID_FIELD,
                                f"Pub/Sub attribute {self.attribute}={value[:100]!r} (--timestamp_attribute) is "
                                "not a time: milliseconds since the epoch (1970 to 9999) or RFC 3339")
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
