"""The webhook outbox: each job's delivery state and the claim of the run sending it.

`webhook_state` is 'pending' from submit for a job with a webhook until a delivery run
ends ('delivered' or 'failed'); NULL for a job without one. `webhook_claim` and
`webhook_claimed_at` name the run sending it now and when it last renewed its claim.
Queued and running jobs with a webhook become 'pending'; finished jobs keep NULL (their
webhook went out, or was lost, before the outbox: it is not sent late now).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crucible.store.models import JSONDoc, UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("webhook_claim", sa.String(32), nullable=True))
        batch.add_column(sa.Column("webhook_claimed_at", UTCDateTime(), nullable=True))
    op.create_index("ix_jobs_webhook_state", "jobs", ["webhook_state"])
    # Jobs not finished yet: 'pending' when their spec names a webhook URL (read in Python:
    # the same test on SQLite's JSON text and PostgreSQL's JSONB).
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("status", sa.String),
        sa.column("spec", JSONDoc),
        sa.column("webhook_state", sa.String),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.status.in_(("queued", "running")))
    ).all()
    for row in rows:
        hook = (row.spec or {}).get("webhook")
        if isinstance(hook, dict) and hook.get("url"):
            conn.execute(sa.update(jobs).where(jobs.c.id == row.id).values(webhook_state="pending"))


def downgrade() -> None:
    op.drop_index("ix_jobs_webhook_state", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("webhook_claimed_at", "webhook_claim", "webhook_state"):
            batch.drop_column(name)
