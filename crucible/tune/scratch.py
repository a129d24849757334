"""Where a job's trial fan-out (crucible.tune.trials) keeps its state, and its removal once
the job is over.

- The factorizations: the artifact store under `jobs/<id>/tune/<attempt>/` (written to the
  local folder, then put in the store: with a remote store the local folder is only the
  writer's copy).
- The board (trial values, results, claims, the "open" flag): Redis keys
  `crucible:tune:<job id>:<attempt>:*` in the broker's Redis, each with a TTL of a day, so
  a board nobody removed still goes.

Torch-free: the runner's on_terminal, which the reaper imports too, removes them for every
terminal status, however the job ended (an attempt that died in its tune stage leaves its
state to the next attempt, and there may be none).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

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


def remove_attempts(settings: Settings, job_id: str, attempt: str | None = None) -> None:
    """An attempt's board, stored objects and local folder (every attempt's without
    `attempt`). Never raises: each part that fails is logged, and the others still go
    (the board keys expire anyway)."""
    prefix = attempt_prefix(job_id, attempt) if attempt else tune_prefix(job_id)

    def board() -> None:
        client = redis_client(settings)
        if client is not None:
            delete_board(client, job_id, attempt)

    def stored() -> None:
        store = artifact_store(settings)
        if store.remote:  # a local store's objects are the folder below
            for key in store.list(prefix):
                store.delete(key)

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


def remove_tune_files(settings: Settings, job_id: str) -> None:
    """Every attempt's tune state of the job (its tuning can no longer use it): board
    keys, stored objects, local folder. Never raises."""
    remove_attempts(settings, job_id)
