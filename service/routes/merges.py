"""Merge jobs: submit, read, list, cancel, download outputs."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from crucible.artifacts import artifact_store
from crucible.errors import CrucibleError
from crucible.publish.sinks import output_key
from crucible.queue import enqueue_merge
from crucible.secrets import JobSecrets, encrypt_secrets
from crucible.settings import Settings
from crucible.sources.uri import parse_uri
from crucible.spec import REDACTED, Job, JobPage, JobStatus, MergeSpec
from crucible.store import IdempotencyConflict, JobStore, TooManyJobs
from crucible.store.datasets import best_trial
from crucible.webhook_url import resolve_target
from crucible.webhooks import enqueue_delivery, has_webhook
from service.auth import BearerKey, Tenant, invalid_key
from service.errors import ApiError, job_not_found
from service.limits import too_many_jobs
from service.storable import UNSTORABLE_MESSAGE, PathId, first_unstorable

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/merges", tags=["merges"])

_ERRORS = {
    401: {"description": "Missing or invalid API key"},
    404: {"description": "No such job for this tenant"},
}


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _check_limits_and_paths(spec: MergeSpec, settings: Settings) -> None:
    if len(spec.experts) > settings.max_experts:
        raise ApiError(
            422,
            "limit_exceeded",
            f"experts: at most {settings.max_experts} experts per job (got {len(spec.experts)}; "
            "CRUCIBLE_MAX_EXPERTS)",
            {"field": "experts", "limit": settings.max_experts, "setting": "max_experts"},
        )
    caps = []
    if spec.needs_grams():  # the statistics section has defaults; it counts when used
        caps.append(("statistics.max_samples", spec.statistics.max_samples, "max_samples"))
    if spec.tuning is not None:
        caps += [
            ("tuning.trials", spec.tuning.trials, "max_trials"),
            ("tuning.max_samples", spec.tuning.max_samples, "max_samples"),
        ]
    for field, value, setting in caps:
        limit = getattr(settings, setting)
        if value > limit:
            raise ApiError(
                422,
                "limit_exceeded",
                f"{field}: at most {limit} on this server (got {value}; CRUCIBLE_"
                f"{setting.upper()})",
                {"field": field, "limit": limit},
            )
    refs = [("base", spec.base), *((f"experts.{i}", e) for i, e in enumerate(spec.experts))]
    for field, ref in refs:
        parsed = parse_uri(ref.uri)
        if parsed.scheme == "file" and not settings.allows_local_path(parsed.path):
            raise ApiError(
                422,
                "local_path_forbidden",
                f"{field}.uri: local paths are only allowed under the server's allowed "
                "directories (CRUCIBLE_ALLOWED_LOCAL_DIRS)",
                {"field": f"{field}.uri"},
            )


def _check_secrets_and_webhook(spec: MergeSpec, settings: Settings) -> JobSecrets:
    """The request's secrets (to be encrypted); a webhook URL the SSRF policy refuses, or
    a secret that is only the redaction marker (a spec copied from a response), is a 422."""
    secrets = JobSecrets.from_spec(spec)
    markers = [("hub_token", spec.hub_token)]
    if spec.webhook is not None:
        markers.append(("webhook.secret", spec.webhook.secret))
    for field, value in markers:
        if value is not None and value.get_secret_value() == REDACTED:
            raise ApiError(
                422,
                "invalid_spec",
                f"{field}: {REDACTED!r} is the redaction marker of a stored spec; send the "
                "secret itself",
                {"field": field},
            )
    if spec.webhook is not None:
        try:
            resolve_target(spec.webhook.url, settings.webhook_allowed_hosts)
        except CrucibleError as exc:
            raise ApiError(422, exc.code, exc.message, exc.detail) from None
    return secrets


def _check_storable(spec: MergeSpec) -> None:
    field = first_unstorable(spec.model_dump(mode="json"), "body")
    if field is not None:
        message = f"{field}: {UNSTORABLE_MESSAGE}"
        raise ApiError(422, "invalid_request", message, [{"field": field, "message": message}])


def _dataset_fields(spec: MergeSpec) -> list[tuple[str, str]]:
    """(field, dataset id) for every dataset reference in the spec."""
    refs = [(f"experts.{i}.dataset", e.dataset) for i, e in enumerate(spec.experts) if e.dataset]
    if spec.tuning is not None:
        d = spec.tuning.dataset
        if isinstance(d, dict):
            refs += [(f"tuning.dataset.{name}", ds) for name, ds in d.items()]
        else:
            refs.append(("tuning.dataset", d))
    return refs


def _check_datasets(spec: MergeSpec, store: JobStore, tenant: str) -> None:
    """Every referenced dataset is the caller's; another tenant's reads as unknown."""
    wanted = spec.dataset_ids()
    found = store.existing_dataset_ids(tenant, wanted)
    missing = [ds for ds in wanted if ds not in found]
    if not missing:
        return
    field, first = next((f, ds) for f, ds in _dataset_fields(spec) if ds in missing)
    raise ApiError(
        404,
        "dataset_not_found",
        f"{field}: no dataset {first!r} (upload one with POST /v1/datasets)",
        {"field": field, "dataset_id": first, "missing": missing},
    )


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses={
        **_ERRORS,
        200: {"model": Job, "description": "The job this Idempotency-Key already made"},
        400: {"description": "The body is not JSON"},
        404: {"description": "A referenced dataset is not this tenant's (dataset_not_found)"},
        409: {},
        413: {"description": "The body is over max_request_bytes (request_too_large)"},
        429: {"description": "The tenant's concurrent-job limit is reached (too_many_jobs)"},
        503: {},
    },
)
def submit_merge(
    spec: MergeSpec,
    request: Request,
    response: Response,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Job:
    """Queue a merge. With an Idempotency-Key, a retry with the same body returns the same
    job (200 instead of 202 when it already existed); another body under the key is a 409."""
    store, settings = _store(request), _settings(request)
    _check_limits_and_paths(spec, settings)
    _check_storable(spec)
    secrets = _check_secrets_and_webhook(spec, settings)
    _check_datasets(spec, store, tenant)
    slots = settings.max_concurrent_jobs_per_tenant
    # The stored spec and its digest hold "***" where a secret was (WriteOnlySecret), so an
    # Idempotency-Key retry with another token returns the existing job and its secrets.
    ciphertext = encrypt_secrets(secrets, settings)
    try:
        job, created = store.create_job(
            tenant,
            spec.model_dump(mode="json"),
            spec.digest(),
            idempotency_key,
            ciphertext,
            max_active=slots,
        )
    except TooManyJobs as exc:  # counted in the insert's transaction (race-free)
        raise too_many_jobs(slots, exc.active) from None
    except IdempotencyConflict as exc:
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was already used with a different request body",
            {"job_id": exc.job_id},
        ) from None
    response.headers["Location"] = f"/v1/merges/{job.id}"
    if not created:
        response.status_code = 200
        if job.status == "queued":
            # The first request may have died between storing the job and sending its task;
            # sending it again is safe (a second delivery of a claimed job is a no-op).
            _resend(request, job.id)
        return job
    try:
        enqueue_merge(request.app.state.celery, job.id)
    except Exception as exc:
        log.error("enqueue of %s failed: %s", job.id, type(exc).__name__)
        error = {"code": "broker_unavailable", "message": "the job queue is unavailable"}
        store.finish(job.id, "failed", error=error)
        raise ApiError(
            503,
            "broker_unavailable",
            "the job queue is unavailable; retry later",
            {"job_id": job.id},
        ) from None
    return job


def _resend(request: Request, job_id: str) -> None:
    """Send a queued job's task again; if the broker is down the reaper resends it later."""
    try:
        enqueue_merge(request.app.state.celery, job_id)
    except Exception as exc:
        log.warning("resend of %s failed: %s", job_id, type(exc).__name__)


@router.get("", response_model=JobPage, responses=_ERRORS)
def list_merges(
    request: Request,
    tenant: Tenant,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobPage:
    try:
        items, next_cursor = _store(request).list_jobs(tenant, status, limit, cursor)
    except ValueError:
        raise ApiError(
            422,
            "invalid_request",
            "cursor: malformed cursor",
            [{"field": "query.cursor", "message": "malformed cursor"}],
        ) from None
    return JobPage(items=items, next_cursor=next_cursor)


def _job_or_404(request: Request, tenant: str, job_id: str) -> Job:
    job = _store(request).get_job(job_id, tenant)
    if job is None:
        raise job_not_found(job_id)
    return job


@router.get("/{job_id}", response_model=Job, responses=_ERRORS)
def get_merge(job_id: PathId, request: Request, api_key: BearerKey) -> Response:
    # The hot path (pipelines poll it): the key check and the job read are one database
    # round trip plus one for the events, in one thread-pool hop, and the job is serialized
    # once (pydantic) instead of being re-validated against the response model.
    tenant, job = _store(request).job_for_key(api_key, job_id)
    if tenant is None:
        raise invalid_key()
    if job is None:
        raise job_not_found(job_id)
    return Response(job.model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=Job, responses=_ERRORS)
def cancel_merge(job_id: PathId, request: Request, tenant: Tenant) -> Job:
    """Queued jobs are cancelled at once and never start; running jobs stop at the next
    tensor; finished jobs are returned unchanged."""
    before = _store(request).get_job(job_id, tenant)
    job = _store(request).request_cancel(job_id, tenant)
    if job is None:
        raise job_not_found(job_id)
    # A job cancelled while queued was finished here, not by a worker: its webhook goes out
    # through the queue, so this request never waits on the receiver.
    just_cancelled = before is not None and before.status == "queued"
    if just_cancelled and job.status == "cancelled" and has_webhook(job):
        try:
            enqueue_delivery(request.app.state.celery, job.id)
        except Exception as exc:
            log.error("webhook task for %s not sent: %s", job.id, type(exc).__name__)
    return job


class TrialPage(BaseModel):
    items: list[dict[str, Any]] = Field(
        description="Every recorded tuning trial, by index: what the tuner recorded (params, "
        "objective, metric, seconds, ...) plus `index`."
    )
    best: int | None = Field(
        default=None, description="The index of the trial with the largest `objective`."
    )


@router.get("/{job_id}/trials", response_model=TrialPage, responses=_ERRORS)
def get_merge_trials(job_id: PathId, request: Request, tenant: Tenant) -> TrialPage:
    """The tuning trials recorded so far (empty for a job without tuning)."""
    _job_or_404(request, tenant, job_id)
    items = _store(request).list_trials(job_id)
    return TrialPage(items=items, best=best_trial(items))


@router.get(
    "/{job_id}/files/{path:path}",
    response_class=FileResponse,
    responses={**_ERRORS, 409: {"description": "The job has not succeeded"}},
)
def get_merge_file(job_id: PathId, path: str, request: Request, tenant: Tenant) -> FileResponse:
    job = _job_or_404(request, tenant, job_id)
    if job.status != "succeeded" or job.result is None:
        raise ApiError(409, "not_ready", f"job {job_id} has no output (status {job.status})")
    known = {f.path for f in job.result.files}
    if path not in known:
        raise ApiError(404, "not_found", f"job {job_id} has no file {path!r}")
    settings = _settings(request)
    root = settings.job_output_dir(job_id).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ApiError(404, "not_found", f"job {job_id} has no file {path!r}")
    if target.is_file():
        return FileResponse(target, filename=target.name)
    # Not on this machine: the worker that made it stored it in the remote artifact store.
    store = artifact_store(settings)
    key = f"{output_key(job_id)}/{path}"
    size = store.size(key) if store.remote else None
    if size is None:
        raise ApiError(404, "not_found", f"job {job_id} has no file {path!r}")
    name = PurePosixPath(path).name
    return StreamingResponse(
        store.open_range(key),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f"attachment; filename*=utf-8''{quote(name)}",
        },
    )
