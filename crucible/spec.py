"""The contract: what a merge request is (MergeSpec) and what a job looks like (Job).

Torch-free: the API validates requests with these models and publishes them in OpenAPI.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from crucible.methods.overrides import request_params_model
from crucible.methods.registry import METHODS
from crucible.sources.uri import SOURCE_SCHEMES, parse_uri
from crucible.webhook_url import check_url_syntax

DType = Literal["float32", "float16", "bfloat16"]
ShapeMismatchPolicy = Literal["fail", "base", "keep_per_expert"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

_REVISION = re.compile(r"^[\w.\-/]{1,255}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What a stored spec, every response and the model card show in place of a secret.
REDACTED = "***"

# A write-only secret: accepted in a request, never dumped (python or JSON) as anything but
# REDACTED, so the stored spec, its digest, responses and the model card cannot carry it.
# The API moves the value to the job's encrypted secrets (crucible/secrets.py).
WriteOnlySecret = Annotated[
    SecretStr,
    PlainSerializer(lambda _: REDACTED, return_type=str),
    WithJsonSchema({"type": "string", "format": "password", "writeOnly": True}),
]


def _secret_length(v: SecretStr, field: str, least: int) -> SecretStr:
    plain = v.get_secret_value()
    # The marker passes: a stored spec (the worker validates it again) holds it.
    if plain != REDACTED and not least <= len(plain) <= 1024:
        raise ValueError(f"{field} must be {least} to 1024 characters")
    if plain != plain.strip():
        raise ValueError(f"{field} must not start or end with whitespace")
    return v


# Dataset ids as the datasets API issues them.
DatasetId = Annotated[str, Field(pattern=r"^ds_[0-9a-z]{8,64}$", examples=["ds_3f2a9c41d07b"])]


class ModelRef(_Strict):
    """A model by URI and revision; the worker pins the revision to a commit."""

    uri: str = Field(description="hf://org/name or file:///absolute/path (if the server allows).")
    revision: str = Field(default="main", description="Branch, tag or commit sha.")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        parsed = parse_uri(v)
        if parsed.scheme not in SOURCE_SCHEMES:
            raise ValueError(
                f"{parsed.scheme}:// is not a supported model source; use hf:// or file://"
            )
        return v

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, v: str) -> str:
        if not _REVISION.match(v) or ".." in v:
            raise ValueError(f"malformed revision {v!r}")
        return v


class ExpertRef(ModelRef):
    name: str | None = Field(default=None, max_length=128, description="A label for reports.")
    weight: float = Field(default=1.0, description="Per-expert weight used by the method.")
    grams: ModelRef | None = Field(
        default=None,
        description=(
            "This expert's per-module input Grams, for data-aware methods (regmean; bmm with "
            "gram=activations or hybrid): a folder (hf:// or file://) of safetensors whose "
            "tensor named like a weight (e.g. model.layers.0.mlp.down_proj.weight) is that "
            "module's G = X^T X / n, d_in x d_in, X the module's inputs on this expert's data."
        ),
    )
    dataset: DatasetId | None = Field(
        default=None,
        description=(
            "An uploaded dataset (ds_...) of this expert's task. Methods that need Grams "
            "(regmean; bmm with gram=activations or hybrid) compute them in the statistics "
            "stage by running this expert over up to statistics.max_samples of its rows, "
            "unless `grams` names precomputed ones."
        ),
    )

    allow_base_mismatch: bool = Field(
        default=False,
        description=(
            "For a LoRA adapter expert: merge it even when its adapter_config.json names a "
            "base model other than this job's base (shapes are still checked)."
        ),
    )

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be a finite number")
        return v


def parse_size(value: int | str) -> int:
    """Bytes from 123, "500MB", "5GB" or "2GiB" (decimal units as the Hub uses them)."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"malformed size {value!r}: expected e.g. 5GB, 500MB or 1048576")
    return int(float(m[1]) * _UNITS[(m[2] or "B").upper()])


class OutputSpec(_Strict):
    uri: str = Field(
        default="local://",
        description="Where the merged model is published: local:// (the artifact store), "
        "s3://bucket/prefix (files, then crucible-manifest.json last) or hf://org/name (one "
        "commit; the repo is created if needed, with the request's hub_token).",
    )
    private: bool = Field(
        default=True, description="hf:// outputs: a repo created by the job is private."
    )
    dtype: DType | None = Field(default=None, description="Output dtype; the base's if unset.")
    shard_size: int | str = Field(
        default="5GB", validate_default=True, description="Maximum bytes per shard."
    )
    format: Literal["full", "lora"] = Field(
        default="full",
        description=(
            "full: merged dense weights. lora: a PEFT LoRA adapter (adapter_config.json + "
            "adapter_model.safetensors) of the merged ΔW, by truncated SVD per module; every "
            "expert must then be a LoRA adapter."
        ),
    )
    lora_rank: int | Literal["auto"] = Field(
        default="auto",
        description=(
            "format lora: the adapter's rank r (per module, at most min(d_out, d_in)), or "
            "auto: per module, the smallest rank keeping `lora_energy` of the squared "
            "singular values (ranks then go to rank_pattern)."
        ),
    )
    lora_energy: float = Field(
        default=0.999,
        gt=0,
        le=1,
        description="format lora with lora_rank auto: the share of sum sigma^2 kept per module.",
    )

    @field_validator("lora_rank")
    @classmethod
    def _check_rank(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 65536:
            raise ValueError("lora_rank must be between 1 and 65536, or auto")
        return v

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        parsed = parse_uri(v)
        if parsed.scheme == "s3":
            from crucible.s3 import check_location

            check_location(v)
        elif parsed.scheme == "hf" and "/" not in parsed.target:
            raise ValueError(f"hf:// outputs name the owner too: hf://org/name, not {v!r}")
        elif parsed.scheme not in ("local", "hf"):
            raise ValueError(
                f"{parsed.scheme}:// is not an output; use local://, s3://bucket/prefix "
                "or hf://org/name"
            )
        return v

    @field_validator("shard_size")
    @classmethod
    def _check_shard_size(cls, v: int | str) -> int:
        size = parse_size(v)
        if size < 1024:
            raise ValueError("shard_size must be at least 1024 bytes")
        return size


def _method_model(name: str) -> type[BaseModel]:
    info = METHODS[name]
    model_name = "".join(part.capitalize() for part in name.split("_")) + "Method"
    return create_model(
        model_name,
        __config__=ConfigDict(extra="forbid"),
        __doc__=info.summary,
        name=(Literal[name], ...),  # type: ignore[valid-type]
        params=(
            request_params_model(info.params),
            Field(default_factory=request_params_model(info.params)),
        ),
    )


# One model per method, discriminated by name: a bad param is reported at
# method.<name>.params.<field>, an unknown name lists the known ones.
MethodSpec = Annotated[
    Union[tuple(_method_model(n) for n in METHODS)],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="name"),
]


class StatisticsSpec(_Strict):
    """How the statistics stage computes activation Grams from the experts' datasets."""

    max_samples: int = Field(
        default=256, ge=1, description="Examples per expert (RegMean's default is 256)."
    )
    max_length: int = Field(default=128, ge=8, le=8192, description="Tokens per example.")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Examples per forward pass.")


class SplitSpec(_Strict):
    """A deterministic split of a dataset's rows: a seeded permutation, then the first
    `validation` fraction for tuning and the next `test` fraction for the held-out score."""

    validation: float = Field(default=0.5, gt=0, le=1)
    test: float = Field(default=0.5, ge=0, lt=1)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.validation + self.test > 1 + 1e-9:
            raise ValueError(
                f"validation + test must be at most 1, got {self.validation} + {self.test}"
            )
        return self


# Methods the tuner can search, and the params it searches for each (merge-math.md 10.4).
TUNABLE_PARAMS: dict[str, tuple[str, ...]] = {
    "bmm": ("rho", "scale"),
    "task_arithmetic": ("scale",),
    "ties": ("scale",),
}
TuningGroups = Literal["global", "layer_type", "block", "module"]
TuningMetric = Literal["accuracy", "loss", "perplexity"]


class TuningSpec(_Strict):
    """Bayesian optimisation of per-module-group hyperparameters on a validation split."""

    dataset: DatasetId | dict[str, DatasetId] = Field(
        description=(
            "The validation data: one dataset (language modelling, or classification when "
            "every expert shares the label set), or {expert name: dataset} for "
            "classification experts with their own heads (accuracy per task, then the mean)."
        )
    )
    metric: TuningMetric | None = Field(
        default=None,
        description="accuracy (classification) is maximised, loss and perplexity (language "
        "modelling) minimised. Default: accuracy for classification data, loss otherwise.",
    )
    trials: int = Field(default=32, ge=1, description="Trials in all, Sobol ones included.")
    init_trials: int = Field(default=8, ge=1, description="Sobol trials before the GP.")
    groups: TuningGroups = Field(
        default="layer_type",
        description="One set of hyperparameters for the whole model (global), per kind of "
        "linear module (layer_type: q/k/v/out/fc...), per transformer block (block), or per "
        "module (module).",
    )
    batch: int = Field(default=1, ge=1, le=16, description="Trials proposed at once (q).")
    split: SplitSpec = Field(default_factory=SplitSpec)
    max_samples: int = Field(
        default=512, ge=1, description="Rows per task of each split used for evaluation."
    )
    max_length: int = Field(default=128, ge=8, le=8192, description="Tokens per example.")
    batch_size: int = Field(default=32, ge=1, le=1024, description="Examples per forward pass.")

    @model_validator(mode="after")
    def _init_within_trials(self) -> TuningSpec:
        if self.init_trials > self.trials:
            raise ValueError(
                f"init_trials ({self.init_trials}) must not exceed trials ({self.trials})"
            )
        return self


class WebhookSpec(_Strict):
    """Where the job is POSTed on a terminal state, and the secret that signs it.

    Each delivery carries `X-Crucible-Timestamp: <unix seconds>` and
    `X-Crucible-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + raw body)>`.
    Delivery is at least once (a worker that dies mid-delivery is covered by another
    worker's retry): `X-Crucible-Event-Id: <job id>:job.<status>` is the same on every
    attempt, so receivers dedupe on it.
    """

    url: str = Field(
        max_length=2048,
        description="http(s) URL without credentials; private, loopback and link-local "
        "addresses are refused unless the server allows them.",
        examples=["https://hooks.example.com/crucible"],
    )
    secret: WriteOnlySecret = Field(
        description="HMAC-SHA256 key of the signature, 16 to 1024 characters. Write-only: "
        'stored encrypted, shown as "***" in every response.'
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        check_url_syntax(v)
        return v

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, v: SecretStr) -> SecretStr:
        return _secret_length(v, "webhook.secret", 16)


class MergeSpec(_Strict):
    base: ModelRef
    experts: list[ExpertRef] = Field(min_length=1)
    method: MethodSpec
    output: OutputSpec = Field(default_factory=OutputSpec)
    shape_mismatch: ShapeMismatchPolicy = Field(
        default="fail",
        description=(
            "Tensors whose shape differs between the base and an expert (task heads, resized "
            "vocabularies) are never averaged. 'fail': the job fails naming them. 'base': the "
            "output keeps the base's tensor. 'keep_per_expert': the output keeps the base's "
            "tensor and each expert's own version is written to per_expert/<expert>.safetensors."
        ),
    )
    statistics: StatisticsSpec = Field(default_factory=StatisticsSpec)
    tuning: TuningSpec | None = Field(
        default=None,
        description=(
            "Tune the method's per-module-group hyperparameters by Bayesian optimisation on "
            "a validation split (bmm: rho and scale; task_arithmetic and ties: scale); the "
            "best trial is published and scored on the test split."
        ),
    )
    hub_token: WriteOnlySecret | None = Field(
        default=None,
        description=(
            "A Hugging Face token used for every hf:// source (and an hf:// output). "
            'Write-only: stored encrypted, shown as "***" in every response.'
        ),
    )
    webhook: WebhookSpec | None = Field(
        default=None,
        description="POST the job to this URL when it succeeds, fails or is cancelled.",
    )

    @field_validator("hub_token")
    @classmethod
    def _token_length(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else _secret_length(v, "hub_token", 1)

    @model_validator(mode="after")
    def _grams_present(self) -> MergeSpec:
        if self.needs_grams():
            missing = [
                f"experts[{i}]"
                for i, e in enumerate(self.experts)
                if e.grams is None and e.dataset is None
            ]
            if missing:
                raise ValueError(
                    f"method {self.method.name!r} with these params needs per-expert Grams; "
                    f"{', '.join(missing)} name neither a `dataset` nor a `grams` folder"
                )
        return self

    @model_validator(mode="after")
    def _tuning_fits(self) -> MergeSpec:
        if self.tuning is None:
            return self
        if self.method.name not in TUNABLE_PARAMS:
            raise ValueError(
                f"tuning is available for {', '.join(sorted(TUNABLE_PARAMS))}, "
                f"not for {self.method.name!r}"
            )
        if isinstance(self.tuning.dataset, dict):
            names = [e.name for e in self.experts]
            unknown = sorted(set(self.tuning.dataset) - {n for n in names if n})
            if unknown:
                raise ValueError(
                    f"tuning.dataset names experts {unknown} that are not in experts[].name "
                    f"({[n for n in names if n]})"
                )
        return self

    @model_validator(mode="after")
    def _lora_output_fits(self) -> MergeSpec:
        if self.output.format != "lora":
            return self
        if self.tuning is not None:
            raise ValueError("tuning with output.format lora is not available yet")
        params = self.method.params
        if self.method.name == "linear" and not getattr(params, "normalize", True):
            total = math.fsum(e.weight for e in self.experts)
            if abs(total - 1.0) > 1e-9:
                raise ValueError(
                    "linear with normalize=false and expert weights summing to "
                    f"{total:g} gives (sum w - 1) * W0 + sum w ΔW, which a LoRA adapter "
                    "cannot hold: use normalize=true, weights summing to 1, or format full"
                )
        return self

    def needs_grams(self) -> bool:
        info = METHODS[self.method.name]
        return info.needs_grams is not None and bool(info.needs_grams(self.method.params))

    def dataset_ids(self) -> list[str]:
        """Every dataset the spec references, in order, without repeats."""
        ids = [e.dataset for e in self.experts if e.dataset]
        if self.tuning is not None:
            d = self.tuning.dataset
            ids += list(d.values()) if isinstance(d, dict) else [d]
        return list(dict.fromkeys(ids))

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


class Progress(BaseModel):
    done: int = 0
    total: int = 0
    unit: str = "tensors"


class JobError(BaseModel):
    code: str
    message: str
    detail: Any = None


class FileEntry(BaseModel):
    path: str
    sha256: str
    bytes: int


class JobResult(BaseModel):
    uri: str
    files: list[FileEntry] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    report: dict[str, Any] | None = Field(
        default=None,
        description="The merge report: per-module diagnostics (solve path, ridge, condition "
        "estimate, the method's own flags), fallbacks and shape-mismatch handling.",
    )


class JobEvent(BaseModel):
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] | None = None


class WebhookDelivery(BaseModel):
    """One attempt to deliver the job's webhook: the receiver's HTTP status, or what
    went wrong before one came back."""

    at: datetime
    attempt: int
    status_code: int | None = None
    error: str | None = None


class Job(BaseModel):
    id: str
    status: JobStatus
    stage: str | None = None
    progress: Progress = Field(default_factory=Progress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool = False
    spec: dict[str, Any]
    result: JobResult | None = None
    error: JobError | None = None
    events: list[JobEvent] = Field(default_factory=list)
    deliveries: list[WebhookDelivery] = Field(
        default_factory=list,
        description="Every webhook delivery attempt, oldest first.",
    )


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None = None
