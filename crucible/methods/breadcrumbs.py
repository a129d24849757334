"""Model Breadcrumbs (Davari & Belilovsky, 2023): drop each task vector's largest-magnitude
outliers and its smallest entries, then task arithmetic.

Per-tensor semantics follow mergekit 0.1.5 `breadcrumbs` (sparsification
`magnitude_outliers`, no sign consensus; merge-math.md section 4):

1. Sparsify, per tensor and per expert, with N = numel:
   n = int(density * N) entries survive (int() truncates; n may be 0, and then nothing
   survives: unlike TIES there is no "at least one"), n_top = int(gamma * N) outliers are
   removed, n_bot = max(0, N - n - n_top) small entries are removed; when n + n_top > N
   the outlier removal shrinks to n_top = N - n. Ranked by |tau_t| from the largest, the
   entries of ranks n_top .. n_top + n - 1 survive, the others become 0. density >= 1
   keeps the task vector whole, whatever gamma (mergekit returns it before removing
   outliers).
   Ties: magnitudes are ranked largest first and, among equal magnitudes, lower flat index
   first, so exactly n entries survive (mergekit's sort breaks such ties arbitrarily; with
   real weights they do not occur at the cuts). This is two TIES magnitude cuts per tensor
   and expert (ties.py): keep the top n_top + n, then remove the top n_top.
2. Combine as task_arithmetic: W = W0 + scale * sum_t w_t delta_t [/ sum_t w_t with
   `normalize`, skipped when that sum is below 1e-8 in magnitude].

mergekit's optional rescale of the sparsified task vector to its original L1 norm
(`rescale`, default off) is not offered. mergekit ranks CPU tensors by their float32
magnitudes; Crucible ranks in the working dtype (float32 in the pipeline, so the same).

Blockwise: both cuts are computed once per whole task vector (`tensor_stats`) and applied
to blocks of rows in order, exactly as TIES's cut.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context
from crucible.methods.task_arithmetic import combine
from crucible.methods.ties import MagnitudeCut, cut_keeping, keep_mask

if TYPE_CHECKING:
    import torch

DENSITY_DESCRIPTION = (
    "Fraction of each task vector that survives, per tensor: n = int(density * numel) "
    "entries (0 when that truncates to 0) just below the removed outliers by magnitude; 1 "
    "keeps the whole task vector and ignores gamma (as mergekit). Default 0.1: the low end "
    "of the paper's typical 0.1-0.15 (merge-math.md section 4, unconfirmed); mergekit's "
    "default 1 disables the method."
)
GAMMA_DESCRIPTION = (
    "Fraction of each task vector removed as largest-magnitude outliers, per tensor: "
    "n_top = int(gamma * numel), shrunk to numel - n when density + gamma leaves no room. "
    "Default 0.01 as mergekit."
)
SCALE_DESCRIPTION = "lambda in W = W0 + lambda * merged. Default 1.0 as mergekit's `lambda`."


class Params(MethodParams):
    density: float = Field(
        default=0.1, gt=0, le=1, allow_inf_nan=False, description=DENSITY_DESCRIPTION
    )
    gamma: float = Field(
        default=0.01, ge=0, le=1, allow_inf_nan=False, description=GAMMA_DESCRIPTION
    )
    normalize: bool = Field(
        default=False,
        description=(
            "Divide the weighted sum of sparsified task vectors by the sum of expert weights "
            "(skipped when that sum is below 1e-8 in magnitude). Default false as mergekit's "
            "breadcrumbs."
        ),
    )
    scale: float = Field(default=1.0, allow_inf_nan=False, description=SCALE_DESCRIPTION)


@dataclass
class OutlierCut:
    """Where one task vector is sparsified: `kept` = n entries survive, those inside the top
    n_top + n by magnitude (`outer`; None: all entries) and outside the top n_top (`inner`,
    removed; None: none). Both cuts spend their room as blocks of rows go by in order."""

    kept: int
    outer: MagnitudeCut | None
    inner: MagnitudeCut | None


def outlier_cut(mag: torch.Tensor, density: float, gamma: float) -> OutlierCut | None:
    """The cuts of a flat tensor of magnitudes (|tau|); None keeps everything."""
    numel = mag.numel()
    if density >= 1:
        return None
    kept = int(density * numel)  # int() truncates as mergekit's does
    n_top = int(gamma * numel)
    n_bot = max(0, numel - kept - n_top)
    n_top = numel - n_bot - kept  # shrinks n_top when kept + n_top > numel
    if kept == 0:
        return OutlierCut(0, None, None)
    inner = cut_keeping(mag, n_top) if n_top > 0 else None
    return OutlierCut(kept, cut_keeping(mag, n_top + kept), inner)


def apply_outlier_cut(tau: torch.Tensor, cut: OutlierCut | None) -> torch.Tensor:
    """Sparsify `tau` (a whole tensor, or the next block of rows) at `cut`; never modifies
    it, and returns it itself when nothing is removed."""
    import torch

    if cut is None:
        return tau
    if cut.kept == 0:
        return torch.zeros_like(tau)
    keep = keep_mask(tau, cut.outer) if cut.outer is not None else None
    if cut.inner is not None:
        outliers = keep_mask(tau, cut.inner)
        keep = ~outliers if keep is None else keep.logical_and_(outliers.logical_not_())
    if keep is None:
        return tau
    return torch.where(keep, tau, 0.0)


def outlier_trim(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Step 1 of the module docstring on one whole tensor."""
    return apply_outlier_cut(tau, outlier_cut(tau.abs().reshape(-1), density, gamma))


def sparsified_task_vectors(ctx: TensorContext, density: float, gamma: float) -> list[torch.Tensor]:
    """Each expert's task vector after step 1. Blockwise, the pipeline computed each whole
    task vector's cuts (tensor_stats) and hands blocks of rows in order; otherwise the
    tensor is whole and cut here."""
    taus = ctx.task_vectors()
    cuts = ctx.extra.get("stats") or [
        outlier_cut(tau.abs().reshape(-1), density, gamma) for tau in taus
    ]
    return [apply_outlier_cut(tau, cut) for tau, cut in zip(taus, cuts, strict=True)]


def outlier_stats(tau: torch.Tensor, density: float, gamma: float) -> OutlierCut | None:
    """The whole-tensor statistic per expert: its two cuts. The pipeline hands over a fresh
    flat task vector, so |tau| is taken in place."""
    return outlier_cut(tau.abs_().reshape(-1), density, gamma)


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    deltas = sparsified_task_vectors(ctx, p.density, p.gamma)
    return combine(ctx.base, deltas, ctx.weights, scale=p.scale, normalize=p.normalize)


def tensor_stats(tau: torch.Tensor, p: Params) -> OutlierCut | None:
    return outlier_stats(tau, p.density, p.gamma)


METHOD = MethodInfo(
    name="breadcrumbs",
    summary=(
        "Model Breadcrumbs: per tensor, drop each task vector's largest `gamma` fraction "
        "(outliers) and its smallest entries so that a `density` fraction survives, then add "
        "the weighted sum to the base (task arithmetic)."
    ),
    params=Params,
    merge=merge,
    tensor_stats=tensor_stats,
)
