"""The webhook outbox: which finished jobs still owe their webhook, and who sends it.

A job whose spec names a webhook is stored with `webhook_state = 'pending'` (in the same
INSERT as the job), so a worker that dies between writing the terminal status and
sending the webhook leaves a row that says so. A delivery run (crucible/webhooks.py)
first claims the job's delivery with a fresh token, renews the claim before each attempt
and ends it as 'delivered' or 'failed'; the reaper sends the delivery task again for a
finished job still 'pending' whose claim (or, never claimed, whose end) is older than the
grace period. Every step is one conditional UPDATE, so of several runs and reapers racing
exactly one wins each step: a delivery is never sent by two runs in the same window.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from crucible.spec import TERMINAL_STATUSES
from crucible.store.leases import update_one
from crucible.store.models import JobRow, now_utc

PENDING = "pending"


def spec_has_webhook(spec: Mapping[str, Any]) -> bool:
    hook = spec.get("webhook")
    return isinstance(hook, dict) and bool(hook.get("url"))


def initial_webhook_state(spec: Mapping[str, Any]) -> str | None:
    """The `webhook_state` a new job is stored with."""
    return PENDING if spec_has_webhook(spec) else None


def _owed(cutoff: Any) -> list[ColumnElement[bool]]:
    """Finished, webhook still pending, and nobody claimed or marked it since `cutoff`."""
    last_touched = func.coalesce(JobRow.webhook_claimed_at, JobRow.finished_at, JobRow.created_at)
    return [
        JobRow.webhook_state == PENDING,
        JobRow.status.in_(sorted(TERMINAL_STATUSES)),
        last_touched < cutoff,
    ]


class OutboxMixin:
    """JobStore's webhook-outbox methods."""

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    # -- the reaper -------------------------------------------------------------------------

    def owed_webhooks(self, grace_seconds: float, limit: int = 100) -> list[str]:
        """Finished jobs whose webhook is still pending `grace_seconds` after the job ended
        or after the last claim: the run that should send it died, or was never sent."""
        cutoff = now_utc() - timedelta(seconds=grace_seconds)
        with self._tx() as session:
            rows = session.execute(
                select(JobRow.id).where(*_owed(cutoff)).order_by(JobRow.id).limit(limit)
            ).all()
        return [r.id for r in rows]

    def mark_webhook_resent(self, job_id: str, grace_seconds: float) -> bool:
        """The reaper's mark before it sends the delivery task again: drops a stale claim
        (its run is gone) and dates the mark now, so that no other reaper sends it again
        within `grace_seconds`. True for exactly one caller."""
        now = now_utc()
        cutoff = now - timedelta(seconds=grace_seconds)
        with self._tx(write=True) as session:
            return update_one(
                session, job_id, *_owed(cutoff), webhook_claim=None, webhook_claimed_at=now
            )

    # -- a delivery run ---------------------------------------------------------------------

    def claim_webhook(self, job_id: str, stale_after: float) -> str | None:
        """This run's token when it may send the finished job's webhook: the delivery is
        pending and unclaimed (or its claim was not renewed for `stale_after` s: the run
        died). None: another run holds it, it ended, or there is none to send."""
        now = now_utc()
        token = secrets.token_hex(16)
        with self._tx(write=True) as session:
            won = update_one(
                session,
                job_id,
                JobRow.webhook_state == PENDING,
                JobRow.status.in_(sorted(TERMINAL_STATUSES)),
                or_(
                    JobRow.webhook_claim.is_(None),
                    JobRow.webhook_claimed_at.is_(None),
                    JobRow.webhook_claimed_at < now - timedelta(seconds=stale_after),
                ),
                webhook_claim=token,
                webhook_claimed_at=now,
            )
        return token if won else None

    def renew_webhook_claim(self, job_id: str, token: str) -> bool:
        """Before each attempt: True while the run still holds the delivery."""
        with self._tx(write=True) as session:
            return update_one(
                session,
                job_id,
                JobRow.webhook_state == PENDING,
                JobRow.webhook_claim == token,
                webhook_claimed_at=now_utc(),
            )

    def end_webhook(self, job_id: str, token: str, state: Literal["delivered", "failed"]) -> bool:
        """The run is over: delivered (a 2xx came back) or failed (it gave up)."""
        with self._tx(write=True) as session:
            return update_one(
                session,
                job_id,
                JobRow.webhook_state == PENDING,
                JobRow.webhook_claim == token,
                webhook_state=state,
            )

    def webhook_state(self, job_id: str) -> str | None:
        with self._tx() as session:
            value = session.execute(
                select(JobRow.webhook_state).where(JobRow.id == job_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)
