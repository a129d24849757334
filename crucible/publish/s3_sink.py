"""The s3:// sink: a finished output folder into s3://bucket/prefix, complete or not at all.

Order, so that a reader who finds `crucible-manifest.json` finds a complete model:
1. a manifest already there for exactly these files means the job was published before
   (a re-run of the same job): nothing to do, the keys and the manifest stay the same;
2. any other manifest is deleted first, so a reader never pairs it with files being replaced;
3. every file is uploaded (multipart above `s3_part_bytes`) under `<prefix>/.crucible-tmp-<job>/`;
4. each is copied server-side to `<prefix>/<path>`;
5. the manifest (path, sha256, bytes of every file) is written last; the temporary keys go.
A failure before step 5 leaves no manifest. Every call runs under crucible.retry.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Protocol

from crucible.errors import CrucibleError
from crucible.retry import call_with_retries, describe_error
from crucible.s3 import (
    S3Location,
    is_not_found,
    s3_client,
    transfer_config,
    unwrap_transfer_error,
)
from crucible.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "crucible-manifest.json"
MANIFEST_FORMAT = "crucible-manifest/1"
TMP_PREFIX = ".crucible-tmp-"


class ProgressReporter(Protocol):
    """What the sinks report through (crucible.pipeline.Reporter has these)."""

    def progress(self, done: int, total: int, unit: str) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...


def manifest_bytes(job_id: str, files: list[dict[str, Any]]) -> bytes:
    """The manifest: deterministic for a job's files, so re-publishing writes the same bytes."""
    doc = {
        "format": MANIFEST_FORMAT,
        "job_id": job_id,
        "files": [{"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in files],
        "bytes": sum(int(f["bytes"]) for f in files),
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def publish_to_s3(
    output_dir: Path,
    files: list[dict[str, Any]],
    uri: str,
    job_id: str,
    settings: Settings,
    reporter: ProgressReporter,
) -> str:
    """Publish `files` (file_manifest of `output_dir`) to `uri`; returns the published URI.

    CrucibleError `publish_failed` (missing bucket, access denied, a server that stays
    unreachable) names the location and the failure, never credentials."""
    loc = S3Location.parse(uri)
    try:
        return _publish(output_dir, files, loc, job_id, settings, reporter)
    except CrucibleError:
        raise
    except Exception as exc:
        raise CrucibleError(
            "publish_failed",
            f"publishing to {loc.uri} failed: {_reason(exc, loc)}",
            {"uri": loc.uri, "error": describe_error(exc)},
        ) from exc


def _publish(
    output_dir: Path,
    files: list[dict[str, Any]],
    loc: S3Location,
    job_id: str,
    settings: Settings,
    reporter: ProgressReporter,
) -> str:
    client = s3_client(settings)
    manifest_key = loc.key(MANIFEST)
    manifest = manifest_bytes(job_id, files)
    tmp = loc.key(f"{TMP_PREFIX}{job_id}")

    existing = _get_or_none(client, settings, loc.bucket, manifest_key)
    if existing == manifest and _all_present(client, settings, loc, files):
        _delete_prefix(client, settings, loc.bucket, tmp + "/")  # a crash after step 5
        reporter.event("published", f"{loc.uri} already holds this job's output", {"uri": loc.uri})
        return loc.uri
    if existing is not None:
        call_with_retries(
            settings,
            "delete old manifest",
            client.delete_object,
            Bucket=loc.bucket,
            Key=manifest_key,
        )

    total = sum(int(f["bytes"]) for f in files)
    progress = _Progress(reporter, total)
    upload_cfg, copy_cfg = transfer_config(settings), transfer_config(settings, copy=True)
    try:
        for f in files:
            src = output_dir / f["path"]
            key = f"{tmp}/{f['path']}"

            def upload(src: Path = src, key: str = key, path: str = f["path"]) -> None:
                progress.restart(path)
                try:
                    client.upload_file(
                        str(src),
                        loc.bucket,
                        key,
                        Config=upload_cfg,
                        Callback=progress.callback(path),
                    )
                except Exception as exc:
                    raise unwrap_transfer_error(exc) from None

            call_with_retries(settings, f"upload {f['path']} to S3", upload)
        for f in files:
            call_with_retries(
                settings,
                f"copy {f['path']} into place",
                client.copy,
                {"Bucket": loc.bucket, "Key": f"{tmp}/{f['path']}"},
                loc.bucket,
                loc.key(f["path"]),
                Config=copy_cfg,
            )
        call_with_retries(
            settings,
            "write the manifest",
            client.put_object,
            Bucket=loc.bucket,
            Key=manifest_key,
            Body=manifest,
            ContentType="application/json",
        )
    except BaseException:
        _cleanup_quietly(client, settings, loc.bucket, tmp + "/")
        raise
    _cleanup_quietly(client, settings, loc.bucket, tmp + "/")
    reporter.event(
        "published",
        f"uploaded {len(files)} files ({total} bytes) to {loc.uri}",
        {"uri": loc.uri, "files": len(files), "bytes": total},
    )
    return loc.uri


class _Progress:
    """Bytes sent so far, from boto3's transfer threads, reported to the job (throttled by
    the reporter). A retried file starts its count again."""

    def __init__(self, reporter: ProgressReporter, total: int) -> None:
        self._reporter = reporter
        self._total = total
        self._per_file: dict[str, int] = {}
        self._lock = threading.Lock()

    def restart(self, path: str) -> None:
        with self._lock:
            self._per_file[path] = 0

    def callback(self, path: str) -> Any:
        def sent(n: int) -> None:
            with self._lock:
                self._per_file[path] = self._per_file.get(path, 0) + n
                done = sum(self._per_file.values())
                self._reporter.progress(min(done, self._total), self._total, "bytes")

        return sent


def _get_or_none(client: Any, settings: Settings, bucket: str, key: str) -> bytes | None:
    def get() -> bytes | None:
        try:
            return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    return call_with_retries(settings, f"read s3://{bucket}/{key}", get)


def _all_present(client: Any, settings: Settings, loc: S3Location, files: list[dict]) -> bool:
    """Every file is at its final key with its size (a manifest from the same job and files
    is otherwise only trusted once the objects are checked)."""
    for f in files:

        def head(key: str = loc.key(f["path"])) -> int | None:
            try:
                return int(client.head_object(Bucket=loc.bucket, Key=key)["ContentLength"])
            except Exception as exc:
                if is_not_found(exc):
                    return None
                raise

        if call_with_retries(settings, "check a published file", head) != int(f["bytes"]):
            return False
    return True


def _delete_prefix(client: Any, settings: Settings, bucket: str, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:  # at most 1000 per page, the DeleteObjects limit
            call_with_retries(
                settings,
                "delete temporary keys",
                client.delete_objects,
                Bucket=bucket,
                Delete={"Objects": keys, "Quiet": True},
            )


def _cleanup_quietly(client: Any, settings: Settings, bucket: str, prefix: str) -> None:
    # Temporary keys are never read (no manifest names them); a failed cleanup is logged and
    # the next publish of the job, or a lifecycle rule on .crucible-tmp-*, removes them.
    try:
        _delete_prefix(client, settings, bucket, prefix)
    except Exception as exc:
        log.warning("could not remove s3://%s/%s*: %s", bucket, prefix, describe_error(exc))


def _reason(exc: BaseException, loc: S3Location) -> str:
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code == "NoSuchBucket":
        return f"bucket {loc.bucket!r} does not exist"
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access denied ({code}); check the CRUCIBLE_S3_* credentials"
    if code:
        return str(code)
    return describe_error(exc)
