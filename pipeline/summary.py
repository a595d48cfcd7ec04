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

from apache_beam.metrics.metric import MetricsFilter

from transforms.dead_letter import PARSE_REASONS
from transforms.metrics import NAMESPACE


def counters(result) -> dict[str, int]:
    """Committed (else attempted) counter values of our namespace, by name."""
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
        text = (f"delivered {self.delivered} + dead-lettered {self.dead_lettered} + dropped {self.dropped} "
                f"= {self.outcomes}; events parsed {self.events_parsed} + inputs dead-lettered at parse "
                f"{self.parse_dead_letters} = {self.units}")
        if self.balanced:
            return text + f" (from {self.inputs} inputs): balanced"
        return text + f" (from {self.inputs} inputs): MISMATCH by {self.outcomes - self.units:+d}"


def reconcile(counts: dict[str, int]) -> Reconciliation:
    dead = {k[len("dead_letter_"):]: v for k, v in counts.items() if k.startswith("dead_letter_")}
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
        dropped=counts.get("events_ignored", 0) + counts.get("events_consent_denied", 0)
        + counts.get("events_disabled", 0),
    )


def render(counts: dict[str, int]) -> str:
    calls = {k[len("calls_sent_"):]: v for k, v in counts.items() if k.startswith("calls_sent_") and v}
    dead = {k[len("dead_letter_"):]: v for k, v in counts.items() if k.startswith("dead_letter_") and v}
    check = reconcile(counts)
    rows = [
        ("inputs read", counts.get("inputs_read", 0), ""),
        ("events parsed", counts.get("events_parsed", 0), ""),
        ("events delivered", counts.get("events_delivered", 0),
         calls and "calls: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))),
        ("events ignored (rule)", counts.get("events_ignored", 0), ""),
        ("events consent denied", counts.get("events_consent_denied", 0), ""),
    ]
    if counts.get("events_disabled"):
        rows.append(("events not sent (disable)", counts["events_disabled"],
                     f"{counts.get('calls_disabled', 0)} calls built"))
    rows += [
        ("dead letters", check.dead_lettered, ", ".join(f"{k} {v}" for k, v in sorted(dead.items()))),
        ("identify suppressed", counts.get("identify_suppressed", 0), "unchanged since the last identify"),
        ("group suppressed", counts.get("group_suppressed", 0), "unchanged since the last group"),
        ("requests to Segment", counts.get("requests_to_segment", 0), ""),
    ]
    if counts.get("mapping_function_errors"):
        rows.append(("mapping function errors", counts["mapping_function_errors"],
                     "a function threw or ran out of time or memory; its value was undefined (see the log)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {label:<{width}}  {value:>8}" + (f"   ({note})" if note else "") for label, value, note in rows]
    lines.append(f"  {'accounting':<{width}}  {check.line()}")
    return "\n".join(lines)
