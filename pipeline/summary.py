"""The end-of-run summary: what happened to every input, from the Beam counters."""
from __future__ import annotations

from apache_beam.metrics.metric import MetricsFilter

from transforms.sink import NAMESPACE


def counters(result) -> dict[str, int]:
    """Committed (else attempted) counter values of our namespace, by name."""
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    out: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + (value or 0)
    return out


def render(counts: dict[str, int]) -> str:
    calls = {k[len("calls_sent_"):]: v for k, v in counts.items() if k.startswith("calls_sent_") and v}
    dead = {k[len("dead_letter_"):]: v for k, v in counts.items() if k.startswith("dead_letter_") and v}
    rows = [
        ("inputs read", counts.get("inputs_read", 0), ""),
        ("events parsed", counts.get("events_parsed", 0), ""),
        ("events delivered", counts.get("events_delivered", 0),
         ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) and
         "calls: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))),
        ("events ignored (rule)", counts.get("events_ignored", 0), ""),
        ("events consent denied", counts.get("events_consent_denied", 0), ""),
        ("dead letters", sum(dead.values()), ", ".join(f"{k} {v}" for k, v in sorted(dead.items()))),
        ("identify suppressed", counts.get("identify_suppressed", 0), "unchanged since the last identify"),
        ("group suppressed", counts.get("group_suppressed", 0), "unchanged since the last group"),
        ("requests to Segment", counts.get("requests_to_segment", 0), ""),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {label:<{width}}  {value:>8}" + (f"   ({note})" if note else "") for label, value, note in rows)
