"""The dead-letter record: one per input or event that could not be delivered.

Every stage that rejects something builds its record here, so the format (and the rule that
the write key never appears in it) lives in one place. A record's ``payload`` is the original
input text (or the event as normalised, which carries its id), so replaying it through the
same transforms gives the same messageIds.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field

import orjson

# Stages, in pipeline order.
PARSE = "parse"
MAP = "map"
IDENTITY = "identity"
SEND = "send"

# Reasons. The README documents each one.
NOT_JSON = "not_json"                # bytes that are not UTF-8 JSON
NOT_AN_EVENT = "not_an_event"        # JSON, but not an object (or an envelope item that is not one)
INVALID_ENVELOPE = "invalid_envelope"  # {"batch": ...} whose batch is not a list
EMPTY_ENVELOPE = "empty_envelope"    # [] or {"batch": []}: nothing to deliver, said out loud
INVALID_NAME = "invalid_name"        # name missing, not a string, or not "entity action"
INVALID_FIELD = "invalid_field"      # a known field of the wrong type (the error names it)
NO_IDENTITY = "no_identity"          # neither userId nor anonymousId resolved to a non-empty string
MAPPING_FAILED = "mapping_failed"    # the mapping raised where walkerOS would have failed the push
TOO_LARGE = "too_large"              # a message over Segment's 32 KB limit
INVALID_CALL = "invalid_call"        # the SDK refuses to build the call (e.g. an id of the wrong type)
REJECTED = "rejected"                # Segment answered 4xx for the message (after isolating it)
DELIVERY_FAILED = "delivery_failed"  # retries used up (5xx, 429, timeouts, resets), or the flush deadline

# Reasons given while parsing: such a dead letter stands for an input (or an envelope item)
# that never became an event, which matters for the accounting (pipeline.summary).
PARSE_REASONS = frozenset({NOT_JSON, NOT_AN_EVENT, INVALID_ENVELOPE, EMPTY_ENVELOPE, INVALID_NAME, INVALID_FIELD})


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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()


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
    """The payload as text, as close to what was received as possible."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload).decode("utf-8", errors="replace")
    try:
        return orjson.dumps(payload, default=str).decode()
    except TypeError:  # integers beyond 64 bits
        return json.dumps(payload, default=str)
