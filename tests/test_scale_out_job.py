"""One job whose statistics and BO trials both fan out over two real worker processes.

A `bmm` job with activation Grams (one dataset per expert: the statistics stage sends one
Celery task per expert, crucible.stats.fanout) tuned by BO in batches of 2 (each batch's
second trial goes to another worker, crucible.tune.trials), on two Celery workers
(prefork, concurrency 1), PostgreSQL and Redis of the test's own, uvicorn in front. The
job must end `succeeded` with the trials (params and objectives) and the output files of a
single-worker, in-process run of the same job, both stages having used both workers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from crucible.pipeline import run_merge_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support import faults
from tests.support.faults import OwnPostgres, PatientClient, make_slow_family, submit
from tests.support.tiny_models import tiny_texts, tiny_word_tokenizer
from tests.test_scale_out_stats import events, output_of
from tests.test_scale_out_trials import TrialLog

N_EXPERTS = 2
TRIALS = 4
BATCH = 2
ROWS = 48
# A second worker's first task imports torch and builds its evaluator before it can
# claim a trial (seconds on a loaded machine); without a long claim wait the job's worker
# could run every trial itself and the test would prove nothing about the fan-out.
CLAIM_WAIT = {"CRUCIBLE_TRIAL_CLAIM_WAIT_SECONDS": "120"}


def make_data(root: Path) -> tuple[Path, list[Path], list[bytes], bytes]:
    """A 2-layer GPT-2 of width 128, two fine-tunes, a text set per expert (its Grams) and
    a prompt/completion set (the tuning data)."""
    base, experts = make_slow_family(root, n_experts=N_EXPERTS, n_layer=2, n_embd=128)
    tok = tiny_word_tokenizer()
    tok.eos_token = "[SEP]"
    for folder in (base, *experts):
        tok.save_pretrained(folder)
    texts = [
        "".join(
            json.dumps({"text": " ".join(tiny_texts(6, seed=100 * i + j))}) + "\n"
            for j in range(ROWS)
        ).encode()
        for i in range(N_EXPERTS)
    ]
    lm = "".join(
        json.dumps({"prompt": t, "completion": " the cat"}) + "\n" for t in tiny_texts(ROWS, seed=9)
    ).encode()
    return base, experts, texts, lm


def upload(client: PatientClient, name: str, body: bytes) -> str:
    resp = client.request(
        "POST", "/v1/datasets", files={"file": (f"{name}.jsonl", io.BytesIO(body))},
        data={"name": name},
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def spec_of(base: Path, experts: list[Path], expert_sets: list[str], tune_set: str) -> dict:
    return {
        "base": {"uri": base.as_uri()},
        "experts": [
            {"uri": e.as_uri(), "name": f"e{i}", "dataset": d}
            for i, (e, d) in enumerate(zip(experts, expert_sets, strict=True))
        ],
        "method": {"name": "bmm", "params": {"gram": "activations"}},
        "statistics": {"max_samples": ROWS, "max_length": 64, "batch_size": 16},
        "output": {"dtype": "float32"},
        "tuning": {
            "dataset": tune_set,
            "trials": TRIALS,
            "init_trials": BATCH,
            "batch": BATCH,
            "groups": "global",
        },
    }


@pytest.mark.e2e
def test_statistics_and_trials_of_one_job_fan_out_and_match_one_worker(
    tmp_path: Path, postgres: OwnPostgres
) -> None:
    root = tmp_path / "models"
    base, experts, texts, lm = make_data(root)
    with faults.service(tmp_path / "svc", postgres, root, workers=2, **CLAIM_WAIT) as svc:
        client = svc.client(180)
        expert_sets = [upload(client, f"expert-{i}", body) for i, body in enumerate(texts)]
        tune_set = upload(client, "lm", lm)
        spec = spec_of(base, experts, expert_sets, tune_set)

        # The same job in process on one worker, with the service's dataset records (so
        # the Gram cache keys are the same), into a cache of its own.
        store = svc.store()
        try:
            handles = {d: store.get_dataset("acme", d) for d in [*expert_sets, tune_set]}
        finally:
            store.close()
        settings = Settings(data_dir=tmp_path / "single" / "data", allowed_local_dirs=[root])
        log = TrialLog()
        with faults.workers_threads():
            done = run_merge_job(
                MergeSpec.model_validate(spec), tmp_path / "single" / "out", settings, log, handles
            )
        assert done is not None
        assert sorted(log.trials) == list(range(TRIALS))
        reference_trials = [
            (log.trials[i]["params"], log.trials[i]["objective"]) for i in range(TRIALS)
        ]
        reference_output = output_of(done.output_dir)

        job_id = submit(client, spec)
        job = client.wait(job_id, timeout=900)
        assert job["status"] == "succeeded", job
        pids = svc.worker_pids()

        # Statistics: one task per expert, on both workers.
        (split,) = events(job, "stats_split")
        assert sorted(e["index"] for e in split["data"]["experts"]) == list(range(N_EXPERTS))
        stats_done = events(job, "stats_done")
        assert sorted(e["data"]["expert"] for e in stats_done) == list(range(N_EXPERTS))
        assert {pids[e["data"]["worker_pid"]] for e in stats_done} == {"worker-0", "worker-1"}

        # Trials: split once, run on both workers, equal to one worker's.
        assert len(events(job, "trials_split")) == 1
        items = client.request("GET", f"/v1/merges/{job_id}/trials").json()["items"]
        assert [t["index"] for t in items] == list(range(TRIALS))
        assert [(t["params"], t["objective"]) for t in items] == reference_trials
        ran_on = {pids[t["worker"]["worker_pid"]] for t in items}
        assert ran_on == {"worker-0", "worker-1"}, [t["worker"] for t in items]

        stages = [e["data"]["stage"] for e in events(job, "stage")]
        assert stages == ["resolve", "statistics", "tune", "merge", "evaluate", "publish"], stages
        job_dir = svc.artifacts / "jobs" / job_id
        assert sorted(p.name for p in job_dir.iterdir()) == ["output"]
        assert output_of(job_dir / "output") == reference_output
        assert svc.attempts(job_id) == 1
