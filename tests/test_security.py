"""The security suite, end to end on real parts: uvicorn over HTTP, a Celery worker process,
PostgreSQL, a private Redis, olah as the Hub (behind a forwarding proxy thread that records
the Authorization header each Hub request carries), and webhook receivers (HTTP server
threads in this process).

- secrets: a job with a Hub token and a webhook secret, and a job failed on purpose with
  others; then both strings are searched in every API answer about the jobs, the API and
  worker logs (DEBUG), the events, the model card and every output file, every command
  Redis received (MONITOR, message bodies base64-decoded), every database row, and every
  file the run left on disk. jobs.secrets must hold a Fernet token of them.
- webhooks: signature checked with hmac here, 503 twice then 200 is three recorded
  attempts, a redirect to a private address is not followed, the worker runs the
  `crucible.deliver_webhook` task, and SSRF targets are refused at submit.
- tenant isolation by id guessing (jobs, events, trials, files, datasets, cancel, a spec
  naming another tenant's dataset), the file endpoint against traversal and symlinks,
  file:// sources outside the allowed folders, key revocation and rotation.
(Oversized bodies and pickle refusal: tests/test_limits.py and tests/test_pickle.py.)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from celery import Celery
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from tests.support.flaky_proxy import FlakyProxy
from tests.support.olah import OlahServer, hub_env
from tests.support.postgres import throwaway_postgres_url
from tests.support.receiver import WebhookReceiver
from tests.support.redis_server import private_redis
from tests.support.stack import Stack
from tests.support.tiny_models import make_gpt2_family

pytestmark = pytest.mark.e2e

ORG = "secure-org"
TOKEN = "hf_SecurityTestToken_7f3a9c1e5b"
SECRET = "whsec_SecurityTestSecret_42d8e6"
TOKEN_FAILED = "hf_FailedJobToken_0b1c2d3e4f"
SECRET_FAILED = "whsec_FailedJobSecret_9a8b7c"
NEEDLES = (TOKEN, SECRET, TOKEN_FAILED, SECRET_FAILED)


class TokenRecordingProxy(FlakyProxy):
    """FlakyProxy without faults that also records each request's Authorization header:
    the Hub calls must carry the request's token."""

    def start(self) -> TokenRecordingProxy:
        super().start()
        assert self._served is not None
        handler = self._served.server.RequestHandlerClass  # a class of this proxy's own
        seen = self.authorizations = []
        forward = handler._handle  # type: ignore[attr-defined]

        def record_then_forward(h: Any) -> None:
            seen.append(h.headers.get("Authorization"))
            forward(h)

        handler._handle = record_then_forward  # type: ignore[attr-defined]
        return self


class RedisMonitor:
    """Every command the broker receives, from before the first submit to the end (raw
    MONITOR lines, unparsed, on a connection of its own)."""

    def __init__(self, url: str) -> None:
        self.lines: list[str] = []
        self.error: BaseException | None = None
        client = redis.Redis.from_url(url, socket_timeout=None)
        self._conn = client.connection_pool.make_connection()
        self._conn.connect()
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() in (b"OK", "OK")
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            try:
                line = self._conn.read_response()
            except redis.TimeoutError:
                continue  # a quiet broker: keep listening
            except Exception as exc:  # closed by stop(), or a real failure (kept)
                if not self._stopped:
                    self.error = exc
                return
            self.lines.append(
                line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
            )

    def stop(self) -> None:
        self._stopped = True
        self._conn.disconnect()
        self._thread.join(timeout=10)

    def corpus(self) -> str:
        """The commands, plus every base64 run in them decoded (kombu base64-encodes
        message bodies), so a secret inside a task message cannot hide."""
        out = list(self.lines)
        for line in self.lines:
            for run in re.findall(r"[A-Za-z0-9+/=_-]{16,}", line):
                for decode in (base64.b64decode, base64.urlsafe_b64decode):
                    with contextlib.suppress(binascii.Error, ValueError):
                        out.append(decode(run + "=" * (-len(run) % 4)).decode("utf-8", "replace"))
        return "\n".join(out)


class DebugStack(Stack):
    """The service's processes with every log at DEBUG."""

    def start(self, log_level: str | None = "debug") -> DebugStack:
        super().start(log_level)
        return self


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("security")
    base_dir, expert_dirs = make_gpt2_family(root / "hubsrc", n_experts=2, seed=11)
    # file:// sources: an allowed folder with a real model, and one outside it.
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copytree(base_dir, allowed / "base")
    shutil.copytree(expert_dirs[0], allowed / "expert")
    outside = root / "outside"
    outside.mkdir()
    shutil.copytree(base_dir, outside / "secret-model")
    (allowed / "link-out").symlink_to(outside / "secret-model")  # a folder link out
    leaky = allowed / "leaky"  # a folder inside whose weights link out
    leaky.mkdir()
    (leaky / "config.json").write_text((base_dir / "config.json").read_text())
    (leaky / "model.safetensors").symlink_to(outside / "secret-model" / "model.safetensors")

    work = root / "work"
    with (
        OlahServer(root / "olah") as hub,
        TokenRecordingProxy(hub.endpoint) as proxy,
        throwaway_postgres_url() as db_url,
        private_redis(work / "redis") as redis_url,
    ):
        hub.add_repo(f"{ORG}/base", base_dir)
        for i, d in enumerate(expert_dirs):
            hub.add_repo(f"{ORG}/expert-{i}", d)
        key = Fernet.generate_key().decode()
        env = {
            **hub_env(proxy.endpoint, work / "hf-home"),
            "CRUCIBLE_DATA_DIR": str(work / "data"),
            "CRUCIBLE_DATABASE_URL": db_url,
            "CRUCIBLE_BROKER_URL": redis_url,
            "CRUCIBLE_SECRETS_KEY": key,
            "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(allowed)]),
            # Allowed by name only: 127.0.0.1 itself and other names for it stay refused.
            "CRUCIBLE_WEBHOOK_ALLOWED_HOSTS": json.dumps(["localhost"]),
            "CRUCIBLE_RETRY_BASE_SECONDS": "0.1",
            "CRUCIBLE_RETRY_MAX_SECONDS": "0.5",
            "CRUCIBLE_LOG_LEVEL": "DEBUG",
        }
        monitor = RedisMonitor(redis_url)
        stack = DebugStack(env, work / "logs").start()
        try:
            keys = {
                t: stack.crucible("keys", "create", "--tenant", t).strip()
                for t in ("acme", "globex")
            }
            yield {
                "stack": stack,
                "keys": keys,
                "proxy": proxy,
                "monitor": monitor,
                "db_url": db_url,
                "redis_url": redis_url,
                "secrets_key": key,
                "work": work,
                "allowed": allowed,
                "outside": outside,
            }
        finally:
            stack.stop()
            monitor.stop()


def _client(world: dict[str, Any], tenant: str = "acme") -> httpx.Client:
    return world["stack"].client(world["keys"][tenant])


def _spec(base: str = "base", **extra: Any) -> dict[str, Any]:
    return {
        "base": {"uri": f"hf://{ORG}/{base}", "revision": "main"},
        "experts": [
            {"uri": f"hf://{ORG}/expert-{i}", "revision": "main", "name": f"e{i}"} for i in range(2)
        ],
        "method": {"name": "task_arithmetic", "params": {"scale": 0.5}},
        "output": {"dtype": "float32"},
        **extra,
    }


def _local_spec(base: str, expert: str) -> dict[str, Any]:
    return {
        "base": {"uri": base},
        "experts": [{"uri": expert}],
        "method": {"name": "linear"},
    }


def _wait_deliveries(client: httpx.Client, job_id: str, n: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/merges/{job_id}").json()
        if len(job["deliveries"]) >= n or time.monotonic() > deadline:
            return job
        time.sleep(0.25)


def _verify_signature(headers: dict[str, str], body: bytes, secret: str) -> None:
    """Written from the documented scheme: HMAC-SHA256(secret, timestamp + "." + body)."""
    timestamp = headers["X-Crucible-Timestamp"]
    assert abs(time.time() - int(timestamp)) < 600
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    assert hmac.compare_digest(headers["X-Crucible-Signature"], f"sha256={mac.hexdigest()}")


def _full_logs(world: dict[str, Any]) -> str:
    """The API's and the worker's whole log files (Stack.logs() keeps only their tails)."""
    return "\n".join(p.read_text(errors="replace") for p in (world["work"] / "logs").glob("*.log"))


def _assert_clean(where: str, blob: str | bytes) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for needle in NEEDLES:
        assert needle.encode() not in data, f"{needle[:8]}... found in {where}"


# ----------------------------------------------------------------------------- secrets


def test_secrets_never_leak(world: dict[str, Any]) -> None:
    stack: Stack = world["stack"]
    answers: list[tuple[str, bytes]] = []  # every API answer about the two jobs

    def keep(what: str, resp: httpx.Response) -> httpx.Response:
        answers.append((what, resp.content))
        return resp

    with (
        _client(world) as client,
        WebhookReceiver([503, 503, 200], host="localhost") as hook,
        WebhookReceiver([200], host="localhost") as hook_failed,
    ):
        assert hook.url.startswith("http://localhost:")
        body = _spec(hub_token=TOKEN, webhook={"url": hook.url, "secret": SECRET})
        resp = keep("submit", client.post("/v1/merges", json=body))
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        failing = _spec(
            base="no-such-base",
            hub_token=TOKEN_FAILED,
            webhook={"url": hook_failed.url, "secret": SECRET_FAILED},
        )
        resp = keep("submit failing", client.post("/v1/merges", json=failing))
        assert resp.status_code == 202, resp.text
        failed_id = resp.json()["id"]

        job = stack.wait_for_job(client, job_id)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        failed = stack.wait_for_job(client, failed_id)
        assert failed["status"] == "failed" and failed["error"]["code"] == "source_not_found"
        assert "no-such-base" in failed["error"]["message"]

        # The token reached the Hub: every Hub request through the proxy carried one of the
        # two tokens as a Bearer credential, both tokens were used.
        auths = world["proxy"].authorizations
        assert f"Bearer {TOKEN}" in auths and f"Bearer {TOKEN_FAILED}" in auths
        assert set(auths) <= {f"Bearer {TOKEN}", f"Bearer {TOKEN_FAILED}"}, set(auths)

        # The webhook: three attempts (503, 503, 200), each signed with the job's secret.
        job = _wait_deliveries(client, job_id, 3)
        assert [(d["attempt"], d["status_code"]) for d in job["deliveries"]] == [
            (1, 503),
            (2, 503),
            (3, 200),
        ]
        assert len(hook.deliveries) == 3
        for got in hook.deliveries:
            _verify_signature(got.headers, got.body, SECRET)
            assert got.headers["X-Crucible-Event"] == "job.succeeded"
        sent = json.loads(hook.deliveries[-1].body)
        assert sent["id"] == job_id and sent["status"] == "succeeded"
        assert sent["spec"]["hub_token"] == "***" and sent["spec"]["webhook"]["secret"] == "***"
        assert [e["message"] for e in job["events"] if e["kind"] == "webhook"][-1] == (
            "webhook delivery attempt 3: HTTP 200"
        )
        failed = _wait_deliveries(client, failed_id, 1)
        assert [d["status_code"] for d in failed["deliveries"]] == [200]
        (got,) = hook_failed.deliveries
        _verify_signature(got.headers, got.body, SECRET_FAILED)
        assert json.loads(got.body)["error"]["code"] == "source_not_found"

        # The worker runs the delivery task the API sends for jobs it finishes itself. This
        # job's webhook was delivered (the outbox never sends it again): make it owed, as
        # the API leaves a job it cancelled while queued.
        engine = create_engine(world["db_url"])
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE jobs SET webhook_state = 'pending', webhook_claim = NULL, "
                    "webhook_claimed_at = NULL WHERE id = :id"
                ),
                {"id": job_id},
            )
        engine.dispose()
        sender = Celery(broker=world["redis_url"])
        sender.send_task("crucible.deliver_webhook", args=[job_id], queue="gpu")
        assert len(hook.wait_for(4)) == 4
        _verify_signature(hook.deliveries[3].headers, hook.deliveries[3].body, SECRET)

        # Every endpoint about the jobs.
        for jid in (job_id, failed_id):
            keep("get", client.get(f"/v1/merges/{jid}"))
            keep("trials", client.get(f"/v1/merges/{jid}/trials"))
            keep("events", client.get(f"/v1/merges/{jid}/events", timeout=60))
            keep("cancel", client.post(f"/v1/merges/{jid}/cancel"))
        keep("list", client.get("/v1/merges"))
        job = client.get(f"/v1/merges/{job_id}").json()
        for entry in job["result"]["files"]:
            resp = keep(entry["path"], client.get(f"/v1/merges/{job_id}/files/{entry['path']}"))
            assert resp.status_code == 200
            assert hashlib.sha256(resp.content).hexdigest() == entry["sha256"]
        assert {f["path"] for f in job["result"]["files"]} >= {"README.md", "model.safetensors"}
        assert any(b"task_arithmetic" in c for w, c in answers if w == "README.md")
        for hook_delivery in [*hook.deliveries, *hook_failed.deliveries]:
            answers.append(("webhook body", hook_delivery.body))
            answers.append(("webhook headers", json.dumps(hook_delivery.headers).encode()))
    for what, content in answers:
        _assert_clean(f"API answer {what}", content)
    assert any(job_id.encode() in c for _, c in answers)  # the search looks at real data

    # Logs at DEBUG, and every file the run left (data dir, Hub cache, logs, Redis dir).
    logs = _full_logs(world)
    assert job_id in logs and "debug" in logs.lower()
    files = [p for p in world["work"].rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "README.md" for p in files)
    for path in files:
        _assert_clean(str(path), path.read_bytes())

    # The broker: every command Redis received, message bodies decoded.
    time.sleep(0.5)
    monitor = world["monitor"]
    assert monitor.error is None, monitor.error
    corpus = monitor.corpus()
    assert job_id in corpus and "crucible.run_merge" in corpus, (
        len(monitor.lines),
        monitor._thread.is_alive(),
        monitor.lines[:5],
    )
    _assert_clean("Redis commands", corpus)

    # The database: every row of every table; jobs.secrets is ciphertext of the secrets.
    engine = create_engine(world["db_url"])
    with engine.connect() as conn:
        tables = conn.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema='public'")
        ).scalars()
        dump = "\n".join(
            repr(row) for t in list(tables) for row in conn.execute(text(f'SELECT * FROM "{t}"'))
        )
        stored = conn.execute(
            text("SELECT secrets FROM jobs WHERE id = :id"), {"id": job_id}
        ).scalar_one()
    engine.dispose()
    assert job_id in dump and "webhook delivery attempt 3" in dump
    _assert_clean("database rows", dump)
    clear = json.loads(Fernet(world["secrets_key"].encode()).decrypt(stored.encode()))
    assert clear == {"hub_token": TOKEN, "webhook_secret": SECRET}


# ----------------------------------------------------------------------------- webhooks


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/h",  # loopback, not allowed (only the name localhost is)
        "http://vm/h",  # another name that resolves to loopback (/etc/hosts)
        "http://10.0.0.8/h",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/h",
        "http://user:pass@localhost:8080/h",
    ],
)
def test_ssrf_webhook_targets_are_refused(world: dict[str, Any], url: str) -> None:
    with _client(world) as client:
        resp = client.post("/v1/merges", json=_spec(webhook={"url": url, "secret": SECRET}))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] in ("webhook_url_forbidden", "invalid_request"), error
    assert "webhook" in json.dumps(error)
    _assert_clean("422 answer", resp.content)


def test_redirect_to_a_private_address_is_not_followed(world: dict[str, Any]) -> None:
    with (
        WebhookReceiver([200], host="127.0.0.2") as private,
        WebhookReceiver([307], redirect_to=private.url, host="localhost") as hook,
        _client(world) as client,
    ):
        body = _spec(base="missing-base", webhook={"url": hook.url, "secret": SECRET})
        resp = client.post("/v1/merges", json=body)
        assert resp.status_code == 202, resp.text
        job = world["stack"].wait_for_job(client, resp.json()["id"])
        job = _wait_deliveries(client, job["id"], 1)
        time.sleep(1.0)  # a follow-up request, if any, would arrive now
        assert [(d["attempt"], d["status_code"]) for d in job["deliveries"]] == [(1, 307)]
        assert len(hook.deliveries) == 1 and private.deliveries == []


# ----------------------------------------------------------------------------- tenants


def _upload_dataset(client: httpx.Client) -> str:
    rows = "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(8))
    resp = client.post(
        "/v1/datasets", files={"file": ("rows.jsonl", rows.encode(), "application/jsonl")}
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def test_tenant_isolation_by_id_guessing(world: dict[str, Any]) -> None:
    stack: Stack = world["stack"]
    with _client(world, "acme") as acme, _client(world, "globex") as globex:
        resp = acme.post("/v1/merges", json=_spec())
        job = stack.wait_for_job(acme, resp.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        job_id, path = job["id"], job["result"]["files"][0]["path"]
        dataset = _upload_dataset(acme)
        assert acme.get(f"/v1/merges/{job_id}/files/{path}").status_code == 200

        for method, url in [
            ("GET", f"/v1/merges/{job_id}"),
            ("GET", f"/v1/merges/{job_id}/events"),
            ("GET", f"/v1/merges/{job_id}/trials"),
            ("GET", f"/v1/merges/{job_id}/files/{path}"),
            ("POST", f"/v1/merges/{job_id}/cancel"),
            ("GET", f"/v1/datasets/{dataset}"),
            ("DELETE", f"/v1/datasets/{dataset}"),
        ]:
            resp = globex.request(method, url)
            assert resp.status_code == 404, (method, url, resp.text)
            assert resp.json()["error"]["code"] == "not_found", (url, resp.text)
            assert b"succeeded" not in resp.content and b"rows.jsonl" not in resp.content
        assert job_id not in globex.get("/v1/merges").text
        assert dataset not in globex.get("/v1/datasets").text
        spec = _spec()
        spec["experts"][0]["dataset"] = dataset
        resp = globex.post("/v1/merges", json=spec)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "dataset_not_found"
        # Still there for its owner.
        assert acme.get(f"/v1/datasets/{dataset}").status_code == 200

        # The file endpoint: traversal in every spelling, absolute paths, symlinks out.
        out = world["work"] / "data" / "artifacts" / "jobs" / job_id / "output"
        assert (out / path).is_file()
        (out / "escape").symlink_to("/etc/passwd")
        for bad in [
            "../../../../../../etc/passwd",
            "..%2f..%2f..%2f..%2fetc%2fpasswd",
            "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            "%2Fetc%2Fpasswd",
            "/etc/passwd",
            "escape",
            f"{path}/../../output/{path}",
        ]:
            resp = acme.get(f"/v1/merges/{job_id}/files/{bad}")
            assert resp.status_code == 404, (bad, resp.status_code)
            assert b"root:" not in resp.content
        # A listed file replaced by a symlink out of the output is refused too.
        listed = out / "config.json"
        listed.unlink()
        listed.symlink_to("/etc/passwd")
        resp = acme.get(f"/v1/merges/{job_id}/files/config.json")
        assert resp.status_code == 404 and b"root:" not in resp.content


def test_file_sources_stay_inside_the_allowed_folders(world: dict[str, Any]) -> None:
    allowed, outside = world["allowed"], world["outside"]
    expert = (allowed / "expert").as_uri()
    with _client(world) as client:
        for base in [
            (outside / "secret-model").as_uri(),
            f"file://{allowed}/../outside/secret-model",
            (allowed / "link-out").as_uri(),
            "file:///etc",
        ]:
            resp = client.post("/v1/merges", json=_local_spec(base, expert))
            assert resp.status_code in (403, 422), (base, resp.text)
            assert resp.json()["error"]["code"] in ("local_path_forbidden", "invalid_request")
        # Allowed folder, but its weights link out: refused when the worker looks.
        resp = client.post("/v1/merges", json=_local_spec((allowed / "leaky").as_uri(), expert))
        assert resp.status_code == 202, resp.text
        job = world["stack"].wait_for_job(client, resp.json()["id"])
        assert job["status"] == "failed"
        assert job["error"]["code"] == "local_path_forbidden", job["error"]
        # And a clean local merge still works.
        resp = client.post("/v1/merges", json=_local_spec((allowed / "base").as_uri(), expert))
        job = world["stack"].wait_for_job(client, resp.json()["id"])
        assert job["status"] == "succeeded", job["error"]


# ----------------------------------------------------------------------------- keys


def _key_id(plaintext: str) -> str:
    return plaintext.split("_")[1]


def test_revoked_key_is_refused_at_once_and_rotation(world: dict[str, Any]) -> None:
    stack: Stack = world["stack"]
    key = stack.crucible("keys", "create", "--tenant", "acme").strip()
    with stack.client(key) as client:
        assert client.get("/v1/merges").status_code == 200
        stack.crucible("keys", "revoke", _key_id(key))
        resp = client.get("/v1/merges")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"

    old = stack.crucible("keys", "create", "--tenant", "acme", "--label", "ci").strip()
    with stack.client(old) as client:
        assert client.get("/v1/merges").status_code == 200
    new = stack.crucible("keys", "rotate", _key_id(old)).strip()
    assert new.startswith("crk_") and new != old
    with stack.client(old) as client:
        assert client.get("/v1/merges").status_code == 401
    with stack.client(new) as client:
        assert client.get("/v1/merges").status_code == 200
    listed = [json.loads(line) for line in stack.crucible("keys", "list").splitlines()]
    by_id = {k["id"]: k for k in listed}
    assert by_id[_key_id(old)]["revoked_at"] is not None
    assert by_id[_key_id(new)]["revoked_at"] is None and by_id[_key_id(new)]["label"] == "ci"
    # Rotating a revoked key is refused; keys never appear in the logs.
    with pytest.raises(RuntimeError, match="no active key"):
        stack.crucible("keys", "rotate", _key_id(old))
    logs = _full_logs(world)
    for plaintext in (key, old, new):
        assert plaintext.split("_", 2)[2] not in logs
