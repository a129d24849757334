"""Incremental reads of a job's history for live progress (SSE): a JobStore mixin.

Events and trials are rows with increasing ids, so "everything after id N" is a keyset read
on (job_id, id) with a limit: the work of one poll is bounded whatever the job's history.
A job's events are written by the one worker that owns it, each in its own committed
transaction, so ids become visible in order and a reader never skips a row.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from crucible.spec import Progress
from crucible.store.models import JobEventRow, JobRow, TrialRow


@dataclass(frozen=True)
class EventRecord:
    """One job event row, with its id (the stream's position)."""

    id: int
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class TrialRecord:
    """One tuning trial row: its id, index and what the tuner recorded."""

    id: int
    at: datetime
    index: int
    data: dict[str, Any]


@dataclass(frozen=True)
class JobState:
    """The small part of a job row a progress stream polls (no spec, result or events)."""

    status: str
    stage: str | None
    progress: Progress
    cancel_requested: bool


class EventReadMixin:
    """Keyset reads of events and trials, and the job's live state."""

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def events_after(self, job_id: str, after_id: int, limit: int) -> list[EventRecord]:
        """Up to `limit` events of the job with id > after_id, oldest first."""
        with self._tx() as session:
            rows = session.execute(
                select(
                    JobEventRow.id,
                    JobEventRow.at,
                    JobEventRow.kind,
                    JobEventRow.message,
                    JobEventRow.data,
                )
                .where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
                .order_by(JobEventRow.id)
                .limit(limit)
            )
            return [EventRecord(r.id, r.at, r.kind, r.message, r.data) for r in rows]

    def trials_after(self, job_id: str, after_id: int, limit: int) -> list[TrialRecord]:
        """Up to `limit` trials of the job whose row id > after_id, in row-id order."""
        with self._tx() as session:
            rows = session.execute(
                select(TrialRow.id, TrialRow.created_at, TrialRow.index, TrialRow.data)
                .where(TrialRow.job_id == job_id, TrialRow.id > after_id)
                .order_by(TrialRow.id)
                .limit(limit)
            )
            return [TrialRecord(r.id, r.created_at, r.index, r.data) for r in rows]

    def job_state(self, job_id: str, tenant: str | None = None) -> JobState | None:
        """Status, stage and progress; with a tenant, another tenant's job is None."""
        query = select(JobRow.status, JobRow.stage, JobRow.progress, JobRow.cancel_requested).where(
            JobRow.id == job_id
        )
        if tenant is not None:
            query = query.where(JobRow.tenant == tenant)
        with self._tx() as session:
            row = session.execute(query).one_or_none()
        if row is None:
            return None
        return JobState(
            status=row.status,
            stage=row.stage,
            progress=Progress.model_validate(row.progress or {}),
            cancel_requested=bool(row.cancel_requested),
        )
