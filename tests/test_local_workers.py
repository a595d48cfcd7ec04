"""A local batch run on worker processes: chosen for large plain JSON Lines inputs only, the
same deliveries as in one process, and the same one-line output (no worker tracebacks, no
Beam start-up notices, the workers' warnings as their own lines)."""

from __future__ import annotations

import gc
import gzip
import io
import json
import logging
import os
import signal
import subprocess
import sys

from apache_beam.options.pipeline_options import PipelineOptions
from support import event, flow_document, poll_until

from local_segment import LocalSegment, delay
from pipeline import cli, local_workers
from pipeline.local_worker import WithoutTracebacks
from pipeline.local_workers import RELAY_LOGGER, WorkerLogLines, choose, local_runner, user_chose

MB = 1024**2


# --- which runs get workers ---------------------------------------------------------------------


def test_only_a_large_plain_json_lines_input_gets_workers(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(local_workers, "WORKER_INPUT_BYTES", 1000)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"{}\n" * 400)
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"{}\n" * 10)
    choice = choose(str(big), "auto", cores=2)
    assert choice is not None and choice.workers == 2 and choice.input_bytes == 1200
    assert "2 worker processes" in choice.line() and "--direct_num_workers=1" in choice.line()
    assert choose(str(tmp_path / "*.jsonl"), "auto", cores=8).workers == local_workers.MAX_WORKERS
    assert choose(str(small), "auto", cores=2) is None  # start-up would cost more than it saves
    assert choose(str(big), "auto", cores=1) is None
    assert choose("-", "jsonl", cores=2) is None
    assert choose(str(tmp_path / "none-*.jsonl"), "auto", cores=2) is None
    (tmp_path / "big.avro").write_bytes(b"x" * 2000)
    assert choose(str(tmp_path / "big.avro"), "auto", cores=2) is None  # read whole by one worker
    (tmp_path / "also.jsonl.gz").write_bytes(gzip.compress(b"{}\n" * 400))
    assert choose(str(tmp_path / "*"), "jsonl", cores=2) is None  # a compressed file: one reader each


def test_the_users_own_flags_win() -> None:
    assert user_chose(["--direct_num_workers=1"]) and user_chose(["--direct_running_mode", "multi_processing"])
    assert not user_chose(["--direct_num_workers_x=1", "--input", "a"])
    assert local_runner(PipelineOptions(["--runner", "FnApiRunner"])) is None
    assert local_runner(PipelineOptions(["--runner", "FnApiRunner", "--direct_num_workers", "1"])) is None
    beams_own = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    assert local_runner(PipelineOptions(["--runner", "FnApiRunner", *beams_own])) is None
    ours = local_runner(PipelineOptions(["--runner", "FnApiRunner", "--direct_num_workers", "2"]))
    assert ours is not None and "pipeline.local_worker" in ours._default_environment.command_string


def test_malloc_arenas_are_capped_where_glibc_is() -> None:
    # The test machine's Python runs on glibc; elsewhere the call changes nothing and says so.
    assert local_workers.limit_malloc_arenas() is True


def test_a_local_run_and_its_workers_collect_garbage_less_often() -> None:
    before = gc.get_threshold()
    try:
        cli._settle_heap()  # what the command does before it runs the pipeline
        assert gc.get_threshold() == local_workers.GC_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    # A worker, through its real entry point, up to where Beam's worker would start.
    probe = (
        "import gc, sys\n"
        "from apache_beam.runners.worker import sdk_worker_main\n"
        "sdk_worker_main.main = lambda argv: print(gc.get_threshold())\n"
        "from pipeline import local_worker\n"
        "local_worker.main()\n"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == str(local_workers.GC_THRESHOLD)


# --- what the workers' output looks like --------------------------------------------------------


def relayed(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    # As Beam's relay logs a worker's record: the LogEntry's protobuf text on one line.
    entry = f'severity: WARN timestamp {{   seconds: 1 }} message: "{message}" log_location: "x.py:1" thread: "1"'
    return logging.LogRecord(RELAY_LOGGER, level, "x.py", 1, "Worker: %s", (entry,), None)


def test_a_worker_record_reads_as_its_own_message() -> None:
    record = relayed(r"the function at $.a failed: Error: no term \303\251 \"x\" (its value is undefined)")
    assert WorkerLogLines().filter(record)
    assert record.getMessage() == 'worker: the function at $.a failed: Error: no term é "x" (its value is undefined)'


def test_beams_start_up_notices_and_tracebacks_are_left_out() -> None:
    quiet, debug = WorkerLogLines(), WorkerLogLines(keep_tracebacks=True)
    assert not quiet.filter(relayed("No semi_persistent_directory found: User registered objects"))
    assert not quiet.filter(relayed("Discarding unparseable args: ['--x']"))
    failed = r"Error processing instruction 7. Original traceback is\nTraceback (most recent call last):\n  File"
    assert not quiet.filter(relayed(failed))
    assert debug.filter(relayed(failed))
    other = logging.LogRecord(RELAY_LOGGER, logging.INFO, "x.py", 1, "Job state: %s", ("DONE",), None)
    assert quiet.filter(other) and other.getMessage() == "Job state: DONE"


def test_the_workers_stderr_drops_a_failed_bundles_traceback_only() -> None:
    out = io.StringIO()
    stream = WithoutTracebacks(out)
    print("Traceback (most recent call last):\n  File 'x'\nValueError: boom", file=stream)
    print("a line of its own", file=stream)
    stream.write("\n")
    assert out.getvalue() == "a line of its own\n\n"


# --- a run on two workers -----------------------------------------------------------------------


def _run(tmp_path, endpoint_url: str, workers: int, name: str) -> int:
    settings = {
        "flushAt": 20,
        "userId": "user.id",
        "anonymousId": "user.session",
        "identify": {"map": {"traits": {"map": {"email": "user.email"}}}},
    }
    flow = tmp_path / f"flow-{name}.json"
    flow.write_text(json.dumps(flow_document(settings, host=endpoint_url)))
    return cli.main(
        [
            "run",
            "--flow",
            str(flow),
            "--input",
            str(tmp_path / "events.jsonl"),
            "--dead_letter",
            str(tmp_path / f"dead-{name}"),
            "--progress_interval_seconds",
            "0",
            f"--direct_num_workers={workers}",
        ]
    )


def _events(count: int) -> list[dict]:
    # 30 users, each logging in with an email that changes now and then: identify fires on a
    # change only, decided across the whole input.
    return [
        event(i, user={"id": f"u{i % 30}", "session": f"s{i % 30}", "email": f"u{i % 30}-{i // 120}@example.com"})
        for i in range(count)
    ]


def test_two_workers_deliver_what_one_process_delivers_and_say_it_the_same_way(tmp_path, capfd) -> None:
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in _events(600)) + "\n")
    runs = {}
    for workers in (1, 2):
        with LocalSegment() as endpoint:
            code = _run(tmp_path, endpoint.url, workers, str(workers))
            out, err = capfd.readouterr()
            runs[workers] = (code, sorted(json.dumps(m, sort_keys=True) for m in endpoint.accepted), out, err)
    one, two = runs[1], runs[2]
    assert one[0] == two[0] == 0
    assert one[1] == two[1] and len(one[1]) > 600  # every event, and its identify calls, once
    assert [line for line in one[2].splitlines() if "delivered" in line or "suppressed" in line] == [
        line for line in two[2].splitlines() if "delivered" in line or "suppressed" in line
    ]
    assert "Traceback" not in two[3] and "semi_persistent" not in two[3] and "Worker:" not in two[3]


def test_a_workers_failure_is_one_line(tmp_path, capfd) -> None:
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in _events(100)) + "\n")
    with LocalSegment("the-right-key", strict=True) as strict:
        code = _run(tmp_path, strict.url, 2, "failing")
    out, err = capfd.readouterr()
    assert code != 0
    assert "Traceback" not in out + err
    failed = [line for line in err.splitlines() if line.startswith("run failed:")]
    assert len(failed) == 1 and "HTTP 401" in failed[0] and "writeKey" in failed[0]
    assert "RuntimeError" not in failed[0] and "segment_api" not in failed[0]


def test_ctrl_c_stops_a_run_on_workers_as_it_stops_one_in_one_process(tmp_path) -> None:
    # Ctrl-C reaches the command and its workers alike (one process group): the command stops
    # the run and then the workers, and says so in its own words.
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in _events(100)) + "\n")
    with LocalSegment() as endpoint:
        endpoint.fail_next(10, delay(30))  # the run is still sending when Ctrl-C comes
        flow = tmp_path / "flow.json"
        flow.write_text(json.dumps(flow_document({"flushAt": 20}, host=endpoint.url)))
        argv = ["run", "--flow", str(flow), "--input", str(tmp_path / "events.jsonl")]
        argv += ["--dead_letter", str(tmp_path / "dead"), "--direct_num_workers=2"]
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert poll_until(lambda: endpoint.counters["requests"] > 0, timeout_s=120)
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "was stopped" in out and "exit status 1" in out
    assert "Traceback" not in err and "Worker" not in err, err
    left = subprocess.run(["pgrep", "-g", str(run.pid)], capture_output=True, text=True).stdout
    assert left == ""  # no worker outlives the command
