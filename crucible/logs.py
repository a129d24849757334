"""Process logging: one JSON object per line (or plain text), with the request id and job id.

`crucible serve` and `crucible worker` log JSON by default, `crucible merge` plain text;
CRUCIBLE_LOG_FORMAT=json|text overrides either. The ids come from context variables: the
API's request-id middleware sets `request_id`, the worker's task sets `job_id` (`bind_job`),
and a filter copies them onto every record, so a log line written anywhere below (store,
pipeline, retries) carries them without being passed around. Torch-free.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]
LOG_FORMAT_ENV = "CRUCIBLE_LOG_FORMAT"
LOG_LEVEL_ENV = "CRUCIBLE_LOG_LEVEL"

request_id_var: ContextVar[str | None] = ContextVar("crucible_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("crucible_job_id", default=None)

# LogRecord attributes of every record; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id", "job_id", "taskName", "ids"}
)


class ContextFilter(logging.Filter):
    """Copies the current request id and job id onto the record (None when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.job_id = job_id_var.get()
        return True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", "request_id"?, "job_id"?, "exc"?, extras...}."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value:
                doc[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in doc:
                doc[key] = _jsonable(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain lines; the ids in brackets when set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [
            f"{k}={v}"
            for k in ("request_id", "job_id")
            if (v := getattr(record, k, None)) is not None
        ]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


def resolve_format(default: LogFormat) -> LogFormat:
    """Settings.log_format (CRUCIBLE_LOG_FORMAT) when set, else the command's default."""
    from crucible.settings import Settings

    return Settings().log_format or default


def configure_logging(default: LogFormat, level: int | str | None = None) -> LogFormat:
    """Route every logger through one stderr handler on the root logger in the chosen
    format; returns the format used. Idempotent: a second call replaces the handler."""
    from crucible.settings import Settings

    settings = Settings()
    fmt = settings.log_format or default
    level = level or settings.log_level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name("crucible")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "crucible"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Servers' own loggers propagate to ours instead of printing in their own format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return fmt


@contextmanager
def bind_job(job_id: str) -> Iterator[None]:
    """Every log line written inside carries `job_id`."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)
