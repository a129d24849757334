"""Scale-out of one job's merge stage: parts on several workers, then one assembly.

The parent job (crucible.runner.execute_job) resolves the inputs and runs the statistics and
tuning stages as usual; when the merge stage starts, `split_hook` decides (crucible.split)
whether to cut the output layout into parts. If so it sends a Celery chord, a group of
`crucible.merge_part` tasks and an `crucible.assemble_parts` callback, and returns without
holding its worker slot: the job stays `running` (stage merge, progress = parts done /
parts) under the parent's owner name, whose lease every part renews while it runs.

- A part (`part_work`) merges the tensors of its output shards into exactly those shard
  files (engine.merge_model(only_shards=...)), byte-identical to a single run's, under
  `jobs/<id>/parts/<layout>/` in the artifact store, then writes its record (sizes, sha256,
  which worker) last. A part whose record exists with its shard files at the recorded
  sizes is a no-op, so a retried part, or a whole re-sent chord after a reaper requeue,
  redoes only the parts that did not finish.
- The callback (`assemble_work`) checks every part's shards against their records, links
  them into a staging folder, writes the index and the support files (config, model card,
  merge report) and returns the outcome the runner publishes once, as for any job.

Test hook: a file `jobs/<id>/parts/fail-once-<part index>` under the local artifact folder
makes that part fail once with a retryable error (removed as it fires); see
tests/test_scale_out.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crucible.artifacts import ArtifactStore, artifact_store, write_text_atomic
from crucible.device import compute_device
from crucible.engine import MergeInputs, merge_model, output_plan
from crucible.errors import CrucibleError
from crucible.methods.registry import get_method
from crucible.pipeline import (
    MergeOutcome,
    _report_events,
    _resolve,
    publish_staged,
)
from crucible.publish.files import new_staging, sha256_file
from crucible.publish.writer import INDEX_FILE, ShardedSafetensorsWriter
from crucible.report import MergeReport
from crucible.retry import is_transient
from crucible.runner import (
    OwnedWork,
    SplitHook,
    StoreReporter,
    execute_owned,
    is_db_transient,
    store_call,
)
from crucible.settings import Settings
from crucible.sources.resolve import input_bytes
from crucible.spec import Job, MergeSpec
from crucible.split import Part, chord_backend, layout_key, part_count, partition
from crucible.stats.cache import worker_record
from crucible.store import JobStore

# (job id, owner, layout key, parts) -> sends the chord.
SendParts = Callable[[str, str, str, list[Part]], None]


class InjectedPartFault(Exception):
    """The test hook's failure (a `fail-once-<index>` file): retried like a transient one."""


def part_retryable(exc: BaseException) -> bool:
    """Errors a part is retried for (alone, by Celery) instead of failing the job."""
    return isinstance(exc, InjectedPartFault) or is_transient(exc) or is_db_transient(exc)


def parts_prefix(job_id: str, key: str | None = None) -> str:
    return f"jobs/{job_id}/parts" + (f"/{key}" if key else "")


def record_key(job_id: str, key: str, index: int) -> str:
    return f"{parts_prefix(job_id, key)}/part-{index:03d}.json"


def layout_writer(spec: MergeSpec, inputs: MergeInputs) -> tuple[str, ShardedSafetensorsWriter]:
    """The output layout (a writer that is never written to: it creates nothing until its
    first write) and the key naming it."""
    _, plan = output_plan(spec, inputs.base)
    shard_size = int(spec.output.shard_size)
    writer = ShardedSafetensorsWriter(Path("."), plan, shard_size, {"format": "pt"})
    return layout_key(plan, shard_size), writer


def split_reason(spec: MergeSpec, inputs: MergeInputs, settings: Settings) -> str | None:
    """Why this job's merge stays on one worker, or None when it may be split. Every
    method merges one tensor (or one module) at a time from that tensor's inputs alone
    (DARE's masks are seeded per tensor and row chunk), so any method qualifies; what does
    not is a job with more than the sharded weights to write, or data-driven stages."""
    if chord_backend(settings) is None:
        return "the broker is not Redis (a chord needs its result backend)"
    if spec.output.format != "full":
        return "LoRA outputs are written by one worker"
    if spec.tuning is not None or spec.needs_grams():
        return "jobs with a tuning or statistics stage merge on one worker"
    if any(inputs.expert_only) or (spec.shape_mismatch == "keep_per_expert" and inputs.mismatched):
        return "per-expert outputs are written by one worker"
    get_method(spec.method.name)  # an unknown method fails here, in the parent
    return None


def split_hook(store: JobStore, settings: Settings, send: SendParts) -> SplitHook:
    """The runner's hook: plans the parts and sends the chord when the job qualifies."""

    def hook(job_id: str, owner: str, spec: MergeSpec, inputs: MergeInputs) -> bool:
        if split_reason(spec, inputs, settings) is not None:
            return False
        key, writer = layout_writer(spec, inputs)
        files = writer.shard_files
        size = input_bytes([inputs.base, *inputs.experts])
        count = part_count(settings, size, len(files))
        if count < 2:
            return False
        parts = partition([b for _, b in files], count)
        store_call(
            settings,
            "add event",
            store.add_event,
            job_id,
            "split",
            f"merge stage split into {len(parts)} parts over {len(files)} output shards",
            {"layout": key, "parts": [p.as_dict() for p in parts]},
        )
        done = sum(_finished(artifact_store(settings), job_id, key, p) is not None for p in parts)
        store_call(
            settings, "set progress", store.set_progress, job_id, "merge", done, len(parts), "parts"
        )
        send(job_id, owner, key, parts)
        return True

    return hook


class PartReporter:
    """A part's view of the pipeline Reporter: resolving again records nothing (the parent
    did), while cancel, lease and wall-time checks go to the job's StoreReporter."""

    def __init__(self, inner: StoreReporter) -> None:
        self._inner = inner

    def stage(self, name: str) -> None: ...
    def progress(self, done: int, total: int, unit: str) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...
    def trial(self, index: int, data: dict[str, Any]) -> None: ...

    def check_cancelled(self) -> None:
        self._inner.check_cancelled()


def _resolved(
    spec: MergeSpec, settings: Settings, reporter: StoreReporter, hub_token: str | None, key: str
) -> tuple[MergeInputs, list[dict[str, Any]], ShardedSafetensorsWriter]:
    inputs, records = _resolve(spec, settings, PartReporter(reporter), hub_token)
    found, writer = layout_writer(spec, inputs)
    if found != key:
        raise CrucibleError(
            "internal",
            "the inputs changed after the job planned its parts (the output layout differs)",
            {"layout": key, "now": found},
        )
    return inputs, records, writer


def _finished(store: ArtifactStore, job_id: str, key: str, part: Part) -> dict[str, Any] | None:
    """The part's record when its shards are all stored at the recorded sizes."""
    rkey = record_key(job_id, key, part.index)
    path = store.local_path(rkey)
    if not path.is_file() and not store.get_file(rkey, path):
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for shard in record.get("shards", []):
        if store.size(f"{parts_prefix(job_id, key)}/{shard['file']}") != shard["bytes"]:
            return None
    return record


def _count_done(store: ArtifactStore, job_id: str, key: str) -> int:
    return sum(1 for k in store.list(parts_prefix(job_id, key)) if k.endswith(".json"))


def part_work(key: str, part: Part, total: int, store: JobStore, settings: Settings) -> OwnedWork:
    """What one `crucible.merge_part` task does for the job (run by runner.execute_owned)."""

    def work(
        job: Job, spec: MergeSpec, reporter: StoreReporter, hub_token: str | None
    ) -> MergeOutcome | None:
        artifacts = artifact_store(settings)
        job_id = job.id
        if _finished(artifacts, job_id, key, part) is not None:
            reporter.event("part_skipped", f"part {part.index} was already merged", part.as_dict())
            return None
        trigger = artifacts.root / parts_prefix(job_id) / f"fail-once-{part.index}"
        reporter.event(
            "part_started",
            f"part {part.index + 1} of {total} started (shards {part.first}-{part.stop - 1})",
            {**part.as_dict(), **worker_record()},
        )
        if trigger.is_file():
            trigger.unlink()
            raise InjectedPartFault(f"part {part.index}: injected failure (test hook)")
        started = time.monotonic()
        inputs, _, writer = _resolved(spec, settings, reporter, hub_token, key)
        folder = artifacts.local_path(parts_prefix(job_id, key))
        device = compute_device(settings.device)
        metrics, report = merge_model(
            spec, inputs, folder, PartReporter(reporter), device, only_shards=part.shards
        )
        shards = []
        for name, size in writer.shard_files[part.first : part.stop]:
            path = folder / name
            if path.stat().st_size != size:
                raise CrucibleError("internal", f"part {part.index}: {name} has the wrong size")
            artifacts.put_file(path, f"{parts_prefix(job_id, key)}/{name}")
            stat = path.stat()
            shards.append(
                {
                    "file": name,
                    "bytes": stat.st_size,
                    "sha256": sha256_file(path),
                    "mtime_ns": stat.st_mtime_ns,
                }
            )
        record = {
            "part": part.as_dict(),
            "layout": key,
            "shards": shards,
            "worker": worker_record(),
            "seconds": round(time.monotonic() - started, 3),
            "metrics": metrics,
            "report": report.as_dict(),
        }
        rkey = record_key(job_id, key, part.index)
        write_text_atomic(artifacts.local_path(rkey), json.dumps(record, indent=1) + "\n")
        artifacts.put_file(artifacts.local_path(rkey), rkey)  # last: it marks the part done
        done = _count_done(artifacts, job_id, key)
        store_call(
            settings, "set progress", store.set_progress, job_id, "merge", done, total, "parts"
        )
        reporter.event(
            "part_done",
            f"part {part.index + 1} of {total} merged {len(shards)} shards",
            {**part.as_dict(), **worker_record(), "seconds": record["seconds"]},
        )
        return None

    return work


def assemble_work(key: str, count: int, settings: Settings) -> OwnedWork:
    """What the chord callback does: verify every part, assemble, return the outcome."""

    def work(
        job: Job, spec: MergeSpec, reporter: StoreReporter, hub_token: str | None
    ) -> MergeOutcome | None:
        artifacts = artifact_store(settings)
        output_dir = settings.job_output_dir(job.id)
        reporter.stage("publish")
        reporter.progress(0, 2, "steps")
        inputs, records, writer = _resolved(spec, settings, reporter, hub_token, key)
        staging = new_staging(output_dir)
        try:
            parts = _verified_parts(artifacts, job.id, key, count, writer, staging)
            if writer.shard_count > 1:
                (staging / INDEX_FILE).write_text(writer.index_text(), encoding="utf-8")
            report, metrics = _combined(parts, spec)
            _report_events(report, reporter)
            return publish_staged(
                spec, inputs.base, records, report, metrics, staging, output_dir, reporter
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    return work


def _verified_parts(
    artifacts: ArtifactStore,
    job_id: str,
    key: str,
    count: int,
    writer: ShardedSafetensorsWriter,
    staging: Path,
) -> list[dict[str, Any]]:
    """Every part's record, its shards fetched, checked (size, sha256) and linked into
    `staging`; the shards together must be the layout's, each once."""
    records = []
    seen: list[str] = []
    for index in range(count):
        rkey = record_key(job_id, key, index)
        path = artifacts.local_path(rkey)
        if not (path.is_file() or artifacts.get_file(rkey, path)):
            raise CrucibleError(
                "internal", f"scale-out part {index} has no record", {"part": index}
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        for shard in record["shards"]:
            skey = f"{parts_prefix(job_id, key)}/{shard['file']}"
            src = artifacts.local_path(skey)
            if not src.is_file():
                artifacts.get_file(skey, src)
            if not src.is_file() or sha256_file(src) != shard["sha256"]:
                raise CrucibleError(
                    "internal",
                    f"scale-out part {index}: {shard['file']} is missing or does not match "
                    "its record",
                    {"part": index, "file": shard["file"]},
                )
            _link(src, staging / shard["file"])
            seen.append(shard["file"])
        records.append(record)
    expected = [name for name, _ in writer.shard_files]
    if seen != expected:
        raise CrucibleError(
            "internal",
            f"the parts wrote {len(seen)} shard files; the layout has {len(expected)}",
            {"written": seen[:20], "expected": expected[:20]},
        )
    return records


def _combined(parts: list[dict[str, Any]], spec: MergeSpec) -> tuple[MergeReport, dict[str, Any]]:
    """One report and metrics for the job from its parts' (modules in plan order)."""
    first = parts[0]["report"]
    report = MergeReport(first["method"], first["device"])
    for k, v in first.items():
        if k not in ("method", "device", "summary", "modules"):
            report.note(k, v)
    for part in parts:
        report.modules.extend(part["report"]["modules"])
    metrics = {
        "tensors": sum(p["metrics"]["tensors"] for p in parts),
        "merged_tensors": sum(p["metrics"]["merged_tensors"] for p in parts),
        "merge_seconds": max(p["metrics"]["merge_seconds"] for p in parts),
        "input_bytes": parts[0]["metrics"]["input_bytes"],
        "device": parts[0]["metrics"]["device"],
        "parts": len(parts),
    }
    return report, metrics


def remove_parts(settings: Settings, job_id: str) -> None:
    """The job's part files, locally and in a remote artifact store (once it is over)."""
    artifacts = artifact_store(settings)
    if artifacts.remote:
        for k in artifacts.list(parts_prefix(job_id)):
            artifacts.delete(k)
    shutil.rmtree(artifacts.local_path(parts_prefix(job_id)), ignore_errors=True)


def _link(src: Path, dest: Path) -> None:
    """A hard link (no copy of the bytes; the mtime stays the part's), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def chord_sender(part_task: Any, assemble_task: Any) -> SendParts:
    """Sends the parts as a Celery group whose chord callback assembles (the tasks are
    worker.tasks' merge_part and assemble_parts)."""
    from celery import chord, group

    def send(job_id: str, owner: str, key: str, parts: list[Part]) -> None:
        header = group(part_task.si(job_id, owner, key, p.as_dict(), len(parts)) for p in parts)
        chord(header, assemble_task.si(job_id, owner, key, len(parts))).apply_async()

    return send


def run_part(
    job_id: str,
    owner: str,
    key: str,
    part: dict[str, int],
    total: int,
    store: JobStore,
    settings: Settings,
    may_retry: bool,
) -> str | None:
    """One part task: None when the part is done (or the job is not this chord's any
    more); the job's terminal status when the part ended it (failed, cancelled). Raises a
    `part_retryable` error while `may_retry`, for Celery to retry this part alone."""
    work = part_work(key, Part(**part), total, store, settings)
    retry_on = part_retryable if may_retry else None
    status = execute_owned(job_id, owner, store, settings, work, retry_on=retry_on)
    if status is not None:
        remove_parts(settings, job_id)
    return status


def run_assembly(
    job_id: str, owner: str, key: str, count: int, store: JobStore, settings: Settings
) -> str | None:
    """The chord callback: assemble and publish; the part files go once the job is over."""
    status = execute_owned(job_id, owner, store, settings, assemble_work(key, count, settings))
    held = store_call(settings, "read ownership", store.ownership, job_id)
    if status is not None or (held is not None and held.status in TERMINAL):
        remove_parts(settings, job_id)
    return status


TERMINAL = ("succeeded", "failed", "cancelled")

MERGE_PART_TASK = "crucible.merge_part"
ASSEMBLE_PARTS_TASK = "crucible.assemble_parts"
