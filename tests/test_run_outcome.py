"""How a run ends, as a scheduler sees it: the exit status of every command, the one-line
result, the JSON summary, inputs and flags that are the user's mistake, and dead letters that
a later run at the same prefix never replaces. Real runs of the command line (batch, FnApiRunner)
against the local Segment endpoint."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import fastavro
import pytest
from support import WRITE_KEY, flow_document, poll_until

import schemas
from pipeline.cli import main as cli_main
from pipeline.summary import EXIT_DEAD_LETTERS, EXIT_FAILED, EXIT_OK, EXIT_USAGE, run_outcome

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLOW = str(ROOT / "examples" / "flow.json")
EXAMPLE_EVENTS = ROOT / "examples" / "events.jsonl"
LINES = EXAMPLE_EVENTS.read_text().splitlines()
GOOD = LINES[:5]  # valid, consented events with an identity: all delivered


@pytest.fixture
def example_env(endpoint, monkeypatch):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    return endpoint


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(*argv: str) -> int:
    return cli_main(["run", "--flow", EXAMPLE_FLOW, "--message_id_namespace", "example", *argv])


def result_line(out: str) -> str:
    [line] = [l for l in out.splitlines() if l.startswith("exit status ")]
    return line


# -- exit status and summary -----------------------------------------------------------------
def test_everything_delivered_exits_0_and_writes_the_json_summary(example_env, tmp_path, capsys):
    summary = tmp_path / "reports" / "summary.json"
    code = run(
        "--input",
        write_lines(tmp_path / "good.jsonl", GOOD),
        "--dead_letter",
        str(tmp_path / "dead"),
        "--summary_json",
        str(summary),
        "--run_id",
        "airflow:scheduled__2026-01-01",
    )
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert result_line(out).startswith("exit status 0 (ok): all 5 ended as delivered or dropped by policy")

    document = json.loads(summary.read_text())
    assert document["status"] == 0 and document["status_name"] == "ok"
    assert document["counts"]["events_delivered"] == 5 and document["counts"]["dead_letters"] == 0
    accounting = document["accounting"]
    assert accounting["balanced"] and accounting["outcomes"] == accounting["units"] == 5
    assert accounting["identity"] == "delivered + dead_lettered + dropped = events_parsed + parse_dead_letters"
    assert document["calls_sent_by_type"]["track"] >= 1
    # The run's options, as a scheduler would want to see them again, and never the write key.
    assert document["options"]["flow"] == EXAMPLE_FLOW and document["options"]["max_dead_letter_ratio"] == 0
    assert document["options"]["runner"] == "FnApiRunner"
    assert document["run_id"].endswith("-airflow_scheduled__2026-01-01")  # no ':' in file names
    assert WRITE_KEY not in summary.read_text()


def test_dead_letters_exit_3_unless_tolerated(example_env, tmp_path, capsys):
    events = write_lines(tmp_path / "events.jsonl", LINES)  # 13 units, 3 of them dead letters
    summary = tmp_path / "summary.json"
    assert (
        run("--input", events, "--dead_letter", str(tmp_path / "a"), "--summary_json", str(summary))
        == EXIT_DEAD_LETTERS
    )
    line = result_line(capsys.readouterr().out)
    assert line == (
        "exit status 3 (dead_letters): 3 of 13 ended as dead letters (23.08%), more than --max_dead_letter_ratio 0"
    )
    document = json.loads(summary.read_text())
    assert document["status"] == 3 and document["result"] in line
    assert document["dead_letters_by_reason"] == {"invalid_name": 1, "no_identity": 1, "not_json": 1}
    assert document["accounting"]["dead_letter_ratio"] == pytest.approx(3 / 13, abs=1e-6)

    assert run("--input", events, "--dead_letter", str(tmp_path / "b"), "--max_dead_letter_ratio", "0.25") == EXIT_OK
    assert "within --max_dead_letter_ratio 0.25" in result_line(capsys.readouterr().out)


def test_a_failed_pipeline_exits_1_with_one_line_and_no_traceback(endpoint, tmp_path):
    """The dead letters cannot be written (a file stands where the prefix's folder should be):
    the run fails, and says so in one line on stderr, with the step and the error's own text.
    A real subprocess, as a scheduler runs it."""
    (tmp_path / "taken").write_text("a file, not a folder")
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(flow_document(host=endpoint.url)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--flow",
            str(flow),
            "--input",
            write_lines(tmp_path / "events.jsonl", ["not json"]),
            "--dead_letter",
            str(tmp_path / "taken" / "dead"),
            "--summary_json",
            str(tmp_path / "summary.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == EXIT_FAILED, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    [failure] = [l for l in proc.stderr.splitlines() if l.startswith("run failed: ")]
    assert "(in step 'WriteDeadLetters" in failure and str(tmp_path / "taken") in failure, failure
    assert result_line(proc.stdout).startswith("exit status 1 (failed): the run failed: ")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == EXIT_FAILED


def test_damaged_input_files_fail_the_run():
    """The file readers count input files they could not read whole (``input_files_damaged``); the
    counter may be absent (no reader counted any)."""
    balanced = {"inputs_read": 2, "events_parsed": 2, "events_delivered": 2}
    assert run_outcome(balanced).status == EXIT_OK
    damaged = run_outcome({**balanced, "input_files_damaged": 1})
    assert damaged.status == EXIT_FAILED and "1 input file was truncated or corrupt" in damaged.text
    assert run_outcome({**balanced, "events_delivered": 1}).status == EXIT_FAILED  # accounting off
    assert run_outcome(balanced, stopped=True).status == EXIT_FAILED


def test_explain_exit_status_and_summary_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    good = write_lines(tmp_path / "good.jsonl", GOOD)
    assert cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", good]) == EXIT_OK
    assert (
        capsys.readouterr().err.strip()
        == "explain: exit status 0 (ok): all 5 would end as delivered or dropped by policy"
    )
    assert cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", str(EXAMPLE_EVENTS)]) == EXIT_DEAD_LETTERS
    assert (
        cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", str(EXAMPLE_EVENTS), "--max_dead_letter_ratio", "0.5"])
        == EXIT_OK
    )


def test_explain_reads_standard_input(monkeypatch, capsys):
    """One event pasted over several lines, or JSON Lines."""
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    pretty = json.dumps(json.loads(GOOD[0]), indent=2)
    for text, ids in (
        (pretty, [json.loads(GOOD[0])["id"]]),
        ("\n".join(GOOD[:2]), [json.loads(l)["id"] for l in GOOD[:2]]),
    ):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        assert cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", "-"]) == EXIT_OK
        lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
        assert [l["id"] for l in lines] == ids and all(l["outcome"] == "delivered" for l in lines)


# -- inputs and flags: usage errors (2), one line --------------------------------------------
@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Were a usage error not caught, the run would still only reach a closed loopback port."""
    monkeypatch.setenv("SEGMENT_HOST", "http://127.0.0.1:9")


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _avro(events: list[dict]) -> bytes:
    sections = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")
    out = io.BytesIO()
    records = [{k: (json.dumps(v) if k in sections else v) for k, v in e.items()} for e in events]
    fastavro.writer(out, fastavro.parse_schema(schemas.load("event.avsc")), records)
    return out.getvalue()


@pytest.mark.parametrize("command", ["run", "explain"])
@pytest.mark.parametrize(
    "pattern, fmt",
    [
        ("missing/*.jsonl", "auto"),
        ("missing/*.json", "auto"),
        ("missing/*.avro", "auto"),
        ("missing/*.jsonl.gz", "auto"),
        ("missing/*", "dead_letter"),
        ("events.jsonl", "auto"),
    ],
)
def test_an_input_that_matches_nothing_is_a_usage_error(command, pattern, fmt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    code = cli_main(
        [
            command,
            "--flow",
            EXAMPLE_FLOW,
            "--input",
            str(tmp_path / pattern),
            "--input_format",
            fmt,
            *(["--dead_letter", str(tmp_path / "dead")] if command == "run" else []),
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.splitlines() == [f"--input {tmp_path / pattern}: no file matches (check the path and the glob)"]
    assert not list(tmp_path.glob("dead*"))


@pytest.mark.parametrize("command", ["run", "explain"])
def test_a_directory_or_an_unreadable_file_is_a_usage_error(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    extra = ["--dead_letter", str(tmp_path / "dead")] if command == "run" else []
    (tmp_path / "in").mkdir()
    assert cli_main([command, "--flow", EXAMPLE_FLOW, "--input", str(tmp_path / "in"), *extra]) == EXIT_USAGE
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "in" / "a.jsonl").symlink_to(tmp_path / "gone.jsonl")  # matched by the glob, cannot be read
    (tmp_path / "in" / "b.jsonl").write_text(GOOD[0] + "\n")
    assert (
        cli_main([command, "--flow", EXAMPLE_FLOW, "--input", str(tmp_path / "in" / "*.jsonl"), *extra]) == EXIT_USAGE
    )
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"--input {tmp_path / 'in' / 'a.jsonl'}: cannot read it")


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("run", ["--inptu", "x.jsonl"], "unknown flag --inptu: did you mean --input?"),
        ("run", ["--num_worker", "3"], "unknown flag --num_worker: did you mean --num_workers?"),  # Beam's
        (
            "run",
            ["--max_dead_letter_ration=0.1"],
            "unknown flag --max_dead_letter_ration: did you mean --max_dead_letter_ratio?",
        ),
        ("explain", ["--inptu", "x.jsonl"], "unknown flag --inptu: did you mean --input?"),
        ("validate", ["--flow_nmae", "x"], "unknown flag --flow_nmae: did you mean --flow_name?"),
    ],
)
def test_a_misspelt_flag_is_an_error_with_a_suggestion(command, argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    base = {
        "run": ["--input", str(EXAMPLE_EVENTS), "--dead_letter", str(tmp_path / "dead")],
        "explain": [],
        "validate": [],
    }[command]
    assert cli_main([command, "--flow", EXAMPLE_FLOW, *base, *argv]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [message]
    assert not list(tmp_path.glob("dead*"))


def test_run_does_not_read_standard_input(tmp_path, capsys):
    assert run("--input", "-", "--dead_letter", str(tmp_path / "dead")) == EXIT_USAGE
    assert "standard input is read by explain only" in capsys.readouterr().err


# -- dead letters: each run its own files ----------------------------------------------------
def test_two_runs_at_one_prefix_keep_both_and_a_replay_glob_reads_them_all(example_env, tmp_path, capsys):
    events = write_lines(tmp_path / "events.jsonl", LINES)
    prefix = tmp_path / "out" / "dead-letters"
    assert run("--input", events, "--dead_letter", str(prefix)) == EXIT_DEAD_LETTERS
    first = capsys.readouterr().out
    assert run("--input", events, "--dead_letter", str(prefix)) == EXIT_DEAD_LETTERS
    second = capsys.readouterr().out
    files = sorted(prefix.parent.glob("dead-letters*.jsonl"))
    assert len(files) == 2, files
    # Each summary says where its own run's dead letters are.
    for out, path in zip((first, second), sorted(files, key=lambda f: f.stat().st_mtime)):
        [where] = [l.split()[-1] for l in out.splitlines() if l.strip().startswith("dead letters in")]
        assert Path(where.rstrip("*")).name in path.name
    assert all(len(f.read_text().splitlines()) == 3 for f in files)

    # A replay with a glob over the prefix picks up both runs' dead letters (3 + 3 payloads).
    example_env.reset()
    summary = tmp_path / "replay.json"
    assert (
        run(
            "--input",
            f"{prefix}*",
            "--input_format",
            "dead_letter",
            "--dead_letter",
            str(tmp_path / "replayed"),
            "--summary_json",
            str(summary),
        )
        == EXIT_DEAD_LETTERS
    )
    document = json.loads(summary.read_text())
    assert document["counts"]["inputs_read"] == 6 and document["counts"]["dead_letters"] == 6
    assert document["counters"].get("dead_letters_failed_again") == 6


# -- validate ---------------------------------------------------------------------------------
def test_validate_reports_every_error_including_a_host_with_the_api_path(tmp_path, capsys):
    document = flow_document(
        {
            "host": "https://events.eu1.segmentapis.com/v1/batch/",
            "flushAt": "fifteen",
            "userId": "$var.missing",
            "bogus": 1,
        },
        mapping={"page": {"view": {"nmae": "x"}}},
    )
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(document))
    assert cli_main(["validate", "--flow", str(flow)]) == EXIT_USAGE
    errors = capsys.readouterr().err.splitlines()
    settings = "$.flows.default.destinations.segment.config.settings"
    assert [e.split(": ", 1)[0] for e in errors] == [
        f"{settings}.userId",
        f"{settings}.flushAt",
        "$.flows.default.destinations.segment.config.mapping.page.view",
        settings,
        f"{settings}.host",
    ]
    assert "'https://events.eu1.segmentapis.com/v1/batch/' already ends in /v1/batch" in errors[-1]
    assert "give the base URL only, 'https://events.eu1.segmentapis.com'" in errors[-1]


def test_a_stopped_batch_run_exits_1_and_says_so(endpoint, tmp_path):
    """SIGTERM (a scheduler's timeout) while the run waits for Segment: the summary says the run
    was stopped, exit 1, no traceback."""
    import signal

    from local_segment import delay

    endpoint.fail_next(50, delay(60))
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(flow_document({"maxRetries": 0, "httpRequestTimeout": 90_000}, host=endpoint.url)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--flow",
            str(flow),
            "--input",
            write_lines(tmp_path / "good.jsonl", GOOD),
            "--dead_letter",
            str(tmp_path / "dead"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        # Until the run is sending: a request has reached the endpoint (where it waits 60 s).
        poll_until(lambda: endpoint.requests or proc.poll() is not None, timeout_s=90)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_FAILED, out + err
    assert result_line(out).startswith("exit status 1 (failed): the run was stopped before it finished")
    assert "Traceback" not in err, err


@pytest.mark.parametrize(
    "command, argv",
    [
        ("run", ["--input", str(EXAMPLE_EVENTS), "--dead_letter", "/tmp/never", "--input_format", "bogus"]),
        ("run", ["--input", str(EXAMPLE_EVENTS), "--dead_letter", "/tmp/never", "--num_workers", "many"]),
        ("explain", []),  # --input missing
        ("explain", ["--input", str(EXAMPLE_EVENTS), "--max_dead_letter_ratio", "most"]),
        ("run", ["--input", str(EXAMPLE_EVENTS), "--dead_letter", "/tmp/never", "--max_dead_letter_ratio", "1.5"]),
    ],
)
def test_a_bad_flag_value_is_one_line_not_a_usage_block(command, argv, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    assert cli_main([command, "--flow", EXAMPLE_FLOW, *argv]) == EXIT_USAGE
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"walkeros-segment {command}: ") and "usage:" not in line


def test_validate_lists_the_destinations_errors_even_when_the_outline_is_wrong_too(tmp_path, capsys):
    document = flow_document({"flushAt": "fifteen"}, mapping={"page": {"view": {"nmae": "x"}}})
    document["version"] = 3
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(document))
    assert cli_main(["validate", "--flow", str(flow)]) == EXIT_USAGE
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == "$.version: 4 was expected"
    assert any(".settings.flushAt: expected an integer" in e for e in errors)
    assert any(".mapping.page.view: Additional properties are not allowed ('nmae'" in e for e in errors)
