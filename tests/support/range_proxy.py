"""An HTTP front for olah that answers Range requests, as the Hub's file CDN does.

olah serving local git repos ignores `Range` (it answers 200 with the whole file, chunked),
while huggingface.co's resolve URLs (and the CDN they redirect to) answer 206 with the bytes
asked for; stream mode relies on that. `RangeProxy(olah.endpoint)` sits in front of olah:

- a GET with `Range: bytes=a-b` for a path is answered 206 with `Content-Range: bytes
  a-b/size`, or 416 past the end. The bytes are olah's: on the first range request for a
  path the proxy asks olah for its size (HEAD), then downloads the whole file from olah on
  a thread into memory, and answers each range as soon as olah has delivered its bytes (a
  CDN filling from its origin). The paths are commit-pinned, so the content never changes;
- everything else (API calls, whole-file GETs, HEADs) is forwarded to olah and answered
  with olah's answer.

Every answered range is recorded (`ranges`: path, first, last) so tests can check what was
read. A thread in the test process serves it, HTTP/1.1 with keep-alive, on loopback.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.support.http_server import BackgroundServer, ServedHTTP

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_SKIP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
_CHUNK = 64 * 1024


@dataclass
class _Body:
    """One upstream file as it arrives: `data` grows until `done`."""

    size: int
    data: bytearray = field(default_factory=bytearray)
    done: bool = False
    error: str | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, end: int) -> bool:
        """Block until bytes [0, end) arrived; False if the upstream failed first."""
        with self.cond:
            while len(self.data) < end and not self.done and self.error is None:
                self.cond.wait(timeout=1.0)
            return len(self.data) >= end


@dataclass
class Served:
    path: str
    first: int
    last: int


@dataclass
class _State:
    upstream: str
    bodies: dict[str, _Body] = field(default_factory=dict)
    ranges: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RangeProxy(BackgroundServer):
    def __init__(self, upstream: str) -> None:
        self._state = _State(upstream.rstrip("/"))
        self._served: ServedHTTP | None = None

    @property
    def endpoint(self) -> str:
        if self._served is None:
            raise RuntimeError("RangeProxy is not started")
        return self._served.endpoint

    @property
    def ranges(self) -> list[Served]:
        with self._state.lock:
            return list(self._state.ranges)

    def clear(self) -> None:
        """Forget the recorded ranges and the cached files (the next reads go to olah)."""
        with self._state.lock:
            self._state.ranges.clear()
            self._state.bodies.clear()

    def start(self) -> RangeProxy:
        class Handler(_Handler):
            pass

        Handler.state = self._state
        self._served = ServedHTTP(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        return self


def _connect(upstream: str) -> http.client.HTTPConnection:
    up = urlsplit(upstream)
    return http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=120)


def _fill(upstream: str, path: str, headers: dict[str, str], body: _Body) -> None:
    conn = _connect(upstream)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise OSError(f"upstream answered {resp.status}")
        while chunk := resp.read(_CHUNK):
            with body.cond:
                body.data += chunk
                body.cond.notify_all()
        with body.cond:
            body.done = True
            body.cond.notify_all()
    except Exception as exc:  # the waiting requests answer 502
        with body.cond:
            body.error = str(exc)
            body.cond.notify_all()
    finally:
        conn.close()


class _Handler(BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _headers_out(self) -> dict[str, str]:
        return {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _SKIP and k.lower() not in ("range", "accept-encoding")
        }

    def do_HEAD(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match is None:
            self._forward()
            return
        body = self._body()
        if body is None:
            return
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else body.size - 1
        last = min(last, body.size - 1)
        if first > last:
            self._answer(416, b"", {"Content-Range": f"bytes */{body.size}"})
            return
        if not body.wait_for(last + 1):
            self._answer(502, b'{"error": "upstream failed"}', {})
            return
        with body.cond:
            data = bytes(body.data[first : last + 1])
        with self.state.lock:
            self.state.ranges.append(Served(self.path, first, last))
        self._answer(206, data, {"Content-Range": f"bytes {first}-{last}/{body.size}"})

    def _body(self) -> _Body | None:
        """The path's file, its download from olah started on first use; None when olah
        refused it (its answer was relayed)."""
        with self.state.lock:
            body = self.state.bodies.get(self.path)
        if body is not None:
            return body
        conn = _connect(self.state.upstream)
        try:
            conn.request("HEAD", self.path, headers=self._headers_out())
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                self._answer(resp.status, b"", dict(resp.getheaders()))
                return None
            size = int(resp.getheader("Content-Length") or 0)
        finally:
            conn.close()
        with self.state.lock:
            body = self.state.bodies.get(self.path)
            if body is None:
                body = self.state.bodies[self.path] = _Body(size)
                threading.Thread(
                    target=_fill,
                    args=(self.state.upstream, self.path, self._headers_out(), body),
                    daemon=True,
                ).start()
        return body

    def _forward(self) -> None:
        conn = _connect(self.state.upstream)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else None
            conn.request(self.command, self.path, body=payload, headers=self._headers_out())
            resp = conn.getresponse()
            data = resp.read()
            headers = dict(resp.getheaders())
            if self.command == "HEAD":
                headers = {k: v for k, v in headers.items() if k.lower() != "transfer-encoding"}
                self._answer(resp.status, b"", headers, keep_length=True)
            else:
                self._answer(resp.status, data, headers)
        finally:
            conn.close()

    def _answer(
        self, status: int, data: bytes, headers: dict[str, str], keep_length: bool = False
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() in _SKIP and not (keep_length and name.lower() == "content-length"):
                continue
            self.send_header(name, value.replace(self.state.upstream, ""))
        if not keep_length or not any(k.lower() == "content-length" for k in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
