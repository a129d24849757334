"""Datasets: upload (streamed multipart), read, list, delete. Tenant-scoped.

The upload body is parsed as it arrives (python-multipart's streaming parser fed from
`request.stream()`); the file part goes straight to a temporary file in the datasets folder,
hashed on the way, and reading stops as soon as it passes `max_dataset_bytes`. The file is
then validated by reading it back row by row and only then renamed into place and recorded,
so a failed upload leaves neither a blob nor a row.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from crucible.datasets.formats import FORMATS, DatasetFormat, format_from_filename
from crucible.datasets.schema import (
    DatasetInvalid,
    Label,
    SchemaName,
    describe_schemas,
    parse_declared_labels,
    validate_file,
)
from crucible.datasets.storage import BlobWriter, DatasetHandle, TooLarge
from crucible.settings import Settings
from crucible.store import JobStore
from service.auth import Tenant
from service.errors import ApiError
from service.storable import UNSTORABLE_MESSAGE, PathId, first_unstorable, storable

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key"},
    404: {"description": "No such dataset for this tenant"},
}
_FIELDS = ("name", "format", "labels")
# Form fields other than the file are small; the body may exceed the file limit by this.
_FIELD_MAX_BYTES = 64 * 1024
_FORM_OVERHEAD_BYTES = 4 * _FIELD_MAX_BYTES
_NAME_MAX = 255


class LabelCount(BaseModel):
    label: str | int
    count: int


class Dataset(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(examples=["ds_0193a5b2c4d5e6f708192a3b"])
    name: str
    filename: str | None = None
    format: DatasetFormat
    schema_: SchemaName = Field(
        alias="schema",
        description=f"Detected from the columns: {describe_schemas()}.",
    )
    rows: int
    bytes: int
    sha256: str = Field(description="sha256 of the uploaded bytes (the blob's address).")
    labels: list[LabelCount] = Field(
        default_factory=list,
        description="Classification: each label with its row count, sorted; [] otherwise.",
    )
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[Dataset]
    next_cursor: str | None = None


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "JSON Lines (.jsonl/.json), CSV (.csv) or Parquet "
                        f"(.parquet). Rows: {describe_schemas()}.",
                    },
                    "name": {"type": "string", "description": "Defaults to the file name."},
                    "format": {
                        "type": "string",
                        "enum": list(FORMATS),
                        "description": "Defaults to the file name's extension.",
                    },
                    "labels": {
                        "type": "string",
                        "description": "Classification: the label set as a JSON list, e.g. "
                        '["neg", "pos"]; a row with another label is an error.',
                    },
                },
            }
        }
    },
}


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _record(handle: DatasetHandle) -> Dataset:
    return Dataset.model_validate(handle.record())


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "dataset_too_large",
        f"the dataset is larger than the limit of {limit} bytes"
        f"{f' ({limit / 2**20:.4g} MiB)' if limit >= 2**20 else ''} (CRUCIBLE_MAX_DATASET_BYTES)",
        {"limit": limit},
    )


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, [{"field": field, "message": message}])


class _MultipartForm:
    """Callbacks of the streaming parser: the `file` part goes to the BlobWriter, the small
    fields are kept (each capped), anything else is refused."""

    def __init__(self, blob: BlobWriter) -> None:
        self.blob = blob
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.has_file = False
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._target: str | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._target = {}, None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.has_file:
                raise _invalid("file", "file: send one file part per upload")
            self.has_file = True
            raw = options.get(b"filename")
            if raw:
                # Some clients send a full client-side path; keep only the last part.
                base = PurePosixPath(raw.decode("utf-8", "replace").replace("\\", "/")).name
                self.filename = base[:_NAME_MAX] or None
        elif name in _FIELDS:
            if name in self.fields:
                raise _invalid(name, f"{name}: sent more than once")
            self.fields[name] = bytearray()
        else:
            raise _invalid(
                name, f"unknown form field {name!r}; expected file, {', '.join(_FIELDS)}"
            )
        self._target = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file":
            self.blob.write(data[start:end])
        elif self._target is not None:
            buf = self.fields[self._target]
            if len(buf) + end - start > _FIELD_MAX_BYTES:
                raise _invalid(
                    self._target, f"{self._target}: longer than {_FIELD_MAX_BYTES} bytes"
                )
            buf += data[start:end]

    def _end(self) -> None:
        self.ended = True

    def text(self, name: str) -> str | None:
        raw = self.fields.get(name)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _invalid(name, f"{name}: not valid UTF-8") from None


async def _receive(request: Request, blob: BlobWriter, limit: int) -> _MultipartForm:
    """Parse the multipart body as it streams in, the file part into `blob`."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the dataset as multipart/form-data with a part named `file`",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _FORM_OVERHEAD_BYTES:
        raise _too_large(limit)  # refused before reading any of it
    form = _MultipartForm(blob)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except TooLarge as exc:
        raise _too_large(exc.limit) from None
    except MultipartParseError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client went away mid-upload") from None
    if not form.ended:
        raise ApiError(400, "bad_request", "the multipart body ended before its closing boundary")
    if not form.has_file:
        raise _invalid("file", "file: the upload needs a file part named `file`")
    return form


def _format(form: _MultipartForm) -> DatasetFormat:
    supported = ", ".join(FORMATS)
    declared = form.text("format")
    if declared:
        if declared.lower() not in FORMATS:
            raise ApiError(
                415,
                "unsupported_format",
                f"format: {declared!r} is not a supported format ({supported})",
                {"field": "format", "supported": list(FORMATS)},
            )
        return declared.lower()  # type: ignore[return-value]
    fmt = format_from_filename(form.filename or "")
    if fmt is None:
        raise ApiError(
            415,
            "unsupported_format",
            f"cannot tell the format of {form.filename or 'the file'!r}: name it .jsonl, .json, "
            f".csv or .parquet, or send a `format` field ({supported})",
            {"field": "format", "supported": list(FORMATS)},
        )
    return fmt


def _declared_labels(form: _MultipartForm) -> list[Label] | None:
    raw = form.text("labels")
    if not raw:
        return None
    try:
        return parse_declared_labels(raw)
    except ValueError as exc:
        raise _invalid("labels", str(exc)) from None


def _name(form: _MultipartForm) -> str:
    name = form.text("name") or form.filename or "dataset"
    if len(name) > _NAME_MAX:
        raise _invalid("name", f"name: at most {_NAME_MAX} characters")
    for field, text in (("name", name), ("file", form.filename or "")):
        if not storable(text):
            raise _invalid(field, f"{field}: {UNSTORABLE_MESSAGE}")
    return name


@router.post(
    "",
    status_code=201,
    response_model=Dataset,
    responses={
        400: {"description": "A malformed multipart body"},
        401: _ERRORS[401],
        413: {"description": "The file is larger than CRUCIBLE_MAX_DATASET_BYTES"},
        415: {"description": "Not multipart/form-data, or a file format we do not read"},
        422: {"description": "invalid_dataset: the first bad rows and why"},
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_dataset(request: Request, tenant: Tenant) -> Dataset:
    """Upload a dataset (multipart/form-data: `file`, optional `name`, `format`, `labels`).

    The schema is detected from the columns: classification {text, label}, text {text},
    prompt_completion {prompt, completion}. Every row is checked; a bad file is a 422
    `invalid_dataset` naming the first bad rows and why. Identical bytes are stored once.
    """
    settings, store = _settings(request), _store(request)
    limit = settings.max_dataset_bytes
    with BlobWriter(store.artifacts_root, limit) as blob:
        form = await _receive(request, blob, limit)
        fmt, labels, name = _format(form), _declared_labels(form), _name(form)
        blob.close()
        try:
            summary = await run_in_threadpool(validate_file, blob.path, fmt, labels)
        except DatasetInvalid as exc:
            raise ApiError(422, "invalid_dataset", exc.message, exc.detail) from None
        bad_label = first_unstorable(summary.labels, "labels")
        if bad_label is not None:
            # Labels are stored in the database (JSONB), unlike the rows.
            message = f"a label: {UNSTORABLE_MESSAGE}"
            raise ApiError(422, "invalid_dataset", message, {"field": bad_label})
        handle = await run_in_threadpool(
            store.add_dataset, tenant, blob, fmt, summary, name, form.filename
        )
    return _record(handle)


@router.get("", response_model=DatasetPage, responses={401: _ERRORS[401]})
def list_datasets(
    request: Request,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> DatasetPage:
    """The tenant's datasets, newest first."""
    try:
        items, next_cursor = _store(request).list_datasets(tenant, limit, cursor)
    except ValueError:
        raise _invalid("query.cursor", "cursor: malformed cursor") from None
    return DatasetPage(items=[_record(h) for h in items], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=Dataset, responses=_ERRORS)
def get_dataset(dataset_id: PathId, request: Request, tenant: Tenant) -> Dataset:
    handle = _store(request).get_dataset(tenant, dataset_id)
    if handle is None:
        raise ApiError(404, "not_found", f"no dataset {dataset_id!r}")
    return _record(handle)


@router.delete("/{dataset_id}", status_code=204, response_class=Response, responses=_ERRORS)
def delete_dataset(dataset_id: PathId, request: Request, tenant: Tenant) -> Response:
    """Delete the dataset; its stored file goes with the last dataset that uses it. Jobs
    already queued that reference it fail when they start."""
    if not _store(request).delete_dataset(tenant, dataset_id):
        raise ApiError(404, "not_found", f"no dataset {dataset_id!r}")
    return Response(status_code=204)
