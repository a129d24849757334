"""The worker's job runner and `crucible merge`, on real files and a real SQLite store:
cancellation mid-merge, cleanup of partial output, and the local CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file as load_numpy
from sqlalchemy import update

from crucible.datasets.storage import DatasetHandle
from crucible.errors import JobCancelled
from crucible.pipeline import run_merge_job
from crucible.runner import execute_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.store import JobStore
from crucible.store.models import JobRow, now_utc
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_bert_classifier_family, make_gpt2_family, tiny_texts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_gpt2_family(tmp_path_factory.mktemp("models"), n_experts=2, seed=3)


def _spec(family: tuple[Path, list[Path]], method: str = "linear", **output: Any) -> dict:
    base, experts = family
    return MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "weight": w} for e, w in zip(experts, [1.0, 3.0], strict=True)
            ],
            "method": {"name": method},
            "output": output,
        }
    ).model_dump(mode="json")


class CancelAfter(JobStore):
    """A real store whose progress hook requests cancellation after `n` merged tensors,
    as `POST /cancel` would while the job runs."""

    def __init__(self, url: str, tenant: str, n: int) -> None:
        super().__init__(url)
        self.tenant, self.n = tenant, n
        self.last_done = 0

    def set_progress(
        self, job_id: str, stage: str | None, done: int, total: int, unit: str
    ) -> None:
        super().set_progress(job_id, stage, done, total, unit)
        if stage == "merge":
            self.last_done = done
            if done >= self.n:
                self.request_cancel(job_id, self.tenant)


def test_running_job_stops_at_the_next_tensor_and_leaves_no_output(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        allowed_local_dirs=[family[0].parent],
        cancel_poll_seconds=0,
        progress_interval_seconds=0,
    )
    store = CancelAfter(settings.resolved_database_url, "acme", n=3)
    store.migrate()
    job, _ = store.create_job("acme", _spec(family), "d", None)
    assert execute_job(job.id, store, settings) == "cancelled"
    final = store.get_job(job.id)
    assert final is not None and final.status == "cancelled"
    assert final.error is not None and final.error.code == "cancelled"
    assert store.last_done == 3, "the job must stop at the tensor after the request"
    out = settings.job_output_dir(job.id)
    assert not out.exists() and not list(out.parent.glob(out.name + ".partial*"))
    # A redelivery of the same task does nothing.
    assert execute_job(job.id, store, settings) is None


def test_job_succeeds_with_progress_events_and_manifest(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[family[0].parent])
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    job, _ = store.create_job("acme", _spec(family, dtype="bfloat16"), "d", None)
    assert execute_job(job.id, store, settings) == "succeeded"
    final = store.get_job(job.id)
    assert final is not None and final.result is not None
    assert final.progress.done == final.progress.total > 0
    kinds = [e.kind for e in final.events]
    assert kinds.count("stage") == 3 and "resolved" in kinds and "published" in kinds
    paths = {f.path for f in final.result.files}
    assert {"model.safetensors", "config.json", "README.md"} <= paths
    out = settings.job_output_dir(job.id)
    assert (
        json.loads((out / "config.json").read_text()).get(
            "dtype", json.loads((out / "config.json").read_text()).get("torch_dtype")
        )
        == "bfloat16"
    )


def test_local_source_outside_allowed_dirs_fails_the_job(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "elsewhere"])
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    job, _ = store.create_job("acme", _spec(family), "d", None)
    assert execute_job(job.id, store, settings) == "failed"
    final = store.get_job(job.id)
    assert final is not None and final.error is not None
    assert final.error.code == "local_path_forbidden"


def test_crucible_merge_cli_writes_the_weighted_average(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(family, dtype="float32", shard_size="100KB")))
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "crucible.cli", "merge", str(spec_file), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged: dict[str, np.ndarray] = {}
    for shard in set(index["weight_map"].values()):
        merged.update(load_numpy(str(out / shard)))
    base, experts = family
    a = load_numpy(str(experts[0] / "model.safetensors"))
    b = load_numpy(str(experts[1] / "model.safetensors"))
    assert set(merged) == set(load_numpy(str(base / "model.safetensors")))
    for name in merged:
        expected = (1.0 * a[name].astype(np.float64) + 3.0 * b[name].astype(np.float64)) / 4.0
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_crucible_merge_cli_rejects_a_bad_spec(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("base: {uri: 'hf://a/b'}\nexperts: []\nmethod: {name: ties}\n")
    done = subprocess.run(
        [sys.executable, "-m", "crucible.cli", "merge", str(spec_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "experts" in done.stderr


def test_elementwise_methods_merge_large_tensors_in_row_blocks(
    tmp_path: Path, family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny block size every matrix is merged in many row blocks; the result must
    equal the whole-tensor formula, W0 + scale * sum_t w_t (W_t - W0), in float64."""
    import crucible.engine as engine
    import crucible.pipeline as pipeline

    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    assert len(engine.row_blocks((256, 64), blockwise=True)) == 18  # 15 rows each
    spec = MergeSpec.model_validate(
        {
            **_spec(family, method="task_arithmetic", dtype="float32"),
            "method": {"name": "task_arithmetic", "params": {"scale": 0.6}},
        }
    )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[family[0].parent])

    outcome = pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    merged = load_numpy(str(outcome.output_dir / "model.safetensors"))
    base, experts = family
    w0 = load_numpy(str(base / "model.safetensors"))
    a = load_numpy(str(experts[0] / "model.safetensors"))
    b = load_numpy(str(experts[1] / "model.safetensors"))
    for name, w in w0.items():
        w = w.astype(np.float64)
        expected = w + 0.6 * (1.0 * (a[name] - w) + 3.0 * (b[name] - w))
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


# -- ownership, exactly-once publish, limits (issue 6) ----------------------------------------


def _store(settings: Settings) -> JobStore:
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    return store


def _settings(tmp_path: Path, family: tuple[Path, list[Path]], **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", allowed_local_dirs=[family[0].parent], **kw)


def _as_dead_worker(store: JobStore, job_id: str, attempts: int = 1) -> None:
    """The job as a worker that died mid-run leaves it: running, its lease run out."""
    assert store.claim(job_id, "dead-host:1:0", lease_seconds=60) is not None
    with store.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(attempts=attempts, lease_expires_at=now_utc() - timedelta(seconds=1))
        )


def _hashes(folder: Path, card: bool = True) -> dict[str, str]:
    """sha256 of every file; card=False leaves out README.md, whose metrics table carries
    the run's timings (merge_seconds), so it differs between two runs of the same merge."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (card or p.name != "README.md")
    }


def test_duplicate_delivery_of_a_running_job_exits_at_once(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = _settings(tmp_path, family)
    store = _store(settings)
    job, _ = store.create_job("acme", _spec(family), "d", None)
    assert store.claim(job.id, "other-worker", lease_seconds=60) is not None
    before = store.ownership(job.id)
    assert execute_job(job.id, store, settings) is None
    assert store.ownership(job.id) == before  # same owner, attempts, lease
    assert not settings.job_output_dir(job.id).parent.exists()  # nothing ran


def test_expired_lease_is_taken_over_and_the_job_restarts_cleanly(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = _settings(tmp_path, family)
    store = _store(settings)
    clean, _ = store.create_job("acme", _spec(family), "d", None)
    assert execute_job(clean.id, store, settings) == "succeeded"

    job, _ = store.create_job("acme", _spec(family), "d2", None)
    _as_dead_worker(store, job.id)
    out = settings.job_output_dir(job.id)
    stale = out.with_name(out.name + ".partial-deadbeef")  # the dead attempt's half merge
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a shard")
    assert execute_job(job.id, store, settings) == "succeeded"

    held = store.ownership(job.id)
    assert held is not None and held.status == "succeeded" and held.attempts == 2
    assert held.published_at is not None
    assert not stale.exists() and sorted(p.name for p in out.parent.iterdir()) == ["output"]
    assert _hashes(out, card=False) == _hashes(settings.job_output_dir(clean.id), card=False)
    final = store.get_job(job.id)
    assert final is not None and final.result is not None
    assert final.result.uri == f"local://jobs/{job.id}/output"
    assert {f.path: f.sha256 for f in final.result.files} == _hashes(out)
    kinds = [e.kind for e in final.events]
    assert kinds.count("takeover") == 1 and kinds.count("published") == 1


def test_job_whose_worker_was_lost_max_attempts_times_fails_worker_lost(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = _settings(tmp_path, family, max_attempts=2)
    store = _store(settings)
    job, _ = store.create_job("acme", _spec(family), "d", None)
    _as_dead_worker(store, job.id, attempts=2)
    assert execute_job(job.id, store, settings) is None
    final = store.get_job(job.id)
    assert final is not None and final.status == "failed" and final.error is not None
    assert final.error.code == "worker_lost"
    assert not settings.job_output_dir(job.id).exists()


def test_published_job_is_never_published_again(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    """A worker that set the publish marker and died before finishing: the next delivery
    ends the job `succeeded` with the recorded result, without running or publishing."""
    settings = _settings(tmp_path, family)
    store = _store(settings)
    job, _ = store.create_job("acme", _spec(family), "d", None)
    assert store.claim(job.id, "dead", lease_seconds=60) is not None
    recorded = {"uri": f"local://jobs/{job.id}/output", "files": [], "metrics": {"m": 1}}
    assert store.record_publish(job.id, "dead", recorded)
    with store.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.id == job.id)
            .values(lease_expires_at=now_utc() - timedelta(seconds=1))
        )
    events_before = len(store.get_job(job.id).events)  # type: ignore[union-attr]
    assert execute_job(job.id, store, settings) == "succeeded"
    final = store.get_job(job.id)
    assert final is not None and final.status == "succeeded" and final.result is not None
    assert final.result.metrics == {"m": 1}
    assert not settings.job_output_dir(job.id).exists()  # no second merge, no second publish
    assert [e.kind for e in final.events[events_before:]] == ["takeover"]


def test_wall_time_limit_fails_the_job_naming_the_limit(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = _settings(tmp_path, family, job_wall_time_seconds=0)
    store = _store(settings)
    job, _ = store.create_job("acme", _spec(family), "d", None)
    assert execute_job(job.id, store, settings) == "failed"
    final = store.get_job(job.id)
    assert final is not None and final.error is not None
    assert final.error.code == "limit_exceeded"
    assert "job_wall_time_seconds" in final.error.message
    out = settings.job_output_dir(job.id)
    assert not out.exists() and not list(out.parent.glob("output*"))


class RequeuedMidMerge(JobStore):
    """A real store where, once the merge has written `n` tensors, the job is requeued as a
    reaper does when this worker's lease ran out (a long stall), and the worker's next
    heartbeat is given time to notice."""

    def __init__(self, url: str, n: int) -> None:
        super().__init__(url)
        self.n, self.done = n, False

    def set_progress(
        self, job_id: str, stage: str | None, done: int, total: int, unit: str
    ) -> None:
        super().set_progress(job_id, stage, done, total, unit)
        if stage == "merge" and done >= self.n and not self.done:
            self.done = True
            with self.engine.begin() as conn:
                conn.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id)
                    .values(lease_expires_at=now_utc() - timedelta(seconds=1))
                )
            assert self.requeue_expired(job_id, max_attempts=3)
            time.sleep(0.5)  # > heartbeat_seconds: the heartbeat sees the job is not ours


def test_worker_that_lost_its_lease_stops_and_leaves_the_job_alone(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    settings = _settings(
        tmp_path,
        family,
        heartbeat_seconds=0.05,
        cancel_poll_seconds=0,
        progress_interval_seconds=0,
    )
    store = RequeuedMidMerge(settings.resolved_database_url, n=2)
    store.migrate()
    job, _ = store.create_job("acme", _spec(family), "d", None)
    assert execute_job(job.id, store, settings) is None
    held = store.ownership(job.id)
    assert held is not None and held.status == "queued" and held.published_at is None
    final = store.get_job(job.id)
    assert final is not None and final.result is None and final.error is None
    # The requeued job then runs to the end on the next delivery.
    assert execute_job(job.id, store, settings) == "succeeded"
    assert store.ownership(job.id).attempts == 2  # type: ignore[union-attr]


def test_one_log_line_per_stage_with_its_duration(
    tmp_path: Path, family: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, family)
    store = _store(settings)
    job, _ = store.create_job("acme", _spec(family), "d", None)
    with caplog.at_level(logging.INFO, logger="crucible.runner"):
        assert execute_job(job.id, store, settings) == "succeeded"
    lines = [r.getMessage() for r in caplog.records if " took " in r.getMessage()]
    stages = [re.search(r"stage (\w+) took ([0-9.]+) s", line) for line in lines]
    assert all(stages), lines
    assert [m.group(1) for m in stages if m] == ["resolve", "merge", "publish"]


class CancelAfterTrials(QuietReporter):
    """Requests cancellation once `n` tuning trials are recorded (as POST /cancel would)."""

    def __init__(self, n: int) -> None:
        self.n, self.trials, self.stages = n, 0, []  # type: ignore[var-annotated]

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def trial(self, index: int, data: dict[str, Any]) -> None:
        self.trials += 1

    def check_cancelled(self) -> None:
        if self.trials >= self.n:
            raise JobCancelled("cancelled while tuning")


def test_cancel_during_tuning_stops_at_the_next_trial_and_leaves_no_output(
    tmp_path: Path,
) -> None:
    labels = [["pos", "neg"], ["x", "y", "z"]]
    base, experts = make_bert_classifier_family(tmp_path / "models", labels, seed=5)
    datasets: dict[str, DatasetHandle] = {}
    for i, names in enumerate(labels):
        rows = [
            {"text": t, "label": names[j % len(names)]} for j, t in enumerate(tiny_texts(30, i))
        ]
        path = tmp_path / f"d{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        handle = DatasetHandle(
            id=f"ds_cancel{i}0000000",
            tenant="t",
            name=f"d{i}",
            sha256="0" * 64,
            path=path,
            format="jsonl",
            schema="classification",
            rows=len(rows),
            labels=sorted(names),
            bytes=path.stat().st_size,
            created_at=datetime.now(UTC),
        )
        datasets[handle.id] = handle
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri(), "name": f"e{i}"} for i, e in enumerate(experts)],
            "method": {"name": "task_arithmetic", "params": {"scale": 0.4}},
            "tuning": {
                "dataset": {f"e{i}": d for i, d in enumerate(datasets)},
                "trials": 12,
                "init_trials": 4,
            },
        }
    )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    reporter = CancelAfterTrials(2)
    out = tmp_path / "out"
    with pytest.raises(JobCancelled):
        run_merge_job(spec, out, settings, reporter, datasets)
    assert reporter.stages[-1] == "tune" and reporter.trials == 2  # not one trial more
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))


def test_crucible_reap_requeues_a_lost_job_through_the_broker(
    tmp_path: Path, family: tuple[Path, list[Path]]
) -> None:
    """`crucible reap` as an operator runs it: the embedded store and filesystem broker."""
    settings = _settings(tmp_path, family)
    store = _store(settings)
    job, _ = store.create_job("acme", _spec(family), "d", None)
    _as_dead_worker(store, job.id)
    done = subprocess.run(
        [sys.executable, "-m", "crucible.cli", "reap"],
        cwd=REPO,
        env={**os.environ, "CRUCIBLE_DATA_DIR": str(settings.data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "requeued": [job.id],
        "failed": [],
        "unsent": [],
        "resent": [],
        "webhooks": [],
        "webhooks_unsent": [],
    }
    held = store.ownership(job.id)
    assert held is not None and held.status == "queued" and held.worker is None
    # The task is in the broker's queue folder, naming the job.
    messages = [p.read_text() for p in (settings.broker_folder / "queue").iterdir()]
    assert len(messages) == 1 and job.id in messages[0]
    # And it runs: a second attempt to the end.
    assert execute_job(job.id, store, settings) == "succeeded"
    assert store.ownership(job.id).attempts == 2  # type: ignore[union-attr]
