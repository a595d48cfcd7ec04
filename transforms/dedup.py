"""DeduplicateIdentity: identify and group only when they changed for that user (SPEC 4.3).

Input: ``(state key, EventCalls)``; output: :class:`transforms.sink.Delivery`, the calls of one
event together and in order. The decision is ``Destination.deduplicate`` (shared with
``explain``); this module only keeps its state:

* streaming: a keyed stateful DoFn, state cleared by an event-time timer after ``ttl`` without
  events for the key, so state stays bounded in a never-ending stream;
* batch: the key's events grouped and taken in event-timestamp order (then id), so a backfill
  gives the same calls however its input was ordered.
"""
from __future__ import annotations

import typing

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration

from transforms.calls import EventCalls
from transforms.destination import DestinationSpec
from transforms.identity import IdentityState
from transforms.sink import Delivery
from transforms.metrics import counter
from transforms.steps import compiled


def _emit(destination, calls: EventCalls, state: IdentityState | None) -> tuple[Delivery, IdentityState]:
    messages, new_state, suppressed = destination.deduplicate(calls, state)
    for kind in suppressed:
        counter(f"{kind}_suppressed").inc()
    return Delivery(calls.event, messages), new_state


class _DedupSorted(beam.DoFn):
    """Batch: all events of one key at once, in event-time order."""

    def __init__(self, spec: DestinationSpec):
        self.spec = spec

    def setup(self):
        self.destination = compiled(self.spec)

    def process(self, keyed):
        _, events = keyed
        state = None
        for calls in sorted(events, key=lambda c: (c.timestamp_ms, c.event.get("id", ""))):
            delivery, state = _emit(self.destination, calls, state)
            yield delivery


class _DedupStateful(beam.DoFn):
    """Streaming: per-key state, expired by an event-time timer."""

    IDENTITY = ReadModifyWriteStateSpec("identity", PickleCoder())
    EXPIRES = ReadModifyWriteStateSpec("expires_at", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, spec: DestinationSpec):
        self.spec = spec

    def setup(self):
        self.destination = compiled(self.spec)

    def process(self, keyed, timestamp=beam.DoFn.TimestampParam,
                identity=beam.DoFn.StateParam(IDENTITY), expires=beam.DoFn.StateParam(EXPIRES),
                expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, calls = keyed
        delivery, new_state = _emit(self.destination, calls, identity.read())
        identity.write(new_state)
        ttl_ms = self.spec.state_ttl_ms
        if ttl_ms is not None:
            expires_at = timestamp + Duration(micros=ttl_ms * 1000)
            current = expires.read()
            if current is None or expires_at > current:
                expires.write(expires_at)
                expiry.set(expires_at)
        yield delivery

    @on_timer(EXPIRY)
    def expire(self, identity=beam.DoFn.StateParam(IDENTITY), expires=beam.DoFn.StateParam(EXPIRES)):
        identity.clear()
        expires.clear()
        counter("identity_state_expired").inc()


class DeduplicateIdentity(beam.PTransform):
    def __init__(self, spec: DestinationSpec, streaming: bool):
        super().__init__()
        self.spec = spec
        self.streaming = streaming

    def expand(self, keyed_calls):
        keyed_calls = keyed_calls | "TypeKeys" >> beam.Map(lambda kv: kv).with_output_types(
            typing.Tuple[str, typing.Any])
        if self.streaming:
            return keyed_calls | "PerKeyState" >> beam.ParDo(_DedupStateful(self.spec))
        return (keyed_calls
                | "GroupByUser" >> beam.GroupByKey()
                | "InEventTimeOrder" >> beam.ParDo(_DedupSorted(self.spec)))
