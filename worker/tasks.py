"""Celery tasks. Thin: each one hands a job id to crucible.runner or crucible.webhooks."""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Task
from celery.signals import setup_logging

import crucible.pipeline  # noqa: F401  (torch and the engine, loaded before the pool forks)
from crucible.logs import bind_job, configure_logging
from crucible.queue import RUN_MERGE_TASK
from crucible.runner import execute_job, is_db_transient, store_call
from crucible.secrets import check_secrets_key
from crucible.settings import Settings, get_settings
from crucible.store import JobStore
from crucible.webhooks import DELIVER_WEBHOOK_TASK, deliver
from worker.app import celery

# A worker that could not decrypt request secrets must not start: SecretsKeyError says why.
# (At import, which the worker does at startup and re-raises; a worker_init signal's
# exception would only be logged.)
check_secrets_key(get_settings())


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our log lines (JSON by default, CRUCIBLE_LOG_FORMAT) instead of Celery's format;
    connecting this receiver is what stops Celery from configuring logging itself."""
    configure_logging("json", loglevel)


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
        with bind_job(job_id):  # every log line of the job carries its id
            return execute_job(job_id, store, settings)
    except Exception as exc:
        # The database stayed down longer than the store retries: send the task again
        # later rather than acknowledge it unrun (a queued job would wait forever; a
        # claimed one is the reaper's once its lease runs out).
        if is_db_transient(exc):
            raise self.retry(exc=exc, countdown=DB_DOWN_RETRY_SECONDS, max_retries=None) from exc
        raise


@celery.task(name=DELIVER_WEBHOOK_TASK, acks_late=True)
def deliver_webhook(job_id: str) -> bool | None:
    """The webhook of a job the API finished itself (cancelled while queued)."""
    store, settings = _context()
    return deliver(store, job_id, settings)
