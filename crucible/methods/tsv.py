"""TSV-M, Task Singular Vectors Merge (Gargiulo et al., CVPR 2025; merge-math.md section 6).

Per matrix tensor (2-D and not `text_projection`, `base.is_matrix`), with the weighted task
vectors tau_t = w_t (W_t - W0), t = 1..T (expert weights act as FusionBench's per-task
alphas, applied before the SVD):

    r = min(d_out, d_in),  k = floor(r / T)
    tau_t = U_t diag(s_t) V_t^T                              (thin SVD)
    U = [U_1[:, :k] ... U_T[:, :k]]   (d_out x Tk)
    s = [s_1[:k]   ... s_T[:k]]       (Tk)
    V = [V_1[:, :k] ... V_T[:, :k]]   (d_in x Tk)
    U_perp = polar(U),  V_perp = polar(V)                    (P Q^T of U = P S Q^T)
    W = W0 + alpha * U_perp diag(s) V_perp^T

With T = 1 (k = r) this reconstructs tau exactly. When r < T, k = 0 and the matrix keeps W0
(FusionBench does the same: its buffers stay zero); the diagnostics say so.

Every other tensor (biases, norms, 0-D/1-D/3-D/4-D, `text_projection`): the non-matrix rule
W0 + alpha * mean_t(w_t tau_t).

Semantics follow FusionBench 0.2.33 `TSVM_utils.compute_and_sum_svd_mem_reduction` with a
global alpha applied afterwards, which tests/test_methods_subspace.py checks. One known
difference: FusionBench computes k as int(r * (1 / T)), which is one less than floor(r / T)
for some r when T = 49 (float rounding of 1/49); Crucible uses the exact floor(r / T).
FusionBench places the Tk columns in an r-column buffer padded with zeros; the polar factor
of the padded matrix restricted to the first Tk columns equals the polar factor of U when U
has full column rank, so the results agree.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from crucible.methods.base import (
    MethodInfo,
    MethodParams,
    TensorContext,
    merge_matrix_or_mean,
)
from crucible.methods.linalg import numerical_rank, polar, thin_svd

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    alpha: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "Global scale: W = W0 + alpha * tau_merged, for matrix and non-matrix tensors "
            "alike. Default 1.0, FusionBench's and the paper's (merge-math.md section 6). "
            "Per-expert scales are the expert weights, applied to each task vector before "
            "the SVD (FusionBench's list-valued alpha)."
        ),
    )


def tsv_matrix(taus: list[torch.Tensor], diag: dict[str, Any]) -> torch.Tensor:
    """U_perp diag(s) V_perp^T from the top floor(r / T) singular triplets of each tau_t."""
    import torch

    n_tasks = len(taus)
    d_out, d_in = taus[0].shape
    k = min(d_out, d_in) // n_tasks
    diag.update(rank_per_task=k, rank=n_tasks * k)
    like = {"dtype": taus[0].dtype, "device": taus[0].device}
    if k == 0:
        diag["note"] = "min(d_out, d_in) < number of experts: no singular vectors kept, W0"
        return torch.zeros(d_out, d_in, **like)
    us, ss, vs = [], [], []
    for tau in taus:
        u_t, s_t, vh_t = thin_svd(tau)
        # A rank-deficient tau (a LoRA delta) keeps only its real directions: past its
        # numerical rank the singular vectors are arbitrary, and the polar factor below
        # would mix them into the others. Full-rank task vectors keep k, as FusionBench.
        k_t = min(k, numerical_rank(s_t, tuple(tau.shape)))
        us.append(u_t[:, :k_t])
        ss.append(s_t[:k_t])
        vs.append(vh_t[:k_t].T)
        del u_t, s_t, vh_t
    kept = sum(int(x.numel()) for x in ss)
    if kept < n_tasks * k:
        diag["rank"] = kept
    if kept == 0:
        return torch.zeros(d_out, d_in, **like)
    u, s, v = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    del us, vs
    u_perp, v_perp = polar(u), polar(v)  # decorrelate the concatenated bases
    return (u_perp * s) @ v_perp.T


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    return merge_matrix_or_mean(ctx, p.alpha, tsv_matrix)


METHOD = MethodInfo(
    name="tsv",
    summary=(
        "TSV-M (Task Singular Vectors Merge): keep each task vector's top min(d_out, d_in)/T "
        "singular vectors, decorrelate the concatenated bases (polar factor) and rebuild; "
        "non-matrix tensors take the mean task vector. W0 + alpha * result."
    ),
    params=Params,
    merge=merge,
    matrix=True,
)
