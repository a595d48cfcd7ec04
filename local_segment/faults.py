"""Fault injection for the local Segment endpoint (``local_segment``).

A *fault* says how the endpoint answers one request instead of (or on top of) the healthy answer.
Tests queue faults with ``LocalSegment.script(...)`` / ``fail_next(...)``: every request on a
``/v1`` route takes the next fault from the queue, in arrival order, and an empty queue means
healthy. ``LocalSegment.reject_when(...)`` adds a rule that applies to every request instead.

The faults cover what segment-analytics-python 2.4.0 has distinct code paths for: any status code with a
JSON, text or array body, ``Retry-After`` and other headers, latency beyond the client timeout, a
reset or closed connection, an empty 2xx, a redirect, and a 400 for any batch that carries a
"bad" message.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

MessagePredicate = Callable[[dict], bool]

HEALTHY = "healthy"
STATUS = "status"
DELAY = "delay"
RESET = "reset"
CLOSE = "close"
EMPTY_2XX = "empty_2xx"
BAD_REQUEST_WHEN = "bad_request_when"


@dataclass(frozen=True)
class Fault:
    """One scripted answer. Build it with the factory functions below, not directly."""

    kind: str
    code: int = 200
    body: Any = None  # None: Segment's JSON error shape; str/bytes: raw text; dict/list: JSON
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    then: Fault | None = None
    accept: bool = False  # process (accept) the messages before acting
    predicate: MessagePredicate | None = None
    message: str = ""

    def describe(self) -> str:
        """A short label for request records and logs."""
        if self.kind == STATUS:
            return f"status({self.code})"
        if self.kind == DELAY:
            inner = self.then.describe() if self.then else HEALTHY
            return f"delay({self.seconds:g}s, then={inner})"
        if self.kind in (RESET, CLOSE):
            return f"{self.kind}(accept={self.accept})"
        if self.kind == EMPTY_2XX:
            return f"empty_2xx({self.code})"
        return self.kind


def healthy() -> Fault:
    """The normal answer; useful as a placeholder inside a script."""
    return Fault(HEALTHY)


def status(
    code: int,
    body: Any = None,
    retry_after: int | float | str | None = None,
    headers: dict[str, str] | None = None,
) -> Fault:
    """Answer ``code`` without accepting anything.

    ``body`` None gives Segment's error shape ``{"code": ..., "message": ...}``; a str or bytes is
    sent as raw text (the SDK's "unknown" error path); a dict or list is sent as JSON.
    ``retry_after`` is sent verbatim, so seconds, ``0`` or an HTTP-date all work.
    """
    extra = dict(headers or {})
    if retry_after is not None:
        extra["Retry-After"] = str(retry_after)
    return Fault(STATUS, code=int(code), body=body, headers=tuple(extra.items()))


def redirect(code: int = 308, location: str | None = "https://api.segment.io/v1/batch") -> Fault:
    """Answer a redirect (301, 302, 303, 307, 308) to ``location`` (None: no Location header).

    A client that followed a 301/302/303 would re-send the batch as a body-less GET; one that
    counted the redirect as an answer would report the batch sent. Neither may happen.
    """
    if not 300 <= code < 400:
        raise ValueError(f"redirect needs a 3xx code, got {code}")
    headers = {"Location": location} if location else {}
    return Fault(STATUS, code=int(code), body="", headers=tuple(headers.items()))


def delay(seconds: float, then: Fault | None = None) -> Fault:
    """Wait ``seconds`` before answering.

    The request is handled as ``then`` says (healthy by default) *before* the wait: with a client
    timeout shorter than ``seconds`` the messages are accepted although the client saw a timeout,
    and its retry arrives as a duplicate -- the classic at-least-once case Segment dedupes.
    """
    return Fault(DELAY, seconds=float(seconds), then=then)


def reset(accept: bool = False) -> Fault:
    """Read the request, then reset the connection (TCP RST) without answering.

    ``accept=True`` accepts the messages first ("processed, but the client saw a reset").
    """
    return Fault(RESET, accept=accept)


def close(accept: bool = False) -> Fault:
    """Read the request, then close the connection cleanly (FIN) without answering."""
    return Fault(CLOSE, accept=accept)


def empty_2xx(code: int = 200, accept: bool = True) -> Fault:
    """Answer a 2xx with an empty body; the SDK counts any 2xx as success."""
    if not 200 <= code < 300:
        raise ValueError(f"empty_2xx needs a 2xx code, got {code}")
    return Fault(EMPTY_2XX, code=code, accept=accept)


def bad_request_when(
    predicate: MessagePredicate,
    code: int = 400,
    message: str = "Invalid message in batch",
) -> Fault:
    """Reject the whole request with ``code`` when any of its messages matches ``predicate``.

    Real Segment never says which message of a batch was bad, so neither does this: the client has
    to isolate the bad message itself by re-sending smaller batches. A request without a matching
    message is handled normally.
    """
    return Fault(BAD_REQUEST_WHEN, code=code, predicate=predicate, message=message)


@dataclass
class FaultPlan:
    """The thread-safe source of faults for one server: a script, rules, and random failures."""

    _script: deque = field(default_factory=deque)
    _rules: list = field(default_factory=list)
    _random: tuple | None = None  # (probability, fault, random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def extend(self, faults: Iterable[Fault]) -> None:
        faults = list(faults)
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"not a Fault: {fault!r}")
        with self._lock:
            self._script.extend(faults)

    def add_rule(self, fault: Fault) -> None:
        with self._lock:
            self._rules.append(fault)

    def set_random(self, probability: float, fault: Fault, seed: int | None) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        with self._lock:
            self._random = (probability, fault, random.Random(seed))

    def clear(self) -> None:
        with self._lock:
            self._script.clear()
            self._rules.clear()
            self._random = None

    def pending(self) -> int:
        with self._lock:
            return len(self._script)

    def rules(self) -> list[Fault]:
        with self._lock:
            return list(self._rules)

    def next_fault(self) -> Fault | None:
        """The fault for the request arriving now; None means healthy.

        The script goes first, so a test's explicit sequence is never disturbed by random faults.
        """
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._random is not None:
                probability, fault, rng = self._random
                if rng.random() < probability:
                    return fault
        return None


def error_body(code: int, message: str | None = None) -> dict:
    """Segment's error shape for an injected status, e.g. ``{"code": "internal_server_error", ...}``."""
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = f"Status {code}"
    slug = phrase.lower().replace(" ", "_").replace("-", "_").replace("'", "")
    return {"code": slug, "message": message or f"{phrase} (injected by local Segment)"}
