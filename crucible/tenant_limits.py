"""The per-tenant limit on input bytes, checked by the worker once a job's inputs are resolved
(only then are their sizes known). Torch-free.

The bytes are `crucible.sources.resolve.input_bytes` of the job's resolved models. The
job's input bytes are recorded in its row first, then the tenant's other running jobs
are summed: of two jobs racing past the limit, the later one to check sees both, so the
limit is never exceeded (at worst both fail, each naming the limit).
"""

from __future__ import annotations

from sqlalchemy import func, select, update

from crucible.errors import CrucibleError
from crucible.settings import Settings
from crucible.store import JobStore
from crucible.store.models import JobRow


def admit_input_bytes(store: JobStore, job_id: str, nbytes: int, settings: Settings) -> None:
    """Record `nbytes` as the job's input bytes; raise limit_exceeded when they and the
    tenant's other running jobs' exceed `max_input_bytes_per_tenant`."""
    limit = settings.max_input_bytes_per_tenant
    with store.engine.begin() as conn:
        conn.execute(update(JobRow).where(JobRow.id == job_id).values(input_bytes=nbytes))
    tenant = select(JobRow.tenant).where(JobRow.id == job_id).scalar_subquery()
    others = select(func.coalesce(func.sum(JobRow.input_bytes), 0)).where(
        JobRow.tenant == tenant, JobRow.status == "running", JobRow.id != job_id
    )
    with store.engine.connect() as conn:
        running = int(conn.execute(others).scalar_one())
    if running + nbytes > limit:
        raise CrucibleError(
            "limit_exceeded",
            f"this job reads {nbytes} bytes of weights and the tenant's other running jobs "
            f"{running}; together that exceeds max_input_bytes_per_tenant ({limit} bytes)",
            {
                "limit": limit,
                "setting": "max_input_bytes_per_tenant",
                "input_bytes": nbytes,
                "running_input_bytes": running,
            },
        )
