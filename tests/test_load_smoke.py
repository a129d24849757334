"""bench/load.py for a few seconds: the whole stack (uvicorn with 2 worker processes,
PostgreSQL, Redis, a Celery worker running the submitted merges) under a few pollers and
submitters answers every request as expected. No latency asserts: machines are noisy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_load_smoke_has_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    argv = [sys.executable, "bench/load.py", "--duration", "4", "--pollers", "8"]
    argv += ["--submitters", "2", "--submit-interval", "1", "--seed-jobs", "3"]
    argv += ["--warmup", "2", "--drain", "300", "--json", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert summary["errors"] == 0, summary
    status, submit = summary["kinds"]["status"], summary["kinds"]["submit"]
    # 8 pollers at 1/s and 2 submitters at 1/s for 4 s, each starting at a random phase.
    assert status["requests"] >= 8 and status["errors"] == 0
    assert submit["requests"] >= 2 and submit["errors"] == 0
    # The Celery worker ran every job, the 3 seeded ones, the warm-up's (2 submitters at
    # 1/s for 2 s) and those submitted on the clock, to success.
    assert summary["warmup_jobs"] >= 2
    expected = 3 + summary["warmup_jobs"] + submit["requests"]
    assert summary["jobs"] == {"succeeded": expected}, summary["jobs"]
    assert "| GET /v1/merges/{id} |" in done.stdout
