"""Differential test against walkerOS's own engine: generated mapping values (JavaScript
functions included) and events, answered by `@walkeros/core`'s getMappingValue.

The default run replays the answers recorded in tests/data/walkeros/ (offline); with
`-m walkeros_npm` the same cases are put to `@walkeros/core` from the npm registry live."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest

from decide.functions import Functions
from decide.mapping import UNDEFINED, compile_value
from tests.walkeros import differential

RECORDED = json.loads(differential.RECORDED.read_text())["cases"]


def ours(case: dict, functions: Functions) -> dict:
    value = compile_value(case["value"], "$.v", on_error=lambda place, exc: None, functions=functions)
    result = value.raw(case["input"], {"event": case["event"], "collector": case["collector"]})
    if result is UNDEFINED:
        return {"undefined": True}
    return {"json": _holes_marked(result)}


def _holes_marked(value):
    if isinstance(value, list):
        return [differential.HOLE if item is UNDEFINED else _holes_marked(item) for item in value]
    if isinstance(value, dict):
        return {k: _holes_marked(v) for k, v in value.items() if v is not UNDEFINED}
    return value


def theirs(answer: dict) -> dict:
    return {"json": json.loads(answer["json"])} if "json" in answer else answer


def mismatches(cases: list[dict], answers: list[dict]) -> list[tuple]:
    functions = Functions()
    return [
        (
            case["value"],
            case["input"] if case["input"] is not case["event"] else "$event",
            theirs(answer),
            ours(case, functions),
        )
        for case, answer in zip(cases, answers)
        if "error" not in answer and theirs(answer) != ours(case, functions)
    ]


def test_getmappingvalue_agrees_with_recorded_walkeros_answers() -> None:
    cases = [differential.loaded(c) for c in RECORDED]
    assert len(cases) == differential.CASES
    assert cases == [
        differential.loaded(differential._stored(c, {})) | {"walkeros": c["walkeros"]} for c in cases
    ]  # the generator still makes the recorded cases
    wrong = mismatches(cases, [c["walkeros"] for c in cases])
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:3]}"


@pytest.mark.walkeros_npm
def test_getmappingvalue_agrees_with_walkeros_from_npm() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed")
    cases = differential.generate()
    with tempfile.TemporaryDirectory() as tmp:
        answers = differential.ask_walkeros(cases, differential.install_core(tmp))
    wrong = mismatches(cases, answers)
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:3]}"
