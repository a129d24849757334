"""Sequence classification: the (merged) backbone under each expert's own head.

One backbone is built from the base's config and loaded with the base's weights; every task
gets a `*ForSequenceClassification` model built from its expert's config whose backbone
attribute is that one shared module, so a swap of merged weights reaches every task at once.
Each head is read from the expert's files: the tensors only the expert has (align_names'
expert_only). Those that live inside the backbone (a pooler the base lacks) are the task's
own and are copied in before the task runs; the merge never touches them.

Batches are tokenized once per split at construction and kept on the device, so a trial
costs forward passes only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from crucible.errors import CrucibleError
from crucible.evaluate.base import (
    SPLITS,
    EvalResult,
    Split,
    check_metric,
    check_split,
    load_config,
    load_tokenizer,
)
from crucible.evaluate.batches import Batch, iter_batches
from crucible.evaluate.swap import WeightSwapper
from crucible.sources.align import align_names
from crucible.sources.resolve import ResolvedModel
from crucible.sources.tensor_reader import TensorReader

Row = Mapping[str, Any]


@dataclass
class ClassificationTask:
    """One expert's task: its head is scored on these rows (each {text, label})."""

    name: str
    expert: ResolvedModel
    validation: Sequence[Row]
    test: Sequence[Row] = ()


@dataclass
class _Task:
    name: str
    expert: ResolvedModel
    model: torch.nn.Module
    # backbone state-dict key -> this task's own value (expert-only tensors in the backbone)
    owned: dict[str, torch.Tensor]
    batches: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)


class ClassificationEvaluator:
    metric: str

    def __init__(
        self,
        base: ResolvedModel,
        tasks: Sequence[ClassificationTask],
        *,
        metric: str = "accuracy",
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoModel

        check_metric(metric, ("accuracy", "loss"), "classification")
        if not tasks:
            raise ValueError("ClassificationEvaluator needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {names}")
        self.metric = metric
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base.root)

        backbone = AutoModel.from_config(load_config(base.root, "base model"))
        self.backbone = backbone.to(device=self.device, dtype=dtype).eval()
        self.swapper = WeightSwapper(self.backbone, list(base.tensors))
        self.swapper.load_from(base)
        self._live = self.backbone.state_dict(keep_vars=True)
        self._tasks = [self._build_task(base, t) for t in tasks]
        for task, spec in zip(self._tasks, tasks, strict=True):
            labels = _label_indices(task.model.config, spec)
            identity = {i: i for i in range(int(task.model.config.num_labels))}
            for split, rows in (("validation", spec.validation), ("test", spec.test)):
                with_index = [
                    {"text": r["text"], "label": i}
                    for r, i in zip(rows, labels[split], strict=True)
                ]
                task.batches[split] = [
                    {k: v.to(self.device) for k, v in _batch_tensors(b).items()}
                    for b in iter_batches(
                        with_index,
                        self.tokenizer,
                        "classification",
                        max_length=max_length,
                        batch_size=batch_size,
                        label_to_index=identity,
                    )
                ]
                task.examples[split] = len(rows)
            if task.examples["validation"] == 0:
                raise CrucibleError(
                    "dataset_too_small",
                    f"task {task.name!r} has no validation rows: the dataset is too small "
                    "for its split",
                    {"task": task.name},
                )
        self._expert_scores: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------------ public

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self._tasks]

    def examples(self, split: Split) -> int:
        split = check_split(split)
        return sum(t.examples[split] for t in self._tasks)

    def evaluate(self, split: Split) -> EvalResult:
        """Every task's head on the current (merged) backbone; accuracy is the mean over
        tasks of each task's accuracy."""
        split = check_split(split)
        start = time.perf_counter()
        per_task: dict[str, float] = {}
        for task in self._tasks:
            per_task[task.name] = self._score(task, split)
        value = sum(per_task.values()) / len(per_task)
        return EvalResult(
            objective=value if self.metric == "accuracy" else -value,
            metric=self.metric,
            value=value,
            per_task=per_task,
            examples=self.examples(split),
            seconds=time.perf_counter() - start,
        )

    def expert_scores(self, split: Split) -> dict[str, float]:
        """Each expert's own full model on its own task (its backbone weights swapped in,
        then the backbone restored): the reference for normalised accuracy."""
        split = check_split(split)
        if split not in self._expert_scores:
            saved = self.swapper.snapshot()
            scores: dict[str, float] = {}
            try:
                for task in self._tasks:
                    to_expert = align_names(self.swapper.names, task.expert.tensors).to_expert
                    self.swapper.load_from(task.expert, [n for n in saved if n in to_expert])
                    scores[task.name] = self._score(task, split)
                    self.swapper.swap(saved)
            finally:
                self.swapper.swap(saved)
            self._expert_scores[split] = scores
        return dict(self._expert_scores[split])

    # ------------------------------------------------------------------------ building

    def _build_task(self, base: ResolvedModel, spec: ClassificationTask) -> _Task:
        from transformers import AutoModelForSequenceClassification

        expert = spec.expert
        config = load_config(expert.root, f"expert {spec.name!r}")
        # On the meta device: the model's own backbone is thrown away at once, and its head
        # is assigned from the expert's files, so nothing is worth allocating.
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        prefix = model.base_model_prefix
        own_backbone = getattr(model, prefix, None)
        if not isinstance(own_backbone, torch.nn.Module):
            raise CrucibleError(
                "incompatible_models",
                f"{type(model).__name__} has no backbone attribute {prefix!r}",
                {"task": spec.name},
            )
        if type(own_backbone) is not type(self.backbone):
            raise CrucibleError(
                "incompatible_models",
                f"expert {spec.name!r} is a {type(own_backbone).__name__} classifier but the "
                f"base builds a {type(self.backbone).__name__}",
                {"task": spec.name},
            )
        model_keys = list(model.state_dict(keep_vars=True))
        inside = prefix + "."
        needed_backbone = [k[len(inside) :] for k in model_keys if k.startswith(inside)]
        head_keys = [k for k in model_keys if not k.startswith(inside)]

        # The expert's tensors the base lacks, under the names the classifier model uses.
        expert_only = align_names(base.tensors, expert.tensors).expert_only
        # Only the expert-only names are lined up with the classifier's keys: the pipeline
        # may hand over an expert already renamed to the base's names, while its head keeps
        # the names it was saved with (those of this very class).
        to_model = align_names(expert_only, model_keys).to_expert
        with TensorReader(expert) as reader:
            loaded = {
                to_model[n]: self._placed(reader.read(n)) for n in expert_only if n in to_model
            }
        missing_head = [k for k in head_keys if k not in loaded]
        if missing_head:
            raise CrucibleError(
                "incompatible_models",
                f"expert {spec.name!r} has no classification head tensor {missing_head[0]!r} "
                "of its own (saved without its head?)",
                {"task": spec.name, "missing": missing_head},
            )
        owned = {k[len(inside) :]: v for k, v in loaded.items() if k.startswith(inside)}
        # A tensor the base's files fill is merged: the task never overrides it.
        covered = set(self._live) - set(self.swapper.uncovered)
        owned = {k: v for k, v in owned.items() if k in self._live and k not in covered}
        unfilled = [k for k in needed_backbone if k not in covered and k not in owned]
        if unfilled:
            raise CrucibleError(
                "incompatible_models",
                f"neither the base nor expert {spec.name!r} has {unfilled[0]!r}, which the "
                "expert's classifier uses",
                {"task": spec.name, "missing": unfilled[:20]},
            )
        for key, value in owned.items():
            if value.shape != self._live[key].shape:
                raise CrucibleError(
                    "incompatible_models",
                    f"expert {spec.name!r} holds {key!r} with shape {tuple(value.shape)}, the "
                    f"base's architecture {tuple(self._live[key].shape)}",
                    {"task": spec.name, "tensor": key},
                )

        setattr(model, prefix, self.backbone)
        head = {k: v for k, v in loaded.items() if not k.startswith(inside)}
        shapes = {k: t.shape for k, t in model.state_dict(keep_vars=True).items()}
        for key, value in head.items():
            expected = shapes[key]
            if value.shape != expected:
                raise CrucibleError(
                    "incompatible_models",
                    f"expert {spec.name!r}: head tensor {key!r} has shape {tuple(value.shape)}, "
                    f"its config gives {tuple(expected)}",
                    {"task": spec.name, "tensor": key},
                )
        model.load_state_dict(head, strict=False, assign=True)
        on_meta = [
            n
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.device.type == "meta"
        ]
        if on_meta:
            raise CrucibleError(
                "incompatible_models",
                f"expert {spec.name!r}: the classifier's {on_meta[0]!r} is not in its files",
                {"task": spec.name, "missing": on_meta[:20]},
            )
        return _Task(name=spec.name, expert=expert, model=model.eval(), owned=owned)

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        # Integer buffers keep their dtype; weights take the evaluator's.
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)

    # ------------------------------------------------------------------------ scoring

    def _score(self, task: _Task, split: str) -> float:
        """The task's metric on a split with whatever weights the backbone holds now."""
        if task.examples[split] == 0:
            raise CrucibleError(
                "dataset_too_small",
                f"task {task.name!r} has no {split} rows: the dataset is too small for its "
                "split (or the split gives it no share)",
                {"task": task.name, "split": split},
            )
        if task.owned:
            with torch.no_grad():
                for key, value in task.owned.items():
                    self._live[key].copy_(value)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.inference_mode():
            for batch in task.batches[split]:
                logits = task.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                labels = batch["labels"]
                correct += (logits.argmax(dim=-1) == labels).sum()
                loss += torch.nn.functional.cross_entropy(logits.double(), labels, reduction="sum")
        n = task.examples[split]
        if self.metric == "accuracy":
            return int(correct.item()) / n
        value = float(loss.item()) / n
        if not math.isfinite(value):
            raise CrucibleError(
                "non_finite", f"task {task.name!r}: the loss is not finite", {"task": task.name}
            )
        return value


def _label_indices(config: Any, spec: ClassificationTask) -> dict[str, list[int]]:
    """Dataset labels -> the expert head's indices: strings through the expert config's
    label2id, integers as they are (below num_labels)."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    num_labels = int(config.num_labels)
    out: dict[str, list[int]] = {}
    for split in SPLITS:
        indices: list[int] = []
        for row in getattr(spec, split):
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int | str):
                raise CrucibleError(
                    "dataset_mismatch",
                    f"task {spec.name!r}: label {label!r} is neither a string nor an integer",
                    {"task": spec.name, "label": repr(label)},
                )
            if isinstance(label, str):
                if label not in label2id:
                    raise CrucibleError(
                        "dataset_mismatch",
                        f"task {spec.name!r}: the dataset's label {label!r} is not one of "
                        f"expert {spec.name!r}'s labels {sorted(label2id)}",
                        {"task": spec.name, "label": label, "expert_labels": sorted(label2id)},
                    )
                index = label2id[label]
            else:
                index = label
            if not 0 <= index < num_labels:
                raise CrucibleError(
                    "dataset_mismatch",
                    f"task {spec.name!r}: label {label!r} is outside expert {spec.name!r}'s "
                    f"{num_labels} classes (0..{num_labels - 1})",
                    {"task": spec.name, "label": label, "num_labels": num_labels},
                )
            indices.append(index)
        out[split] = indices
    return out


def _batch_tensors(batch: Batch) -> dict[str, torch.Tensor]:
    assert batch.labels is not None  # label_to_index is always given
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
    }
