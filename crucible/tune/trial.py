"""One tuning trial: merge every factorized module at the trial's values, swap the merged
tensors into the evaluator, score the validation split.

The one code path for a trial, whether the job's worker runs it (crucible.tune.stage) or
another worker does for it (crucible.tune.trials): a trial's objective is then the same
to the last bit wherever it ran (it feeds the GP, so a last-bit difference would change
every later proposal).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from crucible.engine import check_finite
from crucible.stats.cache import worker_record
from crucible.tune.factorized import FactorizedModule
from crucible.tune.space import GroupValues

if TYPE_CHECKING:
    from crucible.evaluate.base import Evaluator


@dataclass
class TrialResult:
    objective: float
    metric: str
    value: float
    per_task: dict[str, float]
    seconds: dict[str, float]  # merge, swap, evaluate, total
    worker: dict[str, Any]  # the process that ran it (host, pid, worker_pid)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def run_trial(
    modules: list[FactorizedModule],
    group_of: Mapping[str, str],
    evaluator: Evaluator,
    values: GroupValues,
) -> TrialResult:
    """Score one point: `values` per group, `group_of` each module's group."""
    t0 = time.perf_counter()
    tensors = {m.name: merged_tensor(m, values[group_of[m.name]]) for m in modules}
    t1 = time.perf_counter()
    evaluator.swapper.swap(tensors)
    del tensors
    t2 = time.perf_counter()
    result = evaluator.evaluate("validation")
    t3 = time.perf_counter()
    return TrialResult(
        objective=result.objective,
        metric=result.metric,
        value=result.value,
        per_task=result.per_task,
        seconds={"merge": t1 - t0, "swap": t2 - t1, "evaluate": t3 - t2, "total": t3 - t0},
        worker=worker_record(),
    )


def merged_tensor(module: FactorizedModule, values: dict[str, float]) -> torch.Tensor:
    """One trial's tensor in file layout, rounded to the output dtype (so a trial scores
    the weights the merge stage would publish), on the CPU for the swap."""
    merged = module.merged(values)
    check_finite(module.name, merged)
    return merged.to(device="cpu")
