"""Table definitions (SQLAlchemy 2 typed declarative).

The schema itself is owned by the alembic migrations in ``migrations/versions``; these models
must stay in step with them (tests/test_store.py compares the two).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now_utc() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL keeps the offset (timestamptz); SQLite drops it, so we store naive UTC there and
    attach UTC again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact); plain JSON text elsewhere.
JSONDoc = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # Two concurrent POSTs with the same key end up as one job: the loser's INSERT fails.
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        # Listing is "this tenant's jobs, newest first", optionally filtered by status.
        Index("ix_jobs_tenant_id", "tenant", "id"),
        Index("ix_jobs_tenant_status_id", "tenant", "status", "id"),
        # The reaper looks for running jobs whose lease has expired.
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        # The webhook outbox reads the pending ones (jobs not finished or not delivered).
        Index("ix_jobs_webhook_state", "webhook_state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    spec_digest: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Lease: the owning worker (`worker`) renews heartbeat_at/lease_expires_at while it runs;
    # a running job whose lease expired has lost its worker (the reaper requeues it).
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Publish marker: set once, atomically, when the output is published (exactly once).
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Fernet ciphertext of the request's secrets (Hub tokens, webhook secret); never served.
    secrets: Mapped[str | None] = mapped_column(Text)
    # Webhook deliveries: [{at, url, status_code | error, attempt}], newest last.
    deliveries: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDoc)
    # Webhook outbox (crucible/store/outbox.py): 'pending' from submit for a job with a
    # webhook until a delivery run ends ('delivered' or 'failed'); NULL without a webhook.
    # The run sending it now holds `webhook_claim` (a token), renewed at each attempt.
    webhook_state: Mapped[str | None] = mapped_column(String(16))
    webhook_claim: Mapped[str | None] = mapped_column(String(32))
    webhook_claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Bytes of every input's weights (from the headers), for per-tenant limits.
    input_bytes: Mapped[int | None] = mapped_column(BigInteger)


class JobEventRow(Base):
    __tablename__ = "job_events"
    # Events are read as "the last N of one job", in insertion order.
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    label: Mapped[str | None] = mapped_column(String(255))
    # sha256 hex of the secret part only; the plaintext is shown once and never stored.
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DatasetRow(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        # Listing is "this tenant's datasets, newest first".
        Index("ix_datasets_tenant_id", "tenant", "id"),
        # Deleting asks whether another row still uses the same blob.
        Index("ix_datasets_sha256_format", "sha256", "format"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str | None] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    # Column "schema"; the attribute is row_schema so it never reads as a database schema.
    row_schema: Mapped[str] = mapped_column("schema", String(32))
    rows: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # Classification: [{"label": str | int, "count": int}] sorted by label; [] otherwise.
    labels: Mapped[list[dict[str, Any]]] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TrialRow(Base):
    __tablename__ = "trials"
    # One row per (job, trial index): a re-run of a trial overwrites it.
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_trials_job_id_index"),)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column("index", Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
