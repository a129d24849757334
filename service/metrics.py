"""`GET /metrics`: Prometheus text, computed from the job store at scrape time.

Unauthenticated, like most exporters: it carries aggregates only (no tenant, job id or
spec in any label or value), and deployments keep it off the public listener (see
docs/architecture.md). What each family is and where it comes from:

- `crucible_jobs{status}` (gauge): jobs in each status, a GROUP BY at scrape time, so it is
  right whichever replica is scraped and whichever worker ran the jobs.
- `crucible_queue_depth{queue="gpu"}` (gauge): messages waiting in the broker (Redis list
  lengths, or the filesystem broker's message files), through kombu.
- `crucible_jobs_finished_total{status}`, `crucible_bytes_read_total` and
  `crucible_bytes_written_total` (succeeded jobs' input weights and output files), and the
  histograms `crucible_stage_duration_seconds{stage}` and `crucible_job_duration_seconds
  {status}`: derived from terminal jobs in the database. A stage lasts from its `stage`
  event until the next stage's (the last one until the job finished), so no worker needs
  to be scraped. Each API process reads finished jobs once, incrementally, in bounded
  pages (`FinishedJobTotals`); every replica reports the same totals, so aggregate
  replicas with max(), not sum().
- `crucible_trials_total`: tuning trials recorded (a COUNT at scrape time).
- `crucible_http_request_duration_seconds{method,route,status}`: this API process's own
  requests, by route template (never the raw path), from a middleware.
- `crucible_metrics_source_up{source}`: 0 when the database or broker could not be read
  for this scrape (their families are left out rather than reported wrong).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any, get_args

from celery import Celery
from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crucible.queue import GPU_QUEUE
from crucible.spec import JobStatus
from crucible.store import JobStore
from crucible.store.job_metrics import FinishedJob

log = logging.getLogger(__name__)

JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNMATCHED_ROUTE = "<unmatched>"


class _Hist:
    """Cumulative-bucket histogram state for one label set."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        labels = [*map(floatToGoString, self.bounds), "+Inf"]  # "1.0", as client Histograms
        for bound, n in zip(labels, self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


class FinishedJobTotals:
    """Totals over terminal jobs, read from the store incrementally.

    Position: a watermark on finished_at plus the ids already counted within GRACE of it,
    so a job whose terminal write commits a little after a later-finished one (another
    worker, clock skew) is still counted, once. A scrape reads at most PAGES pages of PAGE
    jobs; a long history is caught up over several scrapes (`resume`).
    """

    GRACE = timedelta(minutes=5)
    PAGE = 500
    PAGES = 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watermark: datetime | None = None
        self._resume: tuple[datetime, str] | None = None
        self._recent: dict[str, datetime] = {}
        self.finished: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)
        self.bytes_read = 0
        self.bytes_written = 0
        self.stages: dict[str, _Hist] = {}
        self.jobs: dict[str, _Hist] = {}

    def _add(self, job: FinishedJob) -> None:
        self.finished[job.status] = self.finished.get(job.status, 0) + 1
        if job.status == "succeeded":
            self.bytes_read += job.input_bytes
            self.bytes_written += job.output_bytes
        for stage, seconds in job.stage_durations():
            self.stages.setdefault(stage, _Hist(STAGE_BUCKETS)).observe(seconds)
        if job.started_at is not None:
            seconds = max(0.0, (job.finished_at - job.started_at).total_seconds())
            self.jobs.setdefault(job.status, _Hist(STAGE_BUCKETS)).observe(seconds)

    def refresh(self, store: JobStore) -> None:
        with self._lock:
            since = None if self._watermark is None else self._watermark - self.GRACE
            after = self._resume
            for _ in range(self.PAGES):
                page = store.finished_jobs(since, after, self.PAGE)
                for job in page:
                    if job.id not in self._recent:
                        self._add(job)
                        self._recent[job.id] = job.finished_at
                if page:
                    after = (page[-1].finished_at, page[-1].id)
                    if self._watermark is None or after[0] > self._watermark:
                        self._watermark = after[0]
                if len(page) < self.PAGE:
                    self._resume = None
                    break
            else:
                self._resume = after
            if self._watermark is not None:
                horizon = self._watermark - self.GRACE
                self._recent = {k: v for k, v in self._recent.items() if v >= horizon}

    def families(self) -> Iterator[Metric]:
        finished = CounterMetricFamily(
            "crucible_jobs_finished", "Jobs that reached a terminal status.", labels=["status"]
        )
        for status in ("succeeded", "failed", "cancelled"):
            finished.add_metric([status], self.finished.get(status, 0))
        yield finished
        yield CounterMetricFamily(
            "crucible_bytes_read",
            "Bytes of input weights read by succeeded jobs.",
            value=self.bytes_read,
        )
        yield CounterMetricFamily(
            "crucible_bytes_written",
            "Bytes of output files written by succeeded jobs.",
            value=self.bytes_written,
        )
        stages = HistogramMetricFamily(
            "crucible_stage_duration_seconds",
            "Seconds each pipeline stage took, from the job's stage events (terminal jobs).",
            labels=["stage"],
        )
        for stage, hist in sorted(self.stages.items()):
            stages.add_metric([stage], hist.buckets(), hist.total)
        yield stages
        jobs = HistogramMetricFamily(
            "crucible_job_duration_seconds",
            "Seconds from start to terminal status, by that status.",
            labels=["status"],
        )
        for status, hist in sorted(self.jobs.items()):
            jobs.add_metric([status], hist.buckets(), hist.total)
        yield jobs


def queue_depth(celery: Celery, timeout: float = 2.0) -> int:
    """Messages waiting in the gpu queue, as the broker's kombu transport counts them."""
    with celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        try:
            ok = conn.default_channel.queue_declare(queue=GPU_QUEUE, passive=True)
        except conn.channel_errors:
            return 0  # never declared: nothing was ever sent, or it drained and expired
        return int(ok.message_count)


class StoreCollector(Collector):
    """Families computed from the database and the broker when scraped."""

    def __init__(self, store: JobStore, celery: Celery) -> None:
        self.store = store
        self.celery = celery
        self.totals = FinishedJobTotals()

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "crucible_metrics_source_up",
            "1 when the source could be read for this scrape.",
            labels=["source"],
        )
        try:
            yield from self._database()
            up.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics: the database could not be read: %s", type(exc).__name__)
            up.add_metric(["database"], 0)
        try:
            depth = queue_depth(self.celery)
        except Exception as exc:
            log.warning("metrics: the broker could not be read: %s", type(exc).__name__)
            up.add_metric(["broker"], 0)
        else:
            queue = GaugeMetricFamily(
                "crucible_queue_depth", "Tasks waiting in the broker queue.", labels=["queue"]
            )
            queue.add_metric([GPU_QUEUE], depth)
            yield queue
            up.add_metric(["broker"], 1)
        yield up

    def _database(self) -> list[Metric]:
        # Read everything first, so a failure part-way yields no partial families.
        by_status = self.store.count_jobs_by_status()
        trials_count = self.store.count_trials()
        self.totals.refresh(self.store)
        jobs = GaugeMetricFamily("crucible_jobs", "Jobs by current status.", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        trials = CounterMetricFamily(
            "crucible_trials", "Tuning trials recorded.", value=trials_count
        )
        return [jobs, trials, *self.totals.families()]


class HttpMetricsMiddleware:
    """Request latency by method, route template and status (pure ASGI: streamed
    responses are timed to their last byte)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.histogram.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - started
            )


def install_metrics(app: FastAPI) -> CollectorRegistry:
    """The app's own registry (so several apps in one process do not collide), the HTTP
    middleware and GET /metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(StoreCollector(app.state.store, app.state.celery))
    histogram = Histogram(
        "crucible_http_request_duration_seconds",
        "HTTP request latency of this API process.",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS,
        registry=registry,
    )
    app.add_middleware(HttpMetricsMiddleware, histogram=histogram)
    app.state.metrics_registry = registry

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        body: Any = generate_latest(request.app.state.metrics_registry)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)

    return registry
