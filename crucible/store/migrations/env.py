"""Alembic environment for the Crucible store.

Normally driven from code (``JobStore.migrate``), which hands over an open connection in
``config.attributes["connection"]`` with the migration lock already held. When run from the
alembic CLI (``alembic -c crucible/store/alembic.ini ...``) it connects to
``sqlalchemy.url`` or, failing that, to the configured Crucible database.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from crucible.store.models import Base

config = context.config
target_metadata = Base.metadata

# Only the CLI configures logging; a service calling migrate() keeps its own logging setup.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from crucible.settings import get_settings

    return get_settings().resolved_database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from crucible.store.job_store import make_engine  # WAL, busy_timeout, pre-ping

    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
