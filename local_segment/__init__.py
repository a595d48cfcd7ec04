"""A local, Segment-compatible HTTP endpoint: try flows without an account, test without network.

It speaks the part of Segment's HTTP Tracking API the server SDKs use (``POST /v1/batch`` and the
single-call routes ``/v1/{identify,track,page,screen,group,alias}``) and answers as Segment does
(its HTTP API docs, "Errors", "Max request size"; the Spec's common fields and dedup guide):

* request-level problems get a 400 (wrong Content-Type, bad gzip, a body over 500 KB -- 32 KB on
  single routes --, bad JSON, no write key, any message over 32 KB), and nothing is accepted;
* per-message problems (no ids, a track without ``event``, ...) are answered 200 and the message
  is silently dropped -- here recorded in ``invalid`` and counted, so tests can see them;
* an unknown write key is answered 200 and its messages dropped (``strict=True``: 401);
* more than 2,500 messages: 200, the rest dropped;
* messages are deduplicated on ``messageId`` like Segment does.

Faults are injected per request for tests. Accepted messages are kept in memory and, with
``record_path``, appended to a JSON Lines file flushed per request. The write key is never logged
nor recorded: requests record only the state of their auth.

The modules, one job each: ``validation`` (what Segment checks), ``faults`` (what a test injects),
``http_server`` (bodies, answers, connections), ``endpoint`` (``LocalSegment``: validates, applies
faults, dedupes, records), ``serve`` (the command line).

Command line: ``walkeros-segment local-segment --port P --record FILE`` or
``python -m local_segment --port P``.
"""

from local_segment.endpoint import LocalSegment, RequestRecord
from local_segment.faults import (
    Fault,
    bad_request_when,
    close,
    delay,
    empty_2xx,
    healthy,
    redirect,
    reset,
    status,
)
from local_segment.serve import main

__all__ = [
    "LocalSegment",
    "RequestRecord",
    "Fault",
    "status",
    "delay",
    "reset",
    "close",
    "empty_2xx",
    "bad_request_when",
    "healthy",
    "redirect",
    "main",
]
