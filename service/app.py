"""The FastAPI application: `uvicorn --factory service.app:create_app`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import crucible
from crucible.queue import make_celery
from crucible.secrets import check_secrets_key
from crucible.settings import Settings, get_settings
from crucible.store import JobStore
from service.errors import install_error_handlers
from service.limits import RequestSizeLimit
from service.metrics import install_metrics
from service.request_id import RequestIdMiddleware
from service.routes import datasets, events, merges, meta


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # No way to decrypt request secrets (no key with a database server): refuse to start.
    check_secrets_key(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store.migrate()
        # Everything imported so far lives as long as the process: out of the collector's
        # way, a full collection no longer walks ~150k objects (80 ms with the GIL held,
        # every request of the process waiting: the status reads' p99 spikes under load).
        gc.collect()
        gc.freeze()
        yield

    app = FastAPI(
        title="Crucible",
        version=crucible.__version__,
        description="Model merging as a service. Authenticate with `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = JobStore(settings.resolved_database_url, settings.artifacts_root)
    app.state.celery = make_celery(settings)
    install_error_handlers(app)
    app.include_router(merges.router)
    app.include_router(datasets.router)
    app.include_router(meta.router)
    app.include_router(events.router)
    install_metrics(app)
    # JSON bodies over max_request_bytes are a 413 (Content-Length and streamed bytes); the
    # dataset upload streams to disk under its own, larger limit.
    app.add_middleware(
        RequestSizeLimit,
        max_bytes=settings.max_request_bytes,
        exempt=frozenset({("POST", "/v1/datasets")}),
    )
    # Added last, so outermost: every other middleware and handler logs with the id.
    app.add_middleware(RequestIdMiddleware)
    return app
