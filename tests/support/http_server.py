"""An in-process HTTP server for tests: a ThreadingHTTPServer on a daemon thread."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Self


class ServedHTTP:
    """Serves `server` (already bound, its socket wrapped if it speaks TLS) until `stop`."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        server.daemon_threads = True
        self.server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


class BackgroundServer:
    """A test server object: `start` (the subclass's) binds and serves into `_served`;
    `stop` and the context manager are shared."""

    _served: ServedHTTP | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
            self._served = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
