"""Scale-out of a tuning batch: with `tuning.batch` >= `trial_fanout_min_batch` and a Redis
broker, the trials of one BO batch run on several workers ("the parent helps"): on one
machine, or on many when they share the artifact store (S3, or one shared folder).

1. The job's worker (the parent) asks Redis (unreachable: nothing is written), then
   writes every module's factorization and bmm's fixed tensors once (safetensors per
   module, then manifest.json) to the artifact store under `jobs/<id>/tune/<attempt>/`:
   with the local store, that folder itself; with a remote one, through a folder of its
   own removed once uploaded (manifest last). Then it opens the attempt's board: the Redis
   keys `crucible:tune:<id>:<attempt>:*` (crucible.tune.scratch), each with a TTL of a
   day. `<attempt>` is a hash of the parent's owner name, so a requeued job never reads an
   earlier attempt's state (the new parent removes it). The open flag holds a generation
   token; every write to the board checks, in the same Lua call, that the flag holds the
   writer's generation, so a removed board stays removed and a late writer of an earlier
   opening (a chord callback delivered again reopens its attempt's board) writes nothing.
2. Per batch of b trials the parent puts each trial's values on the board, sends b-1
   `crucible.tune_trial` tasks (the batch's trials but its first), and runs the batch
   itself in index order, skipping a trial that has a result or that another worker
   holds: a claim is a key set NX with a lease (`lease_seconds`) its holder renews every
   `heartbeat_seconds` (compare-and-pexpire: a worker that lost its claim cannot renew
   another's), so the claim of a worker that died expires and the trial is claimed again
   at once. A sent trial nobody has claimed yet (a "claimed once" key tells that from an
   expired claim) is left to the others for `trial_claim_wait_seconds`. Then the parent
   waits (checking cancel and lease) for the trials other workers hold. It never waits
   on a task that has not started, so one worker at concurrency 1 simply runs every
   trial itself, and the tasks it sent exit as no-ops later: no deadlock, and no chord.
   The board only saves time: should Redis fail or the board go (an evicted flag) during
   the tuning, the batch's missing trials and every later batch run on the parent alone
   (event `trials_not_split`), as with one worker.
3. A trial task first looks at the board (one round trip: nothing to do when it is
   closed or the trial has a result), then runs `trial_work` under runner.execute_owned
   with the parent's owner name (a job no longer running under it is left alone; an
   error before the work, such as this machine's dataset download or secrets, fails the
   task only: the trial stays unclaimed and the parent runs it). The work claims its
   trial, loads the stored modules (from the store: a worker on another machine fetches
   them into a private folder of its own cache, removed once loaded; once per process and
   board: later trials of the job reuse them; any other task in the process frees them),
   builds the evaluator, runs crucible.tune.trial.run_trial, the parent's own code, and
   puts the result on the board. A task that fails gives its claim back (event
   `trial_released`) and the parent runs the trial: an error that is the trial's own then
   fails the job there, as in one worker.
4. The parent records the trials in index order as in one worker; its board, stored
   state and folder are removed when the tune stage ends, however it ends, and every
   attempt's when the job ends (crucible.tune.scratch, from runner.on_terminal); a copy
   folder a killed process left is swept a day later by the next fan-out on its machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from redis.exceptions import RedisError
from safetensors.torch import load_file, save_file

from crucible.artifacts import ArtifactStore, artifact_store, put_folder, write_text_atomic
from crucible.errors import CrucibleError, JobCancelled
from crucible.lease import LeaseLost
from crucible.settings import Settings
from crucible.split import chord_backend
from crucible.stats.cache import worker_record
from crucible.tune.factorized import FactorizedModule, module_from_state
from crucible.tune.scratch import (
    BOARD_TTL_SECONDS,
    FETCH_FOLDER,
    OPEN,
    PUT_FOLDER,
    attempt_key,
    attempt_prefix,
    board_namespace,
    copy_folder,
    redis_client,
    remove_tune_files,
)
from crucible.tune.space import GroupValues
from crucible.tune.trial import TrialResult, run_trial

if TYPE_CHECKING:
    import redis

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
BOARD_REMOVED = "the tuning batch's trial board was removed"

# (job id, owner, trial indices) -> sends one trial task per index.
SendTrials = Callable[[str, str, list[int]], None]
# The job's events (StoreReporter.event): kind, message, data.
EventSink = Callable[[str, str, "dict[str, Any] | None"], None]


def fanout_enabled(settings: Settings, batch: int) -> bool:
    minimum = settings.trial_fanout_min_batch
    return (
        minimum >= 1
        and batch >= minimum
        # A Redis broker: real workers to send to, and the board's Redis.
        and chord_backend(settings) is not None
    )


# --------------------------------------------------------------------------- state


def _module_file(index: int) -> str:
    return f"m{index}.safetensors"


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
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / _module_file(i)))
        entries.append({**meta, "group": group_of[module.name]})
    save_file({k: t.contiguous() for k, t in fixed.items()}, str(folder / FIXED_FILE))
    write_text_atomic(folder / MANIFEST, json.dumps({"modules": entries}))


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
        tensors = load_file(str(folder / _module_file(i)))
        modules.append(module_from_state(tensors, meta, device))
        group_of[meta["name"]] = meta["group"]
    return StoredState(modules, load_file(str(folder / FIXED_FILE)), group_of)


def fetch_state(store: ArtifactStore, prefix: str, device: torch.device | str) -> StoredState:
    """The state stored under `prefix`, manifest first. From a local store, its own files
    (get_file has nothing to do); from a remote one, through a copy folder of this
    process's own in the local cache, removed once loaded."""
    local = store.local_path(prefix)
    with (
        copy_folder(store.local_path("jobs"), local.parent, FETCH_FOLDER, local.name)
        if store.remote
        else contextlib.nullcontext(local)
    ) as folder:

        def get(name: str) -> None:
            if not store.get_file(f"{prefix}/{name}", folder / name):
                raise CrucibleError("internal", f"the stored tuning state lacks {name}")

        get(MANIFEST)
        count = len(json.loads((folder / MANIFEST).read_text())["modules"])
        for name in [*(_module_file(i) for i in range(count)), FIXED_FILE]:
            get(name)
        return load_state(folder, device)


# --------------------------------------------------------------------------- the board

# Every write checks the board's open flag (KEYS[1]) in the same call, and that it still
# holds the writer's opening (a generation token): once the board is removed (open flag
# first, crucible.tune.scratch.delete_board) nothing recreates a key, and a late writer of
# an earlier opening (a chord callback delivered again reopens its attempt's board) never
# writes into the new one.
# KEYS: open flag, key; ARGV: value, TTL ms, generation.
_PUT = """
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: open flag, claim, claimed-once marker, result; ARGV: token, lease ms, TTL ms,
# generation. A trial with a result is never claimed (nor run) again.
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[4] then return 0 end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class BoardRemoved(CrucibleError):
    """The board is gone, or holds another opening than this claimant's."""

    def __init__(self) -> None:
        super().__init__("internal", BOARD_REMOVED)


class TrialBoard:
    """One attempt's trials in Redis: values in, claims, results out, and the open flag
    (its value, the generation, names this opening: a process's cached state never
    outlives it, and a writer of another opening writes nothing). Each instance is one
    claimant (its token: pid and a random part) of one opening, `opened`: the parent's
    from open(), a task's read before its claim (None: every write fails)."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        attempt: str,
        ttl_seconds: float = BOARD_TTL_SECONDS,
        opened: str | None = None,
    ) -> None:
        self.client = client
        self.namespace = board_namespace(job_id, attempt)
        self.ttl_seconds = ttl_seconds
        self.token = f"{os.getpid()}:{uuid.uuid4().hex}"
        self.opened = opened
        self._put = client.register_script(_PUT)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def key(self, name: str) -> str:
        return self.namespace + name

    # The open flag: set once the state is stored, renewed per batch, removed first.

    def open(self) -> str:
        generation = uuid.uuid4().hex
        self.client.set(self.key(OPEN), generation, px=_ms(self.ttl_seconds))
        self.opened = generation
        return generation

    def keep_open(self) -> bool:
        """Renew the open flag's TTL; False when it is gone or another opening's."""
        keys = [self.key(OPEN)]
        return bool(self._renew(keys=keys, args=[self.opened or "", _ms(self.ttl_seconds)]))

    def generation(self) -> str | None:
        value = self.client.get(self.key(OPEN))
        return None if value is None else bytes(value).decode()

    # Values and results.

    def _set(self, name: str, data: Any) -> bool:
        args = [json.dumps(data), _ms(self.ttl_seconds), self.opened or ""]
        return bool(self._put(keys=[self.key(OPEN), self.key(name)], args=args))

    def _get(self, name: str) -> Any:
        value = self.client.get(self.key(name))
        return None if value is None else json.loads(value)

    def write_values(self, index: int, values: GroupValues) -> bool:
        return self._set(f"in:{index}", values)

    def read_values(self, index: int) -> GroupValues:
        values: GroupValues | None = self._get(f"in:{index}")
        if values is None:
            raise CrucibleError("internal", f"trial {index} has no values on the board")
        return values

    def write_result(self, index: int, result: TrialResult) -> bool:
        return self._set(f"out:{index}", result.as_dict())

    def read_result(self, index: int) -> TrialResult | None:
        data = self._get(f"out:{index}")
        return None if data is None else TrialResult.from_dict(data)

    def look(self, indices: Sequence[int]) -> tuple[bool, dict[int, TrialResult], set[int]]:
        """One round trip (MGET): whether the board still holds this opening, the results
        of `indices` there are, and which of them were ever claimed."""
        names = [OPEN, *(f"out:{i}" for i in indices), *(f"claimed:{i}" for i in indices)]
        values = self.client.mget([self.key(name) for name in names])
        current, outs, once = values[0], values[1 : len(indices) + 1], values[len(indices) + 1 :]
        ours = current is not None and bytes(current).decode() == self.opened
        results = {
            i: TrialResult.from_dict(json.loads(v))
            for i, v in zip(indices, outs, strict=True)
            if v is not None
        }
        return ours, results, {i for i, v in zip(indices, once, strict=True) if v is not None}

    # Claims.

    def claim(self, index: int, lease_seconds: float) -> bool:
        """Take trial `index` unless someone holds it (a claim not renewed within its lease
        is gone: its holder died) or the board is gone."""
        keys = [
            self.key(OPEN),
            self.key(f"claim:{index}"),
            self.key(f"claimed:{index}"),
            self.key(f"out:{index}"),
        ]
        args = [self.token, _ms(lease_seconds), _ms(self.ttl_seconds), self.opened or ""]
        return bool(self._claim(keys=keys, args=args))

    def claimed_once(self, index: int) -> bool:
        """Whether anyone ever claimed trial `index` (its claim may have expired since)."""
        return bool(self.client.exists(self.key(f"claimed:{index}")))

    def claimant(self, index: int) -> str | None:
        """The token of trial `index`'s live claim."""
        value = self.client.get(self.key(f"claim:{index}"))
        return None if value is None else bytes(value).decode()

    def renew(self, index: int, lease_seconds: float) -> bool:
        """Extend this claimant's claim; False if the claim is no longer its own."""
        keys = [self.key(f"claim:{index}")]
        return bool(self._renew(keys=keys, args=[self.token, _ms(lease_seconds)]))

    def release(self, index: int) -> bool:
        """Give this claimant's claim back (another's is left alone)."""
        return bool(self._release(keys=[self.key(f"claim:{index}")], args=[self.token]))

    @contextlib.contextmanager
    def heartbeat(self, index: int, every: float, lease_seconds: float) -> Iterator[None]:
        """Renew trial `index`'s claim every `every` seconds while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                try:
                    if not self.renew(index, lease_seconds):
                        log.warning("trial %d: its claim was lost (not renewed in time)", index)
                        return
                except Exception:
                    # Redis unreachable for a moment: only this renewal is missed; a thread
                    # that ended on it would let the parent take over a live trial.
                    log.warning("trial %d: claim not renewed", index, exc_info=True)

        thread = threading.Thread(target=beat, name=f"trial-{index}-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def schedule(
    board: TrialBoard,
    indices: Sequence[int],
    run_local: Callable[[int], TrialResult],
    check_cancelled: Callable[[], None],
    poll_seconds: float = POLL_SECONDS,
    sent: Collection[int] = (),
    claim_wait_seconds: float = 0.0,
    results: dict[int, TrialResult] | None = None,
) -> list[TrialResult]:
    """The parent's side of one batch: every trial in `indices` that has no result and no
    live claimant runs here, in index order; then wait for the others' results. A trial
    in `sent` (a task went out for it) is left to the other workers until
    `claim_wait_seconds` after the batch started, unless someone claimed it once (a claim
    that expired since is taken over at once); unclaimed by then, it runs here.
    `results` collects the batch's results as they come, so a caller that catches an
    error (RedisError, BoardRemoved) keeps those it has. One MGET per poll, and a claim
    per trial it may run."""
    results = {} if results is None else results
    others_until = time.monotonic() + claim_wait_seconds
    while True:
        pending = [i for i in indices if i not in results]
        ours, done, claimed_once = board.look(pending)
        results.update(done)
        for index in pending:
            if index in results:
                continue
            if index in sent and index not in claimed_once and time.monotonic() < others_until:
                continue  # unclaimed: still the other workers'
            # The claim fails if someone holds the trial or finished it since the look.
            if board.claim(index, board.ttl_seconds):
                # The parent claims for the board's TTL and never renews: it runs the trial
                # at once, and were it to die, the job's next attempt opens a board of its
                # own (removing this one).
                results[index] = run_local(index)
                board.write_result(index, results[index])
        if len(results) == len(indices):
            return [results[i] for i in indices]
        check_cancelled()
        if not ours:
            # Removed under us (a trial task that ended the job removes it; Redis evicted
            # the flag; another run of this attempt reopened it): waiting would never end.
            raise BoardRemoved()
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
        self.attempt = attempt_key(owner)
        self.prefix = attempt_prefix(job_id, self.attempt)
        self.store = artifact_store(settings)
        # The stored state's folder with a local store (the store's own files); with a
        # remote one nothing of it stays here.
        self.folder = self.store.local_path(self.prefix)
        # Set once the board failed mid-tuning: every later trial runs here.
        self.local_only = False

    @cached_property
    def board(self) -> TrialBoard:
        client = redis_client(self._settings)
        if client is None:
            raise CrucibleError("internal", "the trial fan-out needs a Redis broker")
        return TrialBoard(client, self._job_id, self.attempt)

    def enabled(self, batch: int) -> bool:
        return fanout_enabled(self._settings, batch)

    def open(
        self,
        modules: Sequence[FactorizedModule],
        fixed: Mapping[str, torch.Tensor],
        group_of: Mapping[str, str],
    ) -> None:
        """Store the factorizations, then open the board. Every earlier run's state goes
        first, this owner's own too (a chord callback delivered again runs the stage again
        under the same owner name: its earlier run's claims would hold trials nobody
        runs). Redis is asked first: unreachable, nothing is uploaded for nothing."""
        self.board.client.ping()
        remove_tune_files(self._settings, self._job_id)
        if self.store.remote:
            # Written to a copy folder removed once uploaded: the helpers fetch from the
            # store, and a copy here would stay all the tuning (a model's size), or
            # forever were this worker killed.
            jobs = self.store.local_path("jobs")
            with copy_folder(jobs, self.folder.parent, PUT_FOLDER, self.attempt) as folder:
                save_state(folder, modules, fixed, group_of)
                put_folder(self.store, folder, self.prefix, last=MANIFEST)
        else:
            save_state(self.folder, modules, fixed, group_of)
        self.board.open()

    def run_batch(
        self,
        first: int,
        batch: Sequence[GroupValues],
        run_local: Callable[[int], TrialResult],
        check_cancelled: Callable[[], None],
        event: EventSink | None = None,
    ) -> list[TrialResult]:
        """The batch's results in index order. The board only saves time: should Redis
        fail (a restart, a blip) or the board go (an evicted flag) mid-tuning, the trials
        this batch lacks and every later batch's run here, as with one worker (event
        `trials_not_split`); a job that ended meanwhile stops at check_cancelled."""
        indices = list(range(first, first + len(batch)))
        results: dict[int, TrialResult] = {}
        if not self.local_only:
            try:
                return self._shared(indices, batch, run_local, check_cancelled, results)
            except (RedisError, BoardRemoved) as exc:
                check_cancelled()
                self._go_local(first, exc, event)
        for index in indices:
            if index not in results:
                results[index] = run_local(index)
        return [results[i] for i in indices]

    def _shared(
        self,
        indices: list[int],
        batch: Sequence[GroupValues],
        run_local: Callable[[int], TrialResult],
        check_cancelled: Callable[[], None],
        results: dict[int, TrialResult],
    ) -> list[TrialResult]:
        board = self.board
        if not board.keep_open() or not all(
            board.write_values(index, values) for index, values in zip(indices, batch, strict=True)
        ):
            raise BoardRemoved()
        sent: list[int] = []
        if len(indices) > 1:
            try:
                self._send(self._job_id, self._owner, indices[1:])
                sent = indices[1:]
            except Exception:
                # The broker is down: nobody else will help, and the parent runs them all.
                log.warning("job %s: trial tasks not sent", self._job_id, exc_info=True)
        return schedule(
            board,
            indices,
            run_local,
            check_cancelled,
            sent=sent,
            claim_wait_seconds=self._settings.trial_claim_wait_seconds,
            results=results,
        )

    def _go_local(self, first: int, exc: BaseException, event: EventSink | None) -> None:
        log.warning(
            "job %s: the trials from %d on run on the job's worker only",
            self._job_id,
            first,
            exc_info=True,
        )
        self.local_only = True
        if event is not None:
            event(
                "trials_not_split",
                f"the trials of the batch from {first} on that are not done yet, and every "
                f"later batch's, run here only: {not_split_reason(exc)}",
                {"error": type(exc).__name__, "trial": first},
            )
        self.close()  # best effort: its keys expire anyway, and on_terminal removes them

    def close(self) -> None:
        """This attempt's board, stored state and folder (only: a parent that lost its
        lease must leave the next attempt's alone, and one whose board another run of
        this attempt reopened leaves that run's), and the job's tune folder once empty.
        Never raises."""
        opened = self.board.opened if "board" in self.__dict__ else None
        if opened is not None:
            try:
                current = self.board.generation()
            except RedisError:
                current = None  # removed as far as can be: the keys expire anyway
            if current is not None and current != opened:
                log.warning("job %s: its trial board was reopened; left to it", self._job_id)
                return
        remove_tune_files(self._settings, self._job_id, self.attempt)
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()


def not_split_reason(exc: BaseException) -> str:
    """Why the trials run on the job's worker only, for the `trials_not_split` event."""
    if isinstance(exc, RedisError):
        return f"the broker's Redis failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, BoardRemoved):
        return "the trial board was removed"
    return f"their files could not be stored ({type(exc).__name__}: {exc})"


def fanout_for(settings: Settings, send: SendTrials) -> Callable[[str, str], TrialFanout]:
    """The runner's factory: (job id, owner) -> the parent's TrialFanout."""
    return lambda job_id, owner: TrialFanout(settings, send, job_id, owner)


# --------------------------------------------------------------------------- a trial task


@dataclass
class _Loaded:
    key: tuple[str, str, str]
    evaluator: Evaluator
    state: StoredState


# The last board's evaluator and modules in this process: a job's later trials on this
# worker do not load them again. One entry: a new job's trial frees the previous.
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
    prefix: str,
    generation: str,
    store: JobStore,
    settings: Settings,
    reporter: StoreReporter,
    hub_token: str | None,
) -> _Loaded:
    key = (job.id, prefix, generation)
    if _LOADED and _LOADED[0].key == key:
        return _LOADED[0]
    _LOADED.clear()
    from crucible.device import compute_device
    from crucible.parts import PartReporter
    from crucible.pipeline import _datasets, _resolve
    from crucible.stats.fanout import job_datasets
    from crucible.tune.stage import tuning_evaluator

    device = compute_device(settings.device)
    # The stored state first: missing or unreadable, the task fails before the costlier
    # evaluator is built.
    state = fetch_state(artifact_store(settings), prefix, device)
    inputs, _ = _resolve(spec, settings, PartReporter(reporter), hub_token)
    datasets = _datasets(spec, job_datasets(store, settings, job.id, spec))
    evaluator = tuning_evaluator(spec, inputs, datasets, device)
    evaluator.swapper.swap(state.fixed)
    state.fixed = {}
    _LOADED.append(_Loaded(key, evaluator, state))
    return _LOADED[0]


def trial_work(
    index: int, owner: str, board: TrialBoard, store: JobStore, settings: Settings
) -> OwnedWork:
    """What one `crucible.tune_trial` task does for the job (run by runner.execute_owned)
    on `board`, the opening it found (`_open_board`)."""

    def work(job: Job, spec: MergeSpec, reporter: StoreReporter, hub_token: str | None) -> None:
        reporter.check_cancelled()
        generation = board.opened
        assert generation is not None
        try:
            # Fails if the parent or another task has the trial, it has a result, or the
            # board went (or was reopened) since the look.
            if not board.claim(index, settings.lease_seconds):
                return None
        except RedisError:
            # Not the job's failure: the parent runs the trial once nobody claims it.
            log.warning("job %s: trial %d left to the job's worker", job.id, index, exc_info=True)
            return None
        try:
            with board.heartbeat(index, settings.heartbeat_seconds, settings.lease_seconds):
                prefix = attempt_prefix(job.id, attempt_key(owner))
                loaded = _load(job, spec, prefix, generation, store, settings, reporter, hub_token)
                values = board.read_values(index)
                reporter.check_cancelled()
                result = run_trial(
                    loaded.state.modules, loaded.state.group_of, loaded.evaluator, values
                )
                board.write_result(index, result)
            with contextlib.suppress(RedisError):
                board.release(index)  # else it expires within the lease
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
            with contextlib.suppress(RedisError):
                board.release(index)
            reporter.event(
                "trial_released",
                f"trial {index} failed on another worker ({type(exc).__name__}: {exc}); "
                "the job's worker runs it",
                {"trial": index, **worker_record()},
            )
        return None

    return work


def _open_board(job_id: str, owner: str, index: int, settings: Settings) -> TrialBoard | None:
    """The trial's board as it is now open (the task writes into that opening only), or
    None when it is closed or the trial has a result: a look before the job's dataset and
    secrets are fetched (a task queued behind the tuning's end, or behind the parent
    running its trial, costs nothing more)."""
    client = redis_client(settings)
    if client is None:
        return None
    board = TrialBoard(client, job_id, attempt_key(owner))
    try:
        generation = board.generation()
        if generation is None:
            _LOADED.clear()  # the attempt's tuning is over: free its modules
            return None
        board.opened = generation
        return board if board.read_result(index) is None else None
    except RedisError:
        log.warning("job %s: trial %d left to the job's worker", job_id, index, exc_info=True)
        return None


def _the_jobs(exc: BaseException) -> bool:
    """A trial task's error that ends the job: a cancel. Any other (the dataset or the
    secrets unreadable on this machine, a full disk here) is this worker's own: raised to
    run_trial_task, the job left to its worker, which runs the trial if nobody does."""
    return isinstance(exc, JobCancelled)


def run_trial_task(
    job_id: str, owner: str, index: int, store: JobStore, settings: Settings
) -> str | None:
    """One trial task: None, or the job's terminal status when the task ended it (a
    cancel; on_terminal then removed the tune state). An error of the task's own is
    logged and leaves the job alone."""
    from crucible.runner import execute_owned

    board = _open_board(job_id, owner, index, settings)
    if board is None:
        return None
    work = trial_work(index, owner, board, store, settings)
    try:
        return execute_owned(
            job_id, owner, store, settings, work, retry_on=lambda exc: not _the_jobs(exc)
        )
    except Exception:
        log.warning(
            "job %s: trial task %d failed before its work; left to the job's worker",
            job_id,
            index,
            exc_info=True,
        )
        _LOADED.clear()
        return None


def trial_sender(trial_task: Any) -> SendTrials:
    """Sends one worker.tasks.tune_trial task per index (no chord: nobody waits on them).
    A task not started within the board's TTL expires unrun: its board is gone by then."""

    def send(job_id: str, owner: str, indices: list[int]) -> None:
        for index in indices:
            trial_task.apply_async((job_id, owner, index), expires=BOARD_TTL_SECONDS)

    return send
