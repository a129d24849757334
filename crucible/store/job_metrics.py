"""Aggregates the /metrics endpoint reads at scrape time: a JobStore mixin.

Metrics are computed from the database, not from process memory, so every API replica
reports the same numbers whichever worker ran the jobs. Finished jobs are read in keyset
pages of (finished_at, id) so a scrape's work is bounded; the caller keeps the position.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from crucible.spec import TERMINAL_STATUSES
from crucible.store.models import JobEventRow, JobRow, TrialRow

_FINISHED = "<finished>"  # the end of the last stage: the job's terminal write
# StoreReporter.stage writes "stage <name> started"; data {"stage": name} when present wins.
_STAGE_MESSAGE = re.compile(r"stage (\S+) started")


def stage_of(message: str, data: dict[str, Any] | None) -> str | None:
    """The stage a `stage` event starts, or None when it names none."""
    if data and isinstance(data.get("stage"), str):
        return str(data["stage"])
    match = _STAGE_MESSAGE.fullmatch(message)
    return match.group(1) if match else None


@dataclass(frozen=True)
class FinishedJob:
    """What metrics need of one terminal job."""

    id: str
    status: str
    started_at: datetime | None
    finished_at: datetime
    input_bytes: int
    output_bytes: int
    # (stage, start time) in the order the stages started; (None, time) where another
    # worker took the job over (the stage running then never finished).
    stages: list[tuple[str | None, datetime]] = field(default_factory=list)

    def stage_durations(self) -> list[tuple[str, float]]:
        """Each stage lasts until the next one starts; the last one until the job ended.
        A stage cut short by a takeover is left out: it measured a lost worker."""
        ends = [*self.stages[1:], (_FINISHED, self.finished_at)]
        return [
            (name, max(0.0, (end - start).total_seconds()))
            for (name, start), (next_name, end) in zip(self.stages, ends, strict=True)
            if name is not None and next_name is not None
        ]


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _output_bytes(files: Any) -> int:
    if not isinstance(files, list):
        return 0
    return sum(_int(f.get("bytes")) for f in files if isinstance(f, dict))


class JobMetricsMixin:
    """Counts and finished-job pages for Prometheus metrics."""

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def count_jobs_by_status(self) -> dict[str, int]:
        with self._tx() as session:
            rows = session.execute(select(JobRow.status, func.count()).group_by(JobRow.status))
            return {status: int(n) for status, n in rows}

    def count_trials(self) -> int:
        with self._tx() as session:
            return int(session.execute(select(func.count()).select_from(TrialRow)).scalar_one())

    def finished_jobs(
        self, since: datetime | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[FinishedJob]:
        """Terminal jobs ordered by (finished_at, id): those finished at or after `since`,
        and after the keyset position `after` when given; at most `limit`."""
        query = select(
            JobRow.id,
            JobRow.status,
            JobRow.started_at,
            JobRow.finished_at,
            JobRow.result["metrics"]["input_bytes"].label("input_bytes"),
            JobRow.result["files"].label("files"),
        ).where(JobRow.status.in_(sorted(TERMINAL_STATUSES)), JobRow.finished_at.is_not(None))
        if since is not None:
            query = query.where(JobRow.finished_at >= since)
        if after is not None:
            at, job_id = after
            query = query.where(
                or_(JobRow.finished_at > at, and_(JobRow.finished_at == at, JobRow.id > job_id))
            )
        query = query.order_by(JobRow.finished_at, JobRow.id).limit(limit)
        with self._tx() as session:
            rows = list(session.execute(query))
            stages: dict[str, list[tuple[str | None, datetime]]] = {r.id: [] for r in rows}
            if rows:
                events = session.execute(
                    select(
                        JobEventRow.job_id,
                        JobEventRow.kind,
                        JobEventRow.at,
                        JobEventRow.message,
                        JobEventRow.data,
                    )
                    .where(
                        JobEventRow.job_id.in_(list(stages)),
                        JobEventRow.kind.in_(("stage", "takeover")),
                    )
                    .order_by(JobEventRow.job_id, JobEventRow.id)
                )
                for ev in events:
                    if ev.kind == "takeover":
                        stages[ev.job_id].append((None, ev.at))
                    elif (name := stage_of(ev.message, ev.data)) is not None:
                        stages[ev.job_id].append((name, ev.at))
        return [
            FinishedJob(
                id=r.id,
                status=r.status,
                started_at=r.started_at,
                finished_at=r.finished_at,
                input_bytes=_int(r.input_bytes),
                output_bytes=_output_bytes(r.files),
                stages=stages[r.id],
            )
            for r in rows
        ]
