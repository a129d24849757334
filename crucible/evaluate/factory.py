"""The evaluator a tuning spec asks for, built from the base, the experts and their datasets.

- One dataset id with classification data: every expert's head is scored on it (one task
  per expert, named by the expert).
- {expert name: dataset id}: each named expert is scored on its own dataset (classification:
  its head on its data; language modelling: the merged model on that expert's data).
- One dataset id with language-modelling data: one task, named by the dataset id.

Each dataset is split with its own deterministic split (stratified by label for
classification); validation rows score trials, test rows the held-out result. Per task and
split at most `max_samples` rows are kept: a seeded random subset, so a file sorted by label
still gives every label its share.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from crucible.errors import CrucibleError
from crucible.evaluate.base import Evaluator

if TYPE_CHECKING:
    import torch

    from crucible.datasets.storage import DatasetHandle
    from crucible.sources.resolve import ResolvedModel
    from crucible.spec import TuningSpec

_LM_SCHEMAS = ("text", "prompt_completion")
Rows = list[dict[str, Any]]


def build_evaluator(
    tuning: TuningSpec,
    base: ResolvedModel,
    experts: Sequence[ResolvedModel],
    expert_names: Sequence[str | None],
    datasets: Mapping[str, DatasetHandle],
    device: torch.device | str,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
) -> Evaluator:
    """A ClassificationEvaluator or a LanguageModelEvaluator, chosen by the data's schema."""
    import torch

    from crucible.evaluate.classification import ClassificationEvaluator, ClassificationTask
    from crucible.evaluate.language_model import LanguageModelEvaluator, LanguageModelTask

    if len(experts) != len(expert_names):
        raise ValueError(f"{len(experts)} experts but {len(expert_names)} names")
    names = [n or f"expert_{i}" for i, n in enumerate(expert_names)]
    # (task name, expert index or None, dataset handle)
    assignments: list[tuple[str, int | None, DatasetHandle]] = []
    if isinstance(tuning.dataset, str):
        handle = _handle(datasets, tuning.dataset)
        if handle.schema == "classification":
            assignments = [(name, i, handle) for i, name in enumerate(names)]
        else:
            assignments = [(handle.id, None, handle)]
    else:
        unknown = sorted(set(tuning.dataset) - set(names))
        if unknown:
            raise CrucibleError(
                "invalid_spec",
                f"tuning.dataset names experts {unknown} that are not among {names}",
                {"unknown": unknown},
            )
        assignments = [
            (name, i, _handle(datasets, tuning.dataset[name]))
            for i, name in enumerate(names)
            if name in tuning.dataset
        ]
    schemas = {h.schema for _, _, h in assignments}
    if len(schemas) > 1 and "classification" in schemas:
        raise CrucibleError(
            "dataset_mismatch",
            "tuning datasets mix classification and language-modelling data: "
            + ", ".join(f"{h.id} is {h.schema}" for _, _, h in assignments),
            {"schemas": {h.id: h.schema for _, _, h in assignments}},
        )
    classification = schemas == {"classification"}
    metric = tuning.metric or ("accuracy" if classification else "loss")

    cache: dict[str, tuple[Rows, Rows]] = {}
    for _, _, handle in assignments:
        if handle.id not in cache:
            cache[handle.id] = _split_rows(handle, tuning)
    common: dict[str, Any] = {
        "metric": metric,
        "tokenizer": tokenizer,
        "device": device,
        "dtype": dtype or torch.float32,
        "max_length": tuning.max_length,
        "batch_size": tuning.batch_size,
    }
    if classification:
        tasks = [
            ClassificationTask(
                name=name,
                expert=experts[i],
                validation=cache[h.id][0],
                test=cache[h.id][1],
            )
            for name, i, h in assignments
            if i is not None
        ]
        return ClassificationEvaluator(base, tasks, **common)
    lm_tasks = [
        LanguageModelTask(
            name=name, schema=h.schema, validation=cache[h.id][0], test=cache[h.id][1]
        )
        for name, _, h in assignments
    ]
    return LanguageModelEvaluator(base, lm_tasks, **common)


def _handle(datasets: Mapping[str, DatasetHandle], dataset_id: str) -> DatasetHandle:
    handle = datasets.get(dataset_id)
    if handle is None:
        raise CrucibleError(
            "dataset_not_found", f"dataset {dataset_id} was not found", {"dataset": dataset_id}
        )
    if handle.schema != "classification" and handle.schema not in _LM_SCHEMAS:
        raise CrucibleError(
            "dataset_mismatch",
            f"dataset {dataset_id} has schema {handle.schema!r}, which cannot be evaluated",
            {"dataset": dataset_id},
        )
    return handle


def _split_rows(handle: DatasetHandle, tuning: TuningSpec) -> tuple[Rows, Rows]:
    """(validation rows, test rows), each at most max_samples, in file order."""
    validation, test = handle.split(tuning.split)
    rng = random.Random(tuning.split.seed)
    keep = [_cap(validation, tuning.max_samples, rng), _cap(test, tuning.max_samples, rng)]
    wanted = set(keep[0]) | set(keep[1])
    picked: dict[int, dict[str, Any]] = {}
    for index, row in enumerate(handle.iter_rows()):
        if index in wanted:
            picked[index] = row
    return [picked[i] for i in keep[0]], [picked[i] for i in keep[1]]


def _cap(indices: Sequence[int], cap: int, rng: random.Random) -> list[int]:
    if len(indices) <= cap:
        return sorted(indices)
    return sorted(rng.sample(list(indices), cap))
