"""RegMean (Jin et al., ICLR 2023): the merge that best reproduces every expert's outputs on
its own inputs, per linear module (merge-math.md section 5).

For a matrix tensor (2-D, nn.Linear layout d_out x d_in, merge-math.md section 0) with
per-expert Grams G_t = X_t^T X_t / n_t (d_in x d_in):

    G~_t  = alpha * G_t + (1 - alpha) * diag(G_t)       (off-diagonal entries times alpha)
    A     = sum_t beta_t G~_t
    tau   = (sum_t beta_t tau_t G~_t) (A + r I)^{-1},   r = ridge * tr(A) / d_in
    W     = W0 + scale * tau

beta_t is expert t's weight: it multiplies that expert's Gram term (the precision of its
regression), so scaling every weight by the same factor changes nothing. With ridge 0 this
is exactly W* = (sum_t beta_t W_t G~_t)(sum_t beta_t G~_t)^{-1}: computing in task-vector
space makes the ridge shrink toward W0, not toward 0 (section 12). The system is solved
by Cholesky (crucible.methods.linalg.solve_right_spd, with its fallbacks), never inverted.

Orientation: this is the nn.Linear form. HF GPT-2 Conv1D weights (d_in x d_out) are
transposed by the pipeline before the call; the often-quoted (sum G)^{-1} sum G W_t is the
same merge written for that layout.

Tensors without the matrix procedure: every non-matrix tensor (biases, LayerNorm, conv
kernels, `text_projection`; base.is_matrix) and every 2-D tensor the job has no Gram for
(embeddings, heads: only nn.Linear inputs are recorded) take the beta-weighted mean of the
task vectors, sum_t beta_t tau_t / sum_t beta_t, times `scale`: what the Gram rule gives
with G_t = I, and the plain mean of FusionBench's regmean under the default weights of 1.
ctx.diagnostics["rule"] says which rule a tensor took.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context, is_matrix
from crucible.methods.linalg import solve_right_spd

if TYPE_CHECKING:
    import torch


class Params(MethodParams):
    alpha: float = Field(
        default=0.95,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Off-diagonal scale of each Gram: G~ = alpha G + (1 - alpha) diag(G). 1 is pure "
            "RegMean; 0 a per-input-feature weighted average. Default 0.95: FusionBench's "
            "`reduce_non_diagonal_ratio` for CLIP, also RegMean++'s default (FusionBench "
            "uses 0.6 for GPT-2; merge-math.md section 5)."
        ),
    )
    ridge: float = Field(
        default=1e-4,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Relative ridge eps: r = eps * tr(sum_t beta_t G~_t) / d_in is added to the "
            "diagonal of the system, shrinking the merge toward the base W0. Default 1e-4 "
            "(merge-math.md section 12); 0 solves the exact RegMean system (FusionBench "
            "uses none), falling back to 10x ridge or a pseudo-inverse if it is singular."
        ),
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description="s in W = W0 + s * tau_merged, for every tensor. Default 1.0.",
    )


def check_weights(ctx: TensorContext, method: str) -> None:
    """Expert weights are Gram multipliers (precisions) here: a negative one would make the
    system indefinite, and all zero leaves nothing to merge."""
    if any(w < 0 or not math.isfinite(w) for w in ctx.weights):
        raise ValueError(
            f"{ctx.name}: {method} takes expert weights as Gram multipliers, which must be "
            f"finite and >= 0; got {list(ctx.weights)}"
        )
    if not any(w > 0 for w in ctx.weights):
        raise ValueError(f"{ctx.name}: {method} needs at least one positive expert weight")


def checked_grams(ctx: TensorContext) -> list[torch.Tensor]:
    """ctx.grams, one d_in x d_in Gram per expert, in the base's dtype and device."""
    assert ctx.grams is not None
    d_in = ctx.base.shape[-1]
    if len(ctx.grams) != len(ctx.experts):
        raise ValueError(
            f"{ctx.name}: {len(ctx.grams)} Grams for {len(ctx.experts)} experts; "
            "one per expert is needed"
        )
    for i, gram in enumerate(ctx.grams):
        if tuple(gram.shape) != (d_in, d_in):
            raise ValueError(
                f"{ctx.name}: Gram {i} has shape {tuple(gram.shape)}, but the weight "
                f"{tuple(ctx.base.shape)} (d_out x d_in) needs ({d_in}, {d_in}); a GPT-2 "
                "Conv1D weight must be transposed to nn.Linear layout first"
            )
    return [g.to(dtype=ctx.base.dtype, device=ctx.base.device) for g in ctx.grams]


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G), as a new tensor."""
    return shrink_off_diagonal_(gram.clone(), alpha)


def shrink_off_diagonal_(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G), in place (the caller owns `gram`)."""
    if alpha != 1:
        diagonal = gram.diagonal().clone()
        gram.mul_(alpha)
        gram.diagonal().copy_(diagonal)
    return gram


def weighted_mean(ctx: TensorContext, scale: float) -> torch.Tensor:
    """W0 + scale * sum_t beta_t tau_t / sum_t beta_t (RegMean with G_t = I)."""
    total_weight = math.fsum(ctx.weights)
    mixed = (ctx.experts[0] - ctx.base) * ctx.weights[0]
    for expert, w in zip(ctx.experts[1:], ctx.weights[1:], strict=True):
        mixed.add_(expert - ctx.base, alpha=w)
    return ctx.base + mixed * (scale / total_weight)


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    check_weights(ctx, "regmean")
    diag: dict[str, Any] = ctx.diagnostics
    if not is_matrix(ctx):
        diag["rule"] = "weighted mean of task vectors (not a matrix tensor)"
        return weighted_mean(ctx, p.scale)
    if ctx.grams is None:
        diag["rule"] = "weighted mean of task vectors (no Gram for this tensor)"
        return weighted_mean(ctx, p.scale)
    grams = checked_grams(ctx)

    a = None
    b = None
    for expert, gram, w in zip(ctx.experts, grams, ctx.weights, strict=True):
        if w == 0:
            continue
        g = shrink_off_diagonal(gram, p.alpha)
        g.mul_(w)
        term = (expert - ctx.base) @ g
        if a is None or b is None:
            a, b = g, term
        else:
            a.add_(g)
            b.add_(term)
    assert a is not None and b is not None  # check_weights: some weight is positive
    diag.update(rule="regmean", alpha=p.alpha)
    tau = solve_right_spd(a, b, ridge_eps=p.ridge, diag=diag)
    return ctx.base + tau * p.scale


METHOD = MethodInfo(
    name="regmean",
    summary=(
        "RegMean: per linear module, the weight that best reproduces every expert's outputs "
        "on its own inputs, from per-expert input Grams (off-diagonals scaled by `alpha`, "
        "relative `ridge`); other tensors take the weighted mean of the task vectors."
    ),
    params=Params,
    merge=merge,
    needs=frozenset({"gram"}),
    matrix=True,
    needs_grams=lambda p: True,
)
