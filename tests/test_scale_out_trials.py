"""Scale-out of a tuning batch's trials (crucible.tune.trials, "the parent helps"): the
board in a real Redis of the module's own, the state through the artifact store.

- Every FactorizedModule kind survives its stored state bit for bit (through the files the
  parent writes for other workers).
- The board and the parent's scheduling: a trial with a result is not run again, an
  expired claim is taken over (within the claim wait too), a live one is waited for
  (renewed past a failed renewal), a sent trial nobody claimed is left for the claim
  wait, a lost claim is neither renewed nor released, every key has a TTL, a removed
  board is never recreated and ends the wait.
- A trial task's edges: a failure gives the trial back, a board gone before the claim
  leaves the job alone, a cancel ends the job; any other task frees its cached state;
  a job's end removes every attempt's board and files; state that cannot be stored
  leaves every trial to the parent.
- In process: trials run from the stored state (as another worker runs them) give the
  objectives, the trials and the output of a plain single-worker run, and the tune state
  is gone afterwards.
- With real processes: bmm (data-free) tuned on a tiny GPT-2 with tuning.batch 2 on two
  Celery workers (prefork, concurrency 1), PostgreSQL, Redis and uvicorn of the test's own:
  the batches' trials ran on both workers, and the trials (params, objectives) and the
  published files equal those of a single-worker, in-process run of the same job; the
  same with each worker its own local artifact folder and one S3 store (s3rver), nothing
  of the fan-out left afterwards; a SIGKILLed worker's trial is taken over by the parent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from cryptography.fernet import Fernet
from pydantic import SecretStr

from crucible.artifacts import artifact_store
from crucible.datasets.schema import validate_file
from crucible.datasets.storage import BlobWriter, DatasetHandle
from crucible.device import compute_device
from crucible.errors import CrucibleError, JobCancelled
from crucible.lease import worker_identity
from crucible.pipeline import _resolve, run_merge_job
from crucible.runner import execute_job, on_terminal
from crucible.secrets import JobSecrets, encrypt_secrets
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.store import JobStore
from crucible.tune import scratch
from crucible.tune.factorized import (
    BmmModule,
    FactorizedModule,
    FixedModule,
    ScaledModule,
    build_factorized,
    module_from_state,
)
from crucible.tune.scratch import (
    BOARD_TTL_SECONDS,
    attempt_key,
    attempt_prefix,
    delete_board,
    redis_client,
    remove_tune_files,
    tune_prefix,
)
from crucible.tune.stage import tuning_evaluator
from crucible.tune.trial import TrialResult, run_trial
from crucible.tune.trials import (
    TrialBoard,
    TrialFanout,
    fanout_enabled,
    fetch_state,
    load_state,
    run_trial_task,
    save_state,
    schedule,
)
from tests.support import faults
from tests.support.faults import (
    OwnPostgres,
    PatientClient,
    make_slow_family,
    short_lease,
    submit,
    wait_until,
)
from tests.support.redis_server import private_redis
from tests.support.reporters import QuietReporter
from tests.support.s3 import ACCESS_KEY as S3_KEY
from tests.support.s3 import REGION as S3_REGION
from tests.support.s3 import S3Server, s3_server
from tests.support.tiny_models import tiny_texts, tiny_word_tokenizer
from tests.test_scale_out_stats import output_of
from tests.test_tune import context, fresh

TRIALS = 8
BATCH = 2
ROWS = 160

# --------------------------------------------------------------------------- state


def every_kind() -> list[FactorizedModule]:
    """One module of each kind, as the tune stage builds them (float64 contexts; a
    transposed bfloat16 one among them)."""
    bias = context((5,), seed=2, name="h.0.attn.c_attn.bias")
    still = context((3, 4), seed=4)
    still.experts = [still.base.clone() for _ in still.experts]  # no evidence: ScaledModule
    return [
        build_factorized("bmm", {"gram": "activations"}, fresh(context((7, 5), seed=12))),
        build_factorized(
            "bmm", {"ridge": 1e-3}, fresh(context((6, 4), seed=1)), transposed=True,
            dtype=torch.bfloat16,
        ),
        build_factorized("bmm", {"gram": "activations"}, fresh(bias)),
        build_factorized("bmm", {}, fresh(still)),
        build_factorized("task_arithmetic", {"scale": 0.4}, fresh(context((4, 6), seed=7))),
        build_factorized("ties", {"density": 0.5}, fresh(context((4, 6), seed=8))),
    ]  # fmt: skip


def same_merges(a: FactorizedModule, b: FactorizedModule) -> None:
    assert type(a) is type(b) and a.name == b.name and a.defaults == b.defaults
    assert (a.transposed, a.dtype) == (b.transposed, b.dtype)
    points: list[dict[str, float]] = [{}]
    if "rho" in a.defaults:
        points += [{"rho": rho, "scale": s} for rho in (1e-3, 0.3, 20.0) for s in (0.5, 1.2)]
    else:
        points += [{"scale": s} for s in (0.1, 0.7, 1.5)]
    for values in points:
        want, got = a.merged(values), b.merged(values)
        assert want.dtype == got.dtype and torch.equal(want, got), (a.name, values)


def test_every_module_kind_round_trips_its_state_bit_for_bit(tmp_path: Path) -> None:
    modules = every_kind()
    assert {type(m) for m in modules} == {BmmModule, FixedModule, ScaledModule}
    for module in modules:
        tensors, meta = module.state()
        json.dumps(meta)  # the manifest's entry
        assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
        same_merges(module, module_from_state(tensors, meta))
    # Through the files another worker reads: per-module safetensors, then the manifest.
    fixed = {"wpe.weight": torch.randn(3, 2)}
    group_of = {m.name: f"g{i % 2}" for i, m in enumerate(modules)}
    save_state(tmp_path / "state", modules, fixed, group_of)
    stored = load_state(tmp_path / "state", "cpu")
    assert stored.group_of == group_of
    assert stored.fixed.keys() == fixed.keys() and torch.equal(
        stored.fixed["wpe.weight"], fixed["wpe.weight"]
    )
    for module, back in zip(modules, stored.modules, strict=True):
        same_merges(module, back)


# --------------------------------------------------------------------------- the board


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the module's own (the board's keys never touch another's)."""
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


def job_keys(url: str, job_id: str = "*") -> list[bytes]:
    """Every board key of the job (of every job by default) left in Redis."""
    return sorted(redis.Redis.from_url(url).scan_iter(match=f"crucible:tune:{job_id}:*"))


def new_board(url: str, job_id: str = "job1", attempt: str = "a1") -> TrialBoard:
    """An opened board; each TrialBoard is one claimant (another worker: another board)."""
    board = TrialBoard(redis.Redis.from_url(url), job_id, attempt)
    board.open()
    return board


def other_worker(board: TrialBoard) -> TrialBoard:
    """The same attempt's board as another process sees it (the same opening: a task
    reads it before its claim)."""
    job_id, attempt = board.namespace.split(":")[2:4]
    return TrialBoard(board.client, job_id, attempt, opened=board.opened)


def result(value: float, pid: int = 0) -> TrialResult:
    return TrialResult(value, "loss", -value, {"t": -value}, {"total": 0.0}, {"pid": pid})


class Runs:
    """run_local for schedule(): records which trials the parent ran itself."""

    def __init__(self) -> None:
        self.ran: list[int] = []

    def __call__(self, index: int) -> TrialResult:
        self.ran.append(index)
        return result(float(index))


def test_the_parent_skips_a_trial_with_a_result(redis_url: str) -> None:
    board = new_board(redis_url)
    other_worker(board).write_result(1, result(41.0, pid=7))  # another worker finished 1
    runs = Runs()
    out = schedule(board, [0, 1, 2], runs, lambda: None)
    assert runs.ran == [0, 2]
    assert [r.objective for r in out] == [0.0, 41.0, 2.0] and out[1].worker == {"pid": 7}
    # The parent's own results are on the board too: a task that starts late finds them,
    # and its claims hold (a task never runs a trial the parent ran).
    assert board.read_result(2) == result(2.0)
    late = other_worker(board)
    assert not late.claim(0, 60) and not late.claim(2, 60)


def test_the_parent_takes_over_a_claim_nobody_renews(redis_url: str) -> None:
    """A worker took trial 1, then died: its claim is not renewed; the parent waits while
    the lease lasts and runs the trial once it ran out."""
    board = new_board(redis_url)
    assert other_worker(board).claim(1, lease_seconds=0.5)
    runs = Runs()
    waited: list[int] = []
    out = schedule(board, [0, 1], runs, lambda: waited.append(1), poll_seconds=0.01)
    assert runs.ran == [0, 1] and [r.objective for r in out] == [0.0, 1.0]
    assert waited  # it was live when the parent got to it


def test_the_parent_waits_for_a_live_claim(redis_url: str) -> None:
    board = new_board(redis_url)
    worker = other_worker(board)
    assert worker.claim(1, lease_seconds=60)  # a live worker holds trial 1
    runs = Runs()
    checks: list[int] = []

    def check_cancelled() -> None:
        # Called while the parent waits: the other worker finishes trial 1 meanwhile.
        checks.append(1)
        if len(checks) == 3:
            worker.write_result(1, result(99.0, pid=5))
            assert worker.release(1)

    out = schedule(board, [0, 1], runs, check_cancelled, poll_seconds=0)
    assert runs.ran == [0] and len(checks) == 3
    assert [r.objective for r in out] == [0.0, 99.0] and out[1].worker == {"pid": 5}


def test_a_sent_trial_is_left_to_other_workers_for_the_claim_wait(redis_url: str) -> None:
    """Trial 1 went out as a task: the parent runs its own trial 0, then leaves trial 1
    alone while the claim wait lasts; the other worker claims and finishes it then."""
    board = new_board(redis_url)
    worker = other_worker(board)
    runs = Runs()
    polls: list[int] = []

    def check_cancelled() -> None:
        polls.append(1)
        if len(polls) == 3:  # the other worker's first task finished importing: it claims
            assert worker.claim(1, 60)
        if len(polls) == 5:
            worker.write_result(1, result(77.0, pid=9))

    out = schedule(
        board, [0, 1], runs, check_cancelled, poll_seconds=0, sent=[1], claim_wait_seconds=600
    )
    assert runs.ran == [0] and len(polls) == 5
    assert [r.objective for r in out] == [0.0, 77.0] and out[1].worker == {"pid": 9}


def test_a_stale_claim_on_a_sent_trial_is_taken_over_within_the_claim_wait(
    redis_url: str,
) -> None:
    """The worker that claimed sent trial 1 died: its claim is taken over once expired,
    not only after the claim wait (which is for trials nobody has claimed yet): an expired
    claim is no key at all, and the "claimed once" key tells it from a trial never
    claimed."""
    board = new_board(redis_url)
    assert other_worker(board).claim(1, lease_seconds=0.2)
    time.sleep(0.3)
    assert board.claimant(1) is None and board.claimed_once(1)
    runs = Runs()
    polls: list[int] = []

    def check_cancelled() -> None:
        polls.append(1)
        assert len(polls) < 100, "the parent kept waiting on a dead worker's claim"

    out = schedule(
        board, [0, 1], runs, check_cancelled, poll_seconds=0, sent=[1], claim_wait_seconds=600
    )
    assert runs.ran == [0, 1] and [r.objective for r in out] == [0.0, 1.0]


def test_the_parent_runs_a_sent_trial_nobody_claimed_once_the_wait_ends(redis_url: str) -> None:
    """One worker only: nobody claims the sent trial; after the (here short) claim wait
    the parent runs it. It was not run before the wait ended."""
    board = new_board(redis_url)
    runs = Runs()
    started = time.monotonic()
    ran_at: list[float] = []

    def run_local(index: int) -> TrialResult:
        ran_at.append(time.monotonic() - started)
        return runs(index)

    out = schedule(
        board, [0, 1, 2], run_local, lambda: None, poll_seconds=0.01,
        sent=[1, 2], claim_wait_seconds=0.3,
    )  # fmt: skip
    assert runs.ran == [0, 1, 2] and [r.objective for r in out] == [0.0, 1.0, 2.0]
    assert ran_at[0] < 0.3 <= ran_at[1]


def test_a_renewed_claim_is_not_stale(redis_url: str) -> None:
    board = new_board(redis_url)
    worker = other_worker(board)
    assert worker.claim(3, lease_seconds=0.3)
    with worker.heartbeat(3, every=0.05, lease_seconds=0.3):
        time.sleep(1.0)  # three leases
        assert worker.claimant(3) == worker.token
        assert not board.claim(3, 60)
    assert worker.claimant(3) == worker.token  # renewed, not released: it expires
    time.sleep(0.4)
    assert board.claim(3, 60)


def test_a_failed_renewal_does_not_end_the_renewals(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis unreachable for one renewal: the claim is renewed on, so the parent never
    takes a live trial over."""
    board = new_board(redis_url)
    worker = other_worker(board)
    assert worker.claim(3, lease_seconds=0.4)
    real_renew = TrialBoard.renew
    failed: list[int] = []

    def flaky_renew(self: TrialBoard, index: int, lease_seconds: float) -> bool:
        if not failed:
            failed.append(1)
            raise redis.ConnectionError("Connection reset by peer")
        return real_renew(self, index, lease_seconds)

    monkeypatch.setattr(TrialBoard, "renew", flaky_renew)
    with worker.heartbeat(3, every=0.05, lease_seconds=0.4):
        time.sleep(1.2)
        assert not board.claim(3, 60)
    assert failed == [1]


def test_a_worker_that_lost_its_claim_cannot_renew_or_release_anothers(redis_url: str) -> None:
    board = new_board(redis_url)
    slow, taker = other_worker(board), other_worker(board)
    assert slow.claim(2, lease_seconds=0.1)
    time.sleep(0.2)  # slow's claim expired: taken over
    assert taker.claim(2, lease_seconds=60)
    assert not slow.renew(2, 60) and not slow.release(2)
    assert board.claimant(2) == taker.token
    ttl = board.client.pttl(board.key("claim:2"))
    assert 50_000 < ttl <= 60_000
    assert taker.release(2) and board.claimant(2) is None


def test_every_board_key_expires(redis_url: str) -> None:
    """A board nobody removes (every worker gone) still goes: no key without a TTL."""
    board = new_board(redis_url)
    board.write_values(0, {"global": {"scale": 1.0}})
    assert board.claim(0, 60)  # before its result: a finished trial is never claimed
    board.write_result(0, result(1.0))
    keys = job_keys(redis_url)
    assert len(keys) == 5  # open, in:0, out:0, claim:0, claimed:0
    assert all(0 < board.client.pttl(k) <= BOARD_TTL_SECONDS * 1000 for k in keys)


def test_a_removed_board_stays_removed(redis_url: str) -> None:
    """Once removed, no write recreates a key (a task that finishes late, a claim)."""
    board = new_board(redis_url)
    worker = other_worker(board)
    assert worker.claim(1, 60)
    delete_board(board.client, "job1")
    assert job_keys(redis_url) == [] and board.generation() is None
    assert not worker.write_result(1, result(1.0)) and not board.write_values(2, {})
    assert not board.claim(2, 60) and not worker.renew(1, 60)
    assert job_keys(redis_url) == []


def test_a_writer_of_an_earlier_opening_writes_nothing_into_a_reopened_board(
    redis_url: str,
) -> None:
    """A chord callback delivered again under the same owner name reopens the attempt's
    board: a helper of the first run, which claimed trial 1 there, cannot put its result
    (computed for the first run's values) into the new opening, nor claim, nor can the
    first parent write values or keep the board open; the new opening's own writers can."""
    first = new_board(redis_url)
    helper = other_worker(first)
    assert first.write_values(1, {"global": {"scale": 1.0}}) and helper.claim(1, 60)
    again = TrialBoard(first.client, "job1", "a1")
    again.open()  # over the first run's keys: its claim of trial 1 is still there
    assert again.opened != first.opened and again.generation() == again.opened
    assert not helper.write_result(1, result(5.0)) and again.read_result(1) is None
    assert not helper.claim(2, 60) and not first.claim(3, 60)
    assert not first.write_values(2, {}) and not first.keep_open()
    assert again.keep_open() and again.write_values(2, {"global": {"scale": 0.5}})
    # Removed and reopened, as TrialFanout.open does: the same.
    delete_board(first.client, "job1")
    again.open()
    assert not helper.write_result(1, result(5.0)) and not helper.claim(1, 60)
    assert other_worker(again).claim(1, 60) and again.read_result(1) is None
    assert job_keys(redis_url) == sorted(
        k.encode() for k in (again.key("open"), again.key("claim:1"), again.key("claimed:1"))
    )


def test_a_finished_trial_is_never_claimed_again(redis_url: str) -> None:
    """Its claim given back (or expired) after its result is in: no one runs it again."""
    board = new_board(redis_url)
    worker = other_worker(board)
    assert worker.claim(1, 60) and worker.write_result(1, result(1.0)) and worker.release(1)
    assert not board.claim(1, 60) and not other_worker(board).claim(1, 60)
    assert board.claimant(1) is None


def test_a_parent_closing_its_attempt_leaves_other_boards_alone(
    tmp_path: Path, redis_url: str
) -> None:
    """close(): a parent that lost its lease removes its own attempt only; and a parent
    whose attempt another run reopened (a chord callback delivered again, same owner
    name) leaves that run's board and files."""
    settings = Settings(data_dir=tmp_path / "data", broker_url=redis_url)
    a = TrialFanout(settings, lambda *_: None, "job1", "host:1:a")
    a.open([], {}, {})
    b = TrialFanout(settings, lambda *_: None, "job1", "host:2:b")
    b.open([], {}, {})  # removed a's, as a new attempt does
    assert b.board.write_values(0, {"global": {"scale": 1.0}})
    a.close()
    assert b.board.generation() is not None and b.board.read_values(0) == {"global": {"scale": 1.0}}
    assert (b.folder / "manifest.json").is_file()
    again = TrialFanout(settings, lambda *_: None, "job1", "host:2:b")
    again.open([], {}, {})
    assert again.board.write_values(0, {"global": {"scale": 0.5}})
    b.close()
    assert again.board.generation() is not None and again.board.read_values(0) == {
        "global": {"scale": 0.5}
    }
    assert (again.folder / "manifest.json").is_file()
    again.close()
    assert job_keys(redis_url) == [] and not again.folder.exists()


def test_opening_a_batch_clears_every_earlier_run_of_the_job(
    tmp_path: Path, redis_url: str
) -> None:
    """Another attempt's state, and an earlier run under this very owner name (a chord
    callback delivered again): their claims and results are gone before the first batch;
    another job's board is left alone."""
    settings = Settings(data_dir=tmp_path / "data", broker_url=redis_url)
    earlier = stored_batch(settings, "job1", "host:1:earlier")
    same = stored_batch(settings, "job1", "host:2:this")
    unrelated = stored_batch(settings, "job2", "host:2:this")
    assert same.claim(0, 60) and earlier.claim(0, 60)
    same.write_result(1, result(7.0))
    fanout = TrialFanout(settings, lambda *_: None, "job1", "host:2:this")
    fanout.open([], {}, {})
    assert fanout.board.generation() is not None and (fanout.folder / "manifest.json").is_file()
    assert not attempt_folder(settings, "job1", "host:1:earlier").exists()
    assert earlier.generation() is None and earlier.claimant(0) is None
    assert fanout.board.read_result(1) is None and fanout.board.claim(0, 60)
    assert unrelated.generation() is not None and unrelated.read_values(1) == {
        "global": {"rho": 0.1, "scale": 1.0}
    }
    fanout.close()
    assert job_keys(redis_url, "job1") == [] and not fanout.folder.exists()
    assert job_keys(redis_url, "job2") != []


def test_fanout_needs_a_redis_broker_and_the_batch(tmp_path: Path) -> None:
    redis_broker = {"data_dir": tmp_path, "broker_url": "redis://127.0.0.1:9/0"}
    assert fanout_enabled(Settings(**redis_broker), 2)
    assert not fanout_enabled(Settings(**redis_broker), 1)
    assert not fanout_enabled(Settings(**redis_broker, trial_fanout_min_batch=3), 2)
    assert not fanout_enabled(Settings(**redis_broker, trial_fanout_min_batch=0), 16)
    # A remote artifact store: the state goes through it, the board through Redis.
    assert fanout_enabled(Settings(**redis_broker, artifacts_uri="s3://bucket/p"), 2)
    assert not fanout_enabled(Settings(data_dir=tmp_path), 2)  # embedded: no broker


# --------------------------------------------------------------------------- a trial task


def owned_job(
    tmp_path: Path, redis_url: str, secrets_key: str | None = None
) -> tuple[JobStore, Settings, str, str]:
    """A running job (its models nowhere: resolving fails) claimed by a parent; with
    `secrets_key`, a Hub token stored encrypted under it."""
    settings = Settings(data_dir=tmp_path / "data", broker_url=redis_url, secrets_key=secrets_key)
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    spec = {
        "base": {"uri": (tmp_path / "nowhere-base").as_uri()},
        "experts": [{"uri": (tmp_path / f"nowhere-{i}").as_uri()} for i in range(2)],
        "method": {"name": "bmm"},
        "tuning": {"dataset": "ds_0000000000", "trials": 4, "init_trials": 2, "batch": 2},
    }
    body = MergeSpec.model_validate(spec).model_dump(mode="json")
    secrets = encrypt_secrets(JobSecrets(hub_token="hf_t"), settings) if secrets_key else None
    job, _ = store.create_job("acme", body, "digest", None, secrets)
    owner = worker_identity()
    assert store.claim(job.id, owner, settings.lease_seconds) is not None
    return store, settings, job.id, owner


def attempt_folder(settings: Settings, job_id: str, owner: str) -> Path:
    """An attempt's folder in the local artifact folder (its stored state, local store)."""
    return artifact_store(settings).local_path(attempt_prefix(job_id, attempt_key(owner)))


def stored_batch(settings: Settings, job_id: str, owner: str) -> TrialBoard:
    """An opened attempt as its parent leaves it: state stored, board open, trial 1's
    values on it. The board returned is the parent's."""
    folder = attempt_folder(settings, job_id, owner)
    save_state(folder, [], {}, {})
    client = redis_client(settings)
    assert client is not None
    board = TrialBoard(client, job_id, attempt_key(owner))
    board.open()
    assert board.write_values(1, {"global": {"rho": 0.1, "scale": 1.0}})
    return board


def test_a_trial_task_that_fails_gives_its_trial_back_to_the_parent(
    tmp_path: Path, redis_url: str
) -> None:
    store, settings, job_id, owner = owned_job(tmp_path, redis_url)
    board = stored_batch(settings, job_id, owner)
    assert run_trial_task(job_id, owner, 1, store, settings) is None
    assert board.claimant(1) is None and board.read_result(1) is None
    assert board.claimed_once(1)  # it was claimed: the parent takes it at once
    job = store.get_job(job_id)
    assert job is not None and job.status == "running"
    (released,) = [e for e in job.events if e.kind == "trial_released"]
    assert released.data is not None and released.data["trial"] == 1
    # The parent then claims and runs it as any unclaimed trial.
    assert board.claim(1, settings.lease_seconds)


def test_a_trial_task_leaves_a_taken_trial_and_a_job_not_its_owners_alone(
    tmp_path: Path, redis_url: str
) -> None:
    store, settings, job_id, owner = owned_job(tmp_path, redis_url)
    board = stored_batch(settings, job_id, owner)
    assert board.claim(1, 60)  # the parent has it: the task does nothing (no resolve error)
    assert run_trial_task(job_id, owner, 1, store, settings) is None
    assert board.claimant(1) == board.token
    board.write_result(1, result(3.0))
    assert board.release(1)
    assert run_trial_task(job_id, owner, 1, store, settings) is None
    assert board.claimant(1) is None  # a trial with a result is not claimed again
    # A task of an earlier attempt: the job runs under another owner now.
    assert run_trial_task(job_id, worker_identity(), 1, store, settings) is None
    job = store.get_job(job_id)
    assert job is not None and job.status == "running"
    assert not [e for e in job.events if e.kind == "trial_released"]


def test_a_cancelled_jobs_trial_task_ends_it_and_removes_the_tune_files(
    tmp_path: Path, redis_url: str
) -> None:
    store, settings, job_id, owner = owned_job(tmp_path, redis_url)
    board = stored_batch(settings, job_id, owner)
    assert store.request_cancel(job_id, "acme") is not None
    assert run_trial_task(job_id, owner, 1, store, settings) == "cancelled"
    assert board.generation() is None and job_keys(redis_url, job_id) == []
    assert not (settings.artifacts_root / tune_prefix(job_id)).exists()


def test_a_trial_task_whose_board_goes_before_its_claim_leaves_the_job_alone(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's tuning ends (its board removed) between the task's look at the board
    and its claim: the task does nothing, the job (now in its merge stage) runs on, and
    nothing of the board comes back."""
    store, settings, job_id, owner = owned_job(tmp_path, redis_url)
    monkeypatch.setattr(TrialBoard, "generation", lambda self: "gen")  # open, a moment ago
    assert run_trial_task(job_id, owner, 1, store, settings) is None
    job = store.get_job(job_id)
    assert job is not None and job.status == "running", job.error
    assert job_keys(redis_url, job_id) == []


def test_the_parent_stops_waiting_when_its_board_is_removed(redis_url: str) -> None:
    """A trial task that ended the job removed the board: the parent does not wait on."""
    board = new_board(redis_url)
    assert other_worker(board).claim(1, 60)  # another worker holds trial 1

    def job_ended_elsewhere() -> None:
        remove_tune_files(Settings(broker_url=redis_url), "job1")

    with pytest.raises(CrucibleError, match="removed"):
        schedule(board, [0, 1], Runs(), job_ended_elsewhere, poll_seconds=0)


def stop_redis(url: str) -> None:
    with contextlib.suppress(redis.ConnectionError):  # it closes the connection
        redis.Redis.from_url(url).shutdown(nosave=True)


@pytest.mark.parametrize("failure", ["redis stops", "open flag evicted"])
def test_a_board_that_fails_mid_batch_leaves_the_rest_of_the_tuning_here(
    tmp_path: Path, failure: str
) -> None:
    """The board only saves time: Redis stops (a restart) or the open flag goes (a
    volatile-* eviction) while the parent runs its trial 0 of a batch of 3 whose other
    trials it sent. The parent keeps trial 0's result, runs 1 and 2 itself, and every
    later batch too (one event `trials_not_split`), as one worker would."""
    with private_redis(tmp_path / "redis") as url:
        settings = Settings(data_dir=tmp_path / "data", broker_url=url)
        sent: list[list[int]] = []
        fanout = TrialFanout(settings, lambda _j, _o, indices: sent.append(indices), "j", "h:1")
        fanout.open([], {}, {})
        events: list[tuple[str, dict[str, Any] | None]] = []
        runs = Runs()

        def run_local(index: int) -> TrialResult:
            if index == 0:
                if failure == "redis stops":
                    stop_redis(url)
                else:
                    fanout.board.client.delete(fanout.board.key("open"))
            return runs(index)

        def event(kind: str, _message: str, data: dict[str, Any] | None = None) -> None:
            events.append((kind, data))

        values = [{"global": {"scale": float(i)}} for i in range(3)]
        first = fanout.run_batch(0, values, run_local, lambda: None, event)
        assert [r.objective for r in first] == [0.0, 1.0, 2.0] and runs.ran == [0, 1, 2]
        later = fanout.run_batch(3, values, run_local, lambda: None, event)
        assert [r.objective for r in later] == [3.0, 4.0, 5.0] and runs.ran == list(range(6))
        assert sent == [[1, 2]]  # the later batch sent nothing
        assert [kind for kind, _ in events] == ["trials_not_split"]
        assert events[0][1] == {
            "error": "ConnectionError" if failure == "redis stops" else "BoardRemoved",
            "trial": 0,
        }
        assert not fanout.folder.exists()  # closed, as far as it could be
        if failure != "redis stops":
            assert job_keys(url) == []


def test_a_board_that_fails_still_lets_a_cancel_end_the_job(tmp_path: Path) -> None:
    """A board removed because the job ended elsewhere (a trial task saw the cancel): the
    parent stops at its cancel check rather than running the batch alone."""
    with private_redis(tmp_path / "redis") as url:
        settings = Settings(data_dir=tmp_path / "data", broker_url=url)
        fanout = TrialFanout(settings, lambda *_: None, "j", "h:1")
        fanout.open([], {}, {})
        cancelled: list[int] = []

        def check_cancelled() -> None:
            if cancelled:
                raise JobCancelled("the job was cancelled while running")

        def run_local(index: int) -> TrialResult:
            remove_tune_files(settings, "j")
            cancelled.append(1)
            return result(float(index))

        with pytest.raises(JobCancelled):
            fanout.run_batch(0, [{}, {}], run_local, check_cancelled)


def test_a_job_that_ends_removes_every_attempts_tune_files(tmp_path: Path, redis_url: str) -> None:
    """Attempt 1 died in its tune stage; attempt 2 fails before tuning (its models are
    nowhere): the job's tune state, attempt 1's board and files, goes with the job."""
    store, settings, job_id, first = owned_job(tmp_path, redis_url)
    earlier = stored_batch(settings, job_id, first)
    assert store.heartbeat(job_id, first, -1)  # attempt 1's worker died: its lease ran out
    assert earlier.generation() is not None and job_keys(redis_url, job_id)
    assert execute_job(job_id, store, settings) == "failed"
    held = store.ownership(job_id)
    assert held is not None and held.attempts == 2
    assert not (settings.artifacts_root / tune_prefix(job_id)).exists()
    assert job_keys(redis_url, job_id) == []


def test_a_trial_task_failing_before_its_work_leaves_the_job_alone(
    tmp_path: Path, redis_url: str
) -> None:
    """A helper whose own setup fails (here its CRUCIBLE_SECRETS_KEY is not the API's; on
    another machine a full disk fetching the dataset would do the same) fails only its
    task: the job runs on, the trial unclaimed (the parent runs it)."""
    api_key, helper_key = (Fernet.generate_key().decode() for _ in range(2))
    store, settings, job_id, owner = owned_job(tmp_path, redis_url, secrets_key=api_key)
    board = stored_batch(settings, job_id, owner)
    helper = settings.model_copy(update={"secrets_key": SecretStr(helper_key)})
    assert run_trial_task(job_id, owner, 1, store, helper) is None
    job = store.get_job(job_id)
    assert job is not None and job.status == "running", job.error
    assert not [e for e in job.events if e.kind in ("error", "trial_released")]
    assert not board.claimed_once(1) and board.generation() is not None
    # With the parent's key the same task gets as far as its claim (then its models,
    # nowhere here, fail it: given back).
    assert run_trial_task(job_id, owner, 1, store, settings) is None
    assert board.claimed_once(1)


def test_only_a_tuned_jobs_end_looks_for_tune_state(tmp_path: Path, redis_url: str) -> None:
    """on_terminal scans the broker's keyspace for a job that can have fanned its trials
    out (tuned, Redis broker) only."""
    store, settings, tuned, _ = owned_job(tmp_path, redis_url)
    plain = MergeSpec.model_validate(
        {
            "base": {"uri": (tmp_path / "b").as_uri()},
            "experts": [{"uri": (tmp_path / "e").as_uri()}],
            "method": {"name": "task_arithmetic"},
        }
    ).model_dump(mode="json")
    untuned, _ = store.create_job("acme", plain, "digest2", None)
    client = redis.Redis.from_url(redis_url)

    def scans() -> int:
        return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    client.config_resetstat()
    on_terminal(store, untuned.id, settings)
    assert scans() == 0
    on_terminal(store, tuned, settings)
    assert scans() > 0


def test_removing_tune_files_never_raises(tmp_path: Path) -> None:
    """Redis down (on_terminal's removal must not fail the job's end): logged, and the
    local folder still goes."""
    settings = Settings(data_dir=tmp_path / "data", broker_url="redis://127.0.0.1:9/0")
    folder = attempt_folder(settings, "job1", "host:1:a")
    save_state(folder, [], {}, {})
    remove_tune_files(settings, "job1")
    assert not folder.exists()


def test_removing_tune_files_never_raises_on_an_s3_error(tmp_path: Path) -> None:
    """The store unreachable: logged; the local folder still goes."""
    settings = Settings(
        data_dir=tmp_path / "data",
        artifacts_uri=f"s3://{BUCKET}/{PREFIX}",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_region="us-east-1",
        retry_attempts=1,
    )
    folder = settings.artifacts_root / tune_prefix("job1") / "a"
    folder.mkdir(parents=True)
    remove_tune_files(settings, "job1")
    assert not folder.exists()


def test_any_other_task_frees_a_trial_tasks_loaded_state(tmp_path: Path) -> None:
    """The evaluator and modules a trial task keeps for the job's later trials go before
    another task runs in that process (a later trial task may never come to it)."""
    code = (
        "from celery.signals import task_prerun\n"
        "from crucible.tune import trials\n"
        "from worker import tasks\n"
        "def left(task):\n"
        "    trials._LOADED[:] = ['the last job attempt']\n"
        "    task_prerun.send(sender=task, task_id='t', task=task, args=(), kwargs={})\n"
        "    return len(trials._LOADED)\n"
        "others = (tasks.run_merge, tasks.merge_part, tasks.expert_statistics,"
        " tasks.deliver_webhook)\n"
        "print(left(tasks.tune_trial), [left(t) for t in others])\n"
    )
    env = {**os.environ, "CRUCIBLE_DATA_DIR": str(tmp_path / "data")}
    env.pop("CRUCIBLE_BROKER_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "1 [0, 0, 0, 0]"


# --------------------------------------------------------------------------- the family


@dataclass
class Family:
    root: Path
    base: Path
    experts: list[Path]
    rows: bytes  # the tuning data: prompt/completion JSONL


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A 2-layer GPT-2 of width 128, two fine-tunes, and a prompt/completion set."""
    root = tmp_path_factory.mktemp("models")
    base, experts = make_slow_family(root / "gpt2", n_experts=2, n_layer=2, n_embd=128)
    tok = tiny_word_tokenizer()
    tok.eos_token = "[SEP]"
    for folder in (base, *experts):
        tok.save_pretrained(folder)
    rows = [{"prompt": t, "completion": " the cat"} for t in tiny_texts(ROWS, seed=9)]
    return Family(root, base, experts, "".join(json.dumps(r) + "\n" for r in rows).encode())


def spec_of(family: Family, dataset: str) -> dict[str, Any]:
    return {
        "base": {"uri": family.base.as_uri()},
        "experts": [{"uri": e.as_uri()} for e in family.experts],
        "method": {"name": "bmm"},
        "output": {"dtype": "float32"},
        "tuning": {
            "dataset": dataset,
            "trials": TRIALS,
            "init_trials": 2,
            "batch": BATCH,
            "groups": "global",
        },
    }


def add_dataset(store: JobStore, body: bytes) -> DatasetHandle:
    with BlobWriter(store.artifacts_root, 10**7) as blob:
        blob.write(body)
        blob.close()
        summary = validate_file(blob.path, "jsonl", None)
        record = store.add_dataset("acme", blob, "jsonl", summary, "lm")
    handle = store.get_dataset("acme", record.id)
    assert handle is not None
    return handle


class TrialLog(QuietReporter):
    def __init__(self) -> None:
        self.trials: dict[int, dict[str, Any]] = {}

    def trial(self, index: int, data: dict[str, Any]) -> None:
        self.trials[index] = data


@dataclass
class Reference:
    trials: list[tuple[dict[str, Any], float]]  # params, objective by index
    output: tuple[dict[str, str], dict[str, Any]]


def single_worker_run(
    family: Family, handle: DatasetHandle, work: Path, trials: TrialFanout | None = None
) -> tuple[Reference, TrialLog, Settings]:
    settings = Settings(data_dir=work / "data", allowed_local_dirs=[family.root])
    spec = MergeSpec.model_validate(spec_of(family, handle.id))
    log = TrialLog()
    with faults.workers_threads():
        done = run_merge_job(spec, work / "out", settings, log, {handle.id: handle}, trials=trials)
    assert done is not None
    assert sorted(log.trials) == list(range(TRIALS))
    params = [(log.trials[i]["params"], log.trials[i]["objective"]) for i in range(TRIALS)]
    return Reference(params, output_of(done.output_dir)), log, settings


def test_trials_from_the_stored_state_equal_a_single_worker_run(
    tmp_path: Path, family: Family, redis_url: str
) -> None:
    """The parent's fan-out path in process, its "other worker" a function that runs each
    sent trial from the stored state and the board alone, as a trial task does."""
    settings = Settings(
        data_dir=tmp_path / "data",
        allowed_local_dirs=[family.root],
        broker_url=redis_url,  # the board's Redis; `send` runs the trials here
    )
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    handle = add_dataset(store, family.rows)
    reference, _, _ = single_worker_run(family, handle, tmp_path / "single")
    spec = MergeSpec.model_validate(spec_of(family, handle.id))
    sent: list[list[int]] = []
    helper: dict[str, Any] = {}

    def send(job_id: str, owner: str, indices: list[int]) -> None:
        sent.append(indices)
        assert fanout.board.generation() is not None
        if not helper:
            inputs, _ = _resolve(spec, settings, QuietReporter())
            device = compute_device(settings.device)
            helper["board"] = other_worker(fanout.board)
            helper["evaluator"] = tuning_evaluator(spec, inputs, {handle.id: handle}, device)
            helper["state"] = fetch_state(artifact_store(settings), fanout.prefix, device)
            helper["evaluator"].swapper.swap(helper["state"].fixed)
        state, board = helper["state"], helper["board"]
        for index in indices:
            assert board.claim(index, 60)
            values = board.read_values(index)
            done = run_trial(state.modules, state.group_of, helper["evaluator"], values)
            done.worker = {**done.worker, "ran_by": "helper"}
            assert board.write_result(index, done) and board.release(index)

    fanout = TrialFanout(settings, send, "job1", "host:1:abc")
    got, log, _ = single_worker_run(family, handle, tmp_path / "fanned", trials=fanout)
    # One task per batch of 2: the parent runs the first trial of each batch itself.
    assert sent == [[i + 1] for i in range(0, TRIALS, BATCH)]
    assert got.trials == reference.trials
    assert got.output == reference.output
    # The parent took the helper's results (the trials it sent), not runs of its own.
    ran_by = [log.trials[i]["worker"].get("ran_by") for i in range(TRIALS)]
    assert ran_by == [None, "helper"] * (TRIALS // BATCH)
    assert not (settings.artifacts_root / tune_prefix("job1")).exists()
    assert job_keys(redis_url) == []


def test_trial_files_that_cannot_be_stored_leave_the_trials_to_the_parent(
    tmp_path: Path, family: Family, redis_url: str
) -> None:
    """The tune folder cannot be written (here a file stands where it goes; in production
    a full disk): the job still tunes and publishes, every trial run by its own worker."""
    settings = Settings(
        data_dir=tmp_path / "data",
        allowed_local_dirs=[family.root],
        broker_url=redis_url,  # up: what fails is the folder
    )
    store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    store.migrate()
    handle = add_dataset(store, family.rows)
    blocked = settings.artifacts_root / tune_prefix("job1")
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    sent: list[list[int]] = []
    fanout = TrialFanout(settings, lambda _j, _o, indices: sent.append(indices), "job1", "h:1:a")

    class Events(TrialLog):
        def __init__(self) -> None:
            super().__init__()
            self.kinds: list[str] = []

        def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
            self.kinds.append(kind)

    spec = MergeSpec.model_validate(spec_of(family, handle.id))
    log = Events()
    done = run_merge_job(spec, tmp_path / "out", settings, log, {handle.id: handle}, trials=fanout)
    assert done is not None and sorted(log.trials) == list(range(TRIALS))
    assert sent == [] and "trials_not_split" in log.kinds and "trials_split" not in log.kinds
    assert blocked.read_text() == "not a folder"
    assert job_keys(redis_url) == []  # the board was never opened


def test_redis_stopping_mid_tuning_leaves_the_trials_of_one_worker(
    tmp_path: Path, family: Family
) -> None:
    """The broker's Redis stops in the second batch (after its trials went out, before
    any ran): the job tunes on alone and gives a single run's trials and output."""
    with private_redis(tmp_path / "redis") as url:
        settings = Settings(
            data_dir=tmp_path / "data",
            allowed_local_dirs=[family.root],
            broker_url=url,
            trial_claim_wait_seconds=0,  # nobody helps: no wait
        )
        store = JobStore(settings.resolved_database_url, settings.artifacts_root)
        store.migrate()
        handle = add_dataset(store, family.rows)
        reference, _, _ = single_worker_run(family, handle, tmp_path / "single")
        sent: list[list[int]] = []

        def send(_job: str, _owner: str, indices: list[int]) -> None:
            sent.append(indices)
            if len(sent) == 2:
                stop_redis(url)

        fanout = TrialFanout(settings, send, "job1", "host:1:abc")
        got, _, _ = single_worker_run(family, handle, tmp_path / "fanned", trials=fanout)
        assert got.trials == reference.trials and got.output == reference.output
        assert sent == [[1], [3]] and fanout.local_only
        assert not (settings.artifacts_root / tune_prefix("job1")).exists()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3"), (BUCKET,)) as server:
        yield server


def s3_settings(data_dir: Path, redis_url: str, server: S3Server) -> Settings:
    """A worker's settings on a machine of its own: its folder, the shared S3 and Redis."""
    return Settings(
        data_dir=data_dir,
        broker_url=redis_url,
        artifacts_uri=f"s3://{BUCKET}/{PREFIX}",
        s3_endpoint_url=server.endpoint,
        s3_region=S3_REGION,
        s3_access_key_id=S3_KEY,
        s3_secret_access_key=S3_KEY,
    )


def test_with_a_remote_store_no_copy_of_the_state_stays_on_a_machine(
    tmp_path: Path, redis_url: str, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's state goes to S3 through a folder removed once uploaded (nothing of it
    stays on the parent's machine for the tuning, or forever were it killed); a helper's
    fetch sweeps the `.fetch-*` folders a killed fetch left a day ago (a fresh one is
    another process's, fetching now); closing removes the stored objects."""
    module = every_kind()[4]
    fixed = {"wpe.weight": torch.randn(3, 2)}
    parent = s3_settings(tmp_path / "parent", redis_url, s3)
    fanout = TrialFanout(parent, lambda *_: None, "job1", "host:1:a")
    fanout.open([module], fixed, {module.name: "g"})
    stored = f"{PREFIX}/{fanout.prefix}/"
    assert s3.keys(BUCKET, stored) == [
        stored + name for name in ("fixed.safetensors", "m0.safetensors", "manifest.json")
    ]
    assert not (parent.artifacts_root / "jobs" / "job1").exists()
    helper = s3_settings(tmp_path / "helper", redis_url, s3)
    jobs = helper.artifacts_root / "jobs"
    stale = jobs / "old" / "tune" / ".fetch-abc-1-dead"
    fresh = jobs / "now" / "tune" / ".fetch-abc-2-live"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "m0.safetensors").write_bytes(b"partial")
    day_ago = time.time() - BOARD_TTL_SECONDS - 60
    os.utime(stale, (day_ago, day_ago))
    monkeypatch.setattr(scratch, "_last_sweep", [0.0])  # this process has not swept yet
    state = fetch_state(artifact_store(helper), fanout.prefix, "cpu")
    same_merges(module, state.modules[0])
    assert torch.equal(state.fixed["wpe.weight"], fixed["wpe.weight"])
    assert not (jobs / "old").exists() and fresh.is_dir()
    assert not (jobs / "job1").exists()
    fanout.close()
    assert s3.keys(BUCKET, stored) == [] and job_keys(redis_url) == []


def test_removing_the_stored_state_goes_past_a_failed_delete(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One object that cannot be deleted: logged, and the others still go."""
    settings = s3_settings(tmp_path / "data", "redis://127.0.0.1:9/0", s3)
    store = artifact_store(settings)
    for name in ("a", "b", "c"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        store.put_file(path, f"{tune_prefix('job1')}/x/{name}")
    real_delete = type(store).delete

    def delete(self: Any, key: str) -> None:
        if key.endswith("/a"):
            raise OSError("the store refused")
        real_delete(self, key)

    monkeypatch.setattr(type(store), "delete", delete)
    remove_tune_files(settings, "job1")
    assert s3.keys(BUCKET, f"{PREFIX}/{tune_prefix('job1')}/") == [
        f"{PREFIX}/{tune_prefix('job1')}/x/a"
    ]


# --------------------------------------------------------------------------- real workers


@dataclass
class World:
    family: Family
    svc: faults.Service
    client: PatientClient
    dataset: str
    reference: Reference


def upload(client: PatientClient, family: Family) -> str:
    resp = client.request(
        "POST",
        "/v1/datasets",
        files={"file": ("lm.jsonl", io.BytesIO(family.rows))},
        data={"name": "lm"},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


# The other worker's first trial task imports torch and the evaluator's modules before it
# can claim (seconds on a loaded machine) while a trial here takes 0.1-4 s: without a
# long wait the job's worker could run every trial and the tests below would prove nothing.
CLAIM_WAIT = {"CRUCIBLE_TRIAL_CLAIM_WAIT_SECONDS": "120"}


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, postgres: OwnPostgres, family: Family
) -> Iterator[World]:
    """API + two workers with the default trial_fanout_min_batch (2)."""
    work = tmp_path_factory.mktemp("shared")
    with faults.service(work, postgres, family.root, workers=2, **CLAIM_WAIT) as svc:
        client = svc.client(180)
        dataset = upload(client, family)
        store = svc.store()
        try:
            handle = store.get_dataset("acme", dataset)
        finally:
            store.close()
        assert handle is not None
        reference, _, _ = single_worker_run(family, handle, work / "single")
        yield World(family, svc, client, dataset, reference)


@pytest.mark.e2e
def test_batch_trials_run_on_both_workers_and_match_one_worker(world: World) -> None:
    svc, client = world.svc, world.client
    job_id = submit(client, spec_of(world.family, world.dataset))
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "succeeded", job
    assert [e["kind"] for e in job["events"]].count("trials_split") == 1
    resp = client.request("GET", f"/v1/merges/{job_id}/trials")
    items = resp.json()["items"]
    assert [t["index"] for t in items] == list(range(TRIALS))
    assert [(t["params"], t["objective"]) for t in items] == world.reference.trials
    pids = svc.worker_pids()
    ran_on = {pids[t["worker"]["worker_pid"]] for t in items}
    assert ran_on == {"worker-0", "worker-1"}, [t["worker"] for t in items]
    job_dir = svc.artifacts / "jobs" / job_id
    assert sorted(p.name for p in job_dir.iterdir()) == ["output"]
    assert output_of(job_dir / "output") == world.reference.output
    assert svc.attempts(job_id) == 1


def claims(url: str, job_id: str) -> dict[int, int]:
    """The job's live trial claims: trial index -> the claimant's pid (its token's)."""
    client = redis.Redis.from_url(url)
    held = {}
    for key in client.scan_iter(match=f"crucible:tune:{job_id}:*:claim:*"):
        token = client.get(key)
        if token is not None:
            held[int(key.rsplit(b":", 1)[1])] = int(token.split(b":")[0])
    return held


def has_result(url: str, job_id: str, index: int) -> bool:
    pattern = f"crucible:tune:{job_id}:*:out:{index}"
    return any(True for _ in redis.Redis.from_url(url).scan_iter(match=pattern))


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.e2e
def test_a_killed_workers_trial_is_taken_over_by_the_parent(
    tmp_path: Path, postgres: OwnPostgres, family: Family, world: World
) -> None:
    """Worker B is SIGKILLed while it holds a trial: its claim stops being renewed, the
    parent (on worker A) runs that trial itself after lease_seconds, and the job ends as
    a single run would, in its first attempt (the parent kept the job's lease)."""
    lease = short_lease(10) | CLAIM_WAIT
    with faults.service(tmp_path, postgres, family.root, workers=2, **lease) as svc:
        client = svc.client(180)
        job_id = submit(client, spec_of(family, upload(client, family)))
        url = svc.redis.url

        def held_elsewhere() -> tuple[int, int, int] | None:
            """A claim by another process than the parent's (trial 0 is always the
            parent's, held while the board is), its trial not finished."""
            held = claims(url, job_id)
            parent = held.get(0)
            if parent is None:
                return None
            for index, pid in held.items():
                if pid != parent and not has_result(url, job_id, index):
                    return index, pid, parent
            return None

        index, pid, parent = wait_until(held_elsewhere, 300, "a trial on the other worker", 0.02)
        victim = svc.worker_pids()[parent_pid(pid)]
        svc.procs.kill(victim)
        # Killed mid-trial: no result came, and none can come from the dead process.
        assert not has_result(url, job_id, index)

        def taken_over() -> bool:
            status = client.request("GET", f"/v1/merges/{job_id}").json()["status"]
            return has_result(url, job_id, index) or status not in ("queued", "running")

        # Once the parent has run the trial itself, a replacement worker helps with the
        # later batches (alone, the parent would wait out each batch's claim wait).
        wait_until(taken_over, 300, "the parent to take the trial over")
        svc.procs.start_worker(victim)
        job = client.wait(job_id, timeout=600)
        assert job["status"] == "succeeded", job
        items = client.request("GET", f"/v1/merges/{job_id}/trials").json()["items"]
        assert [(t["params"], t["objective"]) for t in items] == world.reference.trials
        assert items[index]["worker"]["pid"] == parent
        hashes, _ = output_of(svc.artifacts / "jobs" / job_id / "output")
        assert hashes == world.reference.output[0]
        assert svc.attempts(job_id) == 1
        assert claims(url, job_id) == {} and not job_keys(url, job_id)


BUCKET = "artifacts"
PREFIX = "crucible"


def start_worker_with(svc: faults.Service, name: str, env: dict[str, str]) -> None:
    """A worker whose settings differ from the service's by `env` (another machine's)."""
    shared = svc.procs.env
    svc.procs.env = {**shared, **env}
    try:
        svc.procs.start_worker(name)
    finally:
        svc.procs.env = shared


def download(server: S3Server, prefix: str, dest: Path, skip: str) -> None:
    for key in server.keys(BUCKET, prefix):
        name = key.removeprefix(prefix)
        if name != skip:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(server.read(BUCKET, key))


@pytest.mark.e2e
def test_workers_with_their_own_folders_share_the_trials_through_s3(
    tmp_path: Path, postgres: OwnPostgres, family: Family, world: World
) -> None:
    """Two workers as on two machines: each its own local artifact folder, one S3 store
    (s3rver) and one Redis. The batches' trials run on both (the other worker fetches the
    factorizations from S3), trials and output equal a single-worker run's, and nothing
    of the fan-out is left: no board key, no object under the job's tune prefix, no local
    tune folder on either worker."""
    from crucible.publish.s3_sink import MANIFEST as OUTPUT_MANIFEST

    with s3_server(tmp_path / "s3", (BUCKET,)) as server:
        env = {**server.env(), "CRUCIBLE_ARTIFACTS_URI": f"s3://{BUCKET}/{PREFIX}", **CLAIM_WAIT}
        with faults.service(tmp_path / "svc", postgres, family.root, workers=0, **env) as svc:
            folders = {}
            for i in range(2):
                name = f"worker-{i}"
                folders[name] = tmp_path / name / "artifacts"
                own = {
                    "CRUCIBLE_DATA_DIR": str(tmp_path / name),
                    "CRUCIBLE_ARTIFACTS_DIR": str(folders[name]),
                }
                start_worker_with(svc, name, own)
            client = svc.client(180)
            job_id = submit(client, spec_of(family, upload(client, family)))
            job = client.wait(job_id, timeout=600)
            assert job["status"] == "succeeded", job
            assert [e["kind"] for e in job["events"]].count("trials_split") == 1
            items = client.request("GET", f"/v1/merges/{job_id}/trials").json()["items"]
            assert [(t["params"], t["objective"]) for t in items] == world.reference.trials
            pids = svc.worker_pids()
            ran_on = {pids[t["worker"]["worker_pid"]] for t in items}
            assert ran_on == {"worker-0", "worker-1"}, [t["worker"] for t in items]
            # The output, as stored in S3, is a single run's.
            out = tmp_path / "output"
            download(server, f"{PREFIX}/jobs/{job_id}/output/", out, OUTPUT_MANIFEST)
            assert output_of(out) == world.reference.output
            assert svc.attempts(job_id) == 1
            # Nothing of the fan-out is left.
            assert job_keys(svc.redis.url) == []
            assert server.keys(BUCKET, f"{PREFIX}/{tune_prefix(job_id)}/") == []
            for folder in folders.values():
                assert not (folder / tune_prefix(job_id)).exists()
