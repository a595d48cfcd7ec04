"""Who an event is about, and whether their identify/group has changed (SPEC 4.1, 4.3).

The change detection is a pure function over a small state tuple, so the keyed stateful DoFn
(streaming), the sorted per-key pass (batch) and ``explain`` all share it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from transforms.mapping import UNDEFINED, compile_value
from transforms.paths import compile_getter, split_path


class Identity(NamedTuple):
    user_id: str | None
    anonymous_id: str | None

    @property
    def state_key(self) -> str | None:
        """The key of the per-user state: anonymousId, else userId (None: no identity)."""
        return self.anonymous_id or self.user_id


class IdentityResolver:
    def __init__(self, user_id_spec: Any, anonymous_id_spec: Any, settings_path: str, on_error=None):
        self._user_id = compile_value(user_id_spec, f"{settings_path}.userId", on_error)
        self._anonymous_id = compile_value(anonymous_id_spec, f"{settings_path}.anonymousId", on_error)
        # The usual settings ("user.id", "user.session") are plain paths: read them directly.
        self._read_user_id = _plain_path_reader(user_id_spec) or self._user_id
        self._read_anonymous_id = _plain_path_reader(anonymous_id_spec) or self._anonymous_id

    def resolve(self, event: dict, context: dict) -> Identity:
        return Identity(_non_empty_string(self._read_user_id(event, context)),
                        _non_empty_string(self._read_anonymous_id(event, context)))


def _plain_path_reader(spec: Any):
    """For a mapping value that is a path string without ``*``: a reader of that path that
    skips the mapping engine's evaluation context, or None for any other value.

    Only strings are used as ids, and the engine's property check passes every string, so the
    direct read gives the same id (a path with ``*`` makes a list, never an id, and keeps the
    general path anyway)."""
    if not isinstance(spec, str) or not spec:
        return None
    keys = split_path(spec)
    if "*" in keys:
        return None
    getter = compile_getter(keys)

    def read(event: Any, _context: Any) -> Any:
        return getter(event, UNDEFINED)
    return read


def _non_empty_string(value: Any) -> str | None:
    # walkerOS uses an id only when it is a non-empty string: numbers are not ids.
    return value if isinstance(value, str) and value else None


def canonical_json(value: Any) -> str:
    """Traits compared by content, not key order: ``{a,b}`` and ``{b,a}`` are the same traits."""
    if value is None or value is UNDEFINED:
        return ""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


# A signature is what identify/group are compared on: (id or "", canonical traits or "").
Signature = tuple[str, str]
_NOTHING_SENT: Signature = ("", "")


class IdentityState(NamedTuple):
    """What was last sent for one key. ``last_seen_ms`` is the event time of its last event."""
    identify: Signature = _NOTHING_SENT
    group: Signature | None = None
    last_seen_ms: int | None = None


def decide(state: IdentityState | None, timestamp_ms: int, identify: Signature | None,
           group: Signature | None, ttl_ms: int | None) -> tuple[bool, bool, IdentityState]:
    """Whether identify and group fire for this event, and the state after it.

    ``identify``/``group`` are the event's candidate signatures (None: no candidate). State
    older than ``ttl_ms`` (by event time) counts as gone, as if the expiry timer had cleared it,
    so batch, streaming and explain agree.
    """
    if state is None or (ttl_ms is not None and state.last_seen_ms is not None
                         and timestamp_ms - state.last_seen_ms > ttl_ms):
        state = IdentityState()
    fire_identify = identify is not None and identify != state.identify
    fire_group = group is not None and group != state.group
    last_seen = timestamp_ms if state.last_seen_ms is None else max(state.last_seen_ms, timestamp_ms)
    return fire_identify, fire_group, IdentityState(
        identify=identify if fire_identify else state.identify,
        group=group if fire_group else state.group,
        last_seen_ms=last_seen,
    )
