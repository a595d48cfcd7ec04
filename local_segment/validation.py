"""What the local endpoint checks, in the order Segment applies it: the request (route, Content-Type,
gzip, size, JSON, write key) and then each message (ids, type fields, messageId, consent, timestamps).

Request-level problems raise ``Rejected`` (the whole request is refused); per-message problems are
returned as a reason, and the message is dropped while the request is still answered 200.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

MESSAGE_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
MAX_MESSAGE_ID_CHARS = 100
JSON_TYPE = "application/json"

# Auth states recorded per request (never the key itself).
AUTH_OK = "ok"
AUTH_MISSING = "missing"
AUTH_MISMATCH = "mismatch"  # the Basic header and the body writeKey differ
AUTH_WRONG_KEY = "wrong_key"  # a key other than the expected one
AUTH_BEARER = "bearer"


class Rejected(Exception):
    """A request-level error: the whole request is answered ``status`` and nothing is accepted."""

    def __init__(self, status_code: int, code: str, message: str, close_connection: bool = False):
        super().__init__(message)
        self.status = status_code
        self.code = code
        self.message = message
        self.close_connection = close_connection


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
        raise Rejected(
            400, "missing_write_key", "no write key: send Basic auth base64('<writeKey>:') or a body writeKey"
        )
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
    return (
        _ids_problem(msg, kind) or _type_fields_problem(msg, kind) or _message_id_problem(msg) or _consent_problem(msg)
    )


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
