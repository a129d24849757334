"""DARE + task arithmetic (Yu et al., ICML 2024; mergekit 0.1.5 `dare_linear`).

Each task vector is randomly sparsified, then combined as in task_arithmetic:
tau_t <- m_t * tau_t / density with m_t ~ Bernoulli(density) i.i.d. per entry
(merge-math.md section 3), then W = W0 + scale * sum_t w_t tau_t [/ sum_t w_t].

Rescaling divides by `density` (the paper and FusionBench), which keeps the expectation of
every entry unchanged. mergekit 0.1.5 instead rescales each pruned tensor to the L1 norm of
the unpruned one; that differs in value (and is not unbiased), so DARE is not compared with
mergekit, only with the formula.

Masks: one torch.Generator per (tensor, expert), seeded by tensor_seed(seed, name, index),
drawn on the CPU in float32 whatever the tensor's device or dtype, so a mask depends only on
(seed, tensor name, expert index, shape, density): not on the order tensors are merged in,
the global RNG, the device or the working dtype.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, tensor_seed
from crucible.methods.task_arithmetic import check_context, combine

if TYPE_CHECKING:
    import torch

DENSITY_DESCRIPTION = (
    "Keep probability 1 - p of each task-vector entry (p = DARE drop rate); 1 keeps all. "
    "Default 0.5: FusionBench's sparsity_ratio 0.5 (merge-math.md section 3); LLM SFT deltas "
    "often use 0.1; mergekit defaults to 1 (no drop)."
)
RESCALE_DESCRIPTION = (
    "Divide kept entries by density so each entry keeps its expectation (the DARE paper, "
    "FusionBench). Default true. Note mergekit 0.1.5 rescales to the L1 norm instead."
)
SEED_DESCRIPTION = (
    "Seed of the drop masks. Masks are drawn per (tensor, expert) from "
    "tensor_seed(seed, tensor name, expert index): reruns are identical, and tensor order "
    "does not matter."
)


class Params(MethodParams):
    density: float = Field(
        default=0.5, gt=0, le=1, allow_inf_nan=False, description=DENSITY_DESCRIPTION
    )
    rescale: bool = Field(default=True, description=RESCALE_DESCRIPTION)
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description=SEED_DESCRIPTION)
    normalize: bool = Field(
        default=False,
        description=(
            "Divide the weighted sum by the sum of expert weights (skipped when it is below "
            "1e-8 in magnitude). Default false as mergekit's dare_linear."
        ),
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "lambda in W = W0 + lambda * merged. Default 1.0 as mergekit's `lambda`; "
            "FusionBench's DareTaskArithmetic uses 0.3 (merge-math.md section 3)."
        ),
    )


def dare_mask(
    shape: torch.Size | tuple[int, ...], density: float, seed: int, name: str, expert_index: int
) -> torch.Tensor:
    """The keep mask (bool, on the CPU) of one (tensor, expert): True with probability density."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(tensor_seed(seed, name, expert_index))
    # float32 uniforms on the CPU: the same mask for float32 and float64 inputs, on any device.
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density


def dare_drop(
    tau: torch.Tensor, density: float, rescale: bool, seed: int, name: str, expert_index: int
) -> torch.Tensor:
    """m * tau (/ density): returns `tau` itself when density >= 1 (nothing dropped)."""
    import torch

    if density >= 1:
        return tau
    keep = dare_mask(tau.shape, density, seed, name, expert_index).to(tau.device)
    kept = tau / density if rescale else tau
    return torch.where(keep, kept, 0.0)


def dare_task_vectors(
    ctx: TensorContext, density: float, rescale: bool, seed: int
) -> list[torch.Tensor]:
    return [
        dare_drop(tau, density, rescale, seed, ctx.name, index)
        for index, tau in enumerate(ctx.task_vectors())
    ]


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    deltas = dare_task_vectors(ctx, p.density, p.rescale, p.seed)
    return combine(ctx.base, deltas, ctx.weights, scale=p.scale, normalize=p.normalize)


METHOD = MethodInfo(
    name="dare_linear",
    summary=(
        "DARE + task arithmetic: randomly drop task-vector entries (keep probability "
        "`density`, rescaled by 1/density), then add the weighted sum to the base."
    ),
    params=Params,
    merge=merge,
)
