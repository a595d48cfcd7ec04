"""User functions in a flow: `$code:` JavaScript in a sandbox, `$py:` Python behind a flag.

walkerOS flow files write `fn`, `condition` and `validate` as `"$code:<JavaScript>"`: an
expression giving a function, called as `fn(value, context)`. They run here in QuickJS
(the `quickjs-ng` wheel), in process, with nothing but the language itself: no file system,
network, process, timers or module loader. Every call has a CPU-time limit and the engine a
memory limit; a call that exceeds either, throws, or returns something that is no walkerOS
property is an error for that value only.

One JavaScript context per thread: a QuickJS runtime must not be entered by two threads at
once, and Beam calls one DoFn from several threads. A thread's context is built on its first
call (never while a flow is only validated or pickled), and compiles every function of the
flow once. The realm is frozen before any user code runs, so no function can leave state in
a global, a prototype or a builtin for the next event.

`$py:` functions are Python expressions run with the worker's full rights; they are refused
unless the flow is run with --allow_python_functions. A watchdog thread interrupts a call that
runs past its time limit (see `PythonDeadline`).
"""
from __future__ import annotations

import builtins
import ctypes
import datetime
import hashlib
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from decide.paths import UNDEFINED

JS_PREFIX = "$code:"
PY_PREFIX = "$py:"

DEFAULT_TIME_LIMIT_S = 1.0
DEFAULT_MEMORY_LIMIT_MB = 64


class FunctionSyntaxError(ValueError):
    """A function that does not compile; the message says where in its source."""


class FunctionNotAllowed(ValueError):
    """A `$py:` function in a flow run without --allow_python_functions."""


class FunctionError(Exception):
    """A call that failed inside the sandbox: it threw, ran out of time or memory."""


class FunctionTimeout(BaseException):
    """Raised into a Python function's thread when its call runs out of time. A BaseException,
    so a user's `except Exception` cannot swallow it."""


@dataclass(frozen=True)
class FunctionPolicy:
    """How user functions may run; part of the destination spec, so it travels to workers."""
    allow_python: bool = False
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB


# --- JavaScript -------------------------------------------------------------------------------

# Runs once per context, before any user code. Everything the host needs is kept in this
# closure (user code cannot reach it); then every object reachable from globalThis is frozen.
_PRELUDE = r"""
(function (token) {
  "use strict";
  const parse = JSON.parse, stringify = JSON.stringify, isArray = Array.isArray;
  const toTag = Function.prototype.call.bind(Object.prototype.toString);
  const ownKeys = Reflect.ownKeys, getDescriptor = Object.getOwnPropertyDescriptor;
  const getProto = Object.getPrototypeOf, freeze = Object.freeze, defineProperty = Object.defineProperty;
  const isPromise = (v) => v instanceof Promise;
  const then = Function.prototype.call.bind(Promise.prototype.then);
  const FunctionCtor = Function;
  const fns = [], mappings = [];
  const noop = () => undefined;
  const logger = freeze({error: noop, warn: noop, info: noop, debug: noop, json: noop,
                         throw: (message) => { throw new Error(String(message)); },
                         scope: () => logger});
  let settled = null;

  function deepFreeze(root) {
    const seen = new Set(), stack = [root];
    while (stack.length) {
      const item = stack.pop();
      if (item === null || (typeof item !== "object" && typeof item !== "function") || seen.has(item)) continue;
      seen.add(item);
      for (const key of ownKeys(item)) {
        const d = getDescriptor(item, key);
        if ("value" in d) stack.push(d.value); else { stack.push(d.get); stack.push(d.set); }
      }
      stack.push(getProto(item));
      freeze(item);
    }
    return root;
  }
  // 0: not a walkerOS property; 1: a property; 2: a property with undefined inside a list.
  function kind(v, depth) {
    const t = typeof v;
    if (t === "string" || t === "boolean") return 1;
    if (t === "number") return v === v ? 1 : 0;
    if (v === undefined) return 2;
    if (v === null || t !== "object" || depth > 250) return 0;
    let result = 1;
    if (isArray(v)) {
      for (let i = 0; i < v.length; i++) {
        const k = kind(v[i], depth + 1);
        if (k === 0) return 0;
        if (k === 2) result = 2;
      }
      return result;
    }
    if (toTag(v) !== "[object Object]") return 0;
    for (const key in v) {
      const k = kind(v[key], depth + 1);
      if (k === 0) return 0;
      if (k === 2 && v[key] !== undefined) result = 2;
    }
    return result;
  }
  function holes(key, value) { return value === undefined && isArray(this) ? token : value; }
  // Values cross as text: "" undefined, "s…" a string as it is, "j…" JSON.
  function decodeInput(text) {
    if (text === "") return undefined;
    return text[0] === "s" ? text.slice(1) : parse(text.slice(1));
  }
  function encode(r) {
    if (typeof r === "string") return r.indexOf("\0") === -1 ? "s" + r : "j" + stringify(r);
    if (r === undefined) return "u";
    const k = kind(r, 0);
    if (k === 0) return "x";
    return k === 2 ? "h" + stringify(r, holes) : "j" + stringify(r);
  }
  // The context's event, collector and consent arrive as JSON and are parsed only when read.
  // One event's functions share one parsed event, as walkerOS's functions share the event
  // object; `serial` changes with every event the host hands over, so nothing one event's
  // functions do to it reaches the next event.
  let eventSerial = -1, eventObject;
  function eventFor(serial, text, parsed) {
    if (serial !== eventSerial) { eventObject = parsed ?? decodeInput(text); eventSerial = serial; }
    return eventObject;
  }
  class Context {
    #serial; #event; #collector; #consent;
    constructor(i, serial, eventJson, collectorJson, consentJson) {
      this.#serial = serial; this.#event = eventJson; this.#collector = collectorJson; this.#consent = consentJson;
      this.mapping = mappings[i];
      this.logger = logger;
    }
    get event() { if (typeof this.#event === "string") this.#event = [eventFor(this.#serial, this.#event)]; return this.#event[0]; }
    set event(v) { this.#event = [v]; }
    get collector() { if (typeof this.#collector === "string") this.#collector = [decodeInput(this.#collector)]; return this.#collector[0]; }
    set collector(v) { this.#collector = [v]; }
    get consent() { if (typeof this.#consent === "string") this.#consent = [decodeInput(this.#consent)]; return this.#consent[0]; }
    set consent(v) { this.#consent = [v]; }
  }
  function compile(i, source, mappingJson) {
    mappings[i] = deepFreeze(parse(mappingJson));
    let fn;
    try {
      fn = FunctionCtor('"use strict";return (' + source + "\n);")();
    } catch (error) {
      fns[i] = () => { throw error; };
      return;
    }
    fns[i] = typeof fn === "function" ? fn
      : () => { throw new TypeError("the $code expression gave " + typeof fn + ", not a function"); };
  }
  function check(source) {
    try { FunctionCtor('"use strict";return (' + source + "\n);"); return ""; }
    catch (error) { return String(error) + "\n" + String(error.stack || ""); }
  }
  // awaited: value-level functions are awaited in walkerOS; rule conditions are not.
  // valueJson "e": the value is the event itself.
  // parsed: the event already parsed by the host (when the value is the event), else null.
  function call(i, predicate, awaited, valueJson, serial, eventJson, collectorJson, consentJson, parsed) {
    const value = valueJson === "e" ? eventFor(serial, eventJson, parsed) : decodeInput(valueJson);
    const r = fns[i](value, new Context(i, serial, eventJson, collectorJson, consentJson));
    if (awaited && isPromise(r)) {
      settled = null;
      then(r, (v) => { settled = [true, v]; }, (e) => { settled = [false, e]; });
      return predicate ? -1 : "p";
    }
    return predicate ? (r ? 1 : 0) : encode(r);
  }
  function settle(predicate) {
    const s = settled;
    settled = null;
    if (s === null) throw new Error("the function's promise did not settle");
    if (!s[0]) throw s[1];
    return predicate ? (s[1] ? 1 : 0) : encode(s[1]);
  }
  deepFreeze(globalThis);
  const api = {compile, call, settle, check};
  return (name) => api[name];
})
"""

_PROMISE_PREFIX = "p"


def _json(value: Any) -> str:
    """A value as text for the sandbox (see decodeInput): strings as they are, the rest as
    JSON; UNDEFINED as "", holes in lists as JSON's nearest, null."""
    if type(value) is str and "\x00" not in value:  # the binding cuts strings at a NUL
        return "s" + value
    if value is UNDEFINED:
        return ""
    return "j" + orjson.dumps(value, default=_undefined_as_null).decode()


def _undefined_as_null(value: Any) -> Any:
    if value is UNDEFINED:
        return None
    raise TypeError(f"{type(value).__name__} cannot be handed to a function")


_SOURCE_POSITION = re.compile(r"<input>:(\d+):(\d+)")
_WRAPPER_LINES = 2          # QuickJS's Function() puts the body on its third line
_WRAPPER_PREFIX = len('"use strict";return (')


def _syntax_message(report: str, source: str) -> str:
    """QuickJS's "SyntaxError: ... at <input>:L:C" with the position in the user's source."""
    message, _, stack = report.partition("\n")
    found = _SOURCE_POSITION.search(stack)
    if found is None:
        return message
    line, column = int(found.group(1)) - _WRAPPER_LINES, int(found.group(2))
    last_line = source.count("\n") + 1
    if line > last_line:
        # QuickJS stumbled over the wrapper around the source: the source ended too early.
        return (f"SyntaxError: the expression is incomplete or has an unbalanced bracket "
                f"(at the end of line {last_line})")
    if line == 1:
        column -= _WRAPPER_PREFIX
    return f"{message} (line {max(line, 1)}, column {max(column, 1)})"


class _JsSandbox:
    """One QuickJS context (one thread's) with the flow's functions compiled into it."""

    def __init__(self, policy: FunctionPolicy):
        import _quickjs  # quickjs-ng's binding

        # Text no event holds by chance (strings cross without NULs: the binding cuts at one).
        self.token = "\ue000hole:" + secrets.token_hex(16)
        context = _quickjs.Context()
        context.set_memory_limit(policy.memory_limit_mb << 20)
        context.set_time_limit(policy.time_limit_s)
        self.context = context
        api = context.eval(_PRELUDE)(self.token)
        self.compile_fn, self.call_fn = api("compile"), api("call")
        self.settle_fn, self.check_fn = api("settle"), api("check")
        self.compiled = 0
        self.error_type = _quickjs.JSException
        # The functions of one event mostly get the same event, collector and consent: their
        # text is kept for the next call while they are the same objects (and the event has
        # the same name, the one thing the mapping changes in place).
        # The cache holds the event: its id cannot be reused by another while it is cached.
        self._event: tuple[Any, Any, int, str] = (None, None, 0, "")
        self._collector: tuple[Any, str] = (None, "")
        self._consent: tuple[Any, str] = (None, "")
        self._parsed: tuple[int, Any] = (-1, None)

    def parsed_event(self, serial: int, event_text: str) -> Any:
        """The event parsed by the engine's own C parser (quicker than JSON.parse in JS), once
        per event; only asked for when a function gets the event as its value."""
        if self._parsed[0] != serial:
            self._parsed = (serial, self.context.parse_json(event_text[1:])
                            if event_text[:1] == "j" else None)
        return self._parsed[1]

    def texts(self, event: Any, collector: Any, consent: Any) -> tuple[int, str, str, str]:
        """(serial, event, collector, consent): the serial is new with every new event."""
        cached_event, cached_name, serial, event_text = self._event
        name = event.get("name") if type(event) is dict else None
        if cached_event is not event or cached_name != name:
            serial = (serial + 1) & 0x3FFFFFFF
            event_text = _json(event)
            self._event = (event, name, serial, event_text)
        if self._collector[0] is not collector:
            self._collector = (collector, _json(collector))
        if self._consent[0] is not consent:
            self._consent = (consent, _json(consent))
        return serial, event_text, self._collector[1], self._consent[1]

    def check(self, source: str) -> str:
        return self.check_fn(source)

    def compile_up_to(self, functions: list["_JsSource"]) -> None:
        while self.compiled < len(functions):
            item = functions[self.compiled]
            self.compile_fn(self.compiled, item.source, item.mapping_json)
            self.compiled += 1

    def decode(self, encoded: str) -> Any:
        tag, body = encoded[0], encoded[1:]
        if tag == "s":
            return body
        if tag == "u" or tag == "x":
            # "x": no walkerOS property (a Date, a function, null inside...): the mapping's
            # property check makes it undefined, so it is undefined here already.
            return UNDEFINED
        value = orjson.loads(body)
        return _restore_holes(value, self.token) if tag == "h" else value

    def after_failure(self) -> None:
        # What a failed call allocated is unreachable now; give it back before the next call.
        self.context.gc()


def _restore_holes(value: Any, token: str) -> Any:
    if isinstance(value, list):
        return [UNDEFINED if item == token else _restore_holes(item, token) for item in value]
    if isinstance(value, dict):
        return {key: _restore_holes(item, token) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class _JsSource:
    source: str
    path: str
    mapping_json: str


class Functions:
    """The user functions of one destination: compiles `$code:`/`$py:` strings to callables
    `f(value, event, collector, consent)`. Pickles as its policy alone: the owners recompile
    their functions after unpickling, and each thread builds its sandbox on first use."""

    def __init__(self, policy: FunctionPolicy | None = None):
        self.policy = policy or FunctionPolicy()
        self._sources: list[_JsSource] = []
        self._local = threading.local()
        # A `$py:` function gets the event's own objects and may change them in place.
        self.any_python = False

    def __reduce__(self) -> tuple:
        return (Functions, (self.policy,))

    def compile(self, spec: str, path: str, mapping: Any, predicate: bool,
                awaited: bool = True) -> Callable[[Any, Any, Any, Any], Any]:
        """A `$code:` or `$py:` string → a callable; raises FunctionSyntaxError or
        FunctionNotAllowed. Nothing of the function runs here."""
        if spec.startswith(PY_PREFIX):
            return self._python(spec[len(PY_PREFIX):].strip(), path, mapping)
        source = spec[len(JS_PREFIX):].strip()
        problem = check_javascript(source)
        if problem:
            raise FunctionSyntaxError(problem)
        index = len(self._sources)
        self._sources.append(_JsSource(source, path, orjson.dumps(mapping, default=repr).decode()))
        return self._javascript(index, predicate, awaited)

    # -- JavaScript --
    def _sandbox(self) -> _JsSandbox:
        sandbox = getattr(self._local, "sandbox", None)
        if sandbox is None:
            sandbox = self._local.sandbox = _JsSandbox(self.policy)
        if sandbox.compiled < len(self._sources):
            sandbox.compile_up_to(self._sources)
        return sandbox

    def _javascript(self, index: int, predicate: bool, awaited: bool) -> Callable:
        sandbox_for = self._sandbox

        def call_javascript(value: Any, event: Any, collector: Any, consent: Any) -> Any:
            sandbox = sandbox_for()
            try:
                texts = sandbox.texts(event, collector, consent)
                # Functions often get the event itself as their value: parsed once per event.
                if value is event:
                    result = sandbox.call_fn(index, predicate, awaited, "e", *texts,
                                             sandbox.parsed_event(texts[0], texts[1]))
                else:
                    result = sandbox.call_fn(index, predicate, awaited, _json(value), *texts, None)
                if result == -1 or result == _PROMISE_PREFIX:
                    while sandbox.context.execute_pending_job():
                        pass
                    result = sandbox.settle_fn(predicate)
            except sandbox.error_type as exc:
                sandbox.after_failure()
                raise FunctionError(_first_line(exc)) from None
            return bool(result) if predicate else sandbox.decode(result)
        return call_javascript

    # -- Python --
    def _python(self, source: str, path: str, mapping: Any) -> Callable:
        if not self.policy.allow_python:
            raise FunctionNotAllowed(
                "a $py: function runs Python with the worker's full rights; run with "
                "--allow_python_functions to allow it, or write it in JavaScript as $code:")
        try:
            code = compile(source, path, "eval")
        except SyntaxError as exc:
            raise FunctionSyntaxError(f"not a valid Python expression: {exc.msg} "
                                      f"(line {exc.lineno}, column {exc.offset})") from None
        try:
            function = eval(code, _python_namespace())  # allowed by the operator's flag
        except Exception as exc:
            raise FunctionSyntaxError(f"failed to evaluate: {type(exc).__name__}: {exc}") from None
        if not callable(function):
            raise FunctionSyntaxError(f"must evaluate to a callable (value, context), "
                                      f"got {type(function).__name__}")
        deadline = PythonDeadline.shared()
        limit = self.policy.time_limit_s
        self.any_python = True

        def call_python(value: Any, event: Any, collector: Any, consent: Any) -> Any:
            context = {"event": event, "mapping": mapping, "collector": collector,
                       "consent": None if consent is UNDEFINED else consent}
            return deadline.run(function, value, context, limit)
        return call_python


def describe_failure(exc: BaseException) -> str:
    """One line for the log: what a user function did wrong."""
    if isinstance(exc, FunctionError):
        return str(exc)  # already "TypeError: ...", "InternalError: interrupted", "did not return ..."
    return f"{type(exc).__name__}: {exc}"


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0]


_CHECKER = threading.local()


def check_javascript(source: str) -> str:
    """"" when `source` is a JavaScript expression, else the syntax error and where.
    Only parses: nothing of the source runs."""
    checker = getattr(_CHECKER, "sandbox", None)
    if checker is None:
        checker = _CHECKER.sandbox = _JsSandbox(FunctionPolicy())
    report = checker.check(source)
    return _syntax_message(report, source) if report else ""


def _python_namespace() -> dict:
    """Globals of a `$py:` expression: the normal builtins and a few everyday modules.
    A fresh dict per function, so one function cannot leak names into another."""
    return {"__builtins__": builtins, "re": re, "math": math, "json": json,
            "hashlib": hashlib, "datetime": datetime, "UNDEFINED": UNDEFINED}


# --- a time limit for Python functions -----------------------------------------------------------

_raise_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


class PythonDeadline:
    """A per-call time limit for Python functions on any thread.

    `signal.alarm` only reaches the main thread, and Beam calls DoFns on others; a Python
    thread cannot be killed. So one watchdog thread raises FunctionTimeout into the calling
    thread when its call is past the deadline (CPython's PyThreadState_SetAsyncExc). The
    interpreter delivers it at the next bytecode boundary: a loop in Python code is stopped
    within the limit plus a few milliseconds; a single C call that never returns (a
    catastrophic regex, `sum(range(10**15))`, a blocking read) is only stopped when it
    returns. There is no memory limit for Python functions.
    """

    _instance: "PythonDeadline | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "PythonDeadline":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self._lock = threading.Condition()
        self._calls: dict[int, list] = {}  # token → [thread id, deadline, fired, done]
        self._next = 0
        self._thread: threading.Thread | None = None

    def run(self, function: Callable, value: Any, context: dict, limit: float) -> Any:
        slot = self._start(limit)
        try:
            try:
                return function(value, context)
            finally:
                self._stop(slot)
        except FunctionTimeout:
            self._stop(slot)
            raise FunctionError(f"did not return within {limit:g} s") from None

    def _start(self, limit: float) -> list:
        slot = [threading.get_ident(), time.monotonic() + limit, False, False]
        with self._lock:
            self._next += 1
            slot.append(self._next)
            self._calls[self._next] = slot
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="py-function-deadline",
                                                daemon=True)
                self._thread.start()
            if len(self._calls) == 1:
                self._lock.notify()
        return slot

    def _stop(self, slot: list) -> None:
        with self._lock:
            # Popped first: should the fired exception land inside this block, the caller's
            # second _stop finishes the job, and the watchdog no longer sees the call.
            self._calls.pop(slot[4], None)
            if slot[3]:
                return
            slot[3] = True
            if slot[2]:
                # Fired but maybe not yet delivered: take it back before it lands elsewhere.
                _clear_in_thread(slot[0], None)

    def _watch(self) -> None:
        with self._lock:
            while True:
                if not self._calls:
                    self._lock.wait()
                    continue
                now = time.monotonic()
                soonest = None
                for slot in self._calls.values():
                    if slot[2]:
                        continue
                    if slot[1] <= now:
                        slot[2] = True
                        _raise_in_thread(slot[0], FunctionTimeout)
                    elif soonest is None or slot[1] < soonest:
                        soonest = slot[1]
                self._lock.wait(0.05 if soonest is None else min(0.05, max(soonest - now, 0.001)))
