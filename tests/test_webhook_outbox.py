"""The webhook outbox: a finished job's webhook is sent even when the worker that finished
it died before sending, exactly once per window, and never again once delivered.

In process, against a SQLite file and a throwaway PostgreSQL database, with a real HTTP
receiver thread; then end to end (e2e): a Celery worker SIGKILLed after it stored the
job's outcome and before any receiver saw the webhook, and another worker's reaper
sending it (API, workers, PostgreSQL and Redis of the test's own).
"""

from __future__ import annotations

import json
import select
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text, update

from crucible.reaper import reap_once
from crucible.secrets import JobSecrets, encrypt_secrets
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.store import JobStore, alembic_config
from crucible.store.models import JobRow, now_utc
from crucible.webhooks import deliver
from tests.support.faults import OwnPostgres, service, submit
from tests.support.receiver import Delivery, WebhookReceiver
from tests.support.tiny_models import make_gpt2_family
from tests.test_store import race
from tests.test_webhooks import SECRET, SPEC, _settings, _verify

GRACE = 60.0


def _job(store: JobStore, settings: Settings, url: str | None) -> str:
    hook = {"webhook": {"url": url, "secret": SECRET}} if url else {}
    spec = MergeSpec.model_validate({**SPEC, **hook})
    job, _ = store.create_job("acme", spec.model_dump(mode="json"), spec.digest(), None)
    store.set_job_secrets(job.id, encrypt_secrets(JobSecrets.from_spec(spec), settings))
    return job.id


def _finished_by_a_worker(store: JobStore, settings: Settings, url: str | None) -> str:
    """The job as a worker leaves it when it dies right after storing the outcome: claimed,
    finished under its lease, and nothing of the webhook done (runner.on_terminal next)."""
    job_id = _job(store, settings, url)
    assert store.claim(job_id, "w1", lease_seconds=60) is not None
    assert store.finish(job_id, "succeeded", result={"uri": "local://x"}, owner="w1")
    return job_id


def _age(store: JobStore, job_id: str, seconds: float) -> None:
    """Move the job's end and last delivery claim `seconds` into the past."""
    with store.engine.begin() as conn:
        row = conn.execute(
            text("SELECT finished_at, webhook_claimed_at FROM jobs WHERE id = :id"),
            {"id": job_id},
        ).one()
        back = timedelta(seconds=seconds)
        values: dict[str, Any] = {"finished_at": now_utc() - back}
        if row.webhook_claimed_at is not None:
            values["webhook_claimed_at"] = now_utc() - back
        conn.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


def _reap(store: JobStore, settings: Settings, sent: list[str]) -> list[str]:
    """One reaper pass with a broker that records the delivery tasks sent."""
    return reap_once(store, settings, lambda j: None, sent.append).webhooks


def _assert_one_signed(got: list[Delivery], job_id: str) -> None:
    (one,) = got
    _verify(one.headers, one.body)
    assert one.headers["X-Crucible-Job"] == job_id
    assert one.headers["X-Crucible-Event"] == "job.succeeded"
    body = json.loads(one.body)
    # The dedupe key is made of signed body fields.
    assert one.headers["X-Crucible-Event-Id"] == f"{body['id']}:job.{body['status']}"
    assert body["id"] == job_id and body["status"] == "succeeded" and body["finished_at"]


def test_the_reaper_sends_the_webhook_a_dead_worker_owed_once(
    store: JobStore, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, webhook_outbox_seconds=GRACE)
    with WebhookReceiver([200]) as hook:
        job_id = _finished_by_a_worker(store, settings, hook.url)
        assert store.webhook_state(job_id) == "pending"
        sent: list[str] = []
        assert _reap(store, settings, sent) == []  # within the grace period: not yet
        _age(store, job_id, GRACE + 5)
        results = race(4, lambda i: _reap(store, settings, sent))
        assert sent == [job_id], "one of four racing reapers sends the task"
        assert sorted(j for r in results for j in r) == [job_id]
        assert _reap(store, settings, sent) == []  # marked: not again within the window
        # The delivery task, run twice (a broker redelivery): one POST.
        assert deliver(store, job_id, settings) is True
        assert deliver(store, job_id, settings) is None
        _assert_one_signed(hook.deliveries, job_id)
        _age(store, job_id, 10 * GRACE)
        assert _reap(store, settings, sent) == [] and sent == [job_id]
        assert len(hook.deliveries) == 1
    job = store.get_job(job_id)
    assert job is not None and [(d.attempt, d.status_code) for d in job.deliveries] == [(1, 200)]
    assert store.webhook_state(job_id) == "delivered"
    assert [e.kind for e in job.events].count("webhook") == 2  # the resend, the attempt


def test_a_delivered_webhook_is_never_sent_again(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_outbox_seconds=GRACE)
    with WebhookReceiver([200]) as hook:
        job_id = _finished_by_a_worker(store, settings, hook.url)
        assert deliver(store, job_id, settings) is True  # the worker's own, inline
        _age(store, job_id, 100 * GRACE)
        sent: list[str] = []
        for _ in range(3):
            assert _reap(store, settings, sent) == []
        assert sent == []
        assert deliver(store, job_id, settings) is None  # a stray task: nothing sent
        _assert_one_signed(hook.deliveries, job_id)
    assert store.webhook_state(job_id) == "delivered"


def test_concurrent_delivery_runs_post_once(store: JobStore, tmp_path: Path) -> None:
    """The worker's inline run, the API's task and a reaper's task at once: one claims."""
    settings = _settings(tmp_path)
    with WebhookReceiver([200]) as hook:
        job_id = _finished_by_a_worker(store, settings, hook.url)
        outcomes = race(4, lambda i: deliver(store, job_id, settings))
        assert sorted(outcomes, key=str) == [None, None, None, True]
        _assert_one_signed(hook.deliveries, job_id)


def test_a_run_that_stopped_mid_delivery_is_taken_over(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_outbox_seconds=GRACE)
    with WebhookReceiver([200]) as hook:
        job_id = _finished_by_a_worker(store, settings, hook.url)
        dead = store.claim_webhook(job_id, GRACE)  # the run that then died, before posting
        assert dead is not None
        sent: list[str] = []
        assert _reap(store, settings, sent) == []  # a live claim is left alone
        assert deliver(store, job_id, settings) is None  # ... also by another run
        _age(store, job_id, GRACE + 5)
        assert _reap(store, settings, sent) == [job_id]
        assert deliver(store, job_id, settings) is True
        # The old run, had it only stalled, finds its claim gone and cannot end it.
        assert store.renew_webhook_claim(job_id, dead) is False
        assert store.end_webhook(job_id, dead, "failed") is False
        _assert_one_signed(hook.deliveries, job_id)
    assert store.webhook_state(job_id) == "delivered"


def test_broker_down_when_the_reaper_sends(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_outbox_seconds=GRACE)
    job_id = _finished_by_a_worker(store, settings, "http://127.0.0.1:9/h")
    _age(store, job_id, GRACE + 5)

    def broker_down(job_id: str) -> None:
        raise ConnectionError("broker down")

    result = reap_once(store, settings, lambda j: None, broker_down)
    assert result.webhooks_unsent == [job_id] and result.webhooks == []
    sent: list[str] = []
    assert _reap(store, settings, sent) == []  # marked: the next try is a period later
    _age(store, job_id, GRACE + 5)
    assert _reap(store, settings, sent) == [job_id] == sent
    assert store.webhook_state(job_id) == "pending"


def test_a_run_that_gave_up_is_final_and_jobs_without_a_webhook_owe_none(
    store: JobStore, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, retry_attempts=2, webhook_outbox_seconds=GRACE)
    with WebhookReceiver([500]) as hook:
        failing = _finished_by_a_worker(store, settings, hook.url)
        assert deliver(store, failing, settings) is False
        assert len(hook.deliveries) == 2
    assert store.webhook_state(failing) == "failed"
    silent = _finished_by_a_worker(store, settings, None)
    assert store.webhook_state(silent) is None
    queued = _job(store, settings, "http://127.0.0.1:9/h")  # owed, but not finished yet
    assert store.webhook_state(queued) == "pending"
    with store.engine.begin() as conn:
        long_ago = now_utc() - timedelta(seconds=10 * GRACE)
        conn.execute(update(JobRow).values(created_at=long_ago))
    for job_id in (failing, silent):
        _age(store, job_id, 10 * GRACE)
    sent: list[str] = []
    assert _reap(store, settings, sent) == [] and sent == []


def test_migration_marks_unfinished_jobs_with_a_webhook_pending(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = JobStore(url, tmp_path / "artifacts")
    with store.engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), "0003")
        hook = {**SPEC, "webhook": {"url": "http://127.0.0.1:9/h", "secret": "***"}}
        for job_id, status, spec in [
            ("job_queued_hook", "queued", hook),
            ("job_running_hook", "running", hook),
            ("job_done_hook", "succeeded", hook),  # before the outbox: not sent late
            ("job_queued_plain", "queued", SPEC),
        ]:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant, status, progress, spec, spec_digest, "
                    "attempts, cancel_requested, created_at) VALUES (:id, 'acme', :status, "
                    "'{}', :spec, 'd', 0, 0, '2026-11-23 10:00:00')"
                ),
                {"id": job_id, "status": status, "spec": json.dumps(spec)},
            )
    store.migrate()
    states = {j: store.webhook_state(j) for j in ("job_queued_hook", "job_running_hook")}
    assert states == {"job_queued_hook": "pending", "job_running_hook": "pending"}
    assert store.webhook_state("job_done_hook") is None
    assert store.webhook_state("job_queued_plain") is None
    store.close()


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_sigkill_after_the_outcome_is_stored_and_before_the_webhook_reaches_anyone(
    tmp_path: Path, postgres: OwnPostgres
) -> None:
    """The webhook URL is a socket that listens but never accepts: the worker stores the
    outcome, claims the delivery, connects and waits for an answer that never comes, and
    is SIGKILLed there; no receiver has read a byte. A real receiver then takes the port,
    a second worker's reaper finds the webhook still owed after the grace period and its
    worker delivers it: exactly one signed delivery, and never again afterwards."""
    grace = 5.0
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=2, seed=3)
    spec = {
        "base": {"uri": base.as_uri()},
        "experts": [{"uri": e.as_uri()} for e in experts],
        "method": {"name": "linear"},
        "output": {"dtype": "float32"},
    }
    env = {
        "CRUCIBLE_WEBHOOK_ALLOWED_HOSTS": json.dumps(["127.0.0.1/32"]),
        "CRUCIBLE_WEBHOOK_TIMEOUT_SECONDS": "600",  # the first worker waits until killed
        "CRUCIBLE_WEBHOOK_OUTBOX_SECONDS": str(grace),
        "CRUCIBLE_REAPER_INTERVAL_SECONDS": "1",
    }
    hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    port = hole.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    with service(tmp_path, postgres, tmp_path / "models", **env) as svc:
        client = svc.client()
        job_id = submit(client, {**spec, "webhook": {"url": url, "secret": SECRET}})
        # The worker's connection waits in the accept queue: the outcome is stored (the
        # runner finishes before it delivers) and the request is in flight.
        readable, _, _ = select.select([hole], [], [], 180)
        assert readable, "the worker never tried to deliver the webhook"
        svc.procs.kill("worker-0", signal.SIGKILL)
        hole.close()  # the queued connection is reset unread
        store = svc.store()
        try:
            job = store.get_job(job_id)
            assert job is not None and job.status == "succeeded", job
            assert job.deliveries == []  # no attempt ever got an answer
            assert store.webhook_state(job_id) == "pending"
        finally:
            store.close()
        with WebhookReceiver([200], port=port) as hook:
            svc.procs.start_worker("worker-1")
            hook.wait_for(1, timeout=120)
            # Many reaper passes and grace periods later: still exactly one.
            time.sleep(3 * grace)
            _assert_one_signed(hook.deliveries, job_id)
            # A job whose webhook is delivered inline is never sent again.
            second = submit(client, {**spec, "webhook": {"url": url, "secret": SECRET}})
            got = hook.wait_for(2, timeout=120)
            time.sleep(3 * grace)
            assert [d.headers["X-Crucible-Job"] for d in hook.deliveries] == [job_id, second]
            assert got[1].headers["X-Crucible-Event-Id"] == f"{second}:job.succeeded"
        store = svc.store()
        try:
            for j in (job_id, second):
                assert store.webhook_state(j) == "delivered"
                done = store.get_job(j)
                assert done is not None and [d.status_code for d in done.deliveries] == [200]
            events = [e.message for e in store.get_job(job_id).events]  # type: ignore[union-attr]
        finally:
            store.close()
        assert any("delivery task sent again" in m for m in events), events
