"""The reaper: running jobs whose lease ran out have lost their worker.

Each pass finds `running` jobs with an expired lease and, per job, either requeues it
(status back to `queued`, the Celery task sent again) while it has attempts left, or fails
it with `worker_lost`; it sends the task again for jobs left `queued` longer than
`queued_resend_seconds` (an API that died between storing a job and sending its task);
and it sends the webhook delivery task again for finished jobs whose webhook is still
owed `webhook_outbox_seconds` after they ended or after their delivery run stopped
renewing its claim (a worker that died between storing the outcome and sending it; the
broker down when the API sent it), crucible/store/outbox.py.
Every change is a conditional UPDATE, so any number of reapers (one thread in every worker
process, plus `crucible reap`) can run at once: each job is requeued, resent or failed by
exactly one of them. Torch-free.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from crucible.runner import on_terminal
from crucible.settings import Settings
from crucible.store import JobStore

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # Requeued, but the task could not be sent: left running (expired) for the next pass.
    unsent: list[str] = field(default_factory=list)
    # Queued for `queued_resend_seconds` without being claimed: the task was sent again.
    resent: list[str] = field(default_factory=list)
    # Finished jobs whose webhook was still owed: the delivery task was sent again.
    webhooks: list[str] = field(default_factory=list)
    # ... marked, but the task could not be sent: tried again after webhook_outbox_seconds.
    webhooks_unsent: list[str] = field(default_factory=list)


def reap_once(
    store: JobStore,
    settings: Settings,
    enqueue: Enqueue,
    enqueue_webhook: Enqueue | None = None,
) -> ReapResult:
    """One pass over the running jobs whose lease expired, the jobs left queued and (with
    `enqueue_webhook`, which sends the delivery task) the webhooks still owed."""
    result = ReapResult()
    for job_id, attempts in store.expired_jobs():
        if attempts >= settings.max_attempts:
            if store.fail_expired(job_id, settings.max_attempts):
                log.error("reaper: job %s lost its worker %d times; failed", job_id, attempts)
                result.failed.append(job_id)
                on_terminal(store, job_id, settings)
            continue
        if not store.requeue_expired(job_id, settings.max_attempts):
            continue  # another reaper, or the worker's own redelivery, got there first
        try:
            enqueue(job_id)
        except Exception as exc:
            # The broker is down: put the job back so that the next pass sends it again.
            log.warning("reaper: could not requeue job %s (%s); will retry", job_id, exc)
            store.unrequeue(job_id)
            result.unsent.append(job_id)
            continue
        store.add_event(
            job_id,
            "requeued",
            f"the worker stopped renewing its lease; requeued (attempt {attempts + 1} of "
            f"{settings.max_attempts} next)",
            {"attempts": attempts},
        )
        log.warning("reaper: job %s lost its worker; requeued", job_id)
        result.requeued.append(job_id)
    _resend_stale(store, settings, enqueue, result)
    if enqueue_webhook is not None:
        _resend_webhooks(store, settings, enqueue_webhook, result)
    return result


def _resend_stale(
    store: JobStore, settings: Settings, enqueue: Enqueue, result: ReapResult
) -> None:
    """A job queued long ago may have no task at all (the API died between storing it and
    sending the task): send it again. If it had one, the extra delivery is a no-op."""
    older_than = settings.queued_resend_seconds
    for job_id in store.stale_queued_jobs(older_than):
        if not store.mark_resent(job_id, older_than):
            continue
        try:
            enqueue(job_id)
        except Exception as exc:  # broker down: marked anyway, tried again after older_than
            log.warning("reaper: could not resend job %s (%s)", job_id, exc)
            continue
        log.info("reaper: job %s queued for over %.0f s; task sent again", job_id, older_than)
        result.resent.append(job_id)


def _resend_webhooks(
    store: JobStore, settings: Settings, enqueue_webhook: Enqueue, result: ReapResult
) -> None:
    """A finished job whose webhook is still owed after the grace period: its run died or
    its task was never sent. The mark (one reaper wins) comes before the send, so that
    reapers racing send it once per period; the delivery run claims it again itself."""
    grace = settings.webhook_outbox_seconds
    for job_id in store.owed_webhooks(grace):
        if not store.mark_webhook_resent(job_id, grace):
            continue
        try:
            enqueue_webhook(job_id)
        except Exception as exc:  # broker down: marked anyway, tried again after grace
            log.warning("reaper: could not send the webhook of job %s (%s)", job_id, exc)
            result.webhooks_unsent.append(job_id)
            continue
        store.add_event(
            job_id,
            "webhook",
            f"webhook still owed {grace:g} s after the job ended or its last delivery "
            "attempt; delivery task sent again",
            None,
        )
        log.warning("reaper: webhook of job %s still owed; delivery task sent again", job_id)
        result.webhooks.append(job_id)


def celery_enqueue(settings: Settings) -> Enqueue:
    """Sends `crucible.run_merge` through the configured broker."""
    from crucible.queue import enqueue_merge, make_celery

    app = make_celery(settings)

    def enqueue(job_id: str) -> None:
        enqueue_merge(app, job_id)

    return enqueue


def celery_enqueue_webhook(settings: Settings) -> Enqueue:
    """Sends `crucible.deliver_webhook` through the configured broker."""
    from crucible.queue import make_celery
    from crucible.webhooks import enqueue_delivery

    app = make_celery(settings)

    def enqueue(job_id: str) -> None:
        enqueue_delivery(app, job_id)

    return enqueue


class Reaper:
    """A daemon thread running `reap_once` every `reaper_interval_seconds`.

    It uses its own JobStore and drops its connections after each pass, so a prefork pool
    that forks a new child later never hands it a live database connection.
    """

    def __init__(
        self,
        settings: Settings,
        enqueue: Enqueue | None = None,
        enqueue_webhook: Enqueue | None = None,
    ) -> None:
        self._settings = settings
        self._enqueue = enqueue
        self._enqueue_webhook = enqueue_webhook
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crucible-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        settings = self._settings
        store = JobStore(settings.resolved_database_url, settings.artifacts_root)
        enqueue = self._enqueue or celery_enqueue(settings)
        enqueue_webhook = self._enqueue_webhook or celery_enqueue_webhook(settings)
        while not self._stop.wait(settings.reaper_interval_seconds):
            try:
                reap_once(store, settings, enqueue, enqueue_webhook)
            except Exception as exc:  # the database is restarting: try at the next pass
                log.warning(
                    "reaper pass failed (%s); retrying in %.0f s",
                    exc,
                    settings.reaper_interval_seconds,
                )
            finally:
                store.engine.dispose()
