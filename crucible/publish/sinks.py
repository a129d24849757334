"""Where a finished output goes: the one call the runner makes inside the publish marker.

`publish_output` runs after the pipeline has renamed the complete output into
`output_dir` and before the job's publish marker (`jobs.published_at`) is set with the
result, so it must be idempotent for the same job id: a worker that dies between the two
leaves the job to another attempt, which publishes the same files again. Torch-free.

Sinks, by the scheme of `spec.output.uri`:
- local:// : the artifact store. On local disk the output already lies there; with
  CRUCIBLE_ARTIFACTS_URI=s3://... it is also uploaded to `<artifacts>/jobs/<id>/output/`
  (the s3 sink's way: temporary prefix, then the manifest), so the API on another machine
  can serve it.
- s3://bucket/prefix : crucible.publish.s3_sink (multipart, manifest last).
- hf://org/name : crucible.publish.hub_sink (one commit; needs the request's hub_token).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.settings import Settings
from crucible.sources.uri import parse_uri
from crucible.spec import MergeSpec

if TYPE_CHECKING:
    from crucible.pipeline import Reporter


def local_uri(job_id: str) -> str:
    """The artifact store's own address of a job's output (served by the API)."""
    return f"local://jobs/{job_id}/output"


def output_key(job_id: str) -> str:
    """The artifact-store key (folder) of a job's output; `settings.job_output_dir` locally."""
    return f"jobs/{job_id}/output"


def publish_output(
    output_dir: Path,
    spec: MergeSpec,
    job_id: str,
    settings: Settings,
    reporter: Reporter,
    *,
    hub_token: str | None = None,
    files: list[dict[str, Any]] | None = None,
) -> str:
    """Publish the job's finished output folder to the sink its spec names; the URI.

    `hub_token`: the job's own token (crucible.secrets.load_job_secrets), for hf:// outputs.
    `files`: the output's file_manifest when the caller has it (saves hashing it again).
    Failures are CrucibleError `publish_failed` naming the location.
    """
    from crucible.publish.files import file_manifest

    target = parse_uri(spec.output.uri)
    if target.scheme == "local" and not settings.artifacts_uri:
        return local_uri(job_id)
    if files is None:
        files = file_manifest(output_dir)
    if target.scheme == "local":
        from crucible.publish.s3_sink import publish_to_s3
        from crucible.s3 import S3Location

        store = S3Location.parse(settings.artifacts_uri or "")
        publish_to_s3(
            output_dir,
            files,
            f"s3://{store.bucket}/{store.key(output_key(job_id))}",
            job_id,
            settings,
            reporter,
        )
        return local_uri(job_id)
    if target.scheme == "s3":
        from crucible.publish.s3_sink import publish_to_s3

        return publish_to_s3(output_dir, files, spec.output.uri, job_id, settings, reporter)
    if target.scheme == "hf":
        from crucible.publish.hub_sink import publish_to_hub

        return publish_to_hub(
            output_dir,
            files,
            target.target,
            private=spec.output.private,
            token=hub_token,
            job_id=job_id,
            settings=settings,
            reporter=reporter,
        )
    raise ValueError(f"no sink for {spec.output.uri!r}")  # OutputSpec refuses these
