"""The worker's Celery app: `celery -A worker.app:celery worker -Q gpu`."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown

from crucible.queue import make_celery
from crucible.reaper import Reaper
from crucible.settings import get_settings

celery = make_celery(get_settings())
celery.conf.imports = ("worker.tasks",)

_reaper: Reaper | None = None


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """Every worker process runs a reaper thread (in the main process, beside the pool):
    jobs whose worker died are requeued even when no operator runs `crucible reap`."""
    global _reaper
    if _reaper is None:
        _reaper = Reaper(get_settings()).start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
