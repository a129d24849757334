"""GET /metrics scraped from the live service (uvicorn, a Celery worker, PostgreSQL, Redis)
after a tuned job and a failing one, parsed with prometheus_client's own text parser:
jobs by status, finished-job counters, bytes, trials, stage and job duration histograms
(checked against the jobs' own event timestamps), HTTP latency by route template, and the
same DB-derived numbers from a second API process (a replica). The incremental reading of
finished jobs and the queue depth are checked on real SQLite, Redis and filesystem brokers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from crucible.queue import enqueue_merge, make_celery
from crucible.settings import Settings
from crucible.store import JobStore
from crucible.store.models import JobRow
from service.app import create_app
from service.metrics import FinishedJobTotals, queue_depth
from tests.support.redis_server import private_redis
from tests.support.stack import service_stack
from tests.support.watch_world import TRIALS, World, make_world, submit

DB_FAMILIES = (
    "crucible_jobs",
    "crucible_jobs_finished",
    "crucible_trials",
    "crucible_bytes_read",
    "crucible_bytes_written",
    "crucible_stage_duration_seconds",
    "crucible_job_duration_seconds",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    """{(sample name, sorted labels): value} for every sample of the exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def expected_stage_durations(job: dict[str, Any]) -> list[tuple[str, float]]:
    """From the job's own events: a stage lasts until the next starts, the last until the
    job finished."""
    starts = [
        (e["message"].split()[1], _at(e["at"])) for e in job["events"] if e["kind"] == "stage"
    ]
    ends = [at for _, at in starts[1:]] + [_at(job["finished_at"])]
    pairs = zip(starts, ends, strict=True)
    return [(name, (end - at).total_seconds()) for (name, at), end in pairs]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("metrics")
    with service_stack(work, work / "models") as (stack, client):
        key = client.headers["Authorization"].split()[1]
        yield make_world(stack, client, key, work / "models")


@pytest.mark.e2e
def test_metrics_after_a_tuned_and_a_failing_job(world: World) -> None:
    jobs = []
    for spec in (world.tuned_spec(), world.failing_spec()):
        jobs.append(world.stack.wait_for_job(world.client, submit(world, spec), timeout=600))
    tuned, failed = (world.client.get(f"/v1/merges/{j['id']}").json() for j in jobs)
    assert tuned["status"] == "succeeded" and failed["status"] == "failed"

    with world.stack.client(None) as anonymous:  # no key: metrics are aggregates only
        resp = anonymous.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert tuned["id"] not in resp.text and "acme" not in resp.text
    samples = scrape(resp.text)

    for status, n in {"queued": 0, "running": 0, "succeeded": 1, "failed": 1}.items():
        assert value(samples, "crucible_jobs", status=status) == n, status
    assert value(samples, "crucible_jobs_finished_total", status="succeeded") == 1
    assert value(samples, "crucible_jobs_finished_total", status="failed") == 1
    assert value(samples, "crucible_trials_total") == TRIALS
    result = tuned["result"]
    assert value(samples, "crucible_bytes_read_total") == result["metrics"]["input_bytes"] > 0
    written = sum(f["bytes"] for f in result["files"])
    assert value(samples, "crucible_bytes_written_total") == written > 0
    assert value(samples, "crucible_queue_depth", queue="gpu") == 0
    assert value(samples, "crucible_metrics_source_up", source="database") == 1
    assert value(samples, "crucible_metrics_source_up", source="broker") == 1

    # Stage histograms: both jobs' stages, each duration from the jobs' own timestamps.
    want: dict[str, list[float]] = defaultdict(list)
    for job in (tuned, failed):
        for stage, seconds in expected_stage_durations(job):
            want[stage].append(seconds)
    assert sorted(want) == ["evaluate", "merge", "publish", "resolve", "tune"]
    assert len(want["resolve"]) == 2
    name = "crucible_stage_duration_seconds"
    for stage, durations in want.items():
        assert value(samples, f"{name}_count", stage=stage) == len(durations), stage
        assert value(samples, f"{name}_sum", stage=stage) == pytest.approx(sum(durations), abs=1e-3)
        for bound in ("0.1", "1.0", "10.0", "+Inf"):
            le = float(bound)
            assert value(samples, f"{name}_bucket", stage=stage, le=bound) == sum(
                d <= le for d in durations
            ), (stage, bound)
    seconds = (_at(tuned["finished_at"]) - _at(tuned["started_at"])).total_seconds()
    job_hist = "crucible_job_duration_seconds"
    assert value(samples, f"{job_hist}_count", status="succeeded") == 1
    assert value(samples, f"{job_hist}_sum", status="succeeded") == pytest.approx(seconds, abs=1e-3)

    # HTTP latency by route template: the POSTs and the polling GETs of this test.
    http = "crucible_http_request_duration_seconds_count"
    posts = value(samples, http, method="POST", route="/v1/merges", status="202")
    assert posts >= 2
    assert value(samples, http, method="GET", route="/v1/merges/{job_id}", status="200") >= 4
    assert not [k for k in samples if k[0] == http and tuned["id"] in str(k[1])]
    world.client.get("/no/such/path")
    again = scrape(world.client.get("/metrics").text)
    assert value(again, http, method="GET", route="<unmatched>", status="404") == 1

    # A second API process on the same database and broker reports the same numbers.
    settings = Settings(
        data_dir=Path(world.stack.env["CRUCIBLE_DATA_DIR"]),
        database_url=world.stack.env["CRUCIBLE_DATABASE_URL"],
        broker_url=world.stack.env["CRUCIBLE_BROKER_URL"],
        secrets_key=world.stack.env["CRUCIBLE_SECRETS_KEY"],
    )
    with TestClient(create_app(settings)) as replica:
        other = scrape(replica.get("/metrics").text)
    from_db = {k: v for k, v in again.items() if any(k[0].startswith(f) for f in DB_FAMILIES)}
    assert len(from_db) > 50
    assert {k: other.get(k) for k in from_db} == from_db


def _finish(store: JobStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job, _ = store.create_job("t", {"i": i}, f"d{i}", None)
        store.claim(job.id, "w")
        store.add_event(job.id, "stage", "stage resolve started")
        store.finish(
            job.id,
            "succeeded",
            result={"uri": "x", "files": [{"path": "a", "sha256": "0" * 64, "bytes": 10}]},
        )
        ids.append(job.id)
    return ids


def test_finished_jobs_are_counted_once_in_bounded_pages(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "artifacts")
    store.migrate()
    _finish(store, 10)
    totals = FinishedJobTotals()
    totals.PAGE, totals.PAGES = 3, 2  # 6 jobs per refresh at most
    totals.refresh(store)
    assert totals.finished["succeeded"] == 6 and totals.bytes_written == 60
    totals.refresh(store)
    assert totals.finished["succeeded"] == 10
    totals.refresh(store)  # nothing new: nothing counted twice
    assert totals.finished["succeeded"] == 10
    assert sum(totals.stages["resolve"].counts) == 10 and totals.bytes_written == 100

    # A job whose terminal write landed late, with a finish time before the newest one
    # (another worker's clock), is still counted once, inside the grace window.
    late = _finish(store, 1)[0]
    with store.engine.begin() as conn:
        earlier = datetime.now().astimezone() - timedelta(minutes=2)
        conn.execute(update(JobRow).where(JobRow.id == late).values(finished_at=earlier))
    totals.refresh(store)
    totals.refresh(store)
    assert totals.finished["succeeded"] == 11
    store.close()


def test_queue_depth_counts_waiting_tasks_on_redis_and_the_filesystem(tmp_path: Path) -> None:
    with private_redis(tmp_path / "redis") as redis_url:
        app = make_celery(Settings(data_dir=tmp_path / "a", broker_url=redis_url))
        assert queue_depth(app) == 0
        for i in range(3):
            enqueue_merge(app, f"job_{i}")
        assert queue_depth(app) == 3
    embedded = make_celery(Settings(data_dir=tmp_path / "b"))
    assert queue_depth(embedded) == 0
    for i in range(2):
        enqueue_merge(embedded, f"job_{i}")
    assert queue_depth(embedded) == 2
