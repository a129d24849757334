"""Scale-out of a tuning batch: with `tuning.batch` >= `trial_fanout_min_batch`, the trials
of one BO batch run on several workers ("the parent helps").

1. The job's worker (the parent) writes every module's factorization and bmm's fixed
   tensors once under `jobs/<id>/tune/<attempt>/` in the local artifact folder
   (safetensors per module, then manifest.json last: a reader that finds it finds the
   rest). `<attempt>` is a hash of the parent's owner name, so a requeued job never reads
   an earlier attempt's files (the new parent removes them).
2. Per batch of b trials the parent writes each trial's values (`trial-<i>.in.json`),
   sends b-1 `crucible.tune_trial` tasks (the batch's trials but its first), and runs the
   batch itself in index order, skipping a trial whose result exists or that another
   worker has claimed (`trial-<i>.started`, created exclusively, its mtime renewed by the
   claimant every `heartbeat_seconds`); then it waits (checking cancel and lease) for the
   trials other workers hold, and takes over one whose marker went `lease_seconds`
   without renewal (its worker died). It never waits on a task that has not started, so
   one worker at concurrency 1 simply runs every trial itself, and the tasks it sent exit
   as no-ops later: no deadlock, and no chord.
3. A trial task (`trial_work`, run by runner.execute_owned under the parent's owner name,
   so a job no longer running under it is left alone) claims its trial, builds the
   evaluator and loads the stored modules (once per process and job attempt: later trials
   of the job reuse them; any other task in the process frees them), runs
   crucible.tune.trial.run_trial, the parent's own code, and writes `trial-<i>.json`
   (temp file, then rename). A task that fails gives its claim back (event
   `trial_released`) and the parent runs the trial: an error that is the trial's own then
   fails the job there, as in one worker.
4. The parent records the trials in index order as in one worker; its folder is removed
   when the tune stage ends, however it ends, and the job's tune folder (every attempt's)
   when the job ends (crucible.tune.scratch, from runner.on_terminal).

Workers must share the local artifact folder (one machine or a shared volume): with a
remote artifact store (CRUCIBLE_ARTIFACTS_URI) the fan-out is off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from crucible.artifacts import artifact_store
from crucible.errors import CrucibleError, JobCancelled
from crucible.lease import LeaseLost
from crucible.settings import Settings
from crucible.split import chord_backend
from crucible.stats.cache import worker_record
from crucible.tune.factorized import FactorizedModule, module_from_state
from crucible.tune.scratch import remove_tune_files, tune_prefix
from crucible.tune.space import GroupValues
from crucible.tune.trial import TrialResult, run_trial

if TYPE_CHECKING:
    from crucible.evaluate.base import Evaluator
    from crucible.runner import OwnedWork, StoreReporter
    from crucible.spec import Job, MergeSpec
    from crucible.store import JobStore

log = logging.getLogger(__name__)

TUNE_TRIAL_TASK = "crucible.tune_trial"
MANIFEST = "manifest.json"
FIXED_FILE = "fixed.safetensors"
# How often the parent looks for results while other workers run its trials.
POLL_SECONDS = 0.05

# (job id, owner, trial indices) -> sends one trial task per index.
SendTrials = Callable[[str, str, list[int]], None]


def attempt_folder(settings: Settings, job_id: str, owner: str) -> Path:
    """This attempt's folder (an owner name holds ':' and a host name; its hash does not)."""
    key = hashlib.sha256(owner.encode()).hexdigest()[:16]
    return artifact_store(settings).local_path(f"{tune_prefix(job_id)}/{key}")


def fanout_enabled(settings: Settings, batch: int) -> bool:
    minimum = settings.trial_fanout_min_batch
    return (
        minimum >= 1
        and batch >= minimum
        and chord_backend(settings) is not None  # a Redis broker: real workers to send to
        and not settings.artifacts_uri
    )


# --------------------------------------------------------------------------- files


def _write_json(path: Path, data: Any) -> None:
    """Atomically: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def save_state(
    folder: Path,
    modules: Sequence[FactorizedModule],
    fixed: Mapping[str, torch.Tensor],
    group_of: Mapping[str, str],
) -> None:
    """Every module's state (one safetensors file each), the fixed tensors, and the
    manifest last."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, module in enumerate(modules):
        tensors, meta = module.state()
        save_file(
            {k: t.contiguous() for k, t in tensors.items()}, str(folder / f"m{i}.safetensors")
        )
        entries.append({**meta, "group": group_of[module.name]})
    save_file({k: t.contiguous() for k, t in fixed.items()}, str(folder / FIXED_FILE))
    _write_json(folder / MANIFEST, {"modules": entries})


@dataclass
class StoredState:
    modules: list[FactorizedModule]
    fixed: dict[str, torch.Tensor]
    group_of: dict[str, str]


def load_state(folder: Path, device: torch.device | str) -> StoredState:
    manifest = json.loads((folder / MANIFEST).read_text())
    modules = []
    group_of = {}
    for i, meta in enumerate(manifest["modules"]):
        tensors = load_file(str(folder / f"m{i}.safetensors"))
        modules.append(module_from_state(tensors, meta, device))
        group_of[meta["name"]] = meta["group"]
    return StoredState(modules, load_file(str(folder / FIXED_FILE)), group_of)


class TrialFiles:
    """One attempt's trial files: values in, started markers, results out."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def ready(self) -> bool:
        return (self.folder / MANIFEST).is_file()

    def _path(self, index: int, suffix: str) -> Path:
        return self.folder / f"trial-{index}{suffix}"

    def write_values(self, index: int, values: GroupValues) -> None:
        _write_json(self._path(index, ".in.json"), values)

    def read_values(self, index: int) -> GroupValues:
        data: GroupValues = json.loads(self._path(index, ".in.json").read_text())
        return data

    def write_result(self, index: int, result: TrialResult) -> None:
        _write_json(self._path(index, ".json"), result.as_dict())

    def read_result(self, index: int) -> TrialResult | None:
        try:
            return TrialResult.from_dict(json.loads(self._path(index, ".json").read_text()))
        except FileNotFoundError:
            return None

    def started(self, index: int) -> Path:
        return self._path(index, ".started")

    def claim(self, index: int, stale_seconds: float | None = None) -> bool:
        """Take trial `index` (create its marker exclusively); with `stale_seconds`, also a
        marker nobody renewed for that long (its worker died): renamed away first, which
        only one claimant can do."""
        marker = self.started(index)
        if stale_seconds is not None:
            try:
                age = time.time() - marker.stat().st_mtime
            except FileNotFoundError:
                age = 0.0
            if age > stale_seconds:
                aside = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:8]}.stale")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(marker, aside)
                    aside.unlink()
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except (FileExistsError, FileNotFoundError):
            # FileNotFoundError: the folder is gone, the attempt's tuning over (a task that
            # found it a moment ago must not fail the job for that).
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid()}))
        return True

    @contextlib.contextmanager
    def heartbeat(self, index: int, every: float) -> Iterator[None]:
        """Renew trial `index`'s marker every `every` seconds while the block runs."""
        stop = threading.Event()
        marker = self.started(index)

        def beat() -> None:
            while not stop.wait(every):
                # Any error (a shared volume's ESTALE or EIO) only misses this renewal: a
                # thread that ended on it would let the parent take over a live trial.
                with contextlib.suppress(OSError):
                    os.utime(marker)

        thread = threading.Thread(target=beat, name=f"trial-{index}-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def schedule(
    files: TrialFiles,
    indices: Sequence[int],
    run_local: Callable[[int], TrialResult],
    check_cancelled: Callable[[], None],
    stale_seconds: float,
    poll_seconds: float = POLL_SECONDS,
    sent: Collection[int] = (),
    claim_wait_seconds: float = 0.0,
) -> list[TrialResult]:
    """The parent's side of one batch: every trial in `indices` that has no result and no
    live claimant runs here, in index order; then wait for the others' results. A trial
    in `sent` (a task went out for it) is left to the other workers until
    `claim_wait_seconds` after the batch started; unclaimed by then, it runs here."""
    results: dict[int, TrialResult] = {}
    others_until = time.monotonic() + claim_wait_seconds
    while True:
        for index in indices:
            if index in results:
                continue
            done = files.read_result(index)
            if done is not None:
                results[index] = done
            elif (
                index in sent
                and time.monotonic() < others_until
                and not files.started(index).exists()
            ):
                continue  # unclaimed: still the other workers' (a stale claim is taken over)
            elif files.claim(index, stale_seconds):
                results[index] = run_local(index)
                files.write_result(index, results[index])
        if len(results) == len(indices):
            return [results[i] for i in indices]
        check_cancelled()
        if not files.folder.is_dir():
            # Removed under us (a trial task that ended the job removes them): waiting would
            # never end.
            raise CrucibleError("internal", "the tuning batch's trial files were removed")
        time.sleep(poll_seconds)


# --------------------------------------------------------------------------- the parent


class TrialFanout:
    """The parent's handle for one job attempt, given to the tune stage (None: the stage
    runs its trials itself, as without a broker)."""

    def __init__(self, settings: Settings, send: SendTrials, job_id: str, owner: str) -> None:
        self._settings = settings
        self._send = send
        self._job_id = job_id
        self._owner = owner
        self.files = TrialFiles(attempt_folder(settings, job_id, owner))

    def enabled(self, batch: int) -> bool:
        return fanout_enabled(self._settings, batch)

    def open(
        self,
        modules: Sequence[FactorizedModule],
        fixed: Mapping[str, torch.Tensor],
        group_of: Mapping[str, str],
    ) -> None:
        """Store the factorizations; an earlier attempt's folder goes first, and so does
        this owner's own (a chord callback delivered again runs the stage again under the
        same owner name: its earlier run's claims would hold trials nobody runs)."""
        parent = self.files.folder.parent
        if parent.is_dir():
            for other in parent.iterdir():
                shutil.rmtree(other, ignore_errors=True)
        save_state(self.files.folder, modules, fixed, group_of)

    def run_batch(
        self,
        first: int,
        batch: Sequence[GroupValues],
        run_local: Callable[[int], TrialResult],
        check_cancelled: Callable[[], None],
    ) -> list[TrialResult]:
        indices = list(range(first, first + len(batch)))
        for index, values in zip(indices, batch, strict=True):
            self.files.write_values(index, values)
        sent: list[int] = []
        if len(indices) > 1:
            try:
                self._send(self._job_id, self._owner, indices[1:])
                sent = indices[1:]
            except Exception:
                # The broker is down: nobody else will help, and the parent runs them all.
                log.warning("job %s: trial tasks not sent", self._job_id, exc_info=True)
        return schedule(
            self.files,
            indices,
            run_local,
            check_cancelled,
            self._settings.lease_seconds,
            sent=sent,
            claim_wait_seconds=self._settings.trial_claim_wait_seconds,
        )

    def close(self) -> None:
        """This attempt's folder (only: a parent that lost its lease must leave the next
        attempt's alone), and the job's tune folder once empty."""
        shutil.rmtree(self.files.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.files.folder.parent.rmdir()


def fanout_for(settings: Settings, send: SendTrials) -> Callable[[str, str], TrialFanout]:
    """The runner's factory: (job id, owner) -> the parent's TrialFanout."""
    return lambda job_id, owner: TrialFanout(settings, send, job_id, owner)


# --------------------------------------------------------------------------- a trial task


@dataclass
class _Loaded:
    key: tuple[str, Path]
    evaluator: Evaluator
    state: StoredState


# The last job attempt's evaluator and modules in this process: a job's later trials on
# this worker do not load them again. One entry: a new job's trial frees the previous.
_LOADED: list[_Loaded] = []


def free_loaded(task_name: str | None) -> None:
    """Before any other task of this process (worker.tasks, task_prerun): the last job's
    evaluator and modules (a model's size, and more) go. The trial task that loaded them
    cannot know it was the job's last one here, and a later trial task may never come to
    this process: the next job would run beside them."""
    if task_name != TUNE_TRIAL_TASK:
        _LOADED.clear()


def _load(
    job: Job,
    spec: MergeSpec,
    folder: Path,
    store: JobStore,
    settings: Settings,
    reporter: StoreReporter,
    hub_token: str | None,
) -> _Loaded:
    key = (job.id, folder)
    if _LOADED and _LOADED[0].key == key:
        return _LOADED[0]
    _LOADED.clear()
    from crucible.device import compute_device
    from crucible.parts import PartReporter
    from crucible.pipeline import _datasets, _resolve
    from crucible.stats.fanout import job_datasets
    from crucible.tune.stage import tuning_evaluator

    inputs, _ = _resolve(spec, settings, PartReporter(reporter), hub_token)
    datasets = _datasets(spec, job_datasets(store, settings, job.id, spec))
    device = compute_device(settings.device)
    evaluator = tuning_evaluator(spec, inputs, datasets, device)
    state = load_state(folder, device)
    evaluator.swapper.swap(state.fixed)
    state.fixed = {}
    _LOADED.append(_Loaded(key, evaluator, state))
    return _LOADED[0]


def trial_work(index: int, owner: str, store: JobStore, settings: Settings) -> OwnedWork:
    """What one `crucible.tune_trial` task does for the job (run by runner.execute_owned)."""

    def work(job: Job, spec: MergeSpec, reporter: StoreReporter, hub_token: str | None) -> None:
        reporter.check_cancelled()
        files = TrialFiles(attempt_folder(settings, job.id, owner))
        if not files.ready():
            _LOADED.clear()  # the attempt's tuning is over: free its modules
            return None
        if files.read_result(index) is not None:
            return None
        if not files.claim(index):  # the parent, or another task, has it
            return None
        try:
            with files.heartbeat(index, settings.heartbeat_seconds):
                loaded = _load(job, spec, files.folder, store, settings, reporter, hub_token)
                values = files.read_values(index)
                reporter.check_cancelled()
                result = run_trial(
                    loaded.state.modules, loaded.state.group_of, loaded.evaluator, values
                )
                files.write_result(index, result)
        except (JobCancelled, LeaseLost):
            raise
        except Exception as exc:
            # Given back, not fatal: the parent runs the trial itself, so an error that is
            # the trial's own fails the job there, as in one worker, and one that is this
            # worker's (memory, a lost file) costs nothing but time.
            log.warning(
                "job %s: trial %d failed here; left to the job's worker",
                job.id,
                index,
                exc_info=True,
            )
            _LOADED.clear()
            files.started(index).unlink(missing_ok=True)
            reporter.event(
                "trial_released",
                f"trial {index} failed on another worker ({type(exc).__name__}: {exc}); "
                "the job's worker runs it",
                {"trial": index, **worker_record()},
            )
        return None

    return work


def run_trial_task(
    job_id: str, owner: str, index: int, store: JobStore, settings: Settings
) -> str | None:
    """One trial task: None, or the job's terminal status when the task ended it (an
    error fails the job, as it would in one worker)."""
    from crucible.runner import execute_owned

    status = execute_owned(
        job_id, owner, store, settings, trial_work(index, owner, store, settings)
    )
    if status is not None:
        remove_tune_files(settings, job_id)
    return status


def trial_sender(trial_task: Any) -> SendTrials:
    """Sends one worker.tasks.tune_trial task per index (no chord: nobody waits on them)."""

    def send(job_id: str, owner: str, indices: list[int]) -> None:
        for index in indices:
            trial_task.apply_async((job_id, owner, index))

    return send
