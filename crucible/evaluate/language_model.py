"""Language modelling: mean token cross-entropy of the (merged) causal LM, and perplexity.

The model is built from the base's config (`AutoModelForCausalLM`) and loaded with the
base's weights. Tokens count where the batch's loss_mask says so (every real token of
{text}; only the completion of {prompt, completion}); as in any causal LM the logits at
position t predict token t + 1. The loss of a task is the mean over all its counted tokens
(not a mean of batch means); with several tasks the aggregate is the mean over tasks.
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
    EvalResult,
    Split,
    check_metric,
    check_split,
    load_config,
    load_tokenizer,
)
from crucible.evaluate.batches import Batch, iter_batches
from crucible.evaluate.swap import WeightSwapper
from crucible.sources.resolve import ResolvedModel

Row = Mapping[str, Any]


@dataclass
class LanguageModelTask:
    """Rows of one schema: "text" ({text}) or "prompt_completion" ({prompt, completion})."""

    name: str
    schema: str
    validation: Sequence[Row]
    test: Sequence[Row] = ()


@dataclass
class _Task:
    name: str
    batches: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)


class LanguageModelEvaluator:
    metric: str

    def __init__(
        self,
        base: ResolvedModel,
        tasks: Sequence[LanguageModelTask],
        *,
        metric: str = "loss",
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoModelForCausalLM

        check_metric(metric, ("loss", "perplexity"), "language-modelling")
        if not tasks:
            raise ValueError("LanguageModelEvaluator needs at least one task")
        self.metric = metric
        self.device = torch.device(device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base.root)

        model = AutoModelForCausalLM.from_config(load_config(base.root, "base model"))
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.swapper = WeightSwapper(self.model, list(base.tensors))
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        unfilled = [n for n in self.swapper.uncovered if n in params]
        if unfilled:
            raise CrucibleError(
                "incompatible_models",
                f"the base's files do not hold {unfilled[0]!r}, which its causal LM uses "
                "(saved without its LM head?)",
                {"missing": unfilled[:20]},
            )
        self.swapper.load_from(base)

        self._tasks: list[_Task] = []
        for spec in tasks:
            task = _Task(name=spec.name)
            for split, rows in (("validation", spec.validation), ("test", spec.test)):
                batches = [
                    {
                        "input_ids": b.input_ids.to(self.device),
                        "attention_mask": b.attention_mask.to(self.device),
                        "loss_mask": _loss_mask(b).to(self.device),
                    }
                    for b in iter_batches(
                        list(rows),
                        self.tokenizer,
                        spec.schema,
                        max_length=max_length,
                        batch_size=batch_size,
                    )
                ]
                task.batches[split] = batches
                # Counted tokens after the shift: the first position has nothing before it.
                task.tokens[split] = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)
                task.examples[split] = len(rows)
            if task.tokens["validation"] == 0:
                raise CrucibleError(
                    "dataset_too_small",
                    f"task {spec.name!r} has no validation tokens to score (no rows in the "
                    "split, or every completion truncated away)",
                    {"task": spec.name},
                )
            self._tasks.append(task)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self._tasks]

    def examples(self, split: Split) -> int:
        split = check_split(split)
        return sum(t.examples[split] for t in self._tasks)

    def evaluate(self, split: Split) -> EvalResult:
        split = check_split(split)
        start = time.perf_counter()
        losses = {task.name: self._loss(task, split) for task in self._tasks}
        loss = sum(losses.values()) / len(losses)
        if self.metric == "perplexity":
            per_task = {k: math.exp(v) for k, v in losses.items()}
            value = math.exp(loss)
        else:
            per_task, value = losses, loss
        return EvalResult(
            objective=-loss,
            metric=self.metric,
            value=value,
            per_task=per_task,
            examples=self.examples(split),
            seconds=time.perf_counter() - start,
        )

    def _loss(self, task: _Task, split: str) -> float:
        if task.tokens[split] == 0:
            raise CrucibleError(
                "dataset_too_small",
                f"task {task.name!r} has no {split} tokens to score",
                {"task": task.name, "split": split},
            )
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.inference_mode():
            for batch in task.batches[split]:
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                mask = batch["loss_mask"][:, 1:].bool()
                # Only the counted positions: the full-vocabulary log-softmax of the rest
                # would be wasted work.
                picked = logits[:, :-1][mask].float()
                targets = batch["input_ids"][:, 1:][mask]
                per_token = torch.nn.functional.cross_entropy(picked, targets, reduction="none")
                total += per_token.double().sum()
        value = float(total.item()) / task.tokens[split]
        if not math.isfinite(value):
            raise CrucibleError(
                "non_finite", f"task {task.name!r}: the loss is not finite", {"task": task.name}
            )
        return value


def _loss_mask(batch: Batch) -> torch.Tensor:
    assert batch.loss_mask is not None  # set for every language-modelling schema
    return batch.loss_mask
