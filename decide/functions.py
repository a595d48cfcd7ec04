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
import itertools
import json
import math
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from threading import get_ident
from time import monotonic
from typing import Any

import orjson

from decide.paths import UNDEFINED, js_truthy

JS_PREFIX = "$code:"
PY_PREFIX = "$py:"

DEFAULT_TIME_LIMIT_S = 1.0
DEFAULT_MEMORY_LIMIT_MB = 64


# A compiled function: f(value, context), the context holding `event`, `collector`, `consent`.
UserFunction = Callable[[Any, Any], Any]


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
  const hasOwn = Object.hasOwn, SetCtor = Set, RegExpCtor = RegExp;
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
    // Not NaN nor ±Infinity: JSON writes those as null, which no walkerOS property holds.
    if (t === "number") return v - v === 0 ? 1 : 0;
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
  // Texts leave for the host flattened: a long concatenation is a rope string in quickjs-ng,
  // which the binding cannot convert (the call would fail for the function's result).
  const flat = (text) => text.slice(0);
  function encode(r) {
    if (typeof r === "string") return flat(r.indexOf("\0") === -1 ? "s" + r : "j" + stringify(r));
    if (r === undefined) return "u";
    const k = kind(r, 0);
    if (k === 0) return "x";
    return flat(k === 2 ? "h" + stringify(r, holes) : "j" + stringify(r));
  }
  // The event, collector and consent the host handed over last, kept between calls: the host
  // sends only what the engine lacks (null: nothing). `eventSerial` changes with every event,
  // so one event's functions share one event object, as walkerOS's functions share the event,
  // and nothing they do to it reaches the next event.
  // An object event crosses in one of two forms. "p…": the top-level keys that the functions
  // called so far read (see keysRead), as JSON, added to one plain object as more functions
  // need more: most functions read a key or two, and the host's JSON of a whole event costs
  // more than the rest of a call. "o…": the whole event (see lazyObject), for a function that
  // may read anything; a partial event then becomes whole (see completeEvent). Anything else
  // crosses as decodeInput's text.
  let eventSerial = -1, eventText = "", eventObject, eventBuilt = false;
  let eventKeys = null;  // the keys sent in "p" form while the event is partial, else null
  let collectorText = "", consentText = "";
  function take(serial, newEventText, newCollectorText, newConsentText) {
    if (serial !== eventSerial) {
      eventSerial = serial; eventText = ""; eventObject = undefined; eventBuilt = false; eventKeys = null;
    }
    if (newEventText !== null) takeEvent(newEventText);
    if (newCollectorText !== null) collectorText = newCollectorText;
    if (newConsentText !== null) consentText = newConsentText;
  }
  // Texts may come twice (the host sends again after a failed call): a key the event has
  // already, or a form it has already, is not taken again.
  function takeEvent(text) {
    const whole = eventBuilt ? eventKeys === null : eventText !== "";
    if (text[0] === "p") {
      if (whole) return;
      const part = parse(text.slice(1));
      if (eventKeys === null) { eventObject = part; eventBuilt = true; eventKeys = new SetCtor(ownKeys(part)); return; }
      for (const key of ownKeys(part)) {
        if (!eventKeys.has(key)) { eventKeys.add(key); defineProperty(eventObject, key, getDescriptor(part, key)); }
      }
    } else if (!whole) {
      if (eventKeys === null) eventText = text;
      else completeEvent(text);
    }
  }
  // The partial event becomes the whole one, in place (a function may hold it), in the
  // event's own key order: the keys sent before stay as the functions left them (changed,
  // deleted), and keys the functions added come last, as on the whole object.
  function completeEvent(text) {
    const event = eventObject, whole = parse(text.slice(1));
    const moveToEnd = (key) => { const d = getDescriptor(event, key); delete event[key]; defineProperty(event, key, d); };
    for (const key of ownKeys(whole)) {
      if (!eventKeys.has(key)) defineProperty(event, key, getDescriptor(whole, key));
      else if (hasOwn(event, key)) moveToEnd(key);
    }
    for (const key of ownKeys(event)) if (!hasOwn(whole, key)) moveToEnd(key);
    eventKeys = null; eventText = text;
  }
  function currentEvent() {
    if (!eventBuilt) { eventObject = decodeEvent(eventText); eventBuilt = true; }
    return eventObject;
  }
  // "o…": an object as JSON indented by two spaces, the rest as decodeInput.
  function decodeEvent(text) { return text[0] === "o" ? lazyObject(text) : decodeInput(text); }

  // An event is mostly read a key or two deep, and QuickJS parses JSON at some 0.2 µs a
  // property: the object is built a top-level key at a time, when read. The text is JSON
  // indented by two spaces, where "\n  \"key\": " only starts a top-level entry and ",\n  \""
  // only ends one (a string holds no raw newline; deeper entries are indented further).
  // Anything beyond reading a key (setting, deleting, listing keys, descriptors, freezing)
  // first builds the whole object, so the Proxy then behaves as the plain object it wraps.
  // The realm is frozen before user code runs: the builtins' methods below are the real ones.
  const plainKey = /^[\x20\x21\x23-\x5b\x5d-\x7e]*$/;  // JSON-encoded alike by every encoder
  const MISSING = {};
  const defineProperties = Object.defineProperties, getDescriptors = Object.getOwnPropertyDescriptors;
  const R = Reflect, ProxyCtor = Proxy, MapCtor = Map;
  // A key's entry starts with "\n  \"key\": "; null for a key that encoders may write
  // differently (quotes, backslashes, control or non-ASCII characters): such a key is looked
  // up in the whole object.
  const needles = new MapCtor();
  function needleOf(key) {
    let needle = needles.get(key);
    if (needle === undefined) {
      needle = plainKey.test(key) ? '\n  "' + key + '": ' : null;
      if (needles.size < 1024) needles.set(key, needle);
    }
    return needle;
  }
  function entryValue(text, needle) {
    const at = text.indexOf(needle);
    if (at === -1) return MISSING;
    const start = at + needle.length;
    let end = text.indexOf(',\n  "', start);
    if (end === -1) end = text.length - 2;  // before the closing "\n}"
    const entry = text.slice(start, end);
    return entry[0] === '"' && entry.indexOf("\\") === -1 ? entry.slice(1, -1) : parse(entry);
  }
  // The Proxy's handler: {text, read: Map of the entries read so far, whole: built}.
  function build(handler, target) {
    if (handler.whole) return;
    handler.whole = true;
    defineProperties(target, getDescriptors(parse(handler.text.slice(1))));
    // What was read before stays the value handed out (and maybe changed) then.
    handler.read.forEach((value, key) => { target[key] = value; });
  }
  const lazyTraps = freeze({
    __proto__: null,
    get(target, key, receiver) {
      if (this.whole || typeof key !== "string") return R.get(target, key, receiver);
      let value = this.read.get(key);
      if (value !== undefined) return value;
      const needle = needleOf(key);
      if (needle === null) { build(this, target); return R.get(target, key, receiver); }
      value = entryValue(this.text, needle);
      if (value === MISSING) return R.get(target, key, receiver);  // not own: the prototype's
      this.read.set(key, value);
      return value;
    },
    has(target, key) {
      if (!this.whole && typeof key === "string") {
        const needle = needleOf(key);
        if (needle === null) build(this, target);
        else if (this.text.indexOf(needle) !== -1) return true;
      }
      return R.has(target, key);
    },
    set(target, key, value, receiver) { build(this, target); return R.set(target, key, value, receiver); },
    ownKeys(target) { build(this, target); return R.ownKeys(target); },
    getOwnPropertyDescriptor(target, key) { build(this, target); return R.getOwnPropertyDescriptor(target, key); },
    defineProperty(target, key, d) { build(this, target); return R.defineProperty(target, key, d); },
    deleteProperty(target, key) { build(this, target); return R.deleteProperty(target, key); },
    preventExtensions(target) { build(this, target); return R.preventExtensions(target); },
  });
  function lazyObject(text) {
    return new ProxyCtor({}, {__proto__: lazyTraps, text, read: new MapCtor(), whole: false});
  }

  // A context holds the texts of its call: read later (a function may keep it), it still
  // gives that call's collector and consent, parsed afresh for every call.
  class Context {
    #serial; #event; #collector; #consent;
    constructor(i) {
      this.#serial = eventSerial; this.#event = eventText;
      this.#collector = collectorText; this.#consent = consentText;
      this.mapping = mappings[i];
      this.logger = logger;
    }
    get event() {
      if (typeof this.#event === "string")
        this.#event = [this.#serial === eventSerial ? currentEvent() : decodeEvent(this.#event)];
      return this.#event[0];
    }
    set event(v) { this.#event = [v]; }
    get collector() { if (typeof this.#collector === "string") this.#collector = [decodeInput(this.#collector)]; return this.#collector[0]; }
    set collector(v) { this.#collector = [v]; }
    get consent() { if (typeof this.#consent === "string") this.#consent = [decodeInput(this.#consent)]; return this.#consent[0]; }
    set consent(v) { this.#consent = [v]; }
  }
  // A function with one plain parameter that never names `arguments` (nor `eval`, which could)
  // cannot see a second argument: it is called without building a context.
  const oneParameter = /^(?:async\s+)?(?:\(\s*[A-Za-z_$][\w$]*\s*\)|[A-Za-z_$][\w$]*)\s*=>|^(?:async\s+)?function\b\s*\*?\s*(?:[A-Za-z_$][\w$]*)?\s*\(\s*[A-Za-z_$][\w$]*\s*\)\s*\{/;
  const mentionsArguments = /arguments|eval/;
  const fnSource = Function.prototype.call.bind(Function.prototype.toString);
  function seesContext(fn) {
    if (fn.length !== 1) return true;
    const source = fnSource(fn);
    return !oneParameter.test(source) || mentionsArguments.test(source);
  }
  // The top-level keys a one-parameter function reads or writes of its value, or null when it
  // may touch more: it names its parameter other than as `parameter.key` (hands it on,
  // enumerates it, spreads it, compares it), calls a method on it (which sees it whole as
  // `this`), or names `eval`, `arguments` or an escaped identifier. Strings and comments are
  // scanned as code: they can only add keys or make the answer null.
  const parameterOf = /^(?:async\s+)?(?:\(\s*([A-Za-z_$][\w$]*)\s*\)|([A-Za-z_$][\w$]*))\s*=>|^(?:async\s+)?function\b\s*\*?\s*(?:[A-Za-z_$][\w$]*)?\s*\(\s*([A-Za-z_$][\w$]*)\s*\)\s*\{/;
  const memberAfter = /^\s*\??\.\s*([A-Za-z_$][\w$]*)\s*(\(|`|\?\.\s*\()?/;
  const escapes = /\\u/, numberBefore = /(?:^|[^\w$])\d[\w.]*$/;
  function keysRead(source) {
    const head = parameterOf.exec(source);
    if (head === null || mentionsArguments.test(source) || escapes.test(source)) return null;
    const name = head[1] || head[2] || head[3], body = source.slice(head[0].length);
    const names = new RegExpCtor("[A-Za-z_$\\u0080-\\uffff][\\w$\\u0080-\\uffff]*", "g");
    const keys = new SetCtor();
    for (let found = names.exec(body); found !== null; found = names.exec(body)) {
      if (found[0] !== name) continue;
      const before = body.slice(0, found.index).trimEnd();
      // another object's property (but not after a spread, nor after a number such as `1.`)
      if (before.endsWith(".") && !before.endsWith("...") && !numberBefore.test(before)) continue;
      const member = memberAfter.exec(body.slice(found.index + name.length));
      if (member === null || member[2] !== undefined) return null;
      keys.add(member[1]);
    }
    return [...keys];
  }
  const contextual = [];
  // → "c" when the function is called with a context, "k" + the JSON of the keys it reads of
  // its value (keysRead), or "w" when it may read all of its value.
  function compile(i, source, mappingJson) {
    mappings[i] = deepFreeze(parse(mappingJson));
    let fn;
    try {
      fn = FunctionCtor('"use strict";return (' + source + "\n);")();
    } catch (error) {
      fns[i] = () => { throw error; };
      contextual[i] = false;
      return "k[]";
    }
    if (typeof fn !== "function") {
      fns[i] = () => { throw new TypeError("the $code expression gave " + typeof fn + ", not a function"); };
      contextual[i] = false;
      return "k[]";
    }
    fns[i] = fn;
    contextual[i] = seesContext(fn);
    if (contextual[i]) return "c";
    const keys = keysRead(fnSource(fn));
    return keys === null ? "w" : flat("k" + stringify(keys));
  }
  function check(source) {
    try { FunctionCtor('"use strict";return (' + source + "\n);"); return ""; }
    catch (error) { return flat(String(error) + "\n" + String(error.stack || "")); }
  }
  // flags: 1 a predicate, 2 awaited (value-level functions are awaited in walkerOS; rule
  // conditions are not). valueText "e": the value is the event itself. The texts are null
  // when they did not change since the last call (see take). Every argument costs a
  // conversion in the binding, so the host calls with as few as the function needs:
  // callValue for a function without a context on another value, callEvent for one on the
  // event, call for one with a context. callEvent and callValue only call functions without one.
  function call(i, flags, valueText, serial, newEventText, newCollectorText, newConsentText) {
    take(serial, newEventText, newCollectorText, newConsentText);
    return invoke(i, flags, valueText === "e" ? currentEvent() : decodeInput(valueText));
  }
  // callEvent and callValue write out their common ends (a boolean for a predicate, a short
  // string otherwise): QuickJS pays some hundreds of instructions for each function call.
  function callEvent(i, flags, serial, newEventText) {
    if (serial !== eventSerial || newEventText !== null) take(serial, newEventText, null, null);
    const r = fns[i](eventBuilt ? eventObject : currentEvent());
    if ((flags & 1) === 1) { if (typeof r !== "object" || r === null) return r ? 1 : 0; }
    else if (typeof r === "string" && r.length < 256 && r.indexOf("\0") === -1) return "s" + r;
    return finish(flags, r);
  }
  function callValue(i, flags, valueText) {
    const r = fns[i](valueText === "" ? undefined : valueText[0] === "s" ? valueText.slice(1) : parse(valueText.slice(1)));
    if ((flags & 1) === 1) { if (typeof r !== "object" || r === null) return r ? 1 : 0; }
    else if (typeof r === "string" && r.length < 256 && r.indexOf("\0") === -1) return "s" + r;
    return finish(flags, r);
  }
  function invoke(i, flags, value) {
    return finish(flags, contextual[i] ? fns[i](value, new Context(i)) : fns[i](value));
  }
  // A result as the host takes it (short strings are flat: no rope to flatten, see flat).
  function finish(flags, r) {
    const predicate = (flags & 1) === 1;
    if ((flags & 2) === 2 && isPromise(r)) {
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
  const api = {compile, call, callEvent, callValue, settle, check};
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


_NOTHING = object()  # no value handed over yet
_WHOLE = object()  # the whole event was handed over


def _undefined_as_null(value: Any) -> Any:
    if value is UNDEFINED:
        return None
    raise TypeError(f"{type(value).__name__} cannot be handed to a function")


_SOURCE_POSITION = re.compile(r"<input>:(\d+):(\d+)")
_WRAPPER_LINES = 2  # QuickJS's Function() puts the body on its third line
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
        return (
            f"SyntaxError: the expression is incomplete or has an unbalanced bracket (at the end of line {last_line})"
        )
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
        self.collect_above = (policy.memory_limit_mb << 20) // 4
        context.set_time_limit(policy.time_limit_s)
        self.context = context
        api = context.eval(_PRELUDE)(self.token)
        self.compile_fn, self.call_fn = api("compile"), api("call")
        self.call_event_fn, self.call_value_fn = api("callEvent"), api("callValue")
        self.settle_fn, self.check_fn = api("settle"), api("check")
        self.compiled = 0
        self.contextual: list[bool] = []  # by function: called with a context (else its value alone)
        # By function: the top-level keys it reads of its value, or None when it may read all.
        self.reads: list[frozenset[str] | None] = []
        self.error_type = _quickjs.JSException
        # What the engine holds (see `take` in the prelude): the event (kept, so its id cannot
        # be reused by another while it is here), its name (the one thing the mapping changes
        # in place), its serial, and what of it was sent (None: nothing yet, a frozenset: those
        # keys, _WHOLE: all of it); the collector and consent. Each is sent only when it changed.
        self.held: Any = _NOTHING
        self.held_name: Any = None
        self.serial = 0
        self.sent: Any = None
        self._collector: Any = _NOTHING
        self._consent: Any = _NOTHING

    def call_with_context(self, index: int, flags: int, value: Any, event: Any, collector: Any, consent: Any) -> Any:
        """Calls function `index`, which sees a context (see `call` in the prelude)."""
        serial, event_text = self.event_text(event, None)
        collector_text = None
        if collector is not self._collector:
            collector_text, self._collector = _json(collector), collector
        consent_text = None
        if consent is not self._consent:
            consent_text, self._consent = _json(consent), consent
        return self.call_fn(
            index, flags, "e" if value is event else _json(value), serial, event_text, collector_text, consent_text
        )

    def event_text(self, event: Any, keys: frozenset[str] | None) -> tuple[int, str | None]:
        """(serial, text or None when the engine has what the call needs): the serial is new
        with every event. `keys`: the top-level keys the function reads, None for all.
        (call_javascript writes out the first test: the engine has what it needs.)"""
        serial, sent = self.serial, self.sent
        if type(event) is not dict:
            if self.held is event and sent is _WHOLE:
                return serial, None
            self.held, self.held_name, self.serial, self.sent = event, None, (serial + 1) & 0x3FFFFFFF, _WHOLE
            return self.serial, _json(event)
        name = event.get("name")
        if self.held is event and self.held_name == name:
            if sent is _WHOLE or (keys is not None and sent is not None and keys <= sent):
                return serial, None
        else:
            serial = (serial + 1) & 0x3FFFFFFF
            sent = None
            self.held, self.held_name, self.serial = event, name, serial
        if keys is None:
            self.sent = _WHOLE
            return serial, "o" + orjson.dumps(event, default=_undefined_as_null, option=orjson.OPT_INDENT_2).decode()
        missing = keys if sent is None else keys - sent
        self.sent = keys if sent is None else sent | keys
        part = {key: event[key] for key in missing if key in event}
        return serial, "p" + orjson.dumps(part, default=_undefined_as_null).decode()

    def check(self, source: str) -> str:
        return self.check_fn(source)

    def compile_up_to(self, functions: list[_JsSource]) -> None:
        while self.compiled < len(functions):
            item = functions[self.compiled]
            kind = self.compile_fn(self.compiled, item.source, item.mapping_json)
            self.contextual.append(kind == "c")
            self.reads.append(frozenset(orjson.loads(kind[1:])) if kind[0] == "k" else None)
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
        # What a failed call allocated is unreachable now. Most of it went with the call; cycles
        # stay until a full collection, which costs milliseconds (2.5–12 ms measured, a thousand
        # times a failed call), so it runs only once the engine holds a quarter of its limit.
        if self.context.memory()["malloc_size"] > self.collect_above:
            self.context.gc()
        # Whether the engine took this call's texts is unknown: send them again. The event
        # keeps its serial, so the engine keeps the event object it may already have built
        # (and takes no text it has already).
        self.sent = None
        self._collector = self._consent = _NOTHING


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

    def compile(
        self,
        spec: str,
        path: str,
        mapping: Any,
        predicate: bool,
        awaited: bool = True,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> UserFunction:
        """A `$code:` or `$py:` string → a callable ``f(value, context)``, where the context
        holds the `event`, `collector` and `consent` of the call (attributes). A predicate's
        callable gives a bool. A call that fails gives undefined (False for a predicate) and
        is handed to `on_error`; with no `on_error` it raises. Compiling raises
        FunctionSyntaxError or FunctionNotAllowed; nothing of the function runs here."""
        if spec.startswith(PY_PREFIX):
            return self._python(spec[len(PY_PREFIX) :].strip(), path, mapping, predicate, on_error)
        source = spec[len(JS_PREFIX) :].strip()
        problem = check_javascript(source)
        if problem:
            raise FunctionSyntaxError(problem)
        index = len(self._sources)
        self._sources.append(_JsSource(source, path, orjson.dumps(mapping, default=repr).decode()))
        return self._javascript(index, predicate, awaited, on_error)

    # -- JavaScript --
    def _sandbox(self) -> _JsSandbox:
        sandbox = getattr(self._local, "sandbox", None)
        if sandbox is None:
            sandbox = self._local.sandbox = _JsSandbox(self.policy)
        if sandbox.compiled < len(self._sources):
            sandbox.compile_up_to(self._sources)
        return sandbox

    def _javascript(
        self, index: int, predicate: bool, awaited: bool, on_error: Callable[[BaseException], None] | None
    ) -> UserFunction:
        sandbox_for, local, sources = self._sandbox, self._local, self._sources
        flags = (1 if predicate else 0) | (2 if awaited else 0)

        def call_javascript(value: Any, context: Any) -> Any:
            # Runs for every function on every event: the common paths are written out here.
            sandbox = getattr(local, "sandbox", None)
            if sandbox is None or sandbox.compiled < len(sources):
                sandbox = sandbox_for()
            try:
                try:
                    if sandbox.contextual[index]:
                        result = sandbox.call_with_context(
                            index, flags, value, context.event, context.collector, context.consent
                        )
                    elif type(value) is str and "\x00" not in value:
                        result = sandbox.call_value_fn(index, flags, "s" + value)
                    elif value is context.event:
                        keys, sent = sandbox.reads[index], sandbox.sent
                        if (
                            value is sandbox.held
                            and (sent is _WHOLE or (keys is not None and sent is not None and keys <= sent))
                            and (type(value) is not dict or value.get("name") == sandbox.held_name)
                        ):
                            result = sandbox.call_event_fn(index, flags, sandbox.serial, None)
                        else:
                            result = sandbox.call_event_fn(index, flags, *sandbox.event_text(value, keys))
                    else:
                        result = sandbox.call_value_fn(index, flags, _json(value))
                    if predicate:
                        if result != -1:
                            return result == 1
                    elif result[0] == "s":
                        return result[1:]
                    elif result != _PROMISE_PREFIX:
                        return sandbox.decode(result)
                    while sandbox.context.execute_pending_job():
                        pass
                    result = sandbox.settle_fn(predicate)
                except sandbox.error_type as exc:
                    sandbox.after_failure()
                    raise FunctionError(_first_line(exc)) from None
                if predicate:
                    return result == 1
                return result[1:] if result[0] == "s" else sandbox.decode(result)
            except Exception as exc:
                return failed_call(exc, on_error, predicate)

        return call_javascript

    # -- Python --
    def _python(
        self,
        source: str,
        path: str,
        mapping: Any,
        predicate: bool,
        on_error: Callable[[BaseException], None] | None,
    ) -> UserFunction:
        if not self.policy.allow_python:
            raise FunctionNotAllowed(
                "a $py: function runs Python with the worker's full rights; run with "
                "--allow_python_functions to allow it, or write it in JavaScript as $code:"
            )
        try:
            code = compile(source, path, "eval")
        except SyntaxError as exc:
            raise FunctionSyntaxError(
                f"not a valid Python expression: {exc.msg} (line {exc.lineno}, column {exc.offset})"
            ) from None
        try:
            function = eval(code, _python_namespace())  # allowed by the operator's flag
        except Exception as exc:
            raise FunctionSyntaxError(f"failed to evaluate: {type(exc).__name__}: {exc}") from None
        if not callable(function):
            raise FunctionSyntaxError(f"must evaluate to a callable (value, context), got {type(function).__name__}")
        return self.python_callable(function, mapping, predicate, on_error)

    def python_callable(
        self,
        function: Callable,
        mapping: Any,
        predicate: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> UserFunction:
        """A Python function ``function(value, context)`` (from a `$py:` string, or handed in by
        Python code) as a user function (see `compile`), with the policy's time limit."""
        deadline = PythonDeadline.shared()
        limit = self.policy.time_limit_s
        self.any_python = True

        def call_python(value: Any, context: Any) -> Any:
            given = {
                "event": context.event,
                "mapping": mapping,
                "collector": context.collector,
                "consent": None if context.consent is UNDEFINED else context.consent,
            }
            try:
                result = deadline.run(function, value, given, limit)
                return js_truthy(result) if predicate else result
            except Exception as exc:
                return failed_call(exc, on_error, predicate)

        return call_python


def failed_call(exc: BaseException, on_error: Callable[[BaseException], None] | None, predicate: bool) -> Any:
    """What a user function's failed call gives: undefined, or False for a predicate, once
    `on_error` has the error; with no `on_error`, the error is raised."""
    if on_error is None:
        raise exc
    on_error(exc)
    return False if predicate else UNDEFINED


def describe_failure(exc: BaseException) -> str:
    """One line for the log: what a user function did wrong."""
    if isinstance(exc, FunctionError):
        return str(exc)  # already "TypeError: ...", "InternalError: interrupted", "did not return ..."
    return f"{type(exc).__name__}: {exc}"


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0]


_CHECKER = threading.local()


def check_javascript(source: str) -> str:
    """ "" when `source` is a JavaScript expression, else the syntax error and where.
    Only parses: nothing of the source runs."""
    checker = getattr(_CHECKER, "sandbox", None)
    if checker is None:
        checker = _CHECKER.sandbox = _JsSandbox(FunctionPolicy())
    report = checker.check(source)
    return _syntax_message(report, source) if report else ""


def _python_namespace() -> dict:
    """Globals of a `$py:` expression: the normal builtins and a few everyday modules.
    A fresh dict per function, so one function cannot leak names into another."""
    return {
        "__builtins__": builtins,
        "re": re,
        "math": math,
        "json": json,
        "hashlib": hashlib,
        "datetime": datetime,
        "UNDEFINED": UNDEFINED,
    }


# --- a time limit for Python functions -----------------------------------------------------------

_raise_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class PythonDeadline:
    """A per-call time limit for Python functions on any thread.

    `signal.alarm` only reaches the main thread, and Beam calls DoFns on others; a Python
    thread cannot be killed. So one watchdog thread raises FunctionTimeout into the calling
    thread when its call is past the deadline (CPython's PyThreadState_SetAsyncExc). The
    interpreter delivers it at the next bytecode boundary: a loop in Python code is stopped
    within the limit plus a few milliseconds; a single C call that never returns (a
    catastrophic regex, `sum(range(10**15))`, a blocking read) is only stopped when it
    returns. There is no memory limit for Python functions.

    A call takes no lock and wakes nobody (calls are made for every event that reaches a
    function): the watchdog sleeps until the soonest deadline of the calls it saw, and a call
    wakes it only when the call is due before the watchdog's next look. Each step is one
    operation under the GIL; the comments say in which order, and why that order.
    """

    _instance: PythonDeadline | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def shared(cls) -> PythonDeadline:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    # How long the watchdog sleeps while calls are being made and none was in progress when it
    # looked: a call started meanwhile is due after the next look, or wakes it.
    _IDLE_LOOK_S = 0.25

    def __init__(self):
        # Held by the watchdog while it looks, and by a call only to take back a timeout the
        # watchdog may be raising into it at that moment.
        self._mutex = threading.Lock()
        self._calls: dict[int, list] = {}  # token → [thread id, deadline, fired, done, token]
        self._tokens = itertools.count(1)
        self._last = 0  # the token of the last call started
        # When the watchdog looks next (monotonic seconds); a call due before it wakes it.
        # Infinite while it looks, and while it sleeps until woken: every call wakes it then.
        self._next_look = math.inf
        self._wake = threading.Event()
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
        token = next(self._tokens)
        slot = [get_ident(), monotonic() + limit, False, False, token]
        # Registered before the next look is read. A look whose snapshot missed this call has
        # either not set its next look yet (this reads infinity and wakes the watchdog for
        # another look) or has (this call is due after it, or wakes it).
        self._calls[token] = slot
        self._last = token
        if slot[1] < self._next_look:
            self._wake_watchdog()
        return slot

    def _wake_watchdog(self) -> None:
        if self._thread is None:
            with self._mutex:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="py-function-deadline", daemon=True)
                    self._thread.start()
        self._wake.set()

    def _stop(self, slot: list) -> None:
        # Done first, then fired read; the watchdog sets fired first, then reads done. So
        # either it sees done and raises nothing, or this sees fired and takes the timeout
        # back, under the lock the watchdog holds while it raises. A second stop of the same
        # call (after the timeout landed) only clears again, which is harmless.
        slot[3] = True
        self._calls.pop(slot[4], None)
        if slot[2]:
            with self._mutex:
                _clear_in_thread(slot[0], None)

    def _watch(self) -> None:
        seen = 0  # the last call started when the watchdog last looked
        while True:
            self._wake.clear()  # before the look: a wake from here on is for a call it may miss
            with self._mutex:
                self._next_look = math.inf
                now = monotonic()
                soonest = None
                for slot in list(self._calls.values()):  # a snapshot: calls come and go unlocked
                    if slot[2]:
                        continue
                    if slot[1] <= now:
                        slot[2] = True
                        if not slot[3]:
                            _raise_in_thread(slot[0], FunctionTimeout)
                    elif soonest is None or slot[1] < soonest:
                        soonest = slot[1]
                wait: float | None
                if soonest is not None:
                    wait = max(soonest - now, 0.001)
                elif self._last != seen:
                    wait = self._IDLE_LOOK_S
                else:
                    wait = None  # nothing started since the last look: sleep until a call wakes it
                seen = self._last
                if wait is not None:
                    self._next_look = now + wait
            self._wake.wait(wait)
