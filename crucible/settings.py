"""Process settings from the environment (prefix CRUCIBLE_), with embedded defaults.

Embedded defaults keep everything under one data folder: SQLite for jobs, kombu's
filesystem transport as the broker, and a local artifact store. Production points
CRUCIBLE_DATABASE_URL at PostgreSQL and CRUCIBLE_BROKER_URL at Redis.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_", extra="ignore")

    data_dir: Path = Field(default=Path(".data"), description="Root of every embedded default.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite if unset.")
    broker_url: str | None = Field(default=None, description="Celery broker; filesystem if unset.")
    artifacts_dir: Path | None = Field(default=None, description="Local artifact store.")
    # file:// sources are refused unless they lie under one of these folders.
    allowed_local_dirs: list[Path] = Field(default_factory=list)
    # Where the merge math runs; storage stays on the CPU. auto: CUDA when there is a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Experts in one merge request (4xx naming CRUCIBLE_MAX_EXPERTS beyond it).
    max_experts: int = 32
    # LoRA outputs of linear/task_arithmetic merges: factor sum_t c_t B_t A_t through QR of
    # the stacked factors (never d_out x d_in). false forces the dense SVD (benchmarks).
    lora_lowrank: bool = True
    # Datasets: the largest upload accepted (bytes; streamed to disk, never held in memory).
    max_dataset_bytes: int = 100 * 1024 * 1024
    # Statistics stage: the float64 Grams held at once; beyond it, modules are collected in
    # several passes over the data, each writing its Grams out before the next.
    gram_memory_bytes: int = 2 * 1024**3
    # Per-job caps on the tuner and the statistics stage (4xx naming the limit when exceeded).
    max_trials: int = 512
    max_samples: int = 100_000
    # How often a running job looks at the cancel flag (seconds between database reads).
    cancel_poll_seconds: float = 0.5
    # Redis redelivers unacknowledged tasks after this; longer than the longest job.
    visibility_timeout_seconds: int = 12 * 3600
    # Log lines: json or text; unset, each command's default (json for serve/worker, text
    # for merge/up). The level applies to the root logger.
    log_format: Literal["json", "text"] | None = None
    log_level: str = "INFO"
    # Seconds between progress writes to the job store (the last one is always written).
    progress_interval_seconds: float = 0.5

    # --- Job ownership (issue 6). A worker holds a job by a lease it renews every
    # heartbeat; a running job whose lease expired has lost its worker and is requeued by
    # the reaper, up to max_attempts deliveries, then failed with worker_lost.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    reaper_interval_seconds: float = 30.0
    # Job-store writes of a running job (progress, events, heartbeats, the outcome) retry
    # connection errors this many times with the retry policy's backoff (about 45 s in
    # all), so a database restart does not fail the jobs that are running.
    store_retry_attempts: int = 8
    # A job still queued this long after its task was sent has its task sent again by the
    # reaper (the API may have died between storing the job and sending the task); a
    # duplicate delivery is a no-op.
    queued_resend_seconds: float = 300.0
    # --- Limits (issue 6); each exceeded one is a 4xx naming the limit (or a failed job
    # with limit_exceeded when only the worker can know, e.g. input bytes).
    job_wall_time_seconds: float = 24 * 3600.0
    max_concurrent_jobs_per_tenant: int = 8
    max_input_bytes_per_tenant: int = 2 * 1024**4
    max_request_bytes: int = 1024 * 1024
    # --- Sources and secrets (issue 6).
    # Pickled checkpoints (.bin/.pt) are refused unless enabled; then read weights_only.
    allow_pickle: bool = False
    # How Hub weights reach the merge stage (issue 8). download: into the HF cache first.
    # stream: only config/tokenizer files are downloaded; tensors are read with HTTP range
    # requests as the merge goes (no local copy). Jobs with a statistics or tuning stage,
    # which load whole models through transformers, and LoRA adapters still download.
    source_mode: Literal["download", "stream"] = "download"
    # Scale-out (issue 8): a job whose inputs reach split_min_input_bytes has its merge
    # stage split into at most split_max_parts parts (runs of whole output shards) that
    # different workers merge: a Celery chord, Redis broker only. 1 part: never split.
    split_min_input_bytes: int = Field(default=32 * 1024**3, ge=0)
    split_max_parts: int = Field(default=4, ge=1)
    # A job whose statistics stage must compute the Grams of at least this many experts
    # (cache misses) runs each expert's statistics as its own Celery task, on any worker,
    # and the rest of the job in the chord's callback (crucible.stats.fanout); Redis
    # broker only. 0: never; fewer misses: computed one after another by the job's worker.
    stats_fanout_min_experts: int = Field(default=2, ge=0)
    # A tuned job whose tuning.batch is at least this runs each BO batch's trials on any
    # free worker, its own worker helping (crucible.tune.trials); Redis broker only (the
    # trials' board is in its Redis; the factorizations go through the artifact store, so
    # workers on other machines help too when they share it: S3, or one shared folder).
    # 0: never.
    trial_fanout_min_batch: int = Field(default=2, ge=0)
    # How long after a batch starts its sent trials are left for other workers to claim
    # before the job's worker runs them itself: an idle worker claims in milliseconds, one
    # whose first task is still importing needs seconds. Counted from the batch's start,
    # so it costs nothing when the job's worker's own trial takes longer.
    trial_claim_wait_seconds: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    # Fernet key (urlsafe base64, 32 bytes) encrypting request secrets at rest. Unset in
    # embedded mode: a key is generated once under the data dir (mode 0600).
    secrets_key: SecretStr | None = None
    # Transient Hub/S3/webhook failures (429, 5xx, connection errors) are retried with
    # exponential backoff and jitter: retry_attempts tries in all, first wait retry_base_seconds.
    retry_attempts: int = 5
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 30.0
    # Webhook targets: private, loopback and link-local addresses are refused unless they
    # match one of these CIDRs or host names (tests and in-cluster receivers).
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    webhook_timeout_seconds: float = 10.0
    # Webhook outbox: a finished job whose webhook is still unsent this long after the job
    # ended, or after its delivery run last renewed its claim (the worker died), has its
    # delivery task sent again by the reaper. Keep it above webhook_timeout_seconds +
    # retry_max_seconds (the longest gap between two attempts of a live run), or a slow
    # run can overlap the reaper's new one for an attempt.
    webhook_outbox_seconds: float = Field(default=60.0, gt=0)
    # --- S3-compatible storage (issue 7): s3:// outputs and CRUCIBLE_ARTIFACTS_URI. Unset
    # fields fall back to boto3's default chain (AWS_* variables, config files, instance
    # roles); the secret is never logged.
    s3_endpoint_url: str | None = Field(default=None, description="e.g. http://minio:9000")
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # Multipart uploads: files above this many bytes go up in parts of this size (S3's
    # minimum part is 5 MiB; 10,000 parts at most, so 64 MiB parts reach 625 GiB files).
    s3_part_bytes: int = Field(default=64 * 1024**2, ge=5 * 1024**2)
    # s3://bucket/prefix: datasets, Gram caches and job outputs live there durably; the local
    # artifact folder is then a working cache (a worker on another machine fetches from S3).
    artifacts_uri: str | None = Field(default=None, description="s3://bucket/prefix or unset.")

    @field_validator("artifacts_uri")
    @classmethod
    def _artifacts_uri_is_s3(cls, v: str | None) -> str | None:
        # A typo here must stop the process at start, not fail the first upload.
        if v:
            from crucible.s3 import check_location

            check_location(v)
        return v or None

    @cached_property
    def data_root(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def allowed_roots(self) -> list[Path]:
        """CRUCIBLE_ALLOWED_LOCAL_DIRS with symlinks resolved."""
        return [Path(d).expanduser().resolve() for d in self.allowed_local_dirs]

    def allows_local_path(self, path: Path) -> bool:
        """Whether `path`, every existing symlink followed, lies inside an allowed folder:
        a link pointing out of an allowed folder is judged by its target."""
        real = path.resolve()
        return any(real.is_relative_to(root) for root in self.allowed_roots)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_root / 'crucible.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_root / "broker"

    @property
    def artifacts_root(self) -> Path:
        return (self.artifacts_dir or self.data_root / "artifacts").expanduser().resolve()

    def job_output_dir(self, job_id: str) -> Path:
        return self.artifacts_root / "jobs" / job_id / "output"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")


def get_settings() -> Settings:
    return Settings()
