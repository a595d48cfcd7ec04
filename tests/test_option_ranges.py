"""Numeric flags whose value makes no sense are usage errors: one line naming the flag and what
it may be, exit status 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import WRITE_KEY

from pipeline.cli import main as cli_main
from pipeline.flags import RANGES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLOW = str(ROOT / "examples" / "flow.json")
EXAMPLE_EVENTS = str(ROOT / "examples" / "events.jsonl")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--flush_deadline_seconds", "0"),
        ("--flush_deadline_seconds", "-5"),
        ("--flush_deadline_seconds", "nan"),
        ("--flush_deadline_seconds", "inf"),
        ("--identity_state_ttl_hours", "0"),  # once silently "forever"
        ("--identity_state_ttl_hours", "-1"),
        ("--identity_state_ttl_hours", "1e12"),  # beyond what an event-time timer can hold
        ("--delivery_shards", "-3"),
        ("--progress_interval_seconds", "-1"),
        ("--max_inflation_ratio", "0.5"),
        ("--max_inflated_mb", "0"),
    ],
)
def test_a_numeric_flag_out_of_range_is_one_line_and_exit_2(flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    code = cli_main(
        [
            "run",
            "--flow",
            EXAMPLE_FLOW,
            "--input",
            EXAMPLE_EVENTS,
            "--dead_letter",
            str(tmp_path / "dead"),
            f"{flag}={value}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(flag) and "must be" in line
    assert not list(tmp_path.iterdir())  # nothing ran


def test_explain_checks_its_ttl_too(monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    assert (
        cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", EXAMPLE_EVENTS, "--identity_state_ttl_hours", "0"]) == 2
    )
    assert "--identity_state_ttl_hours" in capsys.readouterr().err


def test_every_numeric_flag_has_a_range():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import WalkerosOptions

    parser = __import__("argparse").ArgumentParser()
    WalkerosOptions._add_argparse_args(parser)
    numeric = {a.dest for a in parser._actions if a.type in (int, float)}
    assert numeric == set(RANGES)
    defaults = PipelineOptions([]).view_as(WalkerosOptions)
    assert all(RANGES[name].problem(getattr(defaults, name)) is None for name in numeric)
