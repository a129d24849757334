"""The API's own limits: request body size and per-tenant concurrent jobs.

Every refusal names the setting that sets the limit, so a caller knows what was exceeded
and an operator knows what to raise. (Per-job caps on experts, trials and samples are
checked with the spec in routes/merges.py; the per-tenant input-bytes limit can only be
checked by the worker, once the inputs are resolved: crucible/tenant_limits.py.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy import func, select

from crucible.store import JobStore
from crucible.store.models import JobRow
from service.errors import ApiError, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ACTIVE_STATUSES = ("queued", "running")


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


def active_jobs(store: JobStore, tenant: str) -> int:
    """The tenant's queued and running jobs."""
    query = (
        select(func.count())
        .select_from(JobRow)
        .where(JobRow.tenant == tenant, JobRow.status.in_(ACTIVE_STATUSES))
    )
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _has_key(store: JobStore, tenant: str, idempotency_key: str) -> bool:
    query = select(JobRow.id).where(
        JobRow.tenant == tenant, JobRow.idempotency_key == idempotency_key
    )
    with store.engine.connect() as conn:
        return conn.execute(query.limit(1)).first() is not None


def too_many_jobs(limit: int, active: int) -> ApiError:
    return ApiError(
        429,
        "too_many_jobs",
        f"this tenant has {active} queued or running jobs; at most {limit} at once "
        "(max_concurrent_jobs_per_tenant): wait for one to finish",
        {"limit": limit, "setting": "max_concurrent_jobs_per_tenant", "active": active},
    )


def check_job_slots(store: JobStore, tenant: str, limit: int, idempotency_key: str | None) -> None:
    """Before a job is created: refuse when the tenant already has `limit` active jobs. A
    retry under an Idempotency-Key that already has a job is let through (it creates
    nothing: the existing job, or a 409, is the answer)."""
    active = active_jobs(store, tenant)
    if active < limit:
        return
    if idempotency_key is not None and _has_key(store, tenant, idempotency_key):
        return
    raise too_many_jobs(limit, active)
