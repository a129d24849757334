"""The service as real processes: uvicorn over HTTP and a Celery worker process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

from crucible.cli import worker_argv
from tests.support.ports import free_port
from tests.support.postgres import throwaway_postgres_url
from tests.support.redis_server import private_redis

REPO_ROOT = Path(__file__).resolve().parents[2]


def uvicorn_argv(port: int, *extra: str) -> list[str]:
    """The API's command line on loopback `port` (the app factory, as production runs it)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "service.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


class Stack:
    """Starts uvicorn and a Celery worker with `env` as their whole environment."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        # Production mode (a database server) needs a shared key for request secrets.
        key = Fernet.generate_key().decode()
        self.env = {"CRUCIBLE_SECRETS_KEY": key, **env, "PYTHONUNBUFFERED": "1"}
        self.logdir = logdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=self.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        self._procs.append((proc, log))

    def crucible(self, *args: str) -> str:
        """Run the `crucible` CLI with this stack's environment; returns stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "crucible.cli", *args],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"crucible {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def start(self, log_level: str | None = None) -> Stack:
        """Migrate, then the API and one worker; `log_level` for both (default info)."""
        self.crucible("keys", "list")  # migrates the database before two processes start
        self._spawn(
            "api", uvicorn_argv(self.port, *(("--log-level", log_level) if log_level else ()))
        )
        self._spawn(
            "worker", worker_argv(concurrency=1, pool="prefork", loglevel=log_level or "info")
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready:\n{self.logs()}")

    def _check_alive(self) -> None:
        for proc, log in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.stem} exited with {proc.returncode}:\n{log.read_text()}")

    def logs(self) -> str:
        return "\n".join(f"--- {log.stem}\n{log.read_text()[-6000:]}" for _, log in self._procs)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def wait_for_job(
        self, client: httpx.Client, job_id: str, timeout: float = 240
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.get(f"/v1/merges/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            self._check_alive()
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        for proc, _ in self._procs:
            proc.terminate()
        for proc, _ in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def service_stack(
    work: Path, models: Path, tenant: str = "acme"
) -> Iterator[tuple[Stack, httpx.Client]]:
    """The whole service on real parts: uvicorn and a Celery worker on a throwaway
    PostgreSQL database and a private Redis, data under work/data, file:// sources allowed
    under `models`, the Hub offline; with a client holding a new API key of `tenant`."""
    env = {
        "CRUCIBLE_DATA_DIR": str(work / "data"),
        "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(models)]),
        "HF_HUB_OFFLINE": "1",
    }
    with throwaway_postgres_url() as db_url, private_redis(work / "redis") as redis_url:
        env["CRUCIBLE_DATABASE_URL"] = db_url
        env["CRUCIBLE_BROKER_URL"] = redis_url
        stack = Stack(env, work / "logs").start()
        try:
            key = stack.crucible("keys", "create", "--tenant", tenant).strip()
            yield stack, stack.client(key)
        finally:
            stack.stop()
