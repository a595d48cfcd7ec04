"""Talking to Segment: one cut batch → one ``POST /v1/batch``, as segment-analytics-python sends it.

No Beam here. The batches are cut in Beam (state in streaming, bundles in batch runs), so the SDK
``Client``'s own queue and consumer thread only added work (``clean()`` of every message, a second
serialisation, a queue) and loss paths (queue full, silent drops, a flush without deadline, a dead
consumer thread). What remains of the SDK is its request layer, reproduced here with its own
pieces (``VERSION``, ``parse_retry_after``) on a pooled session of our own:

* the body ``{"batch": [...], "sentAt": <now, per attempt>, "writeKey": <key>}``, each message
  with ``context.library = {"name": "analytics-python", "version": <SDK version>}`` and the
  fields the Client writes as null or ``{}`` when a call has none;
* the headers ``Content-Type: application/json``, ``User-Agent: analytics-python/<version>``,
  ``Authorization: Basic base64("<key>:")``, ``X-Retry-Count`` on retries, and
  ``Content-Encoding: gzip`` with the ``gzip`` setting;
* the SDK's retry policy (2.4.0): network errors, 408/410/429/460 and every 5xx but 501/505 are
  retried up to ``maxRetries`` times, the first at once, then after 0.5, 1, 2, … s (+ up to 10%
  jitter, at most 60 s); a retryable answer with ``Retry-After`` (or ``X-RateLimit-Reset``) waits
  that long and does not count as a retry; everything ends inside the batch's deadline.

The JSON is written compactly, as analytics-node writes it (the SDK's ``json.dumps`` puts a space
after each separator and escapes non-ASCII; the same document either way). Redirects are never
followed: ``requests`` would turn a 301/302/303 POST into a body-less GET whose 200 looks like
success. A redirect, 401, 403 or 404 says the endpoint is misconfigured, not that an event is bad:
:class:`EndpointConfigError`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import gzip as _gzip
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from segment.analytics.request import MAX_RETRY_AFTER_SECONDS, parse_retry_after
from segment.analytics.version import VERSION as SDK_VERSION

from decide.secrets import redact_secret

log = logging.getLogger(__name__)

USER_AGENT = "analytics-python/" + SDK_VERSION
RETRYABLE_4XX = (408, 410, 429, 460)
NOT_RETRYABLE_5XX = (501, 505)
ENDPOINT_STATUSES = (401, 403, 404)  # the endpoint refuses every request: key, host or path
MAX_BACKOFF_S = 60.0
GZIP_LEVEL = 6  # the gzip tool's default: most of level 9's gain at a fraction of its time
_ERROR_TEXT_CHARS = 500


class EndpointConfigError(RuntimeError):
    """The batch endpoint refused a request for a reason no event can cause (401, 403, 404, a
    redirect): a revoked or wrong write key, a wrong region host, a wrong path. Sending more
    cannot help, and dead-lettering the events would blame them."""

    def __init__(self, status: int, host: str, detail: str, advice: str):
        self.status = status
        self.host = host
        self.detail = detail
        self.advice = advice
        super().__init__(
            f"Segment endpoint {host} answered HTTP {status}"
            + (f" ({detail})" if detail else "")
            + f": {advice}. Nothing more was sent; no event was dead-lettered for it."
        )


def _advice(status: int, url: str, location: str | None) -> str:
    if status == 401:
        return (
            "the write key was refused: check writeKey (revoked, mistyped, or from another source) "
            "and that it belongs to this region's host (an EU workspace's key needs "
            "https://events.eu1.segmentapis.com)"
        )
    if status == 403:
        return (
            "the write key is not allowed to send here: check writeKey and the region host "
            "(https://api.segment.io for US workspaces, https://events.eu1.segmentapis.com for EU)"
        )
    if status == 404:
        return (
            f"no batch endpoint at {url}: check host (without /v1/batch, e.g. https://api.segment.io) "
            "and path (default /v1/batch)"
        )
    suggestion = _suggested_host(location)
    return f"a redirect to {location or '(no Location)'}; redirects are not followed for the batch POST" + (
        f": set host to {suggestion}" if suggestion else ": set host to where Segment really is"
    )


def _suggested_host(location: str | None) -> str | None:
    if not location:
        return None
    parts = urlsplit(location)
    if not parts.scheme or not parts.netloc:
        return None
    path = parts.path
    for suffix in ("/v1/batch", "/v1/batch/"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return f"{parts.scheme}://{parts.netloc}{path.rstrip('/')}"


@dataclass
class Answer:
    """What became of one batch after the retries: accepted (``ok``), or the last failure."""

    ok: bool
    status: int | None = None
    error: str = ""
    attempts: int = 0
    out_of_time: bool = False  # the deadline ended the retries (a hung connection, say)


class SegmentHttp:
    """One pooled HTTP session (built in a DoFn's ``setup()``, never pickled) posting batches to
    ``url`` with the SDK's headers, body, auth and retry policy."""

    def __init__(
        self,
        write_key: str,
        url: str,
        *,
        timeout_s: float,
        max_retries: int,
        gzip: bool = False,
        sleep: Callable[[float], None] | None = None,
    ):
        self.url = url
        # For messages only: a key someone put into the URL (a proxy's user, say) is never shown.
        self.host = redact_secret(_origin(url), write_key)
        self._shown_url = redact_secret(url, write_key)
        self.timeout_s = timeout_s
        self.max_retries = max(0, int(max_retries))
        self.gzip = gzip
        self._key = write_key
        self._key_json = orjson.dumps(write_key)
        credentials = base64.b64encode(f"{write_key}:".encode()).decode()
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Authorization": f"Basic {credentials}",
        }
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._sleep = sleep
        self.session = requests.Session()
        # One connection per sender is all it uses (one request at a time); a spare for a request
        # still finishing after its batch was given up on.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def body(self, batch_json: bytes) -> bytes:
        """The request body around ``batch_json`` (the messages' JSON array), ``sentAt`` now."""
        sent_at = _dt.datetime.now(_dt.timezone.utc).isoformat()
        return b'{"batch":' + batch_json + b',"sentAt":"' + sent_at.encode() + b'","writeKey":' + self._key_json + b"}"

    def post(self, batch_json: bytes, deadline: float, cancelled: threading.Event | None = None) -> Answer:
        """Post one batch, retried as the SDK retries, until accepted, refused, out of retries,
        or out of time (``deadline``, ``time.monotonic()``). Raises :class:`EndpointConfigError`."""
        attempt = counted = 0
        last = Answer(False, None, "not sent")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (cancelled is not None and cancelled.is_set()):
                return _gave_up(last, attempt)
            attempt += 1
            response, failure = self._attempt(batch_json, attempt - 1, min(self.timeout_s, remaining))
            if response is not None and 200 <= response.status_code < 300:
                return Answer(True, response.status_code, "", attempt)
            if response is not None:
                self._raise_if_endpoint_wide(response)
                last = Answer(False, response.status_code, self._describe(response), attempt)
                if not _retryable(response.status_code):
                    return last
                wait = _server_wait(response)
                if wait:
                    # Rate limited: wait as asked, not counted against maxRetries (the SDK's rule),
                    # unless the wait cannot end before the deadline.
                    if time.monotonic() + wait > deadline:
                        last.error += f" (asked to wait {wait:g} s, beyond the batch's deadline)"
                        return last
                    self._wait(wait, cancelled)
                    continue
            else:
                last = Answer(False, None, failure, attempt)
            counted += 1
            if counted > self.max_retries:
                return last
            delay = _backoff(counted)
            if time.monotonic() + delay >= deadline:
                return _gave_up(last, attempt)
            self._wait(delay, cancelled)

    def _attempt(self, batch_json: bytes, retry_count: int, timeout: float):
        headers = self._headers
        if retry_count:
            headers = {**headers, "X-Retry-Count": str(retry_count)}
        data = self.body(batch_json)
        if self.gzip:
            data = _gzip.compress(data, compresslevel=GZIP_LEVEL)
        try:
            response = self.session.post(
                self.url, data=data, headers=headers, timeout=max(timeout, 0.001), allow_redirects=False
            )
            return response, None
        except requests.RequestException as exc:
            return None, self.redact(f"{type(exc).__name__}: {exc}")

    def _raise_if_endpoint_wide(self, response) -> None:
        status = response.status_code
        if status in ENDPOINT_STATUSES or 300 <= status < 400:
            location = response.headers.get("Location")
            detail = self._describe(response) if status in ENDPOINT_STATUSES else ""
            raise EndpointConfigError(
                status, self.host, detail, _advice(status, self._shown_url, self.redact(location) if location else None)
            )

    def _describe(self, response) -> str:
        """``HTTP <status> <code>: <message>`` as the SDK reads an error body, never the key."""
        code, message = None, None
        try:
            payload = response.json()
            code, message = payload["code"], payload["message"]
        except (ValueError, KeyError, TypeError):
            message = (response.text or response.reason or "")[:_ERROR_TEXT_CHARS]
        text = f"HTTP {response.status_code}" + (f" {code}" if code and code != "unknown" else "") + f": {message}"
        return self.redact(text)

    def redact(self, text: str) -> str:
        return redact_secret(text, self._key)

    def _wait(self, seconds: float, cancelled: threading.Event | None) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        elif cancelled is not None:
            cancelled.wait(seconds)
        elif seconds > 0:
            time.sleep(seconds)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _gave_up(last: Answer, attempts: int) -> Answer:
    return Answer(
        False,
        last.status,
        f"gave up at the batch's flush deadline after {attempts} attempt(s); last: {last.error}",
        attempts,
        out_of_time=True,
    )


def _retryable(status: int) -> bool:
    if 400 <= status < 500:
        return status in RETRYABLE_4XX
    return 500 <= status < 600 and status not in NOT_RETRYABLE_5XX


def _backoff(retry: int) -> float:
    """The SDK's counted backoff: the first retry at once, then 0.5 s doubling, +≤10% jitter, ≤60 s."""
    if retry <= 1:
        return 0.0
    base = 0.5 * (2 ** (retry - 2))
    return min(base + random.uniform(0, 0.1 * base), MAX_BACKOFF_S)


def _server_wait(response) -> float | None:
    """Seconds the server asked to wait (``Retry-After``, else ``X-RateLimit-Reset``), ≤ 300."""
    wait = parse_retry_after(response)
    if wait:
        return float(wait)
    return _rate_limit_reset(response.headers.get("X-RateLimit-Reset"))


def _rate_limit_reset(value: str | None) -> float | None:
    """Segment documents seconds to wait; a value that can only be an epoch time (seconds or
    milliseconds) is read as one."""
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if number > 1e12:
        number = number / 1000.0 - time.time()
    elif number > 1e9:
        number -= time.time()
    if number <= 0:
        return None
    return min(number, float(MAX_RETRY_AFTER_SECONDS))
