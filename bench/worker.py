"""One measured variant, run in its own process so its peak RSS is its own.

``python -m bench.worker MODE --result FILE ...`` writes one JSON object to FILE:
``work_s`` (wall seconds of the measured work, from just before the first event is read to
just after the last one is done; interpreter start-up and imports excluded, the variant's own
set-up -- flow loading, compiling, Beam's runner start -- included), ``cpu_s`` (CPU seconds of
this process in that span, all threads) and mode-specific counts. Peak RSS is taken by the
parent from ``wait4`` (and ``VmHWM`` here, as a cross-check).

Modes:
  transform  a plain loop over the lines: parse → consent → map → rule consent → identity and
             calls → identify/group dedup, with the project's own functions (the
             ``Destination`` steps the DoFns call), no Beam, no network, nothing written.
  calls      the same loop, writing each delivered event's messages as one JSON line (the
             input of ``send``; not measured).
  send       the SDK alone: the ``calls`` file into a bare SDK ``Client`` fed as fast as it
             takes messages (its consumer thread batching ``upload_size`` = flushAt); with
             ``--client post`` each batch (cut as the sink cuts them) through the SDK's own request
             function ``segment.analytics.request.post``; with ``--client sink`` through the
             pipeline's own sink (``PipelinedSender`` over ``SegmentConnection``: one request per
             batch, each settled with its fate), for comparison.
  pipeline   ``walkeros-segment run`` in this process: the Beam batch pipeline on the FnApiRunner
             reading the file and delivering to ``$BENCH_SEGMENT_HOST``, on ``--workers``
             worker processes (1: in this process); CPU includes the workers', and
             ``tree_peak_rss_kb`` is the peak of this process's and theirs summed.
  explain    ``walkeros-segment explain`` in this process, its output written to /dev/null.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import orjson


def vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_PROFILER = None  # a cProfile.Profile with --profile: it covers the measured span only


def _cpu_s() -> float:
    # This process's threads and its children's once they ended (a pipeline's worker processes).
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, now."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            total = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):  # each thread's own children (Beam starts workers from threads)
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return total
    return total + sum(_tree_rss_kb(child) for child in children)


class _TreePeak:
    """The peak of the summed RSS of this process and its descendants (a pipeline on worker
    processes), sampled every 50 ms; wait4 gives only the largest single process's."""

    def __init__(self):
        import threading

        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, _tree_rss_kb(os.getpid()))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


class _Span:
    def __enter__(self):
        if _PROFILER is not None:
            _PROFILER.enable()
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = _cpu_s() - self.cpu0
        if _PROFILER is not None:
            _PROFILER.disable()


# -- transform / calls -------------------------------------------------------------------------
def _transform(flow: str, path: str, calls_out: str | None, allow_python: bool = False) -> dict:
    from decide.calls import EventCalls
    from decide.dead_letter import DeadLetter
    from decide.destination import CONSENT_DENIED, DEAD_LETTER, IGNORED, compiled
    from decide.event import parse_payload
    from decide.functions import FunctionPolicy
    from pipeline.cli import load_spec

    out = open(calls_out, "wb", buffering=1 << 20) if calls_out else None
    inputs = events = dead = denied = ignored = delivered = messages_sent = suppressed_calls = 0
    with _Span() as span:
        spec = load_spec(flow, functions=FunctionPolicy(allow_python=allow_python))
        destination = compiled(spec)
        collector, flow_name = spec.collector, spec.flow_name
        # The per-event steps as explain runs them (Destination.before_deduplication), then the
        # decision in input order (the file is in event-time order per user).
        before_deduplication, deduplicate = destination.before_deduplication, destination.deduplicate
        states: dict = {}
        with open(path, "rb") as f:
            for line in f:
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                inputs += 1
                for item in parse_payload(line, collector=collector, flow=flow_name):
                    if isinstance(item, DeadLetter):
                        dead += 1
                        continue
                    events += 1
                    planned = before_deduplication(item)
                    if not isinstance(planned, EventCalls):
                        outcome = planned.outcome
                        dead += outcome == DEAD_LETTER
                        denied += outcome == CONSENT_DENIED
                        ignored += outcome == IGNORED
                        continue
                    key = planned.key
                    messages, states[key], suppressed = deduplicate(planned, states.get(key))
                    delivered += 1
                    messages_sent += len(messages)
                    suppressed_calls += len(suppressed)
                    if out is not None:
                        out.write(orjson.dumps(messages))
                        out.write(b"\n")
    if out is not None:
        out.close()
    counts = {
        "inputs": inputs,
        "events": events,
        "dead_letters": dead,
        "consent_denied": denied,
        "ignored": ignored,
        "delivered": delivered,
        "messages": messages_sent,
        "suppressed": suppressed_calls,
        "keys": len(states),
    }
    return {"work_s": span.wall, "cpu_s": span.cpu, **counts}


# -- send --------------------------------------------------------------------------------------
def _send(calls_path: str, flush_at: int, client: str, flow_path: str) -> dict:
    from decide.wire import MAX_BATCH_MESSAGES, EventMessages
    from pipeline.cli import load_spec
    from segment_api.connection import SegmentConnection, SendOptions
    from segment_api.sender import PipelinedSender

    spec = load_spec(flow_path)  # settings (host from $BENCH_SEGMENT_HOST, write key, retries)
    settings = spec.settings
    cap = max(1, min(flush_at, MAX_BATCH_MESSAGES))
    counts = {"delivered": 0, "failed": 0, "messages": 0, "requests": 0, "batches": 0, "not_queued": 0}
    if client == "bare":
        return _send_bare(calls_path, cap, settings, counts)
    if client == "post":
        return _send_post(calls_path, cap, settings, counts)
    with _Span() as span:
        connection = SegmentConnection(settings, SendOptions(flush_deadline_s=120))

        def deliveries():
            with open(calls_path, "rb") as f:
                for line in f:
                    delivery = EventMessages({}, orjson.loads(line))
                    counts["messages"] += len(delivery.messages)
                    yield delivery

        sender = PipelinedSender(connection, spec.flow_name)

        def tally(settled):
            for _, result in settled:
                counts["delivered"] += len(result.delivered)
                counts["failed"] += len(result.failed)
                counts["requests"] += len(result.requests)
                counts["batches"] += 1

        for batch in _split_batches(deliveries(), cap):
            tally(sender.submit(batch))
        tally(sender.drain())
        sender.close()
        connection.close()
    return {"work_s": span.wall, "cpu_s": span.cpu, "client": "PipelinedSender", **counts}


def _send_bare(calls_path: str, cap: int, settings, counts: dict) -> dict:
    from segment.analytics import Client

    from bench.sdk_client import client_call

    failures = []
    with _Span() as span:
        key = settings.write_key.reveal()
        client = Client(
            key,
            host=settings.sdk_host(),
            upload_size=cap,
            max_queue_size=50_000,
            max_retries=settings.max_retries,
            thread=1,
            on_error=lambda exc, batch: failures.append(len(batch)),
        )
        queue = client.queue
        with open(calls_path, "rb") as f:
            for line in f:
                counts["delivered"] += 1
                for m in orjson.loads(line):
                    while queue.qsize() > 40_000:  # keep the SDK's queue from refusing (it drops silently)
                        time.sleep(0.002)
                    ok, _ = client_call(client, m)
                    counts["messages"] += 1
                    counts["not_queued"] += 0 if ok else 1
        client.shutdown()
    counts["failed"] = sum(failures)
    return {"work_s": span.wall, "cpu_s": span.cpu, "client": "bare Client", **counts}


def _send_post(calls_path: str, cap: int, settings, counts: dict) -> dict:
    """Each batch (cut as the sink cuts it) through the SDK's own request function,
    ``segment.analytics.request.post``, one after the other, messages in the Client's form."""
    from segment.analytics.request import post

    from decide.wire import EventMessages, sdk_message

    with _Span() as span:
        key, host = settings.write_key.reveal(), settings.sdk_host()

        def deliveries():
            with open(calls_path, "rb") as f:
                for line in f:
                    yield EventMessages({}, orjson.loads(line))

        for batch in _split_batches(deliveries(), cap):
            messages = [sdk_message(m) for d in batch for m in d.messages]
            post(key, host, timeout=settings.http_request_timeout_ms / 1000, batch=messages)
            counts["delivered"] += len(batch)
            counts["messages"] += len(messages)
            counts["requests"] += 1
            counts["batches"] += 1
    return {"work_s": span.wall, "cpu_s": span.cpu, "client": "SDK request.post", **counts}


def _split_batches(deliveries, flush_at: int):
    """Batches as the pipeline's sink cuts them."""
    from decide.wire import split_batches

    return split_batches(deliveries, flush_at)


# -- the real commands -------------------------------------------------------------------------
def _pipeline(flow: str, path: str, dead_letter: str, workers: int) -> dict:
    import pipeline.graph  # noqa: F401 - imported before the span: imports are start-up, not work
    import pipeline.summary  # noqa: F401
    from pipeline.cli import main as cli_main

    captured = io.StringIO()
    argv = ["run", "--flow", flow, "--input", path, "--dead_letter", dead_letter, f"--direct_num_workers={workers}"]
    tree = _TreePeak()
    with _Span() as span, contextlib.redirect_stdout(captured):
        code = cli_main(argv)
    return {
        "work_s": span.wall,
        "cpu_s": span.cpu,
        "exit_code": code,
        "summary": captured.getvalue(),
        "tree_peak_rss_kb": tree.stop(),
    }


def _explain(flow: str, path: str) -> dict:
    import pipeline.explain  # noqa: F401 - imported before the span
    import transforms.read  # noqa: F401
    import transforms.steps  # noqa: F401
    from pipeline.cli import main as cli_main

    with open(os.devnull, "w") as devnull, _Span() as span, contextlib.redirect_stdout(devnull):
        code = cli_main(["explain", "--flow", flow, "--input", path])
    return {"work_s": span.wall, "cpu_s": span.cpu, "exit_code": code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("mode", choices=("transform", "calls", "send", "pipeline", "explain"))
    parser.add_argument("--result", required=True)
    parser.add_argument("--flow", required=True)
    parser.add_argument("--allow-python-functions", action="store_true", help="the flow's $py: functions may run")
    parser.add_argument("--input")
    parser.add_argument("--calls")
    parser.add_argument("--dead-letter")
    parser.add_argument("--flush-at", type=int, default=500)
    parser.add_argument("--client", choices=("bare", "sink", "post"), default="bare")
    parser.add_argument("--workers", type=int, default=1, help="pipeline: --direct_num_workers")
    parser.add_argument("--profile", help="write a cProfile of the measured work to this file")
    args = parser.parse_args(argv)

    import decide.flow  # noqa: F401 - jsonschema & co: start-up, not work

    def run() -> dict:
        if args.mode == "transform":
            return _transform(args.flow, args.input, None, args.allow_python_functions)
        if args.mode == "calls":
            return _transform(args.flow, args.input, args.calls)
        if args.mode == "send":
            return _send(args.calls, args.flush_at, args.client, args.flow)
        if args.mode == "pipeline":
            return _pipeline(args.flow, args.input, args.dead_letter, args.workers)
        return _explain(args.flow, args.input)

    global _PROFILER
    if args.profile:
        import cProfile

        _PROFILER = cProfile.Profile()
    result = run()
    if _PROFILER is not None:
        _PROFILER.dump_stats(args.profile)
    result["vm_hwm_kb"] = vm_hwm_kb()
    with open(args.result, "wb") as f:
        f.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
