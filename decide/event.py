"""The walkerOS event: envelopes in, validated and normalised events (or dead letters) out.

Accepts what walkerOS server sources accept: one event object, a JSON array of events, or
``{"batch": [events...]}``. Nothing here raises on bad input: every problem becomes a
:class:`DeadLetter` with a reason, so one bad line never stops a pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from decide import dead_letter as dl
from decide.dead_letter import DeadLetter, encode_payload

_OBJECT_FIELDS = ("data", "globals", "custom", "user", "source", "context")
_STRING_FIELDS = ("entity", "action", "trigger")
_NUMBER_FIELDS = ("timing",)

# The valid event time: epoch milliseconds from 1970-01-01 to 9999-12-31 (UTC). walkerOS makes
# a JavaScript Date of it (about ±275,000 years), Segment takes ISO 8601 with a four-digit
# year, and the pipeline must format it as one: the narrower of the two. A collector stamps
# Date.now(), so a time before 1970 is a producer's bug, not history. 0 counts as absent, as in
# walkerOS (a falsy timestamp means "now"): the record's own time stands in.
MIN_TIMESTAMP_MS = 0
MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

# Levels of objects and lists an event may nest, the event itself being level 1. Real events
# stay within ten; far deeper input would break pickling between steps (RecursionError) and the
# JSON encoders of the calls, so it is refused here, before anything else sees it.
MAX_DEPTH = 64


@dataclass(frozen=True)
class RejectedInput:
    """An input its reader already found unusable (e.g. a Pub/Sub message whose timestamp
    attribute is not a time): parsing makes it the dead letter it describes."""

    payload: bytes | str
    reason: str
    error: str
    event_id: str | None = None
    payload_truncated_from: int | None = None


class InvalidEvent(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_payload(
    payload: bytes | str | dict | list,
    *,
    collector: dict | None = None,
    default_timestamp_ms: int | None = None,
    flow: str = "",
) -> list[dict | DeadLetter]:
    """Each event of an envelope, normalised, or a dead letter for each thing wrong.

    ``payload`` is the raw bytes/text of one input record, or an already-decoded JSON value
    (from JSON or Avro files). ``default_timestamp_ms`` stands in for a missing event
    timestamp (the Pub/Sub publish time, say); failing that, the current time.

    A list, not a generator: nearly every payload is one event, and this runs for each.
    """
    if type(payload) is bytes:
        # The usual input, a line of a file or a Pub/Sub message: one event, decoded here, so
        # it is normalised in place (nobody else holds it).
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return [_dead(payload, dl.NOT_JSON, f"not valid UTF-8 JSON: {exc}", flow)]
        # Nesting needs containers: text with no more brackets than the limit cannot nest beyond
        # it (brackets inside strings only make the count larger), and counting them is far
        # cheaper than walking the decoded event.
        check_depth = payload.count(b"{") + payload.count(b"[") > MAX_DEPTH
        return _parse_document(document, payload, True, check_depth, collector, default_timestamp_ms, flow)
    if isinstance(payload, RejectedInput):
        dead = _dead(payload.payload, payload.reason, payload.error, flow, event_id=payload.event_id)
        dead.payload_truncated_from = payload.payload_truncated_from
        return [dead]
    if isinstance(payload, (bytes, bytearray, memoryview, str)):
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return [_dead(payload, dl.NOT_JSON, f"not valid UTF-8 JSON: {exc}", flow)]
        return _parse_document(
            document, payload, True, _brackets(payload) > MAX_DEPTH, collector, default_timestamp_ms, flow
        )
    return _parse_document(payload, payload, False, True, collector, default_timestamp_ms, flow)


def _parse_document(
    document: Any,
    payload: Any,
    owned: bool,
    check_depth: bool,
    collector: dict | None,
    default_timestamp_ms: int | None,
    flow: str,
) -> list[dict | DeadLetter]:
    """parse_payload for a decoded ``document`` of ``payload``; ``owned``: decoded here, so
    nobody else holds it."""
    if isinstance(document, dict) and not _is_batch_envelope(document):
        # One event, kept as received if it is invalid.
        try:
            return [normalise(document, collector, default_timestamp_ms, check_depth, owned)]
        except InvalidEvent as exc:
            return [_dead(payload, exc.reason, str(exc), flow, event_id=_given_id(document))]

    out: list[dict | DeadLetter] = []
    for item in _envelope_items(document, payload, flow):
        if isinstance(item, DeadLetter):
            out.append(item)
            continue
        try:
            out.append(
                normalise(item, collector=collector, default_timestamp_ms=default_timestamp_ms, check_depth=check_depth)
            )
        except InvalidEvent as exc:
            out.append(_dead(item, exc.reason, str(exc), flow, event_id=_given_id(item)))
    return out


def _is_batch_envelope(document: dict) -> bool:
    return "batch" in document and "name" not in document


def _envelope_items(document: Any, payload, flow: str) -> Iterator[Any]:
    """The items of a list or ``{"batch": [...]}`` envelope (an event's is handled before)."""
    if isinstance(document, list):
        items = document
    elif isinstance(document, dict):
        items = document["batch"]
        if not isinstance(items, list):
            yield _dead(payload, dl.INVALID_ENVELOPE, '"batch" must be a list of events', flow)
            return
    else:
        yield _dead(payload, dl.NOT_AN_EVENT, f"expected a JSON object, got {_json_type(document)}", flow)
        return
    if not items:
        yield _dead(payload, dl.EMPTY_ENVELOPE, "the envelope holds no events", flow)
    for item in items:
        if isinstance(item, dict):
            yield item
        else:
            yield _dead(item, dl.NOT_AN_EVENT, f"expected an event object, got {_json_type(item)}", flow)


def normalise(
    event: dict,
    collector: dict | None = None,
    default_timestamp_ms: int | None = None,
    check_depth: bool = True,
    in_place: bool = False,
) -> dict:
    """Validate one event and return it normalised: a copy, unless ``in_place`` (for an event
    nobody else holds, such as one just decoded). Unchanged when it is invalid.

    Fills ``entity``/``action`` from ``name``, keeps ``id`` or derives one from the content,
    fills a missing ``timestamp``, and merges the collector's globals, user and consent under
    the event's own (the event wins per key), as the walkerOS collector does.
    """
    if check_depth and not _within_depth(event, MAX_DEPTH - 1):
        raise InvalidEvent(dl.TOO_DEEP, f"the event nests objects and lists deeper than {MAX_DEPTH} levels")
    entity, action = _validate(event)
    timestamp = None
    if not event.get("timestamp", 0):  # absent, or 0: walkerOS takes a falsy timestamp for "now"
        if default_timestamp_ms is None:
            timestamp = int(time.time() * 1000)
        elif MIN_TIMESTAMP_MS <= default_timestamp_ms <= MAX_TIMESTAMP_MS:
            timestamp = default_timestamp_ms
        else:
            raise InvalidEvent(
                dl.INVALID_FIELD,
                "no timestamp, and the record's own time (e.g. the Pub/Sub "
                f"timestamp attribute) is out of range: {_timestamp_problem(default_timestamp_ms)}",
            )
    # Valid from here on: nothing below raises, so an invalid event is never half changed.
    event_id = None if "id" in event else derive_id(event)  # a present id is a non-empty string
    out = event if in_place else dict(event)
    if "entity" not in out:
        out["entity"] = entity
    if "action" not in out:
        out["action"] = action
    if event_id is not None:
        out["id"] = event_id
    if timestamp is not None:
        out["timestamp"] = timestamp
    # Written out, not a loop over the sections: this runs for every event.
    if "data" not in out:
        out["data"] = {}
    if "globals" not in out:
        out["globals"] = {}
    if "custom" not in out:
        out["custom"] = {}
    if "user" not in out:
        out["user"] = {}
    if "context" not in out:
        out["context"] = {}
    if "consent" not in out:
        out["consent"] = {}
    if "nested" not in out:
        out["nested"] = []
    if collector:
        for section, base in _collector_bases(collector):
            out[section] = {**base, **out[section]}
    return out


# The last collector seen and its bases: a run has one collector (its flow's configuration),
# whose sections are looked up once, not for every event.
_LAST_BASES: tuple[Any, tuple[tuple[str, dict], ...]] = (None, ())


def _collector_bases(collector: dict) -> tuple[tuple[str, dict], ...]:
    """The collector's non-empty globals, user and consent, which events are merged over.
    A collector is configuration: which of its sections are set is read once per collector."""
    global _LAST_BASES
    held, bases = _LAST_BASES
    if held is not collector:
        # A loop, not a generator: compiled, this is a C function, which cannot hold a closure.
        found = []
        for section in _COLLECTOR_SECTIONS:
            if collector.get(section):
                found.append((section, collector[section]))
        bases = tuple(found)
        _LAST_BASES = (collector, bases)
    return bases


_COLLECTOR_SECTIONS = ("globals", "user", "consent")


def _validate(event: dict) -> tuple[str, str]:
    """The event's fields checked as walkerOS would; returns the entity and action its name gives."""
    name = event.get("name")
    # Nearly every event is plainly valid, which a quick look says. Anything else takes the
    # checks in their documented order, so the first fault is the one named.
    if type(name) is str:
        tokens = name.split(" ", 2)  # only the first two words count
        if len(tokens) >= 2 and tokens[0] and tokens[1] and _plainly_valid(event):
            return tokens[0], tokens[1]
    return _validate_in_order(event, name)


# Defaults standing in for absent fields in the quick check: values that pass. Never changed.
_ABSENT_OBJECT: dict = {}
_ABSENT_LIST: list = []
# math.isfinite converts ints to float, which overflows beyond this; the quick check
# leaves such ints to the ordered checks (which raise as they always did).
_FLOAT_SAFE = 2.0**1023


def _plainly_valid(event: dict) -> bool:
    """Whether every checked field certainly passes; never raises. False means "not sure".

    Exact JSON types only (what a JSON parser makes); subclasses go to the ordered checks.
    Written out field by field: it runs for every event. (``event.get`` each time, not a bound
    ``get``: compiled, a lookup in an argument typed ``dict`` is a C call.)"""
    if (
        type(event.get("data", _ABSENT_OBJECT)) is not dict
        or type(event.get("globals", _ABSENT_OBJECT)) is not dict
        or type(event.get("custom", _ABSENT_OBJECT)) is not dict
        or type(event.get("user", _ABSENT_OBJECT)) is not dict
        or type(event.get("source", _ABSENT_OBJECT)) is not dict
        or type(event.get("context", _ABSENT_OBJECT)) is not dict
        or type(event.get("entity", "")) is not str
        or type(event.get("action", "")) is not str
        or type(event.get("trigger", "")) is not str
    ):
        return False
    event_id = event.get("id", "-")
    if type(event_id) is not str or not event_id:
        return False
    # Numbers: float or int (bool is neither here); inf and NaN fail the comparison.
    timestamp = event.get("timestamp", 0)
    kind = type(timestamp)
    if (kind is not int and kind is not float) or not MIN_TIMESTAMP_MS <= timestamp <= MAX_TIMESTAMP_MS:
        return False
    timing = event.get("timing", 0)
    kind = type(timing)
    if (kind is not float and kind is not int) or not -_FLOAT_SAFE < timing < _FLOAT_SAFE:
        return False
    nested = event.get("nested", _ABSENT_LIST)
    if type(nested) is not list:
        return False
    for entity in nested:
        if type(entity) is not dict:
            return False
    consent = event.get("consent", _ABSENT_OBJECT)
    if type(consent) is not dict:
        return False
    for granted in consent.values():
        if granted is not True and granted is not False:
            return False
    return True


def _validate_in_order(event: dict, name: Any) -> tuple[str, str]:
    if not isinstance(name, str):
        raise InvalidEvent(dl.INVALID_NAME, f'name must be a string "entity action", got {_json_type(name)}')
    tokens = name.split(" ")
    if len(tokens) < 2 or not tokens[0] or not tokens[1]:
        raise InvalidEvent(dl.INVALID_NAME, f'name must be "entity action" (two space-separated words), got {name!r}')
    for key in _OBJECT_FIELDS:
        if key in event and type(event[key]) is not dict and not isinstance(event[key], dict):
            raise InvalidEvent(dl.INVALID_FIELD, f"{key} must be an object, got {_json_type(event[key])}")
    for key in _STRING_FIELDS:
        if key in event and type(event[key]) is not str and not isinstance(event[key], str):
            raise InvalidEvent(dl.INVALID_FIELD, f"{key} must be a string, got {_json_type(event[key])}")
    if "id" in event and not (isinstance(event["id"], str) and event["id"]):
        raise InvalidEvent(dl.INVALID_FIELD, f"id must be a non-empty string, got {_json_type(event['id'])}")
    if "timestamp" in event:
        if not _is_number(event["timestamp"]):
            raise InvalidEvent(
                dl.INVALID_FIELD,
                f"timestamp must be epoch milliseconds (a number), got {_json_type(event['timestamp'])}",
            )
        if not MIN_TIMESTAMP_MS <= event["timestamp"] <= MAX_TIMESTAMP_MS:
            raise InvalidEvent(dl.INVALID_FIELD, _timestamp_problem(event["timestamp"]))
    for key in _NUMBER_FIELDS:
        if key in event and not _is_number(event[key]):
            raise InvalidEvent(dl.INVALID_FIELD, f"{key} must be a number, got {_json_type(event[key])}")
    if "nested" in event:
        nested = event["nested"]
        if not isinstance(nested, list) or not all(isinstance(n, dict) for n in nested):
            raise InvalidEvent(dl.INVALID_FIELD, "nested must be a list of entity objects")
    if "consent" in event:
        consent = event["consent"]
        if not isinstance(consent, dict) or not all(isinstance(v, bool) for v in consent.values()):
            raise InvalidEvent(dl.INVALID_FIELD, "consent must be an object of booleans")
    return tokens[0], tokens[1]


def _timestamp_problem(timestamp: int | float) -> str:
    text = f"timestamp must be epoch milliseconds from 1970-01-01 to 9999-12-31, got {timestamp!r}"
    if 1e14 < timestamp < 1e17:
        return text + " (microseconds? divide by 1000)"
    if 1e17 <= timestamp < 1e20:
        return text + " (nanoseconds? divide by 1,000,000)"
    return text


def _brackets(text: bytes | bytearray | memoryview | str) -> int:
    if isinstance(text, str):
        return text.count("{") + text.count("[")
    raw = bytes(text) if isinstance(text, memoryview) else text
    return raw.count(b"{") + raw.count(b"[")


def _within_depth(container: dict | list, levels_below: int) -> bool:
    """Whether no object or list nests more than ``levels_below`` levels under ``container``.
    Recursive, but never deeper than the limit: it stops at the first container beyond it."""
    for child in container.values() if type(container) is dict else container:
        kind = type(child)
        if kind is dict or kind is list or isinstance(child, (dict, list)):
            if not levels_below or not _within_depth(child, levels_below - 1):
                return False
    return True


def derive_id(event: dict) -> str:
    """A stable id for an event that came without one: the same content gives the same id.

    16 lowercase hex characters, the shape of a walkerOS id. Two events with identical content
    and no id are taken to be one event sent twice, and share the id (and so the messageIds).
    """
    try:
        canonical = orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # e.g. integers beyond 64 bits from a non-JSON reader
        canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    kind = type(value)
    if kind is int or kind is float:
        return math.isfinite(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _given_id(item: dict) -> str | None:
    value = item.get("id")
    return value if isinstance(value, str) and value else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _dead(payload, reason: str, error: str, flow: str, event_id: str | None = None) -> DeadLetter:
    text, encoding = encode_payload(payload)
    return DeadLetter(
        payload=text,
        payload_encoding=encoding,
        stage=dl.PARSE,
        reason=reason,
        error=error,
        flow=flow,
        event_id=event_id,
    )
