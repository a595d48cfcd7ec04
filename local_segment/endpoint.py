"""A local, Segment-compatible HTTP endpoint: try flows without an account, test without network.

It speaks the part of Segment's HTTP Tracking API the server SDKs use (``POST /v1/batch`` and the
single-call routes ``/v1/{identify,track,page,screen,group,alias}``) and answers as Segment does
(its HTTP API docs, "Errors", "Max request size"; the Spec's common fields and dedup guide):

* request-level problems get a 400 (wrong Content-Type, bad gzip, a body over 500 KB -- 32 KB on
  single routes --, bad JSON, no write key, any message over 32 KB), and nothing is accepted;
* per-message problems (no ids, a track without ``event``, ...) are answered 200 and the message
  is silently dropped -- here recorded in ``invalid`` and counted, so tests can see them;
* an unknown write key is answered 200 and its messages dropped (``strict=True``: 401);
* more than 2,500 messages: 200, the rest dropped;
* messages are deduplicated on ``messageId`` like Segment does.

Faults (``pipeline.local_segment_faults``) are injected per request for tests. Accepted messages
are kept in memory and, with ``record_path``, appended to a JSON Lines file flushed per request.
The write key is never logged nor recorded: requests record only the state of their auth.

Command line: ``walkeros-segment local-segment --port P --record FILE`` or
``python -m pipeline.local_segment --port P``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import http.server
import logging
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from pipeline.local_segment_faults import (  # re-exported: tests import faults from here
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
    close,
    delay,
    empty_2xx,
    error_body,
    healthy,
    redirect,
    reset,
    status,
)

__all__ = [
    "LocalSegment",
    "RequestRecord",
    "Fault",
    "status",
    "delay",
    "reset",
    "close",
    "empty_2xx",
    "bad_request_when",
    "healthy",
    "redirect",
    "main",
]

log = logging.getLogger(__name__)

MESSAGE_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
MAX_MESSAGE_ID_CHARS = 100
SUCCESS_BODY = b'{"success":true}'
JSON_TYPE = "application/json"

# Auth states recorded per request (never the key itself).
AUTH_OK = "ok"
AUTH_MISSING = "missing"
AUTH_MISMATCH = "mismatch"  # the Basic header and the body writeKey differ
AUTH_WRONG_KEY = "wrong_key"  # a key other than the expected one
AUTH_BEARER = "bearer"

# A keep-alive connection idle this long is closed, so abandoned clients do not pin threads.
IDLE_TIMEOUT_SECONDS = 120
# Keys shorter than this are not redacted from the record file: redacting "k" would mangle it.
MIN_REDACTED_KEY_CHARS = 8


class Rejected(Exception):
    """A request-level error: the whole request is answered ``status`` and nothing is accepted."""

    def __init__(self, status_code: int, code: str, message: str, close_connection: bool = False):
        super().__init__(message)
        self.status = status_code
        self.code = code
        self.message = message
        self.close_connection = close_connection


@dataclass
class Reply:
    """What to do with one request: send an answer, or drop the connection (reset / close)."""

    status: int | None = 200
    body: bytes = SUCCESS_BODY
    content_type: str | None = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    action: str = "send"  # "send" | RESET | CLOSE
    delay: float = 0.0
    close_connection: bool = False

    @classmethod
    def error(cls, status_code: int, code: str, message: str, close_connection: bool = False) -> "Reply":
        body = orjson.dumps({"code": code, "message": message})
        return cls(status_code, body, close_connection=close_connection)


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


@dataclass(frozen=True)
class Limits:
    """Segment's documented size limits (32 KB a message, 500 KB a batch, 2,500 messages)."""

    request_bytes: int
    message_bytes: int
    batch_messages: int


@dataclass
class Envelope:
    """A decoded request body: its messages and the envelope fields that apply to all of them."""

    messages: list
    body_key: Any
    sent_at: Any
    decoded_bytes: int


# --------------------------------------------------------------------------------------------
# Request decoding and request-level validation (in the order Segment applies it)
# --------------------------------------------------------------------------------------------


def resolve_route(path: str, prefix: str) -> str | None:
    """``"batch"`` or a message type for a known route, None for any other path."""
    path = path.split("?", 1)[0]
    if prefix:
        if not path.startswith(prefix + "/"):
            return None
        path = path[len(prefix) :]
    if not path.startswith("/v1/"):
        return None
    name = path[len("/v1/") :]
    return name if name == "batch" or name in MESSAGE_TYPES else None


def check_content_type(value: str | None) -> None:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != JSON_TYPE:
        raise Rejected(400, "invalid_content_type", f"Content-Type must be {JSON_TYPE}")


def decode_content(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """The body after Content-Encoding, never inflating past ``limit + 1`` bytes (gzip bombs)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return raw
    if encoding != "gzip":
        raise Rejected(400, "invalid_content_encoding", f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise Rejected(400, "invalid_gzip", f"body is not valid gzip: {exc}") from None
    if len(data) <= limit and not inflater.eof:
        raise Rejected(400, "invalid_gzip", "gzip body is truncated")
    return data


def check_size(decoded: bytes, limit: int, what: str) -> None:
    if len(decoded) > limit:
        raise Rejected(400, "payload_too_large", f"Exceed payload limit: {what} is {len(decoded)} bytes, limit {limit}")


def parse_json_object(decoded: bytes) -> dict:
    try:
        body = orjson.loads(decoded)
    except orjson.JSONDecodeError as exc:
        raise Rejected(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Rejected(400, "invalid_json", "body must be a JSON object")
    return body


def decode_request(headers, raw: bytes, route: str, limits: Limits) -> Envelope:
    """Steps 1-4 of the request validation; raises ``Rejected``."""
    check_content_type(headers.get("Content-Type"))
    limit = limits.request_bytes if route == "batch" else limits.message_bytes
    decoded = decode_content(raw, headers.get("Content-Encoding"), limit)
    check_size(decoded, limit, "the request" if route == "batch" else "a single-message request")
    body = parse_json_object(decoded)
    if route == "batch":
        messages = body.get("batch")
        if not isinstance(messages, list):
            raise Rejected(400, "invalid_batch", "body must have a 'batch' array")
    else:
        messages = [body]
    return Envelope(messages, body.get("writeKey"), body.get("sentAt"), len(decoded))


# --------------------------------------------------------------------------------------------
# Auth (step 5)
# --------------------------------------------------------------------------------------------


@dataclass
class Auth:
    key: str | None  # the key the request is accounted to; never logged nor recorded
    state: str
    scheme: str | None  # "basic" | "bearer" | None (body writeKey only)


def key_from_basic(value: str) -> str:
    """The username of ``Basic base64("<key>:")``; a missing colon is tolerated as Segment does."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Rejected(400, "invalid_authorization", "Authorization Basic value is not valid base64") from None
    return decoded.partition(":")[0]


def read_auth(authorization: str | None, body_key: Any, accept_bearer: bool) -> Auth:
    """The request's key and the state of its auth, from the Basic header and the body writeKey."""
    body_key = body_key if isinstance(body_key, str) and body_key else None
    scheme, _, value = (authorization or "").strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        if not accept_bearer:
            raise Rejected(401, "unauthorized", "Bearer tokens are not enabled on this endpoint")
        # With OAuth the write key still travels in the body.
        return Auth(body_key, AUTH_BEARER if body_key else AUTH_MISSING, "bearer")
    header_key = key_from_basic(value) if scheme == "basic" else None
    header_key = header_key or None
    key = header_key or body_key
    if key is None:
        return Auth(None, AUTH_MISSING, "basic" if scheme == "basic" else None)
    if header_key and body_key and header_key != body_key:
        return Auth(key, AUTH_MISMATCH, "basic")
    return Auth(key, AUTH_OK, "basic" if header_key else None)


def check_auth(auth: Auth, expected: str | None, strict: bool) -> bool:
    """Raise for a request that must be refused; return False when its messages are dropped."""
    if auth.key is None:
        raise Rejected(400, "missing_write_key", "no write key: send Basic auth base64('<writeKey>:') or a body writeKey")
    if strict and auth.state == AUTH_MISMATCH:
        raise Rejected(401, "write_key_mismatch", "the Basic auth key and the body writeKey differ")
    if expected is not None and auth.key != expected:
        auth.state = AUTH_WRONG_KEY
        if strict:
            raise Rejected(401, "invalid_write_key", "unknown write key")
        return False  # Segment answers 200 and silently drops the events of an unknown key
    return True


# --------------------------------------------------------------------------------------------
# Per-message validation (request still 200; failures are dropped silently by Segment)
# --------------------------------------------------------------------------------------------


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def parse_instant(value: Any) -> datetime | None:
    """An ISO 8601 instant with an offset; None when absent; ValueError when unusable."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("not a string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("no UTC offset")
    return parsed


def _ids_problem(msg: dict, kind: str) -> str | None:
    user_id, anonymous_id = msg.get("userId"), msg.get("anonymousId")
    for value in (user_id, anonymous_id):
        if value is not None and not isinstance(value, str):
            return "invalid_id_type"
    if kind == "alias":
        if not (_non_empty_str(msg.get("previousId")) and _non_empty_str(user_id)):
            return "alias_missing_ids"
        return None
    if not (_non_empty_str(user_id) or _non_empty_str(anonymous_id)):
        return "no_user_anon_id"
    return None


def _type_fields_problem(msg: dict, kind: str) -> str | None:
    if kind == "track" and not _non_empty_str(msg.get("event")):
        return "missing_event"
    if kind == "group" and not _non_empty_str(msg.get("groupId")):
        return "missing_group_id"
    if kind in ("page", "screen"):
        for name in ("name", "category"):
            value = msg.get(name)
            if value is not None and not isinstance(value, str):
                return f"invalid_{name}"
    for name in OBJECT_FIELDS:
        value = msg.get(name)
        if value is not None and not isinstance(value, dict):
            return f"invalid_{name}"
    return None


def _consent_problem(msg: dict) -> str | None:
    context = msg.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    if consent is None:
        return None
    preferences = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(preferences, dict) or not all(isinstance(v, bool) for v in preferences.values()):
        return "invalid_consent"
    return None


def _message_id_problem(msg: dict) -> str | None:
    message_id = msg.get("messageId")
    if message_id is None:
        return None  # Segment assigns one
    if not _non_empty_str(message_id):
        return "invalid_message_id"
    if len(message_id) > MAX_MESSAGE_ID_CHARS:
        return "message_id_too_long"
    return None


def message_problem(msg: Any, route_type: str | None = None) -> str | None:
    """Why Segment would drop this message, or None when it is acceptable.

    Timestamps are checked apart (``message_times``) because their parsed values are needed.
    """
    if not isinstance(msg, dict):
        return "not_an_object"
    kind = route_type or msg.get("type")
    if kind not in MESSAGE_TYPES:
        return "invalid_type"
    return _ids_problem(msg, kind) or _type_fields_problem(msg, kind) or _message_id_problem(msg) or _consent_problem(msg)


def format_instant(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_times(msg: dict, envelope_sent_at: Any, received_at: datetime) -> dict | str:
    """Segment's clock-skew correction, or the reason the timestamps are unusable.

    ``timestamp = receivedAt - (sentAt - originalTimestamp)`` (Segment's Spec, "Timestamps"); without a timestamp
    Segment uses its own clock, without sentAt it cannot correct.
    """
    sent_at_value = msg.get("sentAt", envelope_sent_at)
    try:
        original = parse_instant(msg.get("timestamp"))
    except ValueError:
        return "invalid_timestamp"
    try:
        sent_at = parse_instant(sent_at_value)
    except ValueError:
        return "invalid_sent_at"
    if original is None:
        corrected = received_at
    elif sent_at is None:
        corrected = original
    else:
        corrected = received_at - (sent_at - original)
    return {
        "receivedAt": format_instant(received_at),
        "sentAt": sent_at_value,
        "originalTimestamp": msg.get("timestamp"),
        "correctedTimestamp": format_instant(corrected),
    }


def stored_message(msg: dict, route_type: str | None) -> dict:
    """The message as Segment would store it: as received, minus any writeKey.

    Single routes take the type from the path. Existing fields are never changed otherwise.
    """
    if "writeKey" not in msg and (route_type is None or msg.get("type") == route_type):
        return msg
    copy = {k: v for k, v in msg.items() if k != "writeKey"}
    if route_type is not None:
        copy["type"] = route_type
    return copy


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


def read_chunked(rfile, hard_limit: int) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (the SDK never sends one; curl and others may)."""
    parts, total = [], 0
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise Rejected(400, "invalid_chunked_body", "malformed chunk size", close_connection=True) from None
        if size == 0:
            break
        total += size
        if total > hard_limit:
            raise Rejected(400, "payload_too_large", "Exceed payload limit", close_connection=True)
        parts.append(rfile.read(size))
        rfile.readline(8)  # the CRLF after each chunk
    while rfile.readline(8192) not in (b"\r\n", b"\n", b""):
        pass  # trailers
    return b"".join(parts)


def read_body(handler, hard_limit: int) -> bytes:
    """The raw request body. Bodies over ``hard_limit`` are not read: the connection is closed."""
    if (handler.headers.get("Transfer-Encoding") or "").strip().lower() == "chunked":
        return read_chunked(handler.rfile, hard_limit)
    length = handler.headers.get("Content-Length")
    if length is None:
        return b""
    try:
        size = int(length)
    except ValueError:
        raise Rejected(400, "invalid_content_length", "bad Content-Length", close_connection=True) from None
    if size < 0 or size > hard_limit:
        raise Rejected(400, "payload_too_large", f"Exceed payload limit: {size} bytes", close_connection=True)
    return handler.rfile.read(size)


def abort_connection(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST instead of an orderly FIN.

    ``socket.close()`` would only mark the socket closed while the handler's rfile/wfile still
    reference it; detaching and closing the descriptor sends the RST now.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(sock.detach())
    except OSError:
        pass


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK's requests.Session reuses connections
    disable_nagle_algorithm = True  # else delayed ACKs cost ~40 ms per request
    server_version = "LocalSegment/1.0"
    timeout = IDLE_TIMEOUT_SECONDS

    def setup(self):
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def do_POST(self):
        self.server.owner._serve(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_POST

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        # The base class writes an access log to stderr; our own summary line replaces it.
        log.debug("%s - %s", self.address_string(), format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping in a delay fault must not block shutdown
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, owner: "LocalSegment"):
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup we neither need nor want.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # Clients hanging up mid-request are normal here (timeouts, injected resets).
        log.debug("connection error from %s", client_address, exc_info=True)


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------


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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._record_file = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "LocalSegment":
        if self._server is not None:
            raise RuntimeError("LocalSegment already started")
        self._stopping.clear()
        if self.record_path:
            self._record_file = open(self.record_path, "ab")
        try:
            self._server = _Server(self._address, self)
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

    def __enter__(self) -> "LocalSegment":
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

    def reject_when(self, predicate: MessagePredicate, code: int = 400, message: str = "Invalid message in batch") -> None:
        """Answer ``code`` to *every* request carrying a message that matches ``predicate``."""
        self._faults.add_rule(bad_request_when(predicate, code, message))

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return self._faults.pending()

    # -- queries ----------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[["LocalSegment"], bool], timeout: float) -> bool:
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

    def _track(self, sock, is_open: bool) -> None:
        with self._lock:
            (self._connections.add if is_open else self._connections.discard)(sock)

    def _serve(self, handler) -> None:
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
                raise Rejected(400, "payload_too_large", f"Exceed payload limit: a message is {len(data)} bytes, limit {limit}")
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
                self.records.append({"message": stored, "messageId": message_id, "path": record.path, "request": record.index, **times})
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


def send_reply(handler, reply: Reply) -> None:
    handler.send_response(reply.status)
    for name, value in reply.headers:
        handler.send_header(name, value)
    if reply.content_type:
        handler.send_header("Content-Type", reply.content_type)
    handler.send_header("Content-Length", str(len(reply.body)))
    if reply.close_connection:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    if handler.command != "HEAD" and reply.body:
        handler.wfile.write(reply.body)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walkeros-segment local-segment",
        description="Run a local Segment-compatible endpoint (POST /v1/batch) to try flows without Segment.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port; the URL is printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--record", metavar="FILE", help="append accepted messages to FILE as JSON Lines")
    parser.add_argument(
        "--write-key",
        help="the expected write key (default: env LOCAL_SEGMENT_WRITE_KEY; unset accepts any key). "
        "Prefer the env variable: command lines are visible to other users",
    )
    parser.add_argument("--strict", action="store_true", help="answer 401 to a wrong write key instead of 200 + drop")
    parser.add_argument("--path-prefix", default="", help="serve the routes under this prefix, e.g. /segment")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return parser


def startup_line(server: LocalSegment, record_path: str | None) -> str:
    where = f"recording accepted messages to {record_path}" if record_path else "not recording to a file"
    return f"local Segment endpoint listening on {server.url} (POST /v1/batch); {where}"


def totals_line(server: LocalSegment) -> str:
    counters = server.counters
    dropped = {k.split(":", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("dropped:")}
    dropped_text = ", ".join(f"{reason} {n}" for reason, n in dropped.items()) or "none"
    return (
        f"local Segment endpoint stopped: {counters['requests']} requests, {counters['accepted']} accepted, "
        f"{counters['duplicate']} duplicates, dropped: {dropped_text}"
    )


def _install_stop_signals(stop: threading.Event) -> dict:
    """SIGINT/SIGTERM set ``stop``; only possible on the main thread (else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda *_: stop.set())
    return previous


def main(argv: list[str] | None = None) -> int:
    """``walkeros-segment local-segment``: serve until SIGINT/SIGTERM, then print totals; 0 or 2."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    previous_level = log.level
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return _serve_until_stopped(args)
    finally:
        log.setLevel(previous_level)  # main() may run inside a larger process (tests, the CLI)


def _serve_until_stopped(args: argparse.Namespace) -> int:
    write_key = args.write_key or os.environ.get("LOCAL_SEGMENT_WRITE_KEY") or None
    server = LocalSegment(
        write_key, host=args.host, port=args.port, record_path=args.record, strict=args.strict, path_prefix=args.path_prefix
    )
    try:
        server.start()
    except OSError as exc:
        print(f"local-segment: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = _install_stop_signals(stop)
    print(startup_line(server, args.record), flush=True)
    print(
        "write key: " + ("checked against the configured key" if write_key else "any non-empty key accepted"),
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # signal handlers could not be installed (not the main thread)
        pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(totals_line(server), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
