"""Job, job-event and API-key records (SQLAlchemy 2; SQLite by default, PostgreSQL).

Torch-free: the API process imports this.
"""

from crucible.store.job_store import (
    EVENTS_PER_JOB,
    IdempotencyConflict,
    JobStore,
    TooManyJobs,
    alembic_config,
    head_revision,
)

__all__ = [
    "EVENTS_PER_JOB",
    "IdempotencyConflict",
    "JobStore",
    "TooManyJobs",
    "alembic_config",
    "head_revision",
]
