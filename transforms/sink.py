"""Delivery to Segment: batches in, fates out.

How events become batches depends on the run (``pipeline.graph`` wires one or the other):

* batch runs: :class:`BatchAndSend` cuts batches within each bundle (a batch run's bundles are
  large) and sends the last, partial one in ``finish_bundle``: no shuffle, no state;
* streaming: :class:`BatchCalls` gathers calls across bundles **in Beam state** (keyed over a
  shards that follow the job's parallelism), so nothing waits only in memory, flushed after ``flushInterval`` ms
  and at the end of the window (a drain); :class:`SendToSegment` sends each batch.

Either way a batch is cut at ``flushAt`` calls and before it would pass 2,500 messages or
:data:`MAX_BATCH_BYTES`; the calls of one event (a :class:`Delivery`) are never split and keep
their order. Both sinks send through a :class:`PipelinedSender` (the next batch is prepared while
the previous one is on the wire) over a :class:`SegmentConnection`: each batch is one request
through segment-analytics-python's request layer (``transforms.segment_http``: the SDK's body,
headers, auth and retry policy, on one pooled HTTP session), and every event gets a known fate:
accepted, or failed with the reason; all of a bundle's batches are settled before the bundle
commits.

What the sink still guards against:

* values the SDK's JSON cannot hold (sets, Decimals, NaN, objects a ``$code:`` function returns):
  :func:`to_wire` turns them into JSON types;
* a message over 32 KB: measured when the batch is cut, dead letter ``too_large``, never sent;
* a call the SDK would refuse (no ids, no event name, ...): ``invalid_call``, before anything of
  its event is sent;
* one bad message fails its whole request (400): the batch is halved until the bad event
  stands alone, so its neighbours are delivered;
* a request that never ends: every batch settles within the flush deadline;
* an endpoint that refuses everything (401, 403, 404, a redirect): no event is blamed
  (:class:`~transforms.segment_http.EndpointConfigError`).
"""
from __future__ import annotations

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

from transforms import dead_letter as dl
from transforms.dead_letter import DeadLetter, payload_text
from transforms.metrics import NAMESPACE, counter
from transforms.segment_http import (RETRYABLE_4XX, Answer, EndpointConfigError, SegmentHttp, call_problem,
                                     sdk_message)
from transforms.settings import INT_SETTINGS, SDK_PATH, SegmentSettings

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
# BatchCalls' keys. 0 (the default): as many as there are threads delivering, on every worker
# (see worker_shard), so the job's parallelism, not a number fixed at launch, bounds how many
# batches fill and go out at once. N > 0: N keys by user, one user's calls in one shard, in order.
AUTO_SHARDS = 0
DEFAULT_SHARDS = AUTO_SHARDS
_BISECT_STATUSES = (400, 413)  # the request was refused for its content: some message in it


# -- values ------------------------------------------------------------------------------------
def to_wire(value: Any) -> Any:
    """``value`` as plain JSON types, the same document whoever writes it.

    Mapping output is JSON-typed already, but a ``$code:`` function can return anything: sets,
    Decimals, datetimes, bytes, NaN (not JSON), keys that are not strings, objects. (The SDK
    Client's ``clean()`` silently dropped what it could not handle.) The sink only takes this
    path for a message orjson refuses to write as it is (:func:`encode_message`).
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

    Measured on orjson's output, several times faster (see :func:`json_text_size`). What orjson
    refuses (a lone surrogate) is measured by json.dumps itself.
    """
    try:
        data = orjson.dumps(value)
    except TypeError:
        return len(json.dumps(value))
    return json_text_size(data)


def json_text_size(data: bytes) -> int:
    """``len(json.dumps(v))`` for the value ``v`` that orjson wrote as ``data``, or a little more.

    json.dumps adds a space after each separator (counted as every ',' and ':', those inside
    strings too), escapes each non-ASCII character as ``\\uXXXX`` (at most 4 bytes more than its
    UTF-8 for each byte it has beyond the first) and DEL as ``\\u007f``; orjson writes floats as
    Python does, longer (0.00001 for 1e-05), or one byte shorter (1e-9 for 1e-09: counted as
    every "e-").
    """
    size = (len(data) + data.count(b",") + data.count(b":") + 5 * data.count(b"\x7f")
            + data.count(b"e-"))  # orjson writes 1e-9 where Python writes 1e-09
    if not data.isascii():
        size += 4 * (len(data) - len(data.decode()))
    return size


def wire_size(message: dict) -> int:
    """The bytes the SDK counts for ``message`` as it goes on the wire (its ``json.dumps`` of the
    Client's form: ``context.library``, each field the call lacks as null or ``{}``), never fewer."""
    return encode_message(message)[1]


def encode_message(message: dict) -> tuple[bytes, int, str | None]:
    """One message as it goes on the wire: (its JSON in the SDK Client's form, its size as the
    SDK measures it, why the SDK would refuse the call or None).

    A message of plain JSON types (the usual case: an event read from JSON, a flow without
    functions) is written by orjson as it is, with no converted copy; anything orjson refuses
    to write as it is goes through :func:`to_wire` first.
    """
    form = sdk_message(message)
    try:
        data = orjson.dumps(form, option=JSON_NATIVE)
    except TypeError:
        form = sdk_message(to_wire(message))
        try:
            data = orjson.dumps(form)
        except TypeError:  # a lone surrogate: json.dumps escapes it (and Segment may refuse it)
            text = json.dumps(form)
            return text.encode(), len(text), call_problem(form)
    return data, json_text_size(data), call_problem(form)


# -- what travels between the steps ------------------------------------------------------------
@dataclass(slots=True)
class Delivery:
    """The calls of one event, which travel and succeed or fail together."""
    event: dict                      # normalised event: the dead-letter payload
    messages: list[dict]
    size: int = 0                    # the messages' size on the wire (0 = not measured yet)
    # The messages' wire form, their sizes and the first call the SDK would refuse, worked out
    # once when the batch is cut and kept for sending (not pickled: it would double what a
    # Delivery costs in Beam state).
    wire: list[bytes] | None = field(default=None, compare=False, repr=False)
    sizes: list[int] | None = field(default=None, compare=False, repr=False)
    problem: str | None = field(default=None, compare=False, repr=False)

    def measure(self) -> int:
        if not self.size:
            self.encoded()
        return self.size

    def encoded(self) -> tuple[list[bytes], list[int], str | None]:
        if self.wire is None:
            wire, sizes, problem = [], [], None
            for message in self.messages:
                data, size, refused = encode_message(message)
                wire.append(data)
                sizes.append(size)
                problem = problem or refused
            self.wire, self.sizes, self.problem, self.size = wire, sizes, problem, sum(sizes)
        return self.wire, self.sizes, self.problem

    def __getstate__(self):
        return self.event, self.messages, self.size

    def __setstate__(self, state):
        self.event, self.messages, self.size = state
        self.wire = self.sizes = self.problem = None

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
    # streaming: how long a batch the endpoint refuses as a whole (401/403/404, a redirect) is
    # held and the endpoint probed again before the bundle fails (and the runner retries it);
    # None: DEFAULT_ENDPOINT_ERROR_HOLD_S
    endpoint_error_hold_s: float | None = None
    clock: Callable[[], float] | None = None  # BatchCalls' processing-time clock (tests: TestStream)


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


# -- sending a batch -----------------------------------------------------------------------------
# How long a batch run keeps refusing to send after an endpoint-wide error (401/403/404, a
# redirect) before it tries the endpoint again: the run is failing anyway, its other bundles must
# not each send a request to learn the same thing.
ENDPOINT_ERROR_MEMORY_S = 60.0
# Streaming: how often the cause of a held batch is logged, and the longest wait between probes.
ENDPOINT_ERROR_LOG_EVERY_S = 60.0
ENDPOINT_PROBE_MAX_S = 30.0
DEFAULT_ENDPOINT_ERROR_HOLD_S = 600.0
_ENDPOINT_LOGGED = -ENDPOINT_ERROR_LOG_EVERY_S


class SegmentConnection:
    """One pooled HTTP session (:class:`~transforms.segment_http.SegmentHttp`), used for one batch
    at a time, reporting the fate of each event: delivered, failed with a dead letter, or
    disabled. The batch's request runs on a helper thread (the socket waits without the GIL), so
    the caller prepares the next batch meanwhile; :meth:`finish` waits for it with a deadline."""

    def __init__(self, settings: SegmentSettings, options: SendOptions):
        self.settings = settings
        self.options = options
        self._lock = threading.Lock()
        self._in_flight = False
        self._http: SegmentHttp | None = None
        self.clients_built = 0
        self.progress = _Progress()
        self._endpoint_error: tuple[float, EndpointConfigError] | None = None
        if not settings.disable:
            self._url = settings.sdk_host() + SDK_PATH  # a path that cannot be reached fails now
            self._http = self._new_http()

    def _new_http(self) -> SegmentHttp:
        self.clients_built += 1
        return SegmentHttp(self.settings.write_key.reveal(), self._url,
                           timeout_s=self.settings.http_request_timeout_ms / 1000.0,
                           max_retries=self.settings.max_retries, gzip=self.settings.gzip)

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    # -- sending ------------------------------------------------------------------------------
    def send(self, deliveries: list[Delivery], flow: str) -> BatchResult:
        """Send one batch and settle every event of it: delivered, failed (with a dead letter),
        or disabled. A 400 for a request is narrowed down to the event(s) Segment refuses."""
        return self.finish(self.start(deliveries, flow))

    def start(self, deliveries: list[Delivery], flow: str) -> "_Batch":
        """Check one batch and put it on the wire, returning at once: :meth:`finish` waits for
        Segment's answer. One batch at a time: finish it before starting the next."""
        batch = _Batch(flow)
        if self.settings.disable:
            batch.result.disabled.extend(deliveries)  # build every call, send nothing
            return batch
        self._refuse_while_endpoint_is_wrong()
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
            batch.request = self._launch(batch.chunks[0])
        return batch

    def finish(self, batch: "_Batch", hold_s: float = 0.0) -> BatchResult:
        """Wait for the batch :meth:`start` put on the wire, and settle each of its events.

        An endpoint-wide refusal (:class:`EndpointConfigError`) raises at once, or with
        ``hold_s`` (streaming) is probed again, with a growing pause, until the endpoint accepts
        the batch or ``hold_s`` has passed: the batch stays with its bundle, never dead-lettered."""
        try:
            if batch.request is not None:
                request, batch.request = batch.request, None
                self._send_and_isolate(batch.chunks[0], batch.flow, batch.result, hold_s, request)
            for chunk in batch.chunks[1:]:  # only when a batch passed the request limits: one by one
                self._send_and_isolate(chunk, batch.flow, batch.result, hold_s)
        finally:
            batch.chunks = []
        return batch.result

    def _send_and_isolate(self, items: list[tuple[Delivery, list]], flow: str, result: BatchResult,
                          hold_s: float = 0.0, request: "_Request | None" = None) -> None:
        """Send ``items`` (or wait for ``request``, already on the wire with them) and settle them."""
        if items:
            answer = self._settle(request or self._launch(items), result)
            if isinstance(answer, EndpointConfigError):
                answer = self._hold(items, answer, hold_s, result)
            self._isolate(items, answer, flow, result, hold_s)

    def _isolate(self, items: list[tuple[Delivery, list]], answer: Answer, flow: str, result: BatchResult,
                 hold_s: float = 0.0) -> None:
        if answer.ok:
            result.delivered.extend(delivery for delivery, _ in items)
            return
        if answer.status in _BISECT_STATUSES and len(items) > 1:
            # Segment refuses a whole request for one bad message and does not say which: halve
            # until the bad ones stand alone, so their neighbours are still delivered.
            middle = len(items) // 2
            self._send_and_isolate(items[:middle], flow, result, hold_s)
            self._send_and_isolate(items[middle:], flow, result, hold_s)
            return
        reason = _reason(answer.status)
        for delivery, _ in items:
            result.failed.append((delivery, _dead_letter(delivery, reason, answer.error, flow, status=answer.status)))

    def _launch(self, items: list[tuple[Delivery, list]]) -> "_Request":
        """Put the messages of ``items`` on the wire as one request, on a helper thread."""
        calls = sum(len(wire) for _, wire in items)
        batch_json = b"[" + b",".join(data for _, wire in items for data in wire) + b"]"
        with self._lock:
            if self._in_flight:
                raise RuntimeError("SegmentConnection: a batch is still in flight; finish it first")
            if self._http is None:
                self._http = self._new_http()
            http = self._http
            self._in_flight = True
        request = _Request(calls=calls, started=time.monotonic(), http=http, batch_json=batch_json)
        deadline = request.started + self.options.flush_deadline_s
        thread = threading.Thread(target=_post_on_thread, args=(request, deadline), name="segment-post", daemon=True)
        thread.start()
        return request

    def _settle(self, request: "_Request", result: BatchResult) -> "Answer | EndpointConfigError":
        """Wait (up to the flush deadline, and a moment for the last attempt to return) for
        ``request``: Segment's answer after the retries, or the endpoint-wide error."""
        try:
            remaining = self.options.flush_deadline_s - (time.monotonic() - request.started) + 1.0
            if not request.done.wait(max(0.0, remaining)):
                # Still not back (a connection hanging past every timeout): give up on this
                # session, so the next batch cannot queue behind it; Segment's messageId dedup
                # absorbs a late arrival.
                log.warning("a batch to Segment did not settle within %.0f s; its events are failed and "
                            "a new HTTP session will be used", self.options.flush_deadline_s)
                request.cancelled.set()
                with self._lock:
                    if self._http is request.http:
                        self._http = None
                answer = Answer(False, None, "no answer from Segment within the flush deadline "
                                             f"({self.options.flush_deadline_s:g} s)")
            elif request.error is not None:
                if isinstance(request.error, EndpointConfigError):
                    return request.error
                raise request.error
            else:
                answer = request.answer
                if answer.out_of_time:
                    # The next batch starts on fresh connections, not behind a stuck one.
                    self._retire(request.http)
        finally:
            with self._lock:
                self._in_flight = False
        result.requests.append((request.calls, int((time.monotonic() - request.started) * 1000)))
        return answer

    def _retire(self, http: SegmentHttp) -> None:
        with self._lock:
            if self._http is http:
                self._http = None
        http.close()

    # -- endpoint-wide errors --------------------------------------------------------------------
    def _hold(self, items, error: EndpointConfigError, hold_s: float, result: BatchResult) -> Answer:
        """Probe the endpoint again with ``items`` until it accepts them or ``hold_s`` is over;
        then the error stands (raised)."""
        counter("endpoint_config_errors").inc()
        if hold_s <= 0:
            self._endpoint_error = (time.monotonic(), error)
            raise error
        until = time.monotonic() + hold_s
        pause = 1.0
        while True:
            self._log_endpoint_error(error)
            if time.monotonic() + pause > until:
                raise error
            time.sleep(pause)
            pause = min(pause * 2, ENDPOINT_PROBE_MAX_S)
            answer = self._settle(self._launch(items), result)
            if not isinstance(answer, EndpointConfigError):
                log.warning("the Segment endpoint accepts requests again; sending resumes")
                return answer
            counter("endpoint_config_errors").inc()
            error = answer

    @staticmethod
    def _log_endpoint_error(error: EndpointConfigError) -> None:
        global _ENDPOINT_LOGGED
        now = time.monotonic()
        with _POOL_LOCK:
            due = now - _ENDPOINT_LOGGED >= ENDPOINT_ERROR_LOG_EVERY_S
            if due:
                _ENDPOINT_LOGGED = now
        if due:  # once a minute per worker process, however many threads hold batches
            log.error("%s The batch is held and the endpoint probed again; events are kept, "
                      "not dead-lettered.", error)

    def _refuse_while_endpoint_is_wrong(self) -> None:
        seen = self._endpoint_error
        if seen is not None:
            if time.monotonic() - seen[0] < ENDPOINT_ERROR_MEMORY_S:
                raise seen[1]
            self._endpoint_error = None


def _post_on_thread(request: "_Request", deadline: float) -> None:
    try:
        request.answer = request.http.post(request.batch_json, deadline, request.cancelled)
    except BaseException as exc:  # handed to the waiting caller, who raises it
        request.error = exc
    finally:
        request.done.set()


@dataclass(eq=False)
class _Request:
    """One request on the wire: its JSON, and what came back."""
    calls: int
    started: float
    http: SegmentHttp
    batch_json: bytes
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None
    error: BaseException | None = None


@dataclass
class _Batch:
    """A batch between :meth:`SegmentConnection.start` and :meth:`SegmentConnection.finish`."""
    flow: str
    result: BatchResult = field(default_factory=BatchResult)
    chunks: list[list[tuple[Delivery, list]]] = field(default_factory=list)
    request: _Request | None = None           # the first chunk, on the wire


class _TooLarge(ValueError):
    pass


def _prepare(delivery: Delivery) -> list[bytes]:
    """The wire form of a delivery's messages, every check the SDK would make done up front, so
    an event's calls are either all sent or none."""
    wire, sizes, problem = delivery.encoded()
    if problem is not None:
        raise _InvalidCall(problem)
    # When all its calls together fit under the per-message limit, none of them can pass it.
    if delivery.size > MAX_MESSAGE_BYTES:
        for data, size in zip(wire, sizes):
            if size > MAX_MESSAGE_BYTES:
                kind = orjson.loads(data).get("type")
                raise _TooLarge(f"a {kind} message is about {size} bytes, over Segment's "
                                f"{MAX_MESSAGE_BYTES}-byte limit")
    return wire


def _within_limits(items: list[tuple[Delivery, list]]) -> Iterator[list[tuple[Delivery, list]]]:
    """A batch cut to the request limits (the batcher already did; this holds for any input)."""
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


def _reason(status: int | None) -> str:
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX:
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
# The streaming DirectRunner builds a new DoFn (setup + teardown) for every bundle, and each
# connection holds an HTTP session with its open connections. A released connection waits idle for CLOSE_GRACE_S
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
                 settings.http_request_timeout_ms, settings.disable, settings.gzip, options.flush_deadline_s))
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

    ``submit`` checks a batch, puts it on the wire and returns at once; the connection's helper
    thread waits for Segment meanwhile (without the GIL). The next ``submit`` first waits for
    that batch's answer and returns it settled, so one batch is on the wire at a time and one
    more is being filled; ``drain`` waits for the last one, so a caller that drains before its
    bundle commits loses nothing. ``hold_s``: how long an endpoint-wide refusal is probed again
    before it fails the bundle (streaming; 0 raises at once).
    """

    def __init__(self, connection: SegmentConnection, flow: str, hold_s: float = 0.0):
        self.connection = connection
        self.flow = flow
        self.hold_s = hold_s
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
        return [(sent, self.connection.finish(sent.batch, self.hold_s))]

    def close(self) -> None:
        """After a failed bundle a batch may still be on the wire: wait for it (bounded by the
        flush deadline) so the pooled connection is free; its events' bundle is retried."""
        try:
            sent, self._on_wire = self._on_wire, None
            if sent is not None:
                self.connection.finish(sent.batch)
        except Exception:  # best-effort: the bundle already failed
            log.warning("settling the last batch after a failed bundle failed", exc_info=True)


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
    that runs the bundle (the request's helper thread reports its answer, never counts).

    An endpoint-wide refusal (401, 403, 404, a redirect) dead-letters nothing: a batch run fails
    at once with :class:`~transforms.segment_http.EndpointConfigError`; the streaming sink
    (:class:`SendToSegment`) holds the batch and probes the endpoint for
    ``options.endpoint_error_hold_s``, then fails the bundle so the runner retries it.
    """

    hold_endpoint_errors = False

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
        hold_s = 0.0
        if self.hold_endpoint_errors:
            hold_s = self.options.endpoint_error_hold_s
            hold_s = DEFAULT_ENDPOINT_ERROR_HOLD_S if hold_s is None else hold_s
        self.sender = PipelinedSender(self.connection, self.flow, hold_s)

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

    hold_endpoint_errors = True

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
