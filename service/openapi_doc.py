"""The OpenAPI document as committed in openapi/openapi.json."""

from __future__ import annotations

import json

from crucible.settings import Settings


def render_openapi() -> str:
    from service.app import create_app

    # In-memory settings: rendering must not touch a data folder or a broker.
    app = create_app(Settings(database_url="sqlite://", broker_url="memory://"))
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
