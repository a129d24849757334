"""`GET /v1/merges/{id}/events`: a job's progress as server-sent events.

The API polls the job store (job row, events and trials tables); it never talks to the
worker or to a result backend, so any replica can serve any job's stream. Messages:

- `status`: the job (as `GET /v1/merges/{id}`, without `events`) first when the stream
  opens on an unfinished job, when its status changes, and last, on the terminal status
  (after every row and the final progress); then the stream ends.
- `stage`: a stage started (`{seq, at, stage, message}`).
- `progress`: `{stage, done, total, unit}` whenever it changed since the last poll.
- `trial`: a tuning trial as `GET /v1/merges/{id}/trials` lists it, plus `seq` and `at`.
- `event`: any other job event (`{seq, at, kind, message, data}`).

Every message has an `id:` of the form `<last event row id>-<last trial row id>`: a client
reconnecting with `Last-Event-ID` gets every event and trial row after those ids, exactly
once (progress and status are state, sent again as they are now). A comment line is sent
every KEEPALIVE_SECONDS so proxies keep an idle stream open. Each poll reads at most BATCH
rows of each table, so one connection's work per poll is bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from crucible.spec import TERMINAL_STATUSES
from crucible.store import JobStore
from crucible.store.events import EventRecord, TrialRecord
from crucible.store.job_metrics import stage_of
from service.auth import Tenant
from service.errors import ApiError, job_not_found
from service.storable import PathId

router = APIRouter(prefix="/v1/merges", tags=["merges"])

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
BATCH = 200
# Suggested reconnect delay for EventSource clients (the SSE `retry:` field).
RETRY_MS = 2000
_CURSOR = re.compile(r"(\d{1,18})-(\d{1,18})")


@dataclass
class Cursor:
    """The last event row id and the last trial row id a client has seen."""

    events: int = 0
    trials: int = 0

    def __str__(self) -> str:
        return f"{self.events}-{self.trials}"

    @classmethod
    def parse(cls, value: str) -> Cursor:
        match = _CURSOR.fullmatch(value.strip())
        if match is None:
            raise ValueError(value)
        return cls(int(match.group(1)), int(match.group(2)))


def sse_message(event: str, data: Any, message_id: str | None) -> str:
    """One SSE message; JSON has no raw newlines, so data fits on one `data:` line."""
    lines = [f"id: {message_id}"] if message_id is not None else []
    lines += [f"event: {event}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return "\n".join(lines) + "\n\n"


def _event_message(ev: EventRecord) -> tuple[str, dict[str, Any]]:
    at = ev.at.isoformat()
    if ev.kind == "stage":
        stage = stage_of(ev.message, ev.data)
        return "stage", {"seq": ev.id, "at": at, "stage": stage, "message": ev.message}
    return "event", {
        "seq": ev.id,
        "at": at,
        "kind": ev.kind,
        "message": ev.message,
        "data": ev.data,
    }


def _trial_message(trial: TrialRecord) -> tuple[str, dict[str, Any]]:
    return "trial", {
        **trial.data,
        "index": trial.index,
        "seq": trial.id,
        "at": trial.at.isoformat(),
    }


def _in_order(
    events: list[EventRecord], trials: list[TrialRecord], batch: int
) -> list[EventRecord | TrialRecord]:
    """Events and trials merged by time. When a batch came back full, rows after its last
    timestamp may still be unread, so the other table's later rows wait for the next poll."""
    horizon: datetime | None = None
    for rows in (events, trials):
        if len(rows) >= batch and (horizon is None or rows[-1].at < horizon):
            horizon = rows[-1].at
    # A two-way merge keeps each table in id order (the cursor only moves forward) even
    # if timestamps are not monotonic; at equal times the event comes first.
    merged: list[EventRecord | TrialRecord] = []
    i = j = 0
    while i < len(events) or j < len(trials):
        if j >= len(trials) or (i < len(events) and events[i].at <= trials[j].at):
            row: EventRecord | TrialRecord = events[i]
            i += 1
        else:
            row = trials[j]
            j += 1
        if horizon is not None and row.at > horizon:
            break
        merged.append(row)
    if not merged and horizon is not None:
        # Timestamps out of order with ids: make progress anyway rather than spin.
        return [*events, *trials]
    return merged


def _job_doc(store: JobStore, job_id: str) -> dict[str, Any] | None:
    job = store.get_job(job_id)
    return None if job is None else job.model_dump(mode="json", exclude={"events"})


async def job_event_stream(
    store: JobStore,
    job_id: str,
    cursor: Cursor,
    disconnected: Callable[[], Awaitable[bool]],
    poll_seconds: float = POLL_SECONDS,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    batch: int = BATCH,
) -> AsyncIterator[str]:
    """The SSE text of one job from `cursor` on, until its terminal status or until the
    client goes away. Database reads run in the thread pool (the store is synchronous)."""
    yield f"retry: {RETRY_MS}\n\n"
    last_sent = time.monotonic()
    last_status: str | None = None
    last_progress: tuple[Any, ...] | None = None
    while True:
        if await disconnected():
            return
        state = await run_in_threadpool(store.job_state, job_id)
        if state is None:
            return
        terminal = state.status in TERMINAL_STATUSES
        if state.status != last_status and not terminal:
            # First, so a stream always opens with the job as it is.
            doc = await run_in_threadpool(_job_doc, store, job_id)
            if doc is not None:
                yield sse_message("status", doc, str(cursor))
                last_sent = time.monotonic()
            last_status = state.status
        events = await run_in_threadpool(store.events_after, job_id, cursor.events, batch)
        trials = await run_in_threadpool(store.trials_after, job_id, cursor.trials, batch)
        for row in _in_order(events, trials, batch):
            if isinstance(row, EventRecord):
                cursor.events = row.id
                name, data = _event_message(row)
            else:
                cursor.trials = row.id
                name, data = _trial_message(row)
            yield sse_message(name, data, str(cursor))
            last_sent = time.monotonic()
        if len(events) >= batch or len(trials) >= batch:
            continue  # more rows are waiting; the state is sent once they are all out
        progress = (state.stage, state.progress.done, state.progress.total, state.progress.unit)
        if progress != last_progress:
            stage, done, total, unit = progress
            data = {"stage": stage, "done": done, "total": total, "unit": unit}
            yield sse_message("progress", data, str(cursor))
            last_sent = time.monotonic()
            last_progress = progress
        if terminal:
            doc = await run_in_threadpool(_job_doc, store, job_id)
            if doc is not None:
                yield sse_message("status", doc, str(cursor))
            return
        if time.monotonic() - last_sent >= keepalive_seconds:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(poll_seconds)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events until the job's terminal status.",
            # The schema of a text/event-stream is that of each event, not of the body.
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "required": ["event", "data"],
                        "properties": {
                            "event": {"enum": ["status", "stage", "progress", "trial", "event"]},
                            "data": {"type": "string", "description": "A JSON document"},
                            "id": {"type": "string", "description": "<event id>-<trial id>"},
                        },
                    }
                }
            },
        },
        401: {"description": "Missing or invalid API key"},
        404: {"description": "No such job for this tenant"},
        422: {"description": "Malformed Last-Event-ID"},
    },
)
async def stream_merge_events(
    job_id: PathId,
    request: Request,
    tenant: Tenant,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=64,
            description="Resume after this message id (`<event id>-<trial id>`), as "
            "EventSource sends it on reconnect.",
        ),
    ] = None,
) -> StreamingResponse:
    """Live progress of a job as server-sent events (`text/event-stream`): stage changes,
    progress, trial results and events, then the final `status`; the stream then ends."""
    store: JobStore = request.app.state.store
    cursor = Cursor()
    if last_event_id:
        try:
            cursor = Cursor.parse(last_event_id)
        except ValueError:
            raise ApiError(
                422,
                "invalid_request",
                "Last-Event-ID: expected '<event id>-<trial id>' as sent in an `id:` line",
                [{"field": "header.last-event-id", "message": "malformed id"}],
            ) from None
    if await run_in_threadpool(store.job_state, job_id, tenant) is None:
        raise job_not_found(job_id)
    return StreamingResponse(
        job_event_stream(store, job_id, cursor, request.is_disconnected),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
