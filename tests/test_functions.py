"""Flow functions: `$code:` JavaScript in the QuickJS sandbox, `$py:` Python behind a flag.

Hostile functions must cost their own value only (a counted function error), never the worker;
nothing one call does may reach the next; validating a flow runs none of its code."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import flow_document

from decide.functions import FunctionPolicy, Functions
from decide.mapping import UNDEFINED, DestinationMapping, compile_value
from pipeline.cli import main as cli_main

FAST = FunctionPolicy(time_limit_s=0.2, memory_limit_mb=32)
EVENT = {
    "name": "order complete",
    "data": {"id": "0rd3r1d", "total": 555},
    "user": {"id": "us3r"},
    "consent": {"functional": True},
}


def js_value(source: str, policy: FunctionPolicy = FAST, errors: list | None = None, **config):
    seen = errors if errors is not None else []
    return compile_value(
        {"fn": f"$code:{source}", **config},
        "$.v",
        on_error=lambda place, exc: seen.append(str(exc)),
        functions=Functions(policy),
    )


# --- walkerOS's calling convention -------------------------------------------------------------


def test_fn_gets_the_value_and_walkeros_context() -> None:
    value = js_value(
        "(value, context) => [value.data.id, context.event.name, context.mapping.value,"
        " context.consent, context.collector.globals.env, typeof context.logger.warn]",
        value="static",
    )
    # the static value is what fn's context.mapping shows, but fn gets the input
    assert value(EVENT, {"event": EVENT, "collector": {"globals": {"env": "prod"}}}) == [
        "0rd3r1d",
        "order complete",
        "static",
        {"functional": True},
        "prod",
        "function",
    ]


def test_logger_calls_are_harmless() -> None:
    value = js_value(
        "(v, c) => { c.logger.info('i'); c.logger.warn('w'); c.logger.error('e');"
        " c.logger.debug('d'); c.logger.json({}); return 'logged'; }"
    )
    assert value(EVENT) == "logged"


def test_async_functions_are_awaited_and_rule_conditions_are_not() -> None:
    assert js_value("async (value) => value.data.total + 1")(EVENT) == 556
    assert compile_value({"value": "x", "condition": "$code:async () => false"}, "$.v")(EVENT) is UNDEFINED
    # walkerOS calls a rule condition without awaiting it: a promise is truthy, so it matches
    mapping = DestinationMapping(
        {"mapping": {"order": {"complete": [{"condition": "$code:async () => false", "name": "A"}, {"name": "B"}]}}}
    )
    assert mapping.process(EVENT).event["name"] == "A"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("() => [1, undefined, 2]", [1, UNDEFINED, 2]),  # holes stay holes
        ("() => ({a: 1, b: undefined})", {"a": 1}),
        ("() => 2 ** 53", 2**53),
        ("() => 0.1 + 0.2", 0.1 + 0.2),
        ("() => 'ü \\u0000 \"q\"'", 'ü \x00 "q"'),
        ("() => new Date(0)", UNDEFINED),  # not a walkerOS property
        ("() => ({f: () => 1})", UNDEFINED),
        ("() => [1, null]", UNDEFINED),
        ("() => NaN", UNDEFINED),
        ("() => 10n", UNDEFINED),
        ("() => { const a = {}; a.self = a; return a; }", UNDEFINED),
    ],
)
def test_results_cross_as_walkeros_properties(source: str, expected) -> None:
    assert js_value(source).raw(EVENT) == expected


@pytest.mark.parametrize("length", [10, 300, 5_000, 200_000])
@pytest.mark.parametrize("awaited", [False, True])
def test_long_concatenated_results_and_errors_cross_whole(length: int, awaited: bool) -> None:
    # quickjs-ng keeps a long concatenation as a rope string, which the binding cannot
    # convert: such results once became function errors from about 300 characters on.
    prefix = "async " if awaited else ""
    assert js_value(f"{prefix}(v) => v + v")("a" * length) == "a" * (2 * length)
    assert js_value(f"{prefix}(v) => ({{text: v + '!'}})")("b" * length) == {"text": "b" * length + "!"}
    assert js_value(f"{prefix}(v) => [v, v + v]")("c" * length) == ["c" * length, "c" * (2 * length)]
    errors: list = []
    assert js_value("(v) => { throw new Error('e'.repeat(900) + v) }", errors=errors)("d" * length) is UNDEFINED
    assert errors and errors[0].endswith("d" * min(length, 10))


def test_strings_and_values_with_the_hole_marker_text_are_not_mistaken_for_holes() -> None:
    assert js_value("(v) => [v, 'x', '']")("\ue000hole:") == ["\ue000hole:", "x", ""]
    assert js_value("(v) => [v, undefined, '']").raw("a\x00b") == ["a\x00b", UNDEFINED, ""]


# --- hostile functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "() => { while (true) {} }",
        "() => { for (;;) { [].concat([1]); } }",
        "() => /(a+)+$/.test('a'.repeat(40) + 'b')",  # catastrophic backtracking
        "async () => { await null; while (true) {} }",
    ],
)
def test_a_function_that_never_returns_is_a_counted_error(source: str) -> None:
    errors: list[str] = []
    value = js_value(source, errors=errors, value="fallback")
    started = time.monotonic()
    assert value(EVENT) == "fallback"
    assert errors and "interrupted" in errors[0]
    # a CPU-time limit: generous wall-time bound for a loaded machine
    assert time.monotonic() - started < 20
    assert js_value("(v) => v.data.id")(EVENT) == "0rd3r1d"


def _beside_a_plain_function(source: str):
    """A function from ``source`` and a plain one in the same sandbox (32 MB), with the errors."""
    errors: list[str] = []
    functions = Functions(FunctionPolicy(time_limit_s=10, memory_limit_mb=32))
    value = compile_value(
        {"fn": f"$code:{source}"}, "$.v", on_error=lambda p, e: errors.append(str(e)), functions=functions
    )
    fine = compile_value({"fn": "$code:(v) => v.data.id"}, "$.w", functions=functions)
    return value, fine, errors, functions


def test_a_function_that_allocates_without_end_is_a_counted_error_and_the_sandbox_recovers() -> None:
    hog, fine, errors, _ = _beside_a_plain_function(
        "() => { const a = []; for (;;) a.push('x'.repeat(1e5) + a.length); }"
    )
    for _ in range(3):
        assert hog(EVENT) is UNDEFINED
        assert fine(EVENT) == "0rd3r1d"
    assert len(errors) == 3 and all("out of memory" in e for e in errors)


def test_garbage_that_failed_calls_leave_behind_never_fails_a_later_call() -> None:
    # Each failed call leaves a 1 MB cycle, which only a full collection frees.
    leaky, fine, errors, functions = _beside_a_plain_function(
        "(e) => { const a = {big: 'y'.repeat(1 << 20) + e.name}; a.self = a; throw new Error('no'); }"
    )
    for _ in range(100):
        assert leaky(EVENT) is UNDEFINED
    assert fine(EVENT) == "0rd3r1d"
    assert errors == ["Error: no"] * 100  # its own error every time, never "out of memory"
    assert functions._sandbox().context.memory()["malloc_size"] < 32 << 20


@pytest.mark.parametrize(
    "source",
    [
        "() => require('fs').readFileSync('/etc/passwd', 'utf8')",
        "() => process.exit(1)",
        "() => std.loadFile('/etc/passwd')",
        "() => os.exec(['/bin/true'])",
        "() => fetch('http://127.0.0.1/')",
        "() => new XMLHttpRequest()",
        "async () => (await import('os')).getcwd()",
        "() => setTimeout(() => 1, 0)",
        "() => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0)",
    ],
)
def test_no_file_network_process_module_or_blocking_access(source: str) -> None:
    errors: list[str] = []
    assert js_value(source, errors=errors)(EVENT) is UNDEFINED
    assert len(errors) == 1


@pytest.mark.parametrize(
    "tamper",
    [
        "globalThis.leak = 'x'",
        "leak = 'x'",
        "Array.prototype.map = () => 'tampered'",
        "JSON.stringify = () => '\"tampered\"'",
        "Object.prototype.leak = 'x'",
        "Object.defineProperty(globalThis, 'leak', {value: 'x'})",
        "String.prototype.toUpperCase = () => 'tampered'",
        "Math.max = () => 'tampered'",
    ],
)
def test_global_tampering_cannot_reach_the_next_call(tamper: str) -> None:
    functions = Functions(FAST)
    errors: list[str] = []
    bad = compile_value(
        {"fn": f"$code:(v) => {{ {tamper}; return 'done'; }}"},
        "$.bad",
        on_error=lambda p, e: errors.append(str(e)),
        functions=functions,
    )
    probe = compile_value(
        {
            "fn": "$code:(v) => [typeof leak, ({}).leak === undefined, [1].map(x => x + 1),"
            " JSON.stringify('a'), 'a'.toUpperCase(), Math.max(1, 2)]"
        },
        "$.probe",
        functions=functions,
    )
    assert bad(EVENT) is UNDEFINED and len(errors) == 1  # strict mode: the write throws
    assert probe(EVENT) == ["undefined", True, [2], '"a"', "A", 2]


def test_changing_the_context_or_the_input_does_not_change_the_next_call() -> None:
    functions = Functions(FAST)
    mutate = compile_value(
        {
            "fn": "$code:(v, c) => { v.data.id = 'changed'; c.event.name = 'changed';"
            " c.consent.marketing = true; return 1; }"
        },
        "$.m",
        functions=functions,
    )
    read = compile_value({"fn": "$code:(v, c) => [v.data.id, c.event.name, c.consent]"}, "$.r", functions=functions)
    event = json.loads(json.dumps(EVENT))
    assert mutate(event, {"event": event}) == 1
    assert event == EVENT  # the pipeline's event is never changed
    # the same event's functions share one copy, as walkerOS's share the event object ...
    assert read(event, {"event": event})[:2] == ["changed", "changed"]
    # ... and the next event starts afresh, even one with the very same content
    following = json.loads(json.dumps(EVENT))
    assert read(following, {"event": following}) == ["0rd3r1d", "order complete", {"functional": True}]
    # the context's mapping is frozen: a function cannot rewrite the config it was given
    frozen = js_value("(v, c) => { c.mapping.value = 'x'; return 1; }", value="static")
    assert frozen(EVENT) == "static"


# --- compiled once per thread, never while validating or pickling --------------------------------


def test_compiling_and_validating_run_none_of_the_code(tmp_path, capsys) -> None:
    # An expression that would hang when evaluated: compiling only parses it.
    started = time.monotonic()
    value = compile_value(
        {"fn": "$code:(() => { while (true) {} })()"}, "$.v", functions=Functions(FunctionPolicy(time_limit_s=30))
    )
    assert time.monotonic() - started < 5
    assert value is not None
    path = _flow_file(
        tmp_path,
        mapping={"order": {"complete": {"data": {"map": {"id": {"fn": "$code:(() => { while (true) {} })()"}}}}}},
    )
    started = time.monotonic()
    assert cli_main(["validate", "--flow", str(path), "--function_time_limit_seconds", "30"]) == 0
    assert time.monotonic() - started < 10
    assert capsys.readouterr().out.strip() == "ok"


def test_validate_names_every_place_with_a_javascript_syntax_error(tmp_path, capsys) -> None:
    path = _flow_file(
        tmp_path,
        settings={"identify": {"map": {"a": {"fn": "$code:(v) => {"}}}},
        mapping={
            "order": {
                "complete": {
                    "condition": "$code:(event) => event.data.total >",
                    "data": {"value": {"fn": "$code:this is data, not code"}, "fn": "$code:(v) =>\n  v.data.id)"},
                }
            }
        },
    )
    assert cli_main(["validate", "--flow", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    where = "$.flows.default.destinations.segment.config"
    assert [line.split(": ")[0] for line in lines] == [
        f"{where}.settings.identify.map.a.fn",
        f"{where}.mapping.order.complete.condition",
        f"{where}.mapping.order.complete.data.fn",
    ]
    assert all("$code is not valid JavaScript: SyntaxError" in line for line in lines)
    assert "(at the end of line 2)" in lines[2]


def test_python_functions_need_the_flag(tmp_path, capsys) -> None:
    path = _flow_file(tmp_path, data={"map": {"id": {"fn": "$py:lambda value, context: value['data']['id']"}}})
    assert cli_main(["validate", "--flow", str(path)]) == 2
    assert "--allow_python_functions" in capsys.readouterr().err
    assert cli_main(["validate", "--flow", str(path), "--allow_python_functions"]) == 0
    assert cli_main(["validate", "--flow", str(path), "--function_time_limit_seconds", "0"]) == 2
    assert "--function_time_limit_seconds" in capsys.readouterr().err


def test_a_pickled_mapping_builds_a_sandbox_per_thread_on_first_use() -> None:
    mapping = DestinationMapping(
        {
            "data": {
                "map": {
                    "id": {"fn": "$code:(v) => v.data.id.toUpperCase()"},
                    "n": {"fn": "$code:(() => { let calls = 0; return () => ++calls > 0; })()"},
                }
            }
        },
        functions=Functions(FAST),
    )
    restored = pickle.loads(pickle.dumps(mapping))
    assert getattr(restored._functions._local, "sandbox", None) is None  # nothing built yet
    results: list = []
    failures: list = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                event = {"name": "x y", "data": {"id": f"t{n}-{i}"}}
                results.append(restored.process(event).data == {"id": f"T{n}-{i}", "n": True})
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(results) == 200 and all(results)
    assert restored.error_counts == {}


# --- $py: Python functions -----------------------------------------------------------------------

PY = FunctionPolicy(allow_python=True, time_limit_s=0.2)


def test_python_functions_run_with_the_flag() -> None:
    value = compile_value(
        {"fn": "$py:lambda value, context: [value['data']['id'], context['event']['name']]"},
        "$.v",
        functions=Functions(PY),
    )
    assert value(EVENT, {"event": EVENT}) == ["0rd3r1d", "order complete"]


def test_a_python_function_that_never_returns_is_stopped_on_any_thread() -> None:
    errors: list[str] = []
    value = compile_value(
        {"value": "fallback", "fn": "$py:lambda value, context: [0 for _ in iter(int, 1)]"},
        "$.v",
        on_error=lambda p, e: errors.append(str(e)),
        functions=Functions(PY),
    )
    quick = compile_value({"fn": "$py:lambda value, context: value['data']['id']"}, "$.q", functions=Functions(PY))
    outcome: list = []

    def work() -> None:
        started = time.monotonic()
        outcome.append(value(EVENT))
        outcome.append(time.monotonic() - started)
        # no late exception lands in the code that runs after the call
        for _ in range(2000):
            outcome.append(quick(EVENT))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert outcome[0] == "fallback" and outcome[1] < 10
    assert outcome[2:] == ["0rd3r1d"] * 2000
    assert errors == ["did not return within 0.2 s"]


def test_a_python_function_is_stopped_after_the_watchdog_went_to_sleep() -> None:
    """The watchdog sleeps once a poll went by without a call; the next call must wake it."""
    errors: list[str] = []
    functions = Functions(PY)
    quick = compile_value({"fn": "$py:lambda value, context: 1"}, "$.q", functions=functions)
    endless = compile_value(
        {"value": "fallback", "fn": "$py:lambda value, context: [0 for _ in iter(int, 1)]"},
        "$.v",
        on_error=lambda p, e: errors.append(str(e)),
        functions=functions,
    )
    for pause in (0.0, 0.3, 1.0):
        assert quick(EVENT) == 1
        time.sleep(pause)  # long enough for the watchdog to go to sleep, from the second round
        started = time.monotonic()
        assert endless(EVENT) == "fallback"
        assert time.monotonic() - started < 5
    assert errors == ["did not return within 0.2 s"] * 3


def test_a_python_function_due_first_is_stopped_first_whatever_started_before_it() -> None:
    """The watchdog sleeps until the soonest deadline it knows of: a call with a shorter limit,
    started while a longer one runs, must wake it and be stopped at its own limit."""
    errors: list[str] = []

    def endless(limit: float):
        return compile_value(
            {"value": "fallback", "fn": "$py:lambda value, context: [0 for _ in iter(int, 1)]"},
            "$.v",
            on_error=lambda p, e: errors.append(str(e)),
            functions=Functions(FunctionPolicy(allow_python=True, time_limit_s=limit)),
        )

    slow, quick = endless(3.0), endless(0.2)
    took: dict[str, float] = {}

    def work(name: str, value) -> None:
        started = time.monotonic()
        assert value(EVENT) == "fallback"
        took[name] = time.monotonic() - started

    long_call = threading.Thread(target=work, args=("slow", slow))
    long_call.start()
    time.sleep(0.3)  # the watchdog has looked and sleeps until the slow call is due
    short_call = threading.Thread(target=work, args=("quick", quick))
    short_call.start()
    short_call.join(10)
    long_call.join(10)
    assert took["quick"] < 1.5 and took["slow"] >= 3.0
    assert sorted(errors) == ["did not return within 0.2 s", "did not return within 3 s"]


def test_a_fast_python_function_is_never_interrupted() -> None:
    value = compile_value({"fn": "$py:lambda value, context: sum(range(1000))"}, "$.v", functions=Functions(PY))
    assert all(value(EVENT) == 499500 for _ in range(3000))


def test_endless_recursion_is_a_counted_error_on_any_thread() -> None:
    errors: list[str] = []
    value = js_value("() => { const f = (n) => f(n + 1) + 1; return f(0); }", errors=errors, value="fallback")
    results: list = []
    thread = threading.Thread(target=lambda: results.append(value(EVENT)))
    thread.start()
    thread.join()
    assert results == ["fallback"] and value(EVENT) == "fallback"
    assert errors == ["RangeError: Maximum call stack size exceeded"] * 2


# --- the event as functions see it ------------------------------------------------------------------
# The event a function gets is built a top-level key at a time when read (see lazyObject in
# transforms.functions); everything else must behave as on the plain object walkerOS hands over.
# Each expression runs on the event itself (the lazily built one) and on a copy handed over as a
# plain value, whose JSON the engine parses whole: the answers must be the same.

ODD_EVENT = {
    "data": {"name": "inner", "text": 'a",\n  "name": "fake'},
    "name": "outer",
    'quote"d': 1,
    "back\\slash": [2],
    "üml": {"x": None},
    "__proto__": {"p": 1},
    "constructor": "c",
    "line\nbreak": True,
    "empty": {},
    "list": [],
    "zero": 0,
    "null": None,
    "s": 'q"uo\\te',
    "": "blank",
}

PLAIN_OBJECT_PROBES = [
    "Object.keys(e)",
    "JSON.stringify(e)",
    "Object.entries(e).map(([k, v]) => k + '=' + JSON.stringify(v))",
    "{ const keys = []; for (const k in e) keys.push(k); return keys; }",
    "({...e})",
    "Object.assign({}, e)",
    "[typeof e, Array.isArray(e), Object.prototype.toString.call(e), String(e)]",
    "[Object.getPrototypeOf(e) === Object.prototype, e.constructor === Object || e.constructor]",
    "['name' in e, 'data' in e, 'nope' in e, 'toString' in e, '__proto__' in e, 'üml' in e,"
    " 'quote\"d' in e, 'line\\nbreak' in e, '' in e]",
    "[e.nope, e.name, e.data, e['quote\"d'], e['back\\\\slash'], e['üml'], e['line\\nbreak'], e[''],"
    " e.s, e.zero, e.null, e.empty, e.list]",
    "[e.hasOwnProperty('name'), Object.hasOwn(e, 'nope'), Object.hasOwn(e, '__proto__')]",
    "Object.getOwnPropertyDescriptor(e, 'name')",
    "[e.data === e.data, e.empty === e.empty]",
    "{ e.data.name = 'changed'; if (e.list) e.list.push(1); return JSON.stringify(e); }",
    "{ const d = e.data; e.name = 'renamed'; return [d === e.data, JSON.stringify(e)]; }",
    "{ e.added = 1; delete e.name; return [Object.keys(e), e.added, 'name' in e]; }",
    "{ Object.freeze(e); return [Object.isFrozen(e), e.data.name, Object.keys(e).length]; }",
    "{ Object.defineProperty(e, 'name', {value: 'defined', enumerable: false}); return [Object.keys(e), e.name]; }",
    "{ Object.setPrototypeOf(e, {inherited: 1}); return [e.inherited, 'inherited' in e, e.nope]; }",
    "Object.getOwnPropertyNames(e).length",
]


@pytest.mark.parametrize("probe", PLAIN_OBJECT_PROBES)
@pytest.mark.parametrize("event", [EVENT, ODD_EVENT], ids=["event", "odd keys"])
def test_the_event_behaves_as_a_plain_object(probe: str, event: dict) -> None:
    body = probe[1:-1] if probe.startswith("{") else f"return ({probe});"
    source = f"(e) => JSON.stringify((() => {{ {body} }})())"
    lazy_errors: list[str] = []
    whole_errors: list[str] = []
    lazily = js_value(source, errors=lazy_errors)(json.loads(json.dumps(event)))  # the event itself
    copy = json.loads(json.dumps(event))
    whole = js_value(source, errors=whole_errors)(copy, {"event": {"name": "another"}})  # a value
    assert (lazily, lazy_errors) == (whole, whole_errors)
    assert isinstance(lazily, str) or whole_errors  # the probe ran, or threw alike on both


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(event=st.dictionaries(st.text(max_size=6), json_values, max_size=6), probe=st.text(max_size=6))
def test_any_event_reads_as_its_plain_object(event: dict, probe: str) -> None:
    # Each key read alone, a key that may be missing, then the whole object.
    value = js_value(
        "(e) => JSON.stringify([Object.keys(e).length, ...Object.keys(JSON.parse(JSON.stringify(e))).map(k => e[k])])"
    )
    reads = js_value(
        f"(e) => JSON.stringify([e[{json.dumps(probe)}], {json.dumps(probe)} in e,"
        f" ...{json.dumps(list(event))}.map(k => e[k]), e])"
    )
    copy = json.loads(json.dumps(event))
    for function in (value, reads):
        assert function(json.loads(json.dumps(event))) == function(copy, {"event": {}})


def test_one_events_functions_share_the_event_and_the_next_event_starts_afresh() -> None:
    functions = Functions(FAST)
    errors: list[str] = []
    change = compile_value(
        {"fn": "$code:(e) => { e.data.id = 'changed'; e.extra = 1; return 1; }"}, "$.c", functions=functions
    )
    change_and_throw = compile_value(
        {"fn": "$code:(e) => { e.name = 'thrown'; throw new Error('x'); }"},
        "$.t",
        on_error=lambda p, exc: errors.append(str(exc)),
        functions=functions,
    )
    read = compile_value(
        {"fn": "$code:(e) => [e.data.id, e.extra === undefined ? 'none' : e.extra, e.name, Object.keys(e).length]"},
        "$.r",
        functions=functions,
    )
    read_context = compile_value(
        {"fn": "$code:(v, c) => [c.event.data.id, c.event === v]"}, "$.rc", functions=functions
    )
    event = json.loads(json.dumps(EVENT))
    assert read(event) == ["0rd3r1d", "none", "order complete", 4]
    assert change(event) == 1
    assert change_and_throw(event) is UNDEFINED and len(errors) == 1
    # what the earlier functions did to this event, the later ones see (as in walkerOS) ...
    assert read(event) == ["changed", 1, "thrown", 5]
    assert read_context(event) == ["changed", True]
    assert event == EVENT  # ... never the pipeline's own event
    following = json.loads(json.dumps(EVENT))
    assert read(following) == ["0rd3r1d", "none", "order complete", 4]
    assert read_context(following) == ["0rd3r1d", True]


@pytest.mark.parametrize(
    "source",
    [
        "(v, c) => c.event.name",
        "(v, c = null) => c.event.name",  # length 1, yet it takes the context
        "(v, {event} = {}) => event.name",
        "(...args) => args[1].event.name",
        "function (v) { return arguments[1].event.name; }",
        "function (v) { return eval('arguments')[1].event.name; }",
        "async (v, c) => c.event.name",
        "(v) => 0, (v, c = 0) => c.event.name",  # the comma expression's last function
    ],
)
def test_functions_that_can_see_the_context_get_it(source: str) -> None:
    assert js_value(source)({"id": 1}, {"event": EVENT}) == "order complete"


@pytest.mark.parametrize(
    "source",
    [
        "(v) => v.id",
        "v => v.id",
        "async v => v.id",
        "async (v) => v.id",
        "function (v) { return v.id; }",
        "function named(v) { return v.id; }",
        "(() => (v) => v.id)()",
    ],
)
def test_one_parameter_functions_get_their_value(source: str) -> None:
    assert js_value(source)({"id": 1}, {"event": EVENT}) == 1


def _flow_file(tmp_path, settings: dict | None = None, mapping: dict | None = None, **config):
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow_document(settings, mapping, **config)))
    return path


# --- the keys a function reads: only those cross ------------------------------------------------
# A one-parameter function that only reads `event.key` gets an object with just the keys it reads
# (see keysRead in decide.functions); once a function may read more, the event becomes whole, in
# its own key order, keeping what the functions before did to it. Each sequence below runs twice
# on one event: as written, and with every function made to take the whole event (a bare use of
# its parameter). The answers must be the same.

READ_SEQUENCES = [
    ["(e) => e.name", "(e) => e.data.id", "(e) => JSON.stringify(e)"],
    ["(e) => { e.data.id = 'x'; e.added = 1; return e.added; }", "(e) => JSON.stringify(e)"],
    ["(e) => { delete e.user; return e.name; }", "(e) => [Object.keys(e), 'user' in e]"],
    ["(e) => { e.name = 'renamed'; return 1; }", "(e) => e.name", "(e) => JSON.stringify(Object.entries(e))"],
    ["(e) => e.nope === undefined && e.toString === Object.prototype.toString", "(e) => JSON.stringify(e)"],
    ["(e) => e?.data?.total", "(e) => `${e.name}!`", "(e) => ({...e}).name"],
    ["(e) => e.hasOwnProperty('data')", "(e) => e.propertyIsEnumerable('user')", "(e) => e.valueOf() === e"],
    ["(e) => { const f = (e) => e.length; return f(e.name); }", "(e) => Object.keys(e)"],
    ["(event) => event.name.toUpperCase()", "(ev) => [ev.data, ev['user']]", "function (e) { return e.consent; }"],
    ["(e) => 'e.data' + e.name // e.user", "(e) => [e.data.total, e.nope]", "(e) => Object.keys(e).length"],
    ["(e) => { e.data = {replaced: true}; return e.data; }", "(e) => e", "(e) => JSON.stringify(e)"],
    ["(e) => e.name", "(e) => { throw new Error(e.name); }", "(e) => { e.after = 2; return Object.keys(e); }"],
]


def _whole(source: str) -> str:
    """The same function, taking the whole event: its parameter named once on its own."""
    if source.startswith("function"):
        return source.replace("{ ", "{ void e; ", 1)
    parameter, _, body = source.partition("=>")
    name, body = parameter.strip().strip("()").strip(), body.strip()
    if body.startswith("{"):
        return f"({name}) => {{ void {name}; {body[1:]}"
    return f"({name}) => {{ void {name}; return ({body}\n); }}"


def _on_one_event(sources: list[str], event: dict, words: bool = True) -> list:
    """Each source's answer, the functions called in turn on (a copy of) one event, then the
    errors by place: with their words, or (words=False) only their type."""
    functions = Functions(FAST)
    errors: list[str] = []

    def record(place: str, exc: BaseException) -> None:
        errors.append(f"{place}: {exc if words else str(exc).split(':')[0]}")

    values = [
        compile_value({"fn": f"$code:{source}"}, f"$.v{i}", on_error=record, functions=functions)
        for i, source in enumerate(sources)
    ]
    copy = json.loads(json.dumps(event))
    return [value(copy) for value in values] + [errors]


@pytest.mark.parametrize("sequence", READ_SEQUENCES)
def test_functions_reading_some_keys_answer_as_on_the_whole_event(sequence: list[str]) -> None:
    event = {**EVENT, "list": [1, 2]}
    assert _on_one_event(sequence, event) == _on_one_event([_whole(source) for source in sequence], event)


@pytest.mark.parametrize(
    ("source", "keys"),
    [
        ("(e) => e.name", ["name"]),
        ("(event) => event.data.id + event.name.length", ["data", "name"]),
        ("(e) => e?.user?.id", ["user"]),
        ("(e) => { e.x = 1; delete e.y; return e.x; }", ["x", "y"]),
        ("(e) => 'e' + e.name", None),  # a bare `e` in a string: taken as code, so all of it
        ("(e) => e", None),
        ("(e) => ({...e})", None),
        ("(e) => Object.keys(e)", None),
        ("(e) => e.hasOwnProperty('x')", None),  # a method sees the whole event as `this`
        ("(e) => e.name`x`", None),
        ("(e) => e.f?.()", None),
        ("(e) => e['name']", None),
        ("(e) => eval('e.name')", None),
        ("(e) => \\u0065.name", None),
        ("(e) => other.e + e.name", ["name"]),
        ("(e) => { let x = 1.\ne.data; return x; }", ["data"]),  # `1.` is a number: `e` is ours
        ("function (e) { return arguments[0].name; }", None),
        ("({name}) => name", None),
    ],
)
def test_the_keys_a_function_reads_are_found_conservatively(source: str, keys: list | None) -> None:
    functions = Functions(FAST)
    functions.compile(f"$code:{source}", "$.v", {}, predicate=False)
    sandbox = functions._sandbox()
    assert sandbox.reads[0] == (None if keys is None else frozenset(keys))


_KEYS = st.sampled_from(["name", "data", "user", "nope", "list", "__proto__", "constructor", "toString", "0", "a b"])


@settings(max_examples=40, deadline=None)
@given(
    event=st.dictionaries(st.sampled_from(["name", "data", "user", "list", "0", "a b", "__proto__"]), json_values),
    steps=st.lists(st.tuples(st.sampled_from(["read", "write", "delete", "whole"]), _KEYS), min_size=1, max_size=5),
)
def test_any_sequence_of_key_reads_and_writes_answers_as_on_the_whole_event(event: dict, steps: list) -> None:
    # One function per step, all on one event: reads, writes and deletes of keys (partial when
    # the key is a plain identifier), or a look at the whole event; then the whole event.
    def source(step: tuple[str, str]) -> str:
        action, key = step
        member = f"e.{key}" if key.isidentifier() else f"e[{json.dumps(key)}]"
        return {
            "read": f"(e) => JSON.stringify([{member}])",
            "write": f"(e) => {{ {member} = 'w'; return 1; }}",
            "delete": f"(e) => {{ delete {member}; return 1; }}",
            "whole": "(e) => JSON.stringify([Object.keys(e), e])",
        }[action]

    # The one difference, documented: a key deleted and set again by the functions that read
    # only it keeps its place in the event's order when the event becomes whole.
    assume(
        not any(
            action == "delete" and ("write", key) in steps[position + 1 :]
            for position, (action, key) in enumerate(steps)
        )
    )
    sources = [source(step) for step in steps] + ["(e) => JSON.stringify([Object.keys(e), e])"]

    # Where and which error, not its words: writing a name the frozen realm holds read-only
    # (`e.constructor = …`) fails on both, worded by the Proxy or not.
    whole = [_whole(text) for text in sources]
    assert _on_one_event(sources, event, words=False) == _on_one_event(whole, event, words=False)
