"""Where a job's trial fan-out (crucible.tune.trials) keeps its state, and its removal once
the job is over.

- The factorizations: the artifact store under `jobs/<id>/tune/<attempt>/` (written to the
  local folder, then put in the store: with a remote store the local folder is only the
  writer's copy).
- The board (trial values, results, claims, the "open" flag): Redis keys
  `crucible:tune:<job id>:<attempt>:*` in the broker's Redis, each with a TTL of a day, so
  a board nobody removed still goes.

Torch-free: the runner's on_terminal, which the reaper imports too, removes them for every
terminal status of a job that can have them (tuned, Redis broker), however it ended (an
attempt that died in its tune stage leaves its state to the next attempt, and there may be
none). A copy folder (`.put-*`, `.fetch-*`) of a process killed mid-copy is swept a day
later (`sweep_stale_folders`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.artifacts import artifact_store
from crucible.settings import Settings
from crucible.split import chord_backend

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# Every board key expires after this even if nobody removes it (a tuning batch is far
# shorter; the parent renews the open flag at each batch).
BOARD_TTL_SECONDS = 24 * 3600
# A Redis that does not answer fails the call after this, rather than hanging a worker.
REDIS_TIMEOUT_SECONDS = 10.0
KEY_ROOT = "crucible:tune"
OPEN = "open"
# A process's own folders in the job's tune folder of its local cache: `.put-*` (the
# parent's state on its way to a remote store), `.fetch-*` (a helper's, on its way from
# it). Removed once used; a process killed meanwhile leaves them to `sweep_stale_folders`.
PUT_FOLDER = ".put-"
FETCH_FOLDER = ".fetch-"
# A process sweeps at most this often (a glob over every job's folder).
SWEEP_EVERY_SECONDS = 3600.0


def tune_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/tune"


def attempt_key(owner: str) -> str:
    """An attempt's name: a hash of its owner name (which holds ':' and a host name)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:16]


def attempt_prefix(job_id: str, attempt: str) -> str:
    return f"{tune_prefix(job_id)}/{attempt}"


def board_namespace(job_id: str, attempt: str | None = None) -> str:
    """The prefix of an attempt's board keys, or (no attempt) of every attempt's."""
    return f"{KEY_ROOT}:{job_id}:" + (f"{attempt}:" if attempt else "")


_CLIENTS: dict[str, redis.Redis] = {}


def redis_client(settings: Settings) -> redis.Redis | None:
    """A client of the broker's Redis (the one chords count in, `split.chord_backend`);
    None with any other broker. One per URL and process (redis-py reconnects after fork)."""
    url = chord_backend(settings)
    if url is None:
        return None
    client = _CLIENTS.get(url)
    if client is None:
        import redis

        client = _CLIENTS[url] = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
    return client


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def delete_board(client: redis.Redis, job_id: str, attempt: str | None = None) -> None:
    """An attempt's board keys (every attempt's without `attempt`). The open flags go
    first: every write to a board checks its flag (atomically, in Lua), so the full scan
    that follows finds every key there will ever be."""
    pattern = _glob_escape(board_namespace(job_id, attempt))
    flags = list(client.scan_iter(match=f"{pattern}*{OPEN}", count=1000))
    if flags:
        client.delete(*flags)
    keys = list(client.scan_iter(match=f"{pattern}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def remove_tune_files(settings: Settings, job_id: str, attempt: str | None = None) -> None:
    """An attempt's tune state: board keys, stored objects, local folder; without
    `attempt`, every attempt's (the job is over: its tuning can no longer use them). Never
    raises: each part that fails is logged, and the others still go (the board keys
    expire anyway)."""
    prefix = attempt_prefix(job_id, attempt) if attempt else tune_prefix(job_id)

    def board() -> None:
        client = redis_client(settings)
        if client is not None:
            delete_board(client, job_id, attempt)

    def stored() -> None:
        store = artifact_store(settings)
        if store.remote:  # a local store's objects are the folder below
            failed = 0
            for key in store.list(prefix):
                try:
                    store.delete(key)
                except Exception:
                    # The others still go: one object left is better than all of them.
                    failed += 1
                    log.warning("job %s: %s not removed", job_id, key, exc_info=True)
            if failed:
                raise OSError(f"{failed} stored objects under {prefix} were not removed")

    def local() -> None:
        shutil.rmtree(artifact_store(settings).local_path(prefix), ignore_errors=True)

    # The board first: a trial task that finds it gone does nothing more.
    parts: list[tuple[str, Callable[[], None]]] = [
        ("board", board),
        ("stored state", stored),
        ("local folder", local),
    ]
    for what, remove in parts:
        try:
            remove()
        except Exception:
            log.warning("job %s: the tune %s was not removed", job_id, what, exc_info=True)


def may_have_tune_files(settings: Settings, spec: Mapping[str, Any] | None) -> bool:
    """Whether a job of this spec can have fanned its trials out: tuned, and a Redis
    broker (crucible.tune.trials.fanout_enabled). Spares every other job's end the SCANs
    of the broker's keyspace."""
    return bool(spec and spec.get("tuning")) and chord_backend(settings) is not None


_last_sweep = [0.0]
_sweep_lock = threading.Lock()


def sweep_stale_folders(jobs: Path, max_age_seconds: float = BOARD_TTL_SECONDS) -> int:
    """Remove the `.put-*` and `.fetch-*` folders older than `max_age_seconds` (a day: no
    copy takes that long) under every job's tune folder in `jobs` (the local cache's
    `jobs/`), left by a process killed while it copied; at most once per
    SWEEP_EVERY_SECONDS per process. Returns how many went. Never raises."""
    with _sweep_lock:
        now = time.time()
        if now - _last_sweep[0] < SWEEP_EVERY_SECONDS:
            return 0
        _last_sweep[0] = now
    removed = 0
    try:
        for pattern in (f"*/tune/{PUT_FOLDER}*", f"*/tune/{FETCH_FOLDER}*"):
            for folder in jobs.glob(pattern):
                try:
                    if now - folder.stat().st_mtime < max_age_seconds:
                        continue
                except OSError:
                    continue  # gone meanwhile
                remove_copy_folder(folder)
                removed += 1
    except Exception:
        log.warning("stale tune folders not swept", exc_info=True)
    return removed


@contextlib.contextmanager
def copy_folder(jobs: Path, tune: Path, kind: str, name: str) -> Iterator[Path]:
    """A folder of this process's own (`kind`: PUT_FOLDER or FETCH_FOLDER) in a job's tune
    folder `tune` of the local cache, for state on its way to or from a remote store: two
    processes of one machine never share it. Removed afterwards, with the job's folders
    it leaves empty; the stale ones a killed process left under `jobs` go first."""
    sweep_stale_folders(jobs)
    folder = tune / f"{kind}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield folder
    finally:
        remove_copy_folder(folder)


def remove_copy_folder(folder: Path) -> None:
    """`folder`, then its tune folder and job folder once empty."""
    shutil.rmtree(folder, ignore_errors=True)
    for made in (folder.parent, folder.parent.parent):
        with contextlib.suppress(OSError):
            made.rmdir()
