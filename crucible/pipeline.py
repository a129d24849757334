"""One merge job, stage by stage: resolve -> statistics -> tune -> merge -> evaluate ->
publish (statistics only when the method needs Grams, tune and evaluate only with `tuning`).

The pipeline knows nothing of HTTP, Celery or the job store: it reports through a
`Reporter`, so the worker (store-backed) and `crucible merge` (console) share it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crucible.device import compute_device
from crucible.engine import MergeInputs, merge_model
from crucible.errors import CrucibleError
from crucible.publish.files import (
    copy_support_files,
    file_manifest,
    manifest_entry,
    new_staging,
    remove_staging,
)
from crucible.publish.model_card import render_model_card
from crucible.report import REPORT_FILE, MergeReport
from crucible.settings import Settings
from crucible.sources.align import align_names
from crucible.sources.compat import check_compatible
from crucible.sources.resolve import ResolvedModel, input_bytes, resolve_model
from crucible.spec import MergeSpec

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from crucible.datasets.storage import DatasetHandle
    from crucible.tune.trials import TrialFanout


class Reporter(Protocol):
    def stage(self, name: str) -> None: ...
    def progress(self, done: int, total: int, unit: str) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...
    def check_cancelled(self) -> None:
        """Raise JobCancelled when the job was cancelled; called between tensors."""
        ...

    def trial(self, index: int, data: dict[str, Any]) -> None:
        """Record one tuning trial (params, objective, seconds)."""
        ...


@dataclass
class MergeOutcome:
    output_dir: Path
    files: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None


def run_merge_job(
    spec: MergeSpec,
    output_dir: Path,
    settings: Settings,
    reporter: Reporter,
    datasets: Mapping[str, DatasetHandle | None] | None = None,
    hub_token: str | None = None,
    admit_inputs: Callable[[int], None] | None = None,
    split: Callable[[MergeSpec, MergeInputs], bool] | None = None,
    trials: TrialFanout | None = None,
) -> MergeOutcome | None:
    """Run the whole merge; the output appears at `output_dir` only when complete.

    `datasets`: the records of the dataset ids the spec references (None for an id the
    caller's tenant does not have), looked up by the caller (the runner, in the job store).
    `hub_token`: the request's Hub token, decrypted by the caller (crucible.secrets); the
    spec itself only holds "***" in its place.
    `admit_inputs`: called with the job's input bytes once its models are resolved; it
    raises to refuse the job (the runner's per-tenant limit, crucible.tenant_limits).
    `split`: called when the merge stage starts; True means it sent the merge out as parts
    to other workers (crucible.parts), whose chord callback assembles and publishes: the
    pipeline then stops here and returns None. Called too when the statistics stage starts
    (`inputs.grams` still None): True means each expert's statistics went out as a task
    (crucible.stats.fanout), whose chord callback runs the rest of the job.
    `trials`: the tune stage's way to run a batch's trials on other workers too
    (crucible.tune.trials).
    """
    # A restarted job starts the merge cleanly: staging folders an earlier attempt left are
    # removed. Each attempt stages under its own name, so an attempt that lost its lease and
    # cleans up after itself never removes the folder of the attempt that took over.
    remove_staging(output_dir)
    staging = new_staging(output_dir)
    try:
        device = compute_device(settings.device)
        found = _datasets(spec, datasets or {})
        merge_inputs, inputs = _resolve(spec, settings, reporter, hub_token)
        if admit_inputs is not None:
            admit_inputs(input_bytes([merge_inputs.base, *merge_inputs.experts]))
        reporter.check_cancelled()
        if spec.needs_grams():
            from crucible.stats.stage import compute_statistics

            reporter.stage("statistics")
            if split is not None and split(spec, merge_inputs):  # inputs.grams is None
                shutil.rmtree(staging, ignore_errors=True)
                return None
            merge_inputs.grams = compute_statistics(
                spec,
                merge_inputs.base,
                merge_inputs.experts,
                found,
                settings,
                reporter,
                device,
                hub_token=hub_token,
            )
        tuned = None
        if spec.tuning is not None:
            from crucible.tune.stage import tune_merge

            reporter.stage("tune")
            tuned = tune_merge(spec, merge_inputs, found, settings, reporter, device, trials)
            spec = tuned.spec
        reporter.check_cancelled()
        reporter.stage("merge")
        if split is not None and split(spec, merge_inputs):
            shutil.rmtree(staging, ignore_errors=True)
            return None
        if spec.output.format == "lora":
            from crucible.adapter_merge import merge_to_adapter

            metrics, report = merge_to_adapter(
                spec, merge_inputs, staging, reporter, device, lowrank=settings.lora_lowrank
            )
        else:
            metrics, report = merge_model(spec, merge_inputs, staging, reporter, device)
        _report_events(report, reporter)
        if tuned is not None:
            reporter.stage("evaluate")
            metrics["tuning"] = tuned.score_published(staging, reporter)
        reporter.stage("publish")
        reporter.progress(0, 2, "steps")
        return publish_staged(
            spec, merge_inputs.base, inputs, report, metrics, staging, output_dir, reporter
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_staged(
    spec: MergeSpec,
    base: ResolvedModel,
    inputs: list[dict[str, Any]],
    report: MergeReport,
    metrics: dict[str, Any],
    staging: Path,
    output_dir: Path,
    reporter: Reporter,
) -> MergeOutcome:
    """Support files and model card into `staging`, then `staging` renamed into place (the
    publish stage's steps 1 and 2); the caller removes `staging` if this raises."""
    files = _write_support_files(spec, base, inputs, report, staging, metrics)
    reporter.progress(1, 2, "steps")
    # Last look before the output becomes visible: a cancel or a lost lease stops here.
    reporter.check_cancelled()
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    reporter.progress(2, 2, "steps")
    reporter.event("published", f"wrote {len(files)} files", {"path": str(output_dir)})
    return MergeOutcome(
        output_dir=output_dir,
        files=files,
        inputs=inputs,
        metrics=metrics,
        report=report.as_dict(),
    )


def _report_events(report: MergeReport, reporter: Reporter) -> None:
    fallbacks, ill = report.fallbacks(), report.ill_conditioned()
    if fallbacks or ill:
        reporter.event(
            "numerics",
            f"{len(fallbacks)} modules used a fallback solve, {len(ill)} are ill-conditioned "
            f"(see {REPORT_FILE})",
            {"fallbacks": fallbacks[:20], "ill_conditioned": ill[:20]},
        )


def _datasets(
    spec: MergeSpec, datasets: Mapping[str, DatasetHandle | None]
) -> dict[str, DatasetHandle]:
    """Every dataset the spec names, or a failed job naming the first one that is gone
    (deleted after the job was accepted, or never the caller's)."""
    found: dict[str, DatasetHandle] = {}
    for dataset_id in spec.dataset_ids():
        handle = datasets.get(dataset_id)
        if handle is None or not handle.path.is_file():
            raise CrucibleError(
                "dataset_not_found",
                f"dataset {dataset_id!r} does not exist (it may have been deleted after the "
                "job was submitted)",
                {"dataset": dataset_id},
            )
        found[dataset_id] = handle
    return found


def _resolve(
    spec: MergeSpec, settings: Settings, reporter: Reporter, hub_token: str | None = None
) -> tuple[MergeInputs, list[dict[str, Any]]]:
    reporter.stage("resolve")
    total = 1 + len(spec.experts)
    reporter.progress(0, total, "models")
    stream = _streams(spec, settings, reporter)
    base = resolve_model(
        spec.base, settings, on_event=reporter.event, token=hub_token, stream=stream
    )
    reporter.progress(1, total, "models")
    experts: list[ResolvedModel] = []
    expert_only: list[list[str]] = []
    for i, ref in enumerate(spec.experts):
        reporter.check_cancelled()
        expert = resolve_model(
            ref,
            settings,
            base,
            ref.allow_base_mismatch,
            on_event=reporter.event,
            token=hub_token,
            stream=stream,
        )
        if expert.warning:
            reporter.event("adapter_base_unchecked", expert.warning, {"uri": ref.uri})
        # An adapter's tensors are already the base's names.
        aligned, own = (expert, []) if expert.adapter else _aligned(base, expert)
        experts.append(aligned)
        expert_only.append(own)
        reporter.progress(2 + i, total, "models")
    labels = [ref.name or f"experts[{i}] ({ref.uri})" for i, ref in enumerate(spec.experts)]
    if spec.output.format == "lora":
        full = [label for label, e in zip(labels, experts, strict=True) if e.adapter is None]
        if full:
            raise CrucibleError(
                "lora_output_needs_adapters",
                f"output.format lora merges LoRA adapters only; {', '.join(full)} "
                "is a full model (use format full to merge it)",
                {"experts": full},
            )
    shared = []
    for e, own in zip(experts, expert_only, strict=True):
        heads = set(own)
        shared.append(
            dataclasses.replace(e, tensors={n: t for n, t in e.tensors.items() if n not in heads})
        )
    mismatched = check_compatible(
        base, shared, labels, allow_shape_mismatch=spec.shape_mismatch != "fail"
    )
    if any(expert_only):
        reporter.event(
            "expert_only",
            "tensors only the experts have (task heads) are kept per expert, never merged",
            {label: own[:20] for label, own in zip(labels, expert_only, strict=True) if own},
        )
    inputs = [_input_record("base", None, spec.base.uri, base, None)]
    inputs += [
        _input_record("expert", ref.name, ref.uri, model, ref.weight)
        for ref, model in zip(spec.experts, experts, strict=True)
    ]
    reporter.event("resolved", f"resolved {total} models", {"inputs": inputs})
    if mismatched:
        reporter.event(
            "shape_mismatch",
            f"{len(mismatched)} tensors differ in shape from the base; policy "
            f"{spec.shape_mismatch}",
            {"tensors": sorted(mismatched)[:50]},
        )
    merge_inputs = MergeInputs(
        base=base,
        experts=experts,
        labels=labels,
        mismatched=mismatched,
        expert_only=expert_only,
    )
    return merge_inputs, inputs


def _streams(spec: MergeSpec, settings: Settings, reporter: Reporter) -> bool:
    """Whether Hub weights are streamed (CRUCIBLE_SOURCE_MODE=stream): not for jobs with a
    statistics or tuning stage, which load whole models through transformers."""
    if settings.source_mode != "stream":
        return False
    if spec.needs_grams() or spec.tuning is not None:
        reporter.event(
            "stream_skipped",
            "source_mode is stream, but this job's statistics or tuning stage loads whole "
            "models: its Hub weights are downloaded",
            None,
        )
        return False
    return True


def _aligned(base: ResolvedModel, expert: ResolvedModel) -> tuple[ResolvedModel, list[str]]:
    """The expert with its tensors renamed to the base's names where one side carries a
    prefix the other does not (bert.encoder... vs encoder...), and the names of the tensors
    only it has (its head), which keep their own names."""
    alignment = align_names(base.tensors, expert.tensors)
    if not alignment.prefix:
        return expert, alignment.expert_only
    tensors = {b: expert.tensors[e] for b, e in alignment.to_expert.items()}
    clash = sorted(set(tensors) & set(alignment.expert_only))
    if clash:
        raise CrucibleError(
            "incompatible_models",
            f"{expert.uri}: after removing the name prefix {alignment.prefix!r}, tensor "
            f"{clash[0]!r} would name two different tensors",
            {"tensors": clash[:20]},
        )
    tensors.update({n: expert.tensors[n] for n in alignment.expert_only})
    return dataclasses.replace(expert, tensors=tensors), alignment.expert_only


def _input_record(
    role: str, name: str | None, uri: str, model: ResolvedModel, weight: float | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "role": role,
        "name": name,
        "uri": uri,
        "revision": model.revision,
        "commit": model.commit,
        "weight": weight,
    }
    if model.adapter is not None:
        ranks = sorted({d.rank for d in model.adapter.deltas.values()})
        record["adapter"] = {
            "type": "lora",
            "ranks": ranks,
            "modules": len(model.adapter.deltas),
            "modules_to_save": len(model.adapter.full),
            "use_rslora": bool(model.adapter.config.get("use_rslora")),
        }
    return record


def _write_support_files(
    spec: MergeSpec,
    base: ResolvedModel,
    inputs: list[dict[str, Any]],
    report: MergeReport,
    staging: Path,
    metrics: dict[str, Any],
) -> list[dict[str, Any]]:
    """Support files, merge report and model card into `staging`; the output's manifest.
    The card lists the other files' hashes, so they are hashed once, here, and only the
    card is hashed after it is written (a second pass over a 1.3 GB output was ~16% of a
    linear merge)."""
    copy_support_files(
        base.root, staging, dtype=spec.output.dtype, adapter=spec.output.format == "lora"
    )
    report_doc = report.as_dict()
    (staging / REPORT_FILE).write_text(json.dumps(report_doc, indent=1) + "\n", encoding="utf-8")
    weight_files = file_manifest(staging)
    card = render_model_card(
        spec=spec.model_dump(mode="json"),
        inputs=inputs,
        method=spec.method.name,
        params=spec.method.params.model_dump(mode="json"),
        files=weight_files,
        report=report_doc,
        tuning=metrics.get("tuning"),
        lora=metrics.get("lora"),
        metrics=metrics,
    )
    card_path = staging / "README.md"
    card_path.write_text(card, encoding="utf-8")
    files = [f for f in weight_files if f["path"] != card_path.name]
    return sorted([*files, manifest_entry(staging, card_path)], key=lambda e: e["path"])
