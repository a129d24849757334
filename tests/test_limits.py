"""Limits, each exceeded one a 4xx (or a failed job) naming the setting:

- request body size (max_request_bytes): 413 request_too_large on Content-Length and on
  the streamed bytes (a chunked body over real uvicorn); the dataset upload keeps its own;
- per-tenant concurrent jobs (max_concurrent_jobs_per_tenant): 429 too_many_jobs, exact
  under concurrent submits (real uvicorn, PostgreSQL);
- per-tenant input bytes (max_input_bytes_per_tenant): the runner records jobs.input_bytes
  and fails the job limit_exceeded (crucible.runner.execute_job on PostgreSQL);
- experts, trials and samples per job: 422 limit_exceeded naming the setting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlalchemy import select

from crucible.errors import CrucibleError
from crucible.runner import execute_job
from crucible.settings import Settings
from crucible.store import JobStore
from crucible.store.models import JobRow
from crucible.tenant_limits import admit_input_bytes
from service.app import create_app
from tests.support.ports import free_port
from tests.support.postgres import throwaway_postgres_url
from tests.support.stack import uvicorn_argv
from tests.support.tiny_models import make_gpt2_family

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 4096

SPEC: dict[str, Any] = {
    "base": {"uri": "hf://org/base", "revision": "main"},
    "experts": [{"uri": "hf://org/a"}, {"uri": "hf://org/b"}],
    "method": {"name": "task_arithmetic", "params": {"scale": 0.5}},
}


def _padded(size: int) -> bytes:
    """A valid spec whose JSON is exactly `size` bytes (padding in a whitespace run)."""
    raw = json.dumps(SPEC).encode()
    assert size >= len(raw) + 2
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def _error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path,
        broker_url="memory://",
        max_request_bytes=MAX_BODY,
        max_concurrent_jobs_per_tenant=2,
        max_dataset_bytes=64 * 1024,
        max_experts=3,
        max_trials=10,
        max_samples=100,
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def keys(app_client: TestClient) -> dict[str, dict[str, str]]:
    store = app_client.app.state.store  # type: ignore[attr-defined]
    return {t: {"Authorization": f"Bearer {store.create_api_key(t)[1]}"} for t in ("acme", "beta")}


def _post(client: TestClient, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post(
        "/v1/merges", content=body, headers={**headers, "Content-Type": "application/json"}
    )


def test_body_over_the_limit_is_413_naming_it(
    app_client: TestClient, keys: dict[str, dict[str, str]]
) -> None:
    assert _post(app_client, _padded(MAX_BODY), keys["acme"]).status_code == 202
    err = _error(_post(app_client, _padded(MAX_BODY + 1), keys["acme"]), 413, "request_too_large")
    assert "max_request_bytes" in err["message"] and str(MAX_BODY) in err["message"]
    assert err["detail"] == {"limit": MAX_BODY, "setting": "max_request_bytes"}
    # Before authentication: an oversized body is not read, whoever sends it.
    _error(_post(app_client, _padded(MAX_BODY + 1), {}), 413, "request_too_large")
    items = app_client.get("/v1/merges", headers=keys["acme"]).json()["items"]
    assert len(items) == 1  # the refused body made no job


def test_dataset_upload_keeps_its_own_larger_limit(
    app_client: TestClient, keys: dict[str, dict[str, str]]
) -> None:
    rows = [{"text": f"row number {i} " + "x" * 40, "label": "ab"[i % 2]} for i in range(200)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    assert MAX_BODY < len(data) < 64 * 1024
    resp = app_client.post(
        "/v1/datasets",
        files={"file": ("rows.jsonl", data, "application/x-ndjson")},
        headers=keys["acme"],
    )
    assert resp.status_code == 201, resp.text
    too_big = data * 20
    resp = app_client.post(
        "/v1/datasets",
        files={"file": ("rows.jsonl", too_big, "application/x-ndjson")},
        headers=keys["acme"],
    )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "dataset_too_large"


def test_concurrent_job_limit_per_tenant(
    app_client: TestClient, keys: dict[str, dict[str, str]]
) -> None:
    acme, beta = keys["acme"], keys["beta"]
    first = app_client.post("/v1/merges", json=SPEC, headers={**acme, "Idempotency-Key": "k1"})
    assert first.status_code == 202
    assert app_client.post("/v1/merges", json=SPEC, headers=acme).status_code == 202
    err = _error(app_client.post("/v1/merges", json=SPEC, headers=acme), 429, "too_many_jobs")
    assert "max_concurrent_jobs_per_tenant" in err["message"]
    assert err["detail"] == {
        "limit": 2,
        "setting": "max_concurrent_jobs_per_tenant",
        "active": 2,
    }
    # No job was made for the refused request; another tenant has its own slots.
    assert len(app_client.get("/v1/merges", headers=acme).json()["items"]) == 2
    assert app_client.post("/v1/merges", json=SPEC, headers=beta).status_code == 202
    # A retry under an Idempotency-Key that already has its job is answered with it.
    again = app_client.post("/v1/merges", json=SPEC, headers={**acme, "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # A finished (here: cancelled) job frees its slot.
    cancel = app_client.post(f"/v1/merges/{first.json()['id']}/cancel", headers=acme)
    assert cancel.json()["status"] == "cancelled"
    assert app_client.post("/v1/merges", json=SPEC, headers=acme).status_code == 202


def _with(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**spec, **changes}


TUNING = {"dataset": "ds_0123456789", "trials": 11, "init_trials": 2}


@pytest.mark.parametrize(
    ("body", "field", "setting"),
    [
        (_with(SPEC, experts=[{"uri": f"hf://org/e{i}"} for i in range(4)]), "experts", "EXPERTS"),
        (_with(SPEC, tuning=TUNING), "tuning.trials", "TRIALS"),
        (
            _with(SPEC, tuning={**TUNING, "trials": 5, "max_samples": 101}),
            "tuning.max_samples",
            "SAMPLES",
        ),
        (
            _with(
                SPEC,
                method={"name": "regmean", "params": {}},
                statistics={"max_samples": 101},
                experts=[{"uri": "hf://org/a", "dataset": "ds_0123456789"}],
            ),
            "statistics.max_samples",
            "SAMPLES",
        ),
    ],
    ids=["experts", "trials", "tuning-samples", "statistics-samples"],
)
def test_per_job_caps_name_their_setting(
    app_client: TestClient,
    keys: dict[str, dict[str, str]],
    body: dict[str, Any],
    field: str,
    setting: str,
) -> None:
    resp = app_client.post("/v1/merges", json=body, headers=keys["acme"])
    err = _error(resp, 422, "limit_exceeded")
    assert err["message"].startswith(f"{field}: at most"), err
    assert f"CRUCIBLE_MAX_{setting}" in err["message"], err
    assert err["detail"]["field"] == field


# ----------------------------------------------------------------------------- uvicorn


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """uvicorn on PostgreSQL (no worker: submitted jobs stay queued, so the count of
    active jobs is the test's to control), kombu's in-memory broker."""
    work = tmp_path_factory.mktemp("api")
    with throwaway_postgres_url() as db_url:
        env = {
            "PATH": "/usr/bin:/bin",
            "CRUCIBLE_DATA_DIR": str(work / "data"),
            "CRUCIBLE_DATABASE_URL": db_url,
            "CRUCIBLE_BROKER_URL": "memory://",
            "CRUCIBLE_MAX_REQUEST_BYTES": str(MAX_BODY),
            "CRUCIBLE_MAX_CONCURRENT_JOBS_PER_TENANT": "3",
            "CRUCIBLE_SECRETS_KEY": Fernet.generate_key().decode(),
        }
        cli = [sys.executable, "-m", "crucible.cli", "keys", "create", "--tenant"]
        keys = {
            t: subprocess.run(
                [*cli, t], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            for t in ("racer", "chunky")
        }
        port = free_port()
        log = (work / "api.log").open("wb")
        proc = subprocess.Popen(
            uvicorn_argv(port),
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (work / "api.log").read_text()
                assert time.monotonic() < deadline, (work / "api.log").read_text()
                time.sleep(0.2)
            yield {"url": base, "keys": keys, "db": db_url, "log": work / "api.log"}
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()


def _chunks(body: bytes, size: int = 512) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_chunked_body_cannot_bypass_the_limit(api: dict[str, Any]) -> None:
    headers = {
        "Authorization": f"Bearer {api['keys']['chunky']}",
        "Content-Type": "application/json",
    }
    with httpx.Client(base_url=api["url"], headers=headers, timeout=30) as client:
        # A generator body goes out with Transfer-Encoding: chunked and no Content-Length.
        request = client.build_request("POST", "/v1/merges", content=_chunks(_padded(MAX_BODY)))
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        resp = client.send(request)
        assert resp.status_code == 202, resp.text
        request = client.build_request(
            "POST", "/v1/merges", content=_chunks(_padded(MAX_BODY + 600))
        )
        assert "content-length" not in request.headers
        err = _error(client.send(request), 413, "request_too_large")
        assert "max_request_bytes" in err["message"]
        assert len(client.get("/v1/merges").json()["items"]) == 1


def test_concurrent_submits_never_exceed_the_job_limit(api: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {api['keys']['racer']}"}
    results: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def submit() -> None:
        with httpx.Client(base_url=api["url"], headers=headers, timeout=60) as client:
            start.wait()
            resp = client.post("/v1/merges", json=SPEC)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 12
    statuses = sorted(r.status_code for r in results)
    accepted = statuses.count(202)
    assert set(statuses) <= {202, 429}, [r.text for r in results if r.status_code not in (202,)]
    # Count and insert are serialised per tenant: exactly the limit is taken, no more, no less.
    assert accepted == 3, statuses
    for r in results:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "too_many_jobs"
    store = JobStore(api["db"], Path("/nonexistent"))
    try:
        assert store.active_jobs("racer") == accepted
    finally:
        store.close()


# ----------------------------------------------------------------------------- input bytes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_gpt2_family(tmp_path_factory.mktemp("models") / "gpt2", n_experts=1, seed=2)


def _file_spec(models: tuple[Path, list[Path]]) -> dict[str, Any]:
    base, (expert,) = models
    return {
        "base": {"uri": base.as_uri()},
        "experts": [{"uri": expert.as_uri()}],
        "method": {"name": "task_arithmetic", "params": {"scale": 0.5}},
        "output": {"dtype": "float32"},
    }


def _weights_bytes(folder: Path) -> int:
    raw = (folder / "model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    return len(raw) - 8 - header


def test_input_bytes_limit_fails_the_job_naming_it(
    models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, (expert,) = models
    need = _weights_bytes(base) + _weights_bytes(expert)
    with throwaway_postgres_url() as db_url:
        other_running = 1000
        key = Fernet.generate_key().decode()

        def settings(limit: int) -> Settings:
            return Settings(
                data_dir=tmp_path / "data",
                database_url=db_url,
                allowed_local_dirs=[base.parent],
                max_input_bytes_per_tenant=limit,
                device="cpu",
                secrets_key=key,
            )

        store = JobStore(db_url, settings(0).artifacts_root)
        try:
            store.migrate()
            spec = _file_spec(models)
            # Another running job of the tenant holds `other_running` input bytes.
            running, _ = store.create_job("acme", spec, "d-run", None)
            assert store.claim(running.id, "elsewhere", lease_seconds=3600) is not None
            admit_input_bytes(store, running.id, other_running, settings(10**12))

            refused, _ = store.create_job("acme", spec, "d-1", None)
            assert execute_job(refused.id, store, settings(need + other_running - 1)) == "failed"
            job = store.get_job(refused.id)
            assert job is not None and job.error is not None
            assert job.error.code == "limit_exceeded", job.error
            assert "max_input_bytes_per_tenant" in job.error.message
            assert job.error.detail["input_bytes"] == need
            assert job.error.detail["running_input_bytes"] == other_running

            # Exactly at the limit it runs; another tenant's running bytes never count.
            admitted, _ = store.create_job("acme", spec, "d-2", None)
            assert execute_job(admitted.id, store, settings(need + other_running)) == "succeeded"
            other, _ = store.create_job("beta", spec, "d-3", None)
            assert execute_job(other.id, store, settings(need)) == "succeeded"

            with store.engine.connect() as conn:
                recorded = dict(conn.execute(select(JobRow.id, JobRow.input_bytes)).all())
            assert recorded[refused.id] == recorded[admitted.id] == recorded[other.id] == need
        finally:
            store.close()


def test_admit_input_bytes_alone_over_the_limit(tmp_path: Path) -> None:
    with throwaway_postgres_url() as db_url:
        store = JobStore(db_url, tmp_path / "artifacts")
        try:
            store.migrate()
            job, _ = store.create_job("acme", SPEC, "d", None)
            settings = Settings(data_dir=tmp_path, max_input_bytes_per_tenant=100)
            admit_input_bytes(store, job.id, 100, settings)
            with pytest.raises(CrucibleError) as err:
                admit_input_bytes(store, job.id, 101, settings)
            assert err.value.code == "limit_exceeded"
            assert err.value.detail["limit"] == 100
        finally:
            store.close()
