"""What the reference runners (mergekit, FusionBench) share: each reference lives in its own
virtual environment, is checked to be the pinned version, runs as a CPU-only, offline,
single-threaded subprocess, and a missing one fails the parity tests with an install hint
(it never skips them)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def checked_python(
    venv: Path,
    distribution: str,
    version: str,
    hint: str,
    unavailable: type[Exception],
    *,
    module: str | None = None,
) -> Path:
    """The venv's python, after checking that `distribution` is installed at `version` (and,
    when given, that `module` is importable); else `unavailable` with the install hint."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise unavailable(f"no {python}.\n{hint}")
    check = f"assert u.find_spec({module!r}), '{module} is not importable'; " if module else ""
    probe = subprocess.run(
        [
            str(python),
            "-c",
            f"import importlib.metadata as m, importlib.util as u; {check}"
            f"print(m.version({distribution!r}))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = probe.stdout.strip()
    if probe.returncode != 0 or found != version:
        raise unavailable(
            f"{venv} has {distribution} {found or '(none)'}, need {version}: "
            f"{probe.stderr[-2000:]}\n{hint}"
        )
    return python


def reference_env() -> dict[str, str]:
    """CPU only, no network, one thread (the test machines have two cores)."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def require(check: Callable[[], object], unavailable: type[Exception]) -> None:
    """Fail the calling test with the install hint when `check` finds the venv missing."""
    try:
        check()
    except unavailable as exc:
        message = str(exc)
    else:
        return
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback noise
