"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crucible.store import JobStore
from tests.support.faults import OwnPostgres
from tests.support.postgres import throwaway_postgres_url


@pytest.fixture(scope="module")
def postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL cluster of the module's own, which fault tests may stop and start."""
    pg = OwnPostgres().init()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """A migrated JobStore on each backend: a SQLite file, then a throwaway PostgreSQL
    database (a module that needs another setup defines its own `store`)."""
    if request.param == "sqlite":
        s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "artifacts")
        s.migrate()
        yield s
        s.close()
        return
    with throwaway_postgres_url() as url:
        s = JobStore(url, tmp_path / "artifacts")
        s.migrate()
        yield s
        s.close()
