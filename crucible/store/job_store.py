"""Job records: the one place that reads and writes jobs and their events.

The API process and the worker process share the database (SQLite file by default,
PostgreSQL in production). Every state change that can race (claim, cancel, idempotent
create) is a single conditional statement or a write transaction, so the database decides
the winner. Everything returned is a pydantic ``crucible.spec.Job``, never an ORM row.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, get_args

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, bindparam, create_engine, event, func, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from crucible.spec import (
    TERMINAL_STATUSES,
    Job,
    JobError,
    JobEvent,
    JobResult,
    JobStatus,
    Progress,
)
from crucible.store.api_keys import KEY_ROW, ApiKeyMixin, parse_api_key, tenant_if_valid
from crucible.store.cursors import decode_cursor, encode_cursor, new_job_id
from crucible.store.datasets import DatasetMixin, TrialMixin
from crucible.store.events import EventReadMixin
from crucible.store.job_metrics import JobMetricsMixin
from crucible.store.leases import LeaseMixin, update_one
from crucible.store.models import ApiKeyRow, JobEventRow, JobRow, now_utc
from crucible.store.outbox import OutboxMixin, initial_webhook_state

__all__ = ["JobStore", "decode_cursor", "encode_cursor", "new_job_id"]

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
EVENTS_PER_JOB = 100
JOB_STATUSES: frozenset[str] = frozenset(get_args(JobStatus))

# Long enough that an API request waits out a worker's short write instead of failing.
_SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option that makes our SQLite "begin" hook take the write lock up front.
_IMMEDIATE = "crucible_sqlite_immediate"
# Any fixed 64-bit number; every process migrating the same database takes this lock.
_MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"crucible.store.migrate").digest()[:8], "big", signed=True
)


def _active_jobs(session: Session, tenant: str) -> int:
    query = select(func.count()).select_from(JobRow)
    query = query.where(JobRow.tenant == tenant, JobRow.status.in_(("queued", "running")))
    return int(session.execute(query).scalar_one())


class TooManyJobs(Exception):
    """The tenant already has `max_active` queued or running jobs."""

    def __init__(self, active: int) -> None:
        super().__init__(active)
        self.active = active


class IdempotencyConflict(Exception):
    """The tenant already used this idempotency key for a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"idempotency key already used for job {self.job_id} with a different body"


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An alembic Config for our migrations, with no alembic.ini needed on disk.

    ``connection`` (already in a transaction) is what migrate() uses; ``url`` is for tooling,
    e.g. ``command.revision(alembic_config(url), "add x", autogenerate=True)``.
    """
    cfg = Config()
    # Config options go through configparser interpolation: double any '%'.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    # Several version_locations are separated by os.pathsep (alembic's non-legacy mode).
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _set_wal(cursor: Any) -> None:
    """PRAGMA journal_mode = WAL, retried: on a fresh file two processes that both hold a
    shared lock and both want the exclusive one deadlock, and SQLite then answers one of
    them "database is locked" at once, without its busy handler (seen with two workers
    starting together under load)."""
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # Connections in the pool die when PostgreSQL restarts or a proxy drops them.
        return create_engine(parsed, pool_pre_ping=True)
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ValueError("the store needs a SQLite file (sqlite:///path/to/db), not memory")
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Turn off pysqlite's own transaction handling (it skips BEGIN before DDL and always
        # uses a deferred BEGIN); the "begin" hook below emits the BEGIN we want.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
            # WAL lets the API read while the worker writes, across processes.
            _set_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock at BEGIN. A deferred transaction that reads and then
        # writes gets SQLITE_BUSY at once (no busy wait) if another process wrote in between.
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def make_read_engine(url: str, engine: Engine) -> Engine:
    """The engine for plain reads (status polls, key checks). On PostgreSQL: autocommit,
    so a read is its statements and nothing else (no BEGIN/COMMIT round trips), and no
    pre-ping (a SELECT 1 per checkout): a connection that died with a server restart is
    retried once by `JobStore._read`, which is safe since reads change nothing. SQLite reads
    are in-process and keep the one engine (its BEGIN hook does not fit autocommit)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return engine
    return create_engine(parsed, isolation_level="AUTOCOMMIT", pool_reset_on_return=None)


# What `_job_from_row` reads, and the status read's statements, built once: building the
# expression objects was a third of a status read's CPU.
_JOB_COLUMNS = (
    JobRow.id,
    JobRow.status,
    JobRow.stage,
    JobRow.progress,
    JobRow.created_at,
    JobRow.started_at,
    JobRow.finished_at,
    JobRow.cancel_requested,
    JobRow.spec,
    JobRow.result,
    JobRow.error,
    JobRow.deliveries,
)
_JOB = select(*_JOB_COLUMNS).where(JobRow.id == bindparam("job_id"))
_TENANT_JOB = _JOB.where(JobRow.tenant == bindparam("tenant"))
_KEY_AND_JOB = KEY_ROW.add_columns(*_JOB_COLUMNS).outerjoin(
    JobRow, (JobRow.id == bindparam("job_id")) & (JobRow.tenant == ApiKeyRow.tenant)
)
_RECENT_EVENTS = (
    select(JobEventRow.at, JobEventRow.kind, JobEventRow.message, JobEventRow.data)
    .where(JobEventRow.job_id == bindparam("job_id"))
    .order_by(JobEventRow.id.desc())
    .limit(EVENTS_PER_JOB)
)


def _job_from_row(row: Any, events: Sequence[JobEvent] = ()) -> Job:
    return Job(
        id=row.id,
        status=row.status,  # type: ignore[arg-type]
        stage=row.stage,
        progress=Progress.model_validate(row.progress or {}),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        cancel_requested=bool(row.cancel_requested),
        spec=row.spec,
        result=JobResult.model_validate(row.result) if row.result is not None else None,
        error=JobError.model_validate(row.error) if row.error is not None else None,
        events=list(events),
        deliveries=row.deliveries or [],
    )


class JobStore(
    ApiKeyMixin,
    DatasetMixin,
    TrialMixin,
    EventReadMixin,
    JobMetricsMixin,
    LeaseMixin,
    OutboxMixin,
):
    """Jobs, job events, API keys, datasets and tuning trials in one SQL database (SQLite
    file or PostgreSQL). Dataset blobs live under ``artifacts_root`` (the settings' one
    when not given)."""

    def __init__(self, url: str, artifacts_root: Path | None = None) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self._reader: Engine = make_read_engine(url, self.engine)
        self.dialect = self.engine.dialect.name
        self._artifacts_root = artifacts_root

    @property
    def artifacts_root(self) -> Path:
        if self._artifacts_root is None:
            from crucible.settings import get_settings

            self._artifacts_root = get_settings().artifacts_root
        return self._artifacts_root

    def close(self) -> None:
        self.engine.dispose()
        self._reader.dispose()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        """One transaction; committed on exit, rolled back on error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if write and self.dialect == "sqlite":
                session.connection(execution_options={_IMMEDIATE: True})
            yield session

    def _read(self, query: Callable[[Session], T]) -> T:
        """Run a read-only query on the read engine. A connection found dead (the database
        restarted since it was pooled) invalidates the pool and the query runs once more on
        a fresh connection, so a restart costs a poller nothing."""
        if self._reader is self.engine:
            with self._tx() as session:
                return query(session)
        for attempt in range(2):
            try:
                with Session(self._reader, expire_on_commit=False) as session:
                    return query(session)
            except DBAPIError as exc:
                if attempt or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def migrate(self) -> None:
        """Upgrade to the newest schema; two processes starting at once is fine."""
        for attempt in range(3):
            try:
                self._migrate_once()
                return
            except OperationalError as exc:
                # SQLite can refuse a lock upgrade at once (deadlock avoidance) instead of
                # waiting; the migration is one transaction, so it is safe to run again.
                if self.dialect != "sqlite" or "locked" not in str(exc) or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _migrate_once(self) -> None:
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                # BEGIN IMMEDIATE: the second process waits for the first one's whole
                # migration, then finds the schema at head (SQLite DDL is transactional).
                conn.execution_options(**{_IMMEDIATE: True})
            with conn.begin():
                if self.dialect == "postgresql":
                    # Released at commit; DDL is transactional on PostgreSQL too.
                    conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
                command.upgrade(alembic_config(connection=conn), "head")

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()

    def _events(self, session: Session, job_ids: Sequence[str]) -> dict[str, list[JobEvent]]:
        """The last EVENTS_PER_JOB events of each job, oldest first, in one query."""
        out: dict[str, list[JobEvent]] = {job_id: [] for job_id in job_ids}
        if not job_ids:
            return out
        if len(job_ids) == 1:
            # One job (every status read): the (job_id, id) index read backwards; cheaper to
            # build and to run than the window function below.
            newest = session.connection().execute(_RECENT_EVENTS, {"job_id": job_ids[0]}).all()
            out[job_ids[0]] = [
                JobEvent(at=r.at, kind=r.kind, message=r.message, data=r.data)
                for r in reversed(newest)
            ]
            return out
        rank = (
            func.row_number()
            .over(partition_by=JobEventRow.job_id, order_by=JobEventRow.id.desc())
            .label("rank")
        )
        recent = (
            select(
                JobEventRow.id,
                JobEventRow.job_id,
                JobEventRow.at,
                JobEventRow.kind,
                JobEventRow.message,
                JobEventRow.data,
                rank,
            )
            .where(JobEventRow.job_id.in_(job_ids))
            .subquery()
        )
        rows = session.execute(
            select(recent)
            .where(recent.c.rank <= EVENTS_PER_JOB)
            .order_by(recent.c.job_id, recent.c.id)
        )
        for row in rows:
            out[row.job_id].append(
                JobEvent(at=row.at, kind=row.kind, message=row.message, data=row.data)
            )
        return out

    def _get(self, session: Session, job_id: str, tenant: str | None = None) -> Job | None:
        if tenant is None:
            row = session.connection().execute(_JOB, {"job_id": job_id}).one_or_none()
        else:
            params = {"job_id": job_id, "tenant": tenant}
            row = session.connection().execute(_TENANT_JOB, params).one_or_none()
        if row is None:
            return None
        return _job_from_row(row, self._events(session, [row.id])[row.id])

    def _idempotent_match(
        self, session: Session, tenant: str, key: str, spec_digest: str
    ) -> Job | None:
        row = session.execute(
            select(JobRow).where(JobRow.tenant == tenant, JobRow.idempotency_key == key)
        ).scalar_one_or_none()
        if row is None:
            return None
        if row.spec_digest != spec_digest:
            raise IdempotencyConflict(row.id)
        return _job_from_row(row, self._events(session, [row.id])[row.id])

    # -- jobs -------------------------------------------------------------------------------

    def create_job(
        self,
        tenant: str,
        spec: dict[str, Any],
        spec_digest: str,
        idempotency_key: str | None,
        secrets: str | None = None,
        max_active: int | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job, or the one this tenant already made with the same key and body.

        `secrets`: the request's encrypted secrets, stored in the same INSERT (an API that
        dies right after it never leaves a job without its Hub token or webhook secret).

        `max_active`: TooManyJobs when the tenant already has that many queued or running
        jobs. Count and insert are serialised per tenant (a PostgreSQL advisory lock; SQLite
        write transactions are serial), so racing submits never exceed the limit and never
        refuse each other below it."""
        try:
            with self._tx(write=True) as session:
                if idempotency_key is not None:
                    existing = self._idempotent_match(session, tenant, idempotency_key, spec_digest)
                    if existing is not None:
                        return existing, False
                if max_active is not None:
                    if session.get_bind().dialect.name == "postgresql":
                        session.execute(
                            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                            {"key": f"crucible-job-slots:{tenant}"},
                        )
                    active = _active_jobs(session, tenant)
                    if active >= max_active:
                        raise TooManyJobs(active)
                row = JobRow(
                    id=new_job_id(),
                    tenant=tenant,
                    status="queued",
                    stage=None,
                    progress=Progress().model_dump(),
                    spec=spec,
                    spec_digest=spec_digest,
                    idempotency_key=idempotency_key,
                    worker=None,
                    attempts=0,
                    cancel_requested=False,
                    result=None,
                    error=None,
                    created_at=now_utc(),
                    secrets=secrets,
                    # In the job's INSERT: the webhook outbox then knows it is owed.
                    webhook_state=initial_webhook_state(spec),
                )
                session.add(row)
                session.flush()
                job = _job_from_row(row)
        except IntegrityError:
            # PostgreSQL: a concurrent request with the same key committed between our
            # read and our insert; the unique constraint stopped us, so return theirs.
            if idempotency_key is None:
                raise
            with self._tx() as session:
                existing = self._idempotent_match(session, tenant, idempotency_key, spec_digest)
            if existing is None:
                raise
            return existing, False
        return job, True

    def active_jobs(self, tenant: str) -> int:
        """The tenant's queued and running jobs."""
        with self._tx() as session:
            return _active_jobs(session, tenant)

    def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job; with a tenant, another tenant's job is None (as if it did not exist)."""
        return self._read(lambda session: self._get(session, job_id, tenant))

    def job_for_key(self, api_key: str, job_id: str) -> tuple[str | None, Job | None]:
        """(tenant, job) for a status read in two statements: the key's row joined with the
        job of the key's tenant, then the job's events. The tenant is None for an invalid or
        revoked key (and the job then None too); the job is None when it is not the
        tenant's. Same checks as `verify_api_key`."""
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None, None
        key_id, secret = parsed

        def query(session: Session) -> tuple[str | None, Job | None]:
            params = {"key_id": key_id, "job_id": job_id}
            row = session.connection().execute(_KEY_AND_JOB, params).one_or_none()
            tenant = tenant_if_valid(row, secret)
            if tenant is None or row is None or row.id is None:
                return tenant, None
            return tenant, _job_from_row(row, self._events(session, [row.id])[row.id])

        return self._read(query)

    def tenant_of(self, job_id: str) -> str:
        """The job's tenant (the worker looks datasets up as that tenant); KeyError if none."""
        with self._tx() as session:
            tenant = session.execute(
                select(JobRow.tenant).where(JobRow.id == job_id)
            ).scalar_one_or_none()
        if tenant is None:
            raise KeyError(job_id)
        return str(tenant)

    def list_jobs(
        self, tenant: str, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """A page of the tenant's jobs, newest first, and the cursor of the next page."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        query = select(JobRow).where(JobRow.tenant == tenant)
        if status is not None:
            query = query.where(JobRow.status == status)
        if cursor is not None:
            query = query.where(JobRow.id < decode_cursor(cursor))
        # One extra row tells us whether there is a next page.
        query = query.order_by(JobRow.id.desc()).limit(limit + 1)
        with self._tx() as session:
            rows = list(session.execute(query).scalars())
            page = rows[:limit]
            events = self._events(session, [row.id for row in page])
            jobs = [_job_from_row(row, events[row.id]) for row in page]
        next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
        return jobs, next_cursor

    def request_cancel(self, job_id: str, tenant: str) -> Job | None:
        """Cancel: a queued job is cancelled at once, a running one is flagged for the worker.

        Both are conditional UPDATEs, so a concurrent claim either sees 'cancelled' (and does
        not start) or wins, in which case the job is running and gets the flag.
        """
        with self._tx(write=True) as session:
            now = now_utc()
            cancelled = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.tenant == tenant, JobRow.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=now)
                .execution_options(synchronize_session=False)
            )
            if cancelled.rowcount == 0:  # type: ignore[attr-defined]
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.tenant == tenant, JobRow.status == "running")
                    .values(cancel_requested=True)
                    .execution_options(synchronize_session=False)
                )
            return self._get(session, job_id, tenant)

    def claim(self, job_id: str, worker: str, lease_seconds: float = 60.0) -> Job | None:
        """queued -> running for exactly one caller, who holds it by a lease of
        `lease_seconds` (renewed by `heartbeat`); None if the job is not queued."""
        now = now_utc()
        with self._tx(write=True) as session:
            claimed = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(
                    status="running",
                    # A requeued job keeps the time its first attempt started.
                    started_at=func.coalesce(JobRow.started_at, now),
                    worker=worker,
                    attempts=JobRow.attempts + 1,
                    heartbeat_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                )
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return self._get(session, job_id)

    def set_progress(
        self, job_id: str, stage: str | None, done: int, total: int, unit: str
    ) -> None:
        """Progress {done,total,unit}; stage None leaves the current stage as it is."""
        values: dict[str, Any] = {
            "progress": Progress(done=done, total=total, unit=unit).model_dump()
        }
        if stage is not None:
            values["stage"] = stage
        with self._tx(write=True) as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    def add_event(
        self, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self._tx(write=True) as session:
            session.add(
                JobEventRow(job_id=job_id, at=now_utc(), kind=kind, message=message, data=data)
            )

    # -- secrets and webhook deliveries (crucible/secrets.py, crucible/webhooks.py) --------

    def set_job_secrets(self, job_id: str, ciphertext: str | None) -> None:
        """Store the job's encrypted secrets (Fernet ciphertext; never plaintext)."""
        with self._tx(write=True) as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(secrets=ciphertext)
                .execution_options(synchronize_session=False)
            )

    def get_job_secrets(self, job_id: str) -> str | None:
        """The job's secrets ciphertext, for the worker to decrypt; None when it has none."""
        with self._tx() as session:
            value = session.execute(
                select(JobRow.secrets).where(JobRow.id == job_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def add_delivery(self, job_id: str, record: dict[str, Any]) -> None:
        """Append one webhook delivery attempt to jobs.deliveries (read-modify-write under
        the write lock: SQLite's BEGIN IMMEDIATE, PostgreSQL's row lock)."""
        with self._tx(write=True) as session:
            query = select(JobRow.deliveries).where(JobRow.id == job_id)
            if self.dialect == "postgresql":
                query = query.with_for_update()
            current = session.execute(query).scalar_one_or_none()
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(deliveries=[*(current or []), record])
                .execution_options(synchronize_session=False)
            )

    def is_cancel_requested(self, job_id: str) -> bool:
        with self._tx() as session:
            flag = session.execute(
                select(JobRow.cancel_requested).where(JobRow.id == job_id)
            ).scalar_one_or_none()
        return bool(flag)

    def finish(
        self,
        job_id: str,
        status: str,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> bool:
        """Terminal state. A job that is already terminal keeps its first outcome; with
        `owner`, only while that worker still holds the job. True when this call stored it."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish() needs one of {sorted(TERMINAL_STATUSES)}, not {status!r}")
        # Validate on the way in, so a bad payload fails the writer, not every later read.
        result_doc = None
        if result is not None:
            result_doc = JobResult.model_validate(result).model_dump(mode="json")
        error_doc = None
        if error is not None:
            error_doc = JobError.model_validate(error).model_dump(mode="json")
        conditions = [JobRow.status.in_(("queued", "running"))]
        if owner is not None:
            conditions.append(JobRow.worker == owner)
        with self._tx(write=True) as session:
            return update_one(
                session,
                job_id,
                *conditions,
                status=status,
                result=result_doc,
                error=error_doc,
                finished_at=now_utc(),
            )
