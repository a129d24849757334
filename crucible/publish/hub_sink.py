"""The hf:// sink: a finished output folder as ONE commit to a Hub model repo.

The repo is created if needed (private unless the spec's `output.private` is false); every
file of the output goes into a single commit, so the repo's history never holds half a model.
The token is the request's `hub_token` (the job's encrypted secrets); the server's own
HF_TOKEN is never used to write, so a tenant cannot push with the server's identity.
Re-publishing the same files is a no-op on the Hub's side (huggingface_hub skips unchanged
files and an empty commit), which also makes a retried commit whose answer was lost harmless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crucible.errors import CrucibleError
from crucible.publish.s3_sink import ProgressReporter
from crucible.retry import call_with_retries, describe_error, status_code_of
from crucible.settings import Settings


def publish_to_hub(
    output_dir: Path,
    files: list[dict[str, Any]],
    repo_id: str,
    *,
    private: bool,
    token: str | None,
    job_id: str,
    settings: Settings,
    reporter: ProgressReporter,
) -> str:
    """Commit `files` (file_manifest of `output_dir`) to `repo_id`; returns `hf://repo_id`.

    CrucibleError `publish_failed` when there is no token, the token may not write there, or
    the Hub stays unreachable (the message names the repo and the HTTP status, never the
    token)."""
    uri = f"hf://{repo_id}"
    if not token:
        raise CrucibleError(
            "publish_failed",
            f"publishing to {uri} needs a Hub token with write access: send it as the "
            "request's hub_token",
            {"uri": uri},
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    # Read at call time, like the sources do: a long-lived worker follows its environment.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)

    def commit() -> Any:
        # Fresh operations per attempt: huggingface_hub refuses to commit one twice.
        operations = [
            CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(output_dir / f["path"]))
            for f in files
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=f"Crucible merge {job_id}",
            commit_description=f"{len(files)} files written by Crucible job {job_id}.",
            repo_type="model",
        )

    reporter.progress(0, 2, "steps")
    try:
        call_with_retries(
            settings,
            f"create Hub repo {repo_id}",
            api.create_repo,
            repo_id,
            repo_type="model",
            private=private,
            exist_ok=True,
        )
        reporter.progress(1, 2, "steps")
        info = call_with_retries(settings, f"commit to {uri}", commit)
    except Exception as exc:
        raise CrucibleError(
            "publish_failed",
            f"publishing to {uri} failed: {_reason(exc)}",
            {"uri": uri, "error": describe_error(exc), "status": status_code_of(exc)},
        ) from exc
    reporter.progress(2, 2, "steps")
    reporter.event(
        "published",
        f"committed {len(files)} files to {uri} ({info.oid[:12]})",
        {"uri": uri, "commit": info.oid, "files": len(files)},
    )
    return uri


def _reason(exc: BaseException) -> str:
    code = status_code_of(exc)
    if code in (401, 403):
        return f"HTTP {code}: the hub_token may not create or write to this repo"
    if code == 404:
        return "HTTP 404: the repo or its owner does not exist for this token"
    if isinstance(exc, ValueError) and "README" in str(exc):
        return "the Hub refused the model card's metadata"
    return describe_error(exc)
