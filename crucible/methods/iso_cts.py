"""ISO-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML
2025, "No task left behind"; merge-math.md section 7).

Per matrix tensor (2-D and not `text_projection`), with the weighted task vectors
tau_t = w_t (W_t - W0), t = 1..T, r = min(d_out, d_in) and f = common_space_fraction:

    k_c = floor(r f);  m = round((r - k_c) / T)   (round half to even, as FusionBench)
    k_c = r - T m                                  (r - k_c is a multiple of T)
    M = sum_t tau_t = U diag(sigma) V^T,  U_c = U[:, :k_c], sigma_c = sigma[:k_c],
                                          V_c = V[:, :k_c]
    R_t = tau_t - U_c U_c^T tau_t = U_t' diag(s_t') V_t'^T    (common left space removed)
    U = [U_1'[:, :m] ... U_T'[:, :m]  U_c]       (d_out x r)
    s = [s_1'[:m]   ... s_T'[:m]    sigma_c]      (r)
    V = [V_1'[:, :m] ... V_T'[:, :m]  V_c]       (d_in x r)
    W = W0 + alpha * mean(s) polar(U) polar(V)^T  (flat spectrum, r singular values)

When T m would exceed r (only for f near 0), m = floor(r / T) instead and k_c = r - T m,
so k_c never goes negative (FusionBench would slice with a negative index there). With
m = 0 (f rounds to the whole rank) ISO-CTS equals ISO-C.

Every other tensor (biases, norms, 0-D/1-D/3-D/4-D, `text_projection`): the non-matrix rule
W0 + alpha * mean_t(w_t tau_t).

Semantics follow FusionBench 0.2.33 `iso_utils.iso_cts` with its IsotropicMerging's scaling
factor applied afterwards (tests/test_methods_subspace.py checks them).

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, merge_matrix_or_mean
from crucible.methods.iso_c import sum_svd
from crucible.methods.linalg import numerical_rank, polar, thin_svd

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    common_space_fraction: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description=(
            "f: the fraction of the rank r = min(d_out, d_in) given to the common subspace "
            "(top singular vectors of the summed task vectors), before adjusting so that "
            "the task-specific remainder splits evenly over the experts. Default 0.8, the "
            "official config's and FusionBench's (merge-math.md section 7)."
        ),
    )
    alpha: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "Global scale: W = W0 + alpha * tau_merged, for matrix and non-matrix tensors "
            "alike. Default 1.0, FusionBench's config default (its documentation's ViT "
            "examples use 1.5; the paper picks alpha on validation data)."
        ),
    )


def split_rank(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, m): the common rank and the per-task rank, with k_c + n_tasks * m = r."""
    common = int(r * fraction)
    per_task = round((r - common) / n_tasks)
    if per_task * n_tasks > r:
        per_task = r // n_tasks
    return r - per_task * n_tasks, per_task


def iso_cts_matrix(
    taus: list[torch.Tensor], diag: dict[str, Any], *, fraction: float
) -> torch.Tensor:
    """mean(s) polar(U) polar(V)^T over the task-specific and common singular triplets."""
    import torch

    n_tasks = len(taus)
    d_out, d_in = taus[0].shape
    r = min(d_out, d_in)
    k_c, m = split_rank(r, n_tasks, fraction)
    diag.update(rank=r, common_rank=k_c, rank_per_task=m)
    u_all, sigma, vh_all = sum_svd(taus)
    # Rank-deficient inputs (LoRA deltas) keep only their real directions, in the common
    # and in each task-specific part: past the numerical rank the singular vectors are an
    # arbitrary null-space basis that the flat spectrum would inflate (merge-math.md
    # section 11). Full-rank inputs keep k_c and m, as FusionBench.
    n_c = min(k_c, numerical_rank(sigma, (d_out, d_in)))
    u_c = u_all[:, :n_c]
    us, ss, vs = [], [], []
    if m > 0:
        for tau in taus:
            u_t, s_t, vh_t = thin_svd(tau - u_c @ (u_c.T @ tau))
            # The residual is noise when tau lies in the common space: judge it by
            # tau's own scale (||tau||_F >= its largest singular value).
            m_t = min(m, numerical_rank(s_t, (d_out, d_in), float(torch.linalg.norm(tau))))
            us.append(u_t[:, :m_t])
            ss.append(s_t[:m_t])
            vs.append(vh_t[:m_t].T)
            del u_t, s_t, vh_t
    us.append(u_c)
    ss.append(sigma[:n_c])
    vs.append(vh_all[:n_c].T)
    del u_all, vh_all, u_c
    kept = sum(int(x.numel()) for x in ss)
    if kept < r:
        diag["kept_rank"] = kept
    if kept == 0:
        return torch.zeros(d_out, d_in, dtype=taus[0].dtype, device=taus[0].device)
    u, s, v = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    del us, vs
    u_perp, v_perp = polar(u), polar(v)
    s_mean = s.mean()
    diag["sigma_mean"] = float(s_mean)
    return (u_perp * s_mean) @ v_perp.T


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    return merge_matrix_or_mean(
        ctx,
        p.alpha,
        lambda taus, diag: iso_cts_matrix(taus, diag, fraction=p.common_space_fraction),
    )


METHOD = MethodInfo(
    name="iso_cts",
    summary=(
        "ISO-CTS: a common subspace (top singular vectors of the summed task vectors) plus "
        "each task's top directions outside it, orthogonalised, with an isotropic spectrum; "
        "non-matrix tensors take the mean task vector. W0 + alpha * result."
    ),
    params=Params,
    merge=merge,
    matrix=True,
)
