"""The datasets API in process (real SQLite, real files): uploads in every format, bad
uploads and what they leave behind (nothing), tenancy, blob sharing, dataset references in
merge specs, and the trials of a job; the dataset and trial records on PostgreSQL too."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from crucible.datasets.schema import DatasetSummary
from crucible.datasets.split import split_sizes
from crucible.datasets.storage import BlobWriter, blob_path, datasets_dir
from crucible.settings import Settings
from crucible.spec import SplitSpec
from crucible.store import JobStore, head_revision
from crucible.store.datasets import best_trial
from service.app import create_app

LIMIT = 64 * 1024
DATASET_ID = re.compile(r"^ds_[0-9a-z]{8,64}$")  # the pattern of crucible.spec.DatasetId
ROWS = [{"text": f"example {i}", "label": ["neg", "pos"][i % 2]} for i in range(10)]
SPEC: dict[str, Any] = {
    "base": {"uri": "hf://org/base"},
    "experts": [{"uri": "hf://org/a", "name": "a"}, {"uri": "hf://org/b", "name": "b"}],
    "method": {"name": "ties", "params": {"density": 0.3}},
}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, broker_url="memory://", max_dataset_bytes=LIMIT)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def keys(client: TestClient) -> dict[str, str]:
    store = client.app.state.store  # type: ignore[attr-defined]
    return {t: store.create_api_key(t)[1] for t in ("acme", "globex")}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(client: TestClient, key: str, filename: str, content: bytes, **fields: str) -> Any:
    return client.post(
        "/v1/datasets", files={"file": (filename, content)}, data=fields, headers=auth(key)
    )


def error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["code"] == code, body
    return body["error"]


def stored_files(client: TestClient) -> list[str]:
    folder = datasets_dir(client.app.state.settings.artifacts_root)  # type: ignore[attr-defined]
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def dataset_rows(client: TestClient) -> int:
    store = client.app.state.store  # type: ignore[attr-defined]
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM datasets")).scalar_one())


# -- uploads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "encode", "fmt"),
    [
        ("train.jsonl", jsonl, "jsonl"),
        ("train.json", jsonl, "jsonl"),
        ("train.csv", csv_bytes, "csv"),
        ("train.parquet", parquet_bytes, "parquet"),
    ],
)
def test_upload_each_format(
    client: TestClient, keys: dict, filename: str, encode: Any, fmt: str
) -> None:
    content = encode(ROWS)
    resp = upload(client, keys["acme"], filename, content)
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert DATASET_ID.match(record["id"])
    assert record["name"] == record["filename"] == filename
    assert (record["format"], record["schema"], record["rows"]) == (fmt, "classification", 10)
    assert record["bytes"] == len(content)
    assert record["sha256"] == hashlib.sha256(content).hexdigest()
    assert record["labels"] == [{"label": "neg", "count": 5}, {"label": "pos", "count": 5}]
    # The blob is the uploaded bytes, under its content address; nothing else is left.
    root = client.app.state.settings.artifacts_root  # type: ignore[attr-defined]
    blob = blob_path(root, record["sha256"], fmt)  # type: ignore[arg-type]
    assert blob.read_bytes() == content
    assert stored_files(client) == [blob.name]
    got = client.get(f"/v1/datasets/{record['id']}", headers=auth(keys["acme"]))
    assert got.status_code == 200 and got.json() == record


def test_name_format_and_text_schemas(client: TestClient, keys: dict) -> None:
    rows = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "1+1=", "completion": " 2"}]
    resp = upload(client, keys["acme"], "notes.txt", jsonl(rows), name="arith", format="jsonl")
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert (record["name"], record["filename"], record["format"]) == ("arith", "notes.txt", "jsonl")
    assert (record["schema"], record["labels"]) == ("prompt_completion", [])
    resp = upload(client, keys["acme"], "lm.csv", csv_bytes([{"text": "hello"}]))
    assert resp.status_code == 201 and resp.json()["schema"] == "text"


def test_same_bytes_share_one_blob_until_the_last_delete(client: TestClient, keys: dict) -> None:
    content = jsonl(ROWS)
    first = upload(client, keys["acme"], "a.jsonl", content).json()
    second = upload(client, keys["globex"], "b.jsonl", content).json()
    third = upload(client, keys["acme"], "c.jsonl", content).json()
    assert len({first["id"], second["id"], third["id"]}) == 3
    blob = f"{hashlib.sha256(content).hexdigest()}.jsonl"
    assert stored_files(client) == [blob]
    for key, ds in [("acme", first), ("globex", second)]:
        resp = client.delete(f"/v1/datasets/{ds['id']}", headers=auth(keys[key]))
        assert resp.status_code == 204 and resp.content == b""
        assert stored_files(client) == [blob]
    assert (
        client.delete(f"/v1/datasets/{third['id']}", headers=auth(keys["acme"])).status_code == 204
    )
    assert stored_files(client) == [] and dataset_rows(client) == 0
    error(client.get(f"/v1/datasets/{third['id']}", headers=auth(keys["acme"])), 404, "not_found")
    error(
        client.delete(f"/v1/datasets/{third['id']}", headers=auth(keys["acme"])), 404, "not_found"
    )


def _cut(content: bytes) -> bytes:
    """Past the middle and not at a line end (ROWS' JSON lines are all one length)."""
    return content[: len(content) // 2 + 7]


@pytest.mark.parametrize(
    ("filename", "content", "fields", "row", "reason"),
    [
        (
            "d.jsonl",
            jsonl([{"sentence": "a", "label": "x"}]),
            {},
            1,
            "unknown columns ['sentence']",
        ),
        (
            "d.jsonl",
            jsonl([{"text": "a", "label": "x"}, {"text": "b"}]),
            {},
            2,
            "missing columns ['label']",
        ),
        (
            "d.csv",
            b"text,label,source\na,x,web\n",
            {},
            1,
            "unknown columns ['source']",
        ),
        ("d.jsonl", jsonl([{"text": "a", "label": 0.5}]), {}, 1, "label is a float (0.5)"),
        ("d.jsonl", jsonl([*ROWS, {"text": "a", "label": ["x"]}]), {}, 11, "label is a list"),
        ("d.jsonl", jsonl([{"text": 42, "label": "x"}]), {}, 1, "text is an integer"),
        ("d.parquet", parquet_bytes([{"text": "a", "label": 1.0}]), {}, 1, "label is a float"),
        (
            "d.jsonl",
            jsonl([{"text": "a", "label": 1}, {"text": "b", "label": "1"}]),
            {},
            2,
            "label '1' is a string but earlier labels are integers",
        ),
        ("d.jsonl", b"", {}, None, "the file is empty"),
        ("d.csv", b"", {}, None, "the file is empty"),
        ("d.jsonl", _cut(jsonl(ROWS)), {}, 6, "invalid JSON"),
        ("d.parquet", _cut(parquet_bytes(ROWS)), {}, None, "not a readable Parquet file"),
        (
            "d.jsonl",
            jsonl([*ROWS, {"text": "z", "label": "maybe"}]),
            {"labels": '["neg", "pos"]'},
            11,
            "label 'maybe' is not in the declared label set",
        ),
    ],
)
def test_bad_upload_is_422_naming_the_row_and_stores_nothing(
    client: TestClient,
    keys: dict,
    filename: str,
    content: bytes,
    fields: dict[str, str],
    row: int | None,
    reason: str,
) -> None:
    err = error(upload(client, keys["acme"], filename, content, **fields), 422, "invalid_dataset")
    first = err["detail"]["bad_rows"][0]
    assert first["row"] == row and first["reason"].startswith(reason), first
    assert err["message"].startswith(reason if row is None else f"row {row}: {reason}")
    assert stored_files(client) == [] and dataset_rows(client) == 0


def test_oversized_upload_is_413_and_leaves_nothing(client: TestClient, keys: dict) -> None:
    line = jsonl([{"text": "x" * 200, "label": "a"}])
    # Just over the limit: read until the limit is passed; far over: refused by its length.
    for copies in (LIMIT // len(line) + 1, 8 * LIMIT // len(line)):
        err = error(
            upload(client, keys["acme"], "big.jsonl", line * copies), 413, "dataset_too_large"
        )
        assert str(LIMIT) in err["message"] and err["detail"] == {"limit": LIMIT}
        assert stored_files(client) == [] and dataset_rows(client) == 0
    # Exactly at the limit is fine.
    exact = line * (LIMIT // len(line))
    frame = len(jsonl([{"text": "", "label": "a"}]))
    exact += jsonl([{"text": "y" * (LIMIT - len(exact) - frame), "label": "a"}])
    assert len(exact) == LIMIT
    assert upload(client, keys["acme"], "ok.jsonl", exact).status_code == 201


def test_upload_stops_reading_once_past_the_limit(client: TestClient, keys: dict) -> None:
    """Drive the ASGI app with a chunked body (no Content-Length) and count what it pulls."""
    app = client.app
    boundary = "xyzzy"
    chunk = 8 * 1024
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    total_chunks = 10 * LIMIT // chunk
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        body = head if pulled == 1 else b"x" * chunk
        return {"type": "http.request", "body": body, "more_body": pulled < total_chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/datasets",
        "raw_path": b"/v1/datasets",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"authorization", f"Bearer {keys['acme']}".encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "app": app,
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] == "dataset_too_large"
    # The first chunk past the limit is the last one read.
    assert pulled == 1 + LIMIT // chunk + 1 < total_chunks
    assert stored_files(client) == []


def test_unsupported_formats_and_media_types(client: TestClient, keys: dict) -> None:
    acme = keys["acme"]
    err = error(upload(client, acme, "d.txt", jsonl(ROWS)), 415, "unsupported_format")
    assert "d.txt" in err["message"] and err["detail"]["supported"] == ["jsonl", "csv", "parquet"]
    error(upload(client, acme, "d.jsonl", jsonl(ROWS), format="xml"), 415, "unsupported_format")
    resp = client.post("/v1/datasets", json={"file": "x"}, headers=auth(acme))
    error(resp, 415, "unsupported_media_type")
    # A declared format wins over the extension.
    resp = upload(client, acme, "d.txt", csv_bytes(ROWS), format="CSV")
    assert resp.status_code == 201 and resp.json()["format"] == "csv"
    # The CSV blob is named by the format it was read as.
    assert stored_files(client) == [f"{resp.json()['sha256']}.csv"]


def test_malformed_forms_are_4xx_and_leave_nothing(client: TestClient, keys: dict) -> None:
    headers = auth(keys["acme"])
    resp = client.post(
        "/v1/datasets", data={"name": "x"}, files={"other": ("a", b"1")}, headers=headers
    )
    assert "unknown form field 'other'" in error(resp, 422, "invalid_request")["message"]
    resp = client.post(
        "/v1/datasets",
        headers={**headers, "content-type": "multipart/form-data; boundary=b"},
        content=b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b--\r\n',
    )
    assert "part named `file`" in error(resp, 422, "invalid_request")["message"]
    err = error(
        upload(client, keys["acme"], "d.jsonl", jsonl(ROWS), labels="neg,pos"),
        422,
        "invalid_request",
    )
    assert err["detail"][0]["field"] == "labels" and "not JSON" in err["message"]
    resp = client.post(
        "/v1/datasets",
        headers={**headers, "content-type": "multipart/form-data; boundary=b"},
        content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
        + jsonl(ROWS),
    )
    assert "closing boundary" in error(resp, 400, "bad_request")["message"]
    assert stored_files(client) == [] and dataset_rows(client) == 0


def test_auth_is_required(client: TestClient) -> None:
    for method, path in [
        ("post", "/v1/datasets"),
        ("get", "/v1/datasets"),
        ("get", "/v1/datasets/ds_1"),
        ("delete", "/v1/datasets/ds_1"),
    ]:
        error(client.request(method, path), 401, "unauthorized")


# -- tenancy, listing, merge specs ----------------------------------------------------------


def test_another_tenants_dataset_is_404(client: TestClient, keys: dict) -> None:
    ds = upload(client, keys["acme"], "d.jsonl", jsonl(ROWS)).json()
    globex = auth(keys["globex"])
    error(client.get(f"/v1/datasets/{ds['id']}", headers=globex), 404, "not_found")
    error(client.delete(f"/v1/datasets/{ds['id']}", headers=globex), 404, "not_found")
    assert client.get("/v1/datasets", headers=globex).json() == {"items": [], "next_cursor": None}
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth(keys["acme"])).status_code == 200
    assert len(stored_files(client)) == 1


def test_listing_pages_newest_first(client: TestClient, keys: dict) -> None:
    acme = auth(keys["acme"])
    ids = [
        upload(client, keys["acme"], f"d{i}.jsonl", jsonl([{"text": f"t{i}"}])).json()["id"]
        for i in range(3)
    ]
    upload(client, keys["globex"], "other.jsonl", jsonl([{"text": "g"}]))
    page = client.get("/v1/datasets?limit=2", headers=acme).json()
    assert [d["id"] for d in page["items"]] == ids[::-1][:2] and page["next_cursor"]
    rest = client.get(f"/v1/datasets?limit=2&cursor={page['next_cursor']}", headers=acme).json()
    assert [d["id"] for d in rest["items"]] == ids[:1] and rest["next_cursor"] is None
    error(client.get("/v1/datasets?cursor=nope", headers=acme), 422, "invalid_request")
    error(client.get("/v1/datasets?limit=0", headers=acme), 422, "invalid_request")


def test_merge_specs_reference_only_the_callers_datasets(client: TestClient, keys: dict) -> None:
    mine = upload(client, keys["acme"], "a.jsonl", jsonl(ROWS)).json()["id"]
    theirs = upload(client, keys["globex"], "b.jsonl", jsonl(ROWS[:4])).json()["id"]
    acme = auth(keys["acme"])

    def spec(expert_ds: str | None, tuning: Any = None) -> dict[str, Any]:
        experts = [dict(SPEC["experts"][0], dataset=expert_ds), SPEC["experts"][1]]
        body = {**SPEC, "experts": experts}
        return body if tuning is None else {**body, "tuning": {"dataset": tuning}}

    for body, field, missing in [
        (spec(theirs), "experts.0.dataset", theirs),
        (spec("ds_000000000000000000000000"), "experts.0.dataset", "ds_000000000000000000000000"),
        (spec(mine, tuning=theirs), "tuning.dataset", theirs),
        (spec(mine, tuning={"a": mine, "b": theirs}), "tuning.dataset.b", theirs),
    ]:
        err = error(client.post("/v1/merges", json=body, headers=acme), 404, "dataset_not_found")
        assert err["message"].startswith(f"{field}: no dataset '{missing}'")
        assert err["detail"] == {"field": field, "dataset_id": missing, "missing": [missing]}
    assert client.get("/v1/merges", headers=acme).json()["items"] == []
    resp = client.post("/v1/merges", json=spec(mine, tuning={"a": mine, "b": mine}), headers=acme)
    assert resp.status_code == 202, resp.text


# -- trials ----------------------------------------------------------------------------------


def test_trials_endpoint(client: TestClient, keys: dict) -> None:
    acme = auth(keys["acme"])
    store = client.app.state.store  # type: ignore[attr-defined]
    job = client.post("/v1/merges", json=SPEC, headers=acme).json()
    assert client.get(f"/v1/merges/{job['id']}/trials", headers=acme).json() == {
        "items": [],
        "best": None,
    }
    store.add_trial(job["id"], 2, {"params": {"global": {"scale": 0.3}}, "objective": 0.61})
    store.add_trial(job["id"], 0, {"params": {"global": {"scale": 1.0}}, "objective": 0.70})
    store.add_trial(job["id"], 1, {"params": {"global": {"scale": 0.5}}, "objective": 0.55})
    # A re-run of trial 1 overwrites it.
    store.add_trial(job["id"], 1, {"params": {"global": {"scale": 0.6}}, "objective": 0.80})
    page = client.get(f"/v1/merges/{job['id']}/trials", headers=acme).json()
    assert [t["index"] for t in page["items"]] == [0, 1, 2]
    assert page["items"][1] == {"index": 1, "params": {"global": {"scale": 0.6}}, "objective": 0.8}
    assert page["best"] == 1
    error(
        client.get(f"/v1/merges/{job['id']}/trials", headers=auth(keys["globex"])), 404, "not_found"
    )
    error(client.get("/v1/merges/job_nope/trials", headers=acme), 404, "not_found")


def test_best_trial_ignores_missing_and_non_finite_objectives() -> None:
    items = [
        {"index": 0},
        {"index": 1, "objective": float("nan")},
        {"index": 2, "objective": -1.5},
        {"index": 3, "objective": True},
        {"index": 4, "objective": -1.5},
    ]
    assert best_trial(items) == 2
    assert best_trial(items[:2]) is None
    assert best_trial([]) is None


# -- the worker's view: DatasetHandle ---------------------------------------------------------


def test_handle_reads_rows_and_splits_by_label(client: TestClient, keys: dict) -> None:
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(30)]
    ds = upload(client, keys["acme"], "d.csv", csv_bytes(rows)).json()
    assert ds["labels"] == [{"label": k, "count": 10} for k in range(3)]
    store = client.app.state.store  # type: ignore[attr-defined]
    handle = store.get_dataset("acme", ds["id"])
    assert store.get_dataset("globex", ds["id"]) is None
    assert handle.path.read_bytes() == csv_bytes(rows)
    # CSV labels that are integers come back as ints, as in the summary.
    assert list(handle.iter_rows()) == rows
    val, test = handle.split(SplitSpec(validation=0.3, test=0.3, seed=4))
    for split, size in ((val, split_sizes(10, 0.3, 0.3)[0]), (test, split_sizes(10, 0.3, 0.3)[1])):
        assert sorted(rows[i]["label"] for i in split) == sorted([0, 1, 2] * size)


# -- the store on both backends ---------------------------------------------------------------


def _add(store: JobStore, tenant: str, content: bytes) -> str:
    with BlobWriter(store.artifacts_root, LIMIT) as blob:
        blob.write(content)
        summary = DatasetSummary(schema="text", rows=content.count(b"\n"))
        return store.add_dataset(tenant, blob, "jsonl", summary, "n", "n.jsonl").id


def test_store_datasets_and_trials(store: JobStore) -> None:
    assert store.current_revision() == head_revision()
    content = jsonl([{"text": "a"}, {"text": "b"}])
    a, b = _add(store, "acme", content), _add(store, "acme", content)
    handle = store.get_dataset("acme", a)
    assert handle is not None and handle.rows == 2 and handle.labels == []
    assert handle.sha256 == hashlib.sha256(content).hexdigest()
    assert store.get_dataset("globex", a) is None
    assert store.existing_dataset_ids("acme", [a, b, "ds_x"]) == {a, b}
    assert store.existing_dataset_ids("globex", [a, b]) == set()
    assert [h.id for h in store.list_datasets("acme", 10)[0]] == [b, a]
    assert not store.delete_dataset("globex", a)
    assert store.delete_dataset("acme", a) and handle.path.exists()
    assert store.delete_dataset("acme", b) and not handle.path.exists()

    job, _ = store.create_job("acme", SPEC, "digest", None)
    for index, objective in [(1, 0.2), (0, 0.1), (1, 0.3)]:
        store.add_trial(job.id, index, {"objective": objective, "nested": {"x": [1, 2]}})
    assert store.list_trials(job.id) == [
        {"index": 0, "objective": 0.1, "nested": {"x": [1, 2]}},
        {"index": 1, "objective": 0.3, "nested": {"x": [1, 2]}},
    ]
    with pytest.raises(ValueError, match="no job"):
        store.add_trial("job_missing", 0, {})
    assert store.tenant_of(job.id) == "acme"


def test_a_failed_insert_removes_the_new_blob_unless_shared(store: JobStore) -> None:
    content = jsonl([{"text": "a"}])
    summary = DatasetSummary(schema="text", rows=1)

    def add_without_tenant() -> None:
        with BlobWriter(store.artifacts_root, LIMIT) as blob:
            blob.write(content)
            with pytest.raises(IntegrityError):  # tenant is NOT NULL
                store.add_dataset(None, blob, "jsonl", summary, "n")  # type: ignore[arg-type]

    add_without_tenant()
    assert list(datasets_dir(store.artifacts_root).iterdir()) == []
    kept = _add(store, "acme", content)
    add_without_tenant()
    handle = store.get_dataset("acme", kept)
    assert handle is not None and handle.path.read_bytes() == content
    assert [p.name for p in datasets_dir(store.artifacts_root).iterdir()] == [handle.path.name]
