"""What every evaluator shares: the result type, the protocol the tuner sees, and loading the
base's config and tokenizer (never remote code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from crucible.evaluate.swap import WeightSwapper

Split = Literal["validation", "test"]
SPLITS: tuple[Split, ...] = ("validation", "test")
Metric = Literal["accuracy", "loss", "perplexity"]


@dataclass(frozen=True)
class EvalResult:
    objective: float  # higher is better: accuracy, or -loss (same ordering as -log ppl)
    metric: str
    value: float  # the aggregate in the metric's own units
    per_task: dict[str, float]  # task name -> value in the metric's units
    examples: int
    seconds: float


class Evaluator(Protocol):
    """Built once from the base; the tuner swaps merged weights in and scores a split."""

    @property
    def swapper(self) -> WeightSwapper: ...

    @property
    def metric(self) -> str: ...

    def evaluate(self, split: Split) -> EvalResult: ...

    def examples(self, split: Split) -> int: ...


def check_metric(metric: str, allowed: tuple[str, ...], data: str) -> None:
    """A metric the evaluator's kind of data supports, or `dataset_mismatch` naming them."""
    if metric not in allowed:
        raise CrucibleError(
            "dataset_mismatch",
            f"metric {metric!r} does not apply to {data} data; use {' or '.join(allowed)}",
            {"metric": metric},
        )


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def load_config(root: Path, what: str) -> Any:
    """transformers' config of a model folder; remote code is never run."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CrucibleError(
            "incompatible_models",
            f"cannot build the {what} for evaluation from its config.json: {exc}",
            {"model": what},
        ) from exc


def load_tokenizer(root: Path) -> Any:
    """The base's tokenizer, with a padding token (batches are padded)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CrucibleError(
            "no_tokenizer",
            f"the base model has no usable tokenizer for evaluation: {exc}",
            {"root": str(root)},
        ) from exc
    if tokenizer.pad_token is None:
        # Causal LMs often ship without one; padded positions are masked out anyway.
        if tokenizer.eos_token is None:
            raise CrucibleError(
                "no_tokenizer",
                "the base's tokenizer has neither a padding nor an end-of-sequence token",
                {"root": str(root)},
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
