"""ACE-Merging (Xu et al., CVPR 2026; code github.com/unravel-xu/ACE-Merging): a data-free
closed-form merge that uses each task vector's rows as samples of its task's input
covariance (merge-math.md section 9), as the reference `ace_merging(eps, k_frac)` computes it.

Expert weights w_t scale the task vectors first (tau_t := w_t (W_t - W0), as FusionBench's
per-task alphas), so they also enter the energies below. Per matrix tensor (2-D, nn.Linear
layout d_out x d_in, not `text_projection`):

1. Heterogeneity: e_t = ||tau_t||_F^2, l_t = log(e_t + 1e-12),
   gamma = Var_t(l_t) / (Mean_t(l_t)^2 + 1e-12) with the unbiased variance over the T tasks;
   flag = gamma > gamma_threshold. With one expert the variance is undefined (NaN in the
   reference code, whose comparison is then false): gamma is recorded as None, flag false.
2. Centring: tau~_t = tau_t - 1 mu_t^T, mu_t the mean of tau_t's d_out rows (one value per
   input column); S_t = tau~_t^T tau~_t (d_in x d_in); tr_t = trace(S_t) + 1e-12.
3. Adaptive normalisation: flag: Sigma_t = S_t / tr_t, eps_t = eps / tr_t; otherwise
   Sigma_t = S_t, eps_t = eps. Sigma_t^reg = Sigma_t + eps_t I.
4. Structural prior: c = (1/d_in) 1^T sum_t Sigma_t (the column means of the un-ridged sum),
   C_agg = 1 c^T (c added to every row); if flag, C_agg is further divided by
   (mean_t e_t + 1e-12), as the reference code does (the paper describes C_agg from the
   scaled covariances only: a code-vs-paper difference; the code is followed).
5. Closed form: A = sum_t Sigma_t^reg + C_agg (not symmetric), B = sum_t tau~_t Sigma_t^reg
   (centred task vectors), tau_pre = B A^{-1}, solved by LU on the transposed system
   (crucible.methods.linalg.solve_right_general; least squares if A is singular).
6. Spectral refinement, only if flag: Sigma_bar = (1/T) sum_t Sigma_t^reg (with the ridge),
   Delta_res = sum_t tau_t (Sigma_t - Sigma_bar) (un-centred tau_t, un-ridged Sigma_t),
   U S V^T = svd(Delta_res + tau_pre), k = floor(k_frac * min(d_out, d_in)),
   sigma_iso = mean(S[:k]), tau = tau_pre + sigma_iso U[:, :k] V[:, :k]^T. When k is 0 the
   reference code would add NaN (the mean of no values); here the refinement is skipped and
   the diagnostics say so.
7. W = W0 + scale * tau.

Identical experts do not give W_t back: gamma = 0 (no flag), and with M = S + eps I the
result is W0 + scale * tau~ M (M + (1/d_in) 1 1^T S)^{-1}, independent of T: the centring
and the structural prior change it (merge-math.md section 12's "returns W_t" does not hold
for ACE).

Non-matrix tensors (biases, LayerNorm, conv kernels, `text_projection`) take the mean of
the weighted task vectors, W0 + scale * (1/T) sum_t w_t tau_t (section 0;
base.mean_of_task_vectors). ACE applies its procedure to 2-D embeddings too, as the code does.

Per-tensor diagnostics: gamma, flag, energies, eps, eps_t, k, sigma_iso and the solve's own
(solve path, cond).

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from crucible.methods.base import (
    MethodInfo,
    MethodParams,
    TensorContext,
    check_context,
    is_matrix,
    mean_of_task_vectors,
)
from crucible.methods.linalg import numerical_rank, solve_right_general, thin_svd
from crucible.stats.data_free import centred_covariance

if TYPE_CHECKING:
    import torch

# The reference code's guards against log(0) and division by zero.
TINY = 1e-12


class Params(MethodParams):
    eps: float = Field(
        default=1e-2,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Ridge eps added to each task's covariance: eps / tr_t when the module is "
            "flagged heterogeneous, the absolute eps otherwise (so it depends on the scale of "
            "the task vectors). Default 1e-2 as the reference code; the paper tunes it per "
            "family (GPT-2 4e-2, RoBERTa-base 2e-4, others 1e-5; merge-math.md section 9)."
        ),
    )
    gamma_threshold: float = Field(
        default=0.3,
        ge=0,
        allow_inf_nan=False,
        description=(
            "A module is flagged heterogeneous when gamma = Var(log e_t) / Mean(log e_t)^2 "
            "exceeds this; flagged modules get trace-normalised covariances and the spectral "
            "refinement. Default 0.3 (code and paper)."
        ),
    )
    k_frac: float = Field(
        default=0.3,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Spectral refinement rank as a fraction of min(d_out, d_in): "
            "k = floor(k_frac * min(d_out, d_in)); k = 0 skips the refinement. Default 0.3 "
            "(code and paper)."
        ),
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "s in W = W0 + s * tau_merged, for every tensor. Default 1.0 as the reference "
            "code's scaling_coefficient."
        ),
    )


def heterogeneity(energies: list[float], threshold: float) -> tuple[float | None, bool]:
    """(gamma, flag) of step 1; gamma None when it is undefined (one expert)."""
    if len(energies) < 2:
        return None, False
    logs = [math.log(e + TINY) for e in energies]
    mean = math.fsum(logs) / len(logs)
    var = math.fsum((v - mean) ** 2 for v in logs) / (len(logs) - 1)
    gamma = var / (mean * mean + TINY)
    return gamma, gamma > threshold


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    import torch

    check_context(ctx)
    diag: dict[str, Any] = ctx.diagnostics
    if not is_matrix(ctx):
        diag["rule"] = "mean of task vectors (not a matrix tensor)"
        return mean_of_task_vectors(ctx, p.scale)

    # An expert whose task vector is exactly zero here (a LoRA adapter that does not target
    # this module) has no covariance to contribute: left in, its trace normalisation would
    # divide by ~0 and its ridge would dilute the solve.
    taus = [tau for tau in ctx.weighted_task_vectors() if bool(tau.any())]
    if not taus:
        diag["rule"] = "every task vector is zero: W0"
        return ctx.base.clone()
    if len(taus) < len(ctx.experts):
        diag["zero_task_vectors"] = len(ctx.experts) - len(taus)
    n = len(taus)
    d_out, d_in = ctx.base.shape
    energies = [float(torch.sum(tau * tau)) for tau in taus]
    gamma, flag = heterogeneity(energies, p.gamma_threshold)

    eye = torch.eye(d_in, dtype=ctx.base.dtype, device=ctx.base.device)
    sigmas: list[torch.Tensor] = []  # kept only for the refinement (flag)
    sigma_sum = torch.zeros_like(eye)  # sum_t Sigma_t, un-ridged
    reg_sum = torch.zeros_like(eye)  # sum_t Sigma_t^reg
    b = torch.zeros_like(ctx.base)
    eps_used: list[float] = []
    for tau in taus:
        sigma, centred = centred_covariance(tau)
        trace = float(sigma.diagonal().sum()) + TINY
        if flag:
            sigma.div_(trace)
            eps_t = p.eps / trace
        else:
            eps_t = p.eps
        eps_used.append(eps_t)
        sigma_reg = sigma + eps_t * eye
        sigma_sum.add_(sigma)
        reg_sum.add_(sigma_reg)
        b.add_(centred @ sigma_reg)
        if flag:
            sigmas.append(sigma)
        del centred, sigma_reg

    c_agg = sigma_sum.mean(dim=0, keepdim=True)  # 1 x d_in: the column means
    if flag:
        c_agg.div_(math.fsum(energies) / n + TINY)
    a = reg_sum + c_agg  # broadcasting adds c to every row: A = sum Sigma^reg + 1 c^T
    del sigma_sum
    diag.update(
        rule="ace",
        gamma=gamma,
        flag=flag,
        gamma_threshold=p.gamma_threshold,
        energies=energies,
        eps=p.eps,
        eps_t=eps_used,
    )
    merged = solve_right_general(a, b, diag=diag)
    del a, b

    k = int(p.k_frac * min(d_out, d_in)) if flag else 0
    diag["k"] = k
    if flag and k == 0:
        diag["refinement"] = "skipped: k = floor(k_frac * min(d_out, d_in)) is 0"
    elif flag:
        sigma_mean = reg_sum / n
        fused = merged.clone()
        for tau, sigma in zip(taus, sigmas, strict=True):
            fused.add_(tau @ (sigma - sigma_mean))
        u, s, vh = thin_svd(fused)
        # Only real directions: past the numerical rank (low-rank task vectors) the
        # singular vectors are arbitrary and sigma_iso would inflate them.
        k = min(k, numerical_rank(s, (d_out, d_in)))
        diag["k"] = k
        if k == 0:
            return ctx.base + merged * p.scale
        sigma_iso = float(s[:k].mean())
        merged.add_(u[:, :k] @ vh[:k, :], alpha=sigma_iso)
        diag["sigma_iso"] = sigma_iso
    return ctx.base + merged * p.scale


METHOD = MethodInfo(
    name="ace",
    summary=(
        "ACE-Merging: data-free closed form per 2-D tensor, treating each task vector's rows "
        "as samples of its input covariance, with adaptive normalisation and a spectral "
        "refinement for heterogeneous modules; other tensors take the mean of task vectors."
    ),
    params=Params,
    merge=merge,
    matrix=True,
)
