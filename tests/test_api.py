"""The HTTP contract, in process: auth, tenancy, validation, idempotency, pagination,
cancellation, the error shape, and what reaches the queue (kombu's in-memory broker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from crucible.settings import Settings
from service.app import create_app
from tests.support.memory_broker import drain_tasks

SPEC: dict[str, Any] = {
    "base": {"uri": "hf://org/base", "revision": "main"},
    "experts": [{"uri": "hf://org/a"}, {"uri": "hf://org/b", "revision": "v2", "weight": 0.5}],
    "method": {"name": "ties", "params": {"density": 0.3}},
}


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path,
        broker_url="memory://",
        allowed_local_dirs=[tmp_path / "models"],
        max_experts=4,
        max_trials=10,
        max_samples=100,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        _queued_task_ids(client)  # kombu's memory broker is per process: start empty
        yield client


@pytest.fixture
def keys(app_client: TestClient) -> dict[str, str]:
    store = app_client.app.state.store  # type: ignore[attr-defined]
    return {t: store.create_api_key(t)[1] for t in ("acme", "globex")}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["code"] == code, body
    return body["error"]


def _queued_task_ids(client: TestClient) -> list[list[Any]]:
    tasks = drain_tasks(client)
    assert all(name == "crucible.run_merge" for name, _ in tasks), tasks
    return [body[0] for _, body in tasks]


def test_submit_queues_a_job_and_enqueues_it_by_name(app_client: TestClient, keys: dict) -> None:
    resp = app_client.post("/v1/merges", json=SPEC, headers=_auth(keys["acme"]))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert resp.headers["location"] == f"/v1/merges/{job['id']}"
    assert job["spec"]["method"] == {
        "name": "ties",
        "params": {**job["spec"]["method"]["params"], "density": 0.3},
    }
    assert job["spec"]["experts"][1]["revision"] == "v2"
    assert _queued_task_ids(app_client) == [[job["id"]]]
    got = app_client.get(f"/v1/merges/{job['id']}", headers=_auth(keys["acme"]))
    assert got.status_code == 200 and got.json()["id"] == job["id"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer crk_x_y"},
    ],
)
def test_missing_or_invalid_key_is_401(app_client: TestClient, headers: dict) -> None:
    for method, path in [
        ("post", "/v1/merges"),
        ("get", "/v1/merges"),
        ("get", "/v1/merges/job_1"),
    ]:
        resp = app_client.request(method, path, json=SPEC, headers=headers)
        _error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_401(app_client: TestClient) -> None:
    store = app_client.app.state.store  # type: ignore[attr-defined]
    key_id, key = store.create_api_key("acme")
    assert app_client.get("/v1/merges", headers=_auth(key)).status_code == 200
    job = app_client.post("/v1/merges", json=SPEC, headers=_auth(key)).json()
    status_path = f"/v1/merges/{job['id']}"
    assert app_client.get(status_path, headers=_auth(key)).status_code == 200
    store.revoke_api_key(key_id)
    # The status read checks the key in its own query (no shared dependency): same answer.
    for path in ("/v1/merges", status_path):
        err = _error(app_client.get(path, headers=_auth(key)), 401, "unauthorized")
        assert err["message"] == "invalid or revoked API key"


def test_database_down_is_503_not_500(app_client: TestClient, keys: dict) -> None:
    """A database that refuses connections (down, restarting) is a 503 with Retry-After
    on every route that needs it, never a 500."""
    from crucible.store import JobStore
    from tests.support.ports import free_port

    app = app_client.app
    job = app_client.post("/v1/merges", json=SPEC, headers=_auth(keys["acme"])).json()
    live = app.state.store  # type: ignore[attr-defined]
    dead = JobStore(f"postgresql+psycopg://crucible@127.0.0.1:{free_port()}/nothing")
    app.state.store = dead  # type: ignore[attr-defined]
    try:
        for method, path in [
            ("GET", f"/v1/merges/{job['id']}"),
            ("GET", "/v1/merges"),
            ("POST", "/v1/merges"),
        ]:
            resp = app_client.request(method, path, json=SPEC, headers=_auth(keys["acme"]))
            _error(resp, 503, "database_unavailable")
            assert resp.headers["retry-after"] == "1"
    finally:
        app.state.store = live  # type: ignore[attr-defined]
        dead.close()


def test_another_tenants_job_is_404(app_client: TestClient, keys: dict) -> None:
    job = app_client.post("/v1/merges", json=SPEC, headers=_auth(keys["acme"])).json()
    for path in (f"/v1/merges/{job['id']}", f"/v1/merges/{job['id']}/files/config.json"):
        _error(app_client.get(path, headers=_auth(keys["globex"])), 404, "not_found")
    _error(
        app_client.post(f"/v1/merges/{job['id']}/cancel", headers=_auth(keys["globex"])),
        404,
        "not_found",
    )
    listed = app_client.get("/v1/merges", headers=_auth(keys["globex"])).json()
    assert listed["items"] == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method": {"name": "ties", "params": {"density": 1.5}}}, "density"),
        ({"method": {"name": "ties", "params": {"densty": 0.5}}}, "densty"),
        ({"method": {"name": "dare_ties", "params": {"density": 0}}}, "density"),
        ({"method": {"name": "no_such_method"}}, "method"),
        ({"base": {"uri": "https://example.com/model"}}, "base.uri"),
        ({"base": {"uri": "hf://org/../etc"}}, "base.uri"),
        ({"base": {"uri": "hf://a/b", "revision": "bad rev"}}, "base.revision"),
        ({"experts": []}, "experts"),
        ({"experts": [{"uri": "s3://bucket/x"}]}, "experts.0.uri"),
        ({"output": {"shard_size": "lots"}}, "output.shard_size"),
        ({"output": {"dtype": "int8"}}, "output.dtype"),
        ({"output": {"uri": "ftp://host/out"}}, "output.uri"),
        ({"output": {"uri": "s3://Bad_Bucket/out"}}, "output.uri"),
        ({"experts": [{"uri": "hf://a/b", "weight": "heavy"}]}, "experts.0.weight"),
        ({"tuning": {"trials": 3}}, "tuning.dataset"),
        ({"tuning": {"dataset": "ds_0123456789", "trials": 2, "init_trials": 3}}, "tuning"),
        ({"tuning": {"dataset": "ds_0123456789", "groups": "rows"}}, "tuning.groups"),
        ({"tuning": {"dataset": "ds_0123456789", "split": {"validation": 0.8}}}, "tuning.split"),
        ({"statistics": {"max_samples": 0}}, "statistics.max_samples"),
        ({"experts": [{"uri": "hf://a/b", "dataset": "not-an-id"}]}, "experts.0.dataset"),
    ],
)
def test_bad_specs_are_422_naming_the_field(
    app_client: TestClient, keys: dict, change: dict, field: str
) -> None:
    err = _error(
        app_client.post("/v1/merges", json={**SPEC, **change}, headers=_auth(keys["acme"])),
        422,
        "invalid_request",
    )
    assert field in err["message"], err
    assert any(field in d["field"] for d in err["detail"]), err


def test_limits_and_local_paths_are_422(app_client: TestClient, keys: dict, tmp_path: Path) -> None:
    many = {**SPEC, "experts": [{"uri": f"hf://org/e{i}"} for i in range(5)]}
    err = _error(
        app_client.post("/v1/merges", json=many, headers=_auth(keys["acme"])), 422, "limit_exceeded"
    )
    assert "at most 4 experts" in err["message"]
    for change, field in [
        (
            {
                "experts": [{"uri": "hf://org/e", "dataset": "ds_0123456789"}],
                "method": {"name": "regmean"},
                "statistics": {"max_samples": 101},
            },
            "statistics.max_samples",
        ),
        (
            {
                "method": {"name": "ties"},
                "tuning": {"dataset": "ds_0123456789", "trials": 11, "init_trials": 2},
            },
            "tuning.trials",
        ),
    ]:
        err = _error(
            app_client.post("/v1/merges", json={**SPEC, **change}, headers=_auth(keys["acme"])),
            422,
            "limit_exceeded",
        )
        assert err["message"].startswith(f"{field}: at most"), err
        assert err["detail"]["field"] == field
    outside = {**SPEC, "base": {"uri": "file:///etc"}}
    err = _error(
        app_client.post("/v1/merges", json=outside, headers=_auth(keys["acme"])),
        422,
        "local_path_forbidden",
    )
    assert err["detail"]["field"] == "base.uri"
    escape = {**SPEC, "base": {"uri": f"file://{tmp_path}/models/../secrets"}}
    _error(
        app_client.post("/v1/merges", json=escape, headers=_auth(keys["acme"])),
        422,
        "local_path_forbidden",
    )
    inside = {**SPEC, "base": {"uri": f"file://{tmp_path}/models/base"}}
    assert (
        app_client.post("/v1/merges", json=inside, headers=_auth(keys["acme"])).status_code == 202
    )


def test_malformed_json_is_422_not_500(app_client: TestClient, keys: dict) -> None:
    resp = app_client.post(
        "/v1/merges",
        content=b"{nope",
        headers={**_auth(keys["acme"]), "Content-Type": "application/json"},
    )
    _error(resp, 422, "invalid_request")


def test_idempotency_key(app_client: TestClient, keys: dict) -> None:
    h = {**_auth(keys["acme"]), "Idempotency-Key": "k-1"}
    first = app_client.post("/v1/merges", json=SPEC, headers=h)
    again = app_client.post("/v1/merges", json=SPEC, headers=h)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = {**SPEC, "method": {"name": "linear"}}
    err = _error(app_client.post("/v1/merges", json=other, headers=h), 409, "idempotency_conflict")
    assert err["detail"]["job_id"] == first.json()["id"]
    # The key is per tenant: another tenant may use the same key for its own job.
    h2 = {**_auth(keys["globex"]), "Idempotency-Key": "k-1"}
    second = app_client.post("/v1/merges", json=other, headers=h2)
    assert second.status_code == 202
    # The retry of a job still queued sends its task again (the first request may have died
    # between storing the job and sending it; a second delivery is a no-op for the worker).
    job_id = first.json()["id"]
    assert _queued_task_ids(app_client) == [[job_id], [job_id], [second.json()["id"]]]
    # A job no longer queued is not sent again.
    assert app_client.post(f"/v1/merges/{job_id}/cancel", headers=h).status_code == 200
    assert app_client.post("/v1/merges", json=SPEC, headers=h).status_code == 200
    assert _queued_task_ids(app_client) == []


def test_list_filters_and_paginates(app_client: TestClient, keys: dict) -> None:
    h = _auth(keys["acme"])
    ids = [app_client.post("/v1/merges", json=SPEC, headers=h).json()["id"] for _ in range(5)]
    app_client.post(f"/v1/merges/{ids[0]}/cancel", headers=h)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = app_client.get("/v1/merges", params=params, headers=h).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    queued = app_client.get("/v1/merges", params={"status": "queued"}, headers=h).json()
    assert [j["id"] for j in queued["items"]] == list(reversed(ids[1:]))
    _error(
        app_client.get("/v1/merges", params={"cursor": "%%%"}, headers=h), 422, "invalid_request"
    )
    _error(
        app_client.get("/v1/merges", params={"status": "sleeping"}, headers=h),
        422,
        "invalid_request",
    )
    _error(app_client.get("/v1/merges", params={"limit": 0}, headers=h), 422, "invalid_request")


def test_cancel_queued_job_never_starts(app_client: TestClient, keys: dict) -> None:
    h = _auth(keys["acme"])
    job = app_client.post("/v1/merges", json=SPEC, headers=h).json()
    cancelled = app_client.post(f"/v1/merges/{job['id']}/cancel", headers=h)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    store = app_client.app.state.store  # type: ignore[attr-defined]
    assert store.claim(job["id"], "w1") is None
    again = app_client.post(f"/v1/merges/{job['id']}/cancel", headers=h)
    assert again.json()["status"] == "cancelled"


def test_files_of_unfinished_job_is_409(app_client: TestClient, keys: dict) -> None:
    h = _auth(keys["acme"])
    job = app_client.post("/v1/merges", json=SPEC, headers=h).json()
    _error(app_client.get(f"/v1/merges/{job['id']}/files/config.json", headers=h), 409, "not_ready")


def test_methods_publish_param_schemas(app_client: TestClient) -> None:
    items = {m["name"]: m for m in app_client.get("/v1/methods").json()["items"]}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(items)
    density = items["ties"]["params_schema"]["properties"]["density"]
    assert density["default"] == 0.2
    # A scalar, a list over layers, or {filter, value} rules; the scalar keeps its range.
    scalar, layers, rules = density["anyOf"]
    assert scalar == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert layers["type"] == "array" and rules["type"] == "array"
    assert items["ties"]["per_tensor_params"] == ["density", "scale"]
    assert items["ties"]["matrix"] is False


def test_per_tensor_overrides_are_validated_item_by_item(
    app_client: TestClient, keys: dict
) -> None:
    h = _auth(keys["acme"])
    good = {
        "density": [0.1, 0.5, 0.9],
        "scale": [{"filter": "*.mlp.*", "value": 0.5}, {"filter": "re:attn", "value": 2}],
    }
    resp = app_client.post(
        "/v1/merges", json={**SPEC, "method": {"name": "ties", "params": good}}, headers=h
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["method"]["params"]["density"] == [0.1, 0.5, 0.9]
    cases = [
        ({"density": [0.1, 2]}, "item 1: Input should be less than or equal to 1"),
        ({"density": []}, "an empty list gives no value"),
        ({"density": [0.1, {"filter": "a", "value": 0.2}]}, "mixes numbers and"),
        ({"scale": [{"filter": "re:(", "value": 1}]}, "bad regular expression"),
        ({"scale": [{"filter": "*", "value": 1, "x": 2}]}, "Extra inputs are not permitted"),
    ]
    for params, message in cases:
        body = {**SPEC, "method": {"name": "ties", "params": params}}
        err = _error(app_client.post("/v1/merges", json=body, headers=h), 422, "invalid_request")
        field = next(iter(params))
        assert f"method.ties.params.{field}" in err["message"], err
        assert message in err["message"], err


def test_method_needing_grams_without_them_is_422(app_client: TestClient, keys: dict) -> None:
    body = {**SPEC, "method": {"name": "regmean"}}
    err = _error(
        app_client.post("/v1/merges", json=body, headers=_auth(keys["acme"])),
        422,
        "invalid_request",
    )
    assert "needs per-expert Grams" in err["message"] and "experts[0]" in err["message"]


def test_health_and_readiness(app_client: TestClient) -> None:
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_is_503_when_the_broker_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["error"]["detail"]["database"] == "ok"
    assert resp.json()["error"]["detail"]["broker"].startswith("error")


def test_submit_with_broker_down_is_503_and_the_job_is_failed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        key = client.app.state.store.create_api_key("acme")[1]  # type: ignore[attr-defined]
        err = _error(
            client.post("/v1/merges", json=SPEC, headers=_auth(key)), 503, "broker_unavailable"
        )
        job = client.get(f"/v1/merges/{err['detail']['job_id']}", headers=_auth(key)).json()
    assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"


def test_unknown_route_uses_the_error_shape(app_client: TestClient) -> None:
    _error(app_client.get("/v1/nothing"), 404, "not_found")
