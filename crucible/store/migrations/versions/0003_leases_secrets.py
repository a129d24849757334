"""Job leases (owner heartbeat, expiry, publish marker), encrypted secrets, webhook
deliveries and the job's input size (per-tenant limits).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crucible.store.models import JSONDoc, UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("published_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("secrets", sa.Text(), nullable=True))
        batch.add_column(sa.Column("deliveries", JSONDoc, nullable=True))
        batch.add_column(sa.Column("input_bytes", sa.BigInteger(), nullable=True))
    op.create_index("ix_jobs_status_lease_expires_at", "jobs", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_lease_expires_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in (
            "input_bytes",
            "deliveries",
            "secrets",
            "published_at",
            "lease_expires_at",
            "heartbeat_at",
        ):
            batch.drop_column(name)
