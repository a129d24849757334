"""Scale-out of one job's statistics stage: one Celery task per expert, then the rest of
the job in a chord callback.

When the parent job (crucible.runner.execute_job) reaches the statistics stage, the
pipeline asks its split hook (crucible.pipeline.run_merge_job's `split`, with
`inputs.grams` still None). `stats_hook` plans the statistics (crucible.stats.stage:
module groups and cache keys from weightless models) and, when at least
`stats_fanout_min_experts` experts miss the Gram cache and the broker is Redis (the chord
needs its result backend), sends a Celery chord: one `crucible.expert_statistics` task per
missing expert and a `crucible.after_statistics` callback. The parent returns without
holding its worker slot; the job stays `running` (stage statistics, progress = experts
whose Grams exist / experts) under the parent's owner name, whose lease every task renews
while it runs (crucible.runner.execute_owned), as the merge parts do (crucible.parts).

- An expert task (`expert_work`) computes that expert's Grams into the Gram cache
  (crucible.stats.cache: the artifact store, so any worker, on any machine, finds them)
  exactly as the single-worker stage does, the same code and key: the entry's bytes are
  those of a single-worker run. The entry's meta.json and the job's events record the
  worker. An entry that exists already makes the task a no-op, so a retried task, or a
  chord sent again after a reaper requeue, computes only what is missing.
- A cancelled job, or one requeued under another owner, makes every pending task exit at
  once (execute_owned checks the owner; a task's first act is a cancel check).
- A task that fails with a transient error is retried alone by Celery (`part_retryable`,
  shared with the merge parts); any other error fails the job.
- The callback (`after_work`) runs the pipeline from the start again under the parent's
  owner, without the hook: resolving is not recorded twice, and the statistics stage now
  finds every expert's Grams in the cache (an entry lost meanwhile is computed there);
  tune, merge, evaluate and publish follow as in one job.

With one worker the tasks simply run one after another on it. Test hook: a file
`jobs/<id>/stats/fail-once-<expert index>` under the local artifact folder makes that
expert's task fail once with a retryable error (removed as it fires).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

from crucible.artifacts import artifact_store
from crucible.datasets.storage import DatasetHandle
from crucible.device import compute_device
from crucible.engine import MergeInputs
from crucible.errors import CrucibleError
from crucible.lease import LeaseLost
from crucible.parts import InjectedPartFault, PartReporter, part_retryable
from crucible.pipeline import MergeOutcome, _resolve, run_merge_job
from crucible.runner import (
    OwnedWork,
    SplitHook,
    StoreReporter,
    TrialHook,
    execute_owned,
    store_call,
)
from crucible.settings import Settings
from crucible.spec import Job, MergeSpec
from crucible.split import chord_backend
from crucible.stats.cache import GramCache, worker_record
from crucible.stats.stage import ExpertStats, collect_expert, plan_statistics
from crucible.store import JobStore
from crucible.tune.trials import TrialFanout

EXPERT_STATS_TASK = "crucible.expert_statistics"
AFTER_STATS_TASK = "crucible.after_statistics"

# (job id, owner, [{"index", "key"} of each expert to compute], keys of every planned
# expert) -> sends the chord.
SendStats = Callable[[str, str, list[dict[str, Any]], list[str]], None]


def stats_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/stats"


def job_datasets(
    store: JobStore, settings: Settings, job_id: str, spec: MergeSpec
) -> dict[str, DatasetHandle | None]:
    """The spec's datasets as the job's tenant has them (None: gone), fetched here from a
    remote artifact store when this machine lacks them, as the runner does for a job."""
    tenant = store_call(settings, "read tenant", store.tenant_of, job_id)
    return {
        d: store_call(settings, "read dataset", store.fetch_dataset, tenant, d)
        for d in spec.dataset_ids()
    }


def _found(datasets: Mapping[str, DatasetHandle | None]) -> dict[str, DatasetHandle]:
    # plan_statistics names a missing dataset (dataset_not_found) for the expert using it.
    return {d: h for d, h in datasets.items() if h is not None and h.path.is_file()}


def _no_cancel_check() -> None:
    """The hook runs in the parent between its own cancel checks."""


def stats_hook(store: JobStore, settings: Settings, send: SendStats) -> SplitHook:
    """The runner's hook at the statistics stage: plans the statistics and sends the chord
    when enough experts need computing; False leaves the stage to the parent."""

    def hook(job_id: str, owner: str, spec: MergeSpec, inputs: MergeInputs) -> bool:
        minimum = settings.stats_fanout_min_experts
        if minimum < 1 or chord_backend(settings) is None:
            return False
        datasets = _found(job_datasets(store, settings, job_id, spec))
        planned = plan_statistics(
            spec, inputs.base, inputs.experts, datasets, settings, _no_cancel_check
        )
        cache = GramCache(settings.artifacts_root, artifact_store(settings))
        # One task per entry: two experts with the same model and data share their Grams.
        unique: dict[str, ExpertStats] = {}
        for job in planned:
            unique.setdefault(job.key, job)
        missing = [job for job in unique.values() if not cache.has(job.key)]
        if len(missing) < minimum:
            return False
        held = store_call(settings, "read ownership", store.ownership, job_id)
        if held is None or held.status != "running" or held.worker != owner:
            raise LeaseLost(job_id)  # planning outlived the lease: the chord is not ours
        experts = [{"index": job.index, "key": job.key} for job in missing]
        store_call(
            settings,
            "add event",
            store.add_event,
            job_id,
            "stats_split",
            f"statistics of {len(missing)} experts sent out as one task each "
            f"({len(unique) - len(missing)} cached)",
            {"experts": [{**e, "label": j.label} for e, j in zip(experts, missing, strict=True)]},
        )
        done = len(unique) - len(missing)
        store_call(
            settings,
            "set progress",
            store.set_progress,
            job_id,
            "statistics",
            done,
            len(unique),
            "experts",
        )
        send(job_id, owner, experts, list(unique))
        return True

    return hook


def either(stats: SplitHook, merge: SplitHook) -> SplitHook:
    """One hook for the runner: the statistics one while the job's Grams are still to be
    computed (the pipeline asks at the statistics stage), the merge split's after."""

    def hook(job_id: str, owner: str, spec: MergeSpec, inputs: MergeInputs) -> bool:
        if spec.needs_grams() and inputs.grams is None:
            return stats(job_id, owner, spec, inputs)
        return merge(job_id, owner, spec, inputs)

    return hook


def _planned(
    spec: MergeSpec,
    settings: Settings,
    store: JobStore,
    job_id: str,
    reporter: StoreReporter,
    hub_token: str | None,
    index: int,
    key: str,
) -> ExpertStats:
    """This expert's plan, resolved again here; the key must be the parent's."""
    inputs, _ = _resolve(spec, settings, PartReporter(reporter), hub_token)
    datasets = _found(job_datasets(store, settings, job_id, spec))
    (job,) = plan_statistics(
        spec, inputs.base, inputs.experts, datasets, settings, reporter.check_cancelled, index
    )
    if job.key != key:
        raise CrucibleError(
            "internal",
            f"the inputs of expert {job.label} changed after the job planned its statistics",
            {"expert": index, "key": key, "now": job.key},
        )
    return job


def expert_work(
    index: int, key: str, keys: list[str], store: JobStore, settings: Settings
) -> OwnedWork:
    """What one `crucible.expert_statistics` task does for the job (run by
    runner.execute_owned): expert `index`'s Grams into the cache entry `key`; `keys` are
    every planned expert's entries (progress counts those that exist)."""

    def work(
        job: Job, spec: MergeSpec, reporter: StoreReporter, hub_token: str | None
    ) -> MergeOutcome | None:
        reporter.check_cancelled()  # a cancelled job's pending tasks stop before any work
        artifacts = artifact_store(settings)
        cache = GramCache(settings.artifacts_root, artifacts)
        data = {"expert": index, "key": key, **worker_record()}
        if cache.has(key):
            reporter.event("stats_skipped", f"statistics of expert {index} were cached", data)
            return None
        reporter.event("stats_started", f"statistics of expert {index} started", data)
        trigger = artifacts.root / stats_prefix(job.id) / f"fail-once-{index}"
        if trigger.is_file():
            trigger.unlink()
            raise InjectedPartFault(f"statistics of expert {index}: injected failure")
        started = time.monotonic()
        planned = _planned(spec, settings, store, job.id, reporter, hub_token, index, key)
        device = compute_device(settings.device)
        collect_expert(planned, cache, reporter, device, lambda examples: None)
        done = sum(cache.has(k) for k in keys)
        store_call(
            settings,
            "set progress",
            store.set_progress,
            job.id,
            "statistics",
            done,
            len(keys),
            "experts",
        )
        seconds = round(time.monotonic() - started, 3)
        reporter.event(
            "stats_done",
            f"statistics of expert {planned.label} computed ({done} of {len(keys)} experts)",
            {**data, "seconds": seconds},
        )
        return None

    return work


class _Resumed:
    """The callback's Reporter: the parent already recorded resolving and the start of the
    statistics stage, so running them again records nothing; the stages after are
    recorded as in one job, and every cancel, lease and wall-time check goes through."""

    def __init__(self, inner: StoreReporter) -> None:
        self._inner = inner
        self._quiet = True

    def stage(self, name: str) -> None:
        if name in ("resolve", "statistics"):
            self._quiet = name == "resolve"
            return
        self._quiet = False
        self._inner.stage(name)

    def progress(self, done: int, total: int, unit: str) -> None:
        if not self._quiet:
            self._inner.progress(done, total, unit)

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if not self._quiet:
            self._inner.event(kind, message, data)

    def trial(self, index: int, data: dict[str, Any]) -> None:
        self._inner.trial(index, data)

    def check_cancelled(self) -> None:
        self._inner.check_cancelled()


def after_work(store: JobStore, settings: Settings, trials: TrialFanout | None = None) -> OwnedWork:
    """What the chord callback does: the job's pipeline, its Grams now in the cache
    (`trials`: the tune stage's fan-out, as for the parent)."""

    def work(
        job: Job, spec: MergeSpec, reporter: StoreReporter, hub_token: str | None
    ) -> MergeOutcome | None:
        datasets = job_datasets(store, settings, job.id, spec)
        return run_merge_job(
            spec,
            settings.job_output_dir(job.id),
            settings,
            _Resumed(reporter),
            datasets,
            hub_token=hub_token,
            trials=trials,
        )

    return work


def run_expert(
    job_id: str,
    owner: str,
    expert: dict[str, Any],
    keys: list[str],
    store: JobStore,
    settings: Settings,
    may_retry: bool,
) -> str | None:
    """One expert task: None when its Grams are in the cache (or the job is not this
    chord's any more); the job's terminal status when the task ended it. Raises a
    `part_retryable` error while `may_retry`, for Celery to retry this task alone."""
    work = expert_work(int(expert["index"]), str(expert["key"]), keys, store, settings)
    retry_on = part_retryable if may_retry else None
    status = execute_owned(job_id, owner, store, settings, work, retry_on=retry_on)
    if status is not None:
        remove_stats_files(settings, job_id)
    return status


def run_after(
    job_id: str,
    owner: str,
    store: JobStore,
    settings: Settings,
    trials: TrialHook | None = None,
) -> str | None:
    """The chord callback: the rest of the job, published once."""
    fanout = trials(job_id, owner) if trials else None
    status = execute_owned(job_id, owner, store, settings, after_work(store, settings, fanout))
    if status is not None:
        remove_stats_files(settings, job_id)
    return status


def remove_stats_files(settings: Settings, job_id: str) -> None:
    """The job's fan-out folder (test hooks) once it is over; the Grams stay cached."""
    shutil.rmtree(artifact_store(settings).local_path(stats_prefix(job_id)), ignore_errors=True)


def chord_sender(expert_task: Any, after_task: Any) -> SendStats:
    """Sends the experts as a Celery group whose chord callback continues the job (the
    tasks are worker.tasks' expert_statistics and after_statistics)."""
    from celery import chord, group

    def send(job_id: str, owner: str, experts: list[dict[str, Any]], keys: list[str]) -> None:
        header = group(expert_task.si(job_id, owner, e, keys) for e in experts)
        chord(header, after_task.si(job_id, owner)).apply_async()

    return send
