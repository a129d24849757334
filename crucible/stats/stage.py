"""The statistics stage: every expert's Gram folder, computed (or found in the cache) for the
merge stage.

Per expert, in spec order:
- `grams` named in the spec: resolved like any model (crucible.sources.resolve).
- a `dataset`: activation Grams of the expert over the first `statistics.max_samples` rows
  of the dataset (file order), keyed in the Gram cache (crucible.stats.cache) by the
  expert, the dataset, the sample and length caps and the module set. A hit does no
  forward pass and does not load the model's weights; a miss loads the expert with
  transformers (the architecture its config.json names, never remote code; its
  safetensors; float32 on the compute device) and its tokenizer (the base's when the
  expert has none), collects the Grams group by group within `gram_memory_bytes`, and
  writes the entry.

Progress is reported in examples: the examples of every expert with a dataset, times the
passes over the data its Grams need (one unless they exceed the memory budget); a cache hit
counts its examples as done at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crucible.artifacts import artifact_store
from crucible.errors import CrucibleError
from crucible.sources.align import align_names
from crucible.sources.resolve import ResolvedModel, open_artifact_folder, resolve_model
from crucible.stats.cache import GramCache, cache_key, key_inputs, model_fingerprint
from crucible.stats.data_free import Estimator

if TYPE_CHECKING:
    import torch

    from crucible.datasets.storage import DatasetHandle
    from crucible.evaluate.batches import Batch
    from crucible.settings import Settings
    from crucible.spec import ExpertRef, MergeSpec

ESTIMATOR: Estimator = "activations"


class StatsReporter(Protocol):
    """What this stage needs of the pipeline's Reporter."""

    def progress(self, done: int, total: int, unit: str) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...
    def check_cancelled(self) -> None: ...


@dataclass
class ExpertStats:
    """One expert whose Grams come from its dataset."""

    index: int
    label: str
    expert: ResolvedModel
    base: ResolvedModel
    handle: DatasetHandle
    modules: dict[str, str]  # module path -> base name
    groups: list[dict[str, str]]
    key: str
    inputs: dict[str, Any]
    tokenizer_root: Path
    examples: int  # rows used: min(max_samples, the dataset's rows)
    batch_size: int


def compute_statistics(
    spec: MergeSpec,
    base: ResolvedModel,
    experts: list[ResolvedModel],
    datasets: Mapping[str, DatasetHandle],
    settings: Settings,
    reporter: StatsReporter,
    device: torch.device,
    hub_token: str | None = None,
) -> list[ResolvedModel] | None:
    """One Gram folder per expert (spec order), or None when the method needs no Grams.

    `hub_token`: the job's Hub token, for Gram folders in private hf:// repos."""
    if not spec.needs_grams():
        return None
    cache = GramCache(settings.artifacts_root, artifact_store(settings))
    folders: list[ResolvedModel | None] = [None] * len(spec.experts)
    for i, ref in enumerate(spec.experts):
        if ref.grams is not None:
            reporter.check_cancelled()
            folders[i] = resolve_model(
                ref.grams, settings, on_event=reporter.event, token=hub_token
            )
    jobs = plan_statistics(spec, base, experts, datasets, settings, reporter.check_cancelled)

    # Planned work: a cached expert's examples count once, a computed one's once per pass.
    total = sum(job.examples * (1 if cache.lookup(job.key) else len(job.groups)) for job in jobs)
    done = 0
    reporter.progress(0, total, "examples")
    for job in jobs:
        reporter.check_cancelled()
        folder = cache.lookup(job.key)
        if folder is not None:
            reporter.event(
                "statistics",
                f"statistics: cache hit for expert {job.label}",
                {"expert": job.index, "key": job.key, "examples": job.examples},
            )
            done += job.examples
            reporter.progress(done, total, "examples")
        else:

            def report(examples: int, start: int = done) -> None:
                reporter.progress(start + examples, total, "examples")

            folder = collect_expert(job, cache, reporter, device, report)
            done += job.examples * len(job.groups)
        folders[job.index] = open_artifact_folder(folder)
    if jobs:
        reporter.progress(total, total, "examples")
    assert all(f is not None for f in folders)
    return [f for f in folders if f is not None]


def plan_statistics(
    spec: MergeSpec,
    base: ResolvedModel,
    experts: list[ResolvedModel],
    datasets: Mapping[str, DatasetHandle],
    settings: Settings,
    check_cancelled: Callable[[], None],
    only: int | None = None,
) -> list[ExpertStats]:
    """The experts whose Grams come from a dataset (spec order), each with its module
    groups and cache key; no weights are loaded. Experts with `grams` are left out, and
    with `only`, every expert but that one (a scale-out task plans its own expert)."""
    jobs: list[ExpertStats] = []
    for i, (ref, expert) in enumerate(zip(spec.experts, experts, strict=True)):
        check_cancelled()
        if ref.grams is not None or (only is not None and i != only):
            continue
        if ref.dataset is not None:
            handle = datasets.get(ref.dataset)
            if handle is None:
                raise CrucibleError(
                    "dataset_not_found",
                    f"dataset {ref.dataset!r} of expert {_label(ref, i)} does not exist",
                    {"dataset": ref.dataset, "expert": i},
                )
            jobs.append(_plan(i, ref, base, expert, handle, spec, settings))
        else:  # MergeSpec refuses this; a guard for callers that build specs by hand
            raise CrucibleError(
                "invalid_spec",
                f"expert {_label(ref, i)} names neither a dataset nor a grams folder",
                {"expert": i},
            )
    return jobs


def _label(ref: ExpertRef, index: int) -> str:
    return repr(ref.name) if ref.name else f"experts[{index}] ({ref.uri})"


# ----------------------------------------------------------------------------- planning


def _plan(
    index: int,
    ref: ExpertRef,
    base: ResolvedModel,
    expert: ResolvedModel,
    handle: DatasetHandle,
    spec: MergeSpec,
    settings: Settings,
) -> ExpertStats:
    """The expert's module set, passes and cache key, from a weightless (meta) model."""
    from crucible.stats.activations import linear_modules, module_input_dims, plan_groups

    label = _label(ref, index)
    if handle.schema not in ("classification", "text", "prompt_completion"):
        raise CrucibleError(
            "bad_dataset",
            f"dataset {handle.id!r} of expert {label} has schema {handle.schema!r}, which has "
            "no text to run the model on",
            {"dataset": handle.id, "schema": handle.schema},
        )
    # A LoRA adapter runs as the base's architecture with its ΔW added.
    skeleton = _skeleton(base if expert.adapter else expert, label)
    alignment = align_names(base.tensors, expert.tensors)
    modules = linear_modules(skeleton, expert.tensors, alignment)
    if not modules:
        raise CrucibleError(
            "unsupported_model",
            f"expert {label} has no linear modules whose weights the base shares, so there "
            "is nothing to collect Grams for",
            {"expert": index, "model_type": skeleton.config.model_type},
        )
    groups = plan_groups(modules, module_input_dims(skeleton, modules), settings.gram_memory_bytes)
    del skeleton
    tokenizer_root = _tokenizer_root(expert, base)
    stats = spec.statistics
    inputs = key_inputs(
        model=model_fingerprint(expert),
        # An expert without tokenizer files reads the data with the base's tokenizer.
        tokenizer=None if tokenizer_root == expert.root else model_fingerprint(base),
        # An adapter's activations depend on the base it is added to.
        base=model_fingerprint(base) if expert.adapter else None,
        dataset=handle.sha256,
        max_samples=stats.max_samples,
        max_length=stats.max_length,
        modules=modules.values(),
        estimator=ESTIMATOR,
    )
    return ExpertStats(
        index=index,
        label=label,
        expert=expert,
        base=base,
        handle=handle,
        modules=modules,
        groups=groups,
        key=cache_key(inputs),
        inputs=inputs,
        tokenizer_root=tokenizer_root,
        examples=min(stats.max_samples, max(handle.rows, 0)),
        batch_size=stats.batch_size,
    )


def _architecture(config: Any) -> type:
    """The model class config.json names, if transformers has it; else AutoModel's."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    from transformers import AutoModel

    return AutoModel


def _config(expert: ResolvedModel, label: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(expert.root, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unsupported(expert, label, exc) from exc


def _unsupported(expert: ResolvedModel, label: str, exc: BaseException) -> CrucibleError:
    model_type = _model_type(expert.root)
    return CrucibleError(
        "unsupported_model",
        f"transformers cannot load expert {label} (model_type {model_type!r}) to compute "
        f"its Grams: {exc}",
        {"model_type": model_type},
    )


def _skeleton(expert: ResolvedModel, label: str) -> torch.nn.Module:
    """The expert's architecture without weights (meta device): its modules and shapes."""
    import torch

    config = _config(expert, label)
    cls = _architecture(config)
    try:
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                return cls._from_config(config)
            return cls.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise _unsupported(expert, label, exc) from exc


def _load(expert: ResolvedModel, label: str) -> tuple[torch.nn.Module, list[str]]:
    """The expert in float32 from its safetensors, and the weights its files lacked."""
    import torch

    config = _config(expert, label)
    cls = _architecture(config)
    try:
        model, info = cls.from_pretrained(
            expert.root,
            config=config,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise _unsupported(expert, label, exc) from exc
    return model, sorted(info.get("missing_keys") or ())


def _load_expert(job: ExpertStats) -> tuple[torch.nn.Module, list[str]]:
    """The expert's model; a LoRA adapter's is the base with every tensor the adapter
    changes (W0 + ΔW, its modules_to_save) copied in place."""
    expert = job.expert
    if expert.adapter is None:
        return _load(expert, job.label)
    from crucible.evaluate.swap import WeightSwapper

    model, missing = _load(job.base, job.label)
    changed = [*expert.adapter.deltas, *expert.adapter.full]
    WeightSwapper(model, list(job.base.tensors)).load_from(expert, changed)
    return model, missing


def _model_type(root: Path) -> str | None:
    try:
        value = json.loads((root / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _tokenizer_root(expert: ResolvedModel, base: ResolvedModel) -> Path:
    """The expert's folder when it has tokenizer files, else the base's."""
    for root in (expert.root, base.root):
        if any((root / f).is_file() for f in _TOKENIZER_FILES):
            return root
    raise CrucibleError(
        "no_tokenizer",
        f"neither the expert ({expert.uri}) nor the base ({base.uri}) has tokenizer files, "
        "which the statistics stage needs to read the dataset",
        {"expert": expert.uri, "base": base.uri},
    )


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def _load_tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CrucibleError(
            "no_tokenizer", f"cannot load the tokenizer in {root}: {exc}", {"root": str(root)}
        ) from exc


# ----------------------------------------------------------------------------- collecting


def _rows(handle: DatasetHandle, limit: int) -> list[dict[str, Any]]:
    from crucible.datasets.formats import iter_rows

    rows = list(islice(iter_rows(handle.path, handle.format), limit))
    if not rows:
        raise CrucibleError(
            "bad_dataset", f"dataset {handle.id!r} has no rows", {"dataset": handle.id}
        )
    return rows


def collect_expert(
    job: ExpertStats,
    cache: GramCache,
    reporter: StatsReporter,
    device: torch.device,
    report: Callable[[int], None],
) -> Path:
    from crucible.evaluate.batches import iter_batches
    from crucible.stats.activations import collect_activation_grams

    rows = _rows(job.handle, job.inputs["max_samples"])
    tokenizer = _load_tokenizer(job.tokenizer_root)

    def batches() -> Iterator[Batch]:
        return iter_batches(
            rows,
            tokenizer,
            job.handle.schema,
            max_length=job.inputs["max_length"],
            batch_size=job.batch_size,
        )

    try:  # every row is checked before the model loads
        tokens = sum(b.tokens for b in batches())
    except CrucibleError as exc:
        if exc.code != "bad_dataset":
            raise
        raise CrucibleError(
            "bad_dataset",
            f"dataset {job.handle.id!r} of expert {job.label}: {exc.message}",
            {**(exc.detail or {}), "dataset": job.handle.id},
        ) from exc
    model, missing = _load_expert(job)
    model.to(device)
    if missing:
        # The architecture is the one config.json names, so this should not happen; the
        # Grams downstream of a freshly initialised weight would not be the expert's.
        reporter.event(
            "statistics",
            f"statistics: {len(missing)} weights of expert {job.label} are not in its files "
            f"and were initialised at random: {', '.join(missing[:10])}",
            {"expert": job.index, "missing": missing[:50]},
        )
    started = time.perf_counter()
    with cache.writer(job.key, job.inputs, len(job.groups)) as entry:
        for g, group in enumerate(job.groups):
            offset = g * len(rows)
            grams = collect_activation_grams(
                model,
                batches(),
                group,
                device=device,
                progress=lambda n, offset=offset: report(offset + n),
                check_cancelled=reporter.check_cancelled,
            )
            entry.write_group(grams)
        if not entry.weight_map:
            raise CrucibleError(
                "bad_dataset",
                f"no module of expert {job.label} received any input on dataset {job.handle.id!r}",
                {"expert": job.index, "dataset": job.handle.id},
            )
        unused = sorted(set(job.modules.values()) - set(entry.weight_map))
        folder = entry.commit(
            {
                "examples": len(rows),
                "tokens": tokens,
                "passes": len(job.groups),
                "grams": len(entry.weight_map),
                "unused_modules": unused,
                "missing_weights": missing,
                "forward_seconds": round(time.perf_counter() - started, 3),
                "device": str(device),
            }
        )
    del model
    reporter.event(
        "statistics",
        f"statistics: expert {job.label}: Grams of {len(entry.weight_map)} modules from "
        f"{len(rows)} examples ({tokens} tokens) in {len(job.groups)} pass(es)",
        {"expert": job.index, "key": job.key, "examples": len(rows), "tokens": tokens},
    )
    return folder


# ----------------------------------------------------------------------------- data-free


def task_vector_statistics(
    base: ResolvedModel,
    expert: ResolvedModel,
    settings: Settings,
    *,
    device: torch.device | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> ResolvedModel:
    """The expert's data-free Gram folder (tau^T tau / ||tau||_F^2 per matrix tensor, base
    names; crucible.stats.data_free), from the cache or written into it."""
    from crucible.stats.data_free import gram_tensor_names, write_task_vector_grams

    names = gram_tensor_names(base)
    inputs = key_inputs(
        model=model_fingerprint(expert),
        base=model_fingerprint(base),
        dataset=None,
        max_samples=None,
        max_length=None,
        modules=names,
        estimator="task_vector",
    )
    cache = GramCache(settings.artifacts_root, artifact_store(settings))
    key = cache_key(inputs)
    folder = cache.lookup(key)
    if folder is None:
        with cache.writer(key, inputs, shards=0) as entry:
            written = write_task_vector_grams(
                base, expert, entry.folder, names=names, device=device,
                check_cancelled=check_cancelled,
            )  # fmt: skip
            folder = entry.commit({"grams": len(written)})
    return open_artifact_folder(folder)
