"""``explain``: every input event through the same functions as the pipeline, in one process,
with no network; one JSON object per event on stdout, in input order.

The identify/group decisions are made as a batch run makes them: each user's events in event
time order (then id), whatever the order of the input. So with identify or group in the flow,
every event is mapped and planned first, and the lines are written once the whole input has been
read; without them, each line is written as its event is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from decide.calls import EventCalls
from decide.dead_letter import DeadLetter
from decide.destination import DEAD_LETTER, DELIVERED, Destination, Outcome
from decide.event import parse_payload
from decide.identity import IdentityState, event_digest


def explain_payloads(destination: Destination, payloads: Iterable[Any]) -> Iterator[dict]:
    if not destination.needs_identity_state:
        # No identify or group anywhere: nothing depends on order, so nothing is held back.
        yield from _in_input_order(destination, payloads)
        return
    spec = destination.spec
    lines: list[dict] = []
    by_key: dict[str, list[tuple[int, EventCalls]]] = {}
    for payload in payloads:
        for item in parse_payload(payload, collector=spec.collector, flow=spec.flow_name):
            index = len(lines)
            if isinstance(item, DeadLetter):
                lines.append(_line(index, item.event_id, DEAD_LETTER, item.reason, []))
                continue
            outcome = destination.before_deduplication(item)
            if isinstance(outcome, EventCalls):
                by_key.setdefault(outcome.key, []).append((index, outcome))
                outcome = Outcome(DELIVERED, None)
            lines.append(_line(index, item.get("id"), outcome.outcome, outcome.reason, outcome.calls))
    for planned in by_key.values():
        state: IdentityState | None = None
        # The batch pipeline's order (transforms.dedup): event time, then the event's digest.
        for index, calls in sorted(
            planned, key=lambda p: (p[1].timestamp_ms, event_digest(p[1].key, p[1].event.get("id")))
        ):
            lines[index]["calls"], state, _ = destination.deduplicate(calls, state)
    yield from lines


def _in_input_order(destination: Destination, payloads: Iterable[Any]) -> Iterator[dict]:
    spec = destination.spec
    states: dict[str, IdentityState] = {}
    index = 0
    for payload in payloads:
        for item in parse_payload(payload, collector=spec.collector, flow=spec.flow_name):
            if isinstance(item, DeadLetter):
                yield _line(index, item.event_id, DEAD_LETTER, item.reason, [])
            else:
                outcome = destination.process(item, states)
                yield _line(index, item.get("id"), outcome.outcome, outcome.reason, outcome.calls)
            index += 1


def stdin_payloads(stream, fmt: str = "auto") -> Iterator[Any]:
    """Payloads from standard input (``explain --input -``). ``auto``: the whole text when it is
    one JSON document (an event, an array, or a ``{"batch": ...}`` envelope, pasted over several
    lines), else one payload per line (JSON Lines); ``dead_letter`` and ``avro`` read the bytes as
    such a file would be read."""
    import io

    from transforms.files import avro_payloads, dead_letter_payloads, line_payload

    data = stream.read()
    if fmt == "avro":
        yield from avro_payloads(io.BytesIO(data))
        return
    if fmt == "dead_letter":
        yield from dead_letter_payloads(io.BytesIO(data))
        return
    if fmt == "json" or (fmt == "auto" and _is_one_document(data)):
        yield data
        return
    for line in data.splitlines():
        payload = line_payload(line)
        if payload is not None:
            yield payload


def _is_one_document(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _line(index: int, event_id: str | None, outcome: str, reason: str | None, calls: list[dict]) -> dict:
    return {"index": index, "id": event_id, "outcome": outcome, "reason": reason, "calls": calls}


def dumps(line: dict) -> str:
    return orjson.dumps(line).decode()
