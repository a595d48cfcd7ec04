"""The mapping language: the conformance suite in tests/data/mapping/, and unit tests.

Case files (every tests/data/mapping/*.json not starting with "_") hold {"about", "cases"}.
A case names a preset event of _events.json (or gives one inline), optionally patched, and is
either a value case ("value" → "expected" value) or a config case ("config" → "expected"
{rule, ignored, silent, name, data, event}); see the "about" of each file.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from decide.functions import PY_PREFIX, FunctionPolicy, Functions
from decide.mapping import (
    UNDEFINED,
    CompiledRule,
    DestinationMapping,
    MappingConfigError,
    MappingResult,
    compile_value,
    is_property,
)
from decide.paths import get_by_path, set_by_path, split_path
from schemas import load as load_schema

DATA = Path(__file__).parent / "data" / "mapping"
UNDEFINED_MARK = "__undefined__"
ABSENT_MARK = "__absent__"
PRESETS: dict[str, dict] = json.loads((DATA / "_events.json").read_text())["events"]


def _load_cases() -> list[dict]:
    cases = []
    for path in sorted(DATA.glob("*.json")):
        if path.name.startswith("_"):
            continue
        for case in json.loads(path.read_text())["cases"]:
            cases.append({**case, "_file": path.name})
    return cases


CASES = _load_cases()
CASE_IDS = [f"{case['_file'][:-5]}: {case['name']}" for case in CASES]


def build_event(case: dict) -> dict:
    event = case["event"]
    event = copy.deepcopy(PRESETS[event] if isinstance(event, str) else event)
    event.update(copy.deepcopy(case.get("event_patch", {})))
    for key in case.get("event_without", []):
        event.pop(key, None)
    return event


def expected_value(expected: Any) -> Any:
    return UNDEFINED if expected == UNDEFINED_MARK else expected


def case_functions(case: dict) -> Functions:
    """Cases about Python functions say so with "$py:"; they run as with --allow_python_functions."""
    return Functions(FunctionPolicy(allow_python=PY_PREFIX in json.dumps(case)))


def run_value_case(case: dict, event: dict) -> Any:
    value = compile_value(case["value"], "$.value", functions=case_functions(case))
    value_input = case.get("input", event)
    return value(value_input, {"event": event, "collector": case.get("collector", {})})


def run_config_case(case: dict, event: dict) -> MappingResult:
    return DestinationMapping(case["config"], functions=case_functions(case)).process(event, case.get("collector", {}))


def check_config_result(result: MappingResult, expected: dict) -> None:
    if "rule" in expected:
        assert (result.rule.key if result.rule else None) == expected["rule"]
    if "ignored" in expected:
        assert result.ignored is expected["ignored"]
    if "silent" in expected:
        assert bool(result.rule and result.rule.silent) is expected["silent"]
    if "name" in expected:
        assert result.event["name"] == expected["name"]
    if "data" in expected:
        assert result.data == expected_value(expected["data"])
        assert type(result.data) is type(expected_value(expected["data"]))
    for path, value in expected.get("event", {}).items():
        found = get_by_path(result.event, path)
        assert found == (UNDEFINED if value == ABSENT_MARK else value), path


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conformance(case: dict) -> None:
    assert ("value" in case) != ("config" in case), "a case has either a value or a config"
    event = build_event(case)
    untouched = copy.deepcopy(event)
    if "value" in case:
        result = run_value_case(case, event)
        expected = expected_value(case["expected"])
        assert result == expected
        assert type(result) is type(expected)  # 0 is not False, 1 is not True
    else:
        result = run_config_case(case, event)
        check_config_result(result, case["expected"])
        orjson.dumps(result.event)  # what goes on must be JSON
        if result.data is not UNDEFINED:
            orjson.dumps(result.data)
    assert event == untouched, "the input event must never be mutated"


CONFIG_CASES = [case for case in CASES if "config" in case]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[f"{c['_file'][:-5]}: {c['name']}" for c in CONFIG_CASES])
def test_the_short_way_for_simple_rules_gives_the_general_answer(case: dict) -> None:
    """Rules with nothing but a name and data take a short way through process; with that way
    closed, every config case gives the same result (and without data, the same fate)."""
    short = DestinationMapping(case["config"], functions=case_functions(case))
    general = DestinationMapping(case["config"], functions=case_functions(case))
    general._simple_rules = frozenset()
    for with_data in (True, False):
        answers = [
            mapping.process(build_event(case), case.get("collector", {}), with_data) for mapping in (short, general)
        ]
        (a, b) = answers
        assert (a.rule and a.rule.key, a.ignored, a.event, a.data) == (
            b.rule and b.rule.key,
            b.ignored,
            b.event,
            b.data,
        )


def test_most_rules_of_a_plain_flow_take_the_short_way() -> None:
    config = {
        "mapping": {"page": {"view": {"name": "Viewed", "data": {"map": {"id": "data.id"}}}, "*": {"silent": True}}}
    }
    mapping = DestinationMapping(config)
    assert len(mapping._simple_rules) == 2
    assert not DestinationMapping({**config, "policy": {"x": "data.id"}})._simple_rules


def test_the_suite_is_big_enough() -> None:
    assert len(CASES) >= 60
    assert len({case["name"] for case in CASES}) == len(CASES), "case names are unique"


# --- the JSON Schema -----------------------------------------------------------------------------


def _validator(definition: str) -> Draft202012Validator:
    schema = load_schema("mapping.schema.json")
    registry = Registry().with_resource("mapping.schema.json", Resource.from_contents(schema))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator({"$ref": f"mapping.schema.json#/$defs/{definition}"}, registry=registry)


VALUE_VALIDATOR = _validator("value")
CONFIG_VALIDATOR = _validator("config")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_mapping_against_schema(case: dict) -> None:
    validator, instance = (VALUE_VALIDATOR, case["value"]) if "value" in case else (CONFIG_VALIDATOR, case["config"])
    errors = list(validator.iter_errors(instance))
    if case.get("schema") == "invalid":
        assert errors, "the schema should reject this mapping"
    else:
        assert not errors, [f"{e.json_path}: {e.message}" for e in errors]


MALFORMED = [
    ("unknown rule key", {"mapping": {"product": {"view": {"nmae": "X"}}}}, "$.mapping.product.view", "nmae"),
    (
        "unknown rule key in a rule list",
        {"mapping": {"product": {"view": [{"name": "a"}, {"skip": True}]}}},
        "$.mapping.product.view[1]",
        "skip",
    ),
    (
        "ignore is not a boolean",
        {"mapping": {"product": {"view": {"ignore": "yes"}}}},
        "$.mapping.product.view.ignore",
        "boolean",
    ),
    ("name is not a string", {"mapping": {"product": {"view": {"name": 5}}}}, "$.mapping.product.view.name", "string"),
    ("unknown value config key", {"data": {"map": {"id": {"kye": "data.id"}}}}, "$.data.map.id", "kye"),
    ("function without $code:", {"data": {"fn": "value.toUpperCase()"}}, "$.data.fn", "$(code|py)"),
    ("loop with three items", {"data": {"loop": ["nested", "data.id", "x"]}}, "$.data.loop", "long"),
    ("null value", {"data": {"map": {"id": None}}}, "$.data.map.id", "None"),
    ("unknown include section", {"include": ["globalz"]}, "$.include[0]", "globalz"),
    ("remove is not a list", {"mapping": {"*": {"*": {"remove": "data.id"}}}}, "$.mapping['*']['*'].remove", "array"),
    (
        "consent value is not a boolean",
        {"mapping": {"a": {"b": {"consent": {"marketing": "yes"}}}}},
        "$.mapping.a.b.consent.marketing",
        "boolean",
    ),
    ("rules entity is not an object", {"mapping": {"product": ["view"]}}, "$.mapping.product", "object"),
    ("policy value is null", {"policy": {"user.id": None}}, "$.policy['user.id']", "None"),
]


@pytest.mark.parametrize("config, json_path, word", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_schema_rejects_malformed_mappings(config: dict, json_path: str, word: str) -> None:
    errors = list(CONFIG_VALIDATOR.iter_errors(config))
    assert errors
    assert any(e.json_path == json_path and word in e.message for e in errors), [
        (e.json_path, e.message) for e in errors
    ]


def test_schema_accepts_segment_rule_settings() -> None:
    config = {
        "mapping": {
            "page": {
                "view": {
                    "silent": True,
                    "settings": {"page": True, "screen": {"map": {"name": "data.title"}}, "identify": "user"},
                }
            }
        }
    }
    assert not list(CONFIG_VALIDATOR.iter_errors(config))


# --- compile-time errors -------------------------------------------------------------------------


def test_code_syntax_error_names_the_json_path() -> None:
    with pytest.raises(MappingConfigError) as raised:
        compile_value(
            {"map": {"email": {"fn": "$code:(value) => {\n  return value +;\n}"}}},
            "$.flows.default.destinations.segment.config.settings.identify",
        )
    error = raised.value
    assert error.path == "$.flows.default.destinations.segment.config.settings.identify.map.email.fn"
    assert "$code is not valid JavaScript: SyntaxError" in error.message
    assert "(line 2, column" in error.message
    assert str(error) == f"{error.path}: {error.message}"
    assert isinstance(error, ValueError)


def test_python_syntax_error_names_the_json_path() -> None:
    with pytest.raises(MappingConfigError) as raised:
        compile_value(
            {"fn": "$py:lambda value, context: value +"}, "$.v", functions=Functions(FunctionPolicy(allow_python=True))
        )
    assert raised.value.path == "$.v.fn"
    assert "$py is not valid Python" in raised.value.message


def test_python_functions_are_refused_without_the_flag() -> None:
    with pytest.raises(MappingConfigError) as raised:
        compile_value({"fn": "$py:lambda value, context: value"}, "$.v")
    assert raised.value.path == "$.v.fn"
    assert "--allow_python_functions" in raised.value.message


def test_python_that_is_not_callable() -> None:
    with pytest.raises(MappingConfigError, match=r"\$\.v\.fn: .*callable.*int"):
        compile_value({"fn": "$py:42"}, "$.v", functions=Functions(FunctionPolicy(allow_python=True)))


def test_python_failing_to_evaluate() -> None:
    with pytest.raises(MappingConfigError, match=r"\$\.v\.validate: .*failed to evaluate: NameError"):
        compile_value({"validate": "$py:no_such_name"}, "$.v", functions=Functions(FunctionPolicy(allow_python=True)))


@pytest.mark.parametrize("source", ["42", "no_such_name", "(() => { throw new Error('at load'); })()"])
def test_javascript_that_gives_no_function_is_an_error_of_each_call(source: str) -> None:
    # Compiling only parses (validate runs nothing); the expression is evaluated in the sandbox on
    # first use, and a value that is not a function makes every call fail, as in walkerOS.
    seen: list[str] = []
    value = compile_value(
        {"value": "static", "fn": f"$code:{source}"}, "$.v", on_error=lambda place, exc: seen.append(place)
    )
    assert value({"a": 1}) == "static"
    assert value({"a": 2}) == "static"
    assert seen == ["$.v.fn", "$.v.fn"]


@pytest.mark.parametrize(
    "spec, path, fragment",
    [
        ({"kye": "data.id"}, "$.v", "unknown key(s) 'kye'"),
        (None, "$.v", "null is not a mapping value"),
        ({"loop": ["nested"]}, "$.v.loop", "[scope, item mapping]"),
        ({"map": ["a"]}, "$.v.map", "expected an object"),
        ({"set": "a"}, "$.v.set", "expected a list"),
        ({"key": 5}, "$.v.key", "expected a path string"),
        ({"consent": ["marketing"]}, "$.v.consent", "consent states"),
        ({"fn": 5}, "$.v.fn", "expected a function"),
        ({"map": {"a.b": {"fn": "$code:)"}}}, '$.v.map["a.b"].fn', "not valid JavaScript"),
    ],
)
def test_malformed_values_fail_at_compile_time(spec: Any, path: str, fragment: str) -> None:
    with pytest.raises(MappingConfigError) as raised:
        compile_value(spec, "$.v")
    assert raised.value.path == path
    assert fragment in raised.value.message


@pytest.mark.parametrize(
    "config, path",
    [
        ({"mapping": {"product": {"view": {"nmae": "x"}}}}, "$.config.mapping.product.view"),
        ({"mapping": {"product": {"view": [{}, {"skip": True}]}}}, "$.config.mapping.product.view[1]"),
        ({"mapping": {"product": {"view": "x"}}}, "$.config.mapping.product.view"),
        ({"mapping": {"product": {"view": {"condition": "$code:("}}}}, "$.config.mapping.product.view.condition"),
        ({"mapping": {"*": {"*": {"data": {"fn": "$code:(v) =>"}}}}}, "$.config.mapping.*.*.data.fn"),
        ({"include": ["globalz"]}, "$.config.include"),
        ({"policy": {"user.id": {"fn": "$code:]"}}}, '$.config.policy["user.id"].fn'),
        (
            {"mapping": {"a": {"b": {"settings": {"identify": {"map": {"x": {"bad": 1}}}}}}}},
            "$.config.mapping.a.b.settings.identify.map.x",
        ),
    ],
)
def test_destination_mapping_errors_name_the_json_path(config: dict, path: str) -> None:
    with pytest.raises(MappingConfigError) as raised:
        DestinationMapping(config)
    assert raised.value.path == path


# --- runtime errors of user functions --------------------------------------------------------------


def test_runtime_errors_are_counted_and_logged_once_per_place(caplog: pytest.LogCaptureFixture) -> None:
    mapping = DestinationMapping(
        {
            "data": {
                "map": {
                    "a": {"fn": "$code:() => { throw new RangeError('no') }"},
                    "b": {"validate": "$code:(value) => value.nope.deeper", "value": 1},
                    "c": {"key": "data.id"},
                }
            }
        }
    )
    event = copy.deepcopy(PRESETS["product view"])
    with caplog.at_level(logging.WARNING, logger="decide.mapping"):
        for _ in range(5):
            # b: the failed validate makes the value undefined, so its static value is used
            assert mapping.process(event).data == {"b": 1, "c": "ers"}
    assert mapping.error_counts == {"$.config.data.map.a.fn": 5, "$.config.data.map.b.validate": 5}
    warnings = [r for r in caplog.records if r.name == "decide.mapping"]
    assert len(warnings) == 2
    assert "$.config.data.map.a.fn" in warnings[0].getMessage()
    assert "RangeError: no" in warnings[0].getMessage()


def test_on_error_is_called_for_every_runtime_error(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, str]] = []
    mapping = DestinationMapping(
        {
            "mapping": {
                "product": {
                    "view": [{"condition": "$code:(event) => event.missing.deeper", "name": "A"}, {"name": "B"}]
                }
            }
        },
        path="$.flows.default.destinations.segment.config",
        on_error=lambda place, exc: seen.append((place, type(exc).__name__)),
    )
    with caplog.at_level(logging.WARNING, logger="decide.mapping"):
        for _ in range(3):
            assert mapping.process(PRESETS["product view"]).event["name"] == "B"
    place = "$.flows.default.destinations.segment.config.mapping.product.view[0].condition"
    assert seen == [(place, "FunctionError")] * 3
    assert mapping.error_counts == {place: 3}
    assert not [r for r in caplog.records if r.name == "decide.mapping"]


def test_function_string_without_code_prefix_fails_at_run_time() -> None:
    value = compile_value({"fn": "value.upper()"}, "$.v")
    assert value("x") is UNDEFINED
    assert value.error_counts == {"$.v.fn": 1}


# --- no mutation, copies --------------------------------------------------------------------------


def test_policies_and_rename_never_touch_the_input_event() -> None:
    mapping = DestinationMapping(
        {
            "policy": {
                "data.price": {"value": 1},
                "user.id": {"value": "p"},
                "nested.0.data.id": {"value": "x"},
                "context.shopping.0": {"value": "changed"},
            },
            "mapping": {
                "order": {
                    "complete": {
                        "name": "Order Completed",
                        "policy": {"globals.pagegroup": {"value": "rule"}},
                        "data": "data",
                        "remove": ["id"],
                    }
                }
            },
        }
    )
    event = copy.deepcopy(PRESETS["order complete"])
    untouched = copy.deepcopy(event)
    result = mapping.process(event)
    assert event == untouched
    assert result.event is not event
    assert result.event["name"] == "Order Completed"
    assert result.event["user"]["id"] == "p"
    assert result.event["nested"][0]["data"]["id"] == "x"
    assert result.event["context"]["shopping"] == ["changed", 0]
    assert result.event["globals"]["pagegroup"] == "rule"
    assert "id" not in result.data and event["data"]["id"] == "0rd3r1d"


def test_result_event_is_a_copy_even_without_policy() -> None:
    event = copy.deepcopy(PRESETS["product view"])
    result = DestinationMapping({}).process(event)
    assert result.event == event and result.event is not event
    assert result.rule is None and result.ignored is False and result.data is UNDEFINED


def test_set_by_path_copies_only_along_the_path() -> None:
    event = copy.deepcopy(PRESETS["order complete"])
    written = set_by_path(event, split_path("data.total"), 1)
    assert written["data"] is not event["data"] and written["data"]["total"] == 1
    assert written["nested"] is event["nested"]  # untouched branches are shared, not copied
    assert event["data"]["total"] == 555


# --- rules, settings ------------------------------------------------------------------------------


def test_compiled_rule_fields() -> None:
    raw = {
        "name": "Page",
        "silent": True,
        "consent": {"marketing": True},
        "settings": {"page": True, "screen": False, "identify": {"map": {"userId": "user.id"}}},
    }
    mapping = DestinationMapping({"mapping": {"page": {"*": raw}}})
    rule = mapping.find_rule(PRESETS["page view"], {})
    assert isinstance(rule, CompiledRule)
    assert (rule.key, rule.name, rule.ignore, rule.silent) == ("page *", "Page", False, True)
    assert rule.consent == {"marketing": True}
    assert rule.raw is raw
    assert rule.settings["page"] is True and rule.settings["screen"] is False
    identify = rule.settings["identify"]
    assert identify(PRESETS["page view"], {"mapping": raw}) == {"userId": "us3r"}


def test_settings_functions_share_the_mapping_error_counts() -> None:
    mapping = DestinationMapping(
        {"mapping": {"*": {"*": {"settings": {"group": {"fn": "$code:(value) => value.nope.deeper"}}}}}}
    )
    rule = mapping.find_rule(PRESETS["page view"], {})
    assert rule.settings["group"](PRESETS["page view"]) is UNDEFINED
    assert mapping.error_counts == {"$.config.mapping.*.*.settings.group.fn": 1}


def test_python_callables_are_accepted_as_functions() -> None:
    value = compile_value(
        {"fn": lambda value, context: value["data"]["id"].upper(), "validate": lambda value, context: len(value) == 3},
        "$.v",
    )
    assert value(PRESETS["product view"]) == "ERS"
    mapping = DestinationMapping(
        {"mapping": {"product": {"view": [{"condition": lambda event, context: False, "name": "A"}, {"name": "B"}]}}}
    )
    assert mapping.process(PRESETS["product view"]).event["name"] == "B"


def test_the_collector_reaches_rule_conditions_through_find_rule() -> None:
    mapping = DestinationMapping(
        {"mapping": {"*": {"*": {"condition": "$code:(event, context) => context.collector.globals.env === 'prod'"}}}}
    )
    event = PRESETS["page view"]
    assert mapping.find_rule(event, {"globals": {"env": "prod"}}).key == "* *"
    assert mapping.find_rule(event, {"globals": {"env": "dev"}}) is None


# --- values: raw vs JSON view, undefined ----------------------------------------------------------


def test_holes_stay_undefined_in_raw_results() -> None:
    value = compile_value({"set": ["data.id", "data.missing"]}, "$.v")
    event = PRESETS["product view"]
    assert value.raw(event) == ["ers", UNDEFINED]
    assert value(event) == ["ers", None]
    assert is_property(value.raw(event)) and not is_property(value(event))


def test_undefined_input_is_undefined() -> None:
    assert compile_value({"value": "x"}, "$.v")(UNDEFINED) is UNDEFINED
    assert compile_value({"value": "x"}, "$.v")(None) == "x"  # null is a defined input


def test_undefined_sentinel() -> None:
    assert not UNDEFINED and repr(UNDEFINED) == "undefined"
    assert pickle.loads(pickle.dumps(UNDEFINED)) is UNDEFINED
    assert copy.deepcopy(UNDEFINED) is UNDEFINED


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        ("", True),
        (0, True),
        (1.5, True),
        (float("nan"), False),
        (None, False),
        ({"a": [1, {"b": "c"}]}, True),
        ({"a": None}, False),
        ([1, None], False),
        ([1, UNDEFINED], True),
        (UNDEFINED, False),
        ((1, 2), False),
        ({1: "a"}, False),
        (object(), False),
    ],
)
def test_is_property(value: Any, expected: bool) -> None:
    assert is_property(value) is expected


def test_static_value_under_denied_consent_is_returned_as_written() -> None:
    # walkerOS returns the static value raw in that branch, without the Property check.
    value = compile_value({"value": {"a": None}, "consent": {"marketing": True}}, "$.v")
    assert value({"consent": {}}) == {"a": None}
    assert compile_value({"value": None, "key": "x"}, "$.v")({}) is UNDEFINED


def test_a_raw_null_inside_a_map_makes_the_whole_object_undefined() -> None:
    # Only the denied-consent branch hands a value out unchecked; the map's own Property check
    # then fails as a whole, as walkerOS's castToProperty on the mapped object does.
    value = compile_value(
        {"map": {"id": "data.id", "extra": {"value": {"x": None}, "consent": {"marketing": True}}}}, "$.v"
    )
    denied = {"data": {"id": "a"}, "consent": {"functional": True}}
    granted = {"data": {"id": "a"}, "consent": {"marketing": True}}
    assert value(denied) is UNDEFINED
    assert value(granted) == {"id": "a"}  # granted: the invalid static is dropped, not returned


def test_constants_are_handed_out_as_copies() -> None:
    value = compile_value({"value": {"tags": ["a"]}}, "$.v")
    first = value({})
    first["tags"].append("changed")
    assert value({}) == {"tags": ["a"]}


# --- pickling (Beam ships DoFns holding compiled mappings to workers) ------------------------------


def test_compiled_mappings_pickle_by_recompiling() -> None:
    mapping = DestinationMapping(
        {
            "mapping": {
                "order": {
                    "complete": {
                        "name": "Order Completed",
                        "data": {"map": {"cents": {"fn": "$code:(value) => value.data.total * 100"}}},
                    }
                }
            }
        }
    )
    assert mapping.process(PRESETS["order complete"]).data == {"cents": 55500}  # this thread's sandbox built
    restored = pickle.loads(pickle.dumps(mapping))
    result = restored.process(PRESETS["order complete"])
    assert (result.event["name"], result.data) == ("Order Completed", {"cents": 55500})
    value = pickle.loads(pickle.dumps(compile_value("data.id", "$.v")))
    assert value(PRESETS["order complete"]) == "0rd3r1d"
