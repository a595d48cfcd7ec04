"""A local run's worker process (``python -m pipeline.local_worker``; see pipeline/local_workers.py).

It is Beam's own SDK worker, but a failed bundle's traceback, which Beam prints on the
worker's standard error (the command's own), is left out: the command says the error in one
line, and WALKEROS_SEGMENT_DEBUG=1 keeps it. Like the command in a local run, it caps glibc's
malloc arenas (pipeline/local_workers.py).
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline.local_workers import TRACEBACK, collect_less_often, limit_malloc_arenas


class WithoutTracebacks:
    """A text stream that drops what Beam's worker prints for a failed bundle: the traceback, in
    one write, and the newline print() adds after it."""

    def __init__(self, stream):
        self.stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        if text.startswith(TRACEBACK) or (self.dropped and text == "\n"):
            self.dropped = text != "\n"
            return len(text)
        self.dropped = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main() -> None:
    limit_malloc_arenas()  # before Beam starts its threads
    collect_less_often()
    # Ctrl-C reaches the whole process group: the command stops the run and then its workers;
    # a worker that died of it first would only add its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not os.environ.get("WALKEROS_SEGMENT_DEBUG"):
        sys.stderr = WithoutTracebacks(sys.stderr)
    from apache_beam.runners.worker import sdk_worker_main

    from pipeline import local_files

    local_files.install()  # a worker finalises the dead-letter files
    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
