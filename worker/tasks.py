"""Celery tasks. Thin: each one hands a job id to crucible.runner."""

from __future__ import annotations

from functools import cache

from crucible.queue import RUN_MERGE_TASK
from crucible.runner import execute_job
from crucible.settings import Settings, get_settings
from crucible.store import JobStore
from worker.app import celery


@cache
def _context() -> tuple[JobStore, Settings]:
    settings = get_settings()
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    return store, settings


@celery.task(name=RUN_MERGE_TASK, acks_late=True, reject_on_worker_lost=True)
def run_merge(job_id: str) -> str | None:
    store, settings = _context()
    return execute_job(job_id, store, settings)
