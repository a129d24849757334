"""Linear merge (model soup): the weighted average of the experts' weights.

Per-tensor semantics follow mergekit 0.1.5 `linear`: sum_t w_t W_t, divided by sum_t w_t
when `normalize`. The base model is not an input of the average (as in mergekit, where only
the listed models are averaged).

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context
from crucible.methods.task_arithmetic import WEIGHT_SUM_EPS

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    normalize: bool = Field(
        default=True,
        description=(
            "Divide by the sum of expert weights, so weights are relative. Default true as "
            "mergekit's linear. With false the result is the plain weighted sum."
        ),
    )


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    import torch

    check_context(ctx)
    if p.normalize:
        divisor = math.fsum(ctx.weights)
        # mergekit would divide by zero here and write inf/NaN; an error says why instead.
        if abs(divisor) < WEIGHT_SUM_EPS:
            raise ValueError(
                f"{ctx.name}: linear with normalize=true needs expert weights whose sum is "
                f"not zero (got {divisor!r})"
            )
    dtype = ctx.base.dtype
    # Half types accumulate in float32 as mergekit does; float32/float64 stay as they are.
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    result = ctx.experts[0].to(work) * ctx.weights[0]  # out of place: inputs may be mmaps
    for expert, weight in zip(ctx.experts[1:], ctx.weights[1:], strict=True):
        result.add_(expert.to(work), alpha=weight)
    if p.normalize:
        result.div_(divisor)
    return result.to(dtype)


def coefficients(p: Params, weights: list[float]) -> list[float]:
    """c_t with sum_t w_t W_t / norm = W0 + sum_t c_t tau_t: exact when the weights are
    normalized (or sum to 1, which the spec requires of a LoRA output)."""
    divisor = math.fsum(weights) if p.normalize else 1.0
    return [w / divisor for w in weights]


METHOD = MethodInfo(
    name="linear",
    summary=(
        "Linear (model soup): the weighted average of the experts' weights; the base is not "
        "averaged in."
    ),
    params=Params,
    merge=merge,
    elementwise=True,
    delta_coefficients=coefficients,
    needs_base=False,
)
