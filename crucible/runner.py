"""Runs one stored job: take ownership, run the pipeline, publish once, record the outcome.

The Celery task is a thin shell around `execute_job`. Ownership is a lease in the job row
(crucible.store.leases): a delivery claims a queued job, or takes over a running one whose
lease ran out (its worker died), up to `max_attempts`; a delivery for a job running under a
live lease (a duplicate from the broker) returns at once. While the job runs, a heartbeat
thread renews the lease. Every outcome, expected or not, ends in a terminal status with an
error code, and `on_terminal` is called after each terminal status is stored.

Torch-free at import (the reaper and `crucible reap` import `on_terminal`); the pipeline
is imported when a job runs.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from crucible.errors import CrucibleError, JobCancelled
from crucible.lease import Heartbeat, LeaseLost, worker_identity
from crucible.publish.files import remove_staging
from crucible.publish.sinks import publish_output
from crucible.retry import retrying
from crucible.secrets import load_job_secrets
from crucible.settings import Settings
from crucible.spec import Job, MergeSpec
from crucible.store import JobStore
from crucible.tenant_limits import admit_input_bytes
from crucible.tune.scratch import may_have_tune_files, remove_tune_files
from crucible.webhooks import deliver

if TYPE_CHECKING:
    from crucible.engine import MergeInputs
    from crucible.pipeline import MergeOutcome
    from crucible.tune.trials import TrialFanout

log = logging.getLogger(__name__)

T = TypeVar("T")
# Scale-out (crucible.parts, crucible.stats.fanout): (job id, owner, spec, inputs) -> True
# when the rest of the job was sent out as tasks whose chord callback carries on. Asked at
# the statistics stage (Grams missing: one task per expert) and at the merge stage (parts).
SplitHook = Callable[[str, str, MergeSpec, "MergeInputs"], bool]
# The work of a part task or of the chord callback, run under the parent's owner name:
# (job, spec, reporter, hub token) -> the outcome to publish, or None (a part).
OwnedWork = Callable[[Job, MergeSpec, "StoreReporter", "str | None"], "MergeOutcome | None"]
# (job id, owner) -> the tune stage's trial fan-out for this attempt (crucible.tune.trials).
TrialHook = Callable[[str, str], "TrialFanout"]

# Errors that mean "the disk (or the file-size limit) is full", wherever they surface.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_db_transient(exc: BaseException) -> bool:
    """A lost or refused database connection (a restart, a failover, SQLite busy)."""
    if isinstance(exc, DisconnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def store_call(settings: Settings, what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """fn(*args) against the job store, retried through a database outage (the one retry
    policy, crucible.retry, with `store_retry_attempts` tries)."""
    policy = settings.model_copy(update={"retry_attempts": settings.store_retry_attempts})
    return retrying(policy, what, retry_on=is_db_transient)(fn, *args, **kw)


class StoreReporter:
    """Writes stage, progress and events to the job row, throttled; polls the cancel flag,
    the lease and the wall-time limit; logs one line per stage with its duration."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        settings: Settings,
        lease: Heartbeat | None = None,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._settings = settings
        self._lease = lease
        self._stage: str | None = None
        self._timed: str | None = None  # the stage whose duration is not logged yet
        self._stage_started = 0.0
        self._started = time.monotonic()
        self._last_progress = 0.0
        self._last_cancel_check = 0.0

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        return store_call(self._settings, f"job {self._job_id}: {what}", fn, *args)

    def stage(self, name: str) -> None:
        self.end_stage()
        self._stage = self._timed = name
        self._stage_started = time.monotonic()
        self._call("set stage", self._store.set_progress, self._job_id, name, 0, 0, "")
        self._call(
            "add event",
            self._store.add_event,
            self._job_id,
            "stage",
            f"stage {name} started",
            {"stage": name},
        )
        self._last_progress = time.monotonic()

    def end_stage(self) -> None:
        """Log the stage that is ending, once, with how long it took."""
        if self._timed is not None:
            seconds = time.monotonic() - self._stage_started
            log.info("job %s: stage %s took %.2f s", self._job_id, self._timed, seconds)
            self._timed = None

    def progress(self, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if done >= total or now - self._last_progress >= self._settings.progress_interval_seconds:
            self._call(
                "set progress",
                self._store.set_progress,
                self._job_id,
                self._stage,
                done,
                total,
                unit,
            )
            self._last_progress = now

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._call("add event", self._store.add_event, self._job_id, kind, message, data)

    def trial(self, index: int, data: dict[str, Any]) -> None:
        self._call("add trial", self._store.add_trial, self._job_id, index, data)

    def check_cancelled(self) -> None:
        """Raise when the job must stop: lease lost, wall time spent, or cancel requested.
        Called between tensors, trials and batches; the database is read at most every
        `cancel_poll_seconds`."""
        if self._lease is not None:
            self._lease.check()
        limit = self._settings.job_wall_time_seconds
        if time.monotonic() - self._started > limit:
            raise CrucibleError(
                "limit_exceeded",
                f"the job ran longer than its wall-time limit of {limit:g} s "
                "(job_wall_time_seconds)",
                {"limit": "job_wall_time_seconds", "value": limit},
            )
        now = time.monotonic()
        if now - self._last_cancel_check < self._settings.cancel_poll_seconds:
            return
        self._last_cancel_check = now
        if self._call("read cancel flag", self._store.is_cancel_requested, self._job_id):
            raise JobCancelled("the job was cancelled while running")


def on_terminal(store: JobStore, job_id: str, settings: Settings) -> None:
    """Called once a job's terminal status is stored (by the runner or the reaper). Never
    raises: the outcome is already recorded."""
    try:
        job = store.get_job(job_id)
        status = job.status if job is not None else "missing"
        log.info("job %s ended %s", job_id, status)
        # Whatever attempt wrote them: a job requeued mid-tuning and then failed or
        # cancelled before its next attempt tuned would keep them (a model's size) forever.
        if job is not None and may_have_tune_files(settings, job.spec):
            remove_tune_files(settings, job_id)
        if job is not None:
            # Inline: the job is already recorded; retries wait here, not in the API.
            deliver(store, job_id, settings)
    except Exception:
        log.exception("job %s: on_terminal failed", job_id)


def remove_output(output_dir: Path) -> None:
    """A failed or cancelled job leaves nothing: the output and every staging folder."""
    shutil.rmtree(output_dir, ignore_errors=True)
    remove_staging(output_dir)


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT/EFBIG error behind `exc` (itself or a cause), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def _acquire(store: JobStore, job_id: str, owner: str, settings: Settings) -> Job | None:
    """This delivery's job, now owned by `owner`, or None when it must not run it."""
    job = store_call(
        settings, f"claim job {job_id}", store.claim, job_id, owner, settings.lease_seconds
    )
    if job is not None:
        return job
    job = store_call(
        settings,
        f"take over job {job_id}",
        store.take_over,
        job_id,
        owner,
        settings.lease_seconds,
        settings.max_attempts,
    )
    if job is not None:
        log.warning("job %s: lease had expired; this worker takes it over", job_id)
        store_call(
            settings,
            "add event",
            store.add_event,
            job_id,
            "takeover",
            "the previous worker stopped renewing its lease; the job restarts on another",
            None,
        )
        return job
    if store_call(
        settings, f"fail job {job_id}", store.fail_expired, job_id, settings.max_attempts
    ):
        log.error("job %s: worker lost %d times; failed", job_id, settings.max_attempts)
        on_terminal(store, job_id, settings)
        return None
    log.info("job %s is not runnable here (live lease, cancelled or finished); skipping", job_id)
    return None


def _finish(
    store: JobStore,
    job_id: str,
    owner: str,
    settings: Settings,
    status: str,
    **outcome: Any,
) -> str | None:
    stored = store_call(
        settings, f"finish job {job_id}", store.finish, job_id, status, owner=owner, **outcome
    )
    if not stored:
        log.warning("job %s: not ours any more; outcome %s not recorded", job_id, status)
        return None
    on_terminal(store, job_id, settings)
    return status


def execute_job(
    job_id: str,
    store: JobStore,
    settings: Settings,
    split: SplitHook | None = None,
    trials: TrialHook | None = None,
) -> str | None:
    """Run a delivered job to a terminal state; returns that status, or None when this
    delivery did not run it (a duplicate, or the job is not runnable, or lost midway) or
    handed its merge stage to scale-out parts (`split`; the job stays running under this
    owner name, and the parts and their chord callback renew its lease and finish it)."""
    owner = worker_identity()
    job = _acquire(store, job_id, owner, settings)
    if job is None:
        return None
    held = store_call(settings, "read ownership", store.ownership, job_id)
    if held is not None and held.published_at is not None:
        # An earlier attempt published and stopped before finishing: never publish again.
        log.info("job %s was published by an earlier attempt; recording that result", job_id)
        return _finish(store, job_id, owner, settings, "succeeded", result=held.result)
    output_dir = settings.job_output_dir(job_id)
    with Heartbeat(
        store, job_id, owner, settings.lease_seconds, settings.heartbeat_seconds
    ) as lease:
        reporter = StoreReporter(store, job_id, settings, lease)
        try:
            return _run(
                job, store, owner, settings, reporter, lease, output_dir, split=split,
                trials=trials,
            )  # fmt: skip
        finally:
            reporter.end_stage()


def execute_owned(
    job_id: str,
    owner: str,
    store: JobStore,
    settings: Settings,
    work: OwnedWork,
    retry_on: Callable[[BaseException], bool] | None = None,
) -> str | None:
    """Run `work` for a job whose split parent left it running under `owner`: a scale-out
    part (returns None) or the chord callback (returns the outcome, published here once,
    as `execute_job` does). It renews the same lease; a job no longer running under
    `owner` (finished, cancelled, or requeued after the lease ran out) is left alone.
    `retry_on`: errors raised to the caller (a Celery retry of this part) instead of
    failing the job."""
    held = store_call(settings, "read ownership", store.ownership, job_id)
    if held is None or held.status != "running" or held.worker != owner:
        log.info("job %s is not running under %s any more; skipping", job_id, owner)
        return None
    if held.published_at is not None:
        return _finish(store, job_id, owner, settings, "succeeded", result=held.result)
    job = store_call(settings, "read job", store.get_job, job_id)
    if job is None:
        return None
    with Heartbeat(
        store, job_id, owner, settings.lease_seconds, settings.heartbeat_seconds
    ) as lease:
        reporter = StoreReporter(store, job_id, settings, lease)
        try:
            return _run(
                job, store, owner, settings, reporter, lease, settings.job_output_dir(job_id),
                work=work, retry_on=retry_on,
            )  # fmt: skip
        finally:
            reporter.end_stage()


def _run(
    job: Job,
    store: JobStore,
    owner: str,
    settings: Settings,
    reporter: StoreReporter,
    lease: Heartbeat,
    output_dir: Path,
    split: SplitHook | None = None,
    trials: TrialHook | None = None,
    work: OwnedWork | None = None,
    retry_on: Callable[[BaseException], bool] | None = None,
) -> str | None:
    from crucible.pipeline import run_merge_job

    job_id = job.id
    try:
        spec = MergeSpec.model_validate(job.spec)
        tenant = store_call(settings, "read tenant", store.tenant_of, job_id)
        # fetch_dataset: a blob uploaded through an API on another machine comes from the
        # remote artifact store (CRUCIBLE_ARTIFACTS_URI) into this worker's folder.
        datasets = {d: store.fetch_dataset(tenant, d) for d in spec.dataset_ids()}
        # The request's secrets, decrypted here only (the stored spec holds "***").
        secrets = load_job_secrets(store, job_id, settings)
        if work is not None:
            outcome = work(job, spec, reporter, secrets.hub_token)
        else:
            outcome = run_merge_job(
                spec,
                output_dir,
                settings,
                reporter,
                datasets,
                hub_token=secrets.hub_token,
                admit_inputs=lambda n: admit_input_bytes(store, job_id, n, settings),
                split=(lambda s, inputs: split(job_id, owner, s, inputs)) if split else None,
                trials=trials(job_id, owner) if trials else None,
            )
        if outcome is None:  # merged by parts: their chord callback publishes
            return None
        lease.check()
        uri = publish_output(
            outcome.output_dir,
            spec,
            job_id,
            settings,
            reporter,
            hub_token=secrets.hub_token,
            files=outcome.files,
        )
        result = {
            "uri": uri,
            "files": outcome.files,
            "metrics": outcome.metrics,
            "inputs": outcome.inputs,
            "report": outcome.report,
        }
        if not store_call(settings, "record publish", store.record_publish, job_id, owner, result):
            raise LeaseLost(job_id)
    except BaseException as exc:
        reporter.end_stage()
        if isinstance(exc, LeaseLost) or lease.lost:
            # Another attempt owns the job now; its files are not ours to remove.
            log.warning("job %s: stopped, the lease was lost (%s)", job_id, exc)
            return None
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt/SystemExit: the lease runs out, a reaper requeues
        if retry_on is not None and retry_on(exc):
            raise  # a scale-out part retried alone by Celery
        remove_output(output_dir)
        return _failed(store, job_id, owner, settings, exc)
    reporter.end_stage()
    return _finish(store, job_id, owner, settings, "succeeded", result=result)


def _failed(
    store: JobStore, job_id: str, owner: str, settings: Settings, exc: Exception
) -> str | None:
    if isinstance(exc, JobCancelled):
        return _finish(store, job_id, owner, settings, "cancelled", error=exc.as_dict())
    full = disk_full(exc)
    if full is not None:
        error = CrucibleError(
            "disk_full",
            f"no space left to write the job's files ({full.strerror}); the partial output "
            "was removed",
            {"errno": full.errno, "file": Path(full.filename).name if full.filename else None},
        )
    elif isinstance(exc, CrucibleError):
        error = exc
    else:
        log.exception("job %s failed unexpectedly", job_id)
        error = CrucibleError("internal", f"{type(exc).__name__}: {exc}")
    store_call(
        settings,
        "add event",
        store.add_event,
        job_id,
        "error",
        error.message,
        {"code": error.code},
    )
    return _finish(store, job_id, owner, settings, "failed", error=error.as_dict())
