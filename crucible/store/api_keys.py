"""API keys: the plaintext is shown once; only a hash of its secret part is stored.

Format: ``crk_<key_id>_<secret>`` where key_id is 16 hex characters (the row's primary key,
so verification is one indexed lookup) and secret is 32 random bytes, urlsafe base64.
The secret is high-entropy, so a fast hash (sha256) is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from crucible.store.models import ApiKeyRow, now_utc

T = TypeVar("T")

KEY_PREFIX = "crk_"
_KEY = re.compile(r"crk_([0-9a-f]{16})_([A-Za-z0-9_-]{43,128})")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_api_key(plaintext: str) -> tuple[str, str] | None:
    """(key_id, secret), or None when the string is not shaped like one of our keys."""
    # fullmatch, not match with "$": "$" also accepts a trailing newline.
    match = _KEY.fullmatch(plaintext) if isinstance(plaintext, str) else None
    return (match[1], match[2]) if match else None


# What `tenant_if_valid` reads, by key id; built once (every authenticated request runs it).
KEY_ROW = select(ApiKeyRow.tenant, ApiKeyRow.secret_sha256, ApiKeyRow.revoked_at).where(
    ApiKeyRow.id == bindparam("key_id")
)


def tenant_if_valid(row: Any, secret: str) -> str | None:
    """The tenant of a key row (tenant, secret_sha256, revoked_at) whose stored hash matches
    the secret; None for no row, a revoked key or another secret."""
    if row is None or row.revoked_at is not None:
        return None
    # Constant-time compare, so response timing says nothing about the stored hash.
    if not hmac.compare_digest(row.secret_sha256, _digest(secret)):
        return None
    return str(row.tenant)


class ApiKeyMixin:
    """API-key methods of JobStore (same database, same transactions)."""

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def _read(self, query: Callable[[Session], T]) -> T:
        raise NotImplementedError

    def create_api_key(self, tenant: str, label: str | None = None) -> tuple[str, str]:
        """(key_id, plaintext); the plaintext cannot be recovered later."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._tx(write=True) as session:
            session.add(
                ApiKeyRow(
                    id=key_id,
                    tenant=tenant,
                    label=label,
                    secret_sha256=_digest(secret),
                    created_at=now_utc(),
                    revoked_at=None,
                )
            )
        return key_id, f"{KEY_PREFIX}{key_id}_{secret}"

    def verify_api_key(self, plaintext: str) -> str | None:
        """The key's tenant, or None for a malformed, unknown or revoked key."""
        parsed = parse_api_key(plaintext)
        if parsed is None:
            return None
        key_id, secret = parsed
        row = self._read(
            lambda session: session.connection().execute(KEY_ROW, {"key_id": key_id}).one_or_none()
        )
        return tenant_if_valid(row, secret)

    def revoke_api_key(self, key_id: str) -> bool:
        """True if the key exists (now revoked; revoking twice keeps the first time)."""
        with self._tx(write=True) as session:
            session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=now_utc())
                .execution_options(synchronize_session=False)
            )
            found = session.execute(
                select(ApiKeyRow.id).where(ApiKeyRow.id == key_id)
            ).scalar_one_or_none()
        return found is not None

    def rotate_api_key(self, key_id: str) -> tuple[str, str] | None:
        """A new key for the same tenant and label, and the old one revoked, in one
        transaction: (new key_id, plaintext), or None when the key is unknown or revoked."""
        key_id_new = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._tx(write=True) as session:
            revoked = session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=now_utc())
                .returning(ApiKeyRow.tenant, ApiKeyRow.label)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if revoked is None:
                return None
            session.add(
                ApiKeyRow(
                    id=key_id_new,
                    tenant=revoked.tenant,
                    label=revoked.label,
                    secret_sha256=_digest(secret),
                    created_at=now_utc(),
                    revoked_at=None,
                )
            )
        return key_id_new, f"{KEY_PREFIX}{key_id_new}_{secret}"

    def list_api_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """id, tenant, label, created_at, revoked_at of each key (oldest first); no hashes."""
        query = select(
            ApiKeyRow.id,
            ApiKeyRow.tenant,
            ApiKeyRow.label,
            ApiKeyRow.created_at,
            ApiKeyRow.revoked_at,
        ).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        with self._tx() as session:
            return [dict(row._mapping) for row in session.execute(query)]
