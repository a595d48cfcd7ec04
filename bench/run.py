"""``python -m bench``: throughput and memory of the walkerOS → Segment pipeline, side by side.

For each N (default 10,000 and 100,000; ``--full`` adds 1,000,000) the same synthetic events
go through four variants, each in its own process (so peak RSS is per variant):

1. transform  the transform limit: a plain loop with the project's own functions, no Beam,
              no network (``transform-py``: the flow's three functions written in Python);
2. send       the send limit: a bare SDK ``Client`` alone sending the same messages to the
              local endpoint as fast as it takes them (``send-post``: each batch through the
              SDK's request function; ``send-sink``: the same messages through the pipeline's
              own sink, ``PipelinedSender`` over ``SegmentConnection``, for comparison);
3. pipeline   ``walkeros-segment run``: the Beam batch pipeline (FnApiRunner) reading the file
              and delivering to the local endpoint, on as many worker processes as the command
              gives a large input (``pipeline-1p``: in one process; ``pipeline-nosend``: in one
              process with the destination's ``disable: true``, to see what Beam costs without
              the sending);
4. explain    ``walkeros-segment explain`` over the same file, in-process, output to /dev/null.

The local endpoint (``local_segment.LocalSegment``) runs in this, the parent,
process, a fresh one per run, and counts requests and messages per request.

Start-up is taken out by measuring every variant also at a tiny N0 (1,000 events): the
steady rate is ``(N - N0) / (T(N) - T(N0))`` where ``T`` is the variant's measured work time
(median of the repeats). Results go to out/bench/results/; with --update-docs to bench/results/,
and docs/bench.md is rewritten from them. See docs/bench.md for the method.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where --update-docs keeps the figures docs/bench.md cites; other runs write under --workdir.
PUBLISHED = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "bench.md"
WRITE_KEY = "bench-write-key"
N0 = 1_000
GENERATOR_VERSION = 1
ANALYSIS_MARKER = "<!-- analysis: written by hand, kept by python -m bench -->"

VARIANTS = (
    "transform",
    "transform-py",
    "send",
    "send-post",
    "send-sink",
    "pipeline",
    "pipeline-1p",
    "pipeline-nosend",
    "explain",
)
LABELS = {
    "transform": "1 transform limit (plain loop)",
    "transform-py": "1b the same, its three functions in Python",
    "send": "2 send limit (SDK Client alone)",
    "send-post": "2b send, the SDK's request function",
    "send-sink": "2c send, the pipeline's sink",
    "pipeline": "3 Beam pipeline (FnApiRunner, worker processes)",
    "pipeline-1p": "3c the same in one process",
    "pipeline-nosend": "3b in one process, not sending (disable)",
    "explain": "4 explain (in-process)",
}
NEEDS_ENDPOINT = {"send", "send-post", "send-sink", "pipeline", "pipeline-1p"}
# What `walkeros-segment run` chooses for a large plain input on this machine (pipeline/local_workers.py);
# given for every N, so the start-up taken out (at N0) is the same as the run's.
PIPELINE_WORKERS = min(len(os.sched_getaffinity(0)), 4)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _meta_matches(meta_path: Path, meta: dict) -> bool:
    try:
        return json.loads(meta_path.read_text()) == meta
    except (OSError, ValueError):
        return False


def ensure_events(workdir: Path, n: int, seed: int) -> Path:
    from bench.generate import write_events

    path = workdir / f"events-{n}.jsonl"
    meta_path = path.with_suffix(".meta.json")
    meta = {
        "n": n,
        "seed": seed,
        "generator": GENERATOR_VERSION,
        "source": hashlib.sha256((ROOT / "bench" / "generate.py").read_bytes()).hexdigest(),
    }
    if path.exists() and _meta_matches(meta_path, meta):
        return path
    started = time.perf_counter()
    facts = write_events(path, n, seed)
    meta_path.write_text(json.dumps(meta))
    print(
        f"  generated {n:,} events ({facts['bytes'] / 1e6:.1f} MB, {facts['mean_line_bytes']:.0f} B/line) "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return path


def ensure_calls(workdir: Path, flow: Path, events: Path, n: int) -> tuple[Path, dict]:
    """The messages each delivered event sends (input of the send variants), via the transform."""
    path = workdir / f"calls-{n}.jsonl"
    meta_path = path.with_suffix(".meta.json")
    meta = {
        "events": hashlib.sha256(events.with_suffix(".meta.json").read_bytes()).hexdigest(),
        "flow": hashlib.sha256(flow.read_bytes()).hexdigest(),
    }
    counts_path = path.with_suffix(".counts.json")
    if path.exists() and _meta_matches(meta_path, meta) and counts_path.exists():
        return path, json.loads(counts_path.read_text())
    result = _spawn("calls", workdir, ["--flow", str(flow), "--input", str(events), "--calls", str(path)])
    counts = {
        k: result[k]
        for k in (
            "inputs",
            "events",
            "dead_letters",
            "consent_denied",
            "ignored",
            "delivered",
            "messages",
            "suppressed",
            "keys",
        )
    }
    counts_path.write_text(json.dumps(counts))
    meta_path.write_text(json.dumps(meta))
    return path, counts


# ---------------------------------------------------------------------------------------------
# running one variant
# ---------------------------------------------------------------------------------------------
def _spawn(mode: str, workdir: Path, args: list[str], env: dict | None = None, profile: Path | None = None) -> dict:
    result_path = workdir / f"result-{mode}-{os.getpid()}.json"
    result_path.unlink(missing_ok=True)
    log_path = workdir / f"worker-{mode}.log"
    command = [sys.executable, "-m", "bench.worker", mode, "--result", str(result_path), *args]
    if profile is not None:
        command += ["--profile", str(profile)]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"bench worker {mode} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["process_wall_s"] = wall
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    # Linux: kilobytes, the largest single process (wait4); summed over the worker processes
    # of a pipeline run on several.
    result["peak_rss_kb"] = max(usage.ru_maxrss, result.get("tree_peak_rss_kb") or 0)
    return result


class _Endpoint:
    """A fresh LocalSegment per run (messageIds would otherwise be deduplicated across runs).
    Accepted messages are dropped from its memory as they come: only counts are needed."""

    def __init__(self):
        from local_segment import LocalSegment

        self.segment = LocalSegment(WRITE_KEY).start()
        self._stop = threading.Event()
        self._trimmer = threading.Thread(target=self._trim, daemon=True)
        self._trimmer.start()

    def _trim(self):
        while not self._stop.wait(0.5):
            self.segment.accepted.clear()
            self.segment.records.clear()

    def close(self) -> dict:
        self._stop.set()
        self._trimmer.join()
        segment = self.segment
        segment.stop()
        per_request = [r.messages for r in segment.requests if r.messages is not None]
        statuses: dict = {}
        for r in segment.requests:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        counters = dict(segment.counters)
        return {
            "http_requests": counters.get("requests", 0),
            "accepted": counters.get("accepted", 0),
            "duplicates": counters.get("duplicate", 0),
            "dropped": sum(v for k, v in counters.items() if k.startswith("dropped:")),
            "statuses": statuses,
            "mean_messages_per_request": (sum(per_request) / len(per_request)) if per_request else None,
            "max_messages_per_request": max(per_request) if per_request else None,
            "mean_request_bytes": (
                statistics.fmean(r.decoded_bytes for r in segment.requests if r.decoded_bytes) if per_request else None
            ),
        }


def run_variant(variant: str, n: int, paths: dict, workdir: Path, flush_at: int, profile: Path | None = None) -> dict:
    endpoint = _Endpoint() if variant in NEEDS_ENDPOINT else None
    env = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "BENCH_SEGMENT_WRITE_KEY": WRITE_KEY}
    if endpoint is not None:
        env["BENCH_SEGMENT_HOST"] = endpoint.segment.url
    flow = ["--flow", str(paths["flow"])]
    try:
        if variant in ("transform", "transform-py"):
            if variant == "transform-py":
                flow = ["--flow", str(paths["flow-py"]), "--allow-python-functions"]
            result = _spawn("transform", workdir, [*flow, "--input", str(paths["events"][n])], env, profile)
        elif variant in ("send", "send-post", "send-sink"):
            client = {"send": "bare", "send-post": "post", "send-sink": "sink"}[variant]
            result = _spawn(
                "send",
                workdir,
                [*flow, "--calls", str(paths["calls"][n]), "--flush-at", str(flush_at), "--client", client],
                env,
                profile,
            )
        elif variant in ("pipeline", "pipeline-1p", "pipeline-nosend"):
            dead = workdir / f"dead-letters-{n}" / "dl"
            if variant == "pipeline-nosend":
                flow = ["--flow", str(paths["flow-nosend"])]
            workers = PIPELINE_WORKERS if variant == "pipeline" else 1
            result = _spawn(
                "pipeline",
                workdir,
                [*flow, "--input", str(paths["events"][n]), "--dead-letter", str(dead), "--workers", str(workers)],
                env,
                profile,
            )
        else:
            result = _spawn("explain", workdir, [*flow, "--input", str(paths["events"][n])], env, profile)
    finally:
        stats = endpoint.close() if endpoint is not None else {}
    result.update(stats)
    result.update(variant=variant, n=n)
    return result


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], sizes: list[int], variants: list[str], flush_at: int, expected: dict) -> dict:
    def pick(variant, n):
        return [r for r in runs if r["variant"] == variant and r["n"] == n]

    out: dict = {"variants": {}, "ratios": {}}
    for variant in variants:
        base = pick(variant, N0)
        t0 = _median(r["work_s"] for r in base)
        c0 = _median(r["cpu_s"] for r in base)
        per_n = {}
        for n in sizes:
            rs = pick(variant, n)
            if not rs:
                continue
            work = _median(r["work_s"] for r in rs)
            cpu = _median(r["cpu_s"] for r in rs)
            row = {
                "repeats": len(rs),
                "work_s": work,
                "work_s_all": [round(r["work_s"], 3) for r in rs],
                "startup_s": t0,
                "events_per_s": (n - N0) / (work - t0) if t0 is not None and work > t0 else None,
                "events_per_s_raw": n / work,
                "cpu_s": cpu,
                "cpu_us_per_event": (cpu - c0) / (n - N0) * 1e6 if c0 is not None else None,
                "process_cpu_s": _median(r["process_cpu_s"] for r in rs),
                "process_wall_s": _median(r["process_wall_s"] for r in rs),
                "peak_rss_mb": _median(r["peak_rss_kb"] for r in rs) / 1024,
            }
            if variant in NEEDS_ENDPOINT:
                row.update(
                    {
                        "http_requests": _median(r["http_requests"] for r in rs),
                        "messages_accepted": _median(r["accepted"] for r in rs),
                        "messages_expected": expected.get(n, {}).get("messages"),
                        "duplicates": max(r["duplicates"] for r in rs),
                        "dropped": max(r["dropped"] for r in rs),
                        "mean_messages_per_request": _median(r["mean_messages_per_request"] for r in rs),
                        "mean_request_kb": (_median(r["mean_request_bytes"] for r in rs) or 0) / 1000,
                    }
                )
            per_n[str(n)] = row
        out["variants"][variant] = per_n

    def rate(variant, n):
        return out["variants"].get(variant, {}).get(str(n), {}).get("events_per_s")

    for n in sizes:
        t, s, p = rate("transform", n), rate("send", n), rate("pipeline", n)
        ratios = {}
        if t and s:
            harmonic = 1 / (1 / t + 1 / s)
            ratios["harmonic_limit"] = harmonic
            if p:
                ratios["pipeline_over_harmonic"] = p / harmonic
        out["ratios"][str(n)] = ratios
    small, big = (10_000, 100_000) if {10_000, 100_000} <= set(sizes) else (None, None)
    if small:
        out["ratios"]["cost_per_event_100k_over_10k"] = {
            v: (rate(v, small) / rate(v, big)) if rate(v, small) and rate(v, big) else None for v in variants
        }

        def cpu(variant, n):
            return out["variants"].get(variant, {}).get(str(n), {}).get("cpu_us_per_event")

        out["ratios"]["cpu_per_event_100k_over_10k"] = {
            v: (cpu(v, big) / cpu(v, small)) if cpu(v, small) and cpu(v, big) else None for v in variants
        }
    if {100_000, 1_000_000} <= set(sizes):
        out["ratios"]["peak_rss_1m_over_100k"] = {
            v: out["variants"][v]["1000000"]["peak_rss_mb"] / out["variants"][v]["100000"]["peak_rss_mb"]
            for v in variants
            if "1000000" in out["variants"].get(v, {}) and "100000" in out["variants"][v]
        }
    # the batch size Segment's limits and our settings allow
    mean_bytes = None
    for n in sizes:
        row = out["variants"].get("pipeline", {}).get(str(n))
        if row and row.get("mean_messages_per_request"):
            mean_bytes = row["mean_request_kb"] * 1000 / row["mean_messages_per_request"]
    from decide.wire import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES

    byte_cap = int(MAX_BATCH_BYTES / mean_bytes) if mean_bytes else None
    binding = min(x for x in (flush_at, MAX_BATCH_MESSAGES, byte_cap) if x)
    out["batching"] = {
        "flush_at": flush_at,
        "message_cap": MAX_BATCH_MESSAGES,
        "mean_message_bytes": mean_bytes,
        "byte_cap_messages": byte_cap,
        "binding_limit": binding,
    }
    return out


def targets(summary: dict, sizes: list[int]) -> list[tuple[str, str, bool | None]]:
    """The speed, memory and batching targets, as measured."""
    rows = []
    v, r = summary["variants"], summary["ratios"]
    top = max(n for n in sizes if n <= 100_000)

    def at(variant, n, key):
        return v.get(variant, {}).get(str(n), {}).get(key)

    p, s = at("pipeline", top, "events_per_s"), at("send", top, "events_per_s")
    pc, sc = at("pipeline", top, "cpu_us_per_event"), at("send", top, "cpu_us_per_event")
    rows.append(
        (
            f"pipeline events/s ≥ the bare SDK Client sending the same messages, at {top:,}",
            f"{p:,.0f} vs {s:,.0f}/s ({p / s:.0%}); CPU {pc:.0f} vs {sc:.0f} µs/event"
            if p and s and pc and sc
            else "n/a",
            None if not (p and s) else p >= s,
        )
    )
    rss = r.get("peak_rss_1m_over_100k", {}).get("pipeline")
    rows.append(
        (
            "pipeline peak RSS at 1M ≤ 1.5× 100k (identify and group flow)",
            f"{rss:.2f}×" if rss else "not measured (--full)",
            None if rss is None else rss <= 1.5,
        )
    )
    # In one process, as the command runs both sizes (workers from 128 MB). On two workers the
    # 10k input is three byte ranges, so one worker runs mostly alone there, and the cores' slowing
    # of each other (docs/bench.md) weighs on the 100k figure only: shown beside it.
    costs = r.get("cpu_per_event_100k_over_10k", {})
    cost, cost_workers = costs.get("pipeline-1p"), costs.get("pipeline")
    rows.append(
        (
            "pipeline CPU per event at 100k within 10% of 10k (100k ÷ 10k ≤ 1.10; in one process, "
            "as the command runs both sizes)",
            (f"{cost:.2f}" if cost else "n/a") + (f" (on two workers: {cost_workers:.2f})" if cost_workers else ""),
            None if cost is None else cost <= 1.10,
        )
    )
    # Set when the flow's three functions were Python: compared on that flow (row 1b); row 1,
    # with them in JavaScript, is shown beside it.
    t, t_js = at("transform-py", top, "cpu_us_per_event"), at("transform", top, "cpu_us_per_event")
    rows.append(
        (
            f"transform ≤ 37 CPU µs/event at {top:,} (the flow's functions in Python, as when it was set)",
            (f"{t:.0f} µs" if t else "n/a") + (f" ({t_js:.0f} µs with them in JavaScript)" if t_js else ""),
            None if t is None else t <= 37,
        )
    )
    mpr = at("pipeline", top, "mean_messages_per_request")
    binding = summary["batching"]["binding_limit"]
    rows.append(
        (
            f"pipeline messages/request ≥ 90% of {binding} (binding limit)",
            f"{mpr:.1f} ({mpr / binding:.0%})" if mpr else "n/a",
            None if mpr is None else mpr >= 0.9 * binding,
        )
    )
    grown = _memory_per_event(v.get("pipeline", {}))
    if grown is not None:
        rows.append(("pipeline memory per event, (RSS at 1M − RSS at 100k) ÷ 900,000", f"{grown:,.0f} B", None))
    return rows


def _memory_per_event(rows: dict) -> float | None:
    """Bytes of peak RSS each event past 100,000 added: what a local run's memory grows by."""
    big, small = rows.get("1000000"), rows.get("100000")
    if not big or not small:
        return None
    return (big["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 * 1024 / 900_000


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _fmt_rate(x):
    return f"{x:,.0f}" if x else "–"


def table_rows(summary: dict, sizes: list[int], variants: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["variant"]
    for n in sizes:
        header += [f"{n:,}: events/s", "CPU µs/event", "peak RSS MB", "requests", "msgs/req"]
    rows = []
    for variant in variants:
        row = [LABELS[variant]]
        for n in sizes:
            d = summary["variants"].get(variant, {}).get(str(n))
            if not d:
                row += ["–"] * 5
                continue
            cpu = d.get("cpu_us_per_event")
            row += [
                _fmt_rate(d["events_per_s"]),
                f"{cpu:.0f}" if cpu else "–",
                f"{d['peak_rss_mb']:.0f}",
                f"{d['http_requests']:,.0f}" if "http_requests" in d else "–",
                f"{d['mean_messages_per_request']:.1f}" if d.get("mean_messages_per_request") else "–",
            ]
        rows.append(row)
    harmonic = ["harmonic limit 1/(1/t+1/s)"]
    ratio = ["pipeline ÷ harmonic limit"]
    for n in sizes:
        rr = summary["ratios"].get(str(n), {})
        harmonic += [_fmt_rate(rr.get("harmonic_limit")), "", "", "", ""]
        ratio += [f"{rr['pipeline_over_harmonic']:.0%}" if rr.get("pipeline_over_harmonic") else "–", "", "", "", ""]
    rows += [harmonic, ratio]
    return header, rows


def render_text(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_facts() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_end": load,
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N (default 10000,100000)")
    parser.add_argument("--full", action="store_true", help="add N = 1,000,000 (several minutes more)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per variant at N ≤ 10,000 and at N0 (median taken); larger N run "
        "once unless --repeats-large is given (default 3)",
    )
    parser.add_argument("--repeats-large", type=int, default=1, help="runs per variant at N > 10,000 (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--flush-at", type=int, default=500, help="the flow's flushAt (default 500)")
    parser.add_argument("--seed", type=int, default=None, help="event generator seed")
    parser.add_argument("--workdir", default=str(ROOT / "out" / "bench"), help="where inputs and logs go")
    parser.add_argument(
        "--profile", action="store_true", help="also write cProfile reports of the transform loop and the pipeline"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="keep the results in bench/results/ and rewrite docs/bench.md from them (otherwise "
        "they go to <workdir>/results/ and no tracked file changes)",
    )
    parser.add_argument(
        "--render-docs",
        action="store_true",
        help="measure nothing: rewrite docs/bench.md (and print the table) from bench/results/latest.json",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench import generate

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render_docs:
        return render_from_results(PUBLISHED / "latest.json")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | ({1_000_000} if args.full else set()))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    seed = generate.SEED if args.seed is None else args.seed
    import decide

    layer = decide.how_it_was_built()  # every variant imports the decide layer from the same place
    if not layer.startswith("compiled"):
        print(f"bench: the decide layer runs {layer} here (make compiles it)", file=sys.stderr)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = PUBLISHED if args.update_docs else workdir / "results"
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    print(
        f"bench: N = {', '.join(f'{n:,}' for n in sizes)} (start-up measured at N0 = {N0:,}); "
        f"variants: {', '.join(variants)}; flushAt {args.flush_at}",
        flush=True,
    )
    flow = generate.write_flow(workdir / "flow.json", args.flush_at)
    all_sizes = [N0, *sizes]
    paths = {
        "flow": flow,
        "flow-nosend": generate.write_flow(workdir / "flow-nosend.json", args.flush_at, disable=True),
        "flow-py": generate.write_flow(workdir / "flow-py.json", args.flush_at, python_functions=True),
        "events": {},
        "calls": {},
    }
    expected = {}
    for n in all_sizes:
        paths["events"][n] = ensure_events(workdir, n, seed)
        if {"send", "send-post", "send-sink", "pipeline", "pipeline-1p"} & set(variants):
            paths["calls"][n], expected[n] = ensure_calls(workdir, flow, paths["events"][n], n)

    runs = []
    for n in all_sizes:
        repeats = args.repeats if n <= 10_000 else args.repeats_large
        for repeat in range(repeats):
            for variant in variants:
                result = run_variant(variant, n, paths, workdir, args.flush_at)
                runs.append(result)
                extra = ""
                if variant in NEEDS_ENDPOINT:
                    extra = (
                        f", {result['http_requests']} requests, "
                        f"{result['mean_messages_per_request'] or 0:.1f} msgs/req, {result['accepted']} accepted"
                    )
                    want = expected.get(n, {}).get("messages")
                    if want is not None and result["accepted"] != want:
                        extra += f" (EXPECTED {want})"
                print(
                    f"  N={n:>9,} #{repeat + 1} {variant:<10} {result['work_s']:7.2f} s work, "
                    f"{result['process_wall_s']:6.2f} s process, {result['peak_rss_kb'] / 1024:6.0f} MB{extra}",
                    flush=True,
                )

    summary = summarise(runs, sizes, variants, args.flush_at, expected)
    header, rows = table_rows(summary, sizes, variants)
    goal_rows = targets(summary, sizes)
    from bench import functions as function_cost

    # In its own process, as every variant: this one holds the endpoint's received messages, and
    # the collector's full passes over them would be counted as the functions' cost.
    summary["functions"] = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bench.functions", str(paths["events"][min(sizes)])],
            check=True,
            capture_output=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout
    )
    added = summary["functions"]["added_cpu_us"]
    print(
        f"  three $code: functions per event add {added:.1f} µs CPU an event "
        f"({summary['functions']['plain_cpu_us']:.1f} → {summary['functions']['functions_cpu_us']:.1f})",
        flush=True,
    )
    goal_rows.append(
        (
            f"three JavaScript functions per event add ≤ {function_cost.TARGET_US:.0f} µs an event (CPU, map + plan)",
            f"{added:.1f} µs",
            added <= function_cost.TARGET_US,
        )
    )
    profile_report = run_profiles(paths, workdir, results, sizes, args.flush_at) if args.profile else None

    meta = {
        "time": stamp,
        "command": argv_text(argv),
        "sizes": sizes,
        "n0": N0,
        "variants": variants,
        "flush_at": args.flush_at,
        "seed": seed,
        "rules": generate.rule_count(generate.flow_document(args.flush_at)),
        "repeats": args.repeats,
        "repeats_large": args.repeats_large,
        "machine": machine_facts(),
        "decide_layer": layer,
        "bench_seconds": time.perf_counter() - started,
        "expected": {str(k): v for k, v in expected.items()},
    }
    document = {
        "meta": meta,
        "summary": summary,
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in goal_rows],
        "profile": profile_report,
        "runs": runs,
    }
    text = json.dumps(document, indent=1, default=str)
    (results / f"bench-{stamp}.json").write_text(text)
    (results / "latest.json").write_text(text)

    print()
    print(render_text(header, rows))
    print()
    for target, measured, ok in goal_rows:
        mark = "n/a " if ok is None else ("met " if ok else "MISS")
        print(f"  [{mark}] {target}: {measured}")
    print(
        f"\nresults: {results / f'bench-{stamp}.json'} (and latest.json); {time.perf_counter() - started:.0f} s in all"
    )
    if args.update_docs:
        write_docs(document, header, rows, goal_rows, argv_text(argv))
        print(f"docs: {DOCS.relative_to(ROOT)}")
    return 0


def render_from_results(path: Path) -> int:
    document = json.loads(path.read_text())
    meta, summary = document["meta"], document["summary"]
    header, rows = table_rows(summary, meta["sizes"], meta["variants"])
    goal_rows = targets(summary, meta["sizes"])  # the current targets, from the stored figures
    print(render_text(header, rows))
    write_docs(document, header, rows, goal_rows, meta.get("command", "make bench"))
    print(f"docs: {DOCS.relative_to(ROOT)}")
    return 0


def argv_text(argv) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "make bench" if not args else "python -m bench " + " ".join(args)


# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------
def run_profiles(paths: dict, workdir: Path, results: Path, sizes: list[int], flush_at: int) -> dict:
    import pstats

    n = max(s for s in sizes if s <= 100_000)
    report = {}
    # The pipeline in one process: cProfile sees only its own process's main thread.
    for variant, size in (("transform", n), ("send", min(sizes)), ("pipeline-1p", min(sizes))):
        prof = workdir / f"{variant}-{size}.prof"
        run_variant(variant, size, paths, workdir, flush_at, profile=prof)
        text_path = results / f"profile-{variant}.txt"
        with open(text_path, "w") as f:
            stats = pstats.Stats(str(prof), stream=f)
            stats.strip_dirs()
            f.write(
                f"# cProfile of the {variant} variant, N = {size:,} (main thread only; cProfile slows "
                "Python code down, so shares are what matters)\n"
            )
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(40)
        stats = pstats.Stats(str(prof))
        total = stats.total_tt
        top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
        report[variant] = {
            "n": size,
            "total_s": total,
            "file": str(text_path.relative_to(ROOT)),
            "top_tottime": [
                {
                    "function": f"{Path(k[0]).name}:{k[1]}({k[2]})",
                    "tottime_s": round(v[2], 3),
                    "share": round(v[2] / total, 3),
                    "cumtime_s": round(v[3], 3),
                }
                for k, v in top
            ],
        }
        print(f"  profile of {variant} at N={size:,}: {text_path.relative_to(ROOT)}", flush=True)
    return report


# ---------------------------------------------------------------------------------------------
# docs/bench.md
# ---------------------------------------------------------------------------------------------
def _function_label(name: str) -> str:
    """``~:0(<built-in method x>)`` (cProfile's name for C functions) → ``<built-in method x>``."""
    if name.startswith("~:0(") and name.endswith(")"):
        return name[4:-1]
    return name


def write_docs(document: dict, header, rows, goal_rows, command: str) -> None:
    meta, summary = document["meta"], document["summary"]
    batching = summary["batching"]
    lines = [
        "## Benchmark",
        "",
        f"Throughput and memory on a {meta['machine']['cpus']}-core machine "
        f"(Python {meta['machine']['python']}), measured with",
        "",
        "```",
        "make bench                       # N = 10,000 and 100,000, a few minutes; results in out/bench/results/",
        "python -m bench --full           # adds N = 1,000,000",
        "python -m bench --profile        # also cProfile reports (profile-*.txt beside the results)",
        "python -m bench --update-docs    # results in bench/results/, and this page rewritten from them",
        "python -m bench.functions out/bench/events-10000.jsonl   # what three JavaScript functions add",
        "python -m bench.instructions --flow out/bench/flow-py.json --allow-python-functions \\",
        "    --events out/bench/events-10000.jsonl   # the transform's instructions a line (valgrind)",
        "```",
        "",
        f"Latest run ({meta['time']}, `{command}`): synthetic walkerOS events (fixed seed; many users and "
        "sessions, page and product views, carts and orders with nested products, logins and sign-ups, "
        "B2B accounts, consent mixes with some denied, a few invalid lines) through a flow of "
        f"{meta['rules']} rules (identify and group, consent forwarding, loops over nested entities, a "
        f"conditional rule), flushAt {meta['flush_at']}, the decide layer "
        f"{meta.get('decide_layer', 'plain Python')}. Figures are medians of the repeats; events/s is after start-up.",
        "",
        render_markdown(header, rows),
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    for target, measured, ok in goal_rows:
        lines.append(f"| {target} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    cost = summary["ratios"].get("cost_per_event_100k_over_10k") or {}
    cpu_cost = summary["ratios"].get("cpu_per_event_100k_over_10k") or {}
    if cost:
        lines += [
            "",
            "Cost per event at 100k ÷ cost per event at 10k (1.00 = linear), wall time: "
            + ", ".join(f"{v} {c:.2f}" for v, c in cost.items() if c)
            + "; CPU time: "
            + ", ".join(f"{v} {c:.2f}" for v, c in cpu_cost.items() if c)
            + ".",
        ]
    rss = summary["ratios"].get("peak_rss_1m_over_100k") or {}
    if rss:
        lines += ["", "Peak RSS at 1M ÷ peak RSS at 100k: " + ", ".join(f"{v} {c:.2f}×" for v, c in rss.items()) + "."]
    lines += [
        "",
        "What each row is:",
        "",
        "1. **transform limit**: a plain loop over the file doing what the pipeline does per event "
        "(parse, consent, map, identity, calls, identify/group dedup) with the project's own functions, "
        "no Beam, no network. *1b* is the same loop with the flow's three functions written in Python "
        "(`$py:`) instead of JavaScript: the flow as it was when the transform's 37 µs target was set.",
        "2. **send limit**: the same messages sent by a bare SDK `Client` alone to the local endpoint "
        "(`local_segment`), fed as fast as it takes them (its consumer thread batching "
        "flushAt calls a request). *2b* cuts them into batches as the sink does and sends each with the "
        "SDK's own request function (`segment.analytics.request.post`, messages in the Client's form, "
        "one after the other). *2c* sends them through the pipeline's own sink (`PipelinedSender` over "
        "`SegmentConnection`: the SDK's request layer on a pooled session, every message encoded once and "
        "every call checked, the next batch prepared while one is on the wire, each settled with its fate).",
        "3. **pipeline**: `walkeros-segment run` (Beam, FnApiRunner) reading the file and delivering to "
        f"the local endpoint, dead letters to files, on {PIPELINE_WORKERS} worker processes (what the command "
        "chooses for a plain JSON Lines input of 128 MB or more with as many cores; given at every N here, so "
        "that the start-up taken out is the run's own). *3c* is the same run in one process "
        "(`--direct_num_workers=1`).",
        "   *3b* is 3c with the destination's `disable: true`: every step but the sending, so "
        "3b − 1 is what Beam itself costs per event, and 3c − 3b what sending costs inside the pipeline.",
        "4. **explain**: `walkeros-segment explain` over the file, in-process, output to /dev/null.",
        "",
        "Method: every variant runs in its own process; peak RSS is that process's (`wait4`), or for "
        "row 3 the peak of it and its worker processes summed (sampled every 50 ms). Time is the "
        "variant's own work (imports excluded; loading the flow, Beam's start-up included). Start-up is "
        f"taken out by also running every variant on {meta['n0']:,} events: events/s = "
        "(N − N0) / (T(N) − T(N0)) (`events_per_s_raw` in the JSON is N / T(N)); *CPU µs/event* is the same "
        "difference taken on the variant's own CPU time (all its threads and worker processes, not the "
        "endpoint's), which other "
        "load on the machine disturbs less than wall time. The endpoint runs in the parent process and counts "
        "requests and messages per request. The harmonic limit is 1 / (1/transform + 1/send): what a "
        "pipeline that only transforms and sends, one after the other on one core, could reach. "
        f"Batching: flushAt {batching['flush_at']}, at most {batching['message_cap']:,} messages and "
        f"450 KB per request; binding limit here {batching['binding_limit']} messages. The machine is "
        "shared and noisy (±20%).",
        "",
        "Raw figures: `bench/results/latest.json` (every run, the summary, the machine's load).",
        "",
    ]
    profile = document.get("profile")
    if profile:
        lines += [
            "### Where the time goes",
            "",
            "cProfile of the measured span (`--profile`; main thread only, so a request's helper thread "
            "(or the SDK Client's consumer thread) is not in it; cProfile inflates Python-heavy code, "
            "so read the shares, not the seconds). "
            "Functions with the most own time:",
            "",
        ]
        for variant, report in profile.items():
            top = ", ".join(f"`{_function_label(t['function'])}` {t['share']:.0%}" for t in report["top_tottime"][:8])
            lines += [f"- **{variant}** (N = {report['n']:,}, full report `{report['file']}`): {top}."]
        lines += [""]
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    # The analysis below the marker is written by hand (it reads the figures; a run cannot):
    # keep it across runs.
    kept = ""
    if DOCS.exists():
        previous = DOCS.read_text()
        if ANALYSIS_MARKER in previous:
            kept = previous[previous.index(ANALYSIS_MARKER) :]
    DOCS.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
