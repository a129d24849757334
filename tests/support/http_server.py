"""An in-process HTTP server for tests: a ThreadingHTTPServer on a daemon thread."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


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
