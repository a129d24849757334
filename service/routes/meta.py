"""Methods catalogue and health checks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from crucible.methods.registry import METHODS, describe
from crucible.queue import check_broker

router = APIRouter()


class MethodDescription(BaseModel):
    name: str
    summary: str
    needs: list[str]
    # Whether the method works on whole matrices (tsv, iso, wudi, ace, regmean, bmm) rather
    # than elementwise on task vectors.
    matrix: bool
    # Params that accept per-tensor overrides (a list over layers or {filter, value} rules).
    per_tensor_params: list[str]
    params_schema: dict[str, Any]


class MethodList(BaseModel):
    items: list[MethodDescription]


@router.get("/v1/methods", response_model=MethodList, tags=["methods"])
def list_methods() -> MethodList:
    """Every merge method with the JSON schema of its params (defaults and ranges)."""
    return MethodList(items=[MethodDescription(**describe(m)) for m in METHODS.values()])


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "A dependency is down"}})
def readyz(request: Request) -> JSONResponse:
    """The database and the broker answer."""
    checks: dict[str, str] = {}
    try:
        request.app.state.store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        check_broker(request.app.state.celery)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    if ready:
        return JSONResponse({"status": "ok", "checks": checks})
    return JSONResponse(
        status_code=503,
        content={
            "error": {"code": "not_ready", "message": "a dependency is down", "detail": checks}
        },
    )
