"""What the pipeline's flags may be: formats, ranges, and the parsers of their values. No Beam,
so `validate` and `explain` check their flags exactly as `run` does without loading Beam
(``pipeline.options`` declares the flags to Beam from these)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from decide.settings import parse_boolean

INPUT_FORMATS = ("auto", "jsonl", "json", "avro", "dead_letter")
DEAD_LETTER_FORMATS = ("jsonl", "avro")
# What ``run`` requires (pipeline.cli says which is missing): these flags, and one flag of each
# group. dataflow/metadata.json marks exactly REQUIRED_FLAGS as not optional.
REQUIRED_FLAGS = ("flow",)
ONE_OF_FLAGS = (("input", "input_subscription", "input_topic"), ("dead_letter", "dead_letter_topic"))


@dataclass(frozen=True)
class Range:
    """The values of a numeric flag that make sense; anything else is a usage error."""

    low: float
    high: float
    low_included: bool = True
    unit: str = ""
    note: str = ""

    def problem(self, value) -> str | None:
        if value is None:
            return None
        if (
            (isinstance(value, float) and not math.isfinite(value))
            or value > self.high
            or value < self.low
            or (value == self.low and not self.low_included)
        ):
            low = f"at least {self.low:g}" if self.low_included else f"more than {self.low:g}"
            unit = f" {self.unit}" if self.unit else ""
            note = f" ({self.note})" if self.note else ""
            return f"{low} and at most {self.high:g}{unit}{note}"
        return None


# Every numeric flag, and what it may be. An identity memory that never expires (a TTL of 0
# once meant that) grows without bound in a stream; a deadline of 0 fails every batch.
RANGES = {
    "identity_state_ttl_hours": Range(
        0, 24 * 366, low_included=False, unit="hours", note="the identity memory must expire: state would grow forever"
    ),
    "flush_deadline_seconds": Range(0, 3600, low_included=False, unit="seconds"),
    "delivery_shards": Range(0, 1024),  # 0: one shard per worker thread
    "progress_interval_seconds": Range(0, 86400, unit="seconds", note="0: never"),
    "max_inflation_ratio": Range(1, 1_000_000),
    "max_inflated_mb": Range(1, 1024**3, unit="MB"),
    "function_time_limit_seconds": Range(0, 3600, low_included=False, unit="seconds"),
}


def range_problems(opts) -> list[str]:
    """One line for each numeric flag whose value makes no sense."""
    problems = []
    for name, allowed in RANGES.items():
        value = getattr(opts, name, None)
        problem = allowed.problem(value)
        if problem:
            problems.append(f"--{name} {value:g}: must be {problem}")
    return problems


def parse_bool(text: str) -> bool:
    value = parse_boolean(text)
    if value is None:
        raise ValueError(f"expected true or false, got {text!r}")
    return value


parse_bool.__name__ = "boolean"  # argparse names the type in its error message


def parse_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a share between 0 and 1, got {text!r}")
    return value


parse_ratio.__name__ = "ratio (0 to 1)"


def add_function_arguments(parser) -> None:
    """The flags about a flow's functions; `explain` and `validate` take them too."""
    # A value is optional (--flag, --flag=true): Flex Templates pass --name=value.
    parser.add_argument(
        "--allow_python_functions",
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        metavar="true|false",
        help='Allow "$py:" functions in the flow: Python expressions that run with the '
        'worker\'s full rights (files, network, credentials). "$code:" JavaScript '
        "functions run in a sandbox and need no flag.",
    )
    parser.add_argument(
        "--function_time_limit_seconds",
        type=float,
        default=1.0,
        help="Longest one call of a flow function may run (JavaScript: CPU time of the "
        "worker process; Python: wall time) before its value counts as a function "
        "error.",
    )


# -- the flags `run`, `explain` and `validate` share, defined once ------------------------------
def add_flow_arguments(parser, required: bool = True) -> None:
    """Which flow file, flow and destination; and how its functions may run."""
    parser.add_argument(
        "--flow",
        required=required,
        help="Path of the walkerOS flow file (JSON, version 4), local or gs://. Required.",
    )
    parser.add_argument("--flow_name", default=None, help="Flow to run (default: the only one, else 'default').")
    parser.add_argument(
        "--destination_id",
        default=None,
        help="Destination id in the flow (default: the one whose package is @walkeros/server-destination-segment).",
    )
    add_function_arguments(parser)


def add_input_format_argument(parser) -> None:
    parser.add_argument(
        "--input_format",
        default="auto",
        choices=INPUT_FORMATS,
        help="jsonl: one envelope per line; json: one envelope per file; avro: "
        "records of schemas/event.avsc; dead_letter: dead-letter JSONL files to "
        "replay; auto: by file extension.",
    )


def add_identity_arguments(parser) -> None:
    """What the calls are named and how long a user's identify/group memory lasts."""
    parser.add_argument(
        "--message_id_namespace",
        default=None,
        help="Prefix of every messageId (Segment deduplicates across all sources: "
        "make it unique to this pipeline). Default: walkeros-<flow name>.",
    )
    parser.add_argument(
        "--identity_state_ttl_hours",
        type=float,
        default=24.0,
        help="Hours without events after which a user's identify/group memory is cleared.",
    )


def add_outcome_argument(parser) -> None:
    parser.add_argument(
        "--max_dead_letter_ratio",
        type=parse_ratio,
        default=0.0,
        help="Share of the run's inputs (0 to 1) that may end as dead letters while the run "
        "still exits 0; above it the run exits 3. Default 0: any dead letter exits 3.",
    )
