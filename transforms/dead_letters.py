"""Dead letters: counted, stamped with their attempt, and written to JSON Lines or Avro files
(``schemas/dead_letter.avsc``) or a Pub/Sub topic, one record per failed input or event.

Reading them back is ``--input_format dead_letter`` (``transforms.read``): each record's
original ``payload`` goes through the same transforms again (never the record itself, so a
dead letter is never wrapped inside another). JSON Lines and Avro dead-letter files are told
apart by their content, so a glob may match both.

Attempts: a record's ``attempts`` says how many runs failed on it. A replay run reads the
previous records' attempts too (:class:`ReadPreviousAttempts`, a side input); a dead letter
produced in that run which stands for the same event (same event id) or the same input (same
payload) gets the previous count plus one. Everything else starts at 1.
"""

from __future__ import annotations

import dataclasses
import time

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.transforms import window

import schemas
from decide.dead_letter import DeadLetter, replay_keys
from transforms import NAMESPACE
from transforms.files import dead_letter_records

STREAMING_FILE_WINDOW_S = 60


class ReadPreviousAttempts(beam.PTransform):
    """``(replay key, attempts)`` for every dead letter in the files of ``pattern``: the highest
    count per key. A side input of :class:`CountDeadLetters` in a replay run."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchDeadLetters" >> fileio.MatchFiles(self.pattern)
            | "Records" >> beam.FlatMap(lambda metadata: dead_letter_records(metadata.path, metadata.size_in_bytes))
            | "Keys" >> beam.FlatMap(_attempts_by_key)
            | "Highest" >> beam.CombinePerKey(max)
        )


def _attempts_by_key(record: dict):
    attempts = record.get("attempts")
    attempts = attempts if isinstance(attempts, int) and attempts > 0 else 1
    for key in replay_keys(record["payload"], record.get("event_id")):
        yield key, attempts


# -- counting and stamping -----------------------------------------------------------------------
class _CountAndStamp(beam.DoFn):
    def __init__(self, namespace: str | None = None):
        self.namespace = namespace

    def process(self, dead: DeadLetter, previous=None):
        if self.namespace and dead.namespace is None:
            dead = dataclasses.replace(dead, namespace=self.namespace)  # never change an input element
        Metrics.counter(NAMESPACE, "dead_letters_total").inc()
        Metrics.counter(NAMESPACE, f"dead_letters_stage_{dead.stage}").inc()
        if previous:
            before = max((previous.get(k, 0) for k in replay_keys(dead.payload, dead.event_id)), default=0)
            if before:
                dead = dataclasses.replace(dead, attempts=before + 1)  # never change an input element
                Metrics.counter(NAMESPACE, "dead_letters_failed_again").inc()
        yield dead


class CountDeadLetters(beam.PTransform):
    """Every dead letter of the run, counted by stage (``dead_letters_total``,
    ``dead_letters_stage_<stage>``: the accounting in ``pipeline.summary``) and, in a replay
    run, given its attempt number (``previous``: :class:`ReadPreviousAttempts`)."""

    def __init__(self, previous: beam.PTransform | None = None, namespace: str | None = None):
        super().__init__()
        self.previous = previous
        self.namespace = namespace

    def expand(self, dead_letters):
        if self.previous is None:
            return dead_letters | "Count" >> beam.ParDo(_CountAndStamp(self.namespace))
        previous = dead_letters.pipeline | "PreviousAttempts" >> self.previous
        return dead_letters | "Count" >> beam.ParDo(_CountAndStamp(self.namespace), beam.pvalue.AsDict(previous))


# -- naming: one name per run ---------------------------------------------------------------------
def new_run_id(given: str | None = None, now: float | None = None) -> str:
    """``<UTC start time>-<given id, or a random one>``: sorts by time, and two runs never share
    it (a scheduler retrying a task reuses its own run id; the time still differs)."""
    import re
    import secrets

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    # Glob characters or a slash in a file name would break replaying with a glob.
    suffix = re.sub(r"[^A-Za-z0-9._=+-]", "_", given) if given else secrets.token_hex(4)
    return f"{stamp}-{suffix}"


def run_prefix(prefix: str, run_id: str) -> str:
    """Where one run's dead-letter files go: the user's prefix plus the run id. Writing never
    touches files of another run (Beam's file sink clears only files of its own prefix)."""
    if prefix.endswith("/"):
        return f"{prefix}dead-letters-{run_id}"
    return f"{prefix}-{run_id}"


def pubsub_attributes(dead: DeadLetter) -> dict[str, str]:
    """What a subscription can filter dead letters on; an unknown event id is left out (a
    filter tests it with ``attributes:event_id``)."""
    attributes = {"reason": dead.reason, "stage": dead.stage, "flow": dead.flow or ""}
    if dead.event_id:
        attributes["event_id"] = str(dead.event_id)
    return attributes


def _to_pubsub_message(dead: DeadLetter):
    from apache_beam.io.gcp.pubsub import PubsubMessage

    return PubsubMessage(orjson.dumps(dead.to_dict()), pubsub_attributes(dead))


# -- writing -------------------------------------------------------------------------------------
class WriteDeadLetters(beam.PTransform):
    def __init__(
        self, prefix: str | None = None, fmt: str = "jsonl", topic: str | None = None, streaming: bool = False
    ):
        super().__init__()
        if not prefix and not topic:
            raise ValueError("dead letters need a place: --dead_letter PREFIX or --dead_letter_topic TOPIC")
        if fmt not in ("jsonl", "avro"):
            raise ValueError(f"unknown dead-letter format {fmt!r}: jsonl or avro")
        self.prefix = prefix
        self.fmt = fmt
        self.topic = topic
        self.streaming = streaming

    def expand(self, dead_letters):
        if self.topic:
            return (
                dead_letters
                | "ToMessage" >> beam.Map(_to_pubsub_message)
                | "Publish" >> beam.io.WriteToPubSub(self.topic, with_attributes=True)
            )
        if self.streaming:
            # Unbounded input: close a file every window so records become visible. Windows by the
            # time each record is written: a dead letter's own time can already be behind the
            # watermark (its batch waited flushInterval and the flush deadline), and a window past
            # its end would drop it as late data.
            windowed = (
                dead_letters
                | "StampWritten" >> beam.Map(lambda dead: window.TimestampedValue(dead, time.time()))
                | "Window" >> beam.WindowInto(window.FixedWindows(STREAMING_FILE_WINDOW_S))
            )
            if self.fmt == "avro":
                sink, suffix = _AvroSink, ".avro"
                records = windowed | "ToRecord" >> beam.Map(DeadLetter.to_dict)
            else:
                sink, suffix = None, ".jsonl"  # fileio's default: text, one line a record
                records = windowed | "ToJson" >> beam.Map(DeadLetter.to_json)
            return records | "WriteFiles" >> fileio.WriteToFiles(
                path=self.prefix.rstrip("/"),
                sink=sink,
                file_naming=fileio.default_file_naming("dead-letters", suffix),
                shards=1,
            )
        if self.fmt == "avro":
            return (
                dead_letters
                | "ToRecord" >> beam.Map(DeadLetter.to_dict)
                | "WriteAvro"
                >> beam.io.WriteToAvro(self.prefix, schemas.load("dead_letter.avsc"), file_name_suffix=".avro")
            )
        return (
            dead_letters
            | "ToJson" >> beam.Map(DeadLetter.to_json)
            | "WriteJsonl" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl")
        )


class _AvroSink(fileio.FileSink):
    """One Avro container file per window and shard (streaming dead letters)."""

    def open(self, fh):
        import fastavro

        self._fh = fh
        self._schema = fastavro.parse_schema(schemas.load("dead_letter.avsc"))
        self._records: list[dict] = []

    def write(self, record):
        self._records.append(record)

    def flush(self):
        import fastavro

        fastavro.writer(self._fh, self._schema, self._records)
        self._records = []
