"""Who an event is about, and whether their identify/group has changed (SPEC 4.1, 4.3).

The change detection is a pure function over a small state tuple, so the keyed stateful DoFn
(streaming), the sorted per-key pass (batch) and ``explain`` all share it.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

from decide.mapping import UNDEFINED, compile_value
from decide.paths import compile_checked_getter, split_path


def state_key(user_id: Any, anonymous_id: Any) -> Any:
    """The key of a user's state: anonymousId, else userId (None: no identity)."""
    return anonymous_id or user_id


def state_key_of_messages(messages: list[dict]) -> Any:
    """The state key named by an event's messages (they all name the same user)."""
    first = messages[0] if messages else {}
    return state_key(first.get("userId"), first.get("anonymousId"))


# (userId, anonymousId), each a non-empty string or None. A plain tuple: one is made for every
# event, and a tuple subclass costs several times as much to make and to read.
Identity = tuple[str | None, str | None]


class IdentityResolver:
    def __init__(self, user_id_spec: Any, anonymous_id_spec: Any, settings_path: str, on_error=None, functions=None):
        self._user_id = compile_value(user_id_spec, f"{settings_path}.userId", on_error, functions)
        self._anonymous_id = compile_value(anonymous_id_spec, f"{settings_path}.anonymousId", on_error, functions)
        # The usual settings ("user.id", "user.session") are plain paths: read them directly.
        self._read_user_id = _plain_path_reader(user_id_spec) or self._user_id
        self._read_anonymous_id = _plain_path_reader(anonymous_id_spec) or self._anonymous_id
        # Both ids from one section ("user.id" and "user.session", the usual settings): read
        # straight from it when it is an object, the same answer as the two readers give.
        self._one_section = _one_section(user_id_spec, anonymous_id_spec)

    def resolve(self, event: dict, context: dict) -> Identity:
        if self._one_section is not None:
            section_key, user_key, anonymous_key = self._one_section
            section = event.get(section_key) if type(event) is dict else None
            if type(section) is dict:
                user_id = section.get(user_key)
                anonymous_id = section.get(anonymous_key)
                # The plain readers pass exact strings only (a str subclass is no JSON value).
                return (
                    user_id if type(user_id) is str and user_id else None,
                    anonymous_id if type(anonymous_id) is str and anonymous_id else None,
                )
        return self._resolve(event, context)

    def _resolve(self, event: dict, context: dict) -> Identity:
        user_id = self._read_user_id(event, context)
        anonymous_id = self._read_anonymous_id(event, context)
        # walkerOS uses an id only when it is a non-empty string: numbers are not ids.
        return (
            user_id if isinstance(user_id, str) and user_id else None,
            anonymous_id if isinstance(anonymous_id, str) and anonymous_id else None,
        )


def _plain_path_reader(spec: Any):
    """For a mapping value that is a path string without ``*``: a reader of that path that
    skips the mapping engine's evaluation context, or None for any other value.

    Only strings are used as ids, and the engine's property check passes every string, so the
    direct read gives the same id (a path with ``*`` makes a list, never an id, and keeps the
    general path anyway). Whatever else it finds it may turn into undefined: not an id either."""
    if not isinstance(spec, str) or not spec:
        return None
    keys = split_path(spec)
    if "*" in keys:
        return None
    return compile_checked_getter(keys, _never, UNDEFINED, UNDEFINED)


def _one_section(user_id_spec: Any, anonymous_id_spec: Any) -> tuple[str, str, str] | None:
    """(section, user id key, anonymous id key) when both settings are plain two-key paths
    into the same section, else None."""
    if not (_plain_path_reader(user_id_spec) and _plain_path_reader(anonymous_id_spec)):
        return None
    user_keys, anonymous_keys = split_path(user_id_spec), split_path(anonymous_id_spec)
    if len(user_keys) != 2 or len(anonymous_keys) != 2 or user_keys[0] != anonymous_keys[0]:
        return None
    return user_keys[0], user_keys[1], anonymous_keys[1]


def _never(_value: Any) -> bool:
    return False


def canonical_json(value: Any) -> str:
    """Traits compared by content, not key order: ``{a,b}`` and ``{b,a}`` are the same traits."""
    if value is None or value is UNDEFINED:
        return ""
    return _dumps(value, option=_SORT_KEYS).decode()


_dumps, _SORT_KEYS = orjson.dumps, orjson.OPT_SORT_KEYS  # looked up once, not per signature


# Named ints, for the reader and for mypy; compiled, an argument annotated `int` would have to be
# an exact int, which a .pxd cannot declare as a plain object.
EpochMs = int  # milliseconds since 1970-01-01 UTC
Millis = int  # a duration in milliseconds

# A signature is what identify/group are compared on: (id or "", canonical traits or "").
Signature = tuple[str, str]
_NOTHING_SENT: Signature = ("", "")


# What was last sent for one key: (identify signature, group signature or None, event time of
# its last event or None). A plain tuple, made for every event, as Identity.
IdentityState = tuple[Signature, Signature | None, int | None]


def decide(
    state: IdentityState | None,
    timestamp_ms: EpochMs,
    identify: Signature | None,
    group: Signature | None,
    ttl_ms: Millis | None,
) -> tuple[bool, bool, IdentityState]:
    """Whether identify and group fire for this event, and the state after it.

    ``identify``/``group`` are the event's candidate signatures (None: no candidate). State
    older than ``ttl_ms`` (by event time) counts as gone, as if the expiry timer had cleared it,
    so batch, streaming and explain agree.
    """
    if state is None:
        sent_identify, sent_group, last_seen_ms = _NOTHING_SENT, None, None
    else:
        sent_identify, sent_group, last_seen_ms = state
        if ttl_ms is not None and last_seen_ms is not None and timestamp_ms - last_seen_ms > ttl_ms:
            sent_identify, sent_group, last_seen_ms = _NOTHING_SENT, None, None
    fire_identify = fire_group = False
    if identify is not None and identify != sent_identify:
        fire_identify, sent_identify = True, identify
    if group is not None and group != sent_group:
        fire_group, sent_group = True, group
    last_seen_ms = timestamp_ms if last_seen_ms is None else max(last_seen_ms, timestamp_ms)
    return fire_identify, fire_group, (sent_identify, sent_group, last_seen_ms)


def digest64(text: str) -> int:
    """64 bits of BLAKE2b: stable across processes and machines (``hash()`` is not)."""
    return int.from_bytes(blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def event_digest(key: str, event_id) -> int:
    """Who and which event: not its time, which is the read's clock for an event without one.
    Batch deduplication (and explain, to agree with it) orders a user's events of one
    millisecond by it."""
    key = str(key)
    return digest64(f"{len(key)}:{key}{event_id}")
