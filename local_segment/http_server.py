"""The HTTP side of the local endpoint: reading bodies, answering or dropping connections, and the
threaded server whose handler passes every request to its ``LocalSegment``.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import socketserver
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from local_segment.validation import JSON_TYPE, Rejected


class Owner(Protocol):
    """What the server hands its requests and connections to (a ``LocalSegment``)."""

    def track_connection(self, sock: Any, is_open: bool) -> None: ...

    def serve_request(self, handler: Any) -> None: ...


log = logging.getLogger(__name__)

SUCCESS_BODY = b'{"success":true}'

# A keep-alive connection idle this long is closed, so abandoned clients do not pin threads.
IDLE_TIMEOUT_SECONDS = 120


@dataclass
class Reply:
    """What to do with one request: send an answer, or drop the connection (reset / close)."""

    status: int | None = 200
    body: bytes = SUCCESS_BODY
    content_type: str | None = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    action: str = "send"  # "send" | RESET | CLOSE
    delay: float = 0.0
    close_connection: bool = False

    @classmethod
    def error(cls, status_code: int, code: str, message: str, close_connection: bool = False) -> Reply:
        body = orjson.dumps({"code": code, "message": message})
        return cls(status_code, body, close_connection=close_connection)


def read_chunked(rfile, hard_limit: int) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (the SDK never sends one; curl and others may)."""
    parts, total = [], 0
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise Rejected(400, "invalid_chunked_body", "malformed chunk size", close_connection=True) from None
        if size == 0:
            break
        total += size
        if total > hard_limit:
            raise Rejected(400, "payload_too_large", "Exceed payload limit", close_connection=True)
        parts.append(rfile.read(size))
        rfile.readline(8)  # the CRLF after each chunk
    while rfile.readline(8192) not in (b"\r\n", b"\n", b""):
        pass  # trailers
    return b"".join(parts)


def read_body(handler, hard_limit: int) -> bytes:
    """The raw request body. Bodies over ``hard_limit`` are not read: the connection is closed."""
    if (handler.headers.get("Transfer-Encoding") or "").strip().lower() == "chunked":
        return read_chunked(handler.rfile, hard_limit)
    length = handler.headers.get("Content-Length")
    if length is None:
        return b""
    try:
        size = int(length)
    except ValueError:
        raise Rejected(400, "invalid_content_length", "bad Content-Length", close_connection=True) from None
    if size < 0 or size > hard_limit:
        raise Rejected(400, "payload_too_large", f"Exceed payload limit: {size} bytes", close_connection=True)
    return handler.rfile.read(size)


def abort_connection(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST instead of an orderly FIN.

    ``socket.close()`` would only mark the socket closed while the handler's rfile/wfile still
    reference it; detaching and closing the descriptor sends the RST now.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(sock.detach())
    except OSError:
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK's requests.Session reuses connections
    disable_nagle_algorithm = True  # else delayed ACKs cost ~40 ms per request
    server_version = "LocalSegment/1.0"
    timeout = IDLE_TIMEOUT_SECONDS

    def setup(self):
        super().setup()
        self.server.owner.track_connection(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner.track_connection(self.connection, False)

    def do_POST(self):
        self.server.owner.serve_request(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_POST

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        # The base class writes an access log to stderr; our own summary line replaces it.
        log.debug("%s - %s", self.address_string(), format % args)


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection; its handler hands each request and connection to ``owner``."""

    daemon_threads = True  # a handler sleeping in a delay fault must not block shutdown
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, owner: Owner):
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup we neither need nor want.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # Clients hanging up mid-request are normal here (timeouts, injected resets).
        log.debug("connection error from %s", client_address, exc_info=True)


def send_reply(handler, reply: Reply) -> None:
    handler.send_response(reply.status)
    for name, value in reply.headers:
        handler.send_header(name, value)
    if reply.content_type:
        handler.send_header("Content-Type", reply.content_type)
    handler.send_header("Content-Length", str(len(reply.body)))
    if reply.close_connection:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    if handler.command != "HEAD" and reply.body:
        handler.wfile.write(reply.body)
