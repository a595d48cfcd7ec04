"""What `$code:` functions cost: the same flow with and without three JavaScript functions
evaluated on every event, mapped and planned in one process (no Beam, no network).

The issue's target: the functions add at most 30 µs an event. Measured in CPU time, which
other load on the shared machine disturbs less than wall time; best of a few repeats. Run in a
process of its own (`make bench` starts one): in a process that holds much else, such as a
million messages, the collector's full passes over it would be counted too.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from decide.destination import Destination, DestinationSpec
from decide.event import parse_payload
from decide.secrets import WriteKey
from decide.settings import SegmentSettings

TARGET_US = 30.0
PLAIN = {"data": {"map": {"id": "data.id", "label": "name", "user": "user.id"}}}
# A rule condition on the event, an fn on the event, a validate on a read value: three calls.
WITH_FUNCTIONS = {
    "condition": "$code:(event) => event.name.length > 0",
    "data": {
        "map": {
            "id": "data.id",
            "label": {"fn": "$code:(event) => event.name.toUpperCase()"},
            "user": {"key": "user.id", "validate": "$code:(value) => typeof value === 'string'"},
        }
    },
}


def _destination(rule: dict) -> Destination:
    config = {"settings": {"userId": "user.id", "anonymousId": "user.session"}, "mapping": {"*": {"*": rule}}}
    settings = SegmentSettings.from_config({"writeKey": "k", **config["settings"]}, WriteKey("k"))
    spec = DestinationSpec(
        flow_name="bench", settings=settings, config=config, collector={"globals": {}, "consent": {}, "user": {}}
    )
    return Destination(spec)


def _events(path: Path, limit: int) -> list[dict]:
    events = []
    with open(path, "rb") as f:
        for line in f:
            for item in parse_payload(line.rstrip(b"\n"), collector={}, flow="bench"):
                if isinstance(item, dict):
                    events.append(item)
            if len(events) >= limit:
                break
    return events


def _cpu_per_event(destination: Destination, events: list[dict]) -> float:
    mapped, plan, process = destination.to_mapped, destination.plan, destination.mapping_result
    started = time.process_time()
    for event in events:
        plan(mapped(process(event), event))
    return (time.process_time() - started) / len(events) * 1e6


def measure(events_path: Path, limit: int = 10_000, repeats: int = 5) -> dict:
    events = _events(events_path, limit)
    plain, functions = _destination(PLAIN), _destination(WITH_FUNCTIONS)
    _cpu_per_event(functions, events[:200])  # this thread's sandbox is built on first use
    # Interleaved, so a slow spell of the shared machine falls on both flows, not on one.
    plain_runs, function_runs = [], []
    for _ in range(repeats):
        plain_runs.append(_cpu_per_event(plain, events))
        function_runs.append(_cpu_per_event(functions, events))
    plain_us, functions_us = min(plain_runs), min(function_runs)
    assert not functions.function_errors.counts, functions.function_errors.counts
    added = functions_us - plain_us
    return {
        "events": len(events),
        "plain_cpu_us": plain_us,
        "functions_cpu_us": functions_us,
        "added_cpu_us": added,
        "target_us": TARGET_US,
        "met": added <= TARGET_US,
    }


if __name__ == "__main__":
    import sys

    print(orjson.dumps(measure(Path(sys.argv[1])), option=orjson.OPT_INDENT_2).decode())
