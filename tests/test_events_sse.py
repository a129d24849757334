"""GET /v1/merges/{id}/events through real processes (uvicorn over HTTP, a Celery worker,
PostgreSQL, Redis): server-sent events of a running job in order, the stage sequence,
trial results, resuming with Last-Event-ID without duplicates or gaps, tenant scoping,
and the stream closing on the terminal status. The keep-alive comment is checked against
the stream generator itself on a real SQLite store (a real idle job would take 15 s)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crucible.client import Event, parse_sse
from crucible.store import JobStore
from service.routes.events import Cursor, job_event_stream
from tests.support.stack import service_stack
from tests.support.watch_world import TRIALS, World, make_world, submit

pytestmark = pytest.mark.e2e

ROW_EVENTS = ("stage", "event", "trial")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("sse")
    with service_stack(work, work / "models") as (stack, client):
        key = client.headers["Authorization"].split()[1]
        yield make_world(stack, client, key, work / "models")


def read_stream(
    client: httpx.Client,
    job_id: str,
    last_event_id: str | None = None,
    stop_after_rows: int | None = None,
) -> list[Event]:
    """The stream's messages until the server closes it (or after `stop_after_rows` row
    messages, when this side closes it)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[Event] = []
    timeout = httpx.Timeout(30, read=120)
    with client.stream(
        "GET", f"/v1/merges/{job_id}/events", headers=headers, timeout=timeout
    ) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for event in parse_sse(resp.iter_lines()):
            out.append(event)
            rows = sum(e.event in ROW_EVENTS for e in out)
            if stop_after_rows is not None and rows >= stop_after_rows:
                break
    return out


def rows(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.event, e.data["seq"]) for e in events if e.event in ROW_EVENTS]


def check_ids(events: list[Event]) -> None:
    """Every message has an id; both parts of it never go backwards."""
    cursors = [Cursor.parse(e.id or "") for e in events]
    for a, b in itertools.pairwise(cursors):
        assert a.events <= b.events and a.trials <= b.trials, (a, b)


def test_a_tuned_job_streams_stages_progress_and_trials_in_order(world: World) -> None:
    job_id = submit(world, world.tuned_spec())
    events = read_stream(world.client, job_id)  # returns only when the server closes it

    assert events[0].event == "status" and events[0].data["status"] in ("queued", "running")
    assert events[-1].event == "status", [e.event for e in events[-3:]]
    final = events[-1].data
    assert final["status"] == "succeeded", final["error"]
    assert [e for e in events if e.event == "status"][-1] is events[-1]
    check_ids(events)

    stages = [e.data["stage"] for e in events if e.event == "stage"]
    assert stages == ["resolve", "tune", "merge", "evaluate", "publish"]

    # The stream's rows are the job's stored events, same order, none missing.
    job = world.client.get(f"/v1/merges/{job_id}").json()
    streamed = [
        (e.data.get("kind", "stage"), e.data["message"])
        for e in events
        if e.event in ("stage", "event")
    ]
    assert streamed == [(e["kind"], e["message"]) for e in job["events"]]
    seqs = [seq for kind, seq in rows(events) if kind != "trial"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # Every trial once, with what GET /trials records.
    trials = [e.data for e in events if e.event == "trial"]
    stored = world.client.get(f"/v1/merges/{job_id}/trials").json()
    assert [t["index"] for t in trials] == list(range(TRIALS))
    for got, want in zip(trials, stored["items"], strict=True):
        assert got["objective"] == pytest.approx(want["objective"])
        assert got["params"] == want["params"]
    # Trials arrive while the tune stage runs: after its stage message, before merge's.
    names = [e.data["stage"] if e.event == "stage" else e.event for e in events]
    first_trial, last_trial = names.index("trial"), len(names) - 1 - names[::-1].index("trial")
    assert names.index("tune") < first_trial and last_trial < names.index("merge")

    # Progress is state, polled: intermediate values may be skipped, but within a stage's
    # phase (its unit and total) done never goes back nor passes the total, and it ends
    # complete.
    progress = [e.data for e in events if e.event == "progress"]
    assert len({p["stage"] for p in progress}) >= 2, progress
    for phase in {(p["stage"], p["unit"], p["total"]) for p in progress}:
        done = [p["done"] for p in progress if (p["stage"], p["unit"], p["total"]) == phase]
        assert done == sorted(done) and done[-1] <= phase[2], (phase, done)
    assert progress[-1] == {**final["progress"], "stage": final["stage"]}
    assert final["result"]["files"] and final["progress"]["done"] == final["progress"]["total"]


def test_resuming_with_last_event_id_gives_no_duplicates_and_no_gaps(world: World) -> None:
    job_id = submit(world, world.tuned_spec())
    # Leave after three rows (the job is still running), come back where we left off.
    first = read_stream(world.client, job_id, stop_after_rows=3)
    resumed = read_stream(world.client, job_id, last_event_id=first[-1].id)
    assert resumed[-1].event == "status" and resumed[-1].data["status"] == "succeeded"
    full = read_stream(world.client, job_id)  # the finished job, from the start

    assert len(rows(first)) == 3
    assert rows(first) + rows(resumed) == rows(full)
    assert len(set(rows(full))) == len(rows(full))
    assert sum(1 for kind, _ in rows(full) if kind == "trial") == TRIALS
    # After the last id there are no rows left: only the state (progress, status).
    tail = read_stream(world.client, job_id, last_event_id=full[-1].id)
    assert [e.event for e in tail] == ["progress", "status"]


def test_a_failing_job_streams_its_error_and_ends_failed(world: World) -> None:
    job_id = submit(world, world.failing_spec())
    events = read_stream(world.client, job_id)
    final = events[-1]
    assert final.event == "status" and final.data["status"] == "failed"
    assert final.data["error"]["code"] == "source_not_found", final.data["error"]
    errors = [e.data for e in events if e.event == "event" and e.data["kind"] == "error"]
    assert errors and errors[-1]["data"]["code"] == "source_not_found"
    assert "no-such-expert" in final.data["error"]["message"]


def test_the_stream_is_tenant_scoped_and_checks_its_input(world: World) -> None:
    job_id = submit(world, world.plain_spec())
    other_key = world.stack.crucible("keys", "create", "--tenant", "someone-else").strip()
    with world.stack.client(other_key) as other:
        resp = other.get(f"/v1/merges/{job_id}/events")
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"
    with world.stack.client(None) as anonymous:
        assert anonymous.get(f"/v1/merges/{job_id}/events").status_code == 401
    resp = world.client.get("/v1/merges/job_000000000000000000000000/events")
    assert resp.status_code == 404
    resp = world.client.get(f"/v1/merges/{job_id}/events", headers={"Last-Event-ID": "not-an-id"})
    assert resp.status_code == 422
    assert "Last-Event-ID" in resp.json()["error"]["message"]
    read_stream(world.client, job_id)  # let it finish before the stack stops


def test_an_idle_stream_sends_keep_alive_comments(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "artifacts")
    store.migrate()
    job, _ = store.create_job("t", {"x": 1}, "digest", None)

    async def first_chunks(n: int) -> list[str]:
        async def connected() -> bool:
            return False

        out: list[str] = []
        stream = job_event_stream(
            store, job.id, Cursor(), connected, poll_seconds=0.02, keepalive_seconds=0.1
        )
        async for chunk in stream:
            out.append(chunk)
            if len(out) >= n:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return out

    chunks = asyncio.run(first_chunks(5))
    assert chunks[0].startswith("retry: ")
    assert chunks[1].startswith("id: 0-0\nevent: status\n") and '"status":"queued"' in chunks[1]
    assert chunks[2].startswith("id: 0-0\nevent: progress\n")
    assert chunks[3:] == [": keep-alive\n\n", ": keep-alive\n\n"]

    # A client that went away ends the stream at the next poll.
    async def after_disconnect() -> list[str]:
        async def gone() -> bool:
            return True

        return [c async for c in job_event_stream(store, job.id, Cursor(), gone)]

    assert asyncio.run(after_disconnect()) == ["retry: 2000\n\n"]
    store.close()
