"""Delivery to Segment through segment-analytics-python: batches in, fates out.

The SDK is asynchronous and loses things quietly (full queue, errors reported on its own
thread, a ``flush`` with no deadline). :class:`SegmentConnection` wraps one SDK ``Client`` so
that sending a batch is synchronous and every message gets a known fate: accepted, or failed
with the reason. The Beam DoFn :class:`SendToSegment` sends each batch it receives before
``process`` returns, so everything of a bundle is settled before the bundle commits.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

from transforms import dead_letter as dl
from transforms.dead_letter import DeadLetter, payload_text
from transforms.settings import SegmentSettings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024
# The SDK cuts a request at 475,000 bytes of messages; keeping each batch below this leaves
# the SDK no reason to split it (so one batch is one request) and Segment's 500 KB intact.
MAX_BATCH_BYTES = 450_000
MAX_BATCH_MESSAGES = 2_500
DEAD_LETTER_TAG = "dead_letter"
NAMESPACE = "walkeros_segment"


@dataclass(slots=True)
class Delivery:
    """The calls of one event, which travel and succeed or fail together."""
    event: dict                      # normalised event: the dead-letter payload
    messages: list[dict]
    size: int = 0                    # serialised bytes of the messages (0 = not measured yet)

    def measure(self) -> int:
        if not self.size:
            self.size = sum(len(orjson.dumps(m)) for m in self.messages)
        return self.size


@dataclass
class SendOptions:
    """How delivery behaves beyond the flow's settings (pipeline options)."""
    flush_deadline_s: float = 120.0
    fail_bundle_on_error: bool = False


@dataclass
class _Failure:
    status: int | None
    error: str


@dataclass
class BatchResult:
    delivered: list[Delivery] = field(default_factory=list)
    failed: list[tuple[Delivery, DeadLetter]] = field(default_factory=list)
    requests: int = 0


class SegmentConnection:
    """One SDK Client, used for one batch at a time, reporting the fate of each message."""

    def __init__(self, settings: SegmentSettings, options: SendOptions):
        from segment.analytics import Client  # not picklable: built where it is used

        self.settings = settings
        self.options = options
        self._lock = threading.Lock()
        self._failures: dict[str, _Failure] = {}
        self._failures_lock = threading.Lock()
        # Retries must end inside the flush deadline, or the bundle cannot settle in time.
        budget = max(1.0, options.flush_deadline_s * 0.8)
        self.client = Client(
            settings.write_key,
            host=settings.sdk_host(),
            send=not settings.disable,
            on_error=self._record_failure,
            max_queue_size=MAX_BATCH_MESSAGES * 4,
            upload_size=min(settings.flush_at, MAX_BATCH_MESSAGES),
            max_retries=settings.max_retries,
            timeout=settings.http_request_timeout_ms / 1000.0,
            thread=1,
            max_total_backoff_duration=budget,
            max_rate_limit_duration=budget,
        )

    def close(self) -> None:
        try:
            self.client.shutdown()
        except Exception:  # teardown is best-effort; nothing may be lost here, all was flushed
            log.exception("closing the Segment client failed")

    # -- sending ----------------------------------------------------------------------------
    def send(self, deliveries: list[Delivery], flow: str) -> BatchResult:
        """Send one batch; a 400 for it is narrowed down to the event(s) Segment refuses."""
        result = BatchResult()
        sendable = []
        for delivery in deliveries:
            if not delivery.messages:  # e.g. a silent rule whose identify did not change
                result.delivered.append(delivery)
                continue
            too_large = next((m for m in delivery.messages if len(orjson.dumps(m)) > MAX_MESSAGE_BYTES - 512), None)
            if too_large is not None:
                result.failed.append((delivery, _dead_letter(
                    delivery, dl.TOO_LARGE, f"a {too_large['type']} message is over Segment's 32 KB limit", flow)))
            else:
                sendable.append(delivery)
        self._send_and_isolate(sendable, flow, result)
        return result

    def _send_and_isolate(self, deliveries: list[Delivery], flow: str, result: BatchResult) -> None:
        if not deliveries:
            return
        failures = self._send_once(deliveries)
        result.requests += 1
        rejected: list[Delivery] = []
        for delivery in deliveries:
            failure = next((failures[m["messageId"]] for m in delivery.messages if m["messageId"] in failures), None)
            if failure is None:
                result.delivered.append(delivery)
            elif failure.status == 400 and len(deliveries) > 1:
                rejected.append(delivery)
            else:
                reason = dl.REJECTED if failure.status is not None and 400 <= failure.status < 500 \
                    and failure.status not in (408, 410, 429, 460) else dl.DELIVERY_FAILED
                result.failed.append((delivery, _dead_letter(delivery, reason, failure.error, flow,
                                                             status=failure.status)))
        if rejected:
            # Segment refuses a whole request for one bad message: halve until the bad ones
            # stand alone, so their neighbours are still delivered.
            middle = len(rejected) // 2
            self._send_and_isolate(rejected[:middle], flow, result)
            self._send_and_isolate(rejected[middle:], flow, result)

    def _send_once(self, deliveries: list[Delivery]) -> dict[str, _Failure]:
        messages = [m for d in deliveries for m in d.messages]
        ids = [m["messageId"] for m in messages]
        with self._lock:
            with self._failures_lock:
                for message_id in ids:
                    self._failures.pop(message_id, None)
            consumer = (self.client.consumers or [None])[0]
            if consumer is not None:
                # One batch = one request: the consumer thread gathers exactly this many.
                consumer.upload_size = len(messages)
            not_queued = {}
            for message in messages:
                ok = self._enqueue(message)
                if not ok:
                    not_queued[message["messageId"]] = _Failure(None, "the SDK queue refused the message")
            if not self._flush():
                return {i: _Failure(None, f"no answer from Segment within the flush deadline "
                                          f"({self.options.flush_deadline_s:.0f} s)") for i in ids}
            with self._failures_lock:
                failures = {i: self._failures.pop(i) for i in ids if i in self._failures}
        failures.update(not_queued)
        return failures

    def _enqueue(self, message: dict) -> bool:
        kind = message["type"]
        common = dict(
            user_id=message.get("userId"),
            anonymous_id=message.get("anonymousId"),
            # The SDK writes context.library into the dict it gets: give it its own copy.
            context=dict(message.get("context") or {}),
            timestamp=_dt.datetime.fromisoformat(message["timestamp"]),
            integrations=message.get("integrations"),
            message_id=message["messageId"],
        )
        client = self.client
        if kind == "track":
            ok, _ = client.track(event=message["event"], properties=message.get("properties"), **common)
        elif kind == "identify":
            ok, _ = client.identify(traits=message.get("traits"), **common)
        elif kind == "group":
            ok, _ = client.group(group_id=message["groupId"], traits=message.get("traits"), **common)
        elif kind == "page":
            ok, _ = client.page(category=message.get("category"), name=message.get("name"),
                                properties=message.get("properties"), **common)
        elif kind == "screen":
            ok, _ = client.screen(category=message.get("category"), name=message.get("name"),
                                  properties=message.get("properties"), **common)
        else:
            raise ValueError(f"unknown call type {kind!r}")
        return ok

    def _flush(self) -> bool:
        """``Client.flush`` with a deadline: it has none, and can block for the whole retry budget."""
        done = threading.Event()

        def run():
            try:
                self.client.flush()
            finally:
                done.set()

        threading.Thread(target=run, name="segment-flush", daemon=True).start()
        return done.wait(self.options.flush_deadline_s)

    def _record_failure(self, exc: BaseException, batch: list[dict]) -> None:
        # Runs on the SDK's consumer thread: must never raise, or that thread dies and
        # every later flush hangs.
        try:
            status = getattr(exc, "status", None)
            status = status if isinstance(status, int) else None
            text = _describe_error(exc)
            with self._failures_lock:
                for message in batch:
                    message_id = message.get("messageId") if isinstance(message, dict) else None
                    if message_id:
                        self._failures[message_id] = _Failure(status, text)
        except Exception:  # pragma: no cover - defensive
            pass


def _describe_error(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"HTTP {status}: {message}" if isinstance(status, int) else f"{type(exc).__name__}: {message}"


def _dead_letter(delivery: Delivery, reason: str, error: str, flow: str, status: int | None = None) -> DeadLetter:
    return DeadLetter(payload=payload_text(delivery.event), stage=dl.SEND, reason=reason, error=error,
                      flow=flow, event_id=delivery.event.get("id"), http_status=status)


# -- one connection per process and configuration ------------------------------------------
# The streaming DirectRunner builds a new DoFn (setup + teardown) for every bundle, and each
# SDK Client lives until the process exits (atexit keeps it). So connections are shared per
# configuration and counted: the last teardown closes the client after a grace period, which a
# new setup() in the meantime cancels. On Dataflow, which reuses DoFns, this is one client
# per DoFn instance's configuration, closed when the worker tears the DoFns down.
CLOSE_GRACE_S = 30.0
_CONNECTIONS: dict[str, "_Shared"] = {}
_CONNECTIONS_LOCK = threading.Lock()


@dataclass
class _Shared:
    connection: SegmentConnection
    users: int = 0
    closing: threading.Timer | None = None


def acquire_connection(settings: SegmentSettings, options: SendOptions) -> tuple[str, SegmentConnection]:
    key = _fingerprint(settings, options)
    with _CONNECTIONS_LOCK:
        shared = _CONNECTIONS.get(key)
        if shared is None:
            shared = _CONNECTIONS[key] = _Shared(SegmentConnection(settings, options))
        if shared.closing is not None:
            shared.closing.cancel()
            shared.closing = None
        shared.users += 1
        return key, shared.connection


def release_connection(key: str, grace_s: float = CLOSE_GRACE_S) -> None:
    with _CONNECTIONS_LOCK:
        shared = _CONNECTIONS.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        if grace_s <= 0:
            del _CONNECTIONS[key]
        else:
            timer = threading.Timer(grace_s, _close_if_unused, args=(key, shared))
            timer.daemon = True
            shared.closing = timer
            timer.start()
            return
    shared.connection.close()


def _close_if_unused(key: str, shared: _Shared) -> None:
    with _CONNECTIONS_LOCK:
        if shared.users > 0 or _CONNECTIONS.get(key) is not shared:
            return
        del _CONNECTIONS[key]
    shared.connection.close()


def _fingerprint(settings: SegmentSettings, options: SendOptions) -> str:
    # Hashed, so the write key is never a readable dict key in a heap dump or a log.
    text = repr((settings.write_key, settings.sdk_host(), settings.max_retries, settings.http_request_timeout_ms,
                 settings.disable, settings.flush_at, options.flush_deadline_s))
    return hashlib.sha256(text.encode()).hexdigest()


class SendToSegment(beam.DoFn):
    """Sink: each input is a batch (a list of :class:`Delivery`); it is sent before ``process``
    returns. Dead letters leave on the ``dead_letter`` output; delivered events on the main one.
    """

    def __init__(self, settings: SegmentSettings, flow: str, options: SendOptions | None = None):
        self.settings = settings
        self.flow = flow
        self.options = options or SendOptions()
        self.delivered_events = Metrics.counter(NAMESPACE, "events_delivered")
        self.failed_events = Metrics.counter(NAMESPACE, "events_dead_lettered_at_send")
        self.requests = Metrics.counter(NAMESPACE, "requests_to_segment")
        self.batch_messages = Metrics.distribution(NAMESPACE, "messages_per_batch")
        self.request_latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self.connection: SegmentConnection | None = None
        self._connection_key: str | None = None

    def setup(self):
        self._connection_key, self.connection = acquire_connection(self.settings, self.options)

    def process(self, batch: Iterable[Delivery]):
        deliveries = list(batch)
        if not deliveries:
            return
        started = time.monotonic()
        result = self.connection.send(deliveries, self.flow)
        self.request_latency.update(int((time.monotonic() - started) * 1000))
        self.requests.inc(result.requests)
        messages = sum(len(d.messages) for d in deliveries)
        self.batch_messages.update(messages)
        for delivery in result.delivered:
            self.delivered_events.inc()
            Metrics.counter(NAMESPACE, "events_delivered_calls").inc(len(delivery.messages))
            for message in delivery.messages:
                Metrics.counter(NAMESPACE, f"calls_sent_{message['type']}").inc()
            yield delivery
        if result.failed and self.options.fail_bundle_on_error:
            raise RuntimeError(f"{len(result.failed)} event(s) could not be delivered to Segment; failing the "
                               f"bundle so the runner retries it (first: {result.failed[0][1].error})")
        for _, dead in result.failed:
            self.failed_events.inc()
            Metrics.counter(NAMESPACE, f"dead_letter_{dead.reason}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead)

    def teardown(self):
        # Everything was already flushed in process(); this only closes the client (shutdown()).
        if self._connection_key is not None:
            release_connection(self._connection_key)
            self._connection_key, self.connection = None, None


class _BatchInBundle(beam.DoFn):
    """Gathers deliveries into batches of at most ``flush_at`` calls and the request limits.

    Batches never outlive the bundle: what is left is emitted in ``finish_bundle``, so it is
    sent before the bundle commits. The calls of one event are never split.
    """

    def __init__(self, flush_at: int):
        self.flush_at = max(1, min(flush_at, MAX_BATCH_MESSAGES))

    def start_bundle(self):
        self._batch: list[Delivery] = []
        self._calls = 0
        self._bytes = 0
        self._timestamp = None

    def process(self, delivery: Delivery, timestamp=beam.DoFn.TimestampParam):
        size = delivery.measure()
        calls = len(delivery.messages)
        if self._batch and (self._calls + calls > self.flush_at or self._bytes + size > MAX_BATCH_BYTES):
            yield self._take()
        self._batch.append(delivery)
        self._calls += calls
        self._bytes += size
        self._timestamp = timestamp if self._timestamp is None else max(self._timestamp, timestamp)
        if self._calls >= self.flush_at:
            yield self._take()

    def finish_bundle(self):
        if self._batch:
            timestamp = self._timestamp
            yield beam.utils.windowed_value.WindowedValue(
                self._take(), timestamp, [beam.transforms.window.GlobalWindow()])

    def _take(self) -> list[Delivery]:
        batch, self._batch, self._calls, self._bytes, self._timestamp = self._batch, [], 0, 0, None
        return batch


class BatchCalls(beam.PTransform):
    """Deliveries → batches for one request each (``flushAt`` calls, under 500 KB / 2,500)."""

    def __init__(self, flush_at: int):
        super().__init__()
        self.flush_at = flush_at

    def expand(self, deliveries):
        return deliveries | "Gather" >> beam.ParDo(_BatchInBundle(self.flush_at))
