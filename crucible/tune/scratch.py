"""Where a job's trial fan-out (crucible.tune.trials) keeps its files, and their removal
once the job is over. Torch-free: the runner's on_terminal, which the reaper imports too,
removes them for every terminal status, however the job ended (an attempt that died in
its tune stage leaves its folder to the next attempt, and there may be none)."""

from __future__ import annotations

import shutil

from crucible.settings import Settings


def tune_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/tune"


def remove_tune_files(settings: Settings, job_id: str) -> None:
    """Every attempt's trial files of the job (its tuning can no longer use them). They
    are only ever in the local artifact folder (no fan-out with a remote store); never
    raises."""
    shutil.rmtree(settings.artifacts_root / tune_prefix(job_id), ignore_errors=True)
