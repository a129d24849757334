"""Celery tasks. Thin: each one hands a job id to crucible.runner or crucible.webhooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from celery import Task
from celery.signals import setup_logging, task_prerun

import crucible.pipeline  # noqa: F401  (torch and the engine, loaded before the pool forks)
from crucible.logs import bind_job, configure_logging
from crucible.parts import (
    ASSEMBLE_PARTS_TASK,
    MERGE_PART_TASK,
    chord_sender,
    part_retryable,
    run_assembly,
    run_part,
    split_hook,
)
from crucible.queue import RUN_MERGE_TASK
from crucible.runner import execute_job, is_db_transient, store_call
from crucible.secrets import check_secrets_key
from crucible.settings import Settings, get_settings
from crucible.split import chord_backend
from crucible.stats.fanout import (
    AFTER_STATS_TASK,
    EXPERT_STATS_TASK,
    either,
    run_after,
    run_expert,
    stats_hook,
)
from crucible.stats.fanout import chord_sender as stats_sender
from crucible.store import JobStore
from crucible.tune.trials import (
    TUNE_TRIAL_TASK,
    fanout_for,
    free_loaded,
    run_trial_task,
    trial_sender,
)
from crucible.webhooks import DELIVER_WEBHOOK_TASK, deliver
from worker.app import celery

# A worker that could not decrypt request secrets must not start: SecretsKeyError says why.
# (At import, which the worker does at startup and re-raises; a worker_init signal's
# exception would only be logged.)
check_secrets_key(get_settings())
# Scale-out chords count finished parts in a result backend: the Redis broker's own.
if (_backend := chord_backend(get_settings())) is not None:
    celery.conf.result_backend = _backend


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our log lines (JSON by default, CRUCIBLE_LOG_FORMAT) instead of Celery's format;
    connecting this receiver is what stops Celery from configuring logging itself."""
    configure_logging("json", loglevel)


@task_prerun.connect
def _free_trial_state(sender: Task | None = None, **_: Any) -> None:
    """A trial task's cached evaluator and modules go before any other task runs here."""
    free_loaded(sender.name if sender is not None else None)


# How long a task whose database is unreachable waits before it is delivered again.
DB_DOWN_RETRY_SECONDS = 30


@cache
def _context() -> tuple[JobStore, Settings]:
    settings = get_settings()
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store_call(settings, "migrate the job store", store.migrate)
    return store, settings


@celery.task(bind=True, name=RUN_MERGE_TASK, acks_late=True, reject_on_worker_lost=True)
def run_merge(self: Task, job_id: str) -> str | None:
    try:
        store, settings = _context()
        split = either(
            stats_hook(store, settings, stats_sender(expert_statistics, after_statistics)),
            split_hook(store, settings, chord_sender(merge_part, assemble_parts)),
        )
        trials = fanout_for(settings, trial_sender(tune_trial))
        with bind_job(job_id):  # every log line of the job carries its id
            return execute_job(job_id, store, settings, split=split, trials=trials)
    except Exception as exc:
        # The database stayed down longer than the store retries: send the task again
        # later rather than acknowledge it unrun (a queued job would wait forever; a
        # claimed one is the reaper's once its lease runs out).
        if is_db_transient(exc):
            raise self.retry(exc=exc, countdown=DB_DOWN_RETRY_SECONDS, max_retries=None) from exc
        raise


# Seconds before a failed part runs again (Celery retry of that part alone).
PART_RETRY_SECONDS = 2


@celery.task(
    bind=True,
    name=MERGE_PART_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=False,  # the chord counts its parts' results
)
def merge_part(
    self: Task, job_id: str, owner: str, key: str, part: dict[str, int], total: int
) -> str | None:
    """One scale-out part of a job's merge stage (crucible.parts)."""
    store, settings = _context()
    may_retry = self.request.retries < settings.retry_attempts
    with bind_job(job_id), _retried_alone(self, may_retry, settings):
        return run_part(job_id, owner, key, part, total, store, settings, may_retry)


@contextmanager
def _retried_alone(task: Task, may_retry: bool, settings: Settings) -> Iterator[None]:
    """A scale-out task's retryable failure becomes a Celery retry of that task alone."""
    try:
        yield
    except Exception as exc:
        if may_retry and part_retryable(exc):
            raise task.retry(
                exc=exc, countdown=PART_RETRY_SECONDS, max_retries=settings.retry_attempts
            ) from exc
        raise


@celery.task(name=ASSEMBLE_PARTS_TASK, acks_late=True)
def assemble_parts(job_id: str, owner: str, key: str, count: int) -> str | None:
    """The chord callback: assemble the parts' shards and publish (crucible.parts)."""
    store, settings = _context()
    with bind_job(job_id):
        return run_assembly(job_id, owner, key, count, store, settings)


@celery.task(
    bind=True,
    name=EXPERT_STATS_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=False,  # the chord counts its tasks' results
)
def expert_statistics(
    self: Task, job_id: str, owner: str, expert: dict[str, Any], keys: list[str]
) -> str | None:
    """One expert's statistics for a job whose statistics stage fanned out
    (crucible.stats.fanout)."""
    store, settings = _context()
    may_retry = self.request.retries < settings.retry_attempts
    with bind_job(job_id), _retried_alone(self, may_retry, settings):
        return run_expert(job_id, owner, expert, keys, store, settings, may_retry)


@celery.task(name=AFTER_STATS_TASK, acks_late=True)
def after_statistics(job_id: str, owner: str) -> str | None:
    """The chord callback: the rest of the job once every expert's Grams are cached."""
    store, settings = _context()
    with bind_job(job_id):
        return run_after(
            job_id, owner, store, settings, fanout_for(settings, trial_sender(tune_trial))
        )


@celery.task(name=TUNE_TRIAL_TASK, acks_late=True, reject_on_worker_lost=True)
def tune_trial(job_id: str, owner: str, index: int) -> str | None:
    """One trial of a job's tuning batch (crucible.tune.trials); a no-op when the job's
    worker, or another, ran it already."""
    store, settings = _context()
    with bind_job(job_id):
        return run_trial_task(job_id, owner, index, store, settings)


@celery.task(name=DELIVER_WEBHOOK_TASK, acks_late=True)
def deliver_webhook(job_id: str) -> bool | None:
    """The webhook of a job the API finished itself (cancelled while queued)."""
    store, settings = _context()
    return deliver(store, job_id, settings)
