"""A real HTTP server in a thread that records webhook deliveries (tests only).

`with WebhookReceiver(statuses=[503, 503, 200]) as hook:` answers each POST with the next
status (the last one repeats), records method, path, headers and raw body, and can
answer with a redirect (`redirect_to`).
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.http_server import BackgroundServer, ServedHTTP


@dataclass
class Delivery:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class WebhookReceiver(BackgroundServer):
    def __init__(
        self,
        statuses: list[int] | None = None,
        redirect_to: str | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        port: int = 0,
    ) -> None:
        self.host = host  # any 127.x address listens on Linux loopback
        self.tls = tls  # a server-side context: HTTPS, recording the SNI names clients send
        self.sni_names: list[str | None] = []
        self.statuses = list(statuses or [200])
        self.redirect_to = redirect_to
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._served: ServedHTTP | None = None
        # 0: any free port, set by start(); a given one: a URL handed out before the
        # receiver existed. Kept after stop() (a port nobody listens on).
        self.port = port

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}/hook"

    def _next_status(self) -> int:
        with self._lock:
            index = min(len(self.deliveries), len(self.statuses)) - 1
            return self.statuses[max(index, 0)]

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.deliveries.append(
                        Delivery("POST", self.path, dict(self.headers.items()), body)
                    )
                status = receiver._next_status()
                self.send_response(status)
                if receiver.redirect_to and 300 <= status < 400:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                return None

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        if self.tls is not None:

            def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
                self.sni_names.append(name)

            self.tls.sni_callback = record_sni  # type: ignore[assignment]
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self._served = ServedHTTP(server)
        self.port = self._served.port
        return self

    def wait_for(self, count: int, timeout: float = 120.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.deliveries) >= count:
                    return list(self.deliveries)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.deliveries)} deliveries after {timeout}s, not {count}")
