"""ISO-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, "No task left
behind"; merge-math.md section 7).

Per matrix tensor (2-D and not `text_projection`), with the weighted task vectors
tau_t = w_t (W_t - W0) (expert weights act as per-task scales applied first):

    M = sum_t tau_t = U diag(sigma) V^T              (thin SVD, r = min(d_out, d_in))
    sigma_bar = (1 / r) sum_i sigma_i
    W = W0 + alpha * sigma_bar U V^T                 (every singular value -> their mean)

Every other tensor (biases, norms, 0-D/1-D/3-D/4-D, `text_projection`): the non-matrix rule
W0 + alpha * mean_t(w_t tau_t).

Semantics follow FusionBench 0.2.33 `iso_utils.iso_c` with its IsotropicMerging's scaling
factor applied afterwards (tests/test_methods_subspace.py checks them). FusionBench forms M as
(sum_t tau_t / T) * T, the same sum up to rounding.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, merge_matrix_or_mean
from crucible.methods.linalg import numerical_rank, thin_svd

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    alpha: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "Global scale: W = W0 + alpha * tau_merged, for matrix and non-matrix tensors "
            "alike. Default 1.0, FusionBench's config default (its documentation's ViT "
            "examples use 1.5; the paper picks alpha on validation data; merge-math.md "
            "section 7)."
        ),
    )


def sum_svd(taus: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U, sigma, V^T of M = sum_t tau_t (ISO-C, and ISO-CTS's common space)."""
    total = taus[0].clone()
    for tau in taus[1:]:
        total.add_(tau)
    return thin_svd(total)


def iso_c_matrix(taus: list[torch.Tensor], diag: dict[str, Any]) -> torch.Tensor:
    """sigma_bar U V^T of M = sum_t tau_t."""
    import torch

    u, sigma, vh = sum_svd(taus)
    # Flatten over the non-zero directions only (merge-math.md section 11): for a
    # rank-deficient sum (LoRA deltas) the rest are an arbitrary null-space basis that a
    # flat spectrum would inflate. A full-rank sum keeps every direction, as FusionBench.
    n = numerical_rank(sigma, tuple(taus[0].shape))
    if n == 0:
        diag.update(rank=0, sigma_mean=0.0)
        return torch.zeros_like(taus[0])
    sigma_bar = sigma[:n].mean()
    diag.update(
        rank=n,
        sigma_mean=float(sigma_bar),
        sigma_max=float(sigma[0]),
        sigma_min=float(sigma[n - 1]),
    )
    return (u[:, :n] * sigma_bar) @ vh[:n]


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    return merge_matrix_or_mean(ctx, p.alpha, iso_c_matrix)


METHOD = MethodInfo(
    name="iso_c",
    summary=(
        "ISO-C: take the SVD of the summed task vectors and set every singular value to "
        "their mean (an isotropic spectrum); non-matrix tensors take the mean task vector. "
        "W0 + alpha * result."
    ),
    params=Params,
    merge=merge,
    matrix=True,
)
