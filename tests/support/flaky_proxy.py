"""An HTTP proxy that injects faults between a client and a real upstream (olah as the Hub).

`with FlakyProxy(hub.endpoint, [Fault(r"/revision/main$", "status", times=2)]) as proxy:`
then point the client at `proxy.endpoint`. Every request is forwarded to the upstream and
answered with its real response, except those matching a fault that still has `times` left:

- `status`: answered with `status` (503 by default) and a small JSON body, not forwarded;
- `cut`: the upstream's headers with its full Content-Length, then half the body, then the
  connection is closed (a transfer cut mid-body);
- `short`: the upstream's answer truncated to half its body with a Content-Length that
  matches (and a HEAD's Content-Length halved), so the size checks of the client pass and
  only a hash check can tell.

Every request is recorded (method, path, status answered), so tests can count the calls.
A thread in the test process serves it (ThreadingHTTPServer): a real socket on loopback.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

from tests.support.http_server import BackgroundServer, ServedHTTP

# Not forwarded in either direction: connection-level, or recomputed by the proxy.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "host",
    "accept-encoding",  # identity bodies, so `cut`/`short` cut real bytes
}


@dataclass
class Fault:
    path: str  # a regex searched in the request's path (query string included)
    kind: Literal["status", "cut", "short"] = "status"
    times: int = 1  # how many matching requests get the fault; -1: all of them
    status: int = 503
    method: str | None = "GET"  # None: any method
    hits: int = 0

    def takes(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if not re.search(self.path, path):
            return False
        return self.times < 0 or self.hits < self.times


@dataclass
class Seen:
    method: str
    path: str
    status: int
    fault: str | None = None  # the fault's kind when one was injected


@dataclass
class _State:
    upstream: str
    faults: list[Fault]
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    public: str = ""


class FlakyProxy(BackgroundServer):
    def __init__(self, upstream: str, faults: list[Fault] | None = None) -> None:
        self._state = _State(upstream.rstrip("/"), list(faults or []))
        self._served: ServedHTTP | None = None

    @property
    def endpoint(self) -> str:
        if self._served is None:
            raise RuntimeError("FlakyProxy is not started")
        return self._served.endpoint

    @property
    def seen(self) -> list[Seen]:
        with self._state.lock:
            return list(self._state.seen)

    def count(self, pattern: str, method: str | None = None) -> int:
        """How many requests whose path matches `pattern` (and `method`) reached the proxy."""
        return sum(
            1
            for s in self.seen
            if re.search(pattern, s.path) and (method is None or s.method == method)
        )

    def set_faults(self, faults: list[Fault]) -> None:
        with self._state.lock:
            self._state.faults = list(faults)

    def start(self) -> FlakyProxy:
        state = self._state

        class Handler(_Handler):
            pass

        Handler.state = state
        self._served = ServedHTTP(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        state.public = self.endpoint
        return self


class _Handler(BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.0"  # one request per connection: a cut closes only its own

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test reads `seen`

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _take_fault(self) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.takes(self.command, self.path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, status: int, fault: Fault | None) -> None:
        with self.state.lock:
            self.state.seen.append(
                Seen(self.command, self.path, status, fault.kind if fault else None)
            )

    def _handle(self) -> None:
        fault = self._take_fault()
        if fault is not None and fault.kind == "status":
            # Recorded before answering: the client may check the count as soon as it reads.
            self._record(fault.status, fault)
            body = b'{"error": "injected by FlakyProxy"}'
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        status, headers, body = self._forward()
        self._record(status, fault)
        length = len(body)
        if self.command == "HEAD":
            length = int(headers.pop("content-length", "0") or 0)
        if fault is not None and fault.kind == "short":
            length //= 2
            body = body[:length]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _forward(self) -> tuple[int, dict[str, str], bytes]:
        up = urlsplit(self.state.upstream)
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else None
            conn.request(self.command, self.path, body=payload, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out: dict[str, str] = {}
            for name, value in resp.getheaders():
                low = name.lower()
                if low == "content-length" and self.command == "HEAD":
                    out["content-length"] = value  # a HEAD's only size information
                elif low not in _HOP_HEADERS:
                    # Redirects to the upstream's own address must come back through us.
                    out[name] = value.replace(self.state.upstream, self.state.public)
            return resp.status, out, body
        finally:
            conn.close()
