"""The API's own limits: request body size, and the answer for per-tenant concurrent jobs
(counted by `JobStore.create_job` in the insert's transaction).

Every refusal names the setting that sets the limit, so a caller knows what was exceeded
and an operator knows what to raise. (Per-job caps on experts, trials and samples are
checked with the spec in routes/merges.py; the per-tenant input-bytes limit can only be
checked by the worker, once the inputs are resolved: crucible/tenant_limits.py.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import ApiError, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestSizeLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 `request_too_large`.

    Checked twice: on Content-Length before anything is read, and on the bytes actually
    received, so a chunked body (no Content-Length) or a lying header cannot get past it.
    The body is buffered (it is at most `max_bytes`) and handed to the app unchanged.
    Routes in `exempt` ((method, path) pairs) keep their own, larger limit: the dataset
    upload streams to disk and checks CRUCIBLE_MAX_DATASET_BYTES itself.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, exempt: frozenset[tuple[str, str]] = frozenset()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"declares {declared} bytes")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, f"sent more than {self.max_bytes} bytes")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        response = error_response(
            413,
            "request_too_large",
            f"the request body {what}; this server accepts at most {self.max_bytes} bytes "
            "(max_request_bytes)",
            {"limit": self.max_bytes, "setting": "max_request_bytes"},
            headers={"Connection": "close"},  # the rest of the body is not read
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses a malformed length before we see it
    return None


# ----------------------------------------------------------------------------- jobs


def too_many_jobs(limit: int, active: int) -> ApiError:
    return ApiError(
        429,
        "too_many_jobs",
        f"this tenant has {active} queued or running jobs; at most {limit} at once "
        "(max_concurrent_jobs_per_tenant): wait for one to finish",
        {"limit": limit, "setting": "max_concurrent_jobs_per_tenant", "active": active},
    )
