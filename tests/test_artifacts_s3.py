"""The artifact store on S3 (CRUCIBLE_ARTIFACTS_URI=s3://...) against s3rver, a real
S3-compatible server: the store's calls; dataset blobs and Gram cache entries written on one
machine and read on another (two local folders, one bucket); and, end to end, an API and a
Celery worker with different data folders (uvicorn, PostgreSQL, Redis, real processes): a
dataset uploaded through the API is used by the worker, the job's output is served by the
API from S3, and an `output.uri: s3://...` job's objects match the hashes of its local run.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from crucible.artifacts import S3ArtifactStore, artifact_store
from crucible.datasets.schema import validate_file
from crucible.datasets.storage import BlobWriter, blob_key
from crucible.publish.s3_sink import MANIFEST
from crucible.settings import Settings
from crucible.stats.cache import META_FILE, GramCache
from crucible.store import JobStore
from tests.support.postgres import throwaway_postgres_url
from tests.support.redis_server import private_redis
from tests.support.s3 import S3Server, s3_server
from tests.support.stack import Stack, uvicorn_argv
from tests.support.tiny_models import make_bert_classifier_family, tiny_texts

BUCKET = "artifacts"
OUT_BUCKET = "models"
PREFIX = "crucible"
ARTIFACTS_URI = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3"), (BUCKET, OUT_BUCKET)) as s:
        yield s


def _env(server: S3Server) -> dict[str, str]:
    return {
        **server.env(),
        "CRUCIBLE_ARTIFACTS_URI": ARTIFACTS_URI,
        "CRUCIBLE_S3_PART_BYTES": str(5 * 1024 * 1024),
        "CRUCIBLE_RETRY_BASE_SECONDS": "0.05",
    }


@pytest.fixture
def s3_env(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = _env(server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_store_calls(server: S3Server, s3_env: dict[str, str], tmp_path: Path) -> None:
    store = artifact_store(Settings(data_dir=tmp_path / "a"))
    assert isinstance(store, S3ArtifactStore) and store.remote
    src = tmp_path / "blob.bin"
    payload = bytes(range(256)) * 50_000  # 12.8 MB: a multipart upload
    src.write_bytes(payload)

    store.put_file(src, "t/calls/blob.bin")
    assert server.read(BUCKET, f"{PREFIX}/t/calls/blob.bin") == payload
    assert store.exists("t/calls/blob.bin") and store.size("t/calls/blob.bin") == len(payload)
    assert not store.exists("t/calls/missing") and store.size("t/calls/missing") is None
    assert store.list("t/calls") == ["t/calls/blob.bin"]
    assert b"".join(store.open_range("t/calls/blob.bin")) == payload
    assert b"".join(store.open_range("t/calls/blob.bin", 1000, 300)) == payload[1000:1300]

    dest = tmp_path / "b" / "got.bin"
    assert store.get_file("t/calls/blob.bin", dest) and dest.read_bytes() == payload
    assert not store.get_file("t/calls/missing", tmp_path / "b" / "none")
    assert not (tmp_path / "b" / "none").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["got.bin"]  # no partial left behind

    store.delete("t/calls/blob.bin")
    assert not store.exists("t/calls/blob.bin")
    with pytest.raises(ValueError, match="malformed artifact key"):
        store.put_file(src, "../escape")


def _blob(root: Path, rows: list[dict[str, Any]]) -> tuple[BlobWriter, Any]:
    writer = BlobWriter(root, 10**7)
    writer.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    writer.close()
    return writer, validate_file(writer.path, "jsonl", None)


def test_dataset_uploaded_on_one_machine_is_read_on_another(
    server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    api = JobStore(url, tmp_path / "api-artifacts")
    api.migrate()
    worker = JobStore(url, tmp_path / "worker-artifacts")
    rows = [{"text": t, "label": ["a", "b"][i % 2]} for i, t in enumerate(tiny_texts(12, 1))]

    writer, summary = _blob(api.artifacts_root, rows)
    with writer:
        handle = api.add_dataset("acme", writer, "jsonl", summary, "d")
    key = f"{PREFIX}/{blob_key(handle.sha256, 'jsonl')}"
    assert _sha(server.read(BUCKET, key)) == handle.sha256

    # The worker's folder lacks the blob: get_dataset does not fetch, fetch_dataset does.
    seen = worker.get_dataset("acme", handle.id)
    assert seen is not None and not seen.path.exists()
    fetched = worker.fetch_dataset("acme", handle.id)
    assert fetched is not None and fetched.path.is_file()
    assert fetched.path.is_relative_to(tmp_path / "worker-artifacts")
    assert _sha(fetched.path.read_bytes()) == handle.sha256
    assert list(fetched.iter_rows()) == rows
    assert worker.fetch_dataset("other-tenant", handle.id) is None

    # Deleting the last row that uses the blob removes it from S3 too.
    assert api.delete_dataset("acme", handle.id)
    assert not server.keys(BUCKET, key)


def test_gram_cache_entry_written_on_one_machine_is_found_on_another(
    server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    import torch

    settings_a = Settings(data_dir=tmp_path / "a")
    settings_b = Settings(data_dir=tmp_path / "b")
    a = GramCache(settings_a.artifacts_root, artifact_store(settings_a))
    b = GramCache(settings_b.artifacts_root, artifact_store(settings_b))
    key = "k" + "0" * 63
    assert b.lookup(key) is None
    gram = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    with a.writer(key, {"model": "m"}, shards=1) as w:
        w.write_group({"layer.weight": gram.clone()})
        w.commit({"examples": 3})
    remote = server.keys(BUCKET, f"{PREFIX}/grams/{key}/")
    assert f"{PREFIX}/grams/{key}/{META_FILE}" in remote and len(remote) == 3

    found = b.lookup(key)
    assert found == settings_b.artifacts_root / "grams" / key
    local_a = sorted(p.name for p in a.path(key).iterdir())
    assert sorted(p.name for p in found.iterdir()) == local_a
    for name in local_a:
        assert (found / name).read_bytes() == (a.path(key) / name).read_bytes()
    assert b.meta(key)["examples"] == 3
    assert not [p for p in b.root.iterdir() if ".partial" in p.name]


def test_local_store_without_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRUCIBLE_ARTIFACTS_URI", raising=False)
    store = artifact_store(Settings(data_dir=tmp_path))
    assert not store.remote
    src = tmp_path / "x.bin"
    src.write_bytes(b"abc")
    store.put_file(src, "d/x.bin")
    assert (store.root / "d" / "x.bin").read_bytes() == b"abc"
    assert store.list("d") == ["d/x.bin"] and b"".join(store.open_range("d/x.bin", 1)) == b"bc"


# --- end to end: API and worker on different local folders, one S3 bucket ----------------

LABELS = [["pos", "neg"], ["x", "y", "z"]]
NAMES = ["sentiment", "topic"]


class _Split:
    """uvicorn with one data folder, a Celery worker with another: two machines' worth."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        key = Fernet.generate_key().decode()  # both sides must share the secrets key
        base = {**env, "CRUCIBLE_SECRETS_KEY": key}
        self.api = Stack({**base, "CRUCIBLE_DATA_DIR": str(work / "api-data")}, work / "logs")
        self.worker = Stack(
            {**base, "CRUCIBLE_DATA_DIR": str(work / "worker-data")}, work / "logs-worker"
        )

    def start(self) -> None:
        from crucible.cli import worker_argv

        self.api.crucible("keys", "list")  # migrates before two processes start
        self.api._spawn("api", uvicorn_argv(self.api.port))
        self.worker._spawn("worker", worker_argv(concurrency=1, pool="prefork", loglevel="info"))
        self.api.wait_ready()

    def stop(self) -> None:
        self.api.stop()
        self.worker.stop()

    def logs(self) -> str:
        return self.api.logs() + "\n" + self.worker.logs()


@pytest.fixture(scope="module")
def split(server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("split")
    base, experts = make_bert_classifier_family(work / "models", LABELS, seed=5)
    env = {
        **_env(server),
        "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(work / "models")]),
        "HF_HUB_OFFLINE": "1",
    }
    with throwaway_postgres_url() as db_url, private_redis(work / "redis") as redis_url:
        env["CRUCIBLE_DATABASE_URL"] = db_url
        env["CRUCIBLE_BROKER_URL"] = redis_url
        stacks = _Split(work, env)
        stacks.start()
        try:
            key = stacks.api.crucible("keys", "create", "--tenant", "acme").strip()
            with stacks.api.client(key) as client:
                yield {
                    "stacks": stacks,
                    "client": client,
                    "base": base,
                    "experts": experts,
                    "work": work,
                }
        finally:
            stacks.stop()


def _upload(client: Any, name: str, labels: list[str], seed: int) -> dict[str, Any]:
    rows = [
        {"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(tiny_texts(30, seed))
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    resp = client.post(
        "/v1/datasets", files={"file": (f"{name}.jsonl", io.BytesIO(body))}, data={"name": name}
    )
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def _run(split: dict[str, Any], datasets: dict[str, str], output: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "base": {"uri": split["base"].as_uri()},
        "experts": [
            {"uri": d.as_uri(), "name": n, "dataset": datasets[n]}
            for d, n in zip(split["experts"], NAMES, strict=True)
        ],
        "method": {"name": "regmean"},
        "statistics": {"max_samples": 16, "batch_size": 8},
        "output": {"dtype": "float32", **output},
    }
    resp = split["client"].post("/v1/merges", json=spec)
    assert resp.status_code == 202, resp.text
    stacks = split["stacks"]
    job = stacks.api.wait_for_job(split["client"], resp.json()["id"], timeout=400)
    assert job["status"] == "succeeded", json.dumps(job["error"]) + stacks.logs()
    return dict(job)


@pytest.mark.e2e
def test_worker_on_another_machine_and_s3_output(split: dict[str, Any], server: S3Server) -> None:
    client, work = split["client"], split["work"]
    uploaded = {
        n: _upload(client, n, labels, 40 + i)
        for i, (n, labels) in enumerate(zip(NAMES, LABELS, strict=True))
    }
    for d in uploaded.values():  # durable in S3, and only on the API's machine locally
        key = f"{PREFIX}/datasets/{d['sha256']}.jsonl"
        assert _sha(server.read(BUCKET, key)) == d["sha256"]
        assert (work / "api-data" / "artifacts" / "datasets" / f"{d['sha256']}.jsonl").is_file()
        assert not (
            work / "worker-data" / "artifacts" / "datasets" / f"{d['sha256']}.jsonl"
        ).exists()
    ids = {n: d["id"] for n, d in uploaded.items()}
    grams_before = set(server.keys(BUCKET, f"{PREFIX}/grams/"))

    # 1. output local:// — the worker fetched the datasets, cached the Grams in S3, and
    #    stored the output there; the API (which has none of it locally) serves it.
    job = _run(split, ids, {})
    job_id = job["id"]
    assert job["result"]["uri"] == f"local://jobs/{job_id}/output"
    for d in uploaded.values():
        assert (work / "worker-data" / "artifacts" / "datasets" / f"{d['sha256']}.jsonl").is_file()
    new_keys = set(server.keys(BUCKET, f"{PREFIX}/grams/")) - grams_before
    grams = [k for k in new_keys if k.endswith(f"/{META_FILE}")]
    assert len(grams) == 2  # one entry per expert
    files = job["result"]["files"]
    out_prefix = f"{PREFIX}/jobs/{job_id}/output"
    manifest = json.loads(server.read(BUCKET, f"{out_prefix}/{MANIFEST}"))
    assert manifest["files"] == files
    assert not (work / "api-data" / "artifacts" / "jobs" / job_id).exists()
    for f in files:
        resp = client.get(f"/v1/merges/{job_id}/files/{f['path']}")
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["content-length"]) == f["bytes"]
        assert _sha(resp.content) == f["sha256"]
        local = work / "worker-data" / "artifacts" / "jobs" / job_id / "output" / f["path"]
        assert _sha(local.read_bytes()) == f["sha256"]
    assert client.get(f"/v1/merges/{job_id}/files/nope.bin").status_code == 404

    # 2. the same merge to s3://: the objects are the local run's bytes, manifest last.
    job2 = _run(split, ids, {"uri": f"s3://{OUT_BUCKET}/e2e/regmean"})
    assert job2["result"]["uri"] == f"s3://{OUT_BUCKET}/e2e/regmean"
    files2 = job2["result"]["files"]
    keys = server.keys(OUT_BUCKET, "e2e/regmean/")
    assert keys == sorted(
        [f"e2e/regmean/{f['path']}" for f in files2] + [f"e2e/regmean/{MANIFEST}"]
    )
    for f in files2:
        assert _sha(server.read(OUT_BUCKET, f"e2e/regmean/{f['path']}")) == f["sha256"]
    assert json.loads(server.read(OUT_BUCKET, f"e2e/regmean/{MANIFEST}"))["files"] == files2
    # Same inputs, same weights as the local:// job (the card and report carry timings).
    weights = {f["path"]: f["sha256"] for f in files if f["path"].endswith(".safetensors")}
    assert weights and weights == {
        f["path"]: f["sha256"] for f in files2 if f["path"].endswith(".safetensors")
    }
