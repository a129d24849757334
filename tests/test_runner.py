"""The worker's job runner and `crucible merge`, on real files and a real SQLite store:
cancellation mid-merge, cleanup of partial output, and the local CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file as load_numpy

from crucible.runner import execute_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.store import JobStore
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

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
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
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
