"""Generated mapping values and events, answered by walkerOS's own getMappingValue.

`python -m tests.walkeros.differential record` runs `@walkeros/core` (from the npm registry,
through node) on the generated cases and writes tests/data/walkeros/get_mapping_value.json;
the default test suite replays that file offline. The `walkeros_npm` marker runs it live.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDED = HERE.parent / "data" / "walkeros" / "get_mapping_value.json"
CORE_PACKAGE = "@walkeros/core@4.2.1"  # the newest published; the repo's 4.4.0 is not on npm
SEED = 20261201
CASES = 1500
HOLE = "\x00undefined"

PATHS = [
    "data.id",
    "data.price",
    "data.tags",
    "data.tags.0",
    "data.missing",
    "nested.*.data.id",
    "nested.0.data.name",
    "nested.*.data.missing",
    "user.id",
    "consent.marketing",
    "consent",
    "globals.lang",
    "name",
    "data",
    "",
    "data.nul",
    "context.stage.0",
    "data.zero",
    "data.empty",
]
FUNCTIONS = [
    "$code:(v) => v",
    "$code:(v) => typeof v",
    "$code:(v, c) => c.event.name",
    "$code:(v) => v && v.data ? v.data.id : 'none'",
    "$code:() => null",
    "$code:() => { throw new Error('x'); }",
    "$code:(v) => [v, undefined]",
    "$code:(v, c) => c.consent",
    "$code:async (v) => 1",
    "$code:(v) => ({a: v})",
    "$code:() => NaN",
    "$code:(v, c) => typeof c.mapping",
    "$code:(v) => String(v).length",
    "not code",
]
PREDICATES = [
    "$code:() => true",
    "$code:() => false",
    "$code:(v) => !!v",
    "$code:(v) => typeof v === 'string'",
    "$code:(v, c) => !!c.consent && c.consent.marketing === true",
]
CONSENTS = [{}, {"marketing": True}, {"analytics": True, "marketing": True}, {"marketing": False}]
STATICS = ["s", 0, False, 1.5, {"o": 1}, ["x"], None, {"n": None}, ""]


def _value(rng: random.Random, depth: int):
    kind = rng.random()
    if depth <= 0 or kind < 0.3:
        return rng.choice(PATHS)
    if kind < 0.4:
        return [_value(rng, depth - 1) for _ in range(rng.randint(1, 3))]
    if kind < 0.42:
        return rng.choice([0, 1, True])
    config: dict = {}
    for key, chance in (
        ("key", 0.4),
        ("value", 0.3),
        ("fn", 0.2),
        ("condition", 0.15),
        ("validate", 0.15),
        ("consent", 0.15),
    ):
        if rng.random() < chance:
            config[key] = {
                "key": lambda: rng.choice(PATHS),
                "value": lambda: rng.choice(STATICS),
                "fn": lambda: rng.choice(FUNCTIONS),
                "condition": lambda: rng.choice(PREDICATES),
                "validate": lambda: rng.choice(PREDICATES),
                "consent": lambda: rng.choice(CONSENTS),
            }[key]()
    container = rng.random()
    if container < 0.2:
        config["loop"] = [
            rng.choice(["this", "nested", "data.tags", "data.missing", _value(rng, 0)]),
            _value(rng, depth - 1),
        ]
    elif container < 0.45:
        config["map"] = {f"k{i}": _value(rng, depth - 1) for i in range(rng.randint(0, 3))}
    elif container < 0.6:
        config["set"] = [_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return config


def _event(rng: random.Random) -> dict:
    data = {
        "id": rng.choice(["p1", "p2", "x"]),
        "price": rng.choice([0, 9.5, 420]),
        "tags": rng.choice([["a", "b"], [], [1, True]]),
        "zero": 0,
        "empty": "",
    }
    if rng.random() < 0.3:
        data["nul"] = None
    nested = [{"entity": "product", "data": {"id": f"n{i}", "name": f"N{i}"}} for i in range(rng.randint(0, 2))]
    if nested and rng.random() < 0.3:
        nested.append({"entity": "gift", "data": {}})
    return {
        "name": "product view",
        "entity": "product",
        "action": "view",
        "data": data,
        "nested": nested,
        "user": {"id": rng.choice(["u1", "u2"])},
        "consent": {"functional": True, "marketing": rng.random() < 0.5},
        "globals": {"lang": "de"},
        "context": {"stage": ["checkout", 1]},
    }


def generate(seed: int = SEED, count: int = CASES) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        event = _event(rng)
        roll = rng.random()
        value_input = event if roll < 0.8 else rng.choice([event["data"], "text", 7, event["nested"]])
        collector = {"consent": rng.choice(CONSENTS)} if rng.random() < 0.5 else {}
        cases.append({"value": _value(rng, 3), "input": value_input, "event": event, "collector": collector})
    return cases


def ask_walkeros(cases: list[dict], core_dir: str) -> list[dict]:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    done = subprocess.run(
        [node, str(HERE / "get_mapping_value.mjs")],
        input=json.dumps(cases),
        text=True,
        capture_output=True,
        check=True,
        timeout=300,
        env={**os.environ, "WALKEROS_CORE_DIR": core_dir},
    )
    return json.loads(done.stdout)


def install_core(where: str) -> str:
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", CORE_PACKAGE],
        cwd=where,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return where


def record(core_dir: str | None = None) -> None:
    cases = generate()
    with tempfile.TemporaryDirectory() as tmp:
        answers = ask_walkeros(cases, core_dir or install_core(tmp))
    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    RECORDED.write_text(
        json.dumps(
            {
                "about": f"getMappingValue of {CORE_PACKAGE} on generated cases "
                f"(tests/walkeros/differential.py, seed {SEED})",
                "cases": [_stored(c, a) for c, a in zip(cases, answers)],
            },
            separators=(",", ":"),
        )
        + "\n"
    )


def _stored(case: dict, answer: dict) -> dict:
    """The input is mostly the event itself: stored once, as "input": "$event"."""
    stored = {**case, "walkeros": answer}
    if case["input"] is case["event"]:
        stored["input"] = "$event"
    return stored


def loaded(case: dict) -> dict:
    return {**case, "input": case["event"]} if case["input"] == "$event" else case


if __name__ == "__main__":
    record(sys.argv[2] if len(sys.argv) > 2 else None)
