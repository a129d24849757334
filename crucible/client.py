"""A small Python client of the Crucible API for pipelines: submit, wait, download.

    from crucible.client import CrucibleClient

    with CrucibleClient("http://crucible:8000", api_key) as client:
        job = client.submit("merge.yaml")
        job = client.wait(job.id, on_event=print)          # live, over server-sent events
        if job.status == "succeeded":
            client.download(job.id, "merged/")              # every file, sha256-checked

Torch-free (httpx, pydantic, PyYAML). Errors the API answers are `ApiError`s carrying its
`{code, message, detail}` (subclasses per status). Calls that are safe to repeat (reads,
cancel, and submit, which always sends an Idempotency-Key) are retried on connection
errors, 429 and 5xx with the service's backoff policy (crucible/retry.py); uploads are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx
import yaml

from crucible.retry import retrying
from crucible.settings import Settings
from crucible.spec import TERMINAL_STATUSES, Job, MergeSpec

T = TypeVar("T")

API_KEY_ENV = "CRUCIBLE_API_KEY"
# The server sends a keep-alive comment every 15 s; silence much longer means a dead link.
_STREAM_READ_TIMEOUT = 60.0
_CHUNK = 1024 * 1024


class ApiError(Exception):
    """A non-2xx answer: the HTTP status and the API's error {code, message, detail}."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        detail: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status_code = status_code  # crucible.retry.is_transient reads this
        self.code = code
        self.message = message
        self.detail = detail
        self.request_id = request_id


class Unauthorized(ApiError):
    """401: missing, invalid or revoked API key."""


class NotFound(ApiError):
    """404: no such job or dataset for this tenant."""


class Conflict(ApiError):
    """409: e.g. an Idempotency-Key reused with another body, or a job without output."""


class InvalidRequest(ApiError):
    """422 (and other 4xx): the request is wrong; `detail` names the fields."""


class Unavailable(ApiError):
    """503 and other 5xx: the service or a dependency is down; retried where safe."""


_BY_STATUS: dict[int, type[ApiError]] = {401: Unauthorized, 404: NotFound, 409: Conflict}


class WaitTimeout(TimeoutError):
    """wait() gave up before the job reached a terminal status."""


class ChecksumMismatch(Exception):
    """A downloaded file's sha256 or size differs from the job's result."""


class JobNotSucceeded(Exception):
    """download() of a job that has no output (its status is not succeeded)."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} has no output (status {job.status})")
        self.job = job


@dataclass(frozen=True)
class Event:
    """One message of a job's progress: SSE `event` name, decoded `data`, message `id`."""

    event: str
    data: Any
    id: str | None = None


def raise_for_error(response: httpx.Response) -> None:
    """The API's error as a typed ApiError; nothing for 2xx."""
    if response.is_success:
        return
    code, message, detail = "http_error", response.reason_phrase or "error", None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None  # not our API's answer (a proxy's page): keep the HTTP status's words
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code", code))
        message = str(error.get("message", message))
        detail = error.get("detail")
    elif isinstance(error, str):
        message = error
    status = response.status_code
    cls = _BY_STATUS.get(status) or (Unavailable if status >= 500 or status == 429 else None)
    cls = cls or InvalidRequest
    raise cls(status, code, message, detail, response.headers.get("x-request-id"))


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from the stream's lines (comments skipped, multi-line data
    joined with newlines, JSON data decoded)."""
    event, data, message_id = "message", [], None
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield Event(event, value, message_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value_text = line.partition(":")
        value_text = value_text.removeprefix(" ")
        if name == "event":
            event = value_text
        elif name == "data":
            data.append(value_text)
        elif name == "id":
            message_id = value_text


def load_spec(spec: MergeSpec | dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """The request body of a spec given as a model, a dict, or a YAML/JSON file's path."""
    if isinstance(spec, MergeSpec):
        return spec.model_dump(mode="json", exclude_none=True)
    if isinstance(spec, dict):
        return spec
    raw = yaml.safe_load(Path(spec).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{spec}: a merge spec is a mapping, not {type(raw).__name__}")
    return raw


def _safe_relative(path: str) -> PurePosixPath:
    """A result file's path, refused if it could escape the destination folder."""
    rel = PurePosixPath(path)
    if rel.is_absolute() or not rel.parts or any(p in ("..", "") for p in rel.parts):
        raise ValueError(f"refusing to write result file {path!r} outside the destination")
    return rel


class CrucibleClient:
    """One API endpoint and key. Usable as a context manager (closes the connections)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        retry_base_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        api_key = api_key or os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )
        # Only the retry fields are read; model_construct keeps the environment out of it.
        self._retry = Settings.model_construct(
            retry_attempts=max(1, retries),
            retry_base_seconds=retry_base_seconds,
            retry_max_seconds=30.0,
        )

    def __enter__(self) -> CrucibleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, url, **kwargs)
        raise_for_error(response)
        return response

    def _retried(self, what: str, fn: Callable[[], T]) -> T:
        return retrying(self._retry, what)(fn)

    def _json(self, method: str, url: str, retry: bool = True, **kwargs: Any) -> Any:
        def call() -> Any:
            return self._request(method, url, **kwargs).json()

        return self._retried(f"{method} {url}", call) if retry else call()

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        spec: MergeSpec | dict[str, Any] | str | os.PathLike[str],
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a merge. Without a key one is made, so a retried POST never makes a
        second job; pass your own to make resubmitting from a rerun pipeline a no-op."""
        body = load_spec(spec)
        key = idempotency_key or f"client-{uuid.uuid4().hex}"
        doc = self._json("POST", "/v1/merges", json=body, headers={"Idempotency-Key": key})
        return Job.model_validate(doc)

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._json("GET", f"/v1/merges/{job_id}"))

    def list_jobs(self, status: str | None = None, limit: int = 50) -> Iterator[Job]:
        """Every job of the tenant, newest first, page by page."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if status is not None:
                params["status"] = status
            if cursor is not None:
                params["cursor"] = cursor
            page = self._json("GET", "/v1/merges", params=params)
            for item in page["items"]:
                yield Job.model_validate(item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._json("POST", f"/v1/merges/{job_id}/cancel"))

    def trials(self, job_id: str) -> dict[str, Any]:
        """{"items": [trial, ...], "best": index | None}."""
        return dict(self._json("GET", f"/v1/merges/{job_id}/trials"))

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's server-sent events from the start (or after `last_event_id`) until its
        terminal `status` message, for one connection (no reconnects: see wait())."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(self._http.timeout.connect, read=_STREAM_READ_TIMEOUT)
        with self._http.stream(
            "GET", f"/v1/merges/{job_id}/events", headers=headers, timeout=timeout
        ) as response:
            if not response.is_success:
                response.read()
                raise_for_error(response)
            yield from parse_sse(response.iter_lines())

    def wait(
        self,
        job_id: str,
        on_event: Callable[[Event], None] | None = None,
        timeout: float | None = None,
        poll_interval: float = 2.0,
    ) -> Job:
        """Block until the job is succeeded, failed or cancelled; returns it.

        Follows the job's event stream, reconnecting with Last-Event-ID (no event is seen
        twice or missed) when the connection drops; falls back to polling GET when the
        server has no stream or the stream keeps failing. `on_event` gets every message
        (`status`, `stage`, `progress`, `trial`, `event`); WaitTimeout after `timeout` s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id: str | None = None
        failures = 0
        while failures < self._retry.retry_attempts:
            try:
                for event in self.events(job_id, last_id):
                    failures = 0
                    last_id = event.id or last_id
                    if on_event is not None:
                        on_event(event)
                    if event.event == "status" and event.data.get("status") in TERMINAL_STATUSES:
                        return Job.model_validate(event.data)
                    self._check_deadline(deadline, job_id)
            except NotFound:
                self.get(job_id)  # raises NotFound when the job itself is unknown
                break  # the job exists but this server has no event stream: poll
            except (httpx.TransportError, Unavailable):
                failures += 1
                self._check_deadline(deadline, job_id)
                time.sleep(min(2.0**failures * self._retry.retry_base_seconds / 2, 10.0))
            # A stream that ended without a terminal status (server restart): reconnect.
            self._check_deadline(deadline, job_id)
        return self._poll(job_id, on_event, deadline, poll_interval)

    def _poll(
        self,
        job_id: str,
        on_event: Callable[[Event], None] | None,
        deadline: float | None,
        poll_interval: float,
    ) -> Job:
        last: tuple[Any, ...] | None = None
        while True:
            job = self.get(job_id)
            state = (job.status, job.stage, job.progress.done, job.progress.total)
            if on_event is not None and state != last:
                on_event(Event("progress", {"stage": job.stage, **job.progress.model_dump()}))
            last = state
            if job.status in TERMINAL_STATUSES:
                if on_event is not None:
                    on_event(Event("status", job.model_dump(mode="json", exclude={"events"})))
                return job
            self._check_deadline(deadline, job_id)
            time.sleep(poll_interval)

    @staticmethod
    def _check_deadline(deadline: float | None, job_id: str) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimeout(f"job {job_id} did not finish in time")

    def download(self, job_id: str, dest: str | os.PathLike[str]) -> list[Path]:
        """Every file of the job's result into `dest` (folders as in the result), each
        checked against its recorded sha256 and size; a file is renamed into place only
        when it matches. Returns the paths written."""
        job = self.get(job_id)
        if job.status != "succeeded" or job.result is None:
            raise JobNotSucceeded(job)
        root = Path(dest)
        written = []
        for entry in job.result.files:
            target = root.joinpath(*_safe_relative(entry.path).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")

            def fetch(path: str = entry.path, partial: Path = partial) -> tuple[str, int]:
                digest, size = hashlib.sha256(), 0
                with (
                    self._http.stream("GET", f"/v1/merges/{job_id}/files/{path}") as response,
                    partial.open("wb") as out,
                ):
                    if not response.is_success:
                        response.read()
                        raise_for_error(response)
                    for chunk in response.iter_bytes(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                return digest.hexdigest(), size

            try:
                sha256, size = self._retried(f"download {entry.path}", fetch)
                if sha256 != entry.sha256 or size != entry.bytes:
                    raise ChecksumMismatch(
                        f"{entry.path}: got sha256 {sha256} ({size} bytes), the job recorded "
                        f"{entry.sha256} ({entry.bytes} bytes)"
                    )
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
            written.append(target)
        return written

    # -- datasets ---------------------------------------------------------------------------

    def upload_dataset(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        format: str | None = None,
        labels: list[str | int] | None = None,
    ) -> dict[str, Any]:
        """Upload a JSONL/CSV/Parquet file; returns the dataset record (id, schema, rows).
        Not retried: a second upload would make a second record."""
        file_path = Path(path)
        data: dict[str, str] = {}
        if name is not None:
            data["name"] = name
        if format is not None:
            data["format"] = format
        if labels is not None:
            data["labels"] = json.dumps(labels)
        with file_path.open("rb") as fh:
            files = {"file": (file_path.name, fh, "application/octet-stream")}
            return dict(self._json("POST", "/v1/datasets", retry=False, files=files, data=data))

    def list_datasets(self, limit: int = 50) -> list[dict[str, Any]]:
        """Every dataset of the tenant, newest first."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor is not None:
                params["cursor"] = cursor
            page = self._json("GET", "/v1/datasets", params=params)
            out.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def delete_dataset(self, dataset_id: str) -> None:
        self._retried(
            f"DELETE dataset {dataset_id}",
            lambda: self._request("DELETE", f"/v1/datasets/{dataset_id}"),
        )
