"""The artifact store: where datasets, Gram caches and job outputs are kept durably.

Keys are relative paths (`datasets/<sha256>.<fmt>`, `grams/<key>/<file>`,
`jobs/<id>/output/<path>`). With `CRUCIBLE_ARTIFACTS_URI` unset the store is the local
artifact folder itself (every call is a no-op or a plain file operation). With
`CRUCIBLE_ARTIFACTS_URI=s3://bucket/prefix` the objects live under that prefix and the local
folder is a working cache laid out the same way: writers put what they finished, readers on
another machine get it when their cache lacks it. Torch-free (the API uses it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crucible.retry import call_with_retries
from crucible.settings import Settings

_CHUNK = 1 << 20


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"malformed artifact key {key!r}")
    return key


class ArtifactStore:
    """The local folder as the store (the embedded default, and single-machine setups); the
    base of S3ArtifactStore, which keeps the same local layout as its cache."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def local_path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, src: Path, key: str) -> None:
        """Store `src` under `key` (a copy unless `src` is already the key's file)."""
        target = self.local_path(key)
        if src.resolve() != target.resolve():
            _copy_atomic(src, target)

    def get_file(self, key: str, dest: Path) -> bool:
        """Copy the key's file to `dest` (nothing to do when `dest` is it); False if absent."""
        src = self.local_path(key)
        if not src.is_file():
            return False
        if src.resolve() != dest.resolve():
            _copy_atomic(src, dest)
        return True

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def size(self, key: str) -> int | None:
        path = self.local_path(key)
        return path.stat().st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder key), sorted."""
        folder = self.local_path(prefix)
        if not folder.is_dir():
            return []
        return sorted(
            f"{prefix.rstrip('/')}/{p.relative_to(folder).as_posix()}"
            for p in folder.rglob("*")
            if p.is_file()
        )

    def open_range(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The key's bytes from `start`, `length` of them (to the end if None), in chunks."""
        with self.local_path(key).open("rb") as f:
            f.seek(start)
            left = length
            while left is None or left > 0:
                block = f.read(_CHUNK if left is None else min(_CHUNK, left))
                if not block:
                    return
                if left is not None:
                    left -= len(block)
                yield block


class S3ArtifactStore(ArtifactStore):
    """Objects under s3://bucket/prefix; `root` is the local working cache."""

    remote = True

    def __init__(self, root: Path, uri: str, settings: Settings) -> None:
        from crucible.s3 import S3Location, check_location

        super().__init__(root)
        check_location(uri)
        self.location = S3Location.parse(uri)
        self.settings = settings
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from crucible.s3 import s3_client

            self._client = s3_client(self.settings)
        return self._client

    def object_key(self, key: str) -> str:
        return self.location.key(_check_key(key))

    def put_file(self, src: Path, key: str) -> None:
        from crucible.s3 import transfer_config, unwrap_transfer_error

        def upload() -> None:
            try:
                self.client.upload_file(
                    str(src),
                    self.location.bucket,
                    self.object_key(key),
                    Config=transfer_config(self.settings),
                )
            except Exception as exc:
                raise unwrap_transfer_error(exc) from None

        call_with_retries(self.settings, f"store artifact {key}", upload)

    def get_file(self, key: str, dest: Path) -> bool:
        """Download into `dest` (through a temporary file renamed into place, so a reader of
        `dest` never sees part of it); False when there is no such object."""
        from crucible.s3 import is_not_found, transfer_config

        dest.parent.mkdir(parents=True, exist_ok=True)

        def download() -> bool:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
            os.close(fd)
            try:
                self.client.download_file(
                    self.location.bucket,
                    self.object_key(key),
                    tmp,
                    Config=transfer_config(self.settings),
                )
                os.replace(tmp, dest)
                return True
            except Exception as exc:
                if is_not_found(exc):
                    return False
                raise
            finally:
                Path(tmp).unlink(missing_ok=True)

        return call_with_retries(self.settings, f"fetch artifact {key}", download)

    def size(self, key: str) -> int | None:
        from crucible.s3 import is_not_found

        def head() -> int | None:
            try:
                meta = self.client.head_object(
                    Bucket=self.location.bucket, Key=self.object_key(key)
                )
                return int(meta["ContentLength"])
            except Exception as exc:
                if is_not_found(exc):
                    return None
                raise

        return call_with_retries(self.settings, f"look up artifact {key}", head)

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        call_with_retries(
            self.settings,
            f"delete artifact {key}",
            self.client.delete_object,
            Bucket=self.location.bucket,
            Key=self.object_key(key),
        )

    def list(self, prefix: str) -> list[str]:
        base = self.location.key(prefix.rstrip("/")) + "/"
        strip = len(self.location.key("")) + 1 if self.location.prefix else 0

        def keys() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=base
            )
            return sorted(o["Key"][strip:] for page in pages for o in page.get("Contents", []))

        return call_with_retries(self.settings, f"list artifacts {prefix}", keys)

    def open_range(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Streams the object (or one byte range of it) without holding it in memory."""
        end = "" if length is None else str(start + length - 1)
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self.object_key(key)}
        if start or length is not None:
            kwargs["Range"] = f"bytes={start}-{end}"
        response = call_with_retries(
            self.settings, f"read artifact {key}", self.client.get_object, **kwargs
        )
        body = response["Body"]
        try:
            yield from body.iter_chunks(_CHUNK)
        finally:
            body.close()


def artifact_store(settings: Settings, root: Path | None = None) -> ArtifactStore:
    """The configured store; `root` (default: the settings' artifact folder) is the local
    folder, the store itself or its working cache."""
    local = root or settings.artifacts_root
    if settings.artifacts_uri:
        return S3ArtifactStore(local, settings.artifacts_uri, settings)
    return ArtifactStore(local)


def put_folder(store: ArtifactStore, folder: Path, prefix: str, last: str | None = None) -> None:
    """Every file under `folder` to `prefix/<relative path>`; the file named `last` goes last
    (a reader that finds it finds the rest)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: `last` moves to the end
    for path in files:
        store.put_file(path, f"{prefix}/{path.relative_to(folder).as_posix()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place: a reader sees
    the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy_atomic(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
