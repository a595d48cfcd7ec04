"""Event + rule + settings → the Segment calls for one event (SPEC 4.2, 4.5).

A message here is the Segment message as it goes into the ``/v1/batch`` body, minus what the
SDK adds while sending (``context.library``, ``sentAt``) and minus fields that would be null.
identify and group are built as *candidates*: whether they are sent depends on the per-user
state (``transforms.identity.decide``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from transforms.identity import Identity, Signature, canonical_json
from transforms.mapping import UNDEFINED, CompiledRule, compile_value

CALL_ORDER = ("identify", "group", "page", "screen", "track")
MESSAGE_ID_MAX = 100
_LONGEST_CALL_TYPE = max(len(t) for t in CALL_ORDER)
_NO_SETTINGS: dict = {}
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


@dataclass(slots=True)
class EventCalls:
    """One event's calls before identify/group deduplication; what AssignIdentity emits."""
    event: dict                      # the normalised event (the dead-letter payload: it replays)
    key: str                         # the per-user state key
    timestamp_ms: int
    identify: dict | None = None     # candidate message
    identify_signature: Signature | None = None
    group: dict | None = None
    group_signature: Signature | None = None
    others: list[dict] = field(default_factory=list)   # page, screen, track in that order

    def messages(self, fire_identify: bool, fire_group: bool) -> list[dict]:
        out = []
        if fire_identify and self.identify is not None:
            out.append(self.identify)
        if fire_group and self.group is not None:
            out.append(self.group)
        out.extend(self.others)
        return out


def timestamp_datetime(timestamp_ms: int | float) -> _dt.datetime:
    """Epoch milliseconds → aware UTC datetime, exact to the millisecond (no float drift)."""
    return _EPOCH + _dt.timedelta(milliseconds=int(timestamp_ms))


_DAY_MS = 86_400_000
_DATES: dict[int, str] = {}   # day since the epoch -> "YYYY-MM-DD"; events come from few days
_DATES_MAX = 4096


def format_timestamp(timestamp_ms: int | float) -> str:
    """As the SDK writes it: ISO 8601, UTC offset, milliseconds.

    The same text as ``timestamp_datetime(ms).isoformat(timespec="milliseconds")`` (and the same
    error for a date out of range), built without a datetime per call: the date of each day is
    formatted once, the time of day by arithmetic. It runs once per event.
    """
    ms = int(timestamp_ms)
    day, rest = divmod(ms, _DAY_MS)
    date = _DATES.get(day)
    if date is None:
        date = timestamp_datetime(day * _DAY_MS).date().isoformat()
        if len(_DATES) >= _DATES_MAX:
            _DATES.clear()
        _DATES[day] = date
    seconds, millis = divmod(rest, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{date}T{hour:02d}:{minute:02d}:{second:02d}.{millis:03d}+00:00"


def make_message_id(namespace: str, event_id: str, call_type: str) -> str:
    """Deterministic, namespaced, per call type, at most 100 characters.

    Segment deduplicates on messageId across every source it receives, so the namespace keeps
    ours apart from everyone else's; the same event and call type always give the same id, so
    Segment absorbs every resend (bundle retries, SDK retries, replays, re-run backfills).
    """
    plain = f"{namespace}:{event_id}:{call_type}"
    if len(plain) <= MESSAGE_ID_MAX:
        return plain
    digest = hashlib.sha256(f"{namespace}\x00{event_id}".encode()).hexdigest()[:40]
    return f"{namespace[:MESSAGE_ID_MAX - len(call_type) - 42]}:{digest}:{call_type}"


class CallBuilder:
    """Compiled once from the destination settings; builds the calls of each event."""

    def __init__(self, identify_spec: Any, group_spec: Any, integrations: dict | None,
                 namespace: str, settings_path: str, on_error=None):
        self._identify = None if identify_spec is None else \
            compile_value(identify_spec, f"{settings_path}.identify", on_error)
        self._group = None if group_spec is None else compile_value(group_spec, f"{settings_path}.group", on_error)
        self._integrations = integrations or None
        self._namespace = namespace

    def build(self, event: dict, rule: CompiledRule | None, data: Any, identity: Identity,
              preferences: dict | None, context: dict) -> EventCalls:
        timestamp_ms = int(event["timestamp"])
        common = _common_fields(identity, format_timestamp(timestamp_ms), preferences, self._integrations)
        event_id = event["id"]
        # "<namespace>:<event id>:" once per event; a messageId too long falls back to the digest form
        prefix = f"{self._namespace}:{event_id}:"
        long_ids = len(prefix) + _LONGEST_CALL_TYPE > MESSAGE_ID_MAX
        rule_settings = rule.settings if rule is not None else _NO_SETTINGS
        calls = EventCalls(event=event, key=identity.state_key, timestamp_ms=timestamp_ms)

        identify_value = rule_settings.get("identify", self._identify)
        resolved = _resolve(identify_value, event, context)
        if isinstance(resolved, dict):
            override = resolved.get("userId")
            effective = override if isinstance(override, str) and override else identity.user_id
            traits = resolved.get("traits")
            traits = traits if isinstance(traits, dict) else None
            message = {"type": "identify", **common, "traits": traits or {}}
            if effective:
                message["userId"] = effective
            message["messageId"] = self._message_id(event_id, "identify") if long_ids else prefix + "identify"
            calls.identify = message
            calls.identify_signature = (effective or "", canonical_json(traits))

        group_value = rule_settings.get("group", self._group)
        resolved = _resolve(group_value, event, context)
        if isinstance(resolved, dict) and isinstance(resolved.get("groupId"), str) and resolved["groupId"]:
            traits = resolved.get("traits")
            traits = traits if isinstance(traits, dict) else None
            message = {"type": "group", **common, "groupId": resolved["groupId"], "traits": traits or {}}
            message["messageId"] = self._message_id(event_id, "group") if long_ids else prefix + "group"
            calls.group = message
            calls.group_signature = (resolved["groupId"], canonical_json(traits))

        others = calls.others
        if rule_settings:
            for call_type in ("page", "screen"):
                setting = rule_settings.get(call_type)
                if setting is None or setting is False:
                    continue
                message = self._page_like(call_type, setting, event, context, common)
                if message is not None:
                    message["messageId"] = (self._message_id(event_id, call_type) if long_ids
                                            else prefix + call_type)
                    others.append(message)

        if rule is None or not rule.silent:
            properties = data if isinstance(data, dict) else {}
            message = {"type": "track", **common, "event": event["name"], "properties": properties}
            message["messageId"] = self._message_id(event_id, "track") if long_ids else prefix + "track"
            others.append(message)
        return calls

    def _page_like(self, call_type: str, setting: Any, event: dict, context: dict, common: dict) -> dict | None:
        if setting is None or setting is False:
            return None
        if setting is True:
            return {"type": call_type, **common, "properties": {}}
        resolved = _resolve(setting, event, context)
        if not isinstance(resolved, dict):
            return None
        message = {"type": call_type, **common}
        for key in ("category", "name"):
            if isinstance(resolved.get(key), str):
                message[key] = resolved[key]
        properties = resolved.get("properties")
        message["properties"] = properties if isinstance(properties, dict) else {}
        return message

    def _message_id(self, event_id: str, call_type: str) -> str:
        return make_message_id(self._namespace, event_id, call_type)


def _resolve(value: Any, event: dict, context: dict) -> Any:
    if value is None or isinstance(value, bool):
        return UNDEFINED
    return value(event, context)


def _common_fields(identity: Identity, timestamp: str, preferences: dict | None, integrations: dict | None) -> dict:
    common: dict[str, Any] = {}
    if identity.user_id:
        common["userId"] = identity.user_id
    if identity.anonymous_id:
        common["anonymousId"] = identity.anonymous_id
    common["timestamp"] = timestamp
    if preferences:
        common["context"] = {"consent": {"categoryPreferences": preferences}}
    if integrations:
        common["integrations"] = integrations
    return common


def strip_sdk_fields(wire_message: dict) -> dict:
    """A message as received by Segment, reduced to our form: no nulls, no SDK-added fields.

    The SDK writes absent ids, names and categories as null, adds ``context.library``,
    ``sentAt`` and an empty ``integrations``; dropping exactly those gives back what
    ``explain`` prints, so the two can be compared for equality.
    """
    out = {k: v for k, v in wire_message.items() if v is not None and k != "sentAt"}
    context = {k: v for k, v in (out.get("context") or {}).items() if k != "library"}
    if context:
        out["context"] = context
    else:
        out.pop("context", None)
    if not out.get("integrations"):
        out.pop("integrations", None)
    return out
