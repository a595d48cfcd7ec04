"""Event + rule + settings → the Segment calls for one event (SPEC 4.2, 4.5).

A message here is the Segment message as it goes into the ``/v1/batch`` body, minus what the
SDK adds while sending (``context.library``, ``sentAt``) and minus fields that would be null.
identify and group are built as *candidates*: whether they are sent depends on the per-user
state (``decide.identity.decide``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any, NamedTuple

from decide.identity import EpochMs, Identity, Signature, canonical_json, state_key
from decide.mapping import CompiledRule, CompiledValue, compile_value

CALL_ORDER = ("identify", "group", "page", "screen", "track")
MESSAGE_ID_MAX = 100
_LONGEST_CALL_TYPE = max(len(t) for t in CALL_ORDER)
_NO_SETTINGS: dict = {}
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class EventCalls:
    """One event's calls before identify/group deduplication; what AssignIdentity emits.
    A plain class, not a NamedTuple: compiled, it is an extension type (calls.pxd), one made for
    every event."""

    __slots__ = (
        "event",
        "key",
        "timestamp_ms",
        "identify",
        "identify_signature",
        "group",
        "group_signature",
        "others",
    )

    def __init__(
        self,
        event: dict,
        key: str,
        timestamp_ms: EpochMs,
        identify: dict | None = None,
        identify_signature: Signature | None = None,
        group: dict | None = None,
        group_signature: Signature | None = None,
        others: list[dict] | tuple = (),
    ):
        self.event = event  # the normalised event as received (the dead-letter payload: it replays)
        self.key = key  # the per-user state key
        self.timestamp_ms = timestamp_ms
        self.identify = identify  # candidate message
        self.identify_signature = identify_signature
        self.group = group
        self.group_signature = group_signature
        self.others = others  # page, screen, track in that order

    def messages(self, *, identify: bool, group: bool) -> list[dict]:
        """The event's messages in order, with its identify and group where they fire."""
        out = []
        if identify and self.identify is not None:
            out.append(self.identify)
        if group and self.group is not None:
            out.append(self.group)
        out.extend(self.others)
        return out

    def __eq__(self, other: object) -> bool:
        return type(other) is EventCalls and _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return (
            "EventCalls(" + ", ".join(f"{name}={value!r}" for name, value in zip(self.__slots__, _fields(self))) + ")"
        )


def _fields(calls: Any) -> tuple:
    return (
        calls.event,
        calls.key,
        calls.timestamp_ms,
        calls.identify,
        calls.identify_signature,
        calls.group,
        calls.group_signature,
        calls.others,
    )


class _CallPlan(NamedTuple):
    """What a rule's settings make of an event's calls."""

    identify: Any  # the identify value's function, or None
    group: Any  # the group value's function, or None
    page_likes: tuple[tuple[str, Any], ...]  # (page or screen, True or its value's function)
    track: bool  # whether the event's own track call is sent


def timestamp_datetime(timestamp_ms: int | float) -> _dt.datetime:
    """Epoch milliseconds → aware UTC datetime, exact to the millisecond (no float drift)."""
    return _EPOCH + _dt.timedelta(milliseconds=int(timestamp_ms))


_DAY_MS = 86_400_000
_DATES: dict[int, str] = {}  # day since the epoch -> "YYYY-MM-DD"; events come from few days
_DATES_MAX = 4096
# minute since the epoch -> "YYYY-MM-DDTHH:MM:". A backfill interleaves many users' events, so
# the seconds of neighbouring events differ (100k events of a 6-hour day: 21,000 seconds), but
# their minutes repeat (351): only the second and the millisecond are formatted per event.
_MINUTES: dict[int, str] = {}
_MINUTES_MAX = 4096


def format_timestamp(timestamp_ms: int | float) -> str:
    """As the SDK writes it: ISO 8601, UTC offset, milliseconds.

    The same text as ``timestamp_datetime(ms).isoformat(timespec="milliseconds")`` (and an
    OverflowError for a date out of range), built without a datetime per call: the date and time
    of each minute are formatted once. It runs once per event (compiled, its arithmetic is on C
    integers and the text is joined once).
    """
    ms = int(timestamp_ms)
    minute = ms // 60_000
    millis_of_minute = ms - minute * 60_000
    prefix = _MINUTES.get(minute)
    if prefix is None:
        prefix = _minute_prefix(minute)
    second = millis_of_minute // 1000
    millis = millis_of_minute - second * 1000
    return f"{prefix}{second:02d}.{millis:03d}+00:00"


def _minute_prefix(minute: int) -> str:
    day, minute_of_day = divmod(minute, 1440)
    date = _DATES.get(day)
    if date is None:
        date = timestamp_datetime(day * _DAY_MS).date().isoformat()
        if len(_DATES) >= _DATES_MAX:
            _DATES.clear()
        _DATES[day] = date
    hour, minute_of_hour = divmod(minute_of_day, 60)
    prefix = f"{date}T{hour:02d}:{minute_of_hour:02d}:"
    if len(_MINUTES) >= _MINUTES_MAX:
        _MINUTES.clear()
    _MINUTES[minute] = prefix
    return prefix


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
    return f"{namespace[: MESSAGE_ID_MAX - len(call_type) - 42]}:{digest}:{call_type}"


class CallBuilder:
    """Compiled once from the destination settings; builds the calls of each event."""

    def __init__(
        self,
        identify_spec: Any,
        group_spec: Any,
        integrations: dict | None,
        namespace: str,
        settings_path: str,
        on_error=None,
        functions=None,
    ):
        self._arguments = (identify_spec, group_spec, integrations, namespace, settings_path, on_error, functions)
        self._identify = (
            None
            if identify_spec is None
            else compile_value(identify_spec, f"{settings_path}.identify", on_error, functions)
        )
        self._group = (
            None if group_spec is None else compile_value(group_spec, f"{settings_path}.group", on_error, functions)
        )
        self._integrations = integrations or None
        self._namespace = namespace
        # What each rule's settings make of the calls, worked out on the rule's first event.
        self._plans: dict[CompiledRule | None, _CallPlan] = {}

    def __reduce__(self) -> tuple:
        # Compiled again where it is unpickled: compiled values hold closures, and the plans
        # are only a cache.
        return (CallBuilder, self._arguments)

    def build(
        self,
        event: dict,
        rule: CompiledRule | None,
        data: Any,
        identity: Identity,
        consent_context: dict | None,
        context: dict,
        received: dict,
    ) -> EventCalls:
        """``consent_context``: the messages' ``context`` for the event's consent (shared,
        read-only), or None; ``received``: the normalised event ``event`` was mapped from, which
        the calls carry for dead letters."""
        identify_value, group_value, page_likes, track = self._plan_for(rule)
        timestamp_ms = int(event["timestamp"])
        user_id, anonymous_id = identity
        # The fields every call shares; each message starts as a copy ("type" is first in
        # every message, so it has its place here and each copy fills it in).
        common: dict[str, Any] = {"type": None}
        if user_id:
            common["userId"] = user_id
        if anonymous_id:
            common["anonymousId"] = anonymous_id
        common["timestamp"] = format_timestamp(timestamp_ms)
        if consent_context is not None:
            common["context"] = consent_context
        if self._integrations:
            common["integrations"] = self._integrations
        event_id = event["id"]
        # "<namespace>:<event id>:" once per event; a messageId too long falls back to the digest form
        prefix = f"{self._namespace}:{event_id}:"
        long_ids = len(prefix) + _LONGEST_CALL_TYPE > MESSAGE_ID_MAX

        identify = identify_signature = None
        if identify_value is not None:
            candidate = _identify_candidate(identify_value, event, context, user_id)
            if candidate is not None:
                effective, traits = candidate
                identify = common.copy()
                identify["type"] = "identify"
                identify["traits"] = traits or {}
                if effective:
                    identify["userId"] = effective
                identify["messageId"] = self._message_id(event_id, "identify") if long_ids else prefix + "identify"
                identify_signature = _identify_signature(candidate)

        group = group_signature = None
        if group_value is not None:
            candidate = _group_candidate(group_value, event, context)
            if candidate is not None:
                group_id, traits = candidate
                group = common.copy()
                group["type"] = "group"
                group["groupId"] = group_id
                group["traits"] = traits or {}
                group["messageId"] = self._message_id(event_id, "group") if long_ids else prefix + "group"
                group_signature = _group_signature(candidate)

        others = []
        for call_type, setting in page_likes:
            message = self._page_like(call_type, setting, event, context, common)
            if message is not None:
                message["messageId"] = self._message_id(event_id, call_type) if long_ids else prefix + call_type
                others.append(message)

        if track:
            message = common.copy()
            message["type"] = "track"
            message["event"] = event["name"]
            message["properties"] = data if isinstance(data, dict) else {}
            message["messageId"] = self._message_id(event_id, "track") if long_ids else prefix + "track"
            others.append(message)
        return EventCalls(
            received,
            state_key(user_id, anonymous_id),
            timestamp_ms,
            identify,
            identify_signature,
            group,
            group_signature,
            others,
        )

    def signatures(
        self, event: dict, rule: CompiledRule | None, identity: Identity, context: dict
    ) -> tuple[Signature | None, Signature | None]:
        """Only the identify and group signatures :meth:`build` would give the event, without
        building any message: what batch deduplication decides on."""
        plan = self._plan_for(rule)
        identify_signature = group_signature = None
        if plan.identify is not None:
            candidate = _identify_candidate(plan.identify, event, context, identity[0])
            if candidate is not None:
                identify_signature = _identify_signature(candidate)
        if plan.group is not None:
            candidate = _group_candidate(plan.group, event, context)
            if candidate is not None:
                group_signature = _group_signature(candidate)
        return identify_signature, group_signature

    def _plan_for(self, rule: CompiledRule | None) -> _CallPlan:
        plan = self._plans.get(rule)
        if plan is None:
            plan = self._plans[rule] = self._plan(rule)
        return plan

    def _plan(self, rule: CompiledRule | None) -> _CallPlan:
        """A rule's settings override the destination's identify and group (a literal null or
        boolean there means none); page and screen come from the rule only."""
        settings = rule.settings if rule is not None else _NO_SETTINGS
        page_likes = tuple(
            (call_type, True if settings[call_type] is True else _evaluator(settings[call_type]))
            for call_type in ("page", "screen")
            if settings.get(call_type) is not None and settings[call_type] is not False
        )
        return _CallPlan(
            _evaluator(settings.get("identify", self._identify)),
            _evaluator(settings.get("group", self._group)),
            page_likes,
            rule is None or not rule.silent,
        )

    def _page_like(self, call_type: str, setting: Any, event: dict, context: dict, common: dict) -> dict | None:
        """``setting`` is True or the function of the configured value."""
        message = common.copy()
        message["type"] = call_type
        if setting is True:
            message["properties"] = {}
            return message
        resolved = setting(event, context)
        if not isinstance(resolved, dict):
            return None
        for key in ("category", "name"):
            if isinstance(resolved.get(key), str):
                message[key] = resolved[key]
        properties = resolved.get("properties")
        message["properties"] = properties if isinstance(properties, dict) else {}
        return message

    def _message_id(self, event_id: str, call_type: str) -> str:
        return make_message_id(self._namespace, event_id, call_type)


def _identify_candidate(identify_value, event: dict, context: dict, user_id: str | None):
    """(the userId it is sent as, its traits or None), or None when the value gives no identify."""
    resolved = identify_value(event, context)
    if not isinstance(resolved, dict):
        return None
    override = resolved.get("userId")
    traits = resolved.get("traits")
    return (
        override if isinstance(override, str) and override else user_id,
        traits if isinstance(traits, dict) else None,
    )


def _group_candidate(group_value, event: dict, context: dict):
    """(groupId, its traits or None), or None when the value gives no group."""
    resolved = group_value(event, context)
    if not isinstance(resolved, dict):
        return None
    group_id = resolved.get("groupId")
    if not isinstance(group_id, str) or not group_id:
        return None
    traits = resolved.get("traits")
    return group_id, traits if isinstance(traits, dict) else None


def _identify_signature(candidate: tuple) -> Signature:
    """What identify deduplication compares: the userId it is sent as, and its traits."""
    return candidate[0] or "", canonical_json(candidate[1])


def _group_signature(candidate: tuple) -> Signature:
    """What group deduplication compares: the groupId and its traits."""
    return candidate[0], canonical_json(candidate[1])


def _evaluator(value: Any) -> Any:
    """The function to run for a setting, or None when it never yields a call."""
    if value is None or isinstance(value, bool):
        return None
    return value.evaluator() if isinstance(value, CompiledValue) else value
