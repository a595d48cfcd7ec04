"""The dead-letter record: one per input or event that could not be delivered.

Every stage that rejects something builds its record here, so the format (and the rule that
the write key never appears in it) lives in one place. A record's ``payload`` is the original
input text (or the event as normalised, which carries its id), so replaying it through the
same transforms gives the same messageIds.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field

import orjson

# Stages, in pipeline order.
PARSE = "parse"
IDENTITY = "identity"
SEND = "send"

# Reasons, each documented in docs/inputs-and-dead-letters.md.
NOT_JSON = "not_json"  # bytes that are not UTF-8 JSON
NOT_AN_EVENT = "not_an_event"  # JSON, but not an object (or an envelope item that is not one)
INVALID_ENVELOPE = "invalid_envelope"  # {"batch": ...} whose batch is not a list
EMPTY_ENVELOPE = "empty_envelope"  # [] or {"batch": []}: nothing to deliver, said out loud
INVALID_NAME = "invalid_name"  # name missing, not a string, or not "entity action"
INVALID_FIELD = "invalid_field"  # a known field of the wrong type or range (the error names it)
TOO_DEEP = "too_deep"  # objects and lists nested beyond decide.event.MAX_DEPTH
NO_IDENTITY = "no_identity"  # neither userId nor anonymousId resolved to a non-empty string
TOO_LARGE = "too_large"  # a message over Segment's 32 KB limit
INVALID_CALL = "invalid_call"  # the SDK refuses to build the call (e.g. an id of the wrong type)
REJECTED = "rejected"  # Segment answered 4xx for the message (after isolating it)
DELIVERY_FAILED = "delivery_failed"  # retries used up (5xx, 429, timeouts, resets), or the flush deadline

# Reasons given while parsing: such a dead letter stands for an input (or an envelope item)
# that never became an event, which matters for the accounting (pipeline.summary).
PARSE_REASONS = frozenset(
    {NOT_JSON, NOT_AN_EVENT, INVALID_ENVELOPE, EMPTY_ENVELOPE, INVALID_NAME, INVALID_FIELD, TOO_DEEP}
)


# The most a record's payload may take as JSON text, so that a whole record stays well inside
# every sink: a Pub/Sub message holds at most 10 MB, and a record carries more than its payload.
MAX_PAYLOAD_BYTES = 8_000_000
MAX_ERROR_CHARS = 16_384
BASE64 = "base64"


@dataclass(slots=True)
class DeadLetter:
    payload: str
    stage: str
    reason: str
    error: str
    flow: str = ""
    event_id: str | None = None
    attempts: int = 1
    http_status: int | None = None
    time: str = field(default_factory=lambda: utc_now_iso())
    # "base64" when the input was not UTF-8: the payload is then its bytes in base64, so a
    # replay gets the very bytes back (never replacement characters). None: plain text.
    payload_encoding: str | None = None
    # The payload's size in bytes as received, when it was cut to MAX_PAYLOAD_BYTES (the
    # payload is then a prefix, not replayable as it was). None: the payload is whole.
    payload_truncated_from: int | None = None
    # The messageId namespace of the run that wrote it (stamped as the record is counted): a
    # replay must use the same, or Segment cannot deduplicate what was already delivered.
    namespace: str | None = None

    def __post_init__(self):
        if len(self.payload) * 6 > MAX_PAYLOAD_BYTES:  # JSON escapes take at most 6 bytes a character
            self._cut_payload()
        if len(self.error) > MAX_ERROR_CHARS:
            self.error = self.error[:MAX_ERROR_CHARS] + f"... [{len(self.error) - MAX_ERROR_CHARS} characters cut]"

    def _cut_payload(self) -> None:
        encoded = _json_size(self.payload)
        if encoded <= MAX_PAYLOAD_BYTES:
            return
        if self.payload_truncated_from is None:
            self.payload_truncated_from = (
                len(base64.b64decode(self.payload))
                if self.payload_encoding == BASE64
                else len(self.payload.encode("utf-8", errors="surrogatepass"))
            )
        keep = len(self.payload)
        while encoded > MAX_PAYLOAD_BYTES:
            keep = int(keep * MAX_PAYLOAD_BYTES / encoded * 0.98)
            if self.payload_encoding == BASE64:
                keep -= keep % 4  # whole base64 quanta: the prefix still decodes
            encoded = _json_size(self.payload[:keep])
        self.payload = self.payload[:keep]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()


def _json_size(text: str) -> int:
    try:
        return len(orjson.dumps(text))
    except TypeError:  # a lone surrogate: json writes it escaped
        return len(json.dumps(text))


def replay_keys(payload: str, event_id: str | None) -> list[str]:
    """How a replayed record is recognised when it fails again: by its event id (an event keeps
    it through every transform), and by its payload (for inputs that never became an event)."""
    keys = ["payload:" + hashlib.sha256(payload.encode("utf-8", errors="replace")).hexdigest()]
    if event_id:
        keys.append("event:" + event_id)
    return keys


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def payload_text(payload: bytes | str | dict | list) -> str:
    """The payload as text, as close to what was received as possible (see encode_payload for
    bytes that must be kept exactly)."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload).decode("utf-8", errors="replace")
    try:
        return orjson.dumps(payload, default=str).decode()
    except TypeError:  # integers beyond 64 bits, or nesting beyond orjson's limit
        return _dumps_iteratively(payload)


def encode_payload(payload: bytes | str | dict | list) -> tuple[str, str | None]:
    """``(payload, payload_encoding)`` for a record: UTF-8 text as it is, other bytes in base64."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii"), BASE64
    return payload_text(payload), None


def decode_payload(record: dict) -> str | bytes:
    """A record's original payload: bytes again when it was stored in base64."""
    if record.get("payload_encoding") == BASE64:
        return base64.b64decode(record["payload"])
    return record["payload"]


def _dumps_iteratively(value) -> str:
    """JSON text of any value, however deep (the C encoders stop at a fixed depth)."""
    out: list[str] = []
    pending: list = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, _Token):
            out.append(item.text)
        elif isinstance(item, dict):
            out.append("{")
            parts: list = []
            for i, (key, child) in enumerate(item.items()):
                parts += [_Token(("," if i else "") + json.dumps(str(key)) + ":"), child]
            pending += [_Token("}"), *reversed(parts)]
        elif isinstance(item, list):
            out.append("[")
            parts = []
            for i, child in enumerate(item):
                parts += [_Token(",")] * bool(i) + [child]
            pending += [_Token("]"), *reversed(parts)]
        else:
            out.append(json.dumps(item, default=str))
    return "".join(out)


class _Token:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text
