"""Dead letters: written as JSON Lines or Avro (schemas/dead_letter.avsc), read back with
``--input_format dead_letter`` through the whole pipeline (replay: the original payload, never a
record wrapped in another), ``attempts`` counted across replays; and the accounting summary."""

from __future__ import annotations

import gzip
import json

import apache_beam as beam
import fastavro
import orjson
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue
from support import (
    DATA_MAPPING,
    WRITE_KEY,
    assert_exactly_once,
    event,
    flow_document,
    lines,
    planned_calls,
    run_pipeline,
    spec_for,
)

import schemas
from decide.dead_letter import DeadLetter
from local_segment import LocalSegment
from pipeline import cli
from pipeline.summary import reconcile, render
from transforms.dead_letters import CountDeadLetters, ReadPreviousAttempts, WriteDeadLetters
from transforms.files import iter_payloads
from transforms.read import ReadEvents

EVENTS = [event(i) for i in range(6)]


def dead_url() -> str:
    server = LocalSegment(WRITE_KEY).start()
    url = server.url
    server.stop()
    return url


def test_avro_dead_letters_are_written_with_the_schema_and_replay(endpoint, tmp_path):
    inputs = [*EVENTS, "[1, 2"]
    first = run_pipeline(
        spec_for(dead_url()), inputs, dead_letter_sink=WriteDeadLetters(str(tmp_path / "dead"), "avro")
    )
    assert len(first.dead) == 7

    [path] = tmp_path.glob("dead*.avro")
    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        assert reader.writer_schema["name"] == "io.walkeros.segment.DeadLetter"
        records = list(reader)
    assert fastavro.parse_schema(schemas.load("dead_letter.avsc"))  # the schema the files use
    assert sorted(r["reason"] for r in records) == ["delivery_failed"] * 6 + ["not_json"]
    sent = [r for r in records if r["stage"] == "send"]
    assert all(r["attempts"] == 1 and r["time"] and r["flow"] == "default" for r in records)
    assert all(r["event_id"] for r in sent) and len(sent) == 6
    assert all("Connection" in r["error"] and r["http_status"] is None for r in sent)
    assert all(WRITE_KEY not in json.dumps(r) for r in records)

    # Replay: the payloads, as they were received, through the whole pipeline.
    assert sorted(map(str, iter_payloads(str(path), "dead_letter"))) == sorted(r["payload"] for r in records)
    spec = spec_for(endpoint.url)
    replay = run_pipeline(
        spec,
        read=ReadEvents(str(tmp_path / "dead*"), "dead_letter"),
        previous_attempts=ReadPreviousAttempts(str(tmp_path / "dead*")),
    )
    assert_exactly_once(endpoint, replay, planned_calls(spec, EVENTS))
    [again] = replay.dead
    assert (again.reason, again.payload, again.attempts) == ("not_json", "[1, 2", 2)


def test_a_glob_of_jsonl_and_avro_dead_letters_replays_both(endpoint, tmp_path):
    run_pipeline(spec_for(dead_url()), EVENTS[:3], dead_letter_sink=WriteDeadLetters(str(tmp_path / "a"), "avro"))
    run_pipeline(spec_for(dead_url()), EVENTS[3:], dead_letter_sink=WriteDeadLetters(str(tmp_path / "b"), "jsonl"))
    # A gzipped copy, with a blank line and a line that is not a dead letter.
    [jsonl] = tmp_path.glob("b*.jsonl")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b"\n" + jsonl.read_bytes() + b'\n{"not": "a record"}\n'))
    jsonl.unlink()

    spec = spec_for(endpoint.url)
    replay = run_pipeline(spec, read=ReadEvents(str(tmp_path / "*"), "dead_letter"))
    assert_exactly_once(endpoint, replay, planned_calls(spec, EVENTS))
    [odd] = replay.dead  # the stray line is parsed as input: an event without a name
    assert odd.reason == "invalid_name" and json.loads(odd.payload) == {"not": "a record"}


def test_the_run_command_replays_and_counts_attempts(endpoint, tmp_path, capsys):
    def flow(host: str) -> str:
        path = tmp_path / f"flow-{host.rsplit(':', 1)[1]}.json"
        settings = {"maxRetries": 0, "httpRequestTimeout": 500, "flushAt": 5}
        path.write_text(json.dumps(flow_document(settings, DATA_MAPPING, host=host)))
        return str(path)

    (tmp_path / "events.jsonl").write_text("\n".join(lines([*EVENTS, "oops"])) + "\n")
    common = ["--flush_deadline_seconds", "5", "--delivery_shards", "2", "--progress_interval_seconds", "0"]
    assert (
        cli.main(
            [
                "run",
                "--flow",
                flow(dead_url()),
                "--input",
                str(tmp_path / "events.jsonl"),
                "--dead_letter",
                str(tmp_path / "run1/dead"),
                *common,
            ]
        )
        == 3
    )  # 3: dead letters
    out = capsys.readouterr().out
    assert "dead-lettered 7" in out and "balanced" in out

    assert (
        cli.main(
            [
                "run",
                "--flow",
                flow(endpoint.url),
                "--input",
                str(tmp_path / "run1/dead*"),
                "--input_format",
                "dead_letter",
                "--dead_letter",
                str(tmp_path / "run2/dead"),
                "--dead_letter_format",
                "avro",
                *common,
            ]
        )
        == 3
    )
    out = capsys.readouterr().out
    assert "delivered 6 + dead-lettered 1 + dropped 0 = 7" in out and "balanced" in out
    assert len(endpoint.accepted) == 6
    [record] = fastavro.reader(open(next(tmp_path.glob("run2/dead*.avro")), "rb"))
    assert (record["reason"], record["payload"], record["attempts"]) == ("not_json", "oops", 2)


def test_streaming_dead_letters_are_written_as_avro(tmp_path):
    p = beam.Pipeline(options=PipelineOptions([], streaming=True))
    letters = [
        TimestampedValue(DeadLetter(payload=f"p{i}", stage="parse", reason="not_json", error="e", flow="f"), 10 + i)
        for i in range(3)
    ]
    (
        p
        | test_stream.TestStream().add_elements(letters).advance_watermark_to(120).advance_watermark_to_infinity()
        | CountDeadLetters()
        | WriteDeadLetters(str(tmp_path / "out"), "avro", streaming=True)
    )
    p.run().wait_until_finish()
    records = [r for path in tmp_path.glob("out/*.avro") for r in fastavro.reader(open(path, "rb"))]
    assert sorted(r["payload"] for r in records) == ["p0", "p1", "p2"]


def test_streaming_dead_letters_behind_the_watermark_are_still_written(tmp_path):
    """A batch can wait in BatchCalls for flushInterval (and its send for the flush deadline)
    while the watermark moves on: its dead letters then carry a time whose file window has
    closed. They must still be written, not dropped as late data."""
    p = beam.Pipeline(options=PipelineOptions([], streaming=True))

    def letter(name: str, at: float):
        return TimestampedValue(DeadLetter(payload=name, stage="send", reason="rejected", error="e", flow="f"), at)

    (
        p
        | test_stream.TestStream()
        .add_elements([letter("on-time", 10)])
        .advance_watermark_to(300)  # the window [0, 60) has closed
        .add_elements([letter("behind", 20)])  # e.g. from a batch flushed by the interval timer
        .advance_watermark_to_infinity()
        | WriteDeadLetters(str(tmp_path / "out"), "jsonl", streaming=True)
    )
    p.run().wait_until_finish()
    written = [json.loads(line)["payload"] for path in tmp_path.glob("out/*.jsonl") for line in open(path)]
    assert sorted(written) == ["behind", "on-time"]


# -- the summary ----------------------------------------------------------------------------------
def test_the_summary_flags_a_mismatch():
    counts = {
        "inputs_read": 5,
        "events_parsed": 4,
        "dead_letters_total": 2,
        "dead_letters_stage_parse": 1,
        "dead_letter_not_json": 1,
        "dead_letter_delivery_failed": 1,
        "events_delivered": 2,
        "events_ignored": 1,
    }
    assert reconcile(counts).balanced
    assert "delivered 2 + dead-lettered 2 + dropped 1 = 5" in render(counts) and "balanced" in render(counts)
    lost = {**counts, "events_delivered": 1}
    assert not reconcile(lost).balanced and "MISMATCH by -1" in render(lost)


def test_the_summary_reads_counters_of_runs_without_the_stage_counters():
    counts = {"inputs_read": 2, "events_parsed": 1, "dead_letter_not_json": 1, "events_delivered": 1}
    check = reconcile(counts)
    assert check.balanced and check.parse_dead_letters == 1 and check.dead_lettered == 1


def test_a_dead_letter_record_is_never_read_as_an_event_payload(tmp_path):
    record = DeadLetter(
        payload=orjson.dumps(EVENTS[0]).decode(),
        stage="send",
        reason="delivery_failed",
        error="x",
        flow="default",
        event_id=EVENTS[0]["id"],
        attempts=4,
    )
    path = tmp_path / "d.jsonl"
    path.write_text(record.to_json() + "\n")
    assert list(iter_payloads(str(path), "dead_letter")) == [record.payload]
