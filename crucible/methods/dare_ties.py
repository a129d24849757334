"""DARE + TIES sign election (Yu et al., ICML 2024; mergekit 0.1.5 `dare_ties`).

Each task vector is randomly sparsified exactly as in dare_linear (same masks for the same
seed, tensor and expert), then merged with TIES's sign election and disjoint merge (see
ties.py), without TIES's magnitude trim: in mergekit the random drop replaces it.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from crucible.methods import dare_linear, ties
from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    density: float = Field(
        default=0.5, gt=0, le=1, allow_inf_nan=False, description=dare_linear.DENSITY_DESCRIPTION
    )
    rescale: bool = Field(default=True, description=dare_linear.RESCALE_DESCRIPTION)
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description=dare_linear.SEED_DESCRIPTION)
    majority_sign: ties.MajoritySign = Field(
        default="total", description=ties.MAJORITY_SIGN_DESCRIPTION
    )
    normalize: bool = Field(
        default=False,
        description=ties.NORMALIZE_DESCRIPTION
        + "Default false as mergekit's dare_ties (a plain sum of the agreeing deltas).",
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "lambda in W = W0 + lambda * merged. Default 1.0 as mergekit's `lambda`; "
            "FusionBench's DareTiesMerging uses 0.5 (merge-math.md section 3)."
        ),
    )


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    deltas = dare_linear.dare_task_vectors(ctx, p.density, p.rescale, p.seed)
    return ties.elect_and_merge(
        ctx.base,
        deltas,
        ctx.weights,
        majority_sign=p.majority_sign,
        normalize=p.normalize,
        scale=p.scale,
    )


METHOD = MethodInfo(
    name="dare_ties",
    summary=(
        "DARE + TIES: randomly drop task-vector entries (keep probability `density`, "
        "rescaled by 1/density), then elect a sign per coordinate and merge the agreeing "
        "entries."
    ),
    params=Params,
    merge=merge,
    elementwise=True,
    prepare=dare_linear.prepare_masks,
)
