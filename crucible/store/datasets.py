"""Dataset records (tenant-scoped) and tuning-trial records: JobStore mixins.

A dataset row points at a content-addressed blob (crucible.datasets.storage); rows of
several tenants may share one blob, which goes with the last row that uses it.
"""

from __future__ import annotations

import math
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crucible.artifacts import ArtifactStore, artifact_store
from crucible.datasets.formats import DatasetFormat
from crucible.datasets.schema import DatasetSummary
from crucible.datasets.storage import BlobWriter, DatasetHandle, blob_key, blob_lock, blob_path
from crucible.store.cursors import decode_cursor, encode_cursor, new_sortable_id
from crucible.store.models import DatasetRow, TrialRow, now_utc

DATASET_ID = re.compile(r"ds_[0-9a-f]{24}")


def new_dataset_id() -> str:
    """``ds_`` + 24 hex, sorting in creation order like job ids."""
    return "ds_" + new_sortable_id()


def _handle(row: DatasetRow, artifacts_root: Path) -> DatasetHandle:
    fmt: DatasetFormat = row.format  # type: ignore[assignment]
    return DatasetHandle(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        sha256=row.sha256,
        path=blob_path(artifacts_root, row.sha256, fmt),
        format=fmt,
        schema=row.row_schema,  # type: ignore[arg-type]
        rows=row.rows,
        labels=[item["label"] for item in row.labels],
        bytes=row.bytes,
        created_at=row.created_at,
        label_counts=[item["count"] for item in row.labels],
        filename=row.filename,
    )


class DatasetMixin:
    """Dataset methods of JobStore (same database, same transactions)."""

    dialect: str

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    @property
    def artifacts_root(self) -> Path:
        raise NotImplementedError

    @property
    def artifacts(self) -> ArtifactStore:
        """Where blobs are kept durably: the local folder, or CRUCIBLE_ARTIFACTS_URI (read from
        the environment, like the artifact folder's default) with the folder as its cache."""
        store: ArtifactStore | None = getattr(self, "_artifact_store", None)
        if store is None or store.root != self.artifacts_root:
            from crucible.settings import get_settings

            store = artifact_store(get_settings(), self.artifacts_root)
            self._artifact_store = store
        return store

    def _blob_in_use(self, session: Session, sha256: str, fmt: str) -> bool:
        count = session.execute(
            select(func.count())
            .select_from(DatasetRow)
            .where(DatasetRow.sha256 == sha256, DatasetRow.format == fmt)
        ).scalar_one()
        return bool(count)

    def add_dataset(
        self,
        tenant: str,
        blob: BlobWriter,
        fmt: DatasetFormat,
        summary: DatasetSummary,
        name: str,
        filename: str | None = None,
    ) -> DatasetHandle:
        """Place the validated blob (unless the same bytes are already there) and record it.

        On any failure the new row is absent and the blob is removed unless another row
        uses it; the caller's BlobWriter removes its temporary file.
        """
        root = self.artifacts_root
        if blob.artifacts_root != root:
            raise ValueError(f"blob written under {blob.artifacts_root}, store uses {root}")
        with blob_lock(root):
            placed = blob.commit(fmt)
            try:
                # Stored durably before the row exists: a row never names a missing blob.
                self.artifacts.put_file(placed, blob_key(blob.sha256, fmt))
                with self._tx(write=True) as session:
                    row = DatasetRow(
                        id=new_dataset_id(),
                        tenant=tenant,
                        name=name,
                        filename=filename,
                        format=fmt,
                        row_schema=summary.schema,
                        rows=summary.rows,
                        bytes=blob.bytes,
                        sha256=blob.sha256,
                        labels=summary.labels,
                        created_at=now_utc(),
                    )
                    session.add(row)
                    session.flush()
                    return _handle(row, root)
            except BaseException:
                with self._tx() as session:
                    in_use = self._blob_in_use(session, blob.sha256, fmt)
                if not in_use:
                    blob_path(root, blob.sha256, fmt).unlink(missing_ok=True)
                    if self.artifacts.remote:
                        self.artifacts.delete(blob_key(blob.sha256, fmt))
                raise

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetHandle | None:
        """The tenant's dataset; another tenant's is None, as if it did not exist."""
        with self._tx() as session:
            row = session.execute(
                select(DatasetRow).where(DatasetRow.id == dataset_id, DatasetRow.tenant == tenant)
            ).scalar_one_or_none()
            return None if row is None else _handle(row, self.artifacts_root)

    def fetch_dataset(self, tenant: str, dataset_id: str) -> DatasetHandle | None:
        """get_dataset for a worker: with a remote artifact store, a blob this machine lacks
        (uploaded through an API elsewhere) is downloaded into the local folder first."""
        handle = self.get_dataset(tenant, dataset_id)
        if handle is not None and not handle.path.is_file() and self.artifacts.remote:
            self.artifacts.get_file(blob_key(handle.sha256, handle.format), handle.path)
        return handle

    def existing_dataset_ids(self, tenant: str, dataset_ids: list[str]) -> set[str]:
        """Which of these ids are the tenant's datasets."""
        if not dataset_ids:
            return set()
        with self._tx() as session:
            found = session.execute(
                select(DatasetRow.id).where(
                    DatasetRow.tenant == tenant, DatasetRow.id.in_(dataset_ids)
                )
            ).scalars()
            return set(found)

    def list_datasets(
        self, tenant: str, limit: int, cursor: str | None = None
    ) -> tuple[list[DatasetHandle], str | None]:
        """A page of the tenant's datasets, newest first, and the cursor of the next page;
        ValueError for a malformed cursor."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = select(DatasetRow).where(DatasetRow.tenant == tenant)
        if cursor is not None:
            query = query.where(DatasetRow.id < decode_cursor(cursor, DATASET_ID))
        query = query.order_by(DatasetRow.id.desc()).limit(limit + 1)
        with self._tx() as session:
            rows = list(session.execute(query).scalars())
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
        return [_handle(row, self.artifacts_root) for row in page], next_cursor

    def delete_dataset(self, tenant: str, dataset_id: str) -> bool:
        """Remove the tenant's dataset; its blob goes too unless another row uses it.
        False when the tenant has no such dataset."""
        root = self.artifacts_root
        with blob_lock(root):
            with self._tx(write=True) as session:
                row = session.execute(
                    select(DatasetRow.sha256, DatasetRow.format).where(
                        DatasetRow.id == dataset_id, DatasetRow.tenant == tenant
                    )
                ).one_or_none()
                if row is None:
                    return False
                session.execute(delete(DatasetRow).where(DatasetRow.id == dataset_id))
                in_use = self._blob_in_use(session, row.sha256, row.format)
            if not in_use:
                blob_path(root, row.sha256, row.format).unlink(missing_ok=True)
                if self.artifacts.remote:
                    self.artifacts.delete(blob_key(row.sha256, row.format))
        return True


def _objective(item: dict[str, Any]) -> float | None:
    value = item.get("objective")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def best_trial(items: list[dict[str, Any]]) -> int | None:
    """The index of the trial with the largest finite `objective` (the first on ties)."""
    best: tuple[float, int] | None = None
    for item in items:
        score = _objective(item)
        if score is not None and (best is None or score > best[0]):
            best = (score, item["index"])
    return None if best is None else best[1]


class TrialMixin:
    """Tuning-trial methods of JobStore."""

    dialect: str

    def _tx(self, write: bool = False) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def add_trial(self, job_id: str, index: int, data: dict[str, Any]) -> None:
        """Record trial `index` of the job; recording the same index again overwrites it.
        ValueError when the job does not exist."""
        insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        stmt = insert(TrialRow).values(job_id=job_id, index=index, data=data, created_at=now_utc())
        stmt = stmt.on_conflict_do_update(
            index_elements=[TrialRow.job_id, TrialRow.index],
            set_={"data": stmt.excluded.data, "created_at": stmt.excluded.created_at},
        )
        try:
            with self._tx(write=True) as session:
                session.execute(stmt)
        except IntegrityError as exc:
            raise ValueError(f"no job {job_id!r} to record trial {index} for") from exc

    def list_trials(self, job_id: str) -> list[dict[str, Any]]:
        """The job's trials ordered by index, each its recorded data plus "index"."""
        with self._tx() as session:
            rows = session.execute(
                select(TrialRow.index, TrialRow.data)
                .where(TrialRow.job_id == job_id)
                .order_by(TrialRow.index)
            )
            return [{**row.data, "index": row.index} for row in rows]
