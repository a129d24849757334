"""Dataset blobs in the artifact store, addressed by content: datasets/<sha256>.<format>.

An upload is written to a temporary file in the same folder (hashed as it is written),
validated, then renamed into place with os.replace: a blob is either whole or absent. Two
tenants uploading the same bytes share one blob; the store removes it with its last row.
Placing and removing blobs happen under an exclusive file lock (blob_lock), so a delete
that finds no other row never unlinks a blob a concurrent upload has just placed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from crucible.datasets.formats import DatasetFormat
from crucible.datasets.schema import Label, SchemaName, iter_valid_rows
from crucible.datasets.split import split_indices
from crucible.spec import SplitSpec

TEMP_PREFIX = ".upload-"


def datasets_dir(artifacts_root: Path) -> Path:
    return artifacts_root / "datasets"


def blob_path(artifacts_root: Path, sha256: str, fmt: DatasetFormat) -> Path:
    return datasets_dir(artifacts_root) / f"{sha256}.{fmt}"


def blob_key(sha256: str, fmt: DatasetFormat) -> str:
    """The blob's key in the artifact store (crucible.artifacts): its path under the root."""
    return f"datasets/{sha256}.{fmt}"


@contextmanager
def blob_lock(artifacts_root: Path) -> Iterator[None]:
    """Exclusive across processes sharing the artifact folder (flock on a lock file)."""
    artifacts_root.mkdir(parents=True, exist_ok=True)
    with (artifacts_root / ".datasets.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class BlobWriter:
    """A temporary file in the datasets folder, hashed and size-checked as it is written.

    Use as a context manager: leaving the block without commit() removes the file.
    """

    def __init__(self, artifacts_root: Path, max_bytes: int) -> None:
        self.artifacts_root = artifacts_root
        self.max_bytes = max_bytes
        folder = datasets_dir(artifacts_root)
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=folder)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.bytes = 0

    def write(self, chunk: bytes) -> None:
        """Append; TooLarge as soon as the total passes max_bytes (nothing more is written)."""
        if self.bytes + len(chunk) > self.max_bytes:
            raise TooLarge(self.max_bytes)
        self._file.write(chunk)
        self._hash.update(chunk)
        self.bytes += len(chunk)

    def close(self) -> None:
        """Flush to disk; the file can then be read back (and validated)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self, fmt: DatasetFormat) -> Path:
        """Rename into place as datasets/<sha256>.<fmt> (the caller holds blob_lock)."""
        self.close()
        target = blob_path(self.artifacts_root, self.sha256, fmt)
        os.replace(self.path, target)
        return target

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # after commit() the temporary name no longer exists


@dataclass(frozen=True)
class DatasetHandle:
    """A stored dataset as the worker reads it (JobStore.get_dataset)."""

    id: str
    tenant: str
    name: str
    sha256: str
    path: Path
    format: DatasetFormat
    schema: SchemaName
    rows: int
    # Classification: the label values, sorted (ints numerically); [] otherwise.
    labels: list[Label]
    bytes: int
    created_at: datetime
    # How many rows carry each of `labels`, in the same order.
    label_counts: list[int] = field(default_factory=list)
    filename: str | None = None

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """The rows, streamed, as validated on upload (CSV integer labels are ints)."""
        return iter_valid_rows(self.path, self.format)

    def split(self, split: SplitSpec) -> tuple[list[int], list[int]]:
        """(validation, test) row indices; stratified by label for classification."""
        labels = None
        if self.schema == "classification":
            labels = [row["label"] for row in self.iter_rows()]
        return split_indices(self.rows, split, labels)

    def record(self) -> dict[str, Any]:
        """What the API answers: everything but the tenant and the server-side path."""
        return {
            "id": self.id,
            "name": self.name,
            "filename": self.filename,
            "format": self.format,
            "schema": self.schema,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "labels": [
                {"label": v, "count": c}
                for v, c in zip(self.labels, self.label_counts, strict=True)
            ],
            "created_at": self.created_at,
        }
