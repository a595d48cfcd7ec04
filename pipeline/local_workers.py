"""How a local batch run uses the machine: its worker processes, their log lines, malloc and
the garbage collector.

The FnApiRunner runs a pipeline in one process unless told otherwise, so a local backfill
would use one core. On worker processes (as Beam's ``--direct_running_mode=multi_processing``,
but running ``pipeline.local_worker``) its reader cuts plain JSON Lines files into pieces
of a few MB and the workers take them in turn. Starting the workers costs about 4 s (each
imports Beam and compiles the flow), so only an input large enough to pay that back gets them;
everything else, and any run whose user set either flag, is left as it is.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass

# Measured on the benchmark's 2-core machine (docs/bench.md): two workers save about 35 µs of
# wall time an event (one process moves its events in chunks, so it is fast already) and cost
# about 3.6 s to start, so they pay from some 110,000 events, about 55 MB of JSON Lines; 128 MB
# keeps a margin, and the gain is 10% there.
WORKER_INPUT_BYTES = 128 * 1024**2
# Each worker holds its own Beam, compiled flow and connection pool (about 200 MB at 100k events).
MAX_WORKERS = 4
FLAGS = ("--direct_num_workers", "--direct_running_mode")
# How Python starts a traceback: how a worker's traceback is told apart in text.
TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class WorkerChoice:
    workers: int
    input_bytes: int

    def line(self) -> str:
        return (
            f"local run: {self.workers} worker processes for {self.input_bytes / 1024**2:.0f} MB of JSON Lines "
            "(--direct_num_workers=1 runs it in one process)"
        )


def user_chose(argv: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv for flag in FLAGS)


def _on_fn_api_runner(options) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner) == "FnApiRunner"


def use_workers(argv: list[str], options, input_pattern: str | None, input_format: str) -> WorkerChoice | None:
    """Give a FnApiRunner batch run over a large plain input its workers (``options``' worker
    count; :func:`local_runner` makes them processes), unless the user chose; the choice made."""
    if not _on_fn_api_runner(options) or user_chose(argv):
        return None
    choice = choose(input_pattern, input_format)
    if choice is not None:
        from apache_beam.options.pipeline_options import DirectOptions

        options.view_as(DirectOptions).direct_num_workers = choice.workers
    return choice


def choose(input_pattern: str | None, input_format: str, cores: int | None = None) -> WorkerChoice | None:
    """Worker processes for a local batch run over ``input_pattern``, or None for one process:
    only plain JSON Lines (what Beam's text reader splits; a compressed or whole-file format is
    read by one worker however many there are) of at least ``WORKER_INPUT_BYTES`` in all."""
    from transforms.files import detect_format, is_compressed

    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    if cores < 2 or not input_pattern or input_pattern == "-":
        return None
    try:
        if detect_format(input_pattern, input_format) != "jsonl":
            return None
        from apache_beam.io.filesystems import FileSystems

        matched = FileSystems.match([input_pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - a pattern that cannot be matched now is the run's to report
        return None
    if any(is_compressed(metadata.path) for metadata in matched):
        return None
    total = sum(metadata.size_in_bytes for metadata in matched)
    if total < WORKER_INPUT_BYTES:
        return None
    return WorkerChoice(min(cores, MAX_WORKERS), total)


# glibc's malloc gives each new thread its own arena (up to 8 per core); Beam's many threads
# then keep freed memory spread over them. Measured with two workers at 1M events: 907 MB
# summed at peak with the default, 806 MB with 2 arenas, and 1.42x the 100k figure instead
# of 1.53x.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas for the threads this process starts from now on; False where
    there is no glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


# Collections of the youngest generation after this many more container objects allocated than
# freed (CPython's default: 700). Nearly everything an event allocates is freed by its reference
# count, so a collection finds almost nothing, but the lists of events in flight survive the
# young collections and make every older one walk them: at 100k events in one process the
# default spent about 2 s in 3,100 collections, this 0.7 s in 58 (measured with gc.callbacks).
GC_THRESHOLD = (10_000, 10, 10)


def collect_less_often() -> None:
    """The garbage collector's thresholds for a local run's processes (:data:`GC_THRESHOLD`)."""
    gc.set_threshold(*GC_THRESHOLD)


# Beam relays each worker's log record as the text of its LogEntry message.
RELAY_LOGGER = "apache_beam.runners.portability.local_job_service"
_MESSAGE = re.compile(r'\bmessage: "((?:[^"\\]|\\.)*)"')
_NOISE = ("No semi_persistent_directory found", "Discarding unparseable args")


class WorkerLogLines(logging.Filter):
    """A worker's relayed log record as the line it would have been in one process: its own
    message (not the protobuf text around it), without Beam's start-up notices, and without a
    step's traceback (the command says the error in one line) unless ``keep_tracebacks``."""

    def __init__(self, keep_tracebacks: bool = False):
        super().__init__()
        self.keep_tracebacks = keep_tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Worker: "):
            return True
        found = _MESSAGE.search(text)
        if found is None:
            return True
        message = _unescape(found.group(1))
        if any(noise in message for noise in _NOISE):
            return False
        if TRACEBACK in message and not self.keep_tracebacks:
            return False
        record.msg, record.args = f"worker: {message}", None
        return True


def local_runner(options):
    """The runner for ``beam.Pipeline``: None (the one the options name), or, for a FnApiRunner
    run given several workers without a running mode, one whose workers are processes running
    ``pipeline.local_worker`` (Beam's own multi_processing mode runs Beam's worker, which prints a
    failed bundle's traceback on the command's standard error)."""
    from apache_beam.options.pipeline_options import DirectOptions

    direct = options.view_as(DirectOptions)
    if not _on_fn_api_runner(options) or (direct.direct_num_workers or 1) <= 1:
        return None
    if direct.direct_running_mode != "in_memory":
        return None  # the user chose Beam's own mode
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    # Beam starts it through a shell: `exec`, so that Ctrl-C (which the worker ignores) cannot
    # end the shell and with it, in Beam's eyes, the worker.
    command = f"exec {shlex.quote(sys.executable)} -m pipeline.local_worker"
    return FnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))


class QuietWorkerMode(logging.Filter):
    """Drops the FnApiRunner's notice that several workers in "in_memory" mode run in one process:
    with :func:`local_runner`'s environment they do not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("If direct_num_workers is not equal to 1")


def worker_log_filters(keep_tracebacks: bool) -> list[tuple[logging.Logger, logging.Filter]]:
    """The filters a local run puts on Beam's loggers for its worker processes."""
    return [
        (logging.getLogger(RELAY_LOGGER), WorkerLogLines(keep_tracebacks)),
        (logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner"), QuietWorkerMode()),
    ]


def _unescape(text: str) -> str:
    # protobuf text format escapes like C: \" \' \\ \n and octal bytes for what is not ASCII.
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return text
