"""Webhooks and secrets at rest, in process: the URL policy (SSRF), delivery to a real HTTP
receiver thread (signature, retries, redirects, recorded attempts) from a real job store,
Fernet encryption of request secrets, and the submit/cancel routes of the API.

The only stand-in is the DNS resolver in the rebinding tests (a name that resolves to a
checked address, then to another): no real DNS server can be scripted here.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import ssl
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from crucible.errors import CrucibleError
from crucible.secrets import (
    JobSecrets,
    SecretsKeyError,
    check_secrets_key,
    decrypt_secrets,
    encrypt_secrets,
    load_job_secrets,
)
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.store import JobStore
from crucible.webhook_url import resolve_target
from crucible.webhooks import _post, deliver
from service.app import create_app
from tests.support.memory_broker import drain_tasks
from tests.support.receiver import WebhookReceiver

SECRET = "whsec-0123456789abcdef-test"
TOKEN = "hf_unitTestToken0123456789"
SPEC: dict[str, Any] = {
    "base": {"uri": "hf://org/base", "revision": "main"},
    "experts": [{"uri": "hf://org/a"}],
    "method": {"name": "linear"},
}


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "retry_attempts": 4,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "webhook_timeout_seconds": 5.0,
        "webhook_allowed_hosts": ["127.0.0.1/32"],
    }
    return Settings(**{**base, **kw})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "artifacts")
    s.migrate()
    yield s
    s.close()


def _finished_job(store: JobStore, settings: Settings, url: str, status: str = "succeeded") -> str:
    spec = MergeSpec.model_validate(
        {**SPEC, "hub_token": TOKEN, "webhook": {"url": url, "secret": SECRET}}
    )
    job, _ = store.create_job("acme", spec.model_dump(mode="json"), spec.digest(), None)
    store.set_job_secrets(job.id, encrypt_secrets(JobSecrets.from_spec(spec), settings))
    if status == "succeeded":
        store.finish(job.id, "succeeded", result={"uri": "local://x", "files": []})
    else:
        store.finish(job.id, status, error={"code": "cancelled", "message": "stopped"})
    return job.id


def _verify(headers: dict[str, str], body: bytes, secret: str = SECRET) -> None:
    """The receiver's side, written from the documented scheme, not from crucible's code."""
    timestamp = headers["X-Crucible-Timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(headers["X-Crucible-Signature"], "sha256=" + expected.hexdigest())


# ----------------------------------------------------------------------------- URL policy


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "http://100.64.0.1/hook",  # carrier-grade NAT
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",  # multicast
        "http://localhost/hook",  # a name that resolves to loopback (real resolver)
    ],
)
def test_private_targets_are_refused(url: str) -> None:
    with pytest.raises(CrucibleError) as err:
        resolve_target(url, [])
    assert err.value.code == "webhook_url_forbidden"
    assert "public addresses only" in err.value.message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:pass@example.com/hook", "credentials"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http:///hook", "no host"),
        ("https://example.com:99999/hook", "malformed"),
    ],
)
def test_malformed_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(CrucibleError) as err:
        resolve_target(url, [])
    assert why in err.value.message


def test_allow_list_by_cidr_and_by_name() -> None:
    target = resolve_target("http://127.0.0.1:8123/a/b?x=1", ["127.0.0.0/8"])
    assert (target.ip, target.port, target.target) == ("127.0.0.1", 8123, "/a/b?x=1")
    target = resolve_target(
        "http://hooks.internal:81/h", ["hooks.internal"], lambda h, p: ["10.0.0.7"]
    )
    assert target.ip == "10.0.0.7" and target.host_header == "hooks.internal:81"
    # A public literal needs no allow-list.
    assert resolve_target("https://8.8.8.8/h", []).connect_url == "https://8.8.8.8:443/h"


def test_a_name_with_one_private_address_is_refused() -> None:
    with pytest.raises(CrucibleError) as err:
        resolve_target("https://mixed.example/h", [], lambda h, p: ["8.8.8.8", "10.0.0.1"])
    assert err.value.detail["address"] == "10.0.0.1"


# ----------------------------------------------------------------------------- delivery


def test_delivery_is_signed_and_recorded(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with WebhookReceiver([200]) as hook:
        job_id = _finished_job(store, settings, hook.url + "?tag=1")
        assert deliver(store, job_id, settings) is True
        (got,) = hook.deliveries
    assert got.path == "/hook?tag=1"
    assert got.headers["X-Crucible-Event"] == "job.succeeded"
    assert got.headers["X-Crucible-Job"] == job_id
    _verify(got.headers, got.body)
    body = json.loads(got.body)
    assert body["id"] == job_id and body["status"] == "succeeded"
    assert body["spec"]["webhook"]["secret"] == "***" and body["spec"]["hub_token"] == "***"
    assert "events" not in body and "deliveries" not in body
    assert SECRET.encode() not in got.body and TOKEN.encode() not in got.body
    # A signature made with another secret does not verify.
    with pytest.raises(AssertionError):
        _verify(got.headers, got.body, secret="another-secret-0123456789")
    job = store.get_job(job_id)
    assert job is not None
    assert [(d.attempt, d.status_code, d.error) for d in job.deliveries] == [(1, 200, None)]
    assert [e.message for e in job.events if e.kind == "webhook"] == [
        "webhook delivery attempt 1: HTTP 200"
    ]


def test_503_twice_then_200_is_three_attempts(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with WebhookReceiver([503, 503, 200]) as hook:
        job_id = _finished_job(store, settings, hook.url, status="cancelled")
        assert deliver(store, job_id, settings) is True
        assert len(hook.deliveries) == 3
        for got in hook.deliveries:
            _verify(got.headers, got.body)
            assert got.headers["X-Crucible-Event"] == "job.cancelled"
        assert len({d.body for d in hook.deliveries}) == 1  # same body every time
    job = store.get_job(job_id)
    assert job is not None
    assert [(d.attempt, d.status_code) for d in job.deliveries] == [(1, 503), (2, 503), (3, 200)]


def test_client_errors_are_not_retried_and_all_failures_end(
    store: JobStore, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    with WebhookReceiver([404]) as hook:
        job_id = _finished_job(store, settings, hook.url)
        assert deliver(store, job_id, settings) is False
        assert len(hook.deliveries) == 1
    with WebhookReceiver([500]) as hook:
        job_id = _finished_job(store, settings, hook.url)
        assert deliver(store, job_id, settings) is False
        assert len(hook.deliveries) == settings.retry_attempts
    job = store.get_job(job_id)
    assert job is not None
    assert [d.status_code for d in job.deliveries] == [500] * settings.retry_attempts
    assert job.events[-1].kind == "webhook_failed"


def test_redirects_are_not_followed(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with WebhookReceiver([200]) as inner, WebhookReceiver([302], redirect_to=inner.url) as hook:
        job_id = _finished_job(store, settings, hook.url)
        assert deliver(store, job_id, settings) is False
        assert len(hook.deliveries) == 1 and inner.deliveries == []
    job = store.get_job(job_id)
    assert job is not None and [d.status_code for d in job.deliveries] == [302]


def test_connection_refused_is_retried_and_recorded(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path, retry_attempts=2)
    with WebhookReceiver() as hook:
        url = hook.url
    job_id = _finished_job(store, settings, url)  # nobody listens there any more
    assert deliver(store, job_id, settings) is False
    job = store.get_job(job_id)
    assert job is not None
    assert [(d.attempt, d.status_code) for d in job.deliveries] == [(1, None), (2, None)]
    assert all(d.error and "ConnectError" in d.error for d in job.deliveries)


def test_url_is_checked_again_at_delivery(store: JobStore, tmp_path: Path) -> None:
    """Allowed at submit, no longer allowed when the job ends: nothing is sent."""
    settings = _settings(tmp_path)
    with WebhookReceiver() as hook:
        job_id = _finished_job(store, settings, hook.url)
        assert deliver(store, job_id, _settings(tmp_path, webhook_allowed_hosts=[])) is False
        assert hook.deliveries == []
    job = store.get_job(job_id)
    assert job is not None and len(job.deliveries) == 1
    assert job.deliveries[0].error and "webhook_url_forbidden" in job.deliveries[0].error


def test_delivery_connects_to_the_checked_address(store: JobStore, tmp_path: Path) -> None:
    """The name is resolved once per attempt, checked, and that address is connected to
    (the name itself resolves nowhere real), with the URL's Host header."""
    settings = _settings(tmp_path, webhook_allowed_hosts=["hooks.test"])
    answers: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        answers.append(host)
        return ["127.0.0.1"]

    with WebhookReceiver() as hook:
        job_id = _finished_job(store, settings, f"http://hooks.test:{hook.port}/in")
        assert deliver(store, job_id, settings, resolver=resolver) is True
        (got,) = hook.deliveries
    assert answers == ["hooks.test"]
    assert got.headers["Host"] == f"hooks.test:{hook.port}"


def test_rebinding_to_a_private_address_is_refused(store: JobStore, tmp_path: Path) -> None:
    """A name that was public at submit and resolves to the metadata address at delivery."""
    settings = _settings(tmp_path)
    with WebhookReceiver() as hook:
        job_id = _finished_job(store, settings, hook.url)
    store_job = store.get_job(job_id)
    assert store_job is not None
    spec = dict(store_job.spec)
    calls = iter([["169.254.169.254"]])
    with store._tx(write=True) as session:  # the spec as a submit with a public name made it
        from sqlalchemy import update

        from crucible.store.models import JobRow

        spec["webhook"] = {"url": "http://rebind.example/h", "secret": "***"}
        session.execute(update(JobRow).where(JobRow.id == job_id).values(spec=spec))
    assert deliver(store, job_id, settings, resolver=lambda h, p: next(calls)) is False
    job = store.get_job(job_id)
    assert job is not None and "169.254.169.254" in (job.deliveries[0].error or "")


def test_no_webhook_or_not_terminal_is_nothing_to_do(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    spec = MergeSpec.model_validate(SPEC)
    job, _ = store.create_job("acme", spec.model_dump(mode="json"), spec.digest(), None)
    assert deliver(store, job.id, settings) is None  # queued, no webhook
    store.finish(job.id, "succeeded", result={"uri": "local://x"})
    assert deliver(store, job.id, settings) is None
    assert deliver(store, "job_missing", settings) is None


# ----------------------------------------------------------------------------- secrets


def test_secrets_round_trip_and_embedded_key_file(store: JobStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    secrets = JobSecrets(hub_token=TOKEN, webhook_secret=SECRET)
    assert TOKEN not in repr(secrets) and SECRET not in str(secrets)
    ciphertext = encrypt_secrets(secrets, settings)
    assert ciphertext is not None and TOKEN not in ciphertext and SECRET not in ciphertext
    key_file = settings.data_root / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    assert decrypt_secrets(ciphertext, settings) == secrets
    assert key_file.read_bytes() == key  # created once
    # Independent check: it is a Fernet token under that key.
    doc = json.loads(Fernet(key).decrypt(ciphertext.encode()))
    assert doc == {"hub_token": TOKEN, "webhook_secret": SECRET}
    assert encrypt_secrets(JobSecrets(), settings) is None
    job_id = _finished_job(store, settings, "http://127.0.0.1:9/h")
    assert load_job_secrets(store, job_id, settings) == JobSecrets(TOKEN, SECRET)


def test_key_rotation_and_wrong_key(tmp_path: Path) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    ciphertext = encrypt_secrets(JobSecrets(hub_token=TOKEN), _settings(tmp_path, secrets_key=old))
    rotated = _settings(tmp_path, secrets_key=f"{new},{old}")
    assert decrypt_secrets(ciphertext, rotated).hub_token == TOKEN
    with pytest.raises(CrucibleError) as err:
        decrypt_secrets(ciphertext, _settings(tmp_path, secrets_key=new))
    assert err.value.code == "secrets_unreadable" and TOKEN not in err.value.message


def test_production_mode_needs_a_key(tmp_path: Path) -> None:
    pg = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    with pytest.raises(SecretsKeyError, match="CRUCIBLE_SECRETS_KEY is not set"):
        check_secrets_key(_settings(tmp_path, database_url=pg))
    with pytest.raises(SecretsKeyError, match="malformed"):
        check_secrets_key(_settings(tmp_path, database_url=pg, secrets_key="not-a-key"))
    with pytest.raises(SecretsKeyError):
        create_app(_settings(tmp_path, database_url=pg))
    check_secrets_key(
        _settings(tmp_path, database_url=pg, secrets_key=Fernet.generate_key().decode())
    )
    check_secrets_key(_settings(tmp_path))  # embedded: generated on first use
    assert not (tmp_path / "data" / "secrets.key").exists()


# ----------------------------------------------------------------------------- API


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    settings = _settings(tmp_path, broker_url="memory://")
    with TestClient(create_app(settings)) as client:
        yield client


def _key(api: TestClient, tenant: str = "acme") -> dict[str, str]:
    store = api.app.state.store  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {store.create_api_key(tenant)[1]}"}


def test_submit_splits_secrets_out_of_the_spec(api: TestClient) -> None:
    auth = _key(api)
    body = {
        **SPEC,
        "hub_token": TOKEN,
        "webhook": {"url": "http://127.0.0.1:9/h", "secret": SECRET},
    }
    resp = api.post("/v1/merges", json=body, headers=auth)
    assert resp.status_code == 202, resp.text
    assert TOKEN not in resp.text and SECRET not in resp.text
    job = resp.json()
    assert job["spec"]["hub_token"] == "***" and job["spec"]["webhook"]["secret"] == "***"
    assert job["deliveries"] == []
    store: JobStore = api.app.state.store  # type: ignore[attr-defined]
    ciphertext = store.get_job_secrets(job["id"])
    assert ciphertext and TOKEN not in ciphertext
    settings = api.app.state.settings  # type: ignore[attr-defined]
    assert decrypt_secrets(ciphertext, settings) == JobSecrets(TOKEN, SECRET)
    # Same spec, another token, same Idempotency-Key: the existing job, its secrets kept.
    first = api.post("/v1/merges", json=body, headers={**auth, "Idempotency-Key": "k1"})
    again = {**body, "hub_token": "hf_anotherToken"}
    second = api.post("/v1/merges", json=again, headers={**auth, "Idempotency-Key": "k1"})
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json()["id"] == first.json()["id"]
    assert decrypt_secrets(store.get_job_secrets(first.json()["id"]), settings).hub_token == TOKEN


@pytest.mark.parametrize(
    ("webhook", "status", "code"),
    [
        ({"url": "http://10.0.0.1/h", "secret": SECRET}, 422, "webhook_url_forbidden"),
        ({"url": "http://169.254.169.254/", "secret": SECRET}, 422, "webhook_url_forbidden"),
        ({"url": "http://[::1]/h", "secret": SECRET}, 422, "webhook_url_forbidden"),
        ({"url": "http://127.0.0.2:8080/h", "secret": SECRET}, 422, "webhook_url_forbidden"),
        ({"url": "http://u:p@127.0.0.1/h", "secret": SECRET}, 422, "invalid_request"),
        ({"url": "gopher://127.0.0.1/h", "secret": SECRET}, 422, "invalid_request"),
        ({"url": "http://127.0.0.1/h", "secret": "short"}, 422, "invalid_request"),
        ({"url": "http://127.0.0.1/h"}, 422, "invalid_request"),
        ({"url": "http://127.0.0.1/h", "secret": "***"}, 422, "invalid_spec"),
    ],
)
def test_submit_refuses_bad_webhooks(
    api: TestClient, webhook: dict[str, str], status: int, code: str
) -> None:
    resp = api.post("/v1/merges", json={**SPEC, "webhook": webhook}, headers=_key(api))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert SECRET not in resp.text


def test_redaction_marker_is_not_a_token(api: TestClient) -> None:
    resp = api.post("/v1/merges", json={**SPEC, "hub_token": "***"}, headers=_key(api))
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_spec"


def _sent_tasks(api: TestClient) -> list[tuple[str, list[Any]]]:
    """(task name, args) of the tasks the API sent; no message carries the secret."""
    tasks = drain_tasks(api)
    for _, body in tasks:
        assert SECRET not in json.dumps(body)
    return [(name, body[0]) for name, body in tasks]


def test_cancel_of_a_queued_job_sends_the_webhook_task(api: TestClient) -> None:
    auth = _key(api)
    _sent_tasks(api)
    body = {**SPEC, "webhook": {"url": "http://127.0.0.1:9/h", "secret": SECRET}}
    job_id = api.post("/v1/merges", json=body, headers=auth).json()["id"]
    assert api.post(f"/v1/merges/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    api.post(f"/v1/merges/{job_id}/cancel", headers=auth)  # already cancelled: nothing more
    assert _sent_tasks(api) == [
        ("crucible.run_merge", [job_id]),
        ("crucible.deliver_webhook", [job_id]),
    ]


# ----------------------------------------------------------------------------- HTTPS


def _tls_pair(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for `name`: (server context, client context trusting it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


def test_https_connects_to_the_checked_address_with_the_urls_name(
    store: JobStore, tmp_path: Path
) -> None:
    """TLS to the pinned address: SNI and certificate checks use the URL's host name."""
    server_ctx, client_ctx = _tls_pair(tmp_path, "hooks.test")
    settings = _settings(tmp_path, webhook_allowed_hosts=["hooks.test", "other.test"])
    post = functools.partial(_post, verify=client_ctx)
    with WebhookReceiver([200], tls=server_ctx) as hook:
        job_id = _finished_job(store, settings, f"https://hooks.test:{hook.port}/in")
        ok = deliver(store, job_id, settings, resolver=lambda h, p: ["127.0.0.1"], post=post)
        assert ok is True
        (got,) = hook.deliveries
        _verify(got.headers, got.body)
        assert got.headers["Host"] == f"hooks.test:{hook.port}"
        assert hook.sni_names == ["hooks.test"]
        # Same address, another name: the certificate does not match, nothing is sent.
        other = _finished_job(store, settings, f"https://other.test:{hook.port}/in")
        ok = deliver(store, other, settings, resolver=lambda h, p: ["127.0.0.1"], post=post)
        assert ok is False
        assert len(hook.deliveries) == 1
    job = store.get_job(other)
    assert job is not None and job.deliveries[0].error
    assert "ConnectError" in job.deliveries[0].error
