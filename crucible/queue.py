"""Celery configuration shared by the API (which only sends tasks, by name) and the worker.

Torch-free. Redis in production; kombu's filesystem transport as the embedded default.
"""

from __future__ import annotations

from celery import Celery

from crucible.settings import Settings

RUN_MERGE_TASK = "crucible.run_merge"
GPU_QUEUE = "gpu"


def make_celery(settings: Settings) -> Celery:
    app = Celery("crucible", broker=settings.resolved_broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Job state lives in the job store, not in a result backend.
        task_ignore_result=True,
        task_default_queue=GPU_QUEUE,
        task_routes={RUN_MERGE_TASK: {"queue": GPU_QUEUE}},
        # A job is acknowledged when it ends, so a worker that dies mid-job leaves it to
        # be redelivered; prefetch 1 keeps one long job from holding others hostage.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A running job needs no broker: when the broker connection drops (Redis restart),
        # let it finish. Its message may come again; that delivery sees the job's live
        # lease (crucible.runner) and returns at once.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
            # The filesystem transport polls; 0.1 s keeps pickup latency low.
            "polling_interval": 0.1,
        }
    else:
        # Redis redelivers an unacknowledged task after the visibility timeout. A timeout
        # longer than the longest job keeps duplicates rare; the lease check makes the
        # duplicates that still come (a timeout too short, a restored message) harmless.
        # A dead worker's job does not wait for this timeout: the reaper requeues it once
        # its lease (seconds, not hours) runs out.
        app.conf.broker_transport_options = {
            "visibility_timeout": settings.visibility_timeout_seconds
        }
    return app


def enqueue_merge(app: Celery, job_id: str) -> None:
    app.send_task(RUN_MERGE_TASK, args=[job_id], queue=GPU_QUEUE)


def check_broker(app: Celery, timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached within `timeout` seconds."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
