"""The merge stage for `output.format: lora`: LoRA adapters in, one LoRA adapter out.

Every method runs in delta space: the base reads as zeros and each adapter as its task
vector (ΔW = scaling · B A on the modules it targets, full - base on its modules_to_save,
zero elsewhere). Methods are functions of the task vectors, W0 + g(tau_1..tau_T) (tests
check this for every method), so g's output is the merged ΔW itself, in the method's own
precision, with no W0 to cancel. Each targeted module's merged ΔW is then factored by a
truncated SVD (crucible.lowrank) into B (d_out x r) and A (r x d_in) with lora_alpha = r.

Methods that are a fixed linear combination of the task vectors (linear,
task_arithmetic: `delta_coefficients`) never form d_out x d_in: the SVD of
sum_t c_t s_t B_t A_t comes from QR of the stacked factors and an SVD of the R x R core.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.engine import (
    COMPUTE_DTYPE,
    FLOAT_CODES,
    OUTPUT_CODES,
    MergeInputs,
    ParamsFor,
    ProgressSink,
    merge_blocks,
    merge_matrix,
    open_readers,
)
from crucible.lowrank import (
    Spectrum,
    balanced_factors,
    choose_rank,
    dense_spectrum,
    lowrank_spectrum,
    truncation_error,
)
from crucible.methods.registry import get_method
from crucible.publish.adapter import AdapterWriter
from crucible.report import MergeReport
from crucible.sources.adapter import AdapterPlan, LoraDelta
from crucible.sources.layout import transposed_weights
from crucible.sources.safetensors_header import TensorInfo
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import MergeSpec


class _DeltaView:
    """A reader of one input's task vectors: ΔW for an adapter's module, full - base for
    its modules_to_save, zeros elsewhere; the base's view (`base=None`) is all zeros."""

    def __init__(self, base: TensorReader, reader: TensorReader | None) -> None:
        self._base = base
        self._reader = reader
        self.model = reader.model if reader is not None else base.model

    def info(self, name: str) -> TensorInfo:
        return self._base.info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        shape = self._base.info(name).shape
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        if self._reader is None:
            return torch.zeros(shape, dtype=torch.float64)
        delta = self._reader.delta(name, rows)
        if delta is not None:
            return delta
        plan = self._reader.model.adapter
        if plan is not None and name in plan.full:
            full = self._reader.read(name, rows).to(torch.float64)
            return full - self._base.read(name, rows).to(torch.float64)
        return torch.zeros(shape, dtype=torch.float64)


class _Collect:
    """A writer that keeps one tensor of `shape`; blocks of rows fill it in place."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.tensor: torch.Tensor | None = None

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        if self.tensor is None:
            if tuple(tensor.shape) == tuple(self.shape):
                self.tensor = tensor.clone()
                return
            self.tensor = torch.empty(self.shape, dtype=tensor.dtype)
        self.tensor[first_row : first_row + tensor.shape[0]] = tensor


@dataclass
class _Module:
    name: str  # base tensor name
    lora: LoraDelta  # the first adapter's: naming and layout of the output
    experts: list[int]  # the adapters that factor this module


def merge_to_adapter(
    spec: MergeSpec,
    inputs: MergeInputs,
    staging: Path,
    reporter: ProgressSink,
    device: torch.device,
    lowrank: bool = True,
) -> tuple[dict[str, Any], MergeReport]:
    """Merge LoRA adapters into one adapter under `staging`; (metrics, report).
    `lowrank=False` forces the dense path (the benchmark and tests compare the two)."""
    base = inputs.base
    plans: list[AdapterPlan] = [e.adapter for e in inputs.experts if e.adapter is not None]
    if len(plans) != len(inputs.experts):
        raise ValueError("merge_to_adapter needs every expert to be a LoRA adapter")
    method = get_method(spec.method.name)
    weights = [ref.weight for ref in spec.experts]
    file_order = {f: i for i, f in enumerate(base.weight_files)}
    order = {n: (file_order[base.tensors[n].file], base.tensors[n].start) for n in base.tensors}
    modules = _modules(plans, order)
    full_names = sorted({n for p in plans for n in p.full}, key=order.__getitem__)
    names = sorted(base.tensors, key=order.__getitem__)
    params_for = ParamsFor(spec, method, names)
    transposed = transposed_weights(base.root, names) if method.matrix else frozenset()
    out_dtype = (
        FLOAT_CODES[OUTPUT_CODES[spec.output.dtype]]
        if spec.output.dtype
        else (_adapter_dtype(plans))
    )
    writer = AdapterWriter(staging, out_dtype)
    report = MergeReport(method.name, str(device))
    report.note("output_format", "lora")
    ranks: dict[str, int] = {}
    errors: list[float] = []
    paths = {"lowrank": 0, "dense": 0}
    total = len(modules) + len(full_names)
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            base_reader, readers, gram_readers = open_readers(stack, inputs)
            zero = _DeltaView(base_reader, None)
            views = [_DeltaView(base_reader, r) for r in readers]

            def merged_delta(name: str) -> tuple[torch.Tensor, dict[str, Any]]:
                collect = _Collect(tuple(base.tensors[name].shape))
                params = params_for(name)
                if method.matrix:
                    diagnostics = merge_matrix(
                        name, method, params, zero, views, gram_readers, weights,
                        name in transposed, device, torch.float64, collect,
                    )  # fmt: skip
                else:
                    merge_blocks(
                        name, method, params, zero, views, weights, device, COMPUTE_DTYPE,
                        collect,
                    )  # fmt: skip
                    diagnostics = {}
                assert collect.tensor is not None
                return collect.tensor, diagnostics

            reporter.progress(0, total, "tensors")
            for done, module in enumerate(modules, start=1):
                reporter.check_cancelled()
                t0 = time.perf_counter()
                spectrum, diagnostics, path = _module_spectrum(
                    module, method, params_for, weights, readers, lowrank, merged_delta, device
                )
                paths[path] += 1
                rank = choose_rank(
                    spectrum.s,
                    spec.output.lora_rank,
                    spec.output.lora_energy,
                    min(base.tensors[module.name].shape),
                )
                error = truncation_error(spectrum.s, rank)
                b, a = balanced_factors(spectrum, rank)
                writer.add_factors(module.lora.module, b, a, module.lora.embedding)
                ranks[module.lora.module] = rank
                errors.append(error)
                report.add_module(
                    module.name,
                    {
                        **diagnostics,
                        "lora_rank": rank,
                        "lora_error": error,
                        "lora_path": path,
                        "adapters": len(module.experts),
                        "seconds": round(time.perf_counter() - t0, 4),
                    },
                )
                reporter.progress(done, total, "tensors")
            for done, name in enumerate(full_names, start=len(modules) + 1):
                delta, _ = merged_delta(name)
                full = base_reader.read(name).to(torch.float64) + delta.to(torch.float64)
                writer.add_full(name, full)
                reporter.progress(done, total, "tensors")
        config = _adapter_config(plans, ranks, spec)
        writer.close(config)
    except BaseException:
        writer.abort()
        raise
    summary = {
        "rank": spec.output.lora_rank,
        "max_rank": max(ranks.values(), default=0),
        "modules": len(modules),
        "modules_to_save": len(full_names),
        "error_max": max(errors, default=0.0),
        "error_mean": sum(errors) / len(errors) if errors else 0.0,
        "lowrank_modules": paths["lowrank"],
        "dense_modules": paths["dense"],
    }
    report.note("lora", summary)
    metrics = {
        "tensors": total,
        "merged_tensors": total,
        "merge_seconds": round(time.perf_counter() - started, 3),
        "input_bytes": sum(f.stat().st_size for m in inputs.experts for f in m.weight_files),
        "device": str(device),
        "lora": summary,
    }
    return metrics, report


def _modules(plans: list[AdapterPlan], order: dict[str, tuple[int, int]]) -> list[_Module]:
    found: dict[str, _Module] = {}
    for index, plan in enumerate(plans):
        for name, lora in plan.deltas.items():
            if name in found:
                found[name].experts.append(index)
            else:
                found[name] = _Module(name=name, lora=lora, experts=[index])
    return sorted(found.values(), key=lambda m: order[m.name])


def _module_spectrum(
    module: _Module,
    method: Any,
    params_for: ParamsFor,
    weights: list[float],
    readers: list[TensorReader],
    lowrank: bool,
    merged_delta: Callable[[str], tuple[torch.Tensor, dict[str, Any]]],
    device: torch.device,
) -> tuple[Spectrum, dict[str, Any], str]:
    """The merged ΔW's SVD in the module's nn.Linear layout (B A), and which path made it."""
    loras = [readers[i].model.adapter.deltas[module.name] for i in module.experts]  # type: ignore[union-attr]
    full_too = any(
        module.name in (r.model.adapter.full if r.model.adapter else {}) for r in readers
    )
    same_layout = all(lora.transposed == module.lora.transposed for lora in loras)
    if lowrank and method.delta_coefficients is not None and same_layout and not full_too:
        coefs = method.delta_coefficients(params_for(module.name), weights)
        bs, as_, cs = [], [], []
        for i, lora in zip(module.experts, loras, strict=True):
            b, a = readers[i].lora_factors(lora, torch.float64)
            bs.append(b.to(device))
            as_.append(a.to(device))
            cs.append(coefs[i] * lora.scaling)
        return lowrank_spectrum(bs, as_, cs), {}, "lowrank"
    delta, diagnostics = merged_delta(module.name)
    delta = delta.to(device=device, dtype=torch.float64)
    if module.lora.transposed:  # the base holds (B A)^T
        delta = delta.T
    return dense_spectrum(delta), diagnostics, "dense"


def _adapter_dtype(plans: list[AdapterPlan]) -> torch.dtype:
    for plan in plans:
        for lora in plan.deltas.values():
            dtype = FLOAT_CODES.get(lora.a.dtype)
            if dtype is not None and dtype != torch.float64:
                return dtype
    return torch.float32


def _adapter_config(
    plans: list[AdapterPlan], ranks: dict[str, int], spec: MergeSpec
) -> dict[str, Any]:
    """PEFT's LoraConfig for the output: scaling 1 on every module (lora_alpha = r)."""
    rank = max(ranks.values(), default=1)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    lists = [p.target_modules for p in plans]
    plain = all(isinstance(t, list) for t in lists) and not any(
        p.config.get("layers_to_transform") or p.config.get("exclude_modules") for p in plans
    )
    targets = sorted({t for ts in lists for t in ts}) if plain else sorted(ranks)
    task_types = {p.config.get("task_type") for p in plans}
    saved = sorted({m for p in plans for m in (p.config.get("modules_to_save") or [])})
    named_base = (
        spec.base.uri.removeprefix("hf://")
        if spec.base.uri.startswith("hf://")
        else (plans[0].config.get("base_model_name_or_path"))
    )
    return {
        "peft_type": "LORA",
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "base_model_name_or_path": named_base,
        "revision": None,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "fan_in_fan_out": any(p.fan_in_fan_out for p in plans),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
