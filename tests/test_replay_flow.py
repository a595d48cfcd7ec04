"""Replay honours each dead letter's own flow and messageId namespace: dead letters written by
flow b (or under another namespace) are not replayed under flow a's mapping and namespace,
where Segment could not deduplicate them; the run refuses, says why and how (exit 2)."""

from __future__ import annotations

import json

import pytest
from support import WRITE_KEY

from pipeline.cli import main as cli_main

TWO_FLOWS = {
    "version": 4,
    "flows": {
        name: {
            "destinations": {
                "segment": {
                    "package": "@walkeros/server-destination-segment",
                    "config": {"settings": {"writeKey": WRITE_KEY, "host": "http://127.0.0.1:9"}},
                }
            }
        }
        for name in ("a", "b")
    },
}


@pytest.fixture
def flow_file(tmp_path):
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(TWO_FLOWS))
    return str(path)


def write_dead_letters(tmp_path, flow_file, flow_name, *flags) -> str:
    source = tmp_path / "events.jsonl"
    source.write_text("not json\n")
    prefix = tmp_path / f"dead-{flow_name}" / "dead"
    cli_main(
        [
            "run",
            "--flow",
            flow_file,
            "--flow_name",
            flow_name,
            "--input",
            str(source),
            "--dead_letter",
            str(prefix),
            *flags,
        ]
    )
    [path] = prefix.parent.glob("dead*")
    return str(path)


def test_dead_letters_record_the_namespace(tmp_path, flow_file, capsys):
    path = write_dead_letters(tmp_path, flow_file, "b", "--message_id_namespace", "acme-b")
    [record] = [json.loads(l) for l in open(path)]
    assert record["flow"] == "b" and record["namespace"] == "acme-b"


@pytest.mark.parametrize("command", ["run", "explain"])
def test_replaying_another_flows_dead_letters_is_refused(tmp_path, flow_file, capsys, command):
    path = write_dead_letters(tmp_path, flow_file, "b")
    capsys.readouterr()
    argv = [command, "--flow", flow_file, "--flow_name", "a", "--input", path, "--input_format", "dead_letter"]
    if command == "run":
        argv += ["--dead_letter", str(tmp_path / "again" / "dead")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "flow 'b'" in err and "flow 'a'" in err and "--flow_name b" in err
    assert not (tmp_path / "again").exists()


def test_replaying_under_another_namespace_is_refused(tmp_path, flow_file, capsys):
    path = write_dead_letters(tmp_path, flow_file, "b", "--message_id_namespace", "acme-b")
    capsys.readouterr()
    code = cli_main(
        [
            "run",
            "--flow",
            flow_file,
            "--flow_name",
            "b",
            "--input",
            path,
            "--input_format",
            "dead_letter",
            "--dead_letter",
            str(tmp_path / "again" / "dead"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "acme-b" in err and "--message_id_namespace acme-b" in err


def test_replaying_with_the_same_flow_and_namespace_runs(tmp_path, flow_file, capsys):
    path = write_dead_letters(tmp_path, flow_file, "b", "--message_id_namespace", "acme-b")
    code = cli_main(
        [
            "run",
            "--flow",
            flow_file,
            "--flow_name",
            "b",
            "--message_id_namespace",
            "acme-b",
            "--input",
            path,
            "--input_format",
            "dead_letter",
            "--dead_letter",
            str(tmp_path / "again" / "dead"),
        ]
    )
    assert code == 3  # the event dead-letters again: the run says so
    [again] = (tmp_path / "again").glob("dead*")
    [record] = [json.loads(l) for l in open(again)]
    assert record["attempts"] == 2 and record["namespace"] == "acme-b"


@pytest.mark.parametrize("fmt", ["jsonl", "avro"])
def test_the_dead_letter_layout_is_the_same_in_batch_and_streaming(tmp_path, fmt):
    """Every field of schemas/dead_letter.avsc, in batch files, streaming files and topic
    records alike (a topic record is the JSON Lines record), so one replay reads them all."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing import test_stream

    import schemas
    from decide.dead_letter import DeadLetter
    from transforms.dead_letters import WriteDeadLetters
    from transforms.files import dead_letter_records, iter_payloads

    fields = [f["name"] for f in schemas.load("dead_letter.avsc")["fields"]]
    letters = [
        DeadLetter(payload="x", stage="parse", reason="not_json", error="e", flow="a", namespace="n"),
        DeadLetter(
            payload="/w==",
            payload_encoding="base64",
            stage="parse",
            reason="not_json",
            error="e",
            flow="a",
            namespace="n",
        ),
    ]
    with beam.Pipeline(options=PipelineOptions([], runner="FnApiRunner")) as p:
        p | beam.Create(letters) | WriteDeadLetters(str(tmp_path / "batch" / "dead"), fmt)
    stream = test_stream.TestStream().add_elements(letters).advance_watermark_to_infinity()
    p = beam.Pipeline(options=PipelineOptions([], streaming=True, runner="BundleBasedDirectRunner"))
    p | stream | WriteDeadLetters(str(tmp_path / "streaming" / "dead"), fmt, streaming=True)
    p.run().wait_until_finish()

    for mode in ("batch", "streaming"):
        [path] = list((tmp_path / mode).rglob(f"*.{fmt}"))
        records = list(dead_letter_records(str(path)))
        assert [sorted(r) for r in records] == [sorted(fields)] * 2, mode
        assert sorted(iter_payloads(str(path), "dead_letter"), key=str) == [b"\xff", "x"]
        assert [sorted(DeadLetter(**r).to_dict()) for r in records] == [sorted(fields)] * 2
