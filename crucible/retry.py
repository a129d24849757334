"""Retries of transient failures: the one policy for Hub, S3 and webhook calls.

Exponential backoff with full jitter (tenacity), on 429, 5xx and connection errors only;
any other 4xx is the caller's mistake and is raised at once. Each retry is reported through
`on_retry` (the job's events show it) before the wait. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from crucible.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# (attempt that failed, 1-based; the exception; seconds until the next try)
OnRetry = Callable[[int, BaseException, float], None]
# A job's event sink, `Reporter.event`: (kind, message, data).
EventSink = Callable[[str, str, dict[str, Any] | None], None]

_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (httpx, requests/huggingface_hub, botocore)."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if isinstance(code, int):
        return code
    if isinstance(response, dict):  # botocore ClientError
        meta = response.get("ResponseMetadata", {})
        code = meta.get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def is_transient(exc: BaseException) -> bool:
    """429/5xx answers and failures to connect or read are worth another try; the rest not."""
    code = status_code_of(exc)
    if code is not None:
        return code in _TRANSIENT_STATUS or code >= 500
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    # Transport errors of the HTTP stacks we use, matched by name so this module needs none
    # of them: httpx.TransportError subclasses, requests' ConnectionError/Timeout/
    # ChunkedEncodingError, botocore's EndpointConnectionError/ConnectionClosedError/
    # ReadTimeoutError, urllib3's ProtocolError.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names
        & {
            "TransportError",
            "ConnectError",
            "ReadError",
            "RemoteProtocolError",
            "ConnectTimeout",
            "ReadTimeout",
            "Timeout",
            "ChunkedEncodingError",
            "EndpointConnectionError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ProtocolError",
            "IncompleteRead",
        }
    )


def retrying(
    settings: Settings,
    what: str,
    on_retry: OnRetry | None = None,
    retry_on: Callable[[BaseException], bool] = is_transient,
) -> Retrying:
    """A tenacity `Retrying` with the service's policy; `what` names the call in logs.

    Use as `retrying(settings, "download x").__call__(fn, *args)` or iterate it
    (`for attempt in retrying(...): with attempt: ...`). The last exception is re-raised.
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        if exc is None:
            return
        log.warning(
            "%s failed (attempt %d of %d, %s); retrying in %.1f s",
            what,
            state.attempt_number,
            settings.retry_attempts,
            describe_error(exc),
            wait,
        )
        if on_retry is not None:
            on_retry(state.attempt_number, exc, wait)

    return Retrying(
        stop=stop_after_attempt(max(1, settings.retry_attempts)),
        wait=wait_random_exponential(
            multiplier=settings.retry_base_seconds, max=settings.retry_max_seconds
        ),
        retry=retry_if_exception(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )


def call_with_retries(
    settings: Settings,
    what: str,
    fn: Callable[..., T],
    *args: Any,
    on_retry: OnRetry | None = None,
    **kwargs: Any,
) -> T:
    """fn(*args, **kwargs) under the retry policy."""
    return retrying(settings, what, on_retry)(fn, *args, **kwargs)


def retry_events(settings: Settings, what: str, event: EventSink | None) -> OnRetry | None:
    """An `on_retry` that records each retry as a job event of kind `retry`: the call, the
    attempt, the wait and the error's type and status (never its message, which may hold a
    URL or a header)."""
    if event is None:
        return None

    def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
        code = status_code_of(exc)
        event(
            "retry",
            f"{what}: attempt {attempt} of {settings.retry_attempts} failed "
            f"({describe_error(exc)}); retrying in {wait:.2f} s",
            {
                "call": what,
                "attempt": attempt,
                "max_attempts": settings.retry_attempts,
                "wait_seconds": round(wait, 3),
                "error": type(exc).__name__,
                "status": code,
            },
        )

    return on_retry


def describe_error(exc: BaseException) -> str:
    """A short description without secrets: the type and the status, never headers or URLs
    with query strings (those can carry tokens)."""
    code = status_code_of(exc)
    return f"{type(exc).__name__}" + (f" HTTP {code}" if code is not None else "")
