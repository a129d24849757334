"""Promises of the layout: the API process (and the reaper) never loads torch; openapi.json
is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_api_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import service.app, service.openapi_doc\n"
        "service.openapi_doc.render_openapi()\n"
        "import crucible.spec, crucible.queue, crucible.store\n"
        # The reaper and the runner's on_terminal, which removes a job's tune state.
        "import crucible.reaper, crucible.tune.scratch\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_openapi_json_is_current() -> None:
    from service.openapi_doc import render_openapi

    committed = (REPO / "openapi" / "openapi.json").read_text()
    assert committed == render_openapi(), "openapi/openapi.json is stale: run `crucible openapi`"
