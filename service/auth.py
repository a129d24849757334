"""Bearer API keys: every request but health checks resolves to a tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="An API key from `crucible keys create`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def invalid_key() -> ApiError:
    return ApiError(401, "unauthorized", "invalid or revoked API key", headers=_CHALLENGE)


async def bearer_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The presented key, unchecked (async: no database, so no thread-pool hop)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send Authorization: Bearer <key>",
            headers=_CHALLENGE,
        )
    return credentials.credentials


BearerKey = Annotated[str, Depends(bearer_key)]


def require_tenant(request: Request, api_key: BearerKey) -> str:
    tenant = request.app.state.store.verify_api_key(api_key)
    if tenant is None:
        raise invalid_key()
    return tenant


Tenant = Annotated[str, Depends(require_tenant)]
