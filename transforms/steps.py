"""The Beam steps up to deduplication: parse, gate by consent, map, assign identity.

Streaming runs them one DoFn a step and one message an element; a batch run runs them all in
one DoFn over chunks of payloads (:class:`PlanEvents`, see :mod:`transforms.chunks`). Either
way each step is one of :class:`decide.destination.Destination`'s and counts the same; the
decisions themselves are made there, in plain Python, shared with ``explain``.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP

from decide.calls import EventCalls
from decide.dead_letter import DeadLetter
from decide.destination import CONSENT_DENIED, IGNORED, Destination, DestinationSpec
from decide.destination import compiled as compiled_destination
from decide.event import RejectedInput, parse_payload
from transforms import DEAD_LETTER_TAG
from transforms.chunks import CHUNK, Chunk
from transforms.metrics import count as _count


def compiled(spec: DestinationSpec, quiet: bool = False) -> Destination:
    """The process's compiled destination for ``spec`` (see :func:`decide.destination.compiled`),
    its function errors counted as a Beam counter too."""
    destination = compiled_destination(spec, quiet)
    if not quiet:
        destination.function_errors.hook = _count_function_error
    return destination


def _count_function_error(place: str) -> None:
    _count("mapping_function_errors")


class _DestinationStep(beam.DoFn):
    def __init__(self, spec: DestinationSpec):
        self.spec = spec
        self.destination: Destination | None = None

    def setup(self):
        self.destination = compiled(self.spec)


class ParseEventsAtElementTime(beam.DoFn):
    """Streaming: raw input (bytes, text, decoded JSON, or a Pub/Sub message) → normalised events.

    One input may hold many events (an envelope); each invalid part becomes its own dead letter.
    A Pub/Sub message's element time (its publish time, or ``--timestamp_attribute``) stands in
    for a missing event timestamp. (A batch run parses in :class:`PlanEvents`.)
    """

    def __init__(self, collector: dict, flow: str):
        self.collector = collector
        self.flow = flow

    def process(self, element: Any, timestamp=beam.DoFn.TimestampParam):
        _count("inputs_read")
        payload, default_ts = _payload_and_time(element, timestamp)
        for item in parse_payload(payload, collector=self.collector, default_timestamp_ms=default_ts, flow=self.flow):
            if isinstance(item, DeadLetter):
                _count(f"dead_letter_{item.reason}")
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
            else:
                _count("events_parsed")
                yield item


def _payload_and_time(element: Any, timestamp=None) -> tuple[Any, int | None]:
    """The payload, and the time that stands in for a missing event timestamp: for a Pub/Sub
    message its element time (the publish time, or ``--timestamp_attribute`` when given)."""
    data = getattr(element, "data", None)
    if isinstance(element, RejectedInput):
        return element, None
    if data is not None and hasattr(element, "attributes"):  # a PubsubMessage
        if timestamp is not None and MIN_TIMESTAMP < timestamp < MAX_TIMESTAMP:
            return data, timestamp.micros // 1000
        publish_time = getattr(element, "publish_time", None)
        default_ts = int(publish_time.timestamp() * 1000) if publish_time is not None else None
        return data, default_ts
    return element, None


class GateConsent(_DestinationStep):
    """The destination's required consent (``config.consent``). Denied events are dropped and
    counted, never written anywhere: they hold personal data nobody consented to share."""

    def process(self, event: dict):
        if self.destination.consent_granted(event):
            yield event
        else:
            _count("events_consent_denied")


class MapEvents(_DestinationStep):
    """The flow's mapping: policies, rule lookup, data; drops ``ignore`` rules and events whose
    rule's required consent is not granted (the rule is only known once it has been looked up)."""

    def process(self, event: dict):
        result = self.destination.mapping_result(event)
        if result.ignored:
            _count("events_ignored")
            return
        if not self.destination.rule_consent_granted(result):
            _count("events_consent_denied")
            return
        yield self.destination.to_mapped(result, event)


class AssignIdentity(_DestinationStep):
    """userId / anonymousId and the event's calls, keyed by the per-user state key."""

    def process(self, mapped):
        planned = self.destination.plan(mapped)
        if isinstance(planned, DeadLetter):
            _count(f"dead_letter_{planned.reason}")
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, planned)
            return
        yield planned.key, planned


# What a dropped event counts as, by the outcome that dropped it.
_DROPPED = {CONSENT_DENIED: "events_consent_denied", IGNORED: "events_ignored"}


class PlanEvents(_DestinationStep):
    """Batch: chunks of payloads → chunks of ``(state key, EventCalls)`` (at most ``CHUNK`` a
    chunk), as ParseEventsAtElementTime, GateConsent, MapEvents and AssignIdentity would give
    them one by one, with the same counters; each dead letter leaves on its own."""

    def process(self, payloads: list):
        destination = self.destination
        collector, flow = self.spec.collector, self.spec.flow_name
        tally: dict[str, int] = {"inputs_read": len(payloads)}
        planned = Chunk()
        for element in payloads:
            # No element time here (asking Beam for it is a slower path for every element): a
            # Pub/Sub message's publish time stands in for a missing event timestamp.
            payload, default_ts = _payload_and_time(element)
            for item in parse_payload(payload, collector=collector, default_timestamp_ms=default_ts, flow=flow):
                if isinstance(item, DeadLetter):
                    dead = item
                else:
                    tally["events_parsed"] = tally.get("events_parsed", 0) + 1
                    outcome = destination.before_deduplication(item)
                    if isinstance(outcome, EventCalls):
                        planned.append((outcome.key, outcome))
                        if len(planned) >= CHUNK:
                            yield planned
                            planned = Chunk()
                        continue
                    if outcome.dead_letter is None:
                        name = _DROPPED[outcome.outcome]
                        tally[name] = tally.get(name, 0) + 1
                        continue
                    dead = outcome.dead_letter
                name = f"dead_letter_{dead.reason}"
                tally[name] = tally.get(name, 0) + 1
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead)
        if planned:
            yield planned
        for name, n in tally.items():
            _count(name, n)
