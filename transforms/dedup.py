"""DeduplicateIdentity: identify and group only when they changed for that user (SPEC 4.3).

Input: ``(state key, EventCalls)``; output: :class:`decide.wire.EventMessages`, the calls of one
event together and in order (in a batch run, lists of each: see :mod:`transforms.chunks`). The
decision is ``Destination.deduplicate`` (shared with ``explain``); this module only keeps its state:

* streaming: a keyed stateful DoFn, state cleared by an event-time timer after ``ttl`` without
  events for the key, so state stays bounded in a never-ending stream;
* batch: the decisions taken first, per user in event-timestamp order (then by a digest of
  the event id), from a small record of each event (:class:`DecideIdentity`, on a second read
  of the input), then looked up by each event (``ApplyDecisions``), so a backfill gives the
  same calls however its input was ordered, and a local run's memory does not grow with the
  size of its events.
"""

from __future__ import annotations

import struct
import typing
import zlib
from bisect import bisect_left

import apache_beam as beam
from apache_beam.coders import BytesCoder, PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Duration

from decide.calls import EventCalls
from decide.dead_letter import DeadLetter
from decide.destination import DestinationSpec, Mapped
from decide.event import parse_payload
from decide.identity import IdentityState, decide, event_digest
from decide.identity import digest64 as _digest
from decide.wire import EventMessages
from transforms.chunks import Chunk
from transforms.metrics import counter
from transforms.steps import compiled


def _emit(destination, calls: EventCalls, state: IdentityState | None) -> tuple[EventMessages, IdentityState]:
    messages, new_state, suppressed = destination.deduplicate(calls, state)
    for kind in suppressed:
        counter(f"{kind}_suppressed").inc()
    return EventMessages(calls.event, messages), new_state


class _DedupStateful(beam.DoFn):
    """Streaming: per-key state, expired by an event-time timer."""

    IDENTITY = ReadModifyWriteStateSpec("identity", PickleCoder())
    EXPIRES = ReadModifyWriteStateSpec("expires_at", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, spec: DestinationSpec):
        self.spec = spec

    def setup(self):
        self.destination = compiled(self.spec)

    def process(
        self,
        keyed,
        timestamp=beam.DoFn.TimestampParam,
        identity=beam.DoFn.StateParam(IDENTITY),
        expires=beam.DoFn.StateParam(EXPIRES),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ):
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


# -- batch: decide on small records, then join the decisions back ------------------------------
# A batch run reads its input twice. The first read plans every event again (quietly: no
# counters, no dead letters) and sends through the shuffle only what the decision needs, a
# fixed 40-byte record per event; the decision is taken per user in event-time order with
# ``decide``, as streaming and explain take it, and what comes out is the set of (event,
# signature) pairs whose identify or group fires. The second read is the pipeline's own:
# each planned event looks its decision up in that set (one side input: sorted 8-byte keys)
# and goes on with its calls in order. The FnApiRunner holds a shuffle's whole contents in
# memory, several copies at once: about 20 bytes an event (40, compressed as the records leave
# each bundle) instead of a whole event with its calls (~1.5 KB, ~7 KB of peak memory).
BUCKETS = 1024
# user digest, event time (ms), event digest, identify signature digest, group signature digest
_RECORD = struct.Struct("<QqQQQ")
_NO_CANDIDATE = 0  # the event has no identify (or group) candidate
_EMPTY_SIGNATURE = 1  # ("", ""): what "nothing sent yet" is compared as
_IDENTIFY, _GROUP = 0, 1
_KIND_BIT_CLEAR = (1 << 64) - 2


# Users and signatures repeat from one event to the next: their digests are remembered (bounded).
_DIGESTS: dict = {}
_DIGESTS_MAX = 1 << 16


def user_digest(key: str) -> int:
    found = _DIGESTS.get(key)
    if found is None:
        found = _remember(key, _digest(key))
    return found


def signature_digest(signature) -> int:
    if signature is None:
        return _NO_CANDIDATE
    found = _DIGESTS.get(signature)
    if found is None:
        if signature == ("", ""):
            found = _EMPTY_SIGNATURE
        else:
            sent_as, traits = signature
            found = _digest(f"{len(sent_as)}:{sent_as}{traits}")
            found = found if found > _EMPTY_SIGNATURE else found + 2  # never taken for the two markers
        _remember(signature, found)
    return found


def _remember(thing, digest: int) -> int:
    if len(_DIGESTS) >= _DIGESTS_MAX:
        _DIGESTS.clear()
    _DIGESTS[thing] = digest
    return digest


def _signature(value: int):
    """A digest back as ``decide`` compares it: None, "nothing sent", or the digest itself."""
    if value == _NO_CANDIDATE:
        return None
    if value == _EMPTY_SIGNATURE:
        return ("", "")  # equal to what decide starts from: an empty identify never fires
    return value


def fire_key(event: int, signature: int, kind: int) -> int:
    """What the decision set holds for one call that fires: the event and the call's
    signature (two random 64-bit digests, so their XOR is one too), its kind in the low bit."""
    return ((event ^ signature) & _KIND_BIT_CLEAR) | kind


def decision_record(key: str, timestamp_ms: int, event_id, identify_signature, group_signature) -> tuple[int, bytes]:
    """(bucket, record) of one planned event."""
    user = user_digest(key)
    return user % BUCKETS, _RECORD.pack(
        user,
        timestamp_ms,
        event_digest(key, event_id),
        signature_digest(identify_signature),
        signature_digest(group_signature),
    )


def decide_records(records: bytes, ttl_ms: int | None) -> bytes:
    """The fire keys (unique, as native uint64) of a bucket's records: per user, in
    event-time order, then by event digest (any input order gives the same)."""
    fired = set()
    user = state = None
    for user_of, timestamp_ms, event, identify, group in sorted(_RECORD.iter_unpack(records)):
        if user_of != user:
            user, state = user_of, None
        fire_identify, fire_group, state = decide(state, timestamp_ms, _signature(identify), _signature(group), ttl_ms)
        if fire_identify:
            fired.add(fire_key(event, identify, _IDENTIFY))
        if fire_group:
            fired.add(fire_key(event, group, _GROUP))
    return struct.pack(f"{len(fired)}Q", *fired)


class _DecisionRecords(beam.DoFn):
    """Batch, the first read: chunks of payloads → each planned event's record, gathered by
    bucket over the bundle and handed on at its end (one element per bucket and bundle, not one
    per event); nothing counted or dead-lettered (the pipeline's own steps do that on the
    second read)."""

    def __init__(self, spec: DestinationSpec):
        self.spec = spec

    def setup(self):
        self.destination = compiled(self.spec, quiet=True)
        # Without an expiry, an event with neither candidate cannot change any decision.
        self.every_event = self.spec.state_ttl_ms is not None

    def start_bundle(self):
        self.records: dict[int, bytearray] = {}

    def process(self, payloads: list):
        destination = self.destination
        with_data = destination.decisions_need_data
        collector, flow = self.spec.collector, self.spec.flow_name
        records = self.records
        for payload in payloads:
            for item in parse_payload(payload, collector=collector, flow=flow):
                mapped = item if isinstance(item, DeadLetter) else destination.mapped_or_outcome(item, with_data)
                if not isinstance(mapped, Mapped):  # dead letters and drops are the second read's to count
                    continue
                inputs = destination.decision_inputs(mapped)
                if inputs is not None and (
                    self.every_event or inputs.identify_signature is not None or inputs.group_signature is not None
                ):
                    bucket, record = decision_record(*inputs)
                    found = records.get(bucket)
                    if found is None:
                        records[bucket] = bytearray(record)
                    else:
                        found += record

    def finish_bundle(self):
        for bucket, records in self.records.items():
            yield GlobalWindows.windowed_value((bucket, bytes(records)))
        self.records = {}


# Records leave a bundle compressed: a bucket's records sorted by user and time, stored column
# by column (time as differences), through zlib. A user's digest and signatures repeat from one
# event to the next, so this about halves what the shuffle holds (the event digest, random,
# stays 8 bytes). A frame: record count, compressed size, compressed columns; frames concatenate.
_FRAME = struct.Struct("<II")
_FIELDS = ("user", "time", "event", "identify", "group")


def _columns_dtype():
    import numpy

    return numpy.dtype([("user", "<u8"), ("time", "<i8"), ("event", "<u8"), ("identify", "<u8"), ("group", "<u8")])


def pack_records(records: bytes | bytearray) -> bytes:
    """Raw records (``_RECORD`` after ``_RECORD``) as one compressed frame."""
    import numpy

    if not records:
        return b""
    table = numpy.sort(numpy.frombuffer(bytes(records), dtype=_columns_dtype()), order=list(_FIELDS))
    times = table["time"].copy()
    times[1:] = numpy.diff(table["time"])
    body = zlib.compress(
        b"".join(
            [
                table["user"].tobytes(),
                times.tobytes(),
                table["event"].tobytes(),
                table["identify"].tobytes(),
                table["group"].tobytes(),
            ]
        ),
        1,
    )
    return _FRAME.pack(len(table), len(body)) + body


def unpack_records(frames: bytes) -> bytes:
    """Concatenated frames back as raw records."""
    import numpy

    view, at, parts = memoryview(frames), 0, []
    while at < len(view):
        count, size = _FRAME.unpack_from(view, at)
        at += _FRAME.size
        columns = numpy.frombuffer(zlib.decompress(view[at : at + size]), dtype="<u8").reshape(5, count)
        at += size
        table = numpy.empty(count, dtype=_columns_dtype())
        table["user"], table["event"] = columns[0], columns[2]
        table["identify"], table["group"] = columns[3], columns[4]
        table["time"] = numpy.cumsum(columns[1].view("<i8"))
        parts.append(table.tobytes())
    return b"".join(parts)


class _DecidePerUser(beam.CombineFn):
    """A bucket's records: raw while a bundle adds them (a bytearray), compressed frames once
    they leave it (bytes; lifted, per bundle before the shuffle), decided at the end."""

    def __init__(self, ttl_ms: int | None):
        self.ttl_ms = ttl_ms

    def create_accumulator(self):
        return bytearray()

    def add_input(self, accumulator, records):
        """``records``: raw records of one bundle (one or more, concatenated)."""
        if not isinstance(accumulator, bytearray):  # frames: open them again to add
            accumulator = bytearray(unpack_records(accumulator))
        accumulator += records
        return accumulator

    def merge_accumulators(self, accumulators):
        return b"".join(self.compact(accumulator) for accumulator in accumulators)

    def compact(self, accumulator):
        return pack_records(accumulator) if isinstance(accumulator, bytearray) else accumulator

    def extract_output(self, accumulator):
        records = bytes(accumulator) if isinstance(accumulator, bytearray) else unpack_records(accumulator)
        return decide_records(records, self.ttl_ms)

    def get_accumulator_coder(self):
        return BytesCoder()


class _AllFired(beam.CombineFn):
    """Every bucket's fire keys as one sorted array (native uint64), for a lookup by bisection."""

    def create_accumulator(self):
        return bytearray()

    def add_input(self, accumulator, keys):
        accumulator += keys
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = bytearray()
        for accumulator in accumulators:
            merged += accumulator
        return bytes(merged)

    def compact(self, accumulator):
        return bytes(accumulator)

    def extract_output(self, accumulator):
        import numpy

        return numpy.sort(numpy.frombuffer(bytes(accumulator), dtype=numpy.uint64)).tobytes()

    def get_accumulator_coder(self):
        return BytesCoder()


class _ApplyDecisions(beam.DoFn):
    """Batch, the second read: chunks of planned events → chunks of :class:`EventMessages`,
    each with the identify/group its decision fires.

    The decisions come as one side input, not one per bucket: Beam's state cache weighs every
    value it loads (about 10 ms each here, whatever its size), so a lookup per bucket and bundle
    cost more than the whole transform."""

    def __init__(self, spec: DestinationSpec):
        self.spec = spec
        self._blob = None
        self._keys = None

    def process(self, planned: list, fired: bytes):
        if fired is not self._blob:  # a new bundle may hand the same cached bytes again
            self._blob, self._keys = fired, memoryview(fired).cast("B").cast("Q")
        keys = self._keys
        identify_suppressed = group_suppressed = 0
        deliveries = Chunk()
        for key, calls in planned:
            fire_identify = fire_group = False
            if calls.identify is not None or calls.group is not None:
                event = event_digest(key, calls.event.get("id"))
                if calls.identify is not None:
                    fire_identify = _holds(keys, fire_key(event, signature_digest(calls.identify_signature), _IDENTIFY))
                    identify_suppressed += not fire_identify
                if calls.group is not None:
                    fire_group = _holds(keys, fire_key(event, signature_digest(calls.group_signature), _GROUP))
                    group_suppressed += not fire_group
            deliveries.append(EventMessages(calls.event, calls.messages(identify=fire_identify, group=fire_group)))
        if identify_suppressed:
            counter("identify_suppressed").inc(identify_suppressed)
        if group_suppressed:
            counter("group_suppressed").inc(group_suppressed)
        yield deliveries


def _holds(sorted_keys, key: int) -> bool:
    at = bisect_left(sorted_keys, key)
    return at < len(sorted_keys) and sorted_keys[at] == key


class DecideIdentity(beam.PTransform):
    """Batch: chunks of payloads (a second read of the input) → one bytes value, the sorted fire keys
    of every identify and group call that fires (8 bytes each); a side input of
    DeduplicateIdentity."""

    def __init__(self, spec: DestinationSpec):
        super().__init__()
        self.spec = spec

    def expand(self, payloads):
        return (
            payloads
            | "DecisionRecords" >> beam.ParDo(_DecisionRecords(self.spec)).with_output_types(tuple[int, bytes])
            | "DecidePerUser"
            >> beam.CombinePerKey(_DecidePerUser(self.spec.state_ttl_ms)).with_output_types(tuple[int, bytes])
            | "FireKeys" >> beam.Values().with_output_types(bytes)
            | "AllFired" >> beam.CombineGlobally(_AllFired()).with_output_types(bytes)
        )


class DeduplicateIdentity(beam.PTransform):
    """``decisions`` (batch only): the output of :class:`DecideIdentity` on the same input."""

    def __init__(self, spec: DestinationSpec, streaming: bool, decisions: beam.PCollection | None = None):
        super().__init__()
        self.spec = spec
        self.streaming = streaming
        self.decisions = decisions

    def expand(self, keyed_calls):
        """Streaming: ``(state key, EventCalls)`` → EventMessages; batch: chunks of them →
        chunks of EventMessages."""
        if self.streaming:
            # Left as it is (pickled values): a running job's update needs the same coders.
            keyed_calls = keyed_calls | "TypeKeys" >> beam.Map(lambda kv: kv).with_output_types(tuple[str, typing.Any])
            return keyed_calls | "PerKeyState" >> beam.ParDo(_DedupStateful(self.spec))
        if self.decisions is None:
            raise ValueError("a batch DeduplicateIdentity needs the decisions of DecideIdentity")
        return keyed_calls | "ApplyDecisions" >> beam.ParDo(
            _ApplyDecisions(self.spec), beam.pvalue.AsSingleton(self.decisions)
        ).with_output_types(Chunk)
