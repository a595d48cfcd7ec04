"""DeduplicateIdentity: identify and group only when they changed for that user (SPEC 4.3).

Input: ``(state key, EventCalls)``; output: :class:`transforms.sink.Delivery`, the calls of one
event together and in order. The decision is ``Destination.deduplicate`` (shared with
``explain``); this module only keeps its state:

* streaming: a keyed stateful DoFn, state cleared by an event-time timer after ``ttl`` without
  events for the key, so state stays bounded in a never-ending stream;
* batch: the key's events grouped (as bytes, see :func:`encode_calls`) and taken in
  event-timestamp order (then id), so a backfill gives the same calls however its input was
  ordered.
"""
from __future__ import annotations

import pickle
import typing

import apache_beam as beam
import orjson
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration

from transforms.calls import EventCalls
from transforms.destination import DestinationSpec
from transforms.identity import IdentityState
from transforms.sink import JSON_NATIVE, Delivery
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
        _, encoded = keyed
        state = None
        events = [decode_calls(data) for data in encoded]
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


# -- EventCalls through the batch shuffle ---------------------------------------------------------
# The batch GroupByKey carries each EventCalls as bytes we encode ourselves. The FnApiRunner's
# grouping buffer decodes every value it receives and holds the objects until the group is read
# (then encodes them again): as bytes, what it holds is ~1.5 KB an event instead of several KB of
# dicts, and the value coder's work is a copy. JSON via orjson is also several times faster than
# the default pickling, both ways.
_JSON, _PICKLED = b"j", b"p"


def encode_calls(calls: EventCalls) -> bytes:
    """``calls`` as bytes for the shuffle: JSON where it can be. What JSON cannot hold as it is (a
    ``$code`` function's datetime, set or non-string key, an integer beyond 64 bits) makes orjson
    raise, and that element is pickled instead. NaN and Infinity become null and tuples lists,
    which is what :func:`transforms.sink.to_wire` makes of them before sending anyway."""
    fields = [calls.event, calls.key, calls.timestamp_ms, calls.identify, calls.identify_signature,
              calls.group, calls.group_signature, calls.others]
    try:
        return _JSON + orjson.dumps(fields, option=JSON_NATIVE)
    except TypeError:  # orjson.JSONEncodeError is one
        return _PICKLED + pickle.dumps(calls, protocol=pickle.HIGHEST_PROTOCOL)


def decode_calls(data: bytes) -> EventCalls:
    if data[:1] == _PICKLED:
        return pickle.loads(memoryview(data)[1:])
    event, key, timestamp_ms, identify, identify_signature, group, group_signature, others = orjson.loads(
        memoryview(data)[1:])
    return EventCalls(event, key, timestamp_ms, identify, _signature(identify_signature), group,
                      _signature(group_signature), others)


def _signature(value):
    return tuple(value) if value is not None else None


def _encode_keyed(keyed: tuple[str, EventCalls]) -> tuple[str, bytes]:
    return keyed[0], encode_calls(keyed[1])


class DeduplicateIdentity(beam.PTransform):
    def __init__(self, spec: DestinationSpec, streaming: bool):
        super().__init__()
        self.spec = spec
        self.streaming = streaming

    def expand(self, keyed_calls):
        if self.streaming:
            # Left as it is (pickled values): a running job's update needs the same coders.
            keyed_calls = keyed_calls | "TypeKeys" >> beam.Map(lambda kv: kv).with_output_types(
                typing.Tuple[str, typing.Any])
            return keyed_calls | "PerKeyState" >> beam.ParDo(_DedupStateful(self.spec))
        keyed_calls = keyed_calls | "EncodeForShuffle" >> beam.Map(_encode_keyed).with_output_types(
            typing.Tuple[str, bytes])
        return (keyed_calls
                | "GroupByUser" >> beam.GroupByKey()
                | "InEventTimeOrder" >> beam.ParDo(_DedupSorted(self.spec)))

