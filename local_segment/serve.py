"""``walkeros-segment local-segment`` (also ``python -m local_segment``): serve until SIGINT/SIGTERM,
one log line per request, then print totals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from local_segment.endpoint import LocalSegment

# The package's logger: the per-request lines come from its modules' child loggers.
log = logging.getLogger("local_segment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walkeros-segment local-segment",
        description="Run a local Segment-compatible endpoint (POST /v1/batch) to try flows without Segment.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port; the URL is printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--record", metavar="FILE", help="append accepted messages to FILE as JSON Lines")
    parser.add_argument(
        "--write-key",
        help="the expected write key (default: env LOCAL_SEGMENT_WRITE_KEY; unset accepts any key). "
        "Prefer the env variable: command lines are visible to other users",
    )
    parser.add_argument("--strict", action="store_true", help="answer 401 to a wrong write key instead of 200 + drop")
    parser.add_argument("--path-prefix", default="", help="serve the routes under this prefix, e.g. /segment")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return parser


def startup_line(server: LocalSegment, record_path: str | None) -> str:
    where = f"recording accepted messages to {record_path}" if record_path else "not recording to a file"
    return f"local Segment endpoint listening on {server.url} (POST /v1/batch); {where}"


def totals_line(server: LocalSegment) -> str:
    counters = server.counters
    dropped = {k.split(":", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("dropped:")}
    dropped_text = ", ".join(f"{reason} {n}" for reason, n in dropped.items()) or "none"
    return (
        f"local Segment endpoint stopped: {counters['requests']} requests, {counters['accepted']} accepted, "
        f"{counters['duplicate']} duplicates, dropped: {dropped_text}"
    )


def _install_stop_signals(stop: threading.Event) -> dict:
    """SIGINT/SIGTERM set ``stop``; only possible on the main thread (else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda *_: stop.set())
    return previous


def main(argv: list[str] | None = None) -> int:
    """``walkeros-segment local-segment``: serve until SIGINT/SIGTERM, then print totals; 0 or 2."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    previous_level = log.level
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return _serve_until_stopped(args)
    finally:
        log.setLevel(previous_level)  # main() may run inside a larger process (tests, the CLI)


def _serve_until_stopped(args: argparse.Namespace) -> int:
    write_key = args.write_key or os.environ.get("LOCAL_SEGMENT_WRITE_KEY") or None
    server = LocalSegment(
        write_key,
        host=args.host,
        port=args.port,
        record_path=args.record,
        strict=args.strict,
        path_prefix=args.path_prefix,
    )
    try:
        server.start()
    except OSError as exc:
        print(f"local-segment: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = _install_stop_signals(stop)
    print(startup_line(server, args.record), flush=True)
    print(
        "write key: " + ("checked against the configured key" if write_key else "any non-empty key accepted"),
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # signal handlers could not be installed (not the main thread)
        pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(totals_line(server), flush=True)
    return 0
