"""Reading input files: JSON Lines, JSON, Avro and dead-letter files, local or gs://, plain or
gzip, and what a damaged file leaves readable.

A payload is what one input record holds: one line of JSON Lines, one whole JSON file, one
Avro record (decoded), one dead letter's original payload. Parsing payloads into events is
ParseEvents' job. The same readers serve ``explain`` (in file order, without a pipeline) and
the pipeline's :class:`~transforms.read.ReadEvents`.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from decide.dead_letter import decode_payload
from decide.event import RejectedInput
from transforms import DAMAGED_FILES_COUNTER, NAMESPACE

_SECTIONS = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    if is_compressed(name):
        name = name[:-3]
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".avro", "avro")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(
        f"cannot tell the format of {path!r} from its name: pass --input_format (jsonl, json, avro or dead_letter)"
    )


# -- plain readers (explain, tests, and the per-file Beam readers) --------------------------
@dataclass(frozen=True)
class ReadLimits:
    """How far a compressed file may inflate before it is refused (a decompression bomb would
    otherwise exhaust memory or disk): beyond ``max_inflation_ratio`` times its compressed size
    (once past ``inflation_floor_bytes``), or ``max_inflated_bytes``."""

    max_inflation_ratio: float = 100.0
    max_inflated_bytes: int = 16 * 1024**3
    # Below this, any ratio is fine: a small file of repeated events inflates far, and harmlessly.
    inflation_floor_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class Damage:
    """A file that could not be read to its end: where reading stopped, and why."""

    path: str
    records: int  # payloads read (and processed) before the damage
    bytes_read: int  # bytes read before the damage (decompressed, for a compressed file)
    size: int | None  # the file's size on disk
    problem: str

    def line(self) -> str:
        size = f" of {self.size}" if self.size is not None and not is_compressed(self.path) else ""
        what = "decompressed bytes" if is_compressed(self.path) else "bytes"
        return (
            f"input file damaged: {self.path}: {self.problem}; read {self.records} records "
            f"({self.bytes_read}{size} {what}) before it; those were processed, the rest of the file was not"
        )


class DamagedFile(Exception):
    def __init__(self, damage: Damage):
        super().__init__(damage.line())
        self.damage = damage


class _InflationRefused(Exception):
    pass


def iter_payloads(pattern: str, fmt: str = "auto", limits: ReadLimits = ReadLimits(), on_damage=None) -> Iterator[Any]:
    """Every payload of every file matching ``pattern``, in file-name order then file order.
    A damaged file gives what was read before the damage, then ``on_damage(Damage)`` (default:
    raise DamagedFile); the next files are read either way."""
    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"no file matches {pattern!r}")
    for metadata in sorted(matches, key=lambda m: m.path):
        path = metadata.path
        yield from payloads_of_file(
            path, detect_format(path, fmt), limits=limits, size=metadata.size_in_bytes, on_damage=on_damage
        )


def payloads_of_file(
    path: str, fmt: str, *, limits: ReadLimits = ReadLimits(), size: int | None = None, on_damage=None
) -> Iterator[Any]:
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
                payloads = dead_letter_items(f)
            else:
                payloads = (p for p in map(line_payload, f) if p is not None)
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
        return f"--input {pattern}: is a directory; give files or a glob, e.g. {pattern.rstrip('/')}/*.jsonl"
    try:
        for name in [] if format_by_file else [pattern]:
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
        for path in files if format_by_file else []:
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


def line_payload(line: bytes | str) -> Any:
    """One JSON Lines line as a payload; None for a blank line."""
    if not line.strip():
        return None
    return line.rstrip(b"\r\n") if isinstance(line, bytes) else line.rstrip("\r\n")


def dead_letter_payloads(f) -> Iterator[Any]:
    """The original payloads of a dead-letter file, JSON Lines or Avro (told apart by content):
    replayed as they were received, never a dead letter wrapped in another. A line that is not a
    dead-letter record is passed on as it is, so it dead-letters with a reason."""
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
    return RejectedInput(
        decode_payload(record),
        record["reason"],
        f"not replayable: only the first part of its payload was kept (it had "
        f"{record['payload_truncated_from']} bytes); {record.get('error', '')}",
        event_id=record.get("event_id"),
        payload_truncated_from=record["payload_truncated_from"],
    )


def avro_payloads(f) -> Iterator[dict]:
    for record in _avro_records(f):
        yield avro_record_to_event(record)


def _avro_records(f) -> Iterator[dict]:
    """The records of an Avro file; a header without a schema is a damaged file (fastavro
    raises KeyError for it, which is no damage error: it could be a bug of ours)."""
    import fastavro

    try:
        reader = fastavro.reader(f)
    except KeyError as exc:
        raise ValueError(f"not an Avro file: its header has no {exc}") from None
    yield from reader


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
    if is_compressed(path):
        return gzip.GzipFile(fileobj=raw)
    return io.BufferedReader(raw) if not hasattr(raw, "readline") else raw


def is_compressed(path: str) -> bool:
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
                f"{self.limits.max_inflated_bytes // 1024**2})"
            )
        return n

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            super().close()


def _open_counted(path: str, limits: ReadLimits, size: int | None) -> _Counted:
    return _Counted(_open(path), limits, size, is_compressed(path))


def ignore_damage(_damage: Damage) -> None:
    """For a read whose damage another read of the same files counts and logs."""


def report_damage(damage: Damage) -> None:
    Metrics.counter(NAMESPACE, DAMAGED_FILES_COUNTER).inc()
    logging.getLogger(__name__).error(damage.line())


AVRO_MAGIC = b"Obj\x01"


# -- reading dead-letter files -------------------------------------------------------------------
def dead_letter_items(f) -> Iterator[Any]:
    """Each item of one dead-letter file (an open binary file): a record dict for each dead
    letter, or the raw line for a JSON Lines line that is not one (blank lines skipped)."""
    head = f.read(len(AVRO_MAGIC))
    if head == AVRO_MAGIC:
        yield from _avro_records(io.BytesIO(head + f.read()))
        return
    for line in itertools.chain([head + f.readline()], f):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            yield line
            continue
        yield record if is_dead_letter_record(record) else line


def is_dead_letter_record(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("payload"), str) and "reason" in record


def dead_letter_records(path: str, size: int | None = None) -> Iterator[dict]:
    """The records of one dead-letter file, up to any damage (the payload reader reports it).
    ``size``: the file's size, which bounds how far a .gz file may inflate (without it, 64 MB)."""
    # the same reading (.gz, gs://, damage) as every input
    for item in payloads_of_file(path, "dead_letter_records", size=size, on_damage=ignore_damage):
        if isinstance(item, dict):
            yield item
