"""One merge job, stage by stage: resolve -> merge -> publish.

The pipeline knows nothing of HTTP, Celery or the job store: it reports through a
`Reporter`, so the worker (store-backed) and `crucible merge` (console) share it.
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from crucible.errors import CrucibleError
from crucible.methods.base import TensorContext
from crucible.methods.registry import get_method
from crucible.publish.files import copy_support_files, file_manifest
from crucible.publish.model_card import render_model_card
from crucible.publish.writer import ShardedSafetensorsWriter
from crucible.settings import Settings
from crucible.sources.compat import check_compatible
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import MergeSpec

# Floating dtypes by safetensors code; other tensors (int buffers, masks) are copied from base.
FLOAT_CODES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
OUTPUT_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Methods compute in float32: exact for fp16/bf16 inputs, and the dtype of the output cast.
COMPUTE_DTYPE = torch.float32
# Large tensors are merged in blocks of rows of about this many elements (8 MiB per input
# in float32), so memory does not grow with the largest tensor (bench/memory.py: 8 Mi
# elements peaked ~1.2 GB above baseline for TIES, whose blocks hold ~15 temporaries).
BLOCK_ELEMENTS = 2 * 2**20


def _row_blocks(shape: tuple[int, ...], elementwise: bool) -> list[tuple[int, int] | None]:
    """[None] for the whole tensor, or row ranges along dim 0 for blockwise merging."""
    numel = 1
    for d in shape:
        numel *= d
    if not elementwise or not shape or shape[0] == 0 or numel <= BLOCK_ELEMENTS:
        return [None]
    per_row = numel // shape[0]
    step = max(1, BLOCK_ELEMENTS // per_row)
    return [(r, min(shape[0], r + step)) for r in range(0, shape[0], step)]


class Reporter(Protocol):
    def stage(self, name: str) -> None: ...
    def progress(self, done: int, total: int, unit: str) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...
    def check_cancelled(self) -> None:
        """Raise JobCancelled when the job was cancelled; called between tensors."""
        ...


@dataclass
class MergeOutcome:
    output_dir: Path
    files: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)


def run_merge_job(
    spec: MergeSpec, output_dir: Path, settings: Settings, reporter: Reporter
) -> MergeOutcome:
    """Run the whole merge; the output appears at `output_dir` only when complete."""
    staging = output_dir.with_name(output_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        base, experts, inputs = _resolve(spec, settings, reporter)
        reporter.check_cancelled()
        metrics = _merge(spec, base, experts, staging, reporter)
        reporter.stage("publish")
        reporter.progress(0, 2, "steps")
        _write_support_files(spec, base, inputs, staging)
        reporter.progress(1, 2, "steps")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
        reporter.progress(2, 2, "steps")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = file_manifest(output_dir)
    reporter.event("published", f"wrote {len(files)} files", {"path": str(output_dir)})
    return MergeOutcome(output_dir=output_dir, files=files, inputs=inputs, metrics=metrics)


def _resolve(
    spec: MergeSpec, settings: Settings, reporter: Reporter
) -> tuple[ResolvedModel, list[ResolvedModel], list[dict[str, Any]]]:
    reporter.stage("resolve")
    total = 1 + len(spec.experts)
    reporter.progress(0, total, "models")
    base = resolve_model(spec.base, settings)
    reporter.progress(1, total, "models")
    experts: list[ResolvedModel] = []
    for i, ref in enumerate(spec.experts):
        reporter.check_cancelled()
        experts.append(resolve_model(ref, settings))
        reporter.progress(2 + i, total, "models")
    labels = [ref.name or f"experts[{i}] ({ref.uri})" for i, ref in enumerate(spec.experts)]
    check_compatible(base, experts, labels)
    inputs = [_input_record("base", None, spec.base.uri, base, None)]
    inputs += [
        _input_record("expert", ref.name, ref.uri, model, ref.weight)
        for ref, model in zip(spec.experts, experts, strict=True)
    ]
    reporter.event("resolved", f"resolved {total} models", {"inputs": inputs})
    return base, experts, inputs


def _input_record(
    role: str, name: str | None, uri: str, model: ResolvedModel, weight: float | None
) -> dict[str, Any]:
    return {
        "role": role,
        "name": name,
        "uri": uri,
        "revision": model.revision,
        "commit": model.commit,
        "weight": weight,
    }


def _merge(
    spec: MergeSpec,
    base: ResolvedModel,
    experts: list[ResolvedModel],
    staging: Path,
    reporter: Reporter,
) -> dict[str, Any]:
    reporter.stage("merge")
    method = get_method(spec.method.name)
    params = spec.method.params
    weights = [ref.weight for ref in spec.experts]
    # Base file order keeps reads sequential on disk.
    files = {f: i for i, f in enumerate(base.weight_files)}
    names = sorted(base.tensors, key=lambda n: (files[base.tensors[n].file], base.tensors[n].start))
    out_code = OUTPUT_CODES[spec.output.dtype] if spec.output.dtype else None

    def planned_code(name: str) -> str:
        code = base.tensors[name].dtype
        return out_code if (out_code and code in FLOAT_CODES) else code

    plan = [(n, base.tensors[n].shape, planned_code(n)) for n in names]
    writer = ShardedSafetensorsWriter(
        staging, plan, int(spec.output.shard_size), metadata={"format": "pt"}
    )
    total = len(names)
    started = time.perf_counter()
    merged_count = 0
    try:
        with ExitStack() as stack:
            base_reader = stack.enter_context(TensorReader(base))
            readers = [stack.enter_context(TensorReader(e)) for e in experts]
            reporter.progress(0, total, "tensors")
            for i, name in enumerate(names):
                reporter.check_cancelled()
                if base.tensors[name].dtype not in FLOAT_CODES:
                    writer.write(name, base_reader.read(name))
                else:
                    out_dtype = FLOAT_CODES[planned_code(name)]
                    blockwise = method.elementwise or method.tensor_stats is not None
                    blocks = _row_blocks(base.tensors[name].shape, blockwise)
                    extra: dict[str, Any] = {"shape": base.tensors[name].shape}
                    if method.tensor_stats is not None and blocks != [None]:
                        extra["stats"] = [
                            method.tensor_stats(_task_vector(name, base_reader, r, blocks), params)
                            for r in readers
                        ]
                    for rows in blocks:
                        ctx = TensorContext(
                            name=name,
                            base=base_reader.read(name, rows).to(COMPUTE_DTYPE),
                            experts=[r.read(name, rows).to(COMPUTE_DTYPE) for r in readers],
                            weights=weights,
                            extra=extra if rows is None else {**extra, "rows": rows},
                        )
                        merged = method.merge(ctx, params)
                        if not bool(torch.isfinite(merged).all()):
                            raise CrucibleError(
                                "non_finite",
                                f"the merge of tensor {name!r} produced NaN or infinite values",
                                {"tensor": name},
                            )
                        writer.write(name, merged.to(out_dtype), 0 if rows is None else rows[0])
                        del ctx, merged
                    merged_count += 1
                reporter.progress(i + 1, total, "tensors")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - started
    input_bytes = sum(f.stat().st_size for m in [base, *experts] for f in m.weight_files)
    return {
        "tensors": total,
        "merged_tensors": merged_count,
        "merge_seconds": round(seconds, 3),
        "input_bytes": input_bytes,
    }


def _task_vector(
    name: str, base: TensorReader, expert: TensorReader, blocks: list[tuple[int, int] | None]
) -> torch.Tensor:
    """One expert's whole task vector for `name`, flat, assembled block by block (so only
    it and one block of each input are in memory)."""
    tau = torch.empty(base.info(name).numel, dtype=COMPUTE_DTYPE)
    pos = 0
    for rows in blocks:
        block = expert.read(name, rows).to(COMPUTE_DTYPE) - base.read(name, rows).to(COMPUTE_DTYPE)
        tau[pos : pos + block.numel()] = block.reshape(-1)
        pos += block.numel()
    return tau


def _write_support_files(
    spec: MergeSpec, base: ResolvedModel, inputs: list[dict[str, Any]], staging: Path
) -> None:
    copy_support_files(base.root, staging, dtype=spec.output.dtype)
    weight_files = file_manifest(staging)
    card = render_model_card(
        spec=spec.model_dump(mode="json"),
        inputs=inputs,
        method=spec.method.name,
        params=spec.method.params.model_dump(mode="json"),
        files=weight_files,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
