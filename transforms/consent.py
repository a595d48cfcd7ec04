"""Consent: the gate (required consent) and the forwarding to Segment's categoryPreferences."""
from __future__ import annotations


def is_granted(required: dict | None, state: dict) -> bool:
    """walkerOS semantics: no requirement passes; otherwise any required key granted passes."""
    if not required:
        return True
    wanted = [key for key, needed in required.items() if needed]
    if not wanted:
        return True
    return any(state.get(key) is True for key in wanted)


def category_preferences(consent_map: dict | None, state: dict) -> dict | None:
    """``{segmentKey: bool}`` for every mapped walkerOS key present in the event's consent.

    Unlike walkerOS (which only ever sees granted keys), an explicit ``false`` is forwarded:
    Segment reads it as "not consented", which is what the event says.
    """
    if not consent_map:
        return None
    prefs = {segment_key: state[walker_key] is True
             for walker_key, segment_key in consent_map.items() if walker_key in state}
    return prefs or None
