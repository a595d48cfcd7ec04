"""One connection to Segment: a batch in, the fate of each of its events out.

No Beam here. A :class:`SegmentConnection` holds one pooled HTTP session
(:class:`~segment_api.http.SegmentHttp`) and sends one batch at a time: every call checked
before anything of its event is sent (``invalid_call``, ``too_large``), one request through the
SDK's request layer on a helper thread (so the caller prepares the next batch meanwhile), a 400
narrowed down by halving until the refused event stands alone, every batch settled within the
flush deadline, and an endpoint that refuses everything (401, 403, 404, a redirect) never blamed
on an event (:class:`~segment_api.http.EndpointConfigError`). Connections are pooled per process
and configuration (:func:`acquire_connection`), since the streaming DirectRunner builds a new
DoFn for every bundle.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from decide import dead_letter as dl
from decide.dead_letter import DeadLetter, payload_text
from decide.settings import SDK_PATH, SegmentSettings
from decide.wire import MAX_MESSAGE_BYTES, Batcher, EventMessages
from segment_api.http import RETRYABLE_4XX, Answer, EndpointConfigError, SegmentHttp
from segment_api.progress import Progress

log = logging.getLogger(__name__)

# SendOptions.shards: 0, as many shards as threads deliver (see transforms.batching).
AUTO_SHARDS = 0
_BISECT_STATUSES = (400, 413)  # the request was refused for its content: some message in it


@dataclass
class SendOptions:
    """How delivery behaves beyond the flow's settings (pipeline options)."""

    flush_deadline_s: float = 120.0  # longest one batch may take to settle, retries included
    fail_bundle_on_error: bool = False  # transient failures fail the bundle instead of dead letters
    shards: int = AUTO_SHARDS  # keys of BatchDeliveries' state: its parallelism
    progress_interval_s: float = 30.0  # a progress line at most this often (0: never)
    # streaming: how long a batch the endpoint refuses as a whole (401/403/404, a redirect) is
    # held and the endpoint probed again before the bundle fails (and the runner retries it);
    # None: DEFAULT_ENDPOINT_ERROR_HOLD_S
    endpoint_error_hold_s: float | None = None
    clock: Callable[[], float] | None = None  # BatchDeliveries' processing-time clock (tests: TestStream)


@dataclass
class BatchResult:
    delivered: list[EventMessages] = field(default_factory=list)
    failed: list[tuple[EventMessages, DeadLetter]] = field(default_factory=list)
    disabled: list[EventMessages] = field(default_factory=list)
    requests: list[tuple[int, int]] = field(default_factory=list)  # (messages, milliseconds) per request


class _InvalidCall(ValueError):
    pass


# How long a batch run keeps refusing to send after an endpoint-wide error (401/403/404, a
# redirect) before it tries the endpoint again: the run is failing anyway, its other bundles must
# not each send a request to learn the same thing.
ENDPOINT_ERROR_MEMORY_S = 60.0
# Streaming: how often the cause of a held batch is logged, and the longest wait between probes.
ENDPOINT_ERROR_LOG_EVERY_S = 60.0
ENDPOINT_PROBE_MAX_S = 30.0
DEFAULT_ENDPOINT_ERROR_HOLD_S = 600.0
_ENDPOINT_LOGGED = -ENDPOINT_ERROR_LOG_EVERY_S


def _not_counted(_name: str) -> None:
    pass


class SegmentConnection:
    """One pooled HTTP session (:class:`~segment_api.http.SegmentHttp`), used for one batch
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
        self.progress = Progress()
        self._endpoint_error: tuple[float, EndpointConfigError] | None = None
        # What the connection counts (endpoint-wide refusals); the Beam sink makes these its
        # counters. Called on the thread that sends, never on the request's helper thread.
        self.count: Callable[[str], None] = _not_counted
        if not settings.disable:
            self._url = settings.sdk_host() + SDK_PATH  # a path that cannot be reached fails now
            self._http = self._new_http()

    def _new_http(self) -> SegmentHttp:
        self.clients_built += 1
        return SegmentHttp(
            self.settings.write_key.reveal(),
            self._url,
            timeout_s=self.settings.http_request_timeout_ms / 1000.0,
            max_retries=self.settings.max_retries,
            gzip=self.settings.gzip,
        )

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    # -- sending ------------------------------------------------------------------------------
    def send(self, deliveries: list[EventMessages], flow: str) -> BatchResult:
        """Send one batch and settle every event of it: delivered, failed (with a dead letter),
        or disabled. A 400 for a request is narrowed down to the event(s) Segment refuses."""
        return self.finish(self.start(deliveries, flow))

    def start(self, deliveries: list[EventMessages], flow: str) -> _Batch:
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
        batch.chunks = _within_limits(sendable)
        if batch.chunks:
            batch.request = self._launch(batch.chunks[0])
        return batch

    def finish(self, batch: _Batch, hold_s: float = 0.0) -> BatchResult:
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

    def _send_and_isolate(
        self,
        items: list[tuple[EventMessages, list]],
        flow: str,
        result: BatchResult,
        hold_s: float = 0.0,
        request: _Request | None = None,
    ) -> None:
        """Send ``items`` (or wait for ``request``, already on the wire with them) and settle them."""
        if items:
            answer = self._settle(request or self._launch(items), result)
            if isinstance(answer, EndpointConfigError):
                answer = self._hold(items, answer, hold_s, result)
            self._isolate(items, answer, flow, result, hold_s)

    def _isolate(
        self,
        items: list[tuple[EventMessages, list]],
        answer: Answer,
        flow: str,
        result: BatchResult,
        hold_s: float = 0.0,
    ) -> None:
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

    def _launch(self, items: list[tuple[EventMessages, list]]) -> _Request:
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

    def _settle(self, request: _Request, result: BatchResult) -> Answer | EndpointConfigError:
        """Wait (up to the flush deadline, and a moment for the last attempt to return) for
        ``request``: Segment's answer after the retries, or the endpoint-wide error."""
        try:
            remaining = self.options.flush_deadline_s - (time.monotonic() - request.started) + 1.0
            if not request.done.wait(max(0.0, remaining)):
                # Still not back (a connection hanging past every timeout): give up on this
                # session, so the next batch cannot queue behind it; Segment's messageId dedup
                # absorbs a late arrival.
                log.warning(
                    "a batch to Segment did not settle within %.0f s; its events are failed and "
                    "a new HTTP session will be used",
                    self.options.flush_deadline_s,
                )
                request.cancelled.set()
                with self._lock:
                    if self._http is request.http:
                        self._http = None
                answer = Answer(
                    False,
                    None,
                    f"no answer from Segment within the flush deadline ({self.options.flush_deadline_s:g} s)",
                )
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
        self.count("endpoint_config_errors")
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
            self.count("endpoint_config_errors")
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
            log.error("%s The batch is held and the endpoint probed again; events are kept, not dead-lettered.", error)

    def _refuse_while_endpoint_is_wrong(self) -> None:
        seen = self._endpoint_error
        if seen is not None:
            if time.monotonic() - seen[0] < ENDPOINT_ERROR_MEMORY_S:
                raise seen[1]
            self._endpoint_error = None


def _post_on_thread(request: _Request, deadline: float) -> None:
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
    chunks: list[list[tuple[EventMessages, list]]] = field(default_factory=list)
    request: _Request | None = None  # the first chunk, on the wire


class _TooLarge(ValueError):
    pass


def _prepare(delivery: EventMessages) -> list[bytes]:
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
                raise _TooLarge(
                    f"a {kind} message is about {size} bytes, over Segment's {MAX_MESSAGE_BYTES}-byte limit"
                )
    return wire


def _within_limits(items: list[tuple[EventMessages, list]]) -> list[list[tuple[EventMessages, list]]]:
    """A batch cut to the request limits (the batchers already did; this holds for any input)."""
    batcher: Batcher[tuple[EventMessages, list]] = Batcher()
    chunks = [chunk for item in items for chunk in batcher.add(item, len(item[1]), item[0].measure())]
    rest = batcher.take()
    return chunks + [rest] if rest else chunks


def _reason(status: int | None) -> str:
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX:
        return dl.REJECTED
    return dl.DELIVERY_FAILED


def _dead_letter(delivery: EventMessages, reason: str, error: str, flow: str, status: int | None = None) -> DeadLetter:
    return DeadLetter(
        payload=payload_text(delivery.event),
        stage=dl.SEND,
        reason=reason,
        error=error,
        flow=flow,
        event_id=delivery.event.get("id"),
        http_status=status,
    )


# -- connections, pooled per process and configuration -------------------------------------------
# The streaming DirectRunner builds a new DoFn (setup + teardown) for every bundle, and each
# connection holds an HTTP session with its open connections. A released connection waits idle for CLOSE_GRACE_S
# and is handed to the next setup() of the same configuration; concurrent DoFn instances (the
# threads of a Dataflow worker) each get their own, so sends are not serialised across them.
CLOSE_GRACE_S = 30.0
_IDLE: dict[str, list[_Idle]] = {}
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
    text = repr(
        (
            settings.write_key.fingerprint(),
            settings.host,
            settings.path,
            settings.max_retries,
            settings.http_request_timeout_ms,
            settings.disable,
            settings.gzip,
            options.flush_deadline_s,
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()
