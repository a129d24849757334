"""The OpenAPI document as committed in openapi/openapi.json."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from crucible.settings import Settings


def render_openapi() -> str:
    from service.app import create_app

    # Throwaway settings: rendering must not touch the real data folder or a broker.
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_url=f"sqlite:///{Path(tmp) / 'x.db'}", broker_url="memory://")
        return json.dumps(create_app(settings).openapi(), indent=2, sort_keys=True) + "\n"
