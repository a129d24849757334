"""Scale-out with real processes: one job's merge stage split into parts that two Celery
worker processes (prefork) merge, on a PostgreSQL cluster and a Redis of the test's own
(Redis is both the broker and the chord's result backend), uvicorn in front.

Every test ends with the job `succeeded` and output files that hash exactly like a
single-worker, in-process run of the same merge (README.md, whose metrics carry timings,
left out), with the part files removed.

Failure injection for the retry test: a file `jobs/<id>/parts/fail-once-<index>` under the
artifact folder makes that part fail once with a retryable error (crucible.parts).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from crucible.pipeline import run_merge_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support import faults
from tests.support.faults import (
    OwnPostgres,
    Service,
    file_hashes,
    make_slow_family,
    short_lease,
    submit,
    wait_until,
)
from tests.support.reporters import QuietReporter

pytestmark = pytest.mark.e2e

SHARD_SIZE = 3_000_000  # the ~25 MB model in about 9 shards
BIG_SHARD_SIZE = 20_000_000  # the ~150 MB model in about 8 shards


@dataclass
class Family:
    root: Path
    base: Path
    experts: list[Path]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    root = tmp_path_factory.mktemp("models")
    base, experts = make_slow_family(root / "slow")
    return Family(root, base, experts)


@pytest.fixture(scope="module")
def big_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """~38M parameters (152 MB): a part takes seconds, so a kill sent once both parts have started
    lands mid-part (a part of the 25 MB family can finish within one 50 ms poll)."""
    root = tmp_path_factory.mktemp("big-models")
    base, experts = make_slow_family(root / "slow", n_layer=12, n_embd=512)
    return Family(root, base, experts)


def spec_of(family: Family, shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    return {
        "base": {"uri": family.base.as_uri()},
        "experts": [
            {"uri": e.as_uri(), "weight": w}
            for e, w in zip(family.experts, [1.0, 0.6], strict=True)
        ],
        "method": {"name": "ties", "params": {"density": 0.5, "scale": 1.0}},
        "output": {"dtype": "float32", "shard_size": shard_size},
    }


def single_run(family: Family, work: Path, shard_size: int) -> dict[str, str]:
    """File hashes of the merge run on one worker, in process (never split)."""
    settings = Settings(data_dir=work / "data", allowed_local_dirs=[family.root])
    spec = MergeSpec.model_validate(spec_of(family, shard_size))
    done = run_merge_job(spec, work / "out", settings, QuietReporter())
    assert done is not None
    hashes = file_hashes(done.output_dir)
    assert sum(name.endswith(".safetensors") for name in hashes) >= 6
    return hashes


@pytest.fixture(scope="module")
def single(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return single_run(family, tmp_path_factory.mktemp("single"), SHARD_SIZE)


@contextmanager
def service(work: Path, postgres: OwnPostgres, family: Family, **env: str) -> Iterator[Service]:
    """API + two Celery workers (concurrency 1 each) that split every job into 2 parts."""
    split = {"CRUCIBLE_SPLIT_MIN_INPUT_BYTES": "1", "CRUCIBLE_SPLIT_MAX_PARTS": "2"}
    with faults.service(work, postgres, family.root, workers=2, **{**split, **env}) as svc:
        yield svc


def events(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["kind"] == kind]


def assert_identical_output(svc: Service, job: dict[str, Any], single: dict[str, str]) -> Path:
    """Succeeded, the output hashes like the single-worker run, the result lists the files
    on disk, and only the output is left in the job's folder (the part files are gone)."""
    assert job["status"] == "succeeded", job
    job_dir = svc.artifacts / "jobs" / job["id"]
    assert sorted(p.name for p in job_dir.iterdir()) == ["output"]
    out = job_dir / "output"
    assert file_hashes(out) == single
    assert {f["path"]: f["sha256"] for f in job["result"]["files"]} == file_hashes(out, card=True)
    assert job["result"]["metrics"]["parts"] == 2
    assert job["progress"]["unit"] == "steps"  # the publish stage ran in the callback
    return out


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, postgres: OwnPostgres, family: Family
) -> Iterator[Service]:
    with service(tmp_path_factory.mktemp("shared"), postgres, family) as svc:
        yield svc


def test_a_job_split_across_two_workers_gives_the_single_worker_output(
    shared: Service, family: Family, single: dict[str, str]
) -> None:
    client = shared.client(180)
    job_id = submit(client, spec_of(family))
    job = client.wait(job_id, timeout=600)
    assert_identical_output(shared, job, single)
    (split,) = events(job, "split")
    parts = split["data"]["parts"]
    assert len(parts) == 2 and parts[0]["first"] == 0
    assert parts[0]["stop"] == parts[1]["first"]
    done = events(job, "part_done")
    assert sorted(e["data"]["index"] for e in done) == [0, 1]
    # Each part ran on a different worker process.
    pids = shared.worker_pids()
    assert {pids[e["data"]["worker_pid"]] for e in done} == {"worker-0", "worker-1"}, done
    assert shared.attempts(job_id) == 1


def test_a_failed_part_is_retried_alone(
    shared: Service, family: Family, single: dict[str, str]
) -> None:
    client = shared.client(180)
    job_id = submit(client, spec_of(family))
    trigger = shared.artifacts / "jobs" / job_id / "parts" / "fail-once-1"
    trigger.parent.mkdir(parents=True, exist_ok=True)
    trigger.touch()  # before the parent plans (it still resolves three models)
    job = client.wait(job_id, timeout=600)
    out = assert_identical_output(shared, job, single)
    assert not trigger.exists()
    started = events(job, "part_started")
    assert sorted(e["data"]["index"] for e in started) == [0, 1, 1], started
    assert sorted(e["data"]["index"] for e in events(job, "part_done")) == [0, 1]
    assert shared.attempts(job_id) == 1  # retried as a task, not a requeued job
    # Part 0's shard files were written by its one run and never after it was done (the
    # output files are hard links to them: same mtime), while part 1 failed and ran again.
    (split,) = events(job, "split")
    first, stop = split["data"]["parts"][0]["first"], split["data"]["parts"][0]["stop"]
    done_at = {
        e["data"]["index"]: datetime.fromisoformat(e["at"]).timestamp()
        for e in events(job, "part_done")
    }
    shards = sorted(out.glob("model-*.safetensors"))
    part0, part1 = shards[first:stop], shards[stop:]
    assert part0 and part1
    assert all(p.stat().st_mtime <= done_at[0] for p in part0), done_at
    failed_at = min(
        datetime.fromisoformat(e["at"]).timestamp() for e in started if e["data"]["index"] == 1
    )
    assert all(p.stat().st_mtime > failed_at for p in part1)


def test_sigkill_of_a_worker_mid_part_still_ends_with_the_same_output(
    tmp_path: Path, postgres: OwnPostgres, big_family: Family
) -> None:
    family = big_family
    single = single_run(family, tmp_path / "single", BIG_SHARD_SIZE)
    lease = short_lease(3)
    with service(tmp_path, postgres, family, **lease) as svc:
        client = svc.client(180)
        job_id = submit(client, spec_of(family, BIG_SHARD_SIZE))

        def both_started() -> list[dict[str, Any]] | None:
            job = client.request("GET", f"/v1/merges/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
            started = events(job, "part_started")
            return started if len({e["data"]["index"] for e in started}) == 2 else None

        started = wait_until(both_started, 300, "both parts to start", every=0.05)
        victim = started[0]["data"]
        pids = svc.worker_pids()
        name = pids[victim["worker_pid"]]
        svc.procs.kill(name, signal.SIGKILL)  # the worker and its pool child
        job = client.wait(job_id, timeout=600)
        assert_identical_output(svc, job, single)
        done = events(job, "part_done")
        # The killed part never finished there; the surviving worker merged it after the
        # reaper requeued the job, and the part it had finished was not merged again.
        assert not [e for e in done if e["data"]["worker_pid"] == victim["worker_pid"]], done
        redone = [e for e in done if e["data"]["index"] == victim["index"]]
        assert len(redone) == 1 and redone[0]["data"]["worker_pid"] in svc.worker_pids()
        assert sorted(e["data"]["index"] for e in done) == [0, 1]
        assert [e["data"]["index"] for e in events(job, "part_skipped")] == [1 - victim["index"]]
        assert "requeued" in [e["kind"] for e in job["events"]]
        assert svc.attempts(job_id) == 2
