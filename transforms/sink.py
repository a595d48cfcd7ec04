"""Delivery to Segment through segment-analytics-python: batches in, fates out.

How events become batches depends on the run (``pipeline.graph`` wires one or the other):

* batch runs: :class:`BatchAndSend` cuts batches within each bundle (a batch run's bundles are
  large) and sends the last, partial one in ``finish_bundle``: no shuffle, no state;
* streaming: :class:`BatchCalls` gathers calls across bundles **in Beam state** (keyed over a
  shards that follow the job's parallelism), so nothing waits only in memory, flushed after ``flushInterval`` ms
  and at the end of the window (a drain); :class:`SendToSegment` sends each batch.

Either way a batch is cut at ``flushAt`` calls and before it would pass 2,500 messages or
:data:`MAX_BATCH_BYTES`; the calls of one event (a :class:`Delivery`) are never split and keep
their order. Both sinks send through a :class:`PipelinedSender` (the next batch is prepared while
the previous one is on the wire) over a :class:`SegmentConnection`, which wraps one SDK
``Client`` so that every message gets a known fate: accepted, or failed with the reason; all of
a bundle's batches are settled before the bundle commits.

The SDK is asynchronous and loses things quietly; each of its loss paths is closed here:

* ``track()`` and the others return ``(False, msg)`` when the queue is full: every return value
  is checked, and a refused call fails its event.
* ``clean()`` silently drops values it cannot serialise: :func:`to_wire` turns every value into
  a JSON type first.
* a message over 32 KB raises (or is dropped by the consumer thread): measured before
  enqueueing, dead letter ``too_large``.
* errors arrive on the consumer thread, after its retries: ``on_error`` records the failed
  messageIds (and never raises), and the batch waits for them before deciding.
* ``flush()`` has no deadline: it runs on a helper thread joined with a deadline; on overrun
  the client is abandoned (the next batch gets a new one) and the batch's unsettled events
  fail (Segment's messageId dedup absorbs a late arrival).
* one bad message fails its whole request (400): the batch is halved until the bad event
  stands alone, so its neighbours are delivered.
* ``atexit`` keeps every Client alive until the process exits: unregistered; connections are
  pooled per configuration and shut down after a grace period.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import enum
import hashlib
import json
import logging
import math
import numbers
import threading
import time
import typing
import uuid
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Iterable, Iterator

import apache_beam as beam
import orjson
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from segment.analytics.version import VERSION as _SDK_VERSION

from transforms import dead_letter as dl
from transforms.dead_letter import DeadLetter, payload_text
from transforms.metrics import NAMESPACE, counter
from transforms.secrets import redact_in_sdk_logs
from transforms.settings import INT_SETTINGS, SegmentSettings

log = logging.getLogger(__name__)
# Progress lines ("N events delivered so far") are meant to be seen during a batch run, even
# when the application's root logger is at WARNING: this logger says INFO itself.
progress_log = logging.getLogger(__name__ + ".progress")
progress_log.setLevel(logging.INFO)

DEAD_LETTER_TAG = "dead_letter"

MAX_MESSAGE_BYTES = 32 * 1024
# A request must stay under Segment's 500 KB. The SDK cuts its own batches only *after* passing
# 475,000 bytes (so it can build ~507 KB requests); keeping each batch at or below this, measured
# as the SDK serialises, leaves the SDK no reason to cut and the request well under 500 KB
# (plus ~2 bytes of separator a message and ~150 bytes of envelope).
MAX_BATCH_BYTES = 450_000
MAX_BATCH_MESSAGES = 2_500
# What the SDK adds to every message: context.library (our estimate counts it with its separator).
_LIBRARY_BYTES = len(', "library": ') + len(json.dumps({"name": "analytics-python", "version": _SDK_VERSION}))
# The fields the SDK writes for each call type, with what it writes when the call has none.
_SDK_DEFAULTS = {
    "common": {"integrations": {}, "anonymousId": None, "userId": None, "context": {}},
    "track": {"properties": {}}, "identify": {"traits": {}}, "group": {"traits": {}},
    "page": {"properties": {}, "category": None, "name": None},
    "screen": {"properties": {}, "category": None, "name": None},
}
_SDK_DEFAULT_BYTES = {kind: {key: len(json.dumps({key: value})) for key, value in fields.items()}
                      for kind, fields in _SDK_DEFAULTS.items()}
# BatchCalls' keys. 0 (the default): as many as there are threads delivering, on every worker
# (see worker_shard), so the job's parallelism, not a number fixed at launch, bounds how many
# batches fill and go out at once. N > 0: N keys by user, one user's calls in one shard, in order.
AUTO_SHARDS = 0
DEFAULT_SHARDS = AUTO_SHARDS
# How long the SDK's consumer thread gathers one batch. Generous, so that the calls enqueued for
# one batch leave as one request (the consumer returns as soon as it has ``upload_size`` calls);
# it only bounds how long a paused consumer thread lingers after shutdown.
GATHER_WINDOW_S = 5.0
_RETRYABLE_4XX = (408, 410, 429, 460)
_BISECT_STATUSES = (400, 413)  # the request was refused for its content: some message in it


# -- values ------------------------------------------------------------------------------------
def to_wire(value: Any) -> Any:
    """``value`` as plain JSON types, so the SDK keeps it as it is.

    The SDK's ``clean()`` silently drops a dict entry whose value it cannot handle (any object
    that is not a str/number/bool/None/date/list/dict/Enum/Decimal: with a warning only, and a
    whole list when one item is such an object); ``bytes`` that are not UTF-8 make it raise;
    ``json.dumps`` writes NaN and Infinity, which are not JSON; keys that are not strings make it
    raise on the consumer thread (the message is lost and ``flush()`` never returns). Mapping
    output is JSON-typed already, but a ``$code:`` function can return anything: every value
    passes through here before it is enqueued.
    """
    try:
        # Plain JSON types, the mapping's usual output, round-trip through orjson in C (NaN and
        # Infinity become null, tuples lists, enums their values); anything else makes it raise
        # and takes the general path.
        return orjson.loads(orjson.dumps(value, option=JSON_NATIVE))
    except TypeError:  # orjson.JSONEncodeError is one
        return _to_wire_any(value)


# What orjson must refuse rather than write its own way: datetimes (isoformat here), dataclasses
# (str here) and subclasses of str/int/dict/list (turned into their plain types here).
JSON_NATIVE = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def _to_wire_any(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)  # an int subclass (IntEnum, say) as a plain int
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_wire_key(k): _to_wire_any(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire_any(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_to_wire_any(v) for v in value]
        try:
            return sorted(items)  # a stable order, so the same event gives the same message
        except TypeError:
            return items
    if isinstance(value, enum.Enum):
        return _to_wire_any(value.value)
    if isinstance(value, Decimal):
        return _to_wire_any(float(value))
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _to_wire_any(float(value))
    return str(value)


def _wire_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return json.dumps(key)  # "true", "false", "null", as json.dumps would write them
    if isinstance(key, numbers.Number):
        return str(to_wire(key))  # 2, not np.int64(2)
    return str(key)


def json_dumps_size(value: Any) -> int:
    """``len(json.dumps(value))`` for a JSON-typed value, or a little more; never less.

    Measured on orjson's output, several times faster: json.dumps adds a space after each
    separator (counted as every ',' and ':', those inside strings too), escapes each non-ASCII
    character as ``\\uXXXX`` (at most 4 bytes more than its UTF-8 for each byte it has beyond
    the first) and DEL as ``\\u007f``; orjson writes floats as Python does, longer (0.00001 for
    1e-05), or one byte shorter (1e-9 for 1e-09: counted as every "e-"). What orjson refuses
    (a lone surrogate) is measured by json.dumps itself.
    """
    try:
        data = orjson.dumps(value)
    except TypeError:
        return len(json.dumps(value))
    size = (len(data) + data.count(b",") + data.count(b":") + 5 * data.count(b"\x7f")
            + data.count(b"e-"))  # orjson writes 1e-9 where Python writes 1e-09
    if not data.isascii():
        size += 4 * (len(data) - len(data.decode()))
    return size


def wire_size(message: dict) -> int:
    """The bytes the SDK counts for ``message`` (JSON-typed, see :func:`to_wire`), never fewer:
    its ``json.dumps`` (spaces after separators, non-ASCII escaped) plus what the SDK adds to it
    (``context.library``, and each field the call lacks, written as null or ``{}``), plus 4
    (a numeric id becomes a string)."""
    size = json_dumps_size(message) + _LIBRARY_BYTES + 4
    for kind in ("common", message.get("type")):
        for key, n in _SDK_DEFAULT_BYTES.get(kind, {}).items():
            if key not in message:
                size += n  # '"key": default' less the braces, plus the ", " before it
    return size


# -- what travels between the steps ------------------------------------------------------------
@dataclass(slots=True)
class Delivery:
    """The calls of one event, which travel and succeed or fail together."""
    event: dict                      # normalised event: the dead-letter payload
    messages: list[dict]
    size: int = 0                    # wire_size of the messages (0 = not measured yet)
    # to_wire of the messages, kept from measuring to sending (not pickled: it would double
    # what a Delivery costs in Beam state).
    wire: list[dict] | None = field(default=None, compare=False, repr=False)

    def measure(self) -> int:
        if not self.size:
            self.size = sum(wire_size(m) for m in self.wire_messages())
        return self.size

    def wire_messages(self) -> list[dict]:
        if self.wire is None:
            self.wire = [to_wire(m) for m in self.messages]
        return self.wire

    def __getstate__(self):
        return self.event, self.messages, self.size

    def __setstate__(self, state):
        self.event, self.messages, self.size = state
        self.wire = None

    def shard_key(self, shards: int) -> str:
        """A stable shard: by user (the state key: anonymousId, else userId), so one user's
        calls share a shard and stay in order, else by event id."""
        first = self.messages[0] if self.messages else {}
        key = first.get("anonymousId") or first.get("userId") or self.event.get("id") or ""
        return str(zlib.crc32(str(key).encode()) % max(1, shards))


# Unique to this worker process: with the thread, it names the shard of whatever this thread
# delivers (the scheme of Beam's GroupIntoBatches.WithShardedKey), so shards come and go with
# the workers' threads, as autoscaling and updates change them.
_PROCESS_SHARD = uuid.uuid4().hex[:12]


def worker_shard(_delivery: "Delivery") -> str:
    """The shard of a delivery when shards follow the job's parallelism (AUTO_SHARDS)."""
    return f"{_PROCESS_SHARD}:{threading.get_ident():x}"


@dataclass
class SendOptions:
    """How delivery behaves beyond the flow's settings (pipeline options)."""
    flush_deadline_s: float = 120.0       # longest one batch may take to settle, retries included
    fail_bundle_on_error: bool = False    # transient failures fail the bundle instead of dead letters
    shards: int = DEFAULT_SHARDS          # keys of BatchCalls' state: its parallelism
    progress_interval_s: float = 30.0     # a progress line at most this often (0: never)
    clock: Callable[[], float] | None = None  # BatchCalls' processing-time clock (tests: TestStream)


@dataclass
class _Failure:
    status: int | None
    error: str
    reason: str | None = None  # set when the fate is known without the status (too_large, ...)


@dataclass
class BatchResult:
    delivered: list[Delivery] = field(default_factory=list)
    failed: list[tuple[Delivery, DeadLetter]] = field(default_factory=list)
    disabled: list[Delivery] = field(default_factory=list)
    requests: list[tuple[int, int]] = field(default_factory=list)  # (messages, milliseconds) per request


class _InvalidCall(ValueError):
    pass


# -- batching rules (shared by BatchCalls and SendToSegment) ------------------------------------
def exceeds_request_limits(calls: int, size: int, add_calls: int, add_size: int) -> bool:
    """Whether adding an event to a batch of ``calls``/``size`` would pass a request limit."""
    return calls + add_calls > MAX_BATCH_MESSAGES or size + add_size > MAX_BATCH_BYTES


class Batcher:
    """Cuts a sequence of deliveries into batches: ``flush_at`` calls, cut before a request
    limit would pass, an event's calls never split. (BatchCalls applies the same rules to
    batches kept in Beam state.)"""

    def __init__(self, flush_at: int):
        self.flush_at = max(1, min(int(flush_at), MAX_BATCH_MESSAGES))
        self._batch: list[Delivery] = []
        self._calls = self._size = 0

    def add(self, delivery: Delivery) -> list[list[Delivery]]:
        """The batches that ``delivery`` completes (none, one, or two)."""
        done = []
        calls, size = len(delivery.messages), delivery.measure()
        if self._batch and exceeds_request_limits(self._calls, self._size, calls, size):
            done.append(self.take())
        self._batch.append(delivery)
        self._calls, self._size = self._calls + calls, self._size + size
        if self._calls >= self.flush_at:
            done.append(self.take())
        return done

    def take(self) -> list[Delivery]:
        """The batch so far (maybe partial, maybe empty), and start a new one."""
        batch = self._batch
        self._batch, self._calls, self._size = [], 0, 0
        return batch


def split_batches(deliveries: Iterable[Delivery], flush_at: int) -> Iterator[list[Delivery]]:
    """Batches as the sinks cut them, for a known sequence."""
    batcher = Batcher(flush_at)
    for delivery in deliveries:
        yield from batcher.add(delivery)
    rest = batcher.take()
    if rest:
        yield rest


# -- the SDK client ---------------------------------------------------------------------------
class _ClientSlot:
    """One SDK Client and the failures its consumer thread reported (by messageId)."""

    def __init__(self, settings: SegmentSettings, options: SendOptions):
        from segment.analytics import Client  # not picklable: built where it is used

        self.failures: dict[str, _Failure] = {}
        self.lock = threading.Lock()
        # Retries must end inside the flush deadline, or the batch cannot settle in time.
        budget = max(1.0, options.flush_deadline_s * 0.8)
        write_key = settings.write_key.reveal()
        redact_in_sdk_logs(write_key)
        self.client = Client(
            write_key,
            host=settings.sdk_host(),
            send=True,
            on_error=self.record,
            max_queue_size=MAX_BATCH_MESSAGES * 4,
            upload_size=MAX_BATCH_MESSAGES,
            upload_interval=GATHER_WINDOW_S,
            max_retries=settings.max_retries,
            timeout=settings.http_request_timeout_ms / 1000.0,
            thread=1,
            max_total_backoff_duration=budget,
            max_rate_limit_duration=budget,
        )
        # The SDK registers Client.join at exit, which keeps every Client (and its thread) alive
        # until the process ends; we flush and shut down ourselves.
        atexit.unregister(self.client.join)
        self.consumer = self.client.consumers[0]

    def record(self, exc: BaseException, batch: list) -> None:
        """``on_error``: runs on the SDK's consumer thread and must never raise, or that thread
        dies and every later flush hangs."""
        try:
            status = getattr(exc, "status", None)
            status = status if isinstance(status, int) else None
            failure = _Failure(status, describe_error(exc))
            with self.lock:
                for message in batch:
                    message_id = message.get("messageId") if isinstance(message, dict) else None
                    if message_id:
                        self.failures[message_id] = failure
        except Exception:  # pragma: no cover - defensive
            pass

    def take(self, ids: Iterable[str]) -> dict[str, _Failure]:
        with self.lock:
            return {i: self.failures.pop(i) for i in ids if i in self.failures}

    def forget(self, ids: Iterable[str]) -> None:
        with self.lock:
            for i in ids:
                self.failures.pop(i, None)

    def abandon(self) -> None:
        """Stop the consumer without waiting: its batch may still be in flight (retrying)."""
        for consumer in self.client.consumers or ():
            consumer.pause()

    def shutdown(self) -> None:
        """``Client.shutdown()`` (flush, then stop the consumer) on a helper thread: everything
        was flushed already, and the paused consumer ends within GATHER_WINDOW_S."""
        threading.Thread(target=self.client.shutdown, name="segment-shutdown", daemon=True).start()


def describe_error(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        code = getattr(exc, "code", None)
        message = getattr(exc, "message", None) or str(exc)
        return f"HTTP {status}" + (f" {code}" if code and code != "unknown" else "") + f": {message}"
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}"


class SegmentConnection:
    """One SDK Client, used for one batch at a time, reporting the fate of each event."""

    def __init__(self, settings: SegmentSettings, options: SendOptions):
        self.settings = settings
        self.options = options
        self._lock = threading.Lock()
        self._in_flight = False         # one batch at a time: the consumer sends what is queued
        self._slot: _ClientSlot | None = None
        self.clients_built = 0
        self.progress = _Progress()
        if not settings.disable:
            settings.sdk_host()  # a path the SDK cannot reach fails now, not at the first batch
            self._slot = self._new_slot()

    def _new_slot(self) -> _ClientSlot:
        self.clients_built += 1
        return _ClientSlot(self.settings, self.options)

    def close(self) -> None:
        with self._lock:
            slot, self._slot = self._slot, None
        if slot is not None:
            try:
                slot.shutdown()
            except Exception:  # teardown is best-effort; nothing may be lost here, all was flushed
                log.exception("closing the Segment client failed")

    # -- sending ------------------------------------------------------------------------------
    def send(self, deliveries: list[Delivery], flow: str) -> BatchResult:
        """Send one batch and settle every event of it: delivered, failed (with a dead letter),
        or disabled. A 400 for a request is narrowed down to the event(s) Segment refuses."""
        return self.finish(self.start(deliveries, flow))

    def start(self, deliveries: list[Delivery], flow: str) -> "_Batch":
        """Check and enqueue one batch, and return while it is on the wire: :meth:`finish`
        waits for Segment's answer. One batch at a time: finish it before starting the next."""
        batch = _Batch(flow)
        if self.settings.disable:
            batch.result.disabled.extend(deliveries)  # build every call, send nothing
            return batch
        sendable = []
        for delivery in deliveries:
            if not delivery.messages:  # e.g. a silent rule whose identify did not change
                batch.result.delivered.append(delivery)
                continue
            try:
                sendable.append((delivery, _prepare(delivery)))
            except _TooLarge as exc:
                batch.result.failed.append((delivery, _dead_letter(delivery, dl.TOO_LARGE, str(exc), flow)))
            except _InvalidCall as exc:
                batch.result.failed.append((delivery, _dead_letter(delivery, dl.INVALID_CALL, str(exc), flow)))
        batch.chunks = list(_within_limits(sendable))
        if batch.chunks:
            batch.request = self._enqueue_request(batch.chunks[0])
        return batch

    def finish(self, batch: "_Batch") -> BatchResult:
        """Wait for the batch :meth:`start` put on the wire, and settle each of its events."""
        if batch.request is not None:
            first, request, batch.request = batch.chunks[0], batch.request, None
            self._isolate(first, self._settle(request, batch.result), batch.flow, batch.result)
        for chunk in batch.chunks[1:]:  # only when a batch passed the request limits: one by one
            self._send_and_isolate(chunk, batch.flow, batch.result)
        batch.chunks = []
        return batch.result

    def _send_and_isolate(self, items: list[tuple[Delivery, list]], flow: str, result: BatchResult) -> None:
        if items:
            self._isolate(items, self._settle(self._enqueue_request(items), result), flow, result)

    def _isolate(self, items: list[tuple[Delivery, list]], failures: dict[str, _Failure], flow: str,
                 result: BatchResult) -> None:
        rejected = []
        for delivery, prepared in items:
            failure = next((failures[m["messageId"]] for m in delivery.messages if m["messageId"] in failures), None)
            if failure is None:
                result.delivered.append(delivery)
            elif failure.reason is None and failure.status in _BISECT_STATUSES and len(items) > 1:
                rejected.append((delivery, prepared))
            else:
                result.failed.append((delivery, _dead_letter(delivery, _reason(failure), failure.error, flow,
                                                             status=failure.status)))
        if rejected:
            # Segment refuses a whole request for one bad message and does not say which: halve
            # until the bad ones stand alone, so their neighbours are still delivered.
            middle = len(rejected) // 2
            self._send_and_isolate(rejected[:middle], flow, result)
            self._send_and_isolate(rejected[middle:], flow, result)

    def _enqueue_request(self, items: list[tuple[Delivery, list]]) -> "_Request":
        """Enqueue the calls of ``items`` as one request and start flushing them."""
        calls = [call for _, prepared in items for call in prepared]
        request = _Request(ids=[kwargs["message_id"] for _, kwargs in calls], calls=len(calls),
                           started=time.monotonic())
        with self._lock:
            if self._in_flight:
                raise RuntimeError("SegmentConnection: a batch is still in flight; finish it first")
            if self._slot is None:
                self._slot = self._new_slot()
            slot = request.slot = self._slot
            self._in_flight = True
        slot.forget(request.ids)
        # The consumer thread gathers until it holds upload_size calls: exactly this batch,
        # so it leaves as one request.
        slot.consumer.upload_size = len(calls)
        for kind, kwargs in calls:
            problem = _enqueue(slot.client, kind, kwargs)
            if problem is not None:
                request.failures[kwargs["message_id"]] = problem
                slot.consumer.upload_size -= 1
        if len(request.failures) < len(calls):  # else nothing was queued
            request.flushed = _start_flush(slot.client)
        return request

    def _settle(self, request: "_Request", result: BatchResult) -> dict[str, _Failure]:
        """Wait (up to the flush deadline) for ``request``; the failed messageIds."""
        failures, slot = request.failures, request.slot
        try:
            remaining = self.options.flush_deadline_s - (time.monotonic() - request.started)
            if request.flushed is not None and not request.flushed.wait(max(0.0, remaining)):
                # The consumer is still busy with this batch (long retries, a hung connection):
                # abandon that client, so the next batch cannot mix with what it still holds.
                log.warning("a batch to Segment did not settle within %.0f s; its events are failed and "
                            "a new client will be used", self.options.flush_deadline_s)
                slot.abandon()
                with self._lock:
                    if self._slot is slot:
                        self._slot = None
                for message_id in request.ids:
                    failures.setdefault(message_id, _Failure(
                        None, f"no answer from Segment within the flush deadline ({self.options.flush_deadline_s:g} s)"))
            else:
                for message_id, failure in slot.take(request.ids).items():
                    failures.setdefault(message_id, failure)
        finally:
            with self._lock:
                self._in_flight = False
        result.requests.append((request.calls, int((time.monotonic() - request.started) * 1000)))
        return failures


@dataclass
class _Request:
    """One request's calls, enqueued in a client and being flushed."""
    ids: list[str]
    calls: int
    started: float
    slot: _ClientSlot | None = None
    flushed: threading.Event | None = None   # set when the client's flush returned
    failures: dict[str, _Failure] = field(default_factory=dict)


@dataclass
class _Batch:
    """A batch between :meth:`SegmentConnection.start` and :meth:`SegmentConnection.finish`."""
    flow: str
    result: BatchResult = field(default_factory=BatchResult)
    chunks: list[list[tuple[Delivery, list]]] = field(default_factory=list)
    request: _Request | None = None           # the first chunk, on the wire


class _TooLarge(ValueError):
    pass


def _prepare(delivery: Delivery) -> list[tuple[str, dict]]:
    """The SDK calls for a delivery, every value JSON-typed and every check the SDK would make
    done up front, so an event's calls are either all enqueued or none."""
    prepared = []
    # BatchCalls measured the event already: when all its calls together fit under the
    # per-message limit, none of them can pass it, and the costly per-message sizing is skipped.
    check_each = delivery.measure() > MAX_MESSAGE_BYTES
    for wire in delivery.wire_messages():
        if check_each:
            size = wire_size(wire)
            if size > MAX_MESSAGE_BYTES:
                raise _TooLarge(f"a {wire.get('type')} message is about {size} bytes, over Segment's "
                                f"{MAX_MESSAGE_BYTES}-byte limit")
        prepared.append(_sdk_call(wire))
    return prepared


_ID_TYPES = (str, numbers.Number)


def _sdk_call(message: dict) -> tuple[str, dict]:
    """(method, keyword arguments) of the SDK call for one wire message; _InvalidCall for what
    the SDK's ``require`` checks would refuse."""
    kind = message.get("type")
    user_id, anonymous_id = message.get("userId"), message.get("anonymousId")
    if not ((user_id and isinstance(user_id, _ID_TYPES)) or (anonymous_id and isinstance(anonymous_id, _ID_TYPES))):
        raise _InvalidCall(f"a {kind} call needs a userId or anonymousId (string or number)")
    try:
        timestamp = _dt.datetime.fromisoformat(message["timestamp"])
    except (KeyError, TypeError, ValueError):
        raise _InvalidCall(f"a {kind} call needs an ISO 8601 timestamp, got {message.get('timestamp')!r}") from None
    for name in ("context", "integrations", "properties", "traits"):
        if message.get(name) is not None and not isinstance(message[name], dict):
            raise _InvalidCall(f"{name} of a {kind} call must be an object")
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise _InvalidCall(f"a {kind} call has no messageId")
    common = dict(user_id=user_id, anonymous_id=anonymous_id, context=dict(message.get("context") or {}),
                  timestamp=timestamp, integrations=message.get("integrations") or {}, message_id=message_id)
    if kind == "track":
        if not isinstance(message.get("event"), str):
            raise _InvalidCall("a track call needs an event name (string)")
        return kind, dict(event=message["event"], properties=message.get("properties") or {}, **common)
    if kind == "identify":
        return kind, dict(traits=message.get("traits") or {}, **common)
    if kind == "group":
        if not isinstance(message.get("groupId"), _ID_TYPES) or message.get("groupId") in ("", None):
            raise _InvalidCall("a group call needs a groupId (string or number)")
        return kind, dict(group_id=message["groupId"], traits=message.get("traits") or {}, **common)
    if kind in ("page", "screen"):
        for name in ("name", "category"):
            if message.get(name) and not isinstance(message[name], str):
                raise _InvalidCall(f"{name} of a {kind} call must be a string")
        return kind, dict(category=message.get("category"), name=message.get("name"),
                          properties=message.get("properties") or {}, **common)
    raise _InvalidCall(f"unknown call type {kind!r}")


def _enqueue(client, kind: str, kwargs: dict) -> _Failure | None:
    """One SDK call; a failure when the SDK raised or refused it (queue full)."""
    try:
        ok, _ = getattr(client, kind)(**kwargs)
    except RuntimeError as exc:  # the SDK's own 32 KB check (ours is stricter: a safety net)
        return _Failure(None, f"the SDK refused the message: {exc.args[0] if exc.args else exc}", dl.TOO_LARGE)
    except (AssertionError, TypeError, ValueError) as exc:
        return _Failure(None, f"the SDK refused the call: {exc}", dl.INVALID_CALL)
    if not ok:
        return _Failure(None, "the SDK queue refused the message (queue full)")
    return None


def _start_flush(client) -> threading.Event:
    """``Client.flush`` on a helper thread, so the caller can wait with a deadline (flush has
    none, and can block for the whole retry budget) or do other work meanwhile."""
    done = threading.Event()

    def run():
        try:
            client.flush()
        finally:
            done.set()

    threading.Thread(target=run, name="segment-flush", daemon=True).start()
    return done


def _within_limits(items: list[tuple[Delivery, list]]) -> Iterator[list[tuple[Delivery, list]]]:
    """A batch cut to the request limits (BatchCalls already did; this holds for any input)."""
    chunk, calls, size = [], 0, 0
    for delivery, prepared in items:
        n, s = len(prepared), delivery.measure()
        if chunk and exceeds_request_limits(calls, size, n, s):
            yield chunk
            chunk, calls, size = [], 0, 0
        chunk.append((delivery, prepared))
        calls, size = calls + n, size + s
    if chunk:
        yield chunk


def _reason(failure: _Failure) -> str:
    if failure.reason is not None:
        return failure.reason
    status = failure.status
    if status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return dl.REJECTED
    return dl.DELIVERY_FAILED


def _dead_letter(delivery: Delivery, reason: str, error: str, flow: str, status: int | None = None) -> DeadLetter:
    return DeadLetter(payload=payload_text(delivery.event), stage=dl.SEND, reason=reason, error=error,
                      flow=flow, event_id=delivery.event.get("id"), http_status=status)


# -- progress -----------------------------------------------------------------------------------
class _Progress:
    """Totals of one connection (so of one worker process and configuration), logged at most
    every ``interval_s``: a long batch run shows it is moving, without a line per event."""

    def __init__(self):
        self._lock = threading.Lock()
        self.delivered = self.dead = self.disabled = self.requests = 0
        self._started = self._last = None

    def add(self, result: BatchResult, interval_s: float) -> None:
        line = None
        with self._lock:
            now = time.monotonic()
            if self._started is None:
                self._started = self._last = now
            self.delivered += len(result.delivered)
            self.dead += len(result.failed)
            self.disabled += len(result.disabled)
            self.requests += len(result.requests)
            if interval_s > 0 and now - self._last >= interval_s:
                self._last = now
                rate = self.delivered / max(now - self._started, 1e-9)
                line = (f"delivery to Segment so far: {self.delivered} events delivered, {self.dead} "
                        f"dead-lettered" + (f", {self.disabled} not sent (disable)" if self.disabled else "")
                        + f"; {self.requests} requests, {rate:.0f} events/s")
        if line:
            progress_log.info(line)


# -- connections, pooled per process and configuration -------------------------------------------
# The streaming DirectRunner builds a new DoFn (setup + teardown) for every bundle, and each SDK
# Client costs a thread and an HTTP session. A released connection waits idle for CLOSE_GRACE_S
# and is handed to the next setup() of the same configuration; concurrent DoFn instances (the
# threads of a Dataflow worker) each get their own, so sends are not serialised across them.
CLOSE_GRACE_S = 30.0
_IDLE: dict[str, list["_Idle"]] = {}
_POOL_LOCK = threading.Lock()


@dataclass(eq=False)
class _Idle:
    connection: SegmentConnection
    closing: threading.Timer | None = None


def acquire_connection(settings: SegmentSettings, options: SendOptions) -> tuple[str, SegmentConnection]:
    key = _fingerprint(settings, options)
    with _POOL_LOCK:
        idle = _IDLE.get(key)
        if idle:
            entry = idle.pop()
            if entry.closing is not None:
                entry.closing.cancel()
            return key, entry.connection
    return key, SegmentConnection(settings, options)


def release_connection(key: str, connection: SegmentConnection, grace_s: float = CLOSE_GRACE_S) -> None:
    if grace_s <= 0:
        connection.close()
        return
    entry = _Idle(connection)
    with _POOL_LOCK:
        _IDLE.setdefault(key, []).append(entry)
        entry.closing = threading.Timer(grace_s, _close_if_idle, args=(key, entry))
        entry.closing.daemon = True
        entry.closing.start()


def _close_if_idle(key: str, entry: _Idle) -> None:
    with _POOL_LOCK:
        idle = _IDLE.get(key, [])
        if not any(e is entry for e in idle):
            return  # taken again meanwhile
        idle.remove(entry)
        if not idle:
            _IDLE.pop(key, None)
    entry.connection.close()


def _fingerprint(settings: SegmentSettings, options: SendOptions) -> str:
    # Hashed, so the write key is never a readable dict key in a heap dump or a log.
    text = repr((settings.write_key.fingerprint(), settings.host, settings.path, settings.max_retries,
                 settings.http_request_timeout_ms, settings.disable, options.flush_deadline_s))
    return hashlib.sha256(text.encode()).hexdigest()


# -- sending while the next batch is prepared ---------------------------------------------------
@dataclass
class _Sent:
    """One batch handed to the sender: its deliveries, and the timestamp and window its outputs
    carry (None: the global window, as in a batch run)."""
    deliveries: list[Delivery]
    stamp: tuple[Any, Any] | None
    batch: "_Batch"


class PipelinedSender:
    """Sends batches through one :class:`SegmentConnection` so that the caller prepares (maps,
    batches) the next batch while the previous one is on the wire.

    ``submit`` checks and enqueues a batch and returns at once; the SDK's consumer thread sends
    it meanwhile. The next ``submit`` first waits for that batch's answer and returns it settled,
    so one batch is on the wire at a time and one more is being filled; ``drain`` waits for the
    last one, so a caller that drains before its bundle commits loses nothing. No thread of its
    own: the enqueueing stays on the caller's thread (a second Python thread doing it would only
    fight the caller for the GIL); what overlaps is the SDK's sending and Segment's answer.
    """

    def __init__(self, connection: SegmentConnection, flow: str):
        self.connection = connection
        self.flow = flow
        self._on_wire: _Sent | None = None

    def submit(self, deliveries: list[Delivery], stamp: tuple[Any, Any] | None = None
               ) -> list[tuple[_Sent, BatchResult]]:
        settled = self.drain()
        self._on_wire = _Sent(deliveries, stamp, self.connection.start(deliveries, self.flow))
        return settled

    def drain(self) -> list[tuple[_Sent, BatchResult]]:
        sent, self._on_wire = self._on_wire, None
        if sent is None:
            return []
        return [(sent, self.connection.finish(sent.batch))]

    def close(self) -> None:
        """After a failed bundle a batch may still be on the wire: wait for it (bounded by the
        flush deadline) so the pooled connection is free; its events' bundle is retried."""
        try:
            self.drain()
        except Exception:  # best-effort: the bundle already failed
            log.exception("settling the last batch after a failed bundle failed")


# -- Beam ---------------------------------------------------------------------------------------
class _SegmentSink(beam.DoFn):
    """What both sinks share: a pooled connection, a :class:`PipelinedSender`, and the outputs
    and counters of a settled batch. Everything of a bundle is settled (accepted by Segment or
    dead-lettered) in ``finish_bundle`` at the latest, so before the bundle commits.

    Delivered events leave on the main output, dead letters on ``dead_letter``. With
    ``fail_bundle_on_error``, events that failed for a transient reason (5xx, 429, timeouts, after
    the SDK's retries) fail the bundle instead, so the runner retries it; refusals that a retry
    cannot fix (``too_large``, ``rejected``, ``invalid_call``) are dead-lettered either way.
    Counters are incremented here, on the bundle's thread: Beam's metrics belong to the thread
    that runs the bundle (the SDK's consumer thread reports failures, never counts).
    """

    def __init__(self, settings: SegmentSettings, flow: str, options: SendOptions | None = None):
        self.settings = settings
        self.flow = flow
        self.options = options or SendOptions()
        self.batch_messages = Metrics.distribution(NAMESPACE, "messages_per_batch")
        self.request_latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self.connection: SegmentConnection | None = None
        self.sender: PipelinedSender | None = None
        self._connection_key: str | None = None

    def setup(self):
        self._connection_key, self.connection = acquire_connection(self.settings, self.options)
        self.sender = PipelinedSender(self.connection, self.flow)

    def _outputs(self, settled: list[tuple[_Sent, BatchResult]], finishing: bool = False) -> Iterator:
        for sent, result in settled:
            yield from self._outputs_of(sent, result, finishing)

    def _outputs_of(self, sent: _Sent, result: BatchResult, finishing: bool) -> Iterator:
        self.connection.progress.add(result, self.options.progress_interval_s)
        counter("requests_to_segment").inc(len(result.requests))
        for messages, millis in result.requests:
            self.batch_messages.update(messages)
            self.request_latency.update(millis)
        if self.options.fail_bundle_on_error:
            transient = [dead for _, dead in result.failed if dead.reason == dl.DELIVERY_FAILED]
            if transient:
                raise RuntimeError(f"{len(transient)} event(s) could not be delivered to Segment; failing the "
                                   f"bundle so the runner retries it (first: {transient[0].error})")
        calls_by_type: dict[str, int] = {}
        delivered_calls = 0
        for delivery in result.delivered:
            delivered_calls += len(delivery.messages)
            for message in delivery.messages:
                calls_by_type[message["type"]] = calls_by_type.get(message["type"], 0) + 1
            yield _stamped(delivery, sent.stamp, finishing)
        counter("events_delivered").inc(len(result.delivered))
        counter("events_delivered_calls").inc(delivered_calls)
        for kind, n in calls_by_type.items():
            counter(f"calls_sent_{kind}").inc(n)
        if result.disabled:
            counter("events_disabled").inc(len(result.disabled))
            counter("calls_disabled").inc(sum(len(d.messages) for d in result.disabled))
        for delivery, dead in result.failed:
            counter("events_dead_lettered_at_send").inc()
            counter(f"dead_letter_{dead.reason}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, _stamped(dead, sent.stamp, finishing))

    def finish_bundle(self):
        yield from self._outputs(self.sender.drain(), finishing=True)

    def teardown(self):
        # Everything was already settled before each bundle ended; this only hands the client
        # back (and, after the grace period, shuts it down).
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if self._connection_key is not None and self.connection is not None:
            release_connection(self._connection_key, self.connection)
            self._connection_key, self.connection = None, None


def _stamped(value, stamp: tuple[Any, Any] | None, finishing: bool):
    """``value`` as an output of the input it came from: outputs of an earlier element, and all
    of ``finish_bundle``'s, need their timestamp and window said explicitly; in the global window
    (a batch run) only ``finish_bundle``'s do."""
    if stamp is not None:
        return WindowedValue(value, stamp[0], (stamp[1],))
    return GlobalWindows.windowed_value(value) if finishing else value


class SendToSegment(_SegmentSink):
    """Sink for batches made upstream (:class:`BatchCalls`, streaming): each input is a list of
    :class:`Delivery`, one request's worth."""

    def process(self, batch: Iterable[Delivery], timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        deliveries = list(batch)
        if deliveries:
            yield from self._outputs(self.sender.submit(deliveries, (timestamp, window)))


class BatchAndSend(_SegmentSink):
    """Sink for a batch run: each input is one :class:`Delivery`; batches are cut within the
    bundle by the rules of :func:`split_batches` (``flushAt`` calls, under the request limits,
    an event's calls never split) and the last, partial one is sent in ``finish_bundle``.

    A batch run's bundles are large, so batches fill up without Beam state: no shuffle, and the
    next batch is mapped while the previous one is on the wire. (Streaming bundles are small:
    there :class:`BatchCalls` gathers across bundles in state.)

    For the global window only, as in a batch run: ``process`` takes no timestamp or window
    (asking for them costs ~10 µs an element in Beam's Python SDK), so its outputs carry the
    global window.
    """

    def __init__(self, settings: SegmentSettings, flow: str, options: SendOptions | None = None):
        super().__init__(settings, flow, options)
        self.flush_at = settings.flush_at

    def start_bundle(self):
        self.batcher = Batcher(self.flush_at)

    def process(self, delivery: Delivery):
        for batch in self.batcher.add(delivery):
            yield from self._submit(batch)

    def _submit(self, batch: list[Delivery], finishing: bool = False) -> Iterator:
        counter("batches_flushed_in_bundle").inc()
        yield from self._outputs(self.sender.submit(batch), finishing)

    def finish_bundle(self):
        rest = self.batcher.take()
        if rest:
            yield from self._submit(rest, finishing=True)
        yield from super().finish_bundle()


class _BatchInState(beam.DoFn):
    """Per shard: deliveries buffered in a bag until a flush rule says the batch is complete.

    Timers, chosen so every runner flushes everything:

    * ``flush_interval`` (processing time, streaming only) fires ``flushInterval`` ms after a
      batch's first event. The clock is injectable, because under TestStream processing time
      starts at 0. Not set in batch: there the FnApiRunner fails the run on a processing-time
      timer that is not due yet when its work runs out ("time-pending bundles did not
      execute"), and the bundle-based DirectRunner drops them (losing the batch).
    * ``end_of_window`` (event time, the window's end) fires when the watermark passes the end
      of the (global) window: at the end of a batch run on every runner, after a TestStream's
      last watermark, and when a Dataflow streaming job is drained.
    """

    BUFFER = BagStateSpec("buffer", PickleCoder())
    PENDING = ReadModifyWriteStateSpec("pending", PickleCoder())  # (calls, bytes, first timestamp)
    FLUSH = TimerSpec("flush_interval", TimeDomain.REAL_TIME)
    END = TimerSpec("end_of_window", TimeDomain.WATERMARK)

    def __init__(self, flush_at: int, flush_interval_ms: int, streaming: bool,
                 clock: Callable[[], float] | None = None):
        self.flush_at = max(1, min(int(flush_at), MAX_BATCH_MESSAGES))
        self.flush_interval_s = max(0, int(flush_interval_ms)) / 1000.0
        self.streaming = streaming
        self.clock = clock

    def process(self, keyed, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam,
                buffer=beam.DoFn.StateParam(BUFFER), pending=beam.DoFn.StateParam(PENDING),
                flush=beam.DoFn.TimerParam(FLUSH), end=beam.DoFn.TimerParam(END)):
        _, delivery = keyed
        calls, size = len(delivery.messages), delivery.measure()
        state = pending.read()
        if state is not None and exceeds_request_limits(state[0], state[1], calls, size):
            yield self._take(buffer, pending, state)
            state = None
        if state is None:
            state = (0, 0, timestamp)
            if self.streaming:
                flush.set(Timestamp.of((self.clock or time.time)() + self.flush_interval_s))
            end.set(window.max_timestamp())
        buffer.add(delivery)
        state = (state[0] + calls, state[1] + size, min(state[2], timestamp))
        if state[0] >= self.flush_at:
            yield self._take(buffer, pending, state)
            # Nothing waits under this key any more: no timer is left behind for it (with
            # worker shards, the keys of stopped workers are never seen again).
            if self.streaming:
                flush.clear()
            end.clear()
        else:
            pending.write(state)

    @on_timer(FLUSH)
    def on_flush_interval(self, buffer=beam.DoFn.StateParam(BUFFER), pending=beam.DoFn.StateParam(PENDING)):
        yield from self._flush_on_timer(buffer, pending, "flush_interval")

    @on_timer(END)
    def on_end_of_window(self, buffer=beam.DoFn.StateParam(BUFFER), pending=beam.DoFn.StateParam(PENDING)):
        yield from self._flush_on_timer(buffer, pending, "end_of_window")

    def _flush_on_timer(self, buffer, pending, why: str):
        state = pending.read()
        if state is None:
            return  # flushed by size since the timer was set
        counter(f"batches_flushed_by_{why}").inc()
        # A timer's output carries the timer's time (processing time for flush_interval, which
        # can be anything): give the batch its first event's time instead, which the timer's
        # watermark hold protects, so windowed writes downstream do not see it as late.
        yield TimestampedValue(self._take(buffer, pending, state), state[2])

    @staticmethod
    def _take(buffer, pending, state) -> list[Delivery]:
        batch = list(buffer.read())
        buffer.clear()
        pending.clear()
        return batch


class BatchCalls(beam.PTransform):
    """Deliveries → batches for one request each (``flushAt`` calls or ``flushInterval`` ms,
    under 2,500 messages and :data:`MAX_BATCH_BYTES`), batched in Beam state over
    ``options.shards`` keys. ``settings`` may be a bare ``flush_at`` (interval: the default).
    ``streaming``: flush after ``flushInterval`` (in batch, batches fill up, the rest at the end)."""

    def __init__(self, settings: SegmentSettings | int, options: SendOptions | None = None, *,
                 streaming: bool = False):
        super().__init__()
        self.streaming = streaming
        if isinstance(settings, int):
            self.flush_at, self.flush_interval_ms = settings, INT_SETTINGS["flushInterval"]
        else:
            self.flush_at, self.flush_interval_ms = settings.flush_at, settings.flush_interval_ms
        self.options = options or SendOptions()

    def expand(self, deliveries):
        shards = int(self.options.shards)
        # Changing the number of shards (or the workers, with worker shards) on an update loses
        # nothing: a key no longer used still holds its batch and timers, which send it.
        shard_of = worker_shard if shards <= AUTO_SHARDS else (lambda d: d.shard_key(shards))
        return (deliveries
                | "ShardKey" >> beam.Map(lambda d: (shard_of(d), d)).with_output_types(
                    typing.Tuple[str, Delivery])
                | "Gather" >> beam.ParDo(_BatchInState(self.flush_at, self.flush_interval_ms, self.streaming,
                                                       self.options.clock)))
