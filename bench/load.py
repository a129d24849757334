"""API load test: pollers reading job status while submitters queue jobs, on real parts.

    .venv/bin/python bench/load.py --duration 60 --pollers 200 --submitters 20 --write-results

Starts the service as production runs it: uvicorn with `--api-workers` processes (default 2,
one per core of the 2-core reference machine), a throwaway PostgreSQL database on the local
server, a private Redis, and one Celery worker (prefork, concurrency 1) that runs every
submitted job: a linear merge of two tiny GPT-2 experts into a base (tests/support's
models, `file://` sources). The per-tenant concurrent-jobs limit is raised through
CRUCIBLE_MAX_CONCURRENT_JOBS_PER_TENANT, since the submitters outpace one worker on purpose.

`--seed-jobs` jobs are submitted first, and the clock starts once the worker has finished
one of them (its start on the same cores is not the steady state) and after `--warmup`
seconds of the same load, unrecorded (clients connect, the API's database pools fill).
Then, for `--duration`
seconds, an asyncio client on loopback (one keep-alive HTTP/1.1
connection per client, as a polling pipeline holds; see KeepAliveConnection) runs
`--pollers` clients, each reading GET /v1/merges/{id} of a random submitted job every
`--poll-interval` seconds (paced on a fixed schedule, so a slow answer does not lower the
offered load), and `--submitters` clients, each POSTing a job every `--submit-interval`
seconds. Every answer other than 200 (status) or 202 (submit), and every exception
(timeouts included), is an error. Latency is measured per request from send to the end of
the body. Prints a markdown table (p50/p95/p99/max per request kind, throughput, errors);
`--write-results` also puts it in bench/RESULTS.md, replacing the previous load section.
`--json PATH` writes the numbers for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crucible.cli import worker_argv  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.postgres import throwaway_postgres_url  # noqa: E402
from tests.support.redis_server import private_redis  # noqa: E402
from tests.support.stack import uvicorn_argv  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- load.py: begin -->", "<!-- load.py: end -->"
EXPECTED = {"status": 200, "submit": 202}


@dataclass
class Kind:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


@dataclass
class Recorder:
    kinds: dict[str, Kind] = field(default_factory=lambda: {k: Kind() for k in EXPECTED})
    job_ids: list[str] = field(default_factory=list)
    # Time the client itself was late to start a request (event loop lag): a saturated
    # client would inflate the latencies it reports.
    lateness: list[float] = field(default_factory=list)
    # Jobs the unrecorded warm-up submitted (they run like the others).
    warmup_jobs: int = 0


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


class KeepAliveConnection:
    """One client's HTTP/1.1 keep-alive connection, written on asyncio streams.

    A pipeline that polls holds one connection; this does the same, at a few tens of
    microseconds of client CPU per request. httpx's pool, shared by 220 clients on one
    event loop, cost the client a whole core at 100 requests/s (py-spy), so the client,
    not the API, set the latency it measured. Responses must carry Content-Length (every
    JSON response of the API does)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        # Reconnect before uvicorn's 5 s keep-alive timeout can close the connection under
        # a request that is being sent.
        if self.writer is None or time.monotonic() - self.last_used > 4.0:
            await self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{extra}\r\n".encode() + body)
        try:
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError("the server closed the connection")
            status = int(status_line.split()[1])
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            payload = await self.reader.readexactly(length)
        except BaseException:
            await self.close()  # a half-read response leaves the stream unusable
            raise
        self.last_used = time.monotonic()
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def _timed(
    rec: Recorder, kind: str, conn: KeepAliveConnection, timeout: float, *args: Any
) -> bytes | None:
    start = time.perf_counter()
    try:
        status, payload = await asyncio.wait_for(conn.request(*args), timeout)
    except Exception as exc:  # every exception is an error, timeouts included
        rec.kinds[kind].error(type(exc).__name__)
        return None
    rec.kinds[kind].latencies.append(time.perf_counter() - start)
    if status != EXPECTED[kind]:
        rec.kinds[kind].error(f"HTTP {status}")
        return None
    return payload


async def _paced(
    interval: float, deadline: float, rec: Recorder, body: Any, rng: random.Random
) -> None:
    """Run `body` every `interval` seconds from a random phase until `deadline`; a slot
    missed because the previous request was slow is not made up with a burst."""
    next_at = time.perf_counter() + rng.uniform(0, interval)
    while True:
        now = time.perf_counter()
        if next_at >= deadline or now >= deadline:
            return
        if next_at > now:
            await asyncio.sleep(next_at - now)
        else:
            rec.lateness.append(now - next_at)
        await body()
        next_at = max(next_at + interval, time.perf_counter())


async def _wait_first_job_done(
    client: httpx.AsyncClient, job_ids: list[str], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if (await client.get(f"/v1/merges/{job_id}")).json()["status"] == "succeeded":
                return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"no seeded job finished in {timeout:.0f} s: is the worker running?")


async def _run_clients(
    base_url: str, key: str, spec: dict[str, Any], args: argparse.Namespace, rec: Recorder
) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    body = json.dumps(spec).encode()
    # Jobs submitted before the clock starts, so the first polls have jobs to read.
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        for _ in range(args.seed_jobs):
            seeded = await client.post("/v1/merges", json=spec)
            if seeded.status_code != 202:
                raise RuntimeError(f"seeding a job failed: {seeded.status_code} {seeded.text}")
            rec.job_ids.append(seeded.json()["id"])
        # The clock starts once the worker runs jobs: its start (imports, first fork) on the
        # same 2 cores is not the steady state this measures.
        await _wait_first_job_done(client, rec.job_ids, timeout=300)
    rng = random.Random(args.seed)
    conns: list[KeepAliveConnection] = []
    # Where answers are recorded: a throwaway recorder during the warm-up, then `rec`.
    into = [Recorder(job_ids=rec.job_ids)]

    def poller() -> Any:
        conn = KeepAliveConnection(host, port, headers)
        conns.append(conn)

        async def poll() -> None:
            job_id = rng.choice(rec.job_ids)
            await _timed(into[0], "status", conn, args.timeout, "GET", f"/v1/merges/{job_id}")

        return poll

    def submitter() -> Any:
        conn = KeepAliveConnection(host, port, headers)
        conns.append(conn)

        async def submit() -> None:
            payload = await _timed(
                into[0], "submit", conn, args.timeout, "POST", "/v1/merges", body
            )
            if payload is not None:
                rec.job_ids.append(json.loads(payload)["id"])

        return submit

    clients = [(args.poll_interval, poller()) for _ in range(args.pollers)] + [
        (args.submit_interval, submitter()) for _ in range(args.submitters)
    ]
    paced = [(i, body, random.Random(rng.random())) for i, body in clients]
    # Warm-up: every client connects and the API's database pools fill (a new PostgreSQL
    # connection each) before the clock starts; those answers are not recorded.
    before_warmup = len(rec.job_ids)
    if args.warmup > 0:
        end = time.perf_counter() + args.warmup
        await asyncio.gather(*[_paced(i, end, into[0], body, r) for i, body, r in paced])
    rec.warmup_jobs = len(rec.job_ids) - before_warmup
    into[0] = rec
    start = time.perf_counter()
    deadline = start + args.duration
    tasks = [_paced(i, deadline, rec, body, r) for i, body, r in paced]
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for conn in conns:
        await conn.close()
    return elapsed


def _spawn(
    argv: list[str], env: dict[str, str], log: Path, nice: int = 0
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(base_url: str, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}; logs in {logs}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API did not become ready; logs in {logs}")


@contextmanager
def service(work: Path, args: argparse.Namespace) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(base URL, API key, job spec) of a running service with its own database and Redis."""
    from cryptography.fernet import Fernet

    from tests.support.tiny_models import make_gpt2_family

    models = work / "models"
    base, experts = make_gpt2_family(models, n_experts=2, seed=11)
    spec = {
        "base": {"uri": f"file://{base}"},
        "experts": [{"uri": f"file://{e}", "name": e.name} for e in experts],
        "method": {"name": "linear"},
        "output": {"dtype": "float32"},
    }
    with throwaway_postgres_url() as db_url, private_redis(work / "redis") as redis_url:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "CRUCIBLE_DATA_DIR": str(work / "data"),
            "CRUCIBLE_DATABASE_URL": db_url,
            "CRUCIBLE_BROKER_URL": redis_url,
            "CRUCIBLE_ALLOWED_LOCAL_DIRS": json.dumps([str(models)]),
            "CRUCIBLE_SECRETS_KEY": Fernet.generate_key().decode(),
            "CRUCIBLE_MAX_CONCURRENT_JOBS_PER_TENANT": "1000000",
        }
        # The CLI migrates the database before the API's processes start.
        key = subprocess.run(
            [sys.executable, "-m", "crucible.cli", "keys", "create", "--tenant", "load"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        port = free_port()
        logs = work / "logs"
        logs.mkdir()
        api_argv = uvicorn_argv(
            port,
            "--workers",
            str(args.api_workers),
            "--no-access-log",
        )
        procs = [_spawn(api_argv, env, logs / "api.log")]
        # In production workers run on GPU machines, not the API's; here they share 2 cores,
        # so the worker runs at a lower priority (--worker-nice) to measure the API, not the
        # merges. --worker-nice 0 measures the co-located case.
        procs.append(
            _spawn(
                worker_argv(1, "prefork", "warning"),
                env,
                logs / "worker.log",
                nice=args.worker_nice,
            )
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_ready(base_url, procs, logs)
            yield base_url, key, spec
        finally:
            _stop(procs)


def _job_outcomes(base_url: str, key: str, job_ids: list[str], drain: float) -> dict[str, int]:
    """Job count by status, after waiting up to `drain` seconds for every job to end."""
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + drain
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        while True:
            counts: dict[str, int] = {}
            for job_id in job_ids:
                status = client.get(f"/v1/merges/{job_id}").json()["status"]
                counts[status] = counts.get(status, 0) + 1
            if not (counts.keys() & {"queued", "running"}) or time.monotonic() > deadline:
                return counts
            time.sleep(1)


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summarize(rec: Recorder, elapsed: float) -> dict[str, Any]:
    kinds = {}
    for name, kind in rec.kinds.items():
        lat = sorted(kind.latencies)
        requests = len(lat) + sum(v for k, v in kind.errors.items() if not k.startswith("HTTP"))
        kinds[name] = {
            "requests": requests,
            "errors": sum(kind.errors.values()),
            "error_kinds": kind.errors,
            "per_second": requests / elapsed,
            **{f"p{q}_ms": 1000 * _percentile(lat, q / 100) for q in (50, 95, 99)},
            "max_ms": 1000 * lat[-1] if lat else float("nan"),
        }
    late = sorted(rec.lateness)
    return {
        "elapsed_s": elapsed,
        "kinds": kinds,
        "errors": sum(k["errors"] for k in kinds.values()),
        "client_late_p99_ms": 1000 * _percentile(late, 0.99) if late else 0.0,
        "warmup_jobs": rec.warmup_jobs,
    }


def table(summary: dict[str, Any]) -> str:
    rows = [
        "| request | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"status": "GET /v1/merges/{id}", "submit": "POST /v1/merges"}
    for name, k in summary["kinds"].items():
        rows.append(
            f"| {labels[name]} | {k['requests']} | {k['per_second']:.1f} | {k['p50_ms']:.1f} | "
            f"{k['p95_ms']:.1f} | {k['p99_ms']:.1f} | {k['max_ms']:.1f} | {k['errors']} |"
        )
    return "\n".join(rows)


def _section(summary: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    errors = {n: k["error_kinds"] for n, k in summary["kinds"].items() if k["error_kinds"]}
    return "\n".join(
        [
            BEGIN,
            "## API load: job status polling under submissions (issue 6)",
            "",
            "Command (run from the repository root):",
            "",
            "```",
            command,
            "```",
            "",
            f"uvicorn with {args.api_workers} worker processes, PostgreSQL, Redis, one Celery "
            f"worker (nice {args.worker_nice}) running every job (linear merge of 2 tiny GPT-2 "
            f"experts). {args.pollers} "
            f"pollers each GET a random job every {args.poll_interval} s, {args.submitters} "
            f"submitters each POST a job every {args.submit_interval} s, for "
            f"{summary['elapsed_s']:.1f} s on loopback (asyncio, one keep-alive connection "
            f"per client), after {args.warmup:g} s of unrecorded warm-up at the same load.",
            "",
            table(summary),
            "",
            f"- Errors (any other status, any exception): {summary['errors']}"
            + (f" {errors}" if errors else ""),
            f"- Jobs at the end: {summary['jobs']}",
            f"- Client lateness p99 (event-loop lag before a request): "
            f"{summary['client_late_p99_ms']:.1f} ms",
            f"- Machine: {os.cpu_count()} cores, load average before / after: "
            f"{summary['load_before']} / {summary['load_after']} (1, 5, 15 min; shared machine)",
            END,
        ]
    )


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of load before the clock, unrecorded"
    )
    p.add_argument("--pollers", type=int, default=200)
    p.add_argument("--submitters", type=int, default=20)
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--submit-interval", type=float, default=5.0)
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument(
        "--worker-nice",
        type=int,
        default=10,
        help="niceness of the Celery worker (it runs every job on the same cores as the API)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-jobs", type=int, default=20, help="submitted before the clock")
    p.add_argument(
        "--drain", type=float, default=0.0, help="then wait up to this long for jobs to end"
    )
    p.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/load.py", *(argv or sys.argv[1:])])

    with (
        tempfile.TemporaryDirectory(prefix="crucible-load-") as tmp,
        service(Path(tmp), args) as (base_url, key, spec),
    ):
        rec = Recorder()
        load_before = _loadavg()
        elapsed = asyncio.run(_run_clients(base_url, key, spec, args, rec))
        summary = summarize(rec, elapsed)
        summary["load_before"], summary["load_after"] = load_before, _loadavg()
        summary["jobs"] = _job_outcomes(base_url, key, rec.job_ids, args.drain)
    print(table(summary))
    print(f"errors: {summary['errors']}  jobs: {summary['jobs']}  load: {summary['load_after']}")
    if args.write_results:
        write_results(_section(summary, args, command))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
