"""One JSON error shape everywhere: {"error": {"code", "message", "detail"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


def job_not_found(job_id: str) -> ApiError:
    """Another tenant's job reads the same as a job that does not exist."""
    return ApiError(404, "not_found", f"no merge job {job_id!r}")


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "detail": jsonable_encoder(detail)}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # `input` echoes the caller's values back (later: secrets); keep loc, msg and type only.
    return [{"field": _field(e["loc"]), "message": e["msg"], "type": e["type"]} for e in errors]


def _database_unavailable() -> JSONResponse:
    return error_response(
        503,
        "database_unavailable",
        "the job database is unavailable; retry later",
        headers={"Retry-After": "1"},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(list(exc.errors()))
        first = detail[0] if detail else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        if len(detail) > 1:
            message += f" (and {len(detail) - 1} more)"
        return error_response(422, "invalid_request", message, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        # A database that is down, restarting or out of connections is the caller's cue to
        # retry, not a server bug: 503 with Retry-After (pollers and `crucible.client` retry).
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            log.warning("database unavailable: %s", type(exc.orig).__name__)
            return _database_unavailable()
        log.exception("database error")
        return error_response(500, "internal", "internal server error")

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(_: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("database connection pool exhausted")
        return _database_unavailable()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal server error")
