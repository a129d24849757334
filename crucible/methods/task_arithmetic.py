"""Task Arithmetic (Ilharco et al., ICLR 2023): W0 + scale * sum_t w_t tau_t.

Per-tensor semantics follow mergekit 0.1.5 `task_arithmetic` (a generalized task arithmetic
method with no sparsification and no sign consensus). This module also holds the helpers the
other task-vector methods (ties, dare_linear, dare_ties) share: the weighted combination.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context

if TYPE_CHECKING:
    import torch

# mergekit treats a weight sum below this as zero and then does not divide (no consensus).
WEIGHT_SUM_EPS = 1e-8


class Params(MethodParams):
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "lambda in W0 + lambda * sum_t w_t tau_t. Default 1.0 as mergekit's `lambda`; "
            "FusionBench's default is 0.3 (merge-math.md section 1), usually grid-searched "
            "over [0, 1]."
        ),
    )
    normalize: bool = Field(
        default=False,
        description=(
            "Divide the weighted sum of task vectors by the sum of expert weights (skipped "
            "when that sum is below 1e-8 in magnitude). Default false as mergekit's "
            "task_arithmetic."
        ),
    )


def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    scale: float,
    normalize: bool,
) -> torch.Tensor:
    """W0 + scale * (sum_t w_t delta_t) [/ sum_t w_t], in base's dtype, out of place.

    The order of operations (weight, sum, divide, scale, add the base) is mergekit's, so
    float32 results agree to rounding.
    """
    mixed = deltas[0] * weights[0]
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        mixed.add_(delta, alpha=weight)  # `mixed` is ours: accumulate in place
    if normalize:
        divisor = math.fsum(weights)
        if abs(divisor) >= WEIGHT_SUM_EPS:
            mixed.div_(divisor)
    if scale != 1:
        mixed.mul_(scale)
    return base + mixed


def coefficients(p: Params, weights: list[float]) -> list[float]:
    """c_t in W0 + sum_t c_t tau_t, as `combine` applies them."""
    divisor = math.fsum(weights)
    norm = divisor if p.normalize and abs(divisor) >= WEIGHT_SUM_EPS else 1.0
    return [p.scale * w / norm for w in weights]


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    return combine(ctx.base, ctx.task_vectors(), ctx.weights, scale=p.scale, normalize=p.normalize)


METHOD = MethodInfo(
    name="task_arithmetic",
    summary=(
        "Task Arithmetic: add the weighted sum of task vectors (expert - base), times "
        "`scale`, to the base. Acts on every tensor."
    ),
    params=Params,
    merge=merge,
    elementwise=True,
    delta_coefficients=coefficients,
)
