"""Model Breadcrumbs + TIES sign election (mergekit 0.1.5 `breadcrumbs_ties`).

Per tensor:

1. Sparsify each task vector exactly as breadcrumbs.py (step 1 there): per tensor and
   expert, n = int(density * numel) entries survive, those of magnitude ranks
   n_top .. n_top + n - 1 from the largest, n_top = int(gamma * numel) shrunk to
   numel - n when needed; density >= 1 keeps the task vector whole. Magnitude ties go to
   the lower flat index, so exactly n survive.
2. Elect and merge as TIES (ties.py steps 2-5): delta_t = w_t * sparsified_t; gamma_sign =
   + where sum_t delta_t >= 0 ("total", mergekit's consensus 'sum', the only one its YAML
   offers) or where #positive >= #negative ("count"); sum the agreeing delta_t, with
   `normalize` divide by the agreeing experts' weight sum (0 counts as 1);
   W = W0 + scale * merged.

Blockwise: as breadcrumbs, both cuts per whole task vector come from `tensor_stats`.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from crucible.methods import breadcrumbs, ties
from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    density: float = Field(
        default=0.1,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description=breadcrumbs.DENSITY_DESCRIPTION,
    )
    gamma: float = Field(
        default=0.01, ge=0, le=1, allow_inf_nan=False, description=breadcrumbs.GAMMA_DESCRIPTION
    )
    majority_sign: ties.MajoritySign = Field(
        default="total", description=ties.MAJORITY_SIGN_DESCRIPTION
    )
    normalize: bool = Field(
        default=False,
        description=ties.NORMALIZE_DESCRIPTION
        + "Default false as mergekit's breadcrumbs_ties (a plain sum of the agreeing deltas).",
    )
    scale: float = Field(
        default=1.0, allow_inf_nan=False, description=breadcrumbs.SCALE_DESCRIPTION
    )


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    deltas = breadcrumbs.sparsified_task_vectors(ctx, p.density, p.gamma)
    return ties.elect_and_merge(
        ctx.base,
        deltas,
        ctx.weights,
        majority_sign=p.majority_sign,
        normalize=p.normalize,
        scale=p.scale,
    )


def tensor_stats(tau: torch.Tensor, p: Params) -> breadcrumbs.OutlierCut | None:
    return breadcrumbs.outlier_stats(tau, p.density, p.gamma)


METHOD = MethodInfo(
    name="breadcrumbs_ties",
    summary=(
        "Model Breadcrumbs + TIES: per tensor, drop each task vector's largest `gamma` "
        "fraction and its smallest entries so that a `density` fraction survives, then "
        "elect a sign per coordinate and merge the agreeing entries."
    ),
    params=Params,
    merge=merge,
    tensor_stats=tensor_stats,
)
