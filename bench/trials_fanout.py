"""BO trial fan-out: one tuned job's wall time on 1 worker against N workers (issue 8).

    .venv/bin/python bench/trials_fanout.py --workers 1 2 --runs 2

Starts the service as production runs it (uvicorn, a PostgreSQL cluster of its own, a
private Redis broker, `crucible worker` processes at concurrency 1; tests/support/faults.py's
`service`) once per worker count, uploads a prompt/completion set over HTTP, and submits a
`bmm` job tuned by BO with `tuning.batch` = --batch on a GPT-2 of --layers x --width (two
fine-tunes). With a Redis broker the batch's trials fan out (crucible/tune/trials.py):
the job's worker runs one trial of each batch and sends the rest to the others; with one
worker it runs them all. The first job of each service is a warm-up (a worker's first
trial task imports torch and builds its evaluator); --runs jobs after it are timed.

Per job: the tune stage's seconds (from the job's `stage` events: tune start to merge
start), the job's seconds (started_at to finished_at), and which worker ran each trial.
Threads: each worker gets OMP_NUM_THREADS = --threads or cores // workers, so N workers
never ask for more cores than one worker uses (--threads 1: every worker one core, as
workers on separate machines each bring their own). With one thread count for all, the
trials and their objectives must be the same for every worker count (the fan-out changes
where a trial runs, not what it computes); the bench checks that.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import faults  # noqa: E402
from tests.support.tiny_models import tiny_texts, tiny_word_tokenizer  # noqa: E402


def make_family(root: Path, layers: int, width: int, rows: int) -> tuple[Path, list[Path], bytes]:
    base, experts = faults.make_slow_family(root, n_experts=2, n_layer=layers, n_embd=width)
    tok = tiny_word_tokenizer()
    tok.eos_token = "[SEP]"
    for folder in (base, *experts):
        tok.save_pretrained(folder)
    data = [{"prompt": t, "completion": " the cat"} for t in tiny_texts(rows, seed=9)]
    return base, experts, "".join(json.dumps(r) + "\n" for r in data).encode()


def spec_of(base: Path, experts: list[Path], dataset: str, args: argparse.Namespace) -> dict:
    return {
        "base": {"uri": base.as_uri()},
        "experts": [{"uri": e.as_uri()} for e in experts],
        "method": {"name": "bmm"},
        "output": {"dtype": "float32"},
        "tuning": {
            "dataset": dataset,
            "trials": args.trials,
            "init_trials": args.batch,
            "batch": args.batch,
            "groups": "global",
        },
    }


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def tune_seconds(job: dict[str, Any]) -> float:
    """Tune stage start to the next stage's start, from the job's stage events."""
    stages = [(e["message"], when(e["at"])) for e in job["events"] if e["kind"] == "stage"]
    names = [s for s, _ in stages]
    start = next(i for i, s in enumerate(names) if "tune" in s)
    return (stages[start + 1][1] - stages[start][1]).total_seconds()


def run_config(
    workers: int, args: argparse.Namespace, family: tuple[Path, list[Path], bytes], work: Path
) -> list[dict[str, Any]]:
    base, experts, rows = family
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    postgres = faults.OwnPostgres().init()
    out = []
    try:
        with faults.service(work, postgres, base.parent, workers=workers, **env) as svc:
            client = svc.client(600)
            resp = client.request(
                "POST",
                "/v1/datasets",
                files={"file": ("lm.jsonl", io.BytesIO(rows))},
                data={"name": "lm"},
            )
            assert resp.status_code == 201, resp.text
            dataset = str(resp.json()["id"])
            for run in range(args.runs + 1):
                submitted = time.perf_counter()
                job_id = faults.submit(client, spec_of(base, experts, dataset, args))
                job = client.wait(job_id, timeout=3600)
                wall = time.perf_counter() - submitted
                if job["status"] != "succeeded":
                    raise SystemExit(f"job {job_id}: {json.dumps(job, indent=1)[-3000:]}")
                trials = client.request("GET", f"/v1/merges/{job_id}/trials").json()["items"]
                pids = svc.worker_pids()
                ran_on = [pids.get(t["worker"]["worker_pid"], "?") for t in trials]
                row = {
                    "workers": workers,
                    "threads": threads,
                    "run": run,
                    "warmup": run == 0,
                    "tune_s": tune_seconds(job),
                    "job_s": (when(job["finished_at"]) - when(job["started_at"])).total_seconds(),
                    "client_s": wall,
                    "per_worker": {n: ran_on.count(n) for n in sorted(set(ran_on))},
                    "trials": [(t["params"], t["objective"]) for t in trials],
                }
                out.append(row)
                print(
                    f"[{workers} worker(s), {threads} thread(s) each, run {run}"
                    f"{' warm-up' if run == 0 else ''}] tune {row['tune_s']:.1f} s, "
                    f"job {row['job_s']:.1f} s, trials per worker {row['per_worker']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        postgres.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=2, help="timed jobs per worker count")
    ap.add_argument("--threads", type=int, default=0, help="per worker (0: cores // workers)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rows", type=int, default=512, help="tuning rows")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="crucible-trials-bench-") as tmp:
        work = Path(tmp)
        family = make_family(work / "models", args.layers, args.width, args.rows)
        rows: list[dict[str, Any]] = []
        for n in args.workers:
            rows += run_config(n, args, family, work / f"w{n}")
    timed = [r for r in rows if not r["warmup"]]
    reference = timed[0]["trials"]
    same = all(r["trials"] == reference for r in timed)
    # Torch's reductions may round differently with another thread count, and BO then
    # follows another path: identity is only required between equal thread counts.
    one_thread_count = len({r["threads"] for r in timed}) == 1
    load = os.getloadavg()
    print(
        f"\nGPT-2 {args.layers} layers x {args.width}, 2 experts, bmm tuned by BO: "
        f"{args.trials} trials in batches of {args.batch}, {args.rows} tuning rows; "
        f"{os.cpu_count()} CPUs; median of {args.runs} timed jobs after one warm-up per "
        f"worker count; load average after {load[0]:.2f}. Trials identical across worker "
        f"counts: {'yes' if same else 'NO'}.\n"
    )
    print("| workers | threads each | tune stage s | job s | tune vs first | trials per worker |")
    print("|---:|---:|---:|---:|---:|---|")
    first_tune = None
    for n in args.workers:
        mine = [r for r in timed if r["workers"] == n]
        tune = statistics.median(r["tune_s"] for r in mine)
        job = statistics.median(r["job_s"] for r in mine)
        first_tune = first_tune or tune
        spread = "; ".join(", ".join(f"{k} {v}" for k, v in r["per_worker"].items()) for r in mine)
        print(
            f"| {n} | {mine[0]['threads']} | {tune:.1f} | {job:.1f} | "
            f"{tune / first_tune:.2f} | {spread} |"
        )
    print("\nAll timed runs (tune s / job s):")
    for n in args.workers:
        mine = [r for r in timed if r["workers"] == n]
        print(f"- {n} worker(s): " + ", ".join(f"{r['tune_s']:.1f}/{r['job_s']:.1f}" for r in mine))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if one_thread_count and not same:
        raise SystemExit("the trials differ between worker counts")


if __name__ == "__main__":
    main()
