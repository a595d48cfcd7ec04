"""Consent: the gate (required consent) and the forwarding to Segment's categoryPreferences."""

from __future__ import annotations


def required_keys(required: dict | None) -> tuple[str, ...]:
    """The keys a requirement such as ``{"analytics": true}`` asks for (worked out once)."""
    return tuple(key for key, needed in (required or {}).items() if needed)


def any_granted(keys: tuple, state: dict) -> bool:
    """walkerOS semantics: no required key passes; otherwise any one granted passes."""
    if not keys:
        return True
    for key in keys:
        if state.get(key) is True:
            return True
    return False


def is_granted(required: dict | None, state: dict) -> bool:
    return any_granted(required_keys(required), state)


def category_preferences(consent_map: dict | None, state: dict) -> dict | None:
    """``{segmentKey: bool}`` for every mapped walkerOS key present in the event's consent.

    Unlike walkerOS (which only ever sees granted keys), an explicit ``false`` is forwarded:
    Segment reads it as "not consented", which is what the event says.
    """
    if not consent_map:
        return None
    prefs = {}
    # A plain loop: a comprehension costs more, and this runs for every event.
    for walker_key, segment_key in consent_map.items():
        if walker_key in state:
            prefs[segment_key] = state[walker_key] is True
    return prefs or None


class ConsentContexts:
    """The ``context`` of an event's messages for its consent state: ``{"consent":
    {"categoryPreferences": ...}}``, or None when no mapped key is present.

    Built once per distinct state and shared by every message that has it, read-only, as the
    flow's ``integrations`` are (the wire form copies ``context`` to add the library). Events
    carry a handful of consent states, and this runs for every event."""

    _MAX = 1024

    def __init__(self, consent_map: dict):
        self._consent_map = consent_map
        self._keys = tuple(consent_map)  # the only keys of a state the context depends on
        self._made: dict[int, dict | None] = {}

    def context_for(self, state: dict) -> dict | None:
        # A state is known by each mapped key being absent, true or anything else, numbered
        # in base 3: no tuple of the state's items to build and hash for every event.
        code = 0
        for key in self._keys:
            value = state.get(key, _ABSENT)
            code = code * 3 + (0 if value is _ABSENT else 1 if value is True else 2)
        try:
            return self._made[code]
        except KeyError:
            pass
        if len(self._made) >= self._MAX:
            self._made.clear()  # a map of many keys: keep the memory bounded
        made = self._made[code] = self._context(state)
        return made

    def _context(self, state: dict) -> dict | None:
        preferences = category_preferences(self._consent_map, state)
        return {"consent": {"categoryPreferences": preferences}} if preferences else None


_ABSENT = object()
