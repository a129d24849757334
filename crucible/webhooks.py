"""Webhook delivery: POST a finished job to the URL its spec names, signed, retried.

When a job reaches a terminal state (succeeded, failed, cancelled) the public Job JSON
(the spec with secrets as "***"; no events, no deliveries) is POSTed with these headers:

    Content-Type: application/json
    User-Agent: crucible-webhook/<version>
    X-Crucible-Event: job.<status>
    X-Crucible-Event-Id: <job id>:job.<status>
    X-Crucible-Job: <job id>
    X-Crucible-Timestamp: <unix seconds when this attempt was sent>
    X-Crucible-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes with its
secret, compares it in constant time, and refuses timestamps older than a few minutes
(replays). Every attempt gets a fresh timestamp and signature; the body is the same.

Delivery is at least once: the same event can arrive twice (a 2xx lost on the way back,
or the outbox sending again after a worker died mid-delivery). A receiver dedupes on
X-Crucible-Event-Id, which is the same for every attempt of an event and is made of
fields of the signed body (`id`, `status`); `finished_at` in the body dates the event.

The outbox (crucible/store/outbox.py): a job with a webhook is stored 'pending'; a
delivery run claims it first (one run at a time), renews the claim before each attempt
and ends it 'delivered' or 'failed'. A worker that dies between storing the terminal
status and sending leaves it pending, and the reaper sends this task again after
`webhook_outbox_seconds`. A run that gave up ('failed') is not sent again.

Before every attempt the URL is checked again (crucible/webhook_url.py: DNS may have
changed since submit) and the request goes to the address just checked, with the Host
header and TLS server name of the URL; redirects are never followed. Transient failures
(429, 5xx, connection errors) are retried with the service's backoff policy
(crucible/retry.py); each attempt is appended to `jobs.deliveries` and recorded as a job
event. Torch-free: the API sends the Celery task `crucible.deliver_webhook` by name for
jobs it finishes itself (cancelled while queued), and the reaper for webhooks still owed;
the worker delivers inline.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx

import crucible
from crucible.errors import CrucibleError
from crucible.retry import call_with_retries, describe_error
from crucible.secrets import load_job_secrets
from crucible.settings import Settings
from crucible.spec import TERMINAL_STATUSES, Job
from crucible.store import JobStore
from crucible.store.models import now_utc
from crucible.store.outbox import spec_has_webhook
from crucible.webhook_url import Resolver, WebhookTarget, resolve_target

log = logging.getLogger(__name__)

DELIVER_WEBHOOK_TASK = "crucible.deliver_webhook"
SIGNATURE_HEADER = "X-Crucible-Signature"
TIMESTAMP_HEADER = "X-Crucible-Timestamp"
EVENT_ID_HEADER = "X-Crucible-Event-Id"


class DeliveryFailed(Exception):
    """A receiver's non-2xx answer; `status_code` makes 429/5xx transient for retry.py."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class ClaimLost(Exception):
    """Another run took the delivery over (this one stalled past the grace period): stop
    at once, without retrying, so that the two do not both keep sending."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Crucible-Signature value for one attempt."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, "sha256")
    return f"sha256={mac.hexdigest()}"


def payload(job: Job) -> bytes:
    """The body: the public Job JSON without the event log and the deliveries."""
    return job.model_dump_json(exclude={"events", "deliveries"}).encode("utf-8")


def _post(
    target: WebhookTarget,
    headers: dict[str, str],
    body: bytes,
    timeout: float,
    verify: ssl.SSLContext | bool = True,
) -> int:
    """One POST to the checked address; the status code (the body is never read).
    `verify`: the TLS trust (tests pass a context trusting their own CA)."""
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        # TLS to the address, but SNI and certificate checked against the URL's host.
        extensions["sni_hostname"] = target.host
    with httpx.Client(
        follow_redirects=False, timeout=timeout, trust_env=False, verify=verify
    ) as client:
        request = client.build_request(
            "POST",
            target.connect_url,
            content=body,
            headers={**headers, "Host": target.host_header},
            extensions=extensions,
        )
        response = client.send(request, stream=True)
        response.close()
        return response.status_code


def deliver(
    store: JobStore,
    job_id: str,
    settings: Settings,
    resolver: Resolver | None = None,
    post: Callable[[WebhookTarget, dict[str, str], bytes, float], int] = _post,
) -> bool | None:
    """Deliver the job's webhook; True when a 2xx came back, False when every attempt
    failed (or the URL is refused now), None when there is nothing to deliver (no
    webhook, job not terminal or gone) or another run holds or ended the delivery.
    Never raises for the receiver's failures."""
    job = store.get_job(job_id)
    if job is None or job.status not in TERMINAL_STATUSES:
        return None
    if not has_webhook(job):
        return None
    claim = store.claim_webhook(job_id, settings.webhook_outbox_seconds)
    if claim is None:
        log.info("webhook of job %s: already delivered, given up, or being sent", job_id)
        return None
    url = str(job.spec["webhook"]["url"])
    attempt = 0

    def record(status_code: int | None = None, error: str | None = None) -> None:
        entry: dict[str, Any] = {"at": now_utc().isoformat(), "attempt": attempt}
        entry["status_code"] = status_code
        entry["error"] = error
        store.add_delivery(job_id, entry)
        outcome = f"HTTP {status_code}" if status_code is not None else error
        store.add_event(job_id, "webhook", f"webhook delivery attempt {attempt}: {outcome}", entry)

    try:
        secret = load_job_secrets(store, job_id, settings).webhook_secret
    except CrucibleError as exc:
        attempt = 1
        record(error=f"{exc.code}: {exc.message}")
        store.end_webhook(job_id, claim, "failed")
        return False
    if not secret:
        attempt = 1
        record(error="the job has no webhook secret to sign with")
        store.end_webhook(job_id, claim, "failed")
        return False
    body = payload(job)
    event = f"job.{job.status}"

    def once() -> int:
        nonlocal attempt
        if not store.renew_webhook_claim(job_id, claim):
            raise ClaimLost(job_id)
        attempt += 1
        try:
            target = resolve_target(url, settings.webhook_allowed_hosts, resolver)
        except CrucibleError as exc:
            record(error=f"{exc.code}: {exc.message}")
            raise
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"crucible-webhook/{crucible.__version__}",
            "X-Crucible-Event": event,
            EVENT_ID_HEADER: event_id(job_id, job.status),
            "X-Crucible-Job": job_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, body),
        }
        try:
            status = post(target, headers, body, settings.webhook_timeout_seconds)
        except Exception as exc:
            record(error=describe_error(exc))
            raise
        record(status_code=status)
        if not 200 <= status < 300:
            # 3xx included: redirects are not followed (they could point anywhere).
            raise DeliveryFailed(status)
        return status

    try:
        call_with_retries(settings, f"webhook of job {job_id}", once)
    except ClaimLost:
        log.warning("webhook of job %s: taken over by another run; this one stops", job_id)
        return None
    except Exception as exc:
        log.warning("webhook of job %s not delivered after %d attempts (%s)", job_id, attempt,
                    describe_error(exc))  # fmt: skip
        store.add_event(
            job_id,
            "webhook_failed",
            f"webhook not delivered after {attempt} attempts",
            {"attempts": attempt},
        )
        store.end_webhook(job_id, claim, "failed")
        return False
    store.end_webhook(job_id, claim, "delivered")
    log.info("webhook of job %s delivered (attempt %d)", job_id, attempt)
    return True


def enqueue_delivery(celery_app: Any, job_id: str) -> None:
    """Send the torch-free delivery task by name (the API must not wait on a receiver)."""
    celery_app.send_task(DELIVER_WEBHOOK_TASK, args=[job_id])


def has_webhook(job: Job) -> bool:
    return spec_has_webhook(job.spec)


def event_id(job_id: str, status: str) -> str:
    """The receiver's dedupe key: one per job and terminal status (a job ends once)."""
    return f"{job_id}:job.{status}"
