"""The wire form of Segment calls and the rule that cuts them into requests.

A message goes on the wire as segment-analytics-python's Client writes it (:func:`sdk_message`):
the fields it writes as null or ``{}`` when a call has none, ``context.library``, ids as strings,
the timestamp in the SDK's ISO form. :func:`encode_message` writes it once, measures it as the
SDK would and says why the SDK would refuse it; :class:`EventMessages` keeps that with the
event's messages. :class:`Batcher` cuts a sequence of them into requests (``flushAt`` calls,
under 2,500 messages and :data:`MAX_BATCH_BYTES`, an event's calls never split), the one rule
every sender and batching step applies.

Plain data, no Beam and no SDK import: the SDK's version comes from its installed metadata.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.metadata import version
from typing import Any, Generic, TypeVar

import orjson

SDK_VERSION = version("segment-analytics-python")
LIBRARY = {"name": "analytics-python", "version": SDK_VERSION}

MAX_MESSAGE_BYTES = 32 * 1024
# A request must stay under Segment's 500 KB. The SDK cuts its own batches only *after* passing
# 475,000 bytes (so it can build ~507 KB requests); keeping each batch at or below this, measured
# as the SDK serialises, leaves the SDK no reason to cut and the request well under 500 KB
# (plus ~2 bytes of separator a message and ~150 bytes of envelope).
MAX_BATCH_BYTES = 450_000
MAX_BATCH_MESSAGES = 2_500


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


def json_text_size(data: bytes) -> int:
    """``len(json.dumps(v))`` for the value ``v`` that orjson wrote as ``data``, or a little more.

    json.dumps adds a space after each separator (counted as every ',' and ':', those inside
    strings too), escapes each non-ASCII character as ``\\uXXXX`` (at most 4 bytes more than its
    UTF-8 for each byte it has beyond the first) and DEL as ``\\u007f``; orjson writes floats as
    Python does, longer (0.00001 for 1e-05), or one byte shorter (1e-9 for 1e-09: counted as
    every "e-").
    """
    size = (
        len(data) + data.count(b",") + data.count(b":") + 5 * data.count(b"\x7f") + data.count(b"e-")
    )  # orjson writes 1e-9 where Python writes 1e-09
    if not data.isascii():
        size += 4 * (len(data) - len(data.decode()))
    return size


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


# -- the message as the SDK Client builds it ---------------------------------------------------------
# The fields the Client writes for each call type when the call has none (null or {}).
_CLIENT_FIELDS: dict[str, dict[str, Any]] = {
    "track": {"integrations": {}, "anonymousId": None, "properties": {}, "context": {}, "userId": None},
    "identify": {"integrations": {}, "context": {}, "anonymousId": None, "userId": None, "traits": {}},
    "group": {"integrations": {}, "context": {}, "userId": None, "anonymousId": None, "traits": {}},
    "page": {
        "integrations": {},
        "properties": {},
        "category": None,
        "context": {},
        "userId": None,
        "anonymousId": None,
        "name": None,
    },
}
_CLIENT_FIELDS["screen"] = _CLIENT_FIELDS["page"]
_COMMON_FIELDS: dict[str, Any] = {"integrations": {}, "context": {}, "anonymousId": None, "userId": None}
# What format_timestamp writes, which is what the SDK writes for an aware UTC datetime.
_TIMESTAMP_CHARS = len("2026-01-01T00:00:00.000+00:00")


def sdk_message(message: dict) -> dict:
    """``message`` as segment-analytics-python's Client puts it on the wire: the fields it writes
    as null or ``{}`` when a call has none, ``context.library``, ids as strings, the timestamp
    in its ISO form. The caller's dicts are not changed (``context`` is copied, nothing else)."""
    out = {**_CLIENT_FIELDS.get(message.get("type", ""), _COMMON_FIELDS), **message}
    context = message.get("context")
    out["context"] = (
        {**context, "library": LIBRARY}
        if isinstance(context, dict)
        else ({"library": LIBRARY} if context is None else context)
    )
    for name in _OBJECT_FIELDS:
        if name in message and message[name] is None:
            out[name] = {}
    for name in _ID_FIELDS:
        value = out[name] if name in out else None
        if value is not None and type(value) is not str:
            out[name] = str(value)  # the SDK's stringify_id
    timestamp = out.get("timestamp")
    if isinstance(timestamp, str) and len(timestamp) != _TIMESTAMP_CHARS:
        out["timestamp"] = _sdk_timestamp(timestamp)
    return out


_OBJECT_FIELDS = ("properties", "traits", "integrations")
_ID_FIELDS = ("userId", "anonymousId", "messageId")


def _sdk_timestamp(text: str) -> str:
    """An ISO timestamp in the SDK's form (milliseconds, an offset; naive is UTC); unchanged when
    it is not one (:func:`call_problem` refuses it)."""
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.isoformat(timespec="milliseconds")


_ID_TYPES = (str, int, float)


def call_problem(message: dict) -> str | None:
    """Why the SDK Client would refuse this call (its ``require`` checks), or None."""
    kind = message.get("type")
    user_id, anonymous_id = message.get("userId"), message.get("anonymousId")
    if not ((user_id and isinstance(user_id, _ID_TYPES)) or (anonymous_id and isinstance(anonymous_id, _ID_TYPES))):
        return f"a {kind} call needs a userId or anonymousId (string or number)"
    timestamp = message.get("timestamp")
    if not isinstance(timestamp, str) or not _is_iso(timestamp):
        return f"a {kind} call needs an ISO 8601 timestamp, got {timestamp!r}"
    for name in ("context", "integrations", "properties", "traits"):
        if message.get(name) is not None and not isinstance(message[name], dict):
            return f"{name} of a {kind} call must be an object"
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        return f"a {kind} call has no messageId"
    if kind == "track":
        return None if isinstance(message.get("event"), str) else "a track call needs an event name (string)"
    if kind == "identify":
        return None
    if kind == "group":
        group_id = message.get("groupId")
        if not isinstance(group_id, _ID_TYPES) or group_id in ("", None):
            return "a group call needs a groupId (string or number)"
        return None
    if kind in ("page", "screen"):
        for name in ("name", "category"):
            if message.get(name) and not isinstance(message[name], str):
                return f"{name} of a {kind} call must be a string"
        return None
    return f"unknown call type {kind!r}"


def _is_iso(text: str) -> bool:
    if len(text) == _TIMESTAMP_CHARS and text[10] == "T" and text[-6:] == "+00:00":
        return True  # format_timestamp's form, the usual case: no parsing per message
    try:
        _dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


# -- one event's messages, as they travel from planning to sending ------------------------------
@dataclass(slots=True)
class EventMessages:
    """The messages of one event, which travel together and are delivered or fail together."""

    event: dict  # normalised event: the dead-letter payload
    messages: list[dict]
    size: int = 0  # the messages' size on the wire (0 = not measured yet)
    # The messages' wire form, their sizes and the first call the SDK would refuse, worked out
    # once when the batch is cut and kept for sending (not pickled: it would double what a
    # EventMessages costs in Beam state).
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
            return wire, sizes, problem
        assert self.sizes is not None  # set with the wire form
        return self.wire, self.sizes, self.problem

    def __getstate__(self):
        return self.event, self.messages, self.size

    def __setstate__(self, state):
        self.event, self.messages, self.size = state
        self.wire = self.sizes = self.problem = None


# -- cutting requests ------------------------------------------------------------------------------
T = TypeVar("T")


def exceeds_request_limits(calls: int, size: int, add_calls: int, add_size: int) -> bool:
    """Whether adding ``add_calls`` messages of ``add_size`` bytes to a request of ``calls``
    messages and ``size`` bytes would pass one of Segment's request limits."""
    return calls + add_calls > MAX_BATCH_MESSAGES or size + add_size > MAX_BATCH_BYTES


def clamped_flush_at(flush_at: int) -> int:
    """``flushAt`` as a batch can hold it: at least 1, at most a request's 2,500 messages."""
    return max(1, min(int(flush_at), MAX_BATCH_MESSAGES))


class Batcher(Generic[T]):
    """Cuts a sequence of items (each an event's messages, counted and measured by the caller)
    into batches: ``flush_at`` calls, cut before a request limit would pass, an item never
    split. The rule every batching step applies (the state-kept batches of streaming keep
    their running totals in Beam state and ask :func:`exceeds_request_limits` the same)."""

    def __init__(self, flush_at: int = MAX_BATCH_MESSAGES):
        self.flush_at = clamped_flush_at(flush_at)
        self._batch: list[T] = []
        self._calls = self._size = 0

    def add(self, item: T, calls: int, size: int) -> list[list[T]]:
        """The batches that ``item`` completes (none, one, or two)."""
        done = []
        if self._batch and exceeds_request_limits(self._calls, self._size, calls, size):
            done.append(self.take())
        self._batch.append(item)
        self._calls, self._size = self._calls + calls, self._size + size
        if self._calls >= self.flush_at:
            done.append(self.take())
        return done

    def take(self) -> list[T]:
        """The batch so far (maybe partial, maybe empty), and start a new one."""
        batch = self._batch
        self._batch, self._calls, self._size = [], 0, 0
        return batch


def split_batches(deliveries: Iterable[EventMessages], flush_at: int) -> Iterator[list[EventMessages]]:
    """Batches as the senders cut them, for a known sequence."""
    batcher: Batcher[EventMessages] = Batcher(flush_at)
    for delivery in deliveries:
        yield from batcher.add(delivery, len(delivery.messages), delivery.measure())
    rest = batcher.take()
    if rest:
        yield rest
