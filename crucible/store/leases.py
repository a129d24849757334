"""Job ownership: leases, heartbeats, the reaper's requeue, the publish marker.

A running job belongs to the worker named in `jobs.worker` while `lease_expires_at` lies in
the future; the owner renews it (`heartbeat`). Every change of owner or state here is one
conditional UPDATE, so when several workers (or reapers) race, the database picks exactly
one winner and the others see `False`/`None`. Times come from the caller's clock (UTC):
workers that share a database need clocks within a small fraction of the lease.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from crucible.spec import Job, JobResult
from crucible.store.models import JobRow, now_utc

WORKER_LOST = "worker_lost"


@dataclass(frozen=True)
class Ownership:
    """Who holds a job and how far it got: what the runner and the reaper decide on."""

    status: str
    worker: str | None
    attempts: int
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    published_at: datetime | None
    result: dict[str, Any] | None


def lease_expired(now: datetime) -> ColumnElement[bool]:
    """A running job's lease has run out (or it never had one: claimed before leases)."""
    return or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now)


def _last_sent() -> ColumnElement[datetime]:
    """When a queued job's task was last sent: the reaper's resend or requeue
    (heartbeat_at), else the job's creation."""
    return func.coalesce(JobRow.heartbeat_at, JobRow.created_at)


def update_one(session: Session, job_id: str, *where: Any, **values: Any) -> bool:
    """UPDATE the job `job_id` where every condition holds; True when it changed one row
    (the caller won the race), False when the conditions no longer held."""
    done = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def worker_lost_error(attempts: int) -> dict[str, Any]:
    return {
        "code": WORKER_LOST,
        "message": f"the job's worker stopped renewing its lease {attempts} time(s); "
        f"giving up after {attempts} attempt(s) (CRUCIBLE_MAX_ATTEMPTS)",
        "detail": {"attempts": attempts},
    }


class LeaseMixin:
    """JobStore's lease methods; `claim` (queued -> running) is JobStore's own."""

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def _get(self, session: Session, job_id: str, tenant: str | None = None) -> Job | None:
        raise NotImplementedError

    def take_over(
        self, job_id: str, worker: str, lease_seconds: float, max_attempts: int
    ) -> Job | None:
        """A running job whose lease expired becomes `worker`'s (attempts += 1), if it has
        attempts left; None when the lease is live, attempts are spent, or it is not running."""
        now = now_utc()
        with self._tx(write=True) as session:
            if not update_one(
                session,
                job_id,
                JobRow.status == "running",
                lease_expired(now),
                JobRow.attempts < max_attempts,
                worker=worker,
                attempts=JobRow.attempts + 1,
                heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            ):
                return None
            return self._get(session, job_id)

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Renew `worker`'s lease; False when the job is no longer running under it
        (finished, or requeued by a reaper after the lease ran out)."""
        now = now_utc()
        with self._tx(write=True) as session:
            return update_one(
                session,
                job_id,
                JobRow.status == "running",
                JobRow.worker == worker,
                heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            )

    def ownership(self, job_id: str) -> Ownership | None:
        with self._tx() as session:
            row = session.execute(
                select(
                    JobRow.status,
                    JobRow.worker,
                    JobRow.attempts,
                    JobRow.heartbeat_at,
                    JobRow.lease_expires_at,
                    JobRow.published_at,
                    JobRow.result,
                ).where(JobRow.id == job_id)
            ).one_or_none()
        if row is None:
            return None
        return Ownership(
            status=row.status,
            worker=row.worker,
            attempts=int(row.attempts or 0),
            heartbeat_at=row.heartbeat_at,
            lease_expires_at=row.lease_expires_at,
            published_at=row.published_at,
            result=row.result,
        )

    # -- the reaper -------------------------------------------------------------------------

    def expired_jobs(self, limit: int = 100) -> list[tuple[str, int]]:
        """(id, attempts) of running jobs whose lease has run out, oldest lease first."""
        now = now_utc()
        with self._tx() as session:
            rows = session.execute(
                select(JobRow.id, JobRow.attempts)
                .where(JobRow.status == "running", lease_expired(now))
                .order_by(JobRow.lease_expires_at)
                .limit(limit)
            ).all()
        return [(r.id, int(r.attempts or 0)) for r in rows]

    def requeue_expired(self, job_id: str, max_attempts: int) -> bool:
        """running (lease expired, attempts left) -> queued, for exactly one caller. The
        expired lease stays in the row: `unrequeue` uses it to tell this job from a new one."""
        now = now_utc()
        with self._tx(write=True) as session:
            # heartbeat_at of a queued job: when its task was last sent.
            return update_one(
                session,
                job_id,
                JobRow.status == "running",
                lease_expired(now),
                JobRow.attempts < max_attempts,
                status="queued",
                worker=None,
                heartbeat_at=now,
            )

    def stale_queued_jobs(self, older_than: float, limit: int = 100) -> list[str]:
        """Queued jobs whose task was sent (or that were created) over `older_than` s ago."""
        cutoff = now_utc() - timedelta(seconds=older_than)
        with self._tx() as session:
            rows = session.execute(
                select(JobRow.id)
                .where(JobRow.status == "queued", _last_sent() < cutoff)
                .order_by(JobRow.id)
                .limit(limit)
            ).all()
        return [r.id for r in rows]

    def mark_resent(self, job_id: str, older_than: float) -> bool:
        """Record that a stale queued job's task is sent again now; True for one caller."""
        now = now_utc()
        cutoff = now - timedelta(seconds=older_than)
        with self._tx(write=True) as session:
            return update_one(
                session, job_id, JobRow.status == "queued", _last_sent() < cutoff, heartbeat_at=now
            )

    def unrequeue(self, job_id: str) -> bool:
        """Undo `requeue_expired` when the task could not be sent (broker down): back to
        running with its expired lease, so the next reaper pass tries again."""
        with self._tx(write=True) as session:
            return update_one(
                session,
                job_id,
                JobRow.status == "queued",
                JobRow.worker.is_(None),
                JobRow.lease_expires_at.is_not(None),
                status="running",
            )

    def fail_expired(self, job_id: str, max_attempts: int) -> bool:
        """running (lease expired, no attempts left) -> failed `worker_lost`, once."""
        now = now_utc()
        with self._tx(write=True) as session:
            attempts = session.execute(
                select(JobRow.attempts).where(JobRow.id == job_id)
            ).scalar_one_or_none()
            if attempts is None:
                return False
            return update_one(
                session,
                job_id,
                JobRow.status == "running",
                lease_expired(now),
                JobRow.attempts >= max_attempts,
                status="failed",
                error=worker_lost_error(attempts),
                finished_at=now,
            )

    # -- exactly-once publish ---------------------------------------------------------------

    def record_publish(self, job_id: str, worker: str, result: dict[str, Any]) -> bool:
        """Set the publish marker and the result together, once: only while `worker` holds
        the running job and no attempt has published before. False: someone else did, or
        this worker lost the job; the caller must then not report a publish of its own."""
        doc = JobResult.model_validate(result).model_dump(mode="json")
        with self._tx(write=True) as session:
            return update_one(
                session,
                job_id,
                JobRow.status == "running",
                JobRow.worker == worker,
                JobRow.published_at.is_(None),
                published_at=now_utc(),
                result=doc,
            )
