"""Faults injected for real into a running service: uvicorn, Celery worker processes
(prefork), a PostgreSQL cluster and a Redis (AOF on) of the test's own.

Each test ends with the job `succeeded` and exactly one published output whose files hash
like a clean in-process run of the same merge, or `failed` with a clear code and no
partial output left.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crucible.pipeline import run_merge_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support.faults import (
    OwnPostgres,
    PatientClient,
    Service,
    file_hashes,
    make_slow_family,
    service,
    short_lease,
    small_folder,
    submit,
    wait_until,
)
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

pytestmark = pytest.mark.e2e

TIES = {"name": "ties", "params": {"density": 0.5, "scale": 1.0}}


@dataclass
class Families:
    root: Path
    slow: tuple[Path, list[Path]]
    tiny: tuple[Path, list[Path]]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Families:
    root = tmp_path_factory.mktemp("models")
    return Families(
        root=root,
        # ~38M parameters (152 MB) per model: the faster engine finished the 25 MB family's TIES
        # merge before a poll at 50 ms could see it mid-merge (three tests failed so).
        slow=make_slow_family(root / "slow", n_layer=12, n_embd=512),
        tiny=make_gpt2_family(root / "tiny", n_experts=2, seed=3),
    )


def spec_of(family: tuple[Path, list[Path]], method: dict[str, Any]) -> dict[str, Any]:
    base, experts = family
    return {
        "base": {"uri": base.as_uri()},
        "experts": [
            {"uri": e.as_uri(), "weight": w} for e, w in zip(experts, [1.0, 0.6], strict=True)
        ],
        "method": method,
        "output": {"dtype": "float32"},
    }


@pytest.fixture(scope="module")
def clean(families: Families, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file hashes of each merge run in process, with no fault."""
    work = tmp_path_factory.mktemp("clean")
    settings = Settings(data_dir=work / "data", allowed_local_dirs=[families.root])
    out: dict[str, Any] = {}
    for name, family, method in [
        ("slow", families.slow, TIES),
        ("tiny", families.tiny, {"name": "linear"}),
    ]:
        spec = MergeSpec.model_validate(spec_of(family, method))
        done = run_merge_job(spec, work / name, settings, QuietReporter())
        out[name] = file_hashes(done.output_dir)
    return out


def mid_merge(client: PatientClient, job_id: str) -> dict[str, Any]:
    """Wait until the job is in its merge stage with some, not all, tensors written."""

    def check() -> dict[str, Any] | None:
        job = client.request("GET", f"/v1/merges/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        p = job["progress"]
        if job["stage"] == "merge" and 0 < p["done"] < p["total"]:
            return job
        return None

    return wait_until(check, 300, f"job {job_id} to be mid-merge", every=0.05)


def assert_published_once(svc: Service, job: dict[str, Any], expected: dict[str, str]) -> None:
    """Succeeded, one output folder (no staging left), files as listed and as a clean run."""
    assert job["status"] == "succeeded", job
    job_dir = svc.artifacts / "jobs" / job["id"]
    assert sorted(p.name for p in job_dir.iterdir()) == ["output"]
    out = job_dir / "output"
    on_disk = file_hashes(out, card=True)
    assert {f["path"]: f["sha256"] for f in job["result"]["files"]} == on_disk
    assert file_hashes(out) == expected
    assert job["result"]["uri"] == f"local://jobs/{job['id']}/output"
    store = svc.store()
    try:
        held = store.ownership(job["id"])
        events = store.get_job(job["id"]).events  # type: ignore[union-attr]
    finally:
        store.close()
    assert held is not None and held.published_at is not None
    assert [e.kind for e in events].count("published") == 1


# --------------------------------------------------------------------------- the faults


def test_sigkill_of_the_worker_mid_merge_a_second_worker_finishes(
    tmp_path: Path, postgres: OwnPostgres, families: Families, clean: dict[str, Any]
) -> None:
    lease = short_lease(3)
    with service(tmp_path, postgres, families.root, **lease) as svc:
        client = svc.client()
        job_id = submit(client, spec_of(families.slow, TIES))
        at_kill = mid_merge(client, job_id)
        svc.procs.kill("worker-0", signal.SIGKILL)  # the worker and its pool child
        # The Redis message stays unacknowledged (12 h visibility): only the lease and the
        # reaper of another worker can bring the job back.
        svc.procs.start_worker("worker-1")
        job = client.wait(job_id)
        assert_published_once(svc, job, clean["slow"])
        store = svc.store()
        held = store.ownership(job_id)
        store.close()
        assert held is not None and held.attempts == 2
        kinds = [e["kind"] for e in job["events"]]
        assert "requeued" in kinds, kinds
        assert 0 < at_kill["progress"]["done"] < at_kill["progress"]["total"]


def test_redis_restart_while_jobs_are_queued_and_running(
    tmp_path: Path, postgres: OwnPostgres, families: Families, clean: dict[str, Any]
) -> None:
    with service(tmp_path, postgres, families.root) as svc:
        client = svc.client()
        running = submit(client, spec_of(families.slow, TIES))
        queued = [submit(client, spec_of(families.tiny, {"name": "linear"})) for _ in range(2)]
        mid_merge(client, running)
        assert svc.redis.queue_length() == 2  # the two others wait in Redis
        svc.redis.restart(down_seconds=2)
        after = submit(client, spec_of(families.tiny, {"name": "linear"}))
        jobs = {j: client.wait(j) for j in [running, *queued, after]}
        assert_published_once(svc, jobs[running], clean["slow"])
        for j in [*queued, after]:
            assert_published_once(svc, jobs[j], clean["tiny"])
        store = svc.store()
        attempts = {j: store.ownership(j).attempts for j in jobs}  # type: ignore[union-attr]
        store.close()
        # Each ran once: a redelivered message of the running job found its live lease.
        assert attempts == dict.fromkeys(jobs, 1), attempts


def test_api_restart_while_clients_poll(
    tmp_path: Path, postgres: OwnPostgres, families: Families, clean: dict[str, Any]
) -> None:
    # The API can die between storing a job and sending its task: the workers' reapers
    # send the task of a job left queued again after CRUCIBLE_QUEUED_RESEND_SECONDS.
    resend = {"CRUCIBLE_QUEUED_RESEND_SECONDS": "5", "CRUCIBLE_REAPER_INTERVAL_SECONDS": "1"}
    with service(tmp_path, postgres, families.root, **resend) as svc:
        results: dict[int, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def client_run(i: int) -> None:
            client = svc.client(patience=180)
            try:
                # A retried POST carries the same Idempotency-Key: one job whatever happens.
                job_id = submit(client, spec_of(families.tiny, {"name": "linear"}), f"k{i}")
                results[i] = client.wait(job_id)
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for _ in range(2):
            time.sleep(1.0)
            svc.procs.kill("api", signal.SIGKILL)
            time.sleep(1.0)
            svc.procs.start_api()
        for t in threads:
            t.join(timeout=400)
        assert not errors, errors
        assert sorted(results) == [0, 1, 2, 3]
        for job in results.values():
            assert_published_once(svc, job, clean["tiny"])
        client = svc.client()
        listed = client.request("GET", "/v1/merges", params={"limit": 50}).json()["items"]
        client.close()
        assert sorted(j["id"] for j in listed) == sorted(j["id"] for j in results.values())


def test_postgres_restart_while_a_job_runs(
    tmp_path: Path, postgres: OwnPostgres, families: Families, clean: dict[str, Any]
) -> None:
    with service(tmp_path, postgres, families.root) as svc:
        client = svc.client(patience=180)
        job_id = submit(client, spec_of(families.slow, TIES))
        mid_merge(client, job_id)
        postgres.stop("fast")  # every connection is cut
        time.sleep(3)
        postgres.start()
        job = client.wait(job_id)
        assert_published_once(svc, job, clean["slow"])
        store = svc.store()
        held = store.ownership(job_id)
        store.close()
        assert held is not None and held.attempts == 1  # the worker rode it out


def test_full_output_disk_fails_with_disk_full_and_leaves_nothing(
    tmp_path: Path, postgres: OwnPostgres, families: Families
) -> None:
    with (
        small_folder(tmp_path / "small", 4 * 1024 * 1024) as small,
        service(tmp_path, postgres, families.root, artifacts=small) as svc,
    ):
        client = svc.client()
        job_id = submit(client, spec_of(families.slow, TIES))  # ~250 MB of output
        job = client.wait(job_id)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "disk_full", job["error"]
        assert "no space left" in job["error"]["message"]
        job_dir = small / "jobs" / job_id
        leftovers = [p for p in job_dir.rglob("*")] if job_dir.exists() else []
        assert leftovers == [], leftovers
        # A job that fits still runs on the same worker afterwards.
        ok = client.wait(submit(client, spec_of(families.tiny, {"name": "linear"})))
        assert ok["status"] == "succeeded", ok


def test_cancel_mid_merge_stops_the_worker_and_removes_the_partial_output(
    tmp_path: Path, postgres: OwnPostgres, families: Families, clean: dict[str, Any]
) -> None:
    # The slow family's merge is long enough that the cancel, which goes through the
    # database and the worker's poll, lands before the last tensor.
    with service(tmp_path, postgres, families.root) as svc:
        client = svc.client()
        job_id = submit(client, spec_of(families.slow, TIES))
        mid_merge(client, job_id)
        asked = time.monotonic()
        resp = client.request("POST", f"/v1/merges/{job_id}/cancel")
        assert resp.status_code == 200, resp.text
        job = client.wait(job_id)
        seconds = time.monotonic() - asked
        print(f"cancel mid-merge: terminal after {seconds:.2f} s")
        assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled", job
        assert job["progress"]["done"] < job["progress"]["total"]  # it stopped mid-merge
        job_dir = svc.artifacts / "jobs" / job_id
        assert not job_dir.exists() or list(job_dir.iterdir()) == []
        # The worker is free again: the next job runs to the end.
        assert_published_once(
            svc,
            client.wait(submit(client, spec_of(families.tiny, {"name": "linear"}))),
            clean["tiny"],
        )
