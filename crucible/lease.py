"""The running worker's side of a job lease: a heartbeat thread that renews it.

The thread renews `jobs.lease_expires_at` every `heartbeat_seconds`. A failed write (the
database restarting) is logged and tried again at the next beat: the lease is several beats
long, so a short outage costs nothing. When the store answers that the job is no longer ours
(a reaper requeued it after the lease ran out, and maybe another worker holds it now), the
lease is marked lost and the job's next cancel check stops the run (`LeaseLost`), without
touching the output the new owner may be writing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from types import TracebackType

from crucible.errors import CrucibleError
from crucible.store import JobStore

log = logging.getLogger(__name__)


class LeaseLost(CrucibleError):
    """This worker no longer owns the job; it must stop and leave the job alone."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            "lease_lost", f"job {job_id}: this worker's lease ran out and the job was requeued"
        )


def worker_identity() -> str:
    """Names one attempt of one process: host, pid and a random tag (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Context manager: renews `owner`'s lease on `job_id` in a daemon thread until exit."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        owner: str,
        lease_seconds: float,
        heartbeat_seconds: float,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._interval = max(0.05, heartbeat_seconds)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Raise LeaseLost once the store has said the job is not ours any more."""
        if self._lost.is_set():
            raise LeaseLost(self._job_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                ours = self._store.heartbeat(self._job_id, self._owner, self._lease_seconds)
            except Exception as exc:  # the store is down: keep beating, the lease is longer
                log.warning("job %s: heartbeat failed (%s); retrying", self._job_id, exc)
                continue
            if not ours:
                if not self._stop.is_set():
                    log.warning("job %s: lease lost (requeued or finished elsewhere)", self._job_id)
                    self._lost.set()
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
