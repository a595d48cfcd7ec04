"""Instructions per event of the transform loop (row 1), counted by valgrind's callgrind.

The machine's speed moves by a third from minute to minute, so CPU µs cannot tell two versions
apart by a few percent; the number of instructions a run executes hardly moves. Each count is the
difference between two runs of the transform worker, on the first ``--small`` and the first
``--large`` lines of the events file, divided by the lines between them: start-up, compiling the
flow and reading the file cancel out.

    python -m bench.instructions --flow out/bench/flow-py.json --allow-python-functions \\
        --events out/bench/events-10000.jsonl [--tree /path/to/another/checkout]

``--tree`` counts another checkout of this repository (a ``git worktree`` of an older commit,
say) with the same flow and events: its own ``bench/worker.py`` and modules run. Needs valgrind.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_COLLECTED = re.compile(rb"Collected : (\d+)")


def count(tree: Path, flow: Path, lines_path: Path, allow_python: bool) -> int:
    """Instructions of one transform worker run over ``lines_path``, start-up included."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "bench.worker",
            "transform",
            "--result",
            str(Path(scratch) / "result.json"),
            "--flow",
            str(flow),
            "--input",
            str(lines_path),
        ]
        if allow_python:
            command.append("--allow-python-functions")
        # The tree's own modules first: `-m` puts the working directory on the path.
        done = subprocess.run(command, cwd=tree, capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)})
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the run under valgrind failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return int(found.group(1))


def per_line(tree: Path, flow: Path, events: Path, small: int, large: int, allow_python: bool) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        with open(events, "rb") as source:
            head = list(itertools.islice(source, large))
        if len(head) < large:
            raise SystemExit(f"{events} has {len(head):,} lines, fewer than --large {large:,}")
        for n in (small, large):
            path = Path(scratch) / f"events-{n}.jsonl"
            path.write_bytes(b"".join(head[:n]))
            paths.append(path)
        counts = [count(tree, flow, path, allow_python) for path in paths]
    return (counts[1] - counts[0]) / (large - small)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--flow", required=True, type=Path)
    parser.add_argument("--events", required=True, type=Path)
    parser.add_argument("--allow-python-functions", action="store_true")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=6000)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("python -m bench.instructions: valgrind is not installed", file=sys.stderr)
        return 2
    if not 0 < args.small < args.large:
        print("python -m bench.instructions: --small must be below --large", file=sys.stderr)
        return 2
    result = per_line(
        args.tree.resolve(),
        args.flow.resolve(),
        args.events.resolve(),
        args.small,
        args.large,
        args.allow_python_functions,
    )
    print(f"{result:,.0f} instructions a line ({args.tree}, {args.flow.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
