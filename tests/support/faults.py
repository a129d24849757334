"""Real servers the fault tests break on purpose: a PostgreSQL cluster and a Redis of their
own (so restarting them never touches the shared ones), worker and API processes that can
be SIGKILLed or restarted one by one, a size-capped folder, and clients that retry
connection errors the way a real poller does."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
import torch
from cryptography.fernet import Fernet
from transformers import GPT2Config, GPT2LMHeadModel

from crucible.cli import worker_argv
from crucible.store import JobStore
from tests.support.ports import free_port
from tests.support.stack import uvicorn_argv
from tests.support.tiny_models import TINY_GPT2, perturbed_state_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


# --------------------------------------------------------------------------- models


def short_lease(seconds: int) -> dict[str, str]:
    """Service env for fault tests: a lease of `seconds`, heartbeats and reaper passes
    every second, so a killed worker's job or claim is noticed within seconds."""
    return {
        "CRUCIBLE_LEASE_SECONDS": str(seconds),
        "CRUCIBLE_HEARTBEAT_SECONDS": "1",
        "CRUCIBLE_REAPER_INTERVAL_SECONDS": "1",
    }


def make_slow_family(
    root: Path, n_experts: int = 2, seed: int = 11, n_layer: int = 8, n_embd: int = 256
) -> tuple[Path, list[Path]]:
    """A GPT-2 (by default 8 layers of width 256: ~100 tensors, 25 MB) and fine-tunes of it.
    Faults that must land mid-merge use 12 layers of width 512 (~38M parameters, 152 MB): the
    engine merges the default size faster than a 50 ms poll can see it mid-merge."""
    torch.manual_seed(seed)
    config = GPT2Config(**{**TINY_GPT2, "n_layer": n_layer, "n_embd": n_embd, "n_head": 4})
    model = GPT2LMHeadModel(config).eval()
    base = root / "base"
    model.save_pretrained(base)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = []
    for i in range(n_experts):
        model.load_state_dict(perturbed_state_dict(state, torch.Generator().manual_seed(i + 1)))
        experts.append(root / f"expert_{i}")
        model.save_pretrained(experts[-1])
    return base, experts


@functools.cache
def worker_torch_threads() -> int:
    """torch's intra-op thread count in a worker `service` starts (its environment sets no
    OMP_NUM_THREADS, so torch's default), asked of a fresh interpreter."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    code = "import torch; print(torch.get_num_threads())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


@contextmanager
def workers_threads() -> Iterator[None]:
    """Run the block on the workers' torch thread count: float reductions (a Gram's
    products, a trial's forward pass) round differently with another count, so a
    single-worker reference computed in the test process must match the workers', whatever
    an earlier test or OMP_NUM_THREADS left this process at."""
    before = torch.get_num_threads()
    torch.set_num_threads(worker_torch_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def file_hashes(folder: Path, card: bool = False) -> dict[str, str]:
    """sha256 of every file under `folder`; README.md (the model card) is left out unless
    `card`: its metrics table carries the run's timings."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (card or p.name != "README.md")
    }


# --------------------------------------------------------------------------- PostgreSQL


class OwnPostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl, run as the postgres user, since
    PostgreSQL refuses root), on a free port, in a temporary folder; stop/start at will."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found in /usr/lib/postgresql")
        self.bin = Path(bins[-1]).parent
        # Under /tmp itself: the postgres user cannot enter pytest's 0700 root folders.
        self.root = Path(tempfile.mkdtemp(prefix="crucible-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "server.log"
        shutil.chown(self.root, "postgres", "postgres")

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")

    def init(self) -> OwnPostgres:
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"
        )
        return self.start()

    def start(self) -> OwnPostgres:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- Redis


class OwnRedis:
    """A redis-server of our own with the append-only file on, so queued tasks survive a
    restart; `restart()` stops it (SIGTERM: it writes the AOF out) and starts it again on the
    same port and folder."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: _redis_up(self.url), 20, "redis-server to start")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def queue_length(self, queue: str = "gpu") -> int:
        return int(redis.Redis.from_url(self.url).llen(queue))


def _redis_up(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


# --------------------------------------------------------------------------- processes


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """The service's processes by name, each in its own session so that a SIGKILL reaches
    a Celery worker's pool children too; the API always on the same port."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def crucible(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "crucible.cli", *args],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"crucible {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def spawn(
        self, name: str, argv: list[str], preexec: Callable[[], None] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logdir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self.spawn("api", uvicorn_argv(self.port))
        wait_until(self._ready, 90, "the API to answer /readyz", every=0.2)

    def _ready(self) -> bool:
        api = self.procs["api"]
        if api.poll() is not None:
            raise RuntimeError(f"the API exited with {api.returncode}:\n{self.logs()}")
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self, name: str, preexec: Callable[[], None] | None = None) -> None:
        self.spawn(name, worker_argv(concurrency=1, pool="prefork", loglevel="info"), preexec)
        wait_until(
            lambda: "ready." in self.log(name) or self._dead(name), 120, f"{name} to be ready"
        )
        if self._dead(name):
            raise RuntimeError(f"{name} exited:\n{self.log(name)}")

    def _dead(self, name: str) -> bool:
        return self.procs[name].poll() is not None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """`sig` to the process and everything it started (its session)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.stem}\n{p.read_text(errors='replace')[-5000:]}"
            for p in sorted(self.logdir.glob("*.log"))
        )

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# --------------------------------------------------------------------------- clients


class PatientClient:
    """An API client that, like a real poller, retries connection errors and 5xx answers
    (the API restarting, or its database) until `patience` seconds have passed."""

    def __init__(self, base_url: str, key: str, patience: float = 120) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        self.patience = patience
        self.retries = 0

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        deadline = time.monotonic() + self.patience
        while True:
            try:
                resp = self.http.request(method, path, **kw)
                if resp.status_code < 500:
                    return resp
                reason = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            self.retries += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: still failing ({reason})")
            time.sleep(0.2)

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.request("GET", f"/v1/merges/{job_id}").json()
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        self.http.close()


# --------------------------------------------------------------------------- a full disk


@contextmanager
def small_folder(path: Path, size_bytes: int) -> Iterator[Path]:
    """A folder that holds at most `size_bytes`: a tmpfs of that size (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def store_for(url: str) -> JobStore:
    return JobStore(url)


@dataclass
class Service:
    """A running service of our own: its processes, Redis, PostgreSQL database, API key."""

    procs: Processes
    redis: OwnRedis
    postgres: OwnPostgres
    db_url: str
    key: str
    artifacts: Path

    def client(self, patience: float = 120) -> PatientClient:
        return PatientClient(self.procs.base_url, self.key, patience)

    def store(self) -> JobStore:
        return JobStore(self.db_url, self.artifacts)

    def worker_pids(self) -> dict[int, str]:
        """The Celery main process pid of each running worker -> its name."""
        return {p.pid: n for n, p in self.procs.procs.items() if n.startswith("worker")}

    def attempts(self, job_id: str) -> int:
        store = self.store()
        try:
            held = store.ownership(job_id)
        finally:
            store.close()
        assert held is not None
        return held.attempts


@contextmanager
def service(
    work: Path,
    postgres: OwnPostgres,
    allowed: Path,
    workers: int = 1,
    artifacts: Path | None = None,
    **env: str,
) -> Iterator[Service]:
    """API + `workers` Celery workers on a new database of our cluster and our own Redis;
    file:// sources allowed under `allowed`; `env` adds or overrides settings."""
    db_url = postgres.create_database(f"crucible_{secrets.token_hex(4)}")
    redis = OwnRedis(work / "redis").start()
    artifacts = artifacts or work / "data" / "artifacts"
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "CRUCIBLE_DATA_DIR": str(work / "data"),
        "CRUCIBLE_ARTIFACTS_DIR": str(artifacts),
        "CRUCIBLE_DATABASE_URL": db_url,
        "CRUCIBLE_BROKER_URL": redis.url,
        "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(allowed)]),
        "CRUCIBLE_SECRETS_KEY": Fernet.generate_key().decode(),
        "CRUCIBLE_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    procs = Processes(base_env, work / "logs")
    try:
        key = procs.crucible("keys", "create", "--tenant", "acme").strip()  # also migrates
        procs.start_api()
        for i in range(workers):
            procs.start_worker(f"worker-{i}")
        yield Service(procs, redis, postgres, db_url, key, artifacts)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        redis.stop()


def submit(client: PatientClient, spec: dict[str, Any], key: str | None = None) -> str:
    """POST the spec (with an Idempotency-Key when given); the job id."""
    headers = {"Idempotency-Key": key} if key else {}
    resp = client.request("POST", "/v1/merges", json=spec, headers=headers)
    assert resp.status_code in (200, 201, 202), resp.text
    return str(resp.json()["id"])
