"""The end-of-run summary: what happened to every input, from the Beam counters.

The accounting. An input (a line, a file, a message) holds one event or an envelope of many;
parsing turns it into events, and into one dead letter for each part that is not a valid event
(an unparseable input is one dead letter; an envelope may give both events and dead letters).
So the unit that ends in exactly one outcome is the *parsed unit*:

    events parsed + dead letters written while parsing
      = delivered + dead-lettered (any stage) + dropped by policy

where dropped by policy = ignored by a rule + consent denied + not sent (``disable``). Every
input gives at least one unit; they are equal when no input is an envelope of several events.
identify/group calls suppressed because nothing changed are calls, not events: shown apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from decide.dead_letter import PARSE_REASONS
from transforms import DAMAGED_FILES_COUNTER, NAMESPACE


def counters(result) -> dict[str, int]:
    """Committed (else attempted) counter values of our namespace, by name."""
    from apache_beam.metrics.metric import MetricsFilter

    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    out: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + (value or 0)
    return out


@dataclass(frozen=True)
class Reconciliation:
    inputs: int
    events_parsed: int
    parse_dead_letters: int
    delivered: int
    dead_lettered: int
    dropped: int

    @property
    def units(self) -> int:
        """What must end in exactly one outcome: events, plus inputs (or parts) that never were one."""
        return self.events_parsed + self.parse_dead_letters

    @property
    def outcomes(self) -> int:
        return self.delivered + self.dead_lettered + self.dropped

    @property
    def balanced(self) -> bool:
        return self.outcomes == self.units

    def line(self) -> str:
        text = (
            f"delivered {self.delivered} + dead-lettered {self.dead_lettered} + dropped {self.dropped} "
            f"= {self.outcomes}; events parsed {self.events_parsed} + inputs dead-lettered at parse "
            f"{self.parse_dead_letters} = {self.units}"
        )
        if self.balanced:
            return text + f" (from {self.inputs} inputs): balanced"
        return text + f" (from {self.inputs} inputs): MISMATCH by {self.outcomes - self.units:+d}"


def reconcile(counts: dict[str, int]) -> Reconciliation:
    dead = {k[len("dead_letter_") :]: v for k, v in counts.items() if k.startswith("dead_letter_")}
    if "dead_letters_total" in counts:  # counted once, where every dead letter passes
        dead_lettered = counts["dead_letters_total"]
        parse_dead = counts.get("dead_letters_stage_parse", 0)
    else:  # counters of a run without that step: by reason
        dead_lettered = sum(dead.values())
        parse_dead = sum(v for k, v in dead.items() if k in PARSE_REASONS)
    return Reconciliation(
        inputs=counts.get("inputs_read", 0),
        events_parsed=counts.get("events_parsed", 0),
        parse_dead_letters=parse_dead,
        delivered=counts.get("events_delivered", 0),
        dead_lettered=dead_lettered,
        dropped=counts.get("events_ignored", 0)
        + counts.get("events_consent_denied", 0)
        + counts.get("events_disabled", 0),
    )


def render(counts: dict[str, int]) -> str:
    calls = by_prefix(counts, "calls_sent_")
    dead = by_prefix(counts, "dead_letter_")
    check = reconcile(counts)
    rows = [
        ("inputs read", counts.get("inputs_read", 0), ""),
        ("events parsed", counts.get("events_parsed", 0), ""),
        (
            "events delivered",
            counts.get("events_delivered", 0),
            calls and "calls: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())),
        ),
        ("events ignored (rule)", counts.get("events_ignored", 0), ""),
        ("events consent denied", counts.get("events_consent_denied", 0), ""),
    ]
    if counts.get("events_disabled"):
        rows.append(
            ("events not sent (disable)", counts["events_disabled"], f"{counts.get('calls_disabled', 0)} calls built")
        )
    rows += [
        ("dead letters", check.dead_lettered, ", ".join(f"{k} {v}" for k, v in sorted(dead.items()))),
        ("identify suppressed", counts.get("identify_suppressed", 0), "unchanged since the last identify"),
        ("group suppressed", counts.get("group_suppressed", 0), "unchanged since the last group"),
        ("requests to Segment", counts.get("requests_to_segment", 0), ""),
    ]
    if counts.get(DAMAGED_FILES_COUNTER):
        rows.append(
            (
                "input files damaged",
                counts[DAMAGED_FILES_COUNTER],
                "truncated, corrupt or refused: read only up to the damage; the log names each file",
            )
        )
    if counts.get("mapping_function_errors"):
        rows.append(
            (
                "mapping function errors",
                counts["mapping_function_errors"],
                "a function threw or ran out of time or memory; its value was undefined (see the log)",
            )
        )
    width = max(len(r[0]) for r in rows)
    lines = [f"  {label:<{width}}  {value:>8}" + (f"   ({note})" if note else "") for label, value, note in rows]
    lines.append(f"  {'accounting':<{width}}  {check.line()}")
    return "\n".join(lines)


# -- the run's outcome and exit status -------------------------------------------------------
# The same codes for every command (docs/operations.md, "Exit status and summary"). 1 is also what Python
# exits with on an unexpected crash, which is indeed a failed run.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DEAD_LETTERS = 3
STATUS_NAMES = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_USAGE: "usage", EXIT_DEAD_LETTERS: "dead_letters"}

# Counted by the file readers when an input file is truncated or corrupt: the input was not
# read whole, so the run failed even if every record read was delivered.


@dataclass(frozen=True)
class Outcome:
    status: int
    text: str  # what applies, in words

    @property
    def name(self) -> str:
        return STATUS_NAMES[self.status]

    def line(self) -> str:
        return f"exit status {self.status} ({self.name}): {self.text}"


def dead_letter_ratio(dead_lettered: int, units: int) -> float:
    return dead_lettered / units if units else 0.0


def decide(dead_lettered: int, units: int, max_ratio: float = 0.0, done: str = "ended as") -> Outcome:
    """Everything ended: 0 unless the dead letters are more than the tolerated share of the
    units (events, and inputs that never were one)."""
    if not units:
        return Outcome(EXIT_OK, "the input held no event (empty files or lines only)")
    if not dead_lettered:
        return Outcome(EXIT_OK, f"all {units} {done} delivered or dropped by policy")
    ratio = dead_letter_ratio(dead_lettered, units)
    share = f"{dead_lettered} of {units} {done} dead letters ({ratio:.2%})"
    if ratio > max_ratio:
        return Outcome(EXIT_DEAD_LETTERS, f"{share}, more than --max_dead_letter_ratio {max_ratio:g}")
    return Outcome(EXIT_OK, f"{share}, within --max_dead_letter_ratio {max_ratio:g}")


def run_outcome(
    counts: dict[str, int], max_ratio: float = 0.0, failure: str | None = None, stopped: bool = False
) -> Outcome:
    """The exit status of a run from its counters and how it ended."""
    if failure:
        return Outcome(EXIT_FAILED, f"the run failed: {failure}")
    if stopped:
        return Outcome(
            EXIT_FAILED,
            "the run was stopped before it finished; run it again (messageIds are "
            "deterministic: what was already delivered is deduplicated)",
        )
    damaged = counts.get(DAMAGED_FILES_COUNTER, 0)
    if damaged:
        return Outcome(
            EXIT_FAILED,
            f"the run failed: {damaged} input file{'s were' if damaged != 1 else ' was'} "
            "truncated or corrupt and not read whole (see the log)",
        )
    check = reconcile(counts)
    if not check.balanced:
        return Outcome(
            EXIT_FAILED,
            f"the run failed: the accounting does not balance (outcomes {check.outcomes}, units {check.units})",
        )
    return decide(check.dead_lettered, check.units, max_ratio)


def by_prefix(counts: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: v for k, v in sorted(counts.items()) if k.startswith(prefix) and v}


def summary_document(counts: dict[str, int], outcome: Outcome, **about) -> dict:
    """The printed summary as data (``--summary_json``): counts by reason, the accounting
    identity, the exit status, and whatever ``about`` adds (run id, options, where the dead
    letters are)."""
    check = reconcile(counts)
    return {
        **about,
        "status": outcome.status,
        "status_name": outcome.name,
        "result": outcome.text,
        "counts": {
            "inputs_read": counts.get("inputs_read", 0),
            "events_parsed": counts.get("events_parsed", 0),
            "events_delivered": check.delivered,
            "events_ignored": counts.get("events_ignored", 0),
            "events_consent_denied": counts.get("events_consent_denied", 0),
            "events_disabled": counts.get("events_disabled", 0),
            "dead_letters": check.dead_lettered,
            "identify_suppressed": counts.get("identify_suppressed", 0),
            "group_suppressed": counts.get("group_suppressed", 0),
            "requests_to_segment": counts.get("requests_to_segment", 0),
            DAMAGED_FILES_COUNTER: counts.get(DAMAGED_FILES_COUNTER, 0),
        },
        "dead_letters_by_reason": by_prefix(counts, "dead_letter_"),
        "dead_letters_by_stage": by_prefix(counts, "dead_letters_stage_"),
        "calls_sent_by_type": by_prefix(counts, "calls_sent_"),
        "accounting": {
            "identity": "delivered + dead_lettered + dropped = events_parsed + parse_dead_letters",
            "delivered": check.delivered,
            "dead_lettered": check.dead_lettered,
            "dropped": check.dropped,
            "outcomes": check.outcomes,
            "events_parsed": check.events_parsed,
            "parse_dead_letters": check.parse_dead_letters,
            "units": check.units,
            "inputs": check.inputs,
            "balanced": check.balanced,
            "dead_letter_ratio": round(dead_letter_ratio(check.dead_lettered, check.units), 6),
        },
        "counters": dict(sorted(counts.items())),
    }


def write_summary_json(path: str, document: dict) -> None:
    """Local or gs:// (Beam's file systems)."""
    import json
    import os

    from apache_beam.io.filesystems import FileSystems

    data = (json.dumps(document, indent=2, sort_keys=False, default=str) + "\n").encode()
    if not path.startswith("gs://"):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
    with FileSystems.create(path, mime_type="application/json", compression_type="uncompressed") as f:
        f.write(data)
