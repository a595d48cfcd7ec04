"""The local Segment-compatible endpoint: ``LocalSegment`` validates each request as Segment does,
applies the injected faults, deduplicates on messageId and records what it accepted and why.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from local_segment.faults import (
    BAD_REQUEST_WHEN,
    CLOSE,
    DELAY,
    EMPTY_2XX,
    HEALTHY,
    RESET,
    Fault,
    FaultPlan,
    MessagePredicate,
    bad_request_when,
    error_body,
)
from local_segment.http_server import Reply, Server, abort_connection, read_body, send_reply
from local_segment.validation import (
    AUTH_MISSING,
    Envelope,
    Limits,
    Rejected,
    check_auth,
    decode_request,
    message_problem,
    message_times,
    read_auth,
    resolve_route,
    stored_message,
)

log = logging.getLogger(__name__)

# Keys shorter than this are not redacted from the record file: redacting "k" would mangle it.
MIN_REDACTED_KEY_CHARS = 8


@dataclass
class RequestRecord:
    """One request as the endpoint saw it; ``requests`` holds one per request, in arrival order."""

    index: int
    time: float  # arrival, epoch seconds
    method: str
    path: str
    user_agent: str | None
    retry_count: int | None  # X-Retry-Count; None when absent (a first attempt)
    content_type: str | None
    content_encoding: str | None
    raw_bytes: int
    auth: str = AUTH_MISSING
    outcome: str = "pending"  # then "answered", "reset" or "close" (dropped without an answer)
    status: int | None = None  # the status answered; None while pending or without an answer
    decoded_bytes: int | None = None
    messages: int | None = None  # items in the body, when it could be parsed
    message_ids: list = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    dropped: int = 0
    drop_reasons: dict = field(default_factory=dict)  # reason -> count, for messages not accepted
    error: str | None = None  # the error code answered, if any
    fault: str | None = None  # the injected fault, if any
    client_gone: bool = False  # the client had hung up before the answer (e.g. its timeout)


class LocalSegment:
    """A Segment-compatible endpoint on loopback, for trying flows and for tests.

    ``write_key`` None accepts any non-empty key; otherwise an unknown key is answered 200 and its
    messages dropped (``dropped:bad_write_key``), or 401 with ``strict=True`` (which also answers
    401 when the Basic key and the body writeKey differ).

    What it records (all appended in arrival order; read them after the client flushed, or use
    ``wait_until`` / ``wait_for``):

    * ``accepted``: the messages accepted, after messageId dedup, as received (a writeKey field is
      removed; single routes set ``type`` from the path);
    * ``records``: per accepted message ``{"message", "messageId" (assigned when missing), "path",
      "request" (index into requests), "receivedAt", "sentAt", "originalTimestamp",
      "correctedTimestamp"}``;
    * ``requests``: a ``RequestRecord`` per request, whatever happened to it;
    * ``invalid``: ``{"reason", "message"}`` per message Segment would silently drop as invalid;
    * ``counters``: ``requests``, ``accepted``, ``duplicate``, ``dropped:<reason>`` (the invalid
      reasons, ``bad_write_key``, ``batch_count``), ``rejected_requests``, ``faults``.
    """

    def __init__(
        self,
        write_key: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        record_path: str | None = None,
        strict: bool = False,
        max_request_bytes: int = 500_000,
        max_message_bytes: int = 32_768,
        max_batch_messages: int = 2_500,
        path_prefix: str = "",
        dedup_window: float | None = None,
        accept_bearer: bool = False,
    ):
        self._write_key = write_key
        self._address = (host, port)
        self.record_path = record_path
        self.strict = strict
        self.limits = Limits(max_request_bytes, max_message_bytes, max_batch_messages)
        self.path_prefix = "/" + path_prefix.strip("/") if path_prefix.strip("/") else ""
        self.dedup_window = dedup_window  # seconds a messageId is remembered; None = forever
        self.accept_bearer = accept_bearer
        # Bodies above this are refused unread; below it they are read, so keep-alive survives a 400.
        self._hard_limit = max(8 * max_request_bytes, 8 << 20)

        self.accepted: list[dict] = []
        self.records: list[dict] = []
        self.requests: list[RequestRecord] = []
        self.invalid: list[dict] = []
        self.counters: collections.Counter = collections.Counter()
        self._seen: dict[str, float] = {}  # messageId -> monotonic time accepted

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._faults = FaultPlan()
        self._connections: set = set()
        self._stopping = threading.Event()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._record_file = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalSegment:
        if self._server is not None:
            raise RuntimeError("LocalSegment already started")
        self._stopping.clear()
        if self.record_path:
            self._record_file = open(self.record_path, "ab")
        try:
            self._server = Server(self._address, self)
        except OSError:
            self._close_record_file()
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-segment", daemon=True
        )
        self._thread.start()
        log.debug("local Segment endpoint listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections, so the endpoint is really gone."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_record_file()

    def __enter__(self) -> LocalSegment:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalSegment is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """What the SDK's ``host`` gets: ``http://127.0.0.1:PORT`` plus the path prefix."""
        host = self._server.server_address[0] if self._server else self._address[0]
        return f"http://{host}:{self.port}{self.path_prefix}"

    # -- faults ---------------------------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Queue faults: each request on a /v1 route takes the next one; an empty queue is healthy."""
        self._faults.extend(faults)

    def fail_next(self, n: int, fault: Fault) -> None:
        """The next ``n`` requests get ``fault``, then the endpoint is healthy again."""
        self._faults.extend([fault] * n)

    def fail_randomly(self, probability: float, fault: Fault, seed: int | None = None) -> None:
        """Give each request without a scripted fault ``fault`` with ``probability``."""
        self._faults.set_random(probability, fault, seed)

    def reject_when(
        self, predicate: MessagePredicate, code: int = 400, message: str = "Invalid message in batch"
    ) -> None:
        """Answer ``code`` to *every* request carrying a message that matches ``predicate``."""
        self._faults.add_rule(bad_request_when(predicate, code, message))

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return self._faults.pending()

    # -- queries ----------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[LocalSegment], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def wait_until(self, n_accepted: int, timeout: float) -> bool:
        """True once at least ``n_accepted`` messages were accepted, False after ``timeout`` s."""
        return self.wait_for(lambda s: len(s.accepted) >= n_accepted, timeout)

    def reset(self, dedup: bool = False) -> None:
        """Clear what was recorded; the messageId memory too only with ``dedup=True``."""
        with self._lock:
            self.accepted.clear()
            self.records.clear()
            self.requests.clear()
            self.invalid.clear()
            self.counters.clear()
            if dedup:
                self._seen.clear()

    # -- request handling -----------------------------------------------------------------------

    def track_connection(self, sock, is_open: bool) -> None:
        with self._lock:
            (self._connections.add if is_open else self._connections.discard)(sock)

    def serve_request(self, handler) -> None:
        """Answer one request (called on the connection's thread)."""
        route = resolve_route(handler.path, self.path_prefix)
        record = self._new_record(handler)
        try:
            raw = read_body(handler, self._hard_limit)
            record.raw_bytes = len(raw)
            if route is None:
                reply = Reply.error(404, "not_found", f"no route for {handler.path.split('?', 1)[0]}")
            elif handler.command != "POST":
                reply = Reply.error(405, "method_not_allowed", "use POST")
                reply.headers = (("Allow", "POST"),)
            else:
                fault = self._faults.next_fault()
                record.fault = fault.describe() if fault is not None and fault.kind != HEALTHY else None
                reply = self._reply_for(fault, handler, route, raw, record)
        except Rejected as rejected:
            reply = Reply.error(rejected.status, rejected.code, rejected.message, rejected.close_connection)
        except Exception:  # a bug or a test predicate raising: answer 500, keep serving
            log.exception("local Segment failed on %s %s", handler.command, handler.path)
            reply = Reply.error(500, "internal_error", "local Segment endpoint error")
        self._finish_record(record, reply)
        self._deliver(handler, reply, record)

    def _new_record(self, handler) -> RequestRecord:
        headers = handler.headers
        record = RequestRecord(
            index=-1,
            time=time.time(),
            method=handler.command,
            path=handler.path.split("?", 1)[0],  # a query string is not ours to record
            user_agent=headers.get("User-Agent"),
            retry_count=_int_or_none(headers.get("X-Retry-Count")),
            content_type=headers.get("Content-Type"),
            content_encoding=headers.get("Content-Encoding"),
            raw_bytes=0,
        )
        with self._changed:
            record.index = len(self.requests)
            self.requests.append(record)
            self.counters["requests"] += 1
            self._changed.notify_all()
        return record

    def _finish_record(self, record: RequestRecord, reply: Reply) -> None:
        record.status = reply.status if reply.action == "send" else None
        record.outcome = "answered" if reply.action == "send" else reply.action
        if reply.status is not None and reply.status >= 300 and reply.action == "send" and record.error is None:
            try:
                record.error = orjson.loads(reply.body).get("code") if reply.body else None
            except (orjson.JSONDecodeError, AttributeError):
                record.error = None
        if record.fault is None and record.error is not None:
            with self._lock:
                self.counters["rejected_requests"] += 1
        elif record.fault is not None:
            with self._lock:
                self.counters["faults"] += 1
        if log.isEnabledFor(logging.INFO):
            log.info("%s", summary_line(record, reply))

    def _reply_for(self, fault: Fault | None, handler, route: str, raw: bytes, record: RequestRecord) -> Reply:
        """The answer to a routed POST, given the fault it drew (None = healthy)."""
        kind = fault.kind if fault is not None else HEALTHY
        if kind == HEALTHY:
            return self._process(handler, route, raw, record)
        if kind == BAD_REQUEST_WHEN:
            return self._process(handler, route, raw, record, extra_rules=(fault,))
        if kind == DELAY:
            reply = self._reply_for(fault.then, handler, route, raw, record)
            reply.delay += fault.seconds
            return reply
        if kind == EMPTY_2XX or (kind in (RESET, CLOSE) and fault.accept):
            self._process(handler, route, raw, record)
        else:
            self._peek(handler, route, raw, record)
        if kind == EMPTY_2XX:
            return Reply(fault.code, b"", None)
        if kind in (RESET, CLOSE):
            return Reply(None, b"", None, action=kind)
        return injected_status_reply(fault)

    def _peek(self, handler, route: str, raw: bytes, record: RequestRecord) -> None:
        """Record what an unprocessed (faulted) request carried, when it can be decoded."""
        try:
            envelope = decode_request(handler.headers, raw, route, self.limits)
            _note_envelope(record, envelope)
            record.auth = read_auth(handler.headers.get("Authorization"), envelope.body_key, self.accept_bearer).state
        except Rejected:
            pass

    def _process(self, handler, route: str, raw: bytes, record: RequestRecord, extra_rules=()) -> Reply:
        """The healthy answer: validate as Segment does, then accept, dedupe and record."""
        auth = None
        try:
            envelope = decode_request(handler.headers, raw, route, self.limits)
            _note_envelope(record, envelope)
            auth = read_auth(handler.headers.get("Authorization"), envelope.body_key, self.accept_bearer)
            key_is_known = check_auth(auth, self._write_key, self.strict)
            serialized = self._check_message_sizes(envelope.messages)
            self._check_rules(envelope.messages, extra_rules)
        except Rejected as rejected:
            record.error = rejected.code
            return Reply.error(rejected.status, rejected.code, rejected.message, rejected.close_connection)
        finally:
            if auth is not None:
                record.auth = auth.state  # check_auth may have turned it into wrong_key
        self._accept(envelope, serialized, route, key_is_known, auth.key, record)
        return Reply()

    def _check_message_sizes(self, messages: list) -> list[bytes]:
        """Step 6: any message over the limit fails the whole request, as Segment does."""
        serialized = [orjson.dumps(m) for m in messages]
        limit = self.limits.message_bytes
        for data in serialized:
            if len(data) > limit:
                raise Rejected(
                    400, "payload_too_large", f"Exceed payload limit: a message is {len(data)} bytes, limit {limit}"
                )
        return serialized

    def _check_rules(self, messages: list, extra_rules) -> None:
        for rule in (*self._faults.rules(), *extra_rules):
            if any(isinstance(m, dict) and rule.predicate(m) for m in messages):
                raise Rejected(rule.code, error_body(rule.code)["code"], rule.message)

    def _accept(self, envelope: Envelope, serialized: list, route: str, key_is_known: bool, key, record) -> None:
        """Steps 7 and the per-message checks, then dedup and recording under the lock."""
        route_type = None if route == "batch" else route
        received_at = datetime.fromtimestamp(record.time, timezone.utc)  # arrival, not processing time
        cap = self.limits.batch_messages
        drops: list[tuple[str, Any]] = [("batch_count", m) for m in envelope.messages[cap:]]
        candidates = []  # (message id, stored message, serialized, times)
        for msg, data in zip(envelope.messages[:cap], serialized):
            if not key_is_known:
                drops.append(("bad_write_key", msg))
                continue
            reason = message_problem(msg, route_type)
            times = message_times(msg, envelope.sent_at, received_at) if reason is None else None
            if isinstance(times, str):
                reason = times
            if reason is not None:
                drops.append((reason, msg))
                continue
            stored = stored_message(msg, route_type)
            if stored is not msg:
                data = orjson.dumps(stored)
            message_id = msg.get("messageId") or f"local-segment-{uuid.uuid4()}"
            candidates.append((message_id, stored, data, times))
        self._commit(candidates, drops, record, key)

    def _commit(self, candidates: list, drops: list, record: RequestRecord, key) -> None:
        lines = []
        with self._changed:
            now = time.monotonic()
            for message_id, stored, data, times in candidates:
                if self._is_duplicate(message_id, now):
                    self.counters["duplicate"] += 1
                    record.duplicates += 1
                    continue
                self._seen[message_id] = now
                self.accepted.append(stored)
                self.records.append(
                    {"message": stored, "messageId": message_id, "path": record.path, "request": record.index, **times}
                )
                lines.append(data)
                record.accepted += 1
            self.counters["accepted"] += record.accepted
            for reason, msg in drops:
                self.counters[f"dropped:{reason}"] += 1
                record.drop_reasons[reason] = record.drop_reasons.get(reason, 0) + 1
                if reason not in ("batch_count", "bad_write_key"):
                    shown = stored_message(msg, None) if isinstance(msg, dict) else msg  # never a writeKey
                    self.invalid.append({"reason": reason, "message": shown})
            record.dropped = len(drops)
            self._write_records(lines, key)
            self._changed.notify_all()

    def _is_duplicate(self, message_id: str, now: float) -> bool:
        first_seen = self._seen.get(message_id)
        if first_seen is None:
            return False
        return self.dedup_window is None or now - first_seen <= self.dedup_window

    def _write_records(self, lines: list[bytes], key) -> None:
        """Append accepted messages as JSON Lines, flushed per request so ``tail -f`` shows them."""
        if self._record_file is None or not lines:
            return
        chunk = b"\n".join(lines) + b"\n"
        # The key was removed from the envelope; a message carrying it in a property must not leak it.
        for secret in {key, self._write_key}:
            if isinstance(secret, str) and len(secret) >= MIN_REDACTED_KEY_CHARS:
                chunk = chunk.replace(secret.encode(), b"[redacted]")
        self._record_file.write(chunk)
        self._record_file.flush()

    def _close_record_file(self) -> None:
        with self._lock:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None

    def _deliver(self, handler, reply: Reply, record: RequestRecord) -> None:
        """Send the reply (after any injected delay), or drop the connection."""
        if reply.delay > 0:
            self._stopping.wait(reply.delay)
        if reply.action == RESET:
            handler.close_connection = True
            abort_connection(handler.connection)
            return
        if reply.action == CLOSE:
            handler.close_connection = True
            return
        try:
            send_reply(handler, reply)
        except OSError:  # the client gave up (e.g. its timeout fired during a delay)
            record.client_gone = True
            handler.close_connection = True


def _note_envelope(record: RequestRecord, envelope: Envelope) -> None:
    record.decoded_bytes = envelope.decoded_bytes
    record.messages = len(envelope.messages)
    record.message_ids = [m.get("messageId") for m in envelope.messages if isinstance(m, dict)]


def summary_line(record: RequestRecord, reply: Reply) -> str:
    """One line per request for the command line's log: what came in and what became of it."""
    outcome = str(record.status) if record.status is not None else f"{reply.action} (no answer)"
    if record.error:
        outcome += f" {record.error}"
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(record.drop_reasons.items()))
    return (
        f"{record.method} {record.path} -> {outcome}: "
        f"{record.messages if record.messages is not None else '-'} messages, {record.accepted} accepted, "
        f"{record.duplicates} duplicates, {record.dropped} dropped"
        + (f" ({reasons})" if reasons else "")
        + (f" [fault {record.fault}]" if record.fault else "")
    )


def injected_status_reply(fault: Fault) -> Reply:
    body = fault.body
    if body is None:
        return Reply(fault.code, orjson.dumps(error_body(fault.code)), headers=fault.headers)
    if isinstance(body, (dict, list)):
        return Reply(fault.code, orjson.dumps(body), headers=fault.headers)
    data = body.encode() if isinstance(body, str) else bytes(body)
    return Reply(fault.code, data, "text/plain; charset=utf-8", headers=fault.headers)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
