"""Transient Hub failures are retried (crucible/retry.py), other failures are not, and a file
truncated in transit is downloaded again or fails the job with a clear code.

Real parts only: olah serves tiny GPT-2 repos as the Hub, and tests/support/flaky_proxy.py
(a real HTTP server on loopback) sits between the client and olah, answering 503, cutting
bodies or truncating them behind a matching Content-Length. The first tests call
`resolve_model` in this process; the last ones run whole jobs through uvicorn and a Celery
worker process whose HF_ENDPOINT is the proxy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crucible.errors import CrucibleError
from crucible.pipeline import run_merge_job
from crucible.retry import call_with_retries, is_transient
from crucible.settings import Settings
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.spec import MergeSpec, ModelRef
from tests.support.flaky_proxy import Fault, FlakyProxy
from tests.support.olah import HUB_ENV_REMOVE, OlahServer, hub_env
from tests.support.postgres import throwaway_postgres_url
from tests.support.redis_server import private_redis
from tests.support.reporters import QuietReporter
from tests.support.stack import Stack
from tests.support.tiny_models import make_gpt2_family

WEIGHTS = r"/resolve/[0-9a-f]{40}/model\.safetensors$"
MODEL_INFO_BASE = r"^/api/models/org/base/revision/main$"
STACK_ATTEMPTS = 4
FAST_RETRIES = {
    "CRUCIBLE_RETRY_ATTEMPTS": str(STACK_ATTEMPTS),
    "CRUCIBLE_RETRY_BASE_SECONDS": "0.01",
    "CRUCIBLE_RETRY_MAX_SECONDS": "0.05",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub")
    base_dir, expert_dirs = make_gpt2_family(root / "gpt2", n_experts=3, seed=11)
    with OlahServer(root / "olah") as server:
        commits = {"base": server.add_repo("org/base", base_dir)}
        for i, d in enumerate(expert_dirs):
            commits[f"expert-{i}"] = server.add_repo(f"org/expert-{i}", d)
        yield {"server": server, "base": base_dir, "experts": expert_dirs, "commits": commits}


@pytest.fixture
def proxy(hub: dict[str, Any]) -> Iterator[FlakyProxy]:
    with FlakyProxy(hub["server"].endpoint) as p:
        yield p


@pytest.fixture
def hf_home(proxy: FlakyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Hugging Face cache per test, the process's Hub being the proxy."""
    home = tmp_path / "hf-home"
    for key in HUB_ENV_REMOVE:
        monkeypatch.delenv(key, raising=False)
    for key, value in hub_env(proxy.endpoint, home).items():
        monkeypatch.setenv(key, value)
    return home


class Events:
    """`on_event` for resolve_model: keeps every event."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any] | None]] = []

    def __call__(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.items.append((kind, message, data))

    def retries(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m, d or {}) for k, m, d in self.items if k == "retry"]


def _settings(tmp_path: Path, attempts: int = 4) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        retry_attempts=attempts,
        retry_base_seconds=0.01,
        retry_max_seconds=0.05,
    )


def _resolve(uri: str, settings: Settings, events: Events | None = None) -> ResolvedModel:
    return resolve_model(ModelRef(uri=uri, revision="main"), settings, on_event=events)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the policy


class _Status(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP {code}")
        self.status_code = code


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_Status(503), True),
        (_Status(500), True),
        (_Status(429), True),
        (_Status(404), False),
        (_Status(401), False),
        (_Status(403), False),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ValueError("bad"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_call_with_retries_counts_and_reports(tmp_path: Path) -> None:
    calls: list[int] = []
    reported: list[tuple[int, str, float]] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _Status(503)
        return "ok"

    settings = _settings(tmp_path)
    result = call_with_retries(
        settings, "flaky", flaky, on_retry=lambda a, e, w: reported.append((a, str(e), w))
    )
    assert result == "ok" and len(calls) == 3
    assert [(a, e) for a, e, _ in reported] == [(1, "HTTP 503"), (2, "HTTP 503")]
    assert all(0 <= w <= settings.retry_max_seconds for _, _, w in reported)

    calls.clear()

    def missing() -> str:
        calls.append(1)
        raise _Status(404)

    with pytest.raises(_Status):
        call_with_retries(settings, "missing", missing)
    assert len(calls) == 1  # a 4xx is the caller's mistake: no second try

    calls.clear()

    def down() -> str:
        calls.append(1)
        raise _Status(502)

    with pytest.raises(_Status):
        call_with_retries(settings, "down", down)
    assert len(calls) == settings.retry_attempts


# ----------------------------------------------------------------------------- in process


def test_503_twice_on_model_info_is_retried(
    hub: dict[str, Any], proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    proxy.set_faults([Fault(MODEL_INFO_BASE, "status", times=2, status=503)])
    events = Events()
    model = _resolve("hf://org/base", _settings(tmp_path), events)
    assert model.commit == hub["commits"]["base"]
    assert proxy.count(MODEL_INFO_BASE, "GET") == 3
    retries = events.retries()
    assert [d["attempt"] for _, d in retries] == [1, 2]
    for message, data in retries:
        assert data["call"] == "model_info org/base@main"
        assert data["status"] == 503 and data["error"] == "HfHubHTTPError"
        assert "model_info org/base@main" in message and "HTTP 503" in message
        assert "://" not in message and "127.0.0.1" not in message  # no URL


def test_503_on_a_file_download_is_retried(
    hub: dict[str, Any], proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    proxy.set_faults([Fault(WEIGHTS, "status", times=2, status=503, method="GET")])
    events = Events()
    model = _resolve("hf://org/base", _settings(tmp_path), events)
    weights = model.root / "model.safetensors"
    assert _sha256(weights) == _sha256(hub["base"] / "model.safetensors")
    assert proxy.count(WEIGHTS, "GET") == 3
    calls = [d["call"] for _, d in events.retries()]
    assert calls == [f"download org/base@{hub['commits']['base'][:12]}"] * 2


def test_a_hub_that_stays_down_fails_with_source_unavailable(
    proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    proxy.set_faults([Fault(MODEL_INFO_BASE, "status", times=-1, status=502)])
    events = Events()
    with pytest.raises(CrucibleError) as err:
        _resolve("hf://org/base", _settings(tmp_path, attempts=3), events)
    assert err.value.code == "source_unavailable"
    assert "HTTP 502" in err.value.message and "after 3 attempts" in err.value.message
    assert proxy.count(MODEL_INFO_BASE, "GET") == 3
    assert len(events.retries()) == 2


@pytest.mark.parametrize("status", [404, 401, 403])
def test_other_4xx_are_not_retried(
    status: int, proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    proxy.set_faults([Fault(MODEL_INFO_BASE, "status", times=-1, status=status)])
    events = Events()
    with pytest.raises(CrucibleError) as err:
        _resolve("hf://org/base", _settings(tmp_path), events)
    assert err.value.code == "source_not_found"
    assert proxy.count(MODEL_INFO_BASE, "GET") == 1
    assert events.retries() == []


def test_missing_repo_is_asked_once(proxy: FlakyProxy, hf_home: Path, tmp_path: Path) -> None:
    events = Events()
    with pytest.raises(CrucibleError) as err:
        _resolve("hf://org/nope", _settings(tmp_path), events)
    assert err.value.code == "source_not_found"
    assert proxy.count(r"^/api/models/org/nope/revision/", "GET") == 1  # olah's 401
    assert events.retries() == []


def test_a_body_cut_mid_transfer_is_downloaded_again(
    hub: dict[str, Any], proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    proxy.set_faults([Fault(WEIGHTS, "cut", times=1)])
    model = _resolve("hf://org/base", _settings(tmp_path))
    assert _sha256(model.root / "model.safetensors") == _sha256(hub["base"] / "model.safetensors")
    assert proxy.count(WEIGHTS, "GET") == 2
    assert [s.fault for s in proxy.seen if s.method == "GET" and "safetensors" in s.path] == [
        "cut",
        None,
    ]


def test_a_truncated_file_behind_a_matching_length_fails_the_hash_and_is_retried(
    hub: dict[str, Any], proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    # HEAD and GET both announce half the size: huggingface_hub's own size check passes,
    # only the hash the Hub named the file by (its git blob id) tells.
    proxy.set_faults(
        [Fault(WEIGHTS, "short", times=1, method="HEAD"), Fault(WEIGHTS, "short", times=1)]
    )
    events = Events()
    model = _resolve("hf://org/base", _settings(tmp_path), events)
    assert _sha256(model.root / "model.safetensors") == _sha256(hub["base"] / "model.safetensors")
    assert proxy.count(WEIGHTS, "GET") == 2
    retries = events.retries()
    assert len(retries) == 1
    assert retries[0][1]["error"] == "_HashMismatch"


def test_a_file_that_stays_truncated_fails_naming_it(
    hub: dict[str, Any], proxy: FlakyProxy, hf_home: Path, tmp_path: Path
) -> None:
    proxy.set_faults([Fault(WEIGHTS, "short", times=-1, method=None)])
    events = Events()
    with pytest.raises(CrucibleError) as err:
        _resolve("hf://org/base", _settings(tmp_path, attempts=3), events)
    assert err.value.code == "source_unavailable"
    assert "model.safetensors" in err.value.message
    assert err.value.detail["files"] == ["model.safetensors"]
    assert proxy.count(WEIGHTS, "GET") == 3
    assert len(events.retries()) == 2
    # The truncated copy is not left in the cache for the next job to pick up.
    snapshot = hf_home / "hub" / "models--org--base" / "snapshots" / hub["commits"]["base"]
    assert not (snapshot / "model.safetensors").exists()
    blobs = hf_home / "hub" / "models--org--base" / "blobs"
    assert not (blobs / _git_blob_id(hub["base"] / "model.safetensors")).exists()


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ----------------------------------------------------------------------------- real processes


def _spec(experts: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    return {
        "base": {"uri": "hf://org/base", "revision": "main"},
        "experts": [
            {"uri": f"hf://org/expert-{i}", "revision": "main", "name": f"e{i}"} for i in experts
        ],
        "method": {"name": "task_arithmetic", "params": {"scale": 0.5}},
        "output": {"dtype": "float32"},
    }


def _weight_hashes(files: list[dict[str, Any]]) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in files if f["path"].endswith(".safetensors")}


@pytest.fixture(scope="module")
def direct_hashes(hub: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same merge run in this process straight against olah, no proxy."""
    work = tmp_path_factory.mktemp("direct")
    with pytest.MonkeyPatch.context() as mp:
        for key in HUB_ENV_REMOVE:
            mp.delenv(key, raising=False)
        for key, value in hub_env(hub["server"].endpoint, work / "hf-home").items():
            mp.setenv(key, value)
        outcome = run_merge_job(
            MergeSpec.model_validate(_spec()),
            work / "out",
            Settings(data_dir=work / "data"),
            QuietReporter(),
        )
    return _weight_hashes(outcome.files)


@pytest.fixture(scope="module")
def flaky_stack(
    hub: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, FlakyProxy]]:
    work = tmp_path_factory.mktemp("stack")
    with (
        FlakyProxy(hub["server"].endpoint) as proxy,
        throwaway_postgres_url() as db_url,
        private_redis(work / "redis") as redis_url,
    ):
        env = {
            **hub_env(proxy.endpoint, work / "hf-home"),
            **FAST_RETRIES,
            "CRUCIBLE_DATA_DIR": str(work / "data"),
            "CRUCIBLE_DATABASE_URL": db_url,
            "CRUCIBLE_BROKER_URL": redis_url,
        }
        stack = Stack(env, work / "logs").start()
        try:
            yield stack, proxy
        finally:
            stack.stop()


@pytest.mark.e2e
def test_job_through_a_hub_that_answers_503_twice(
    flaky_stack: tuple[Stack, FlakyProxy], direct_hashes: dict[str, str]
) -> None:
    stack, proxy = flaky_stack
    proxy.set_faults([Fault(MODEL_INFO_BASE, "status", times=2, status=503)])
    key = stack.crucible("keys", "create", "--tenant", "retries").strip()
    with stack.client(key) as client:
        resp = client.post("/v1/merges", json=_spec())
        assert resp.status_code == 202, resp.text
        job = stack.wait_for_job(client, resp.json()["id"])
    assert job["status"] == "succeeded", (job.get("error"), stack.logs())
    assert _weight_hashes(job["result"]["files"]) == direct_hashes
    retries = [e for e in job["events"] if e["kind"] == "retry"]
    assert [e["data"]["attempt"] for e in retries] == [1, 2]
    assert all(e["data"]["call"] == "model_info org/base@main" for e in retries)
    assert all(e["data"]["status"] == 503 for e in retries)
    assert proxy.count(MODEL_INFO_BASE, "GET") == 3
    assert "127.0.0.1" not in json.dumps(retries)  # no URL in the events


@pytest.mark.e2e
def test_job_with_a_file_that_stays_truncated_fails_with_a_clear_code(
    flaky_stack: tuple[Stack, FlakyProxy], hub: dict[str, Any]
) -> None:
    stack, proxy = flaky_stack
    # expert-2: a repo no earlier job downloaded, so the worker's cache does not hold it.
    expert = r"/org/expert-2/resolve/[0-9a-f]{40}/model\.safetensors$"
    proxy.set_faults([Fault(expert, "short", times=-1, method=None)])
    key = stack.crucible("keys", "create", "--tenant", "truncated").strip()
    with stack.client(key) as client:
        resp = client.post("/v1/merges", json=_spec((0, 2)))
        assert resp.status_code == 202, resp.text
        job = stack.wait_for_job(client, resp.json()["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "source_unavailable", job["error"]
    assert "model.safetensors" in job["error"]["message"]
    assert "org/expert-2" in job["error"]["message"]
    assert job["result"] is None
    retries = [e for e in job["events"] if e["kind"] == "retry"]
    assert len(retries) == STACK_ATTEMPTS - 1
    assert all(e["data"]["error"] == "_HashMismatch" for e in retries)
