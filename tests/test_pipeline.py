"""The whole Beam pipeline (batch, DirectRunner) over the bundled example file, against the
local Segment endpoint with the real SDK: exactly these messages arrive, and again on a re-run."""

import json
from pathlib import Path

import orjson
import pytest
from apache_beam.io.iobase import Read
from support import WRITE_KEY, assert_exactly_once, load_json, planned_calls, run_pipeline, strip_sdk_fields

from decide.destination import DestinationSpec, compiled
from decide.flow import load_flow
from pipeline.cli import main as cli_main
from pipeline.explain import explain_payloads
from transforms.chunks import LineChunkSource
from transforms.files import iter_payloads
from transforms.read import ReadEvents

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLOW = str(ROOT / "examples" / "flow.json")
EXAMPLE_EVENTS = str(ROOT / "examples" / "events.jsonl")


def example_spec(endpoint, monkeypatch) -> DestinationSpec:
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    return DestinationSpec.from_flow(load_flow(EXAMPLE_FLOW), namespace="example")


def expected_messages() -> list[dict]:
    return [call for line in load_json("pipeline/example_explained.json") for call in line["calls"]]


def test_example_file_delivers_exactly_the_expected_messages(endpoint, monkeypatch):
    spec = example_spec(endpoint, monkeypatch)
    result = run_pipeline(spec, read=ReadEvents(EXAMPLE_EVENTS))

    received = [strip_sdk_fields(m) for m in endpoint.accepted]
    expected = expected_messages()
    # Across users the order is the runner's; per event the calls stay together and in order.
    assert sorted(received, key=lambda m: m["messageId"]) == sorted(expected, key=lambda m: m["messageId"])
    by_event = {}
    for m in received:
        by_event.setdefault(m["messageId"].split(":")[1], []).append(m["type"])
    assert by_event["a1f0000000000005"] == ["identify", "track"]
    assert by_event["b0b0000000000001"] == ["identify", "page"]

    # What the SDK adds is there too, and the write key travelled only as auth.
    assert all(m["context"]["library"]["name"] == "analytics-python" for m in endpoint.accepted)
    assert endpoint.counters["duplicate"] == 0 and not endpoint.invalid

    assert sorted(result.delivered) == sorted(
        l["id"] for l in load_json("pipeline/example_explained.json") if l["outcome"] == "delivered"
    )
    assert sorted(d.reason for d in result.dead) == ["invalid_name", "no_identity", "not_json"]
    assert all(WRITE_KEY not in orjson.dumps(d.to_dict()).decode() for d in result.dead)
    [not_json] = [d for d in result.dead if d.reason == "not_json"]
    assert not_json.payload == Path(EXAMPLE_EVENTS).read_text().splitlines()[9]
    assert not_json.stage == "parse" and not_json.flow == "default"


def test_a_file_read_in_several_byte_ranges_delivers_each_event_once_as_explain_plans(endpoint, monkeypatch, tmp_path):
    # Users' events out of time order across the whole file, their emails changing now and then:
    # identify fires where explain (every user's events in time order) says, whichever range
    # each event was read in.
    monkeypatch.setenv("SEGMENT_FLUSH_AT", "500")
    spec = example_spec(endpoint, monkeypatch)
    order = sorted(range(6000), key=lambda i: (i * 7919) % 6000)
    events = [
        {
            "name": "product view",
            "id": f"fe11{i:012x}",
            "timestamp": 1767225600000 + i * 1000,
            "user": {"id": f"u{i % 200}", "email": f"u{i % 200}.{i // 1400}@example.com", "session": f"s{i % 200}"},
            "data": {"id": f"p{i}", "name": "n" * 400, "price": i},
            "consent": {"analytics": True},
        }
        for i in order
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    size = path.stat().st_size
    ranges = list(LineChunkSource(str(path)).split(Read.get_desired_chunk_size(size)))
    assert len(ranges) >= 2  # as the runner splits it

    result = run_pipeline(spec, read=ReadEvents(str(path), chunked=True))

    planned = planned_calls(spec, events)
    assert len(planned) == 6000
    assert_exactly_once(endpoint, result, planned)
    identifies = [m for m in endpoint.accepted if m["type"] == "identify"]
    assert 200 < len(identifies) < 6000  # a first identify per user, another per email change


def test_message_ids_are_stable_across_runs(endpoint, monkeypatch):
    spec = example_spec(endpoint, monkeypatch)
    run_pipeline(spec, read=ReadEvents(EXAMPLE_EVENTS))
    first = sorted(m["messageId"] for m in endpoint.accepted)
    endpoint.reset()
    run_pipeline(spec, read=ReadEvents(EXAMPLE_EVENTS))
    # The second run's requests carried the very same ids: Segment deduplicates them all.
    assert endpoint.counters["duplicate"] == len(first) and not endpoint.accepted
    assert len(set(first)) == len(first) and all(len(i) <= 100 for i in first)


def test_explain_matches_the_frozen_example(monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    # 3: the example holds three inputs that would be dead-lettered (docs/operations.md, "Exit status and summary").
    assert (
        cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", EXAMPLE_EVENTS, "--message_id_namespace", "example"])
        == 3
    )
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert lines == load_json("pipeline/example_explained.json")
    assert [l["index"] for l in lines] == list(range(len(lines)))


@pytest.mark.parametrize("fmt", ["json-array", "json-batch", "jsonl.gz", "avro"])
def test_every_file_format_gives_the_same_calls(tmp_path, fmt, monkeypatch):
    import gzip

    import fastavro

    import schemas

    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    events = [json.loads(l) for l in Path(EXAMPLE_EVENTS).read_text().splitlines()[:5]]
    if fmt == "json-array":
        path = tmp_path / "events.json"
        path.write_text(json.dumps(events))
    elif fmt == "json-batch":
        path = tmp_path / "events.json.gz"
        path.write_bytes(gzip.compress(json.dumps({"batch": events}).encode()))
    elif fmt == "jsonl.gz":
        path = tmp_path / "events.jsonl.gz"
        path.write_bytes(gzip.compress("\n".join(json.dumps(e) for e in events).encode()))
    else:
        path = tmp_path / "events.avro"
        sections = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")
        records = [{k: (json.dumps(v) if k in sections else v) for k, v in e.items()} for e in events]
        with open(path, "wb") as f:
            fastavro.writer(f, fastavro.parse_schema(schemas.load("event.avsc")), records)
    destination = compiled(DestinationSpec.from_flow(load_flow(EXAMPLE_FLOW), namespace="example"))
    lines = list(explain_payloads(destination, iter_payloads(str(path))))
    assert lines == load_json("pipeline/example_explained.json")[:5]


def test_a_glob_reads_every_matching_file_in_name_order(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    lines = Path(EXAMPLE_EVENTS).read_text().splitlines()
    (tmp_path / "part-1.jsonl").write_text("\n".join(lines[:3]) + "\n\n")
    (tmp_path / "part-2.jsonl").write_text("\n".join(lines[3:5]))
    destination = compiled(DestinationSpec.from_flow(load_flow(EXAMPLE_FLOW), namespace="example"))
    explained = list(explain_payloads(destination, iter_payloads(str(tmp_path / "part-*.jsonl"))))
    assert explained == load_json("pipeline/example_explained.json")[:5]


def test_run_command_writes_dead_letters(endpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    prefix = tmp_path / "dead"
    # 3: the run finished, and wrote dead letters.
    assert cli_main(["run", "--flow", EXAMPLE_FLOW, "--input", EXAMPLE_EVENTS, "--dead_letter", str(prefix)]) == 3
    out = capsys.readouterr().out
    assert "events delivered" in out and "dead letters" in out
    [dead_file] = tmp_path.glob("dead*.jsonl")
    records = [json.loads(l) for l in dead_file.read_text().splitlines()]
    assert sorted(r["reason"] for r in records) == ["invalid_name", "no_identity", "not_json"]
    assert set(records[0]) >= {"payload", "stage", "reason", "error", "time", "flow", "attempts"}
    assert WRITE_KEY not in dead_file.read_text()
    assert len(endpoint.accepted) == len(expected_messages())


def test_run_command_reports_missing_flags(capsys):
    assert cli_main(["run", "--flow", EXAMPLE_FLOW]) == 2
    err = capsys.readouterr().err
    assert "--input" in err and "--dead_letter" in err
