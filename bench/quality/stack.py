"""The service as the benchmark uses it: `crucible up` in a child process, spoken to over HTTP.

Nothing here reaches into the service's internals: datasets are uploaded with
`POST /v1/datasets`, merges submitted with `POST /v1/merges` and followed with
`GET /v1/merges/{id}`, exactly as a client would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """`crucible up` on embedded defaults under `data_dir`, local models allowed from
    `allowed_dirs`. A context manager: the whole process group is stopped on exit."""

    def __init__(self, data_dir: Path, allowed_dirs: list[Path], log: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            **os.environ,
            "CRUCIBLE_DATA_DIR": str(data_dir),
            "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(d) for d in allowed_dirs]),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Stack:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            # A session of its own, so stopping it reaches the worker `up` spawned too.
            argv = [sys.executable, "-m", "crucible.cli", "up"]
            argv += ["--data-dir", str(self.data_dir), "--port", str(self.port)]
            self._proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SystemExit(f"crucible up exited; see {self.log}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise SystemExit(f"the API did not become ready in 120 s; see {self.log}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)  # the group this Stack started
        try:
            self._proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def create_key(self, tenant: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "crucible.cli", "keys", "create", "--tenant", tenant],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise SystemExit(f"crucible keys create failed:\n{done.stderr}")
        return done.stdout.strip()

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )

    def job_output(self, job_id: str) -> Path:
        return self.data_dir / "artifacts" / "jobs" / job_id / "output"


def _check(resp: httpx.Response, what: str) -> dict[str, Any]:
    if resp.status_code >= 400:
        raise SystemExit(f"{what}: HTTP {resp.status_code}: {resp.text}")
    return dict(resp.json())


def upload(client: httpx.Client, path: Path, name: str, labels: list[str]) -> dict[str, Any]:
    """POST /v1/datasets: a JSONL file streamed from disk, its label set declared."""
    with path.open("rb") as f:
        resp = client.post(
            "/v1/datasets",
            files={"file": (path.name, f, "application/x-ndjson")},
            data={"name": name, "labels": json.dumps(labels)},
        )
    return _check(resp, f"upload {path}")


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    return _check(client.post("/v1/merges", json=spec), "POST /v1/merges")


def wait(
    client: httpx.Client,
    job_id: str,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    poll: float = 1.0,
) -> dict[str, Any]:
    """Polls GET /v1/merges/{id} until the job is terminal; returns the final job."""
    while True:
        job = _check(client.get(f"/v1/merges/{job_id}"), f"GET /v1/merges/{job_id}")
        if on_update is not None:
            on_update(job)
        if job["status"] in TERMINAL:
            return job
        time.sleep(poll)


def trials(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return _check(client.get(f"/v1/merges/{job_id}/trials"), f"GET /v1/merges/{job_id}/trials")
