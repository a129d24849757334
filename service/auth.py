"""Bearer API keys: every request but health checks resolves to a tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="An API key from `crucible keys create`.")


def require_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send Authorization: Bearer <key>",
            headers=challenge,
        )
    tenant = request.app.state.store.verify_api_key(credentials.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=challenge)
    return tenant


Tenant = Annotated[str, Depends(require_tenant)]
