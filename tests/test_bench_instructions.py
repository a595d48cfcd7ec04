"""`python -m bench.instructions`: the transform's instructions a line, counted under valgrind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import instructions

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_a_line_of_the_example_events(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEGMENT_WRITE_KEY", "test-write-key")  # the example flow reads it
    # 12 example events, repeated: the count between 24 and 96 lines is the per-line cost.
    lines = (EXAMPLES / "events.jsonl").read_bytes().splitlines(keepends=True)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(lines * 8))
    per_line = instructions.per_line(ROOT, EXAMPLES / "flow.json", events, 24, 96, allow_python=False)
    # a line is parsed, mapped and planned: tens of thousands of instructions, never millions
    assert 10_000 < per_line < 1_000_000


def test_arguments_that_cannot_be_counted_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    code = instructions.main(
        [
            "--flow",
            str(EXAMPLES / "flow.json"),
            "--events",
            str(EXAMPLES / "events.jsonl"),
            "--small",
            "9",
            "--large",
            "3",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_too_few_lines_say_so(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="fewer than --large"):
        instructions.per_line(ROOT, EXAMPLES / "flow.json", EXAMPLES / "events.jsonl", 2, 500, allow_python=False)
