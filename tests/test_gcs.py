"""Backfills from gs:// against a GCS emulator (gcp-storage-emulator, from PyPI, on loopback).

Beam's GCS IO talks to ``STORAGE_EMULATOR_HOST`` when it is set. Its first gs:// access in a
process looks up Google credentials, which retries for about 25 s when there are none; the
``gcs`` fixture short-circuits that (tests/emulators.py). Everything else is the product as is:
the batch pipeline reading every input format from gs://, dead letters written to gs://, a flow
file on gs://, and dead letters replayed from gs://.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from pathlib import Path

import fastavro
import pytest
from emulators import GCS_BUCKET
from support import WRITE_KEY, load_json, run_pipeline, strip_sdk_fields

import schemas
from decide.destination import DestinationSpec, compiled
from decide.flow import load_flow
from pipeline.cli import main as cli_main
from pipeline.explain import explain_payloads
from transforms.files import dead_letter_records, iter_payloads
from transforms.read import ReadEvents

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLOW = ROOT / "examples" / "flow.json"
EXAMPLE_EVENTS = ROOT / "examples" / "events.jsonl"
LINES = EXAMPLE_EVENTS.read_text().splitlines()
EVENTS = [json.loads(line) for line in LINES[:5]]  # the first five are valid events
SECTIONS = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")
GS = f"gs://{GCS_BUCKET}"


def explained() -> list[dict]:
    return load_json("pipeline/example_explained.json")


@pytest.fixture(scope="module")
def backfill(gcs):  # noqa: F811
    """The example events on the emulator, once per format, as a backfill would find them."""

    def put(name: str, data: bytes) -> None:
        gcs.blob(name).upload_from_string(data)

    put("events/2026/01/01/part-1.jsonl", ("\n".join(LINES[:6]) + "\n").encode())
    put("events/2026/01/01/part-2.jsonl", ("\n".join(LINES[6:]) + "\n").encode())
    put("formats/array.json", json.dumps(EVENTS).encode())
    put("formats/batch.json.gz", gzip.compress(json.dumps({"batch": EVENTS}).encode()))
    put("formats/lines.jsonl.gz", gzip.compress("\n".join(json.dumps(e) for e in EVENTS).encode()))
    records = [{k: (json.dumps(v) if k in SECTIONS else v) for k, v in e.items()} for e in EVENTS]
    avro = io.BytesIO()
    fastavro.writer(avro, fastavro.parse_schema(schemas.load("event.avsc")), records)
    put("formats/events.avro", avro.getvalue())
    put("flows/flow.json", EXAMPLE_FLOW.read_bytes())
    return gcs


def test_backfill_from_gcs_delivers_and_dead_letters_to_gcs(backfill, endpoint, monkeypatch, capsys):
    started = time.monotonic()
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    code = cli_main(
        [
            "run",
            "--flow",
            f"{GS}/flows/flow.json",
            "--input",
            f"{GS}/events/2026/*/*/*.jsonl",
            "--dead_letter",
            f"{GS}/dead/run-1/dead-letters",
            "--message_id_namespace",
            "example",
        ]
    )
    assert code == 3, capsys.readouterr().err  # finished, with dead letters
    took = time.monotonic() - started
    assert took < 15, f"the backfill took {took:.0f} s: is the credential look-up short-circuited?"

    expected = [call for line in explained() for call in line["calls"]]
    received = [strip_sdk_fields(m) for m in endpoint.accepted]
    key = lambda m: m["messageId"]  # noqa: E731
    assert sorted(received, key=key) == sorted(expected, key=key)

    dead_files = [b.name for b in backfill.list_blobs(prefix="dead/run-1/")]
    assert dead_files and all(name.endswith(".jsonl") for name in dead_files), dead_files
    records = [r for name in dead_files for r in dead_letter_records(f"{GS}/{name}")]
    assert sorted(r["reason"] for r in records) == ["invalid_name", "no_identity", "not_json"]
    assert WRITE_KEY not in "".join(backfill.blob(n).download_as_text() for n in dead_files)
    assert "events delivered" in capsys.readouterr().out

    # Replaying those dead letters from gs:// gives the same dead letters again (the inputs are
    # still bad), and nothing more reaches Segment.
    endpoint.reset()
    code = cli_main(
        [
            "run",
            "--flow",
            f"{GS}/flows/flow.json",
            "--input",
            f"{GS}/dead/run-1/*.jsonl",
            "--input_format",
            "dead_letter",
            "--dead_letter",
            f"{GS}/dead/run-2/dead-letters",
            "--message_id_namespace",
            "example",
        ]
    )
    assert code == 3, capsys.readouterr().err
    again = [r for b in backfill.list_blobs(prefix="dead/run-2/") for r in dead_letter_records(f"{GS}/{b.name}")]
    assert sorted(r["reason"] for r in again) == ["invalid_name", "no_identity", "not_json"]
    assert sorted(r["payload"] for r in again) == sorted(r["payload"] for r in records)
    assert not endpoint.accepted


@pytest.mark.parametrize("name", ["array.json", "batch.json.gz", "lines.jsonl.gz", "events.avro"])
def test_every_format_reads_from_gcs(backfill, endpoint, monkeypatch, name):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    spec = DestinationSpec.from_flow(load_flow(str(EXAMPLE_FLOW)), namespace="example")
    pattern = f"{GS}/formats/{name.split('.', 1)[0]}.*"
    fmt = {"array.json": "json", "batch.json.gz": "json", "lines.jsonl.gz": "jsonl", "events.avro": "avro"}[name]

    # The same files through explain (no Beam) ...
    lines = list(explain_payloads(compiled(spec), iter_payloads(f"{GS}/formats/{name}")))
    assert lines == explained()[:5]
    # ... and through the batch pipeline, gs:// glob and all.
    result = run_pipeline(spec, read=ReadEvents(pattern, fmt))
    assert not result.dead
    assert sorted(result.delivered) == sorted(line["id"] for line in explained()[:5] if line["outcome"] == "delivered")
    expected = [call for line in explained()[:5] for call in line["calls"]]
    received = [strip_sdk_fields(m) for m in endpoint.accepted]
    assert sorted(received, key=lambda m: m["messageId"]) == sorted(expected, key=lambda m: m["messageId"])


def test_flow_file_on_gcs(backfill, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    assert cli_main(["validate", "--flow", f"{GS}/flows/flow.json"]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    backfill.blob("flows/broken.json").upload_from_string(b'{"version": 4, ')
    assert cli_main(["validate", "--flow", f"{GS}/flows/broken.json"]) == 2
    assert f"{GS}/flows/broken.json: not valid JSON" in capsys.readouterr().err
    assert cli_main(["validate", "--flow", f"{GS}/flows/missing.json"]) == 2
    assert f"{GS}/flows/missing.json: cannot read the flow file" in capsys.readouterr().err


def test_no_match_on_gcs_is_a_clear_error(backfill, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    assert cli_main(["explain", "--flow", str(EXAMPLE_FLOW), "--input", f"{GS}/nothing/*.jsonl"]) == 2
    assert "no file matches" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "explain"])
@pytest.mark.parametrize(
    "pattern",
    [
        "nothing/*.jsonl",
        "nothing/*.json",
        "nothing/*.avro",
        "nothing/*.jsonl.gz",
        "formats/*.ndjson",
        "no-such-object.jsonl",
    ],
)
def test_an_empty_glob_on_gcs_is_a_usage_error(backfill, command, pattern, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", "http://127.0.0.1:9")  # never reached: the run does not start
    extra = ["--dead_letter", f"{GS}/dead/empty/dead-letters"] if command == "run" else []
    assert cli_main([command, "--flow", str(EXAMPLE_FLOW), "--input", f"{GS}/{pattern}", *extra]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"--input {GS}/{pattern}: no file matches (check the path and the glob)"
    ]
    assert not list(backfill.list_blobs(prefix="dead/empty/"))


def test_summary_json_on_gcs(backfill, endpoint, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    code = cli_main(
        [
            "run",
            "--flow",
            str(EXAMPLE_FLOW),
            "--input",
            f"{GS}/formats/array.json",
            "--dead_letter",
            f"{GS}/dead/summary/dead-letters",
            "--summary_json",
            f"{GS}/reports/run.json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    document = json.loads(backfill.blob("reports/run.json").download_as_text())
    assert document["status"] == 0 and document["counts"]["events_delivered"] == 5
    assert document["accounting"]["balanced"] and WRITE_KEY not in json.dumps(document)
