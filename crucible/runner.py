"""Runs one stored job: claim it, run the pipeline, record the outcome.

The Celery task is a thin shell around `execute_job`; every outcome, expected or not,
ends in a terminal status with an error code, so no job is left `running` by an error.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from typing import Any

from crucible.errors import CrucibleError, JobCancelled
from crucible.pipeline import run_merge_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.store import JobStore

log = logging.getLogger(__name__)


class StoreReporter:
    """Writes stage, progress and events to the job row, throttled; polls the cancel flag."""

    def __init__(self, store: JobStore, job_id: str, settings: Settings) -> None:
        self._store = store
        self._job_id = job_id
        self._settings = settings
        self._stage: str | None = None
        self._last_progress = 0.0
        self._last_cancel_check = 0.0

    def stage(self, name: str) -> None:
        self._stage = name
        self._store.set_progress(self._job_id, name, 0, 0, "")
        self._store.add_event(self._job_id, "stage", f"stage {name} started")
        self._last_progress = time.monotonic()

    def progress(self, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if done >= total or now - self._last_progress >= self._settings.progress_interval_seconds:
            self._store.set_progress(self._job_id, self._stage, done, total, unit)
            self._last_progress = now

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._store.add_event(self._job_id, kind, message, data)

    def trial(self, index: int, data: dict[str, Any]) -> None:
        self._store.add_trial(self._job_id, index, data)

    def check_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_check < self._settings.cancel_poll_seconds:
            return
        self._last_cancel_check = now
        if self._store.is_cancel_requested(self._job_id):
            raise JobCancelled("the job was cancelled while running")


def execute_job(job_id: str, store: JobStore, settings: Settings) -> str | None:
    """Run a queued job to a terminal state; returns that status, or None if not claimed."""
    job = store.claim(job_id, worker=socket.gethostname())
    if job is None:
        log.info("job %s is not queued (cancelled or already taken); skipping", job_id)
        return None
    output_dir = settings.job_output_dir(job_id)
    reporter = StoreReporter(store, job_id, settings)
    try:
        spec = MergeSpec.model_validate(job.spec)
        tenant = store.tenant_of(job_id)
        datasets = {d: store.get_dataset(tenant, d) for d in spec.dataset_ids()}
        outcome = run_merge_job(spec, output_dir, settings, reporter, datasets)
    except JobCancelled as exc:
        shutil.rmtree(output_dir, ignore_errors=True)
        store.finish(job_id, "cancelled", error=exc.as_dict())
        return "cancelled"
    except CrucibleError as exc:
        store.add_event(job_id, "error", exc.message, {"code": exc.code})
        store.finish(job_id, "failed", error=exc.as_dict())
        return "failed"
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}", "detail": None}
        store.finish(job_id, "failed", error=error)
        return "failed"
    result = {
        "uri": f"local://jobs/{job_id}/output",
        "files": outcome.files,
        "metrics": outcome.metrics,
        "inputs": outcome.inputs,
        "report": outcome.report,
    }
    store.finish(job_id, "succeeded", result=result)
    return "succeeded"
