"""Bayesian Model Merging, inner level (Li, Han, Su, Ji, arXiv 2605.12843): per linear
module, the MAP of a Bayesian regression on the experts' input statistics under a Gaussian
prior centred on an anchor merge (merge-math.md section 10.3; the formulas are Crucible's
specification [I], reconstructed from the paper's abstract and appendix fragments).

Per matrix tensor (2-D, nn.Linear layout d_out x d_in, not `text_projection`):

- Anchor: W_a = the `anchor` method's merge of the same tensor with `anchor_params`
  (task_arithmetic, ties, tsv, iso_cts or wudi, looked up in the registry at call time);
  tau_a = W_a - W0. The prior is tau ~ N(tau_a, lambda^{-1} I), row-wise.
- Grams, per expert (d_in x d_in):
    data_free:   G_t = tau_t^T tau_t / ||tau_t||_F^2 (0 for a zero task vector);
    activations: G_t = X_t^T X_t / n_t, from ctx.grams;
    hybrid:      G_t = w X_t^T X_t / n_t + (1 - w) tau_t^T tau_t / ||tau_t||_F^2, with
                 w = hybrid_weight (App. F; the exact form is [I]).
  then optionally G_t := alpha G_t + (1 - alpha) diag(G_t) (RegMean's off-diagonal shrink;
  alpha = 1, the default, leaves G_t as is).
- Likelihood precision beta_t = expert t's weight (>= 0), multiplying its Gram term.
- lambda = rho * tr(sum_t beta_t G_t) / d_in: rho is the prior strength relative to the
  mean eigenvalue of the data precision, so it means the same whatever the Grams' scale.
- Posterior (= MAP) with P = sum_t beta_t G_t + lambda I:
    tau_MAP = (sum_t beta_t tau_t G_t + lambda tau_a) P^{-1}
            = tau_a + (sum_t beta_t (tau_t - tau_a) G_t) P^{-1}
  The second, algebraically equal form is the one computed (Cholesky,
  crucible.methods.linalg.solve_right_spd): the optional relative `ridge`
  r = ridge * tr(P) / d_in then adds to lambda's pull toward the anchor, never toward 0
  (merge-math.md section 12). When tr(sum_t beta_t G_t) is 0 (every Gram zero) there is no
  evidence and tau_MAP = tau_a.
- W = W0 + scale * tau_MAP (scale: the per-module "assembly scale"; placement [I]).

Limits: lambda -> inf gives the anchor; lambda -> 0 with beta_t = 1 gives RegMean on the
task vectors with Grams G_t; G_t = c I gives tau_MAP = (mean_t tau_t + rho tau_a)/(1 + rho)
for any c (unit weights). Identical experts with an anchor that returns their task vector
(task_arithmetic with scale 1/T, or normalize) give W_t for any rho.

Non-matrix tensors (biases, LayerNorm, conv kernels, `text_projection`), and 2-D tensors the
job has no activation Gram for when `gram` is activations or hybrid (embeddings, heads),
take the anchor's output W_a unchanged (section 10.3: "non-linear parameters come from the
anchor"). ctx.diagnostics["rule"] says which; the anchor's own diagnostics are under
diagnostics["anchor"].

The outer level (Bayesian optimisation of rho and scale per module on validation data) is
not part of a merge: per-tensor values of rho and scale are given through the request's
per-tensor parameter overrides.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context, is_matrix
from crucible.methods.linalg import solve_right_spd
from crucible.methods.regmean import check_weights, checked_grams, shrink_off_diagonal_
from crucible.stats.data_free import task_vector_gram

if TYPE_CHECKING:
    import torch

Anchor = Literal["task_arithmetic", "ties", "tsv", "iso_cts", "wudi"]
GramKind = Literal["data_free", "activations", "hybrid"]


class Params(MethodParams):
    anchor: Anchor = Field(
        default="task_arithmetic",
        description=(
            "The merge method whose result is the prior mean tau_a = W_a - W0, and the "
            "result for non-matrix tensors. Default task_arithmetic (the paper's TA anchor)."
        ),
    )
    anchor_params: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Params of the anchor method, validated against that method's own params; "
            "missing keys take its defaults (task_arithmetic: scale 1.0, i.e. the sum of the "
            "task vectors; give scale 1/T or normalize true for their mean). Default {}."
        ),
    )
    gram: GramKind = Field(
        default="data_free",
        description=(
            "Per-expert Gram G_t. 'data_free': tau_t^T tau_t / ||tau_t||_F^2 (no data). "
            "'activations': the job's input Grams X_t^T X_t / n_t. 'hybrid': "
            "hybrid_weight * activations + (1 - hybrid_weight) * data_free. The last two "
            "need Grams. Default data_free."
        ),
    )
    hybrid_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "w in the hybrid Gram w X^T X / n + (1 - w) tau^T tau / ||tau||_F^2; used only "
            "when gram is 'hybrid'. Default 0.5 (an even mix; the paper's value is unknown)."
        ),
    )
    rho: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Prior strength: lambda = rho * tr(sum_t beta_t G_t) / d_in, i.e. relative to "
            "the mean eigenvalue of the data precision. Large rho returns the anchor, small "
            "rho RegMean on the Grams. Default 1.0, prior and data weighed equally at the "
            "average eigenvalue; the suggested search range is log-uniform [1e-4, 1e2] "
            "(merge-math.md section 10.3)."
        ),
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "Assembly scale s in W = W0 + s * tau_MAP on matrix tensors (non-matrix tensors "
            "take the anchor's output, with the anchor's own scale). Default 1.0."
        ),
    )
    alpha: float = Field(
        default=1.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "RegMean-style off-diagonal shrink of every Gram: alpha G + (1 - alpha) diag(G). "
            "Default 1.0 (no shrink; the lambda I prior already makes the system definite)."
        ),
    )
    ridge: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Extra relative ridge eps: eps * tr(P) / d_in added to P's diagonal. The system "
            "is solved in anchor-residual form, so this only strengthens the pull toward the "
            "anchor, as a larger rho would. Default 0: lambda I (rho > 0) already makes P "
            "positive definite; the solver still retries with a tiny ridge if Cholesky fails."
        ),
    )

    @model_validator(mode="after")
    def _check_anchor_params(self) -> Params:
        anchor_params(self.anchor, self.anchor_params)
        return self


def anchor_info(anchor: str) -> MethodInfo:
    """The anchor method, looked up in the registry at call time: the registry imports this
    module, and anchors written later register themselves there."""
    from crucible.methods.registry import METHODS

    info = METHODS.get(anchor)
    if info is None:
        raise ValueError(
            f"anchor {anchor!r} is not available in this build; known methods: {sorted(METHODS)}"
        )
    return info


def anchor_params(anchor: str, values: dict[str, Any]) -> MethodParams:
    """`values` validated as the anchor method's own params (a ValueError naming each bad
    field, which pydantic reports as a validation error of bmm's anchor_params)."""
    try:
        return anchor_info(anchor).params.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(params)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"anchor_params are not valid {anchor} params: {problems}") from None


def anchor_merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    """W_a: the anchor method's merge of this tensor, on a shallow copy of the context with
    its own diagnostics (stored under ctx.diagnostics["anchor"])."""
    info = anchor_info(p.anchor)
    sub = dataclasses.replace(ctx, extra=dict(ctx.extra), diagnostics={})
    w_a = info.merge(sub, anchor_params(p.anchor, p.anchor_params))
    ctx.diagnostics["anchor"] = {"method": p.anchor, **sub.diagnostics}
    return w_a


def posterior_terms(
    ctx: TensorContext, p: Params, tau_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P0, E) = (sum_t beta_t G_t, sum_t beta_t (tau_t - tau_a) G_t) with the Grams of
    p.gram, shrunk by p.alpha: the data side of the posterior, shared by merge and by the
    tuner's factorization (crucible/tune/factorized.py), so the two cannot drift."""
    import torch

    activation_grams = checked_grams(ctx) if p.gram != "data_free" else None
    d_in = ctx.base.shape[-1]
    precision = torch.zeros((d_in, d_in), dtype=ctx.base.dtype, device=ctx.base.device)
    evidence = torch.zeros_like(ctx.base)
    for t, (expert, beta) in enumerate(zip(ctx.experts, ctx.weights, strict=True)):
        if beta == 0:
            continue
        tau = expert - ctx.base
        # beta_t G_t, a new tensor in every branch (ctx.grams are never modified).
        if activation_grams is None:
            gram = task_vector_gram(tau).mul_(beta)
        elif p.gram == "activations":
            gram = activation_grams[t] * beta
        else:
            gram = activation_grams[t] * (beta * p.hybrid_weight)
            gram.add_(task_vector_gram(tau), alpha=beta * (1 - p.hybrid_weight))
        shrink_off_diagonal_(gram, p.alpha)
        precision.add_(gram)
        evidence.add_(tau.sub_(tau_a) @ gram)
        del tau, gram
    return precision, evidence


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:

    check_context(ctx)
    check_weights(ctx, "bmm")
    diag: dict[str, Any] = ctx.diagnostics
    w_a = anchor_merge(ctx, p)
    if not is_matrix(ctx):
        diag["rule"] = "anchor (not a matrix tensor)"
        return w_a
    if p.gram != "data_free" and ctx.grams is None:
        diag["rule"] = "anchor (no activation Gram for this tensor)"
        return w_a
    tau_a = w_a - ctx.base
    del w_a
    precision, evidence = posterior_terms(ctx, p, tau_a)
    d_in = ctx.base.shape[-1]
    trace = float(precision.diagonal().sum())
    lam = p.rho * trace / d_in
    diag.update(rule="bmm", gram=p.gram, rho=p.rho, lam=lam, alpha=p.alpha)
    if p.gram == "hybrid":
        diag["hybrid_weight"] = p.hybrid_weight
    if not trace > 0:
        diag["solve"] = "none: every Gram is zero, so the result is the anchor"
        return ctx.base + tau_a * p.scale
    precision.diagonal().add_(lam)
    correction = solve_right_spd(precision, evidence, ridge_eps=p.ridge, diag=diag)
    return ctx.base + (tau_a + correction) * p.scale


METHOD = MethodInfo(
    name="bmm",
    summary=(
        "Bayesian Model Merging (inner level): per linear module, the MAP of a regression on "
        "the experts' Grams (data-free from the task vectors, activations, or a hybrid) under "
        "a Gaussian prior centred on an anchor merge (task_arithmetic, ties, tsv, iso_cts, "
        "wudi); other tensors take the anchor's output."
    ),
    params=Params,
    merge=merge,
    needs=frozenset({"anchor", "gram"}),
    matrix=True,
    needs_grams=lambda p: p.gram != "data_free",
)
