"""JobStore against real databases: a SQLite file and a throwaway PostgreSQL database."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, text, update

from crucible.reaper import reap_once
from crucible.settings import Settings
from crucible.spec import Job
from crucible.store import IdempotencyConflict, JobStore, alembic_config, head_revision
from crucible.store.job_store import MIGRATIONS_DIR, encode_cursor
from crucible.store.models import Base, JobRow, now_utc
from tests.support.postgres import throwaway_postgres_url

BACKENDS = ["sqlite", "postgresql"]
T = TypeVar("T")


def make_spec(n: int = 0) -> dict[str, Any]:
    return {
        "base": {"uri": "hf://org/base", "revision": "main"},
        "experts": [{"uri": f"hf://org/expert-{n}", "revision": "main"}],
        "method": {"name": "task_arithmetic", "params": {"scale": 0.5}},
        "output": {"uri": "local://", "dtype": "bfloat16"},
    }


def digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def new_job(store: JobStore, tenant: str = "acme", n: int = 0, key: str | None = None) -> Job:
    spec = make_spec(n)
    job, created = store.create_job(tenant, spec, digest(spec), key)
    assert created
    return job


def race(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run fn(i) in n threads released together; re-raise the first exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    # A store that wrote local time or dropped the offset wrongly would be hours off.
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


def count_rows(store: JobStore, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with throwaway_postgres_url() as url:
        # A session time zone other than UTC, so a naive timestamp would come back shifted.
        engine = create_engine(url)
        with engine.begin() as conn:
            name = make_url(url).database
            conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kolkata'"))
        engine.dispose()
        yield url


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        # A parent folder that does not exist yet: the store creates it.
        s = JobStore(f"sqlite:///{tmp_path / 'data' / 'crucible.db'}")
        s.migrate()
    else:
        s = JobStore(request.getfixturevalue("pg_url"))
        s.migrate()
        with s.engine.begin() as conn:
            conn.execute(text("TRUNCATE jobs, job_events, api_keys, datasets, trials"))
    yield s
    s.close()


@pytest.fixture(params=BACKENDS)
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database nobody has migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        with throwaway_postgres_url() as url:
            yield url


# -- jobs ------------------------------------------------------------------------------------


def test_create_and_get(store: JobStore) -> None:
    spec = make_spec(1)
    job, created = store.create_job("acme", spec, digest(spec), None)
    assert created
    assert job.id.startswith("job_") and len(job.id) == 28
    int(job.id[4:], 16)
    assert job.status == "queued"
    assert job.stage is None and job.started_at is None and job.finished_at is None
    assert job.progress.done == 0 and job.progress.total == 0
    assert job.spec == spec
    assert job.events == [] and job.result is None and job.error is None
    assert not job.cancel_requested
    assert_utc(job.created_at)

    assert store.get_job(job.id) == job
    assert store.get_job(job.id, "acme") == job
    assert store.get_job("job_000000000000000000000000") is None


def test_ids_sort_in_creation_order(store: JobStore) -> None:
    ids = [new_job(store, n=i).id for i in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


def test_tenant_scoping(store: JobStore) -> None:
    job = new_job(store, "acme")
    assert store.get_job(job.id, "globex") is None
    assert store.list_jobs("globex", None, 10, None) == ([], None)
    assert store.request_cancel(job.id, "globex") is None
    got = store.get_job(job.id, "acme")
    assert got is not None and got.status == "queued" and not got.cancel_requested


def test_idempotency_same_body_returns_existing(store: JobStore) -> None:
    spec = make_spec(1)
    first, created = store.create_job("acme", spec, digest(spec), "key-1")
    again, created_again = store.create_job("acme", spec, digest(spec), "key-1")
    assert created and not created_again
    assert again.id == first.id
    # The key is per tenant; no key means no deduplication.
    other, other_created = store.create_job("globex", spec, digest(spec), "key-1")
    assert other_created and other.id != first.id
    a, _ = store.create_job("acme", spec, digest(spec), None)
    b, _ = store.create_job("acme", spec, digest(spec), None)
    assert a.id != b.id
    assert count_rows(store, "jobs") == 4


def test_idempotency_different_body_conflicts(store: JobStore) -> None:
    spec, other = make_spec(1), make_spec(2)
    first, _ = store.create_job("acme", spec, digest(spec), "key-1")
    with pytest.raises(IdempotencyConflict) as info:
        store.create_job("acme", other, digest(other), "key-1")
    assert info.value.job_id == first.id
    assert count_rows(store, "jobs") == 1


def test_concurrent_create_with_same_key_gives_one_job(store: JobStore) -> None:
    spec = make_spec(1)
    results = race(8, lambda _: store.create_job("acme", spec, digest(spec), "same-key"))
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert count_rows(store, "jobs") == 1


def test_create_recovers_when_insert_loses_the_race(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the interleaving "both read nothing, the other one inserted first": the unique
    # constraint must stop the second insert and the store must answer with the first job.
    spec = make_spec(1)
    first, _ = store.create_job("acme", spec, digest(spec), "key-1")
    real = store._idempotent_match
    calls = {"n": 0}

    def miss_once(*args: Any) -> Job | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else real(*args)

    monkeypatch.setattr(store, "_idempotent_match", miss_once)
    job, created = store.create_job("acme", spec, digest(spec), "key-1")
    assert (job.id, created) == (first.id, False)
    other = make_spec(2)
    calls["n"] = 0
    with pytest.raises(IdempotencyConflict):
        store.create_job("acme", other, digest(other), "key-1")
    assert calls["n"] == 2
    assert count_rows(store, "jobs") == 1


def test_list_pagination_status_filter_and_bad_cursor(store: JobStore) -> None:
    jobs = [new_job(store, "acme", n=i) for i in range(7)]
    new_job(store, "globex")
    for job in jobs[1:4]:
        assert store.claim(job.id, "w1") is not None
    newest_first = [job.id for job in reversed(jobs)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = store.list_jobs("acme", None, 3, cursor)
        pages += 1
        seen += [job.id for job in page]
        assert len(page) <= 3
        if cursor is None:
            break
    assert seen == newest_first
    assert pages == 3

    running, cursor = store.list_jobs("acme", "running", 2, None)
    assert [j.id for j in running] == [jobs[3].id, jobs[2].id]
    assert all(j.status == "running" for j in running)
    assert cursor is not None
    rest, end = store.list_jobs("acme", "running", 2, cursor)
    assert [j.id for j in rest] == [jobs[1].id]
    assert end is None

    queued, end = store.list_jobs("acme", "queued", 10, None)
    assert [j.id for j in queued] == [jobs[6].id, jobs[5].id, jobs[4].id, jobs[0].id]
    assert end is None
    # Exactly one full page: no next cursor.
    assert store.list_jobs("acme", "queued", 4, None)[1] is None
    assert store.list_jobs("acme", "failed", 10, None) == ([], None)

    for bad in [
        "!!!",
        "",
        "bm90LWFuLWlk",
        "é",
        encode_cursor("job_XYZ"),
        encode_cursor("job_" + "0" * 24 + "\n"),
    ]:
        with pytest.raises(ValueError):
            store.list_jobs("acme", None, 3, bad)
    with pytest.raises(ValueError):
        store.list_jobs("acme", "bogus", 3, None)
    with pytest.raises(ValueError):
        store.list_jobs("acme", None, 0, None)


def test_cancel_queued_job_never_starts(store: JobStore) -> None:
    job = new_job(store)
    cancelled = store.request_cancel(job.id, "acme")
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    assert_utc(cancelled.finished_at)
    assert store.claim(job.id, "w1") is None
    got = store.get_job(job.id)
    assert got is not None and got.status == "cancelled" and got.started_at is None


def test_cancel_running_sets_flag(store: JobStore) -> None:
    job = new_job(store)
    assert store.claim(job.id, "w1") is not None
    assert not store.is_cancel_requested(job.id)
    after = store.request_cancel(job.id, "acme")
    assert after is not None
    assert after.status == "running" and after.cancel_requested and after.finished_at is None
    assert store.is_cancel_requested(job.id)
    store.finish(job.id, "cancelled")
    got = store.get_job(job.id)
    assert got is not None and got.status == "cancelled"
    assert_utc(got.finished_at)


def test_cancel_terminal_or_unknown(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job.id, "w1")
    store.finish(job.id, "succeeded", result={"uri": "local://jobs/x"})
    after = store.request_cancel(job.id, "acme")
    assert after is not None
    assert after.status == "succeeded" and not after.cancel_requested
    assert store.request_cancel("job_000000000000000000000000", "acme") is None
    assert not store.is_cancel_requested("job_000000000000000000000000")


def test_claim_is_exclusive_under_concurrency(store: JobStore) -> None:
    for _ in range(3):
        job = new_job(store)
        results = race(8, lambda i, job_id=job.id: store.claim(job_id, f"w{i}"))
        winners = [(i, r) for i, r in enumerate(results) if r is not None]
        assert len(winners) == 1
        i, claimed = winners[0]
        assert claimed.status == "running"
        assert_utc(claimed.started_at)
        with store.engine.connect() as conn:
            worker, attempts = conn.execute(
                text("SELECT worker, attempts FROM jobs WHERE id = :id"), {"id": job.id}
            ).one()
        assert (worker, attempts) == (f"w{i}", 1)


def test_cancel_racing_claim_is_consistent(store: JobStore) -> None:
    for _ in range(8):
        job = new_job(store)

        def act(i: int, job_id: str = job.id) -> Job | None:
            if i == 0:
                return store.claim(job_id, "w1")
            return store.request_cancel(job_id, "acme")

        claimed, _ = race(2, act)
        final = store.get_job(job.id)
        assert final is not None
        if claimed is None:
            assert final.status == "cancelled" and final.started_at is None
        else:
            # The claim won: the job runs, and the cancel became a request to stop.
            assert final.status == "running" and final.cancel_requested


def test_progress_events_and_finish_round_trip(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job.id, "w1")
    store.set_progress(job.id, "merge", 3, 10, "tensors")
    store.add_event(job.id, "stage", "merge started", {"modules": 10})
    store.add_event(job.id, "log", "halfway")
    store.set_progress(job.id, None, 5, 10, "tensors")  # stage stays "merge"
    mid = store.get_job(job.id)
    assert mid is not None
    assert mid.stage == "merge"
    assert (mid.progress.done, mid.progress.total, mid.progress.unit) == (5, 10, "tensors")

    result = {
        "uri": "local://jobs/x/output",
        "files": [{"path": "model.safetensors", "sha256": "ab" * 32, "bytes": 1234}],
        "metrics": {"loss": 0.25},
    }
    store.finish(job.id, "succeeded", result=result)
    done = store.get_job(job.id)
    assert done is not None
    assert done.status == "succeeded"
    assert done.result is not None
    assert done.result.uri == result["uri"]
    assert done.result.files[0].sha256 == "ab" * 32 and done.result.files[0].bytes == 1234
    assert done.result.metrics == {"loss": 0.25}
    assert done.error is None
    assert done.progress.done == 5 and done.stage == "merge"  # kept after finishing
    for value in (done.created_at, done.started_at, done.finished_at):
        assert_utc(value)
    assert done.created_at <= done.started_at <= done.finished_at  # type: ignore[operator]
    assert [(e.kind, e.message, e.data) for e in done.events] == [
        ("stage", "merge started", {"modules": 10}),
        ("log", "halfway", None),
    ]
    for e in done.events:
        assert_utc(e.at)
    # The same view through the list endpoint.
    listed, _ = store.list_jobs("acme", "succeeded", 10, None)
    assert listed == [done]


def test_finish_failed_and_first_outcome_wins(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job.id, "w1")
    error = {"code": "shape_mismatch", "message": "q_proj differs", "detail": {"layer": 3}}
    store.finish(job.id, "failed", error=error)
    store.finish(job.id, "succeeded", result={"uri": "local://late"})
    got = store.get_job(job.id)
    assert got is not None
    assert got.status == "failed" and got.result is None
    assert got.error is not None and got.error.code == "shape_mismatch"
    assert got.error.detail == {"layer": 3}
    with pytest.raises(ValueError):
        store.finish(job.id, "running")


def test_events_keep_the_last_100(store: JobStore) -> None:
    job = new_job(store)
    other = new_job(store, n=1)
    for i in range(105):
        store.add_event(job.id, "log", f"event {i}")
    store.add_event(other.id, "log", "other job")
    got = store.get_job(job.id)
    assert got is not None
    assert [e.message for e in got.events] == [f"event {i}" for i in range(5, 105)]
    listed, _ = store.list_jobs("acme", None, 10, None)
    by_id = {j.id: j for j in listed}
    assert len(by_id[job.id].events) == 100
    assert [e.message for e in by_id[other.id].events] == ["other job"]


# -- schema ----------------------------------------------------------------------------------


def test_migrate_twice_is_a_noop(store: JobStore) -> None:
    job = new_job(store)
    tables = set(inspect(store.engine).get_table_names())
    store.migrate()
    store.migrate()
    assert set(inspect(store.engine).get_table_names()) == tables
    assert {"jobs", "job_events", "api_keys", "alembic_version"} <= tables
    assert store.current_revision() == head_revision() == "0004"
    assert store.get_job(job.id) == job


def test_models_match_migrations(store: JobStore) -> None:
    # A model changed without a migration (or the reverse) shows up as a diff here.
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_concurrent_migrate_from_two_processes(fresh_url: str, tmp_path: Path) -> None:
    # Both processes wait on a file barrier, then migrate the empty database at once.
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from crucible.store import JobStore
        url, folder, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
        store = JobStore(url)
        (folder / me).touch()
        deadline = time.time() + 60
        while len(list(folder.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.001)
        store.migrate()
        store.ping()
        """
    )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, fresh_url, str(barrier), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    store = JobStore(fresh_url)
    try:
        assert store.current_revision() == head_revision()
        new_job(store)
    finally:
        store.close()


def test_ping(store: JobStore, tmp_path: Path) -> None:
    store.ping()
    with pytest.raises(Exception):  # noqa: B017 - any driver error will do
        JobStore("postgresql+psycopg://postgres@127.0.0.1:1/nope").ping()


def test_sqlite_file_is_shared_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'crucible.db'}"
    api, worker = JobStore(url), JobStore(url)
    try:
        api.migrate()
        with worker.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 5000
        job = new_job(api)
        assert worker.claim(job.id, "w1") is not None
        got = api.get_job(job.id)
        assert got is not None and got.status == "running"
    finally:
        api.close()
        worker.close()
    with pytest.raises(ValueError):
        JobStore("sqlite://")


def test_alembic_revision_renders_from_template(tmp_path: Path) -> None:
    # Later schema changes start with `alembic revision`; its template must produce a
    # migration that chains onto ours and runs.
    versions = tmp_path / "versions"
    versions.mkdir()
    cfg = alembic_config()
    cfg.set_main_option(
        "version_locations", os.pathsep.join([str(MIGRATIONS_DIR / "versions"), str(versions)])
    )
    head = head_revision()
    assert head is not None
    rev = f"{int(head) + 1:04d}"
    command.revision(cfg, "add something", rev_id=rev, version_path=str(versions))
    [path] = versions.glob(f"{rev}_*.py")
    spec = importlib.util.spec_from_file_location(f"rev{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.revision, module.down_revision) == (rev, head)

    store = JobStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        assert store.current_revision() == rev
    finally:
        store.close()


def test_store_does_not_import_torch() -> None:
    code = "import sys, crucible.store; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- API keys --------------------------------------------------------------------------------


def test_api_keys_create_verify_revoke(store: JobStore) -> None:
    key_id, plaintext = store.create_api_key("acme", label="ci")
    other_id, other_plain = store.create_api_key("globex")
    assert plaintext.startswith(f"crk_{key_id}_")
    assert len(plaintext.split("_", 2)[2]) >= 43  # 32 random bytes
    assert store.verify_api_key(plaintext) == "acme"
    assert store.verify_api_key(other_plain) == "globex"

    [listed] = store.list_api_keys("acme")
    assert set(listed) == {"id", "tenant", "label", "created_at", "revoked_at"}
    assert (listed["id"], listed["tenant"], listed["label"]) == (key_id, "acme", "ci")
    assert_utc(listed["created_at"])
    assert listed["revoked_at"] is None
    assert {k["id"] for k in store.list_api_keys()} == {key_id, other_id}

    assert store.revoke_api_key(key_id) is True
    assert store.verify_api_key(plaintext) is None
    assert store.revoke_api_key(key_id) is True  # idempotent
    assert store.revoke_api_key("0000000000000000") is False
    assert_utc(store.list_api_keys("acme")[0]["revoked_at"])
    assert store.verify_api_key(other_plain) == "globex"


def test_api_keys_malformed_or_forged(store: JobStore) -> None:
    key_id, plaintext = store.create_api_key("acme")
    other_id, _ = store.create_api_key("globex")
    secret = plaintext.split("_", 2)[2]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in [
        "",
        "crk_",
        "garbage",
        plaintext + "\n",
        plaintext.replace("crk_", "xyz_", 1),
        f"crk_{key_id}_{flipped}",  # right id, wrong secret
        f"crk_{other_id}_{secret}",  # right secret, another key's id
        f"crk_{key_id.upper()}_{secret}",
        f"crk_{key_id}_{secret}x",
        f"crk_0000000000000000_{secret}",
    ]:
        assert store.verify_api_key(bad) is None, bad


def test_job_for_key_checks_the_key_and_the_tenant_in_one_read(store: JobStore) -> None:
    """The status read's combined key check and job read answers exactly as
    verify_api_key followed by get_job(tenant) would."""
    key_id, key = store.create_api_key("acme")
    _, other_key = store.create_api_key("globex")
    job = new_job(store, "acme")
    store.add_event(job.id, "stage", "resolve", {"n": 1})
    tenant, got = store.job_for_key(key, job.id)
    assert tenant == "acme" and got == store.get_job(job.id, "acme")
    assert got is not None and [e.message for e in got.events][-1] == "resolve"
    assert store.job_for_key(other_key, job.id) == ("globex", None)  # not globex's: 404
    assert store.job_for_key(key, "job_does_not_exist") == ("acme", None)
    secret = key.split("_", 2)[2]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in ["", "garbage", f"crk_{key_id}_{flipped}", f"crk_0000000000000000_{secret}"]:
        assert store.job_for_key(bad, job.id) == (None, None), bad
    store.revoke_api_key(key_id)
    assert store.job_for_key(key, job.id) == (None, None)  # revoked: 401 at once


def test_reads_survive_connections_cut_by_the_server(pg_url: str) -> None:
    """Pooled read connections cut by PostgreSQL (as a restart does) cost a read nothing:
    the read engine has no pre-ping, so the dead connection is found by the query, the
    pool is invalidated and the read runs once more."""
    store = JobStore(pg_url)
    try:
        store.migrate()
        _, key = store.create_api_key("acme")
        job = new_job(store, "acme")
        assert store.job_for_key(key, job.id)[1] is not None  # a pooled read connection
        killer = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with killer.connect() as conn:
            cut = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        killer.dispose()
        assert cut >= 1
        tenant, got = store.job_for_key(key, job.id)
        assert tenant == "acme" and got is not None and got.id == job.id
        assert store.verify_api_key(key) == "acme"
        assert store.get_job(job.id) is not None
    finally:
        store.close()


def test_database_never_holds_the_plaintext_key(store: JobStore, tmp_path: Path) -> None:
    keys = [store.create_api_key("acme", label=f"k{i}") for i in range(3)]
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).all()
    assert len(rows) == 3
    dump = "\n".join(str(value) for row in rows for value in row)
    for _key_id, plaintext in keys:
        secret = plaintext.split("_", 2)[2]
        assert plaintext not in dump and secret not in dump
        # What is stored is the sha256 of the secret.
        assert hashlib.sha256(secret.encode()).hexdigest() in dump
    if store.dialect == "sqlite":
        # Not in any page of the file either (main file or write-ahead log).
        db = Path(store.engine.url.database or "")
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        for _, plaintext in keys:
            assert plaintext.split("_", 2)[2].encode() not in raw


# -- leases, the reaper, the publish marker (issue 6) ------------------------------------------


def expire_lease(store: JobStore, job_id: str) -> None:
    """What the passing of time does to a lease nobody renews."""
    with store.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(lease_expires_at=now_utc() - timedelta(seconds=5))
        )


def test_claim_takes_a_lease_that_only_its_owner_renews(store: JobStore) -> None:
    job = new_job(store)
    assert store.claim(job.id, "w1", lease_seconds=30) is not None
    held = store.ownership(job.id)
    assert held is not None and held.status == "running"
    assert held.worker == "w1" and held.attempts == 1
    assert_utc(held.heartbeat_at)
    assert held.lease_expires_at is not None and held.heartbeat_at is not None
    assert held.lease_expires_at - held.heartbeat_at == timedelta(seconds=30)

    assert store.heartbeat(job.id, "w1", 120) is True
    renewed = store.ownership(job.id)
    assert renewed is not None and renewed.lease_expires_at is not None
    assert renewed.lease_expires_at - held.lease_expires_at > timedelta(seconds=80)
    # Another worker neither renews the lease nor records an outcome.
    assert store.heartbeat(job.id, "w2", 600) is False
    assert store.ownership(job.id) == renewed
    error = {"code": "internal", "message": "x"}
    assert store.finish(job.id, "failed", error=error, owner="w2") is False
    assert store.get_job(job.id).status == "running"  # type: ignore[union-attr]
    assert store.finish(job.id, "failed", error=error, owner="w1") is True
    assert store.get_job(job.id).status == "failed"  # type: ignore[union-attr]
    # A finished job has no lease to renew.
    assert store.heartbeat(job.id, "w1", 60) is False


def test_take_over_only_after_the_lease_expired_and_within_max_attempts(store: JobStore) -> None:
    job = new_job(store)
    first = store.claim(job.id, "w1", lease_seconds=60)
    assert first is not None and first.started_at is not None
    assert store.take_over(job.id, "w2", 60, max_attempts=3) is None  # live lease
    expire_lease(store, job.id)
    taken = store.take_over(job.id, "w2", 60, max_attempts=3)
    assert taken is not None and taken.status == "running"
    assert taken.started_at == first.started_at  # the job started when its first attempt did
    held = store.ownership(job.id)
    assert held is not None and held.worker == "w2" and held.attempts == 2
    assert store.heartbeat(job.id, "w1", 60) is False  # the dead worker's lease is gone

    expire_lease(store, job.id)
    assert store.take_over(job.id, "w3", 60, max_attempts=2) is None  # attempts spent
    assert store.fail_expired(job.id, max_attempts=3) is False  # one attempt left under 3
    assert store.fail_expired(job.id, max_attempts=2) is True
    assert store.fail_expired(job.id, max_attempts=2) is False  # once
    final = store.get_job(job.id)
    assert final is not None and final.status == "failed" and final.error is not None
    assert final.error.code == "worker_lost" and "2 attempt" in final.error.message
    assert_utc(final.finished_at)


def test_take_over_race_has_one_winner(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job.id, "w0", lease_seconds=60)
    expire_lease(store, job.id)
    results = race(8, lambda i: store.take_over(job.id, f"w{i + 1}", 60, max_attempts=5))
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1
    held = store.ownership(job.id)
    assert held is not None and held.worker == f"w{winners[0] + 1}" and held.attempts == 2


def test_concurrent_reapers_requeue_each_expired_job_once(store: JobStore, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "settings", max_attempts=3)
    live, lost, spent = new_job(store, n=1), new_job(store, n=2), new_job(store, n=3)
    for job in (live, lost, spent):
        store.claim(job.id, "w1", lease_seconds=60)
    with store.engine.begin() as conn:
        conn.execute(update(JobRow).where(JobRow.id == spent.id).values(attempts=3))
    expire_lease(store, lost.id)
    expire_lease(store, spent.id)
    sent: list[str] = []
    results = race(4, lambda i: reap_once(store, settings, sent.append))

    assert sent == [lost.id], "exactly one reaper sends the task again"
    assert sorted(j for r in results for j in r.requeued) == [lost.id]
    assert sorted(j for r in results for j in r.failed) == [spent.id]
    requeued = store.ownership(lost.id)
    assert requeued is not None and requeued.status == "queued" and requeued.worker is None
    failed = store.get_job(spent.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and failed.error.code == "worker_lost"
    untouched = store.ownership(live.id)
    assert untouched is not None and untouched.status == "running" and untouched.worker == "w1"
    assert any(e.kind == "requeued" for e in store.get_job(lost.id).events)  # type: ignore[union-attr]
    # The requeued job is claimed like a new one: a second attempt.
    assert store.claim(lost.id, "w2", lease_seconds=60) is not None
    assert store.ownership(lost.id).attempts == 2  # type: ignore[union-attr]
    assert reap_once(store, settings, sent.append).requeued == []


def test_reaper_keeps_a_job_it_could_not_send(store: JobStore, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "settings", max_attempts=3)
    job = new_job(store)
    store.claim(job.id, "w1", lease_seconds=60)
    expire_lease(store, job.id)

    def broker_down(job_id: str) -> None:
        raise ConnectionError("broker down")

    result = reap_once(store, settings, broker_down)
    assert result.unsent == [job.id] and result.requeued == []
    held = store.ownership(job.id)
    assert held is not None and held.status == "running"  # expired: the next pass retries
    sent: list[str] = []
    assert reap_once(store, settings, sent.append).requeued == [job.id] == sent


def test_publish_marker_is_set_once(store: JobStore) -> None:
    job = new_job(store)
    store.claim(job.id, "w1", lease_seconds=60)
    result = {"uri": f"local://jobs/{job.id}/output", "files": [], "metrics": {"x": 1}}
    outcomes = race(6, lambda i: store.record_publish(job.id, "w1", result))
    assert outcomes.count(True) == 1
    held = store.ownership(job.id)
    assert held is not None and held.status == "running"
    assert_utc(held.published_at)
    assert held.result is not None and held.result["uri"] == result["uri"]
    assert held.result["metrics"] == {"x": 1}
    # Not by another worker, not again after a take-over.
    assert store.record_publish(job.id, "w2", result) is False
    expire_lease(store, job.id)
    assert store.take_over(job.id, "w2", 60, max_attempts=3) is not None
    assert store.record_publish(job.id, "w2", result) is False
    assert store.ownership(job.id).published_at == held.published_at  # type: ignore[union-attr]


def test_reaper_resends_a_job_left_queued_once_per_period(store: JobStore, tmp_path: Path) -> None:
    """An API that died between storing a job and sending its task leaves a queued job
    with no message; the reaper sends it again, once per `queued_resend_seconds`."""
    settings = Settings(data_dir=tmp_path / "settings", queued_resend_seconds=60)
    old, fresh = new_job(store, n=1), new_job(store, n=2)
    with store.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.id == old.id)
            .values(created_at=now_utc() - timedelta(seconds=120))
        )
    sent: list[str] = []
    results = race(4, lambda i: reap_once(store, settings, sent.append))
    assert sent == [old.id] and sorted(j for r in results for j in r.resent) == [old.id]
    assert reap_once(store, settings, sent.append).resent == []  # not again within 60 s
    held = store.ownership(old.id)
    assert held is not None and held.status == "queued"
    assert_utc(held.heartbeat_at)  # when the task was last sent
    assert store.ownership(fresh.id).heartbeat_at is None  # type: ignore[union-attr]
    # Claimed jobs are not queued any more: nothing to resend.
    assert store.claim(old.id, "w1", lease_seconds=60) is not None
    with store.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.id == old.id)
            .values(heartbeat_at=now_utc() - timedelta(seconds=120))
        )
    assert reap_once(store, settings, sent.append).resent == []
