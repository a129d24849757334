"""Scale-out of the statistics stage with real processes: one RegMean job over three
experts whose Grams come from uploaded datasets; each expert's statistics run as a Celery
task (crucible.stats.fanout) on two worker processes (prefork, concurrency 1), PostgreSQL
and Redis of the test's own, uvicorn in front; the rest of the job runs in the chord's
callback.

Every job ends `succeeded` with Gram cache entries and output files that hash exactly like
a single-worker, in-process run of the same job (README.md and the merge report's module
timings, and the cache's meta.json, which carries timings and the worker, left out).

The hook and cancel tests run the fan-out's code in process on a SQLite store: no broker
is needed to see when a job fans out, or that a cancelled job's pending tasks exit before
any work.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crucible.datasets.schema import validate_file
from crucible.datasets.storage import BlobWriter
from crucible.lease import LeaseLost, worker_identity
from crucible.pipeline import _resolve, run_merge_job
from crucible.report import REPORT_FILE
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.stats.cache import META_FILE
from crucible.stats.fanout import either, run_after, run_expert, stats_hook
from crucible.store import JobStore
from tests.support import faults
from tests.support.faults import (
    OwnPostgres,
    PatientClient,
    Service,
    file_hashes,
    make_slow_family,
    short_lease,
    submit,
    wait_until,
)
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import tiny_texts, tiny_word_tokenizer

N_EXPERTS = 3
ROWS = 64
STATISTICS = {"max_samples": ROWS, "max_length": 64, "batch_size": 16}


@dataclass
class Family:
    root: Path
    base: Path
    experts: list[Path]
    datasets: list[bytes]  # one JSONL file per expert


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A 2-layer GPT-2 of width 128 and three fine-tunes: one expert's statistics take a
    few seconds here, so a worker can be killed in the middle of them."""
    root = tmp_path_factory.mktemp("models")
    base, experts = make_slow_family(root / "gpt2", n_experts=N_EXPERTS, n_layer=2, n_embd=128)
    tiny_word_tokenizer().save_pretrained(base)  # the experts read their data with it
    datasets = []
    for i in range(N_EXPERTS):
        rows = [{"text": " ".join(tiny_texts(6, seed=100 * i + j))} for j in range(ROWS)]
        datasets.append("".join(json.dumps(r) + "\n" for r in rows).encode())
    return Family(root, base, experts, datasets)


def upload(client: PatientClient, family: Family) -> list[str]:
    ids = []
    for i, body in enumerate(family.datasets):
        resp = client.request(
            "POST",
            "/v1/datasets",
            files={"file": (f"expert-{i}.jsonl", io.BytesIO(body))},
            data={"name": f"expert-{i}"},
        )
        assert resp.status_code == 201, resp.text
        ids.append(str(resp.json()["id"]))
    return ids


def spec_of(family: Family, datasets: list[str]) -> dict[str, Any]:
    return {
        "base": {"uri": family.base.as_uri()},
        "experts": [
            {"uri": e.as_uri(), "name": f"e{i}", "dataset": d}
            for i, (e, d) in enumerate(zip(family.experts, datasets, strict=True))
        ],
        "method": {"name": "regmean", "params": {"alpha": 0.9}},
        "statistics": STATISTICS,
        "output": {"dtype": "float32"},
    }


def gram_hashes(artifacts: Path) -> dict[str, dict[str, str]]:
    """Per finished Gram cache entry (key), the sha256 of its files but meta.json."""
    return {
        meta.parent.name: {n: h for n, h in file_hashes(meta.parent).items() if n != META_FILE}
        for meta in (artifacts / "grams").glob(f"*/{META_FILE}")
    }


def gram_workers(artifacts: Path) -> dict[str, dict[str, Any]]:
    """Per finished entry, the worker its meta.json names."""
    return {
        meta.parent.name: json.loads(meta.read_text())["worker"]
        for meta in (artifacts / "grams").glob(f"*/{META_FILE}")
    }


def output_of(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The output's file hashes, merge_report.json aside, and that report without its
    per-module timings (RegMean's report times each module's solve)."""
    hashes = file_hashes(folder)
    del hashes[REPORT_FILE]
    report = json.loads((folder / REPORT_FILE).read_text())
    for module in report["modules"]:
        module.pop("seconds", None)
    return hashes, report


@dataclass
class Reference:
    grams: dict[str, dict[str, str]]
    output: tuple[dict[str, str], dict[str, Any]]


@dataclass
class World:
    family: Family
    svc: Service
    client: PatientClient
    datasets: list[str]
    reference: Reference


def single_worker_run(svc: Service, family: Family, datasets: list[str], work: Path) -> Reference:
    """The same job in process, on one worker, with the service's dataset records (so the
    Gram cache keys are the same), into a cache of its own."""
    store = svc.store()
    try:
        handles = {d: store.get_dataset("acme", d) for d in datasets}
    finally:
        store.close()
    settings = Settings(data_dir=work / "data", allowed_local_dirs=[family.root])
    spec = MergeSpec.model_validate(spec_of(family, datasets))
    with faults.workers_threads():
        done = run_merge_job(spec, work / "out", settings, QuietReporter(), handles)
    assert done is not None
    grams = gram_hashes(settings.artifacts_root)
    assert len(grams) == N_EXPERTS
    return Reference(grams, output_of(done.output_dir))


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, postgres: OwnPostgres, family: Family
) -> Iterator[World]:
    """API + two workers with the default stats_fanout_min_experts (2)."""
    work = tmp_path_factory.mktemp("shared")
    with faults.service(work, postgres, family.root, workers=2) as svc:
        client = svc.client(180)
        datasets = upload(client, family)
        reference = single_worker_run(svc, family, datasets, work / "single")
        yield World(family, svc, client, datasets, reference)


def events(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["kind"] == kind]


def assert_same_as_single(svc: Service, job: dict[str, Any], reference: Reference) -> None:
    """Succeeded; Gram entries and output byte-identical to the single-worker run (the
    merge report equal but for its timings); only the output is left in the job's
    folder."""
    assert job["status"] == "succeeded", job
    assert gram_hashes(svc.artifacts) == reference.grams
    job_dir = svc.artifacts / "jobs" / job["id"]
    assert sorted(p.name for p in job_dir.iterdir()) == ["output"]
    hashes, report = output_of(job_dir / "output")
    assert hashes == reference.output[0]
    assert any(name.endswith(".safetensors") for name in hashes)
    assert report == reference.output[1]


@pytest.mark.e2e
def test_expert_statistics_run_on_both_workers_and_match_one_worker(world: World) -> None:
    svc, client = world.svc, world.client
    job_id = submit(client, spec_of(world.family, world.datasets))
    job = client.wait(job_id, timeout=600)
    assert_same_as_single(svc, job, world.reference)
    (split,) = events(job, "stats_split")
    assert sorted(e["index"] for e in split["data"]["experts"]) == list(range(N_EXPERTS))
    done = events(job, "stats_done")
    assert sorted(e["data"]["expert"] for e in done) == list(range(N_EXPERTS)), done
    pids = svc.worker_pids()
    assert {pids[e["data"]["worker_pid"]] for e in done} == {"worker-0", "worker-1"}, done
    # The cache entries name the worker that computed them, as the events do.
    by_key = {e["data"]["key"]: e["data"]["worker_pid"] for e in done}
    assert {k: w["worker_pid"] for k, w in gram_workers(svc.artifacts).items()} == by_key
    # The callback went on from the statistics stage: the cache held every expert's Grams,
    # and resolving was recorded once (by the parent).
    hits = [e for e in job["events"] if "cache hit" in e["message"]]
    assert len(hits) == N_EXPERTS
    assert len(events(job, "resolved")) == 1
    stages = [e["data"]["stage"] for e in events(job, "stage")]
    assert stages == ["resolve", "statistics", "merge", "publish"], stages
    assert svc.attempts(job_id) == 1


@pytest.mark.e2e
def test_a_failed_expert_task_is_retried_alone(world: World) -> None:
    svc, client = world.svc, world.client
    shutil.rmtree(svc.artifacts / "grams")  # the first test's entries: compute them again
    job_id = submit(client, spec_of(world.family, world.datasets))
    trigger = svc.artifacts / "jobs" / job_id / "stats" / "fail-once-1"
    trigger.parent.mkdir(parents=True, exist_ok=True)
    trigger.touch()  # before the parent plans (it resolves four models first)
    job = client.wait(job_id, timeout=600)
    assert_same_as_single(svc, job, world.reference)
    assert not trigger.exists()
    started = sorted(e["data"]["expert"] for e in events(job, "stats_started"))
    assert started == [0, 1, 1, 2], started
    assert sorted(e["data"]["expert"] for e in events(job, "stats_done")) == [0, 1, 2]
    assert svc.attempts(job_id) == 1  # retried as a task, not a requeued job


@pytest.mark.e2e
def test_sigkill_of_a_worker_mid_statistics_redoes_its_expert(
    tmp_path: Path, postgres: OwnPostgres, family: Family, world: World
) -> None:
    # A lease long enough that a loaded machine's late heartbeats do not requeue the job
    # by themselves (the parent's first planning imports transformers: 15 s at load 7).
    lease = short_lease(10)
    with faults.service(tmp_path, postgres, family.root, workers=2, **lease) as svc:
        client = svc.client(180)
        job_id = submit(client, spec_of(family, upload(client, family)))

        def two_running() -> list[dict[str, Any]] | None:
            job = client.request("GET", f"/v1/merges/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
            started = events(job, "stats_started")
            return started if len({e["data"]["worker_pid"] for e in started}) == 2 else None

        started = wait_until(two_running, 300, "two workers' statistics to start", every=0.05)
        victim = started[0]["data"]
        svc.procs.kill(svc.worker_pids()[victim["worker_pid"]], signal.SIGKILL)
        job = client.wait(job_id, timeout=600)
        assert_same_as_single(svc, job, world.reference)
        # The killed task never finished; after the reaper requeued the job, the survivor
        # computed that expert's Grams (the cache entry names it) and no other again.
        (survivor,) = svc.worker_pids()
        assert victim["key"] not in {e["data"]["key"] for e in events(job, "stats_done")}
        workers = gram_workers(svc.artifacts)
        assert workers[victim["key"]]["worker_pid"] == survivor
        assert all(w["worker_pid"] != victim["worker_pid"] for w in workers.values())
        assert "requeued" in [e["kind"] for e in job["events"]]
        assert svc.attempts(job_id) == 2


# --------------------------------------------------------------------------- cancel


def test_a_cancelled_jobs_pending_expert_tasks_exit_at_once(tmp_path: Path) -> None:
    """A job cancelled while its expert tasks wait: the first to run ends it cancelled
    before resolving anything; the others, and the callback, leave it alone at once."""
    settings = Settings(data_dir=tmp_path / "data")
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    spec = {
        "base": {"uri": (tmp_path / "nowhere-base").as_uri()},
        "experts": [
            {"uri": (tmp_path / f"nowhere-{i}").as_uri(), "dataset": f"ds_{i:010d}"}
            for i in range(2)
        ],
        "method": {"name": "regmean"},
    }
    spec = MergeSpec.model_validate(spec).model_dump(mode="json")
    job, _ = store.create_job("acme", spec, "digest", None)
    owner = worker_identity()
    assert store.claim(job.id, owner, settings.lease_seconds) is not None
    assert store.request_cancel(job.id, "acme") is not None
    keys = ["k0", "k1"]
    started = time.monotonic()
    first = run_expert(job.id, owner, {"index": 0, "key": "k0"}, keys, store, settings, True)
    assert first == "cancelled"
    assert run_expert(job.id, owner, {"index": 1, "key": "k1"}, keys, store, settings, True) is None
    assert run_after(job.id, owner, store, settings) is None
    assert time.monotonic() - started < 10
    done = store.get_job(job.id)
    assert done is not None and done.status == "cancelled"
    assert not (settings.artifacts_root / "grams").exists()


# --------------------------------------------------------------------------- the hook


def add_dataset(store: JobStore, body: bytes) -> str:
    with BlobWriter(store.artifacts_root, 10**7) as blob:
        blob.write(body)
        blob.close()
        summary = validate_file(blob.path, "jsonl", None)
        return store.add_dataset("acme", blob, "jsonl", summary, "d").id


def test_the_hook_fans_out_from_the_threshold_and_only_while_it_holds_the_job(
    tmp_path: Path, family: Family
) -> None:
    sent: list[tuple[str, str, list[dict[str, Any]], list[str]]] = []

    def send(job_id: str, owner: str, experts: list[dict[str, Any]], keys: list[str]) -> None:
        sent.append((job_id, owner, experts, keys))

    def settings_with(minimum: int) -> Settings:
        # A Redis URL that is never contacted: `send` records instead of sending the chord.
        return Settings(
            data_dir=tmp_path / "data",
            allowed_local_dirs=[family.root],
            broker_url="redis://127.0.0.1:9/0",
            stats_fanout_min_experts=minimum,
        )

    settings = settings_with(3)
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    datasets = [add_dataset(store, body) for body in family.datasets]
    spec = MergeSpec.model_validate(spec_of(family, datasets))
    job, _ = store.create_job("acme", spec.model_dump(mode="json"), "digest", None)
    owner = worker_identity()
    assert store.claim(job.id, owner, settings.lease_seconds) is not None
    inputs, _ = _resolve(spec, settings, QuietReporter())
    merged: list[str] = []

    def merge_hook(job_id: str, *_: Any) -> bool:
        merged.append(job_id)
        return False

    hook = either(stats_hook(store, settings, send), merge_hook)
    assert hook(job.id, owner, spec, inputs)  # 3 misses, threshold 3
    ((job_id, sent_owner, experts, keys),) = sent
    assert (job_id, sent_owner) == (job.id, owner)
    assert [e["index"] for e in experts] == [0, 1, 2] and [e["key"] for e in experts] == keys
    held = store.get_job(job.id)
    assert held is not None
    assert held.progress.model_dump() == {"done": 0, "total": 3, "unit": "experts"}
    # One cached expert leaves 2 misses: below 3 the parent computes them itself.
    (tmp_path / "data" / "artifacts" / "grams" / keys[1]).mkdir(parents=True)
    (tmp_path / "data" / "artifacts" / "grams" / keys[1] / META_FILE).write_text("{}")
    assert not hook(job.id, owner, spec, inputs)
    assert len(sent) == 1
    assert either(stats_hook(store, settings_with(2), send), merge_hook)(
        job.id, owner, spec, inputs
    )
    assert [e["index"] for e in sent[-1][2]] == [0, 2]
    assert not either(stats_hook(store, settings_with(0), send), merge_hook)(
        job.id, owner, spec, inputs
    )
    # A parent whose lease went to another attempt while it planned sends nothing.
    anyone = either(stats_hook(store, settings_with(1), send), merge_hook)
    with pytest.raises(LeaseLost):
        anyone(job.id, worker_identity(), spec, inputs)
    assert len(sent) == 2 and not merged
    # Two experts with the same model and data share one entry: one task for both.
    raw = spec_of(family, datasets)
    raw["experts"][2] = {**raw["experts"][0], "name": "again"}
    twice = MergeSpec.model_validate(raw)
    assert anyone(job.id, owner, twice, _resolve(twice, settings, QuietReporter())[0])
    assert [e["index"] for e in sent[-1][2]] == [0] and sent[-1][3] == [keys[0], keys[1]]
    # With the Grams in place (the merge stage), the merge split's hook is asked instead.
    inputs.grams = []
    assert not hook(job.id, owner, spec, inputs)
    assert merged == [job.id] and len(sent) == 3
