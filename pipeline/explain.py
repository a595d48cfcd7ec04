"""``explain``: every input event through the same functions as the pipeline, in input order,
in one process, with no network; one JSON object per event on stdout.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import orjson

from transforms.dead_letter import DeadLetter
from transforms.destination import DEAD_LETTER, Destination
from transforms.event import parse_payload
from transforms.identity import IdentityState


def explain_payloads(destination: Destination, payloads: Iterable[Any]) -> Iterator[dict]:
    states: dict[str, IdentityState] = {}
    spec = destination.spec
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

    from pipeline.sources import avro_payloads, dead_letter_payloads, line_payload

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
        payload = line_payload(line, "jsonl")
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
