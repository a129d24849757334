"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever started the interference should end it";
merge-math.md section 8).

Per optimised tensor, with the weighted task vectors tau_t = w_t (W_t - W0) (expert weights
act as per-task scales applied first) and n_t = ||tau_t||_F^2, the interference loss is

    L(tau) = sum_t ||(tau - tau_t) tau_t^T||_F^2 / n_t

Task vectors with n_t = 0 contribute nothing (their term is 0/0; FusionBench would produce
NaN). Write G_t = tau_t^T tau_t / n_t, S = sum_t G_t, B = sum_t tau_t G_t (d_in x d_in and
d_out x d_in); then grad L(tau) = 2 (tau S - B), and:

- solver "closed_form": the stationary point, RegMean with the surrogate Grams G_t,
      tau* = B (S + eps * tr(S) / d_in * I)^{-1}      eps = `ridge`
  solved by Cholesky through linalg.solve_right_spd (10x ridge retry, then an eigh
  pseudo-inverse). S has rank at most sum_t rank(tau_t), so it is singular whenever that is
  below d_in: the ridge picks the solution with no component outside the task vectors' row
  spaces (B S^+ as eps -> 0), which is also where gradient descent from the sum stays.
  eps = 0 is exact: for a singular S, solve_right_spd goes to the eigh pseudo-inverse, B S^+.
- solver "adam" (default): the reference procedure. tau starts at sum_t tau_t; `iterations` steps of
  torch.optim.Adam (lr `lr`, betas (0.9, 0.999), eps 1e-8, weight decay 0, the
  single-tensor implementation) on the exact gradient 2 (tau S - B), which is the gradient
  FusionBench and the official code get from autograd on L, at O(d_out d_in^2) per step
  instead of O(T d_out^2 d_in) and without the d_out x d_out products. Adam runs in the
  dtype and on the device it is given: float64 where the pipeline computes the module in
  float64 (merge-math.md section 12), float32 otherwise; the reference runs float32, and the
  parity test bounds the difference. No random numbers and a fixed operation order: on the
  CPU reruns are bitwise identical, and on CUDA the plain matmuls and elementwise ops used
  are reproducible run to run on one GPU.

    W = W0 + scale * tau_merged

Which tensors are optimised (`scope`):
- "all_matrices" (default), FusionBench's rule: every matrix tensor (2-D, not
  `text_projection`) is optimised and every other tensor takes the mean task vector,
  W0 + scale * mean_t(w_t tau_t).
- "official", the paper's code (`wudi_main.py`): only tensors whose names contain
  `attn.in_proj_weight`, `attn.out_proj.weight`, `mlp.c_fc.weight` or `mlp.c_proj.weight`
  are optimised; every other tensor stays at W0.
The default is "all_matrices" because Crucible merges any architecture: those four patterns
are OpenCLIP's module names, so "official" on a Llama or BERT checkpoint would silently
return the base model (on GPT-2 it would skip attn.c_attn). It is also the rule of the
other subspace methods (tsv, iso_c, iso_cts) and of the FusionBench implementation the
parity test checks against. FusionBench also optimises `text_projection` unless it is
excluded; Crucible treats it as non-matrix like the other subspace methods.

The reference runs Adam (FusionBench config: 400 iterations; the paper and FusionBench's
function default: 300), and so does Crucible by default: the published results come from
those iterations. The closed form is the minimiser they move toward, one solve per tensor
(much cheaper on the CPU), but it is not the short-run Adam result:
Adam at lr 1e-5 moves each entry by at most about lr per step, so 300-400 steps stay near
the sum (implicit regularisation). On random task vectors (tests/test_methods_subspace.py)
the closed form differs from FusionBench's 400 steps by 0.3-4.6x the size of their entries,
most on wide matrices where the loss can be driven to ~0 (there its entries grow to ~2-5x
the sum's); its loss is always the lower. Whether that helps or hurts accuracy has not been
measured here; solver "adam" with iterations 300 or 400 reproduces the reference. The
diagnostics record the loss at the sum initialisation and at the result, per module.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from crucible.methods.base import (
    MethodInfo,
    MethodParams,
    TensorContext,
    check_context,
    is_matrix,
    merge_matrix_or_mean,
)
from crucible.methods.linalg import solve_right_spd
from crucible.stats.data_free import task_vector_gram

if TYPE_CHECKING:
    import torch

# The official code's optimised modules (OpenCLIP names), matched as substrings.
OFFICIAL_PATTERNS: tuple[str, ...] = (
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Params(MethodParams):
    solver: Literal["closed_form", "adam"] = Field(
        default="adam",
        description=(
            "'adam' (default): the reference procedure, `iterations` Adam steps at `lr` "
            "from the sum of the task vectors, as in the paper and FusionBench. "
            "'closed_form': the exact minimiser of the WUDI loss, "
            "B (S + ridge)^{-1} with S = sum_t tau_t^T tau_t / ||tau_t||^2 and "
            "B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2; one solve per matrix, but far "
            "from the short-run Adam result on wide matrices (see the module docstring)."
        ),
    )
    ridge: float = Field(
        default=1e-4,
        ge=0.0,
        allow_inf_nan=False,
        description=(
            "Closed form only: relative ridge eps, adding eps * tr(S) / d_in to the diagonal "
            "of S (merge-math.md section 12). Default 1e-4. 0 solves without a ridge, "
            "exact; when S is singular (sum_t rank(tau_t) < d_in) the solver then takes the "
            "pseudo-inverse minimiser B S^+."
        ),
    )
    iterations: int = Field(
        default=300,
        ge=0,
        le=100_000,
        description=(
            "Adam only: number of steps. Default 300, the paper's and FusionBench's function "
            "default; FusionBench's config uses 400."
        ),
    )
    lr: float = Field(
        default=1e-5,
        gt=0.0,
        allow_inf_nan=False,
        description="Adam only: learning rate. Default 1e-5, the paper's and FusionBench's.",
    )
    scope: Literal["all_matrices", "official"] = Field(
        default="all_matrices",
        description=(
            "Which tensors are optimised. 'all_matrices' (default, FusionBench): every 2-D "
            "tensor except text_projection; other tensors take the mean task vector. "
            "'official' (the paper's code): only names containing attn.in_proj_weight, "
            "attn.out_proj.weight, mlp.c_fc.weight or mlp.c_proj.weight (OpenCLIP); every "
            "other tensor stays at the base weights."
        ),
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "Global scale: W = W0 + scale * tau_merged. Default 1.0: WUDI has no rescaling "
            "coefficient (merge-math.md section 8)."
        ),
    )


def wudi_loss(tau: torch.Tensor, taus: list[torch.Tensor], norms: list[float]) -> float:
    """sum_t ||(tau - tau_t) tau_t^T||_F^2 / n_t over the tasks with n_t > 0, computed per
    task (no cancellation against a large constant); the product is taken in the cheaper
    order, (tau - tau_t) tau_t^T (d_out x d_out) or via tau_t^T tau_t (d_in x d_in)."""
    total = 0.0
    d_out, d_in = tau.shape
    for tau_t, n_t in zip(taus, norms, strict=True):
        if n_t == 0:
            continue
        diff = tau - tau_t
        if d_out <= d_in:
            value = (diff @ tau_t.T).square().sum()
        else:
            value = ((diff @ (tau_t.T @ tau_t)) * diff).sum()
        total += float(value) / n_t
    return total


def surrogate_grams(
    taus: list[torch.Tensor], norms: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = sum_t tau_t^T tau_t / n_t and B = sum_t tau_t (tau_t^T tau_t) / n_t."""
    import torch

    d_out, d_in = taus[0].shape
    like = {"dtype": taus[0].dtype, "device": taus[0].device}
    s = torch.zeros(d_in, d_in, **like)
    b = torch.zeros(d_out, d_in, **like)
    for tau_t, n_t in zip(taus, norms, strict=True):
        if n_t == 0:
            continue
        g_t = task_vector_gram(tau_t)
        s.add_(g_t)
        b.add_(tau_t @ g_t)
        del g_t
    return s, b


def adam(
    init: torch.Tensor, s: torch.Tensor, b: torch.Tensor, *, iterations: int, lr: float
) -> torch.Tensor:
    """`iterations` steps of torch.optim.Adam on L, from `init`, with grad 2 (tau S - B)."""
    import torch

    tau = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam(
        [tau], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0, foreach=False
    )
    with torch.no_grad():
        for _ in range(iterations):
            grad = tau @ s
            grad.sub_(b).mul_(2)
            tau.grad = grad
            optimizer.step()
    return tau.detach()


def wudi_matrix(taus: list[torch.Tensor], diag: dict[str, Any], *, p: Params) -> torch.Tensor:
    """The WUDI task vector of one matrix: closed form or Adam from the sum."""
    norms = [float(tau_t.square().sum()) for tau_t in taus]
    init = taus[0].clone()
    for tau_t in taus[1:]:
        init.add_(tau_t)
    zero = sum(1 for n_t in norms if n_t == 0)
    diag.update(solver=p.solver, loss_before=wudi_loss(init, taus, norms))
    if zero:
        diag["zero_task_vectors"] = zero
    if zero == len(taus):
        diag["loss_after"] = 0.0
        return init  # every task vector is zero: so is the sum
    s, b = surrogate_grams(taus, norms)
    if p.solver == "closed_form":
        merged = solve_right_spd(s, b, ridge_eps=p.ridge, diag=diag)
    else:
        diag.update(iterations=p.iterations, lr=p.lr)
        merged = adam(init, s, b, iterations=p.iterations, lr=p.lr)
    del s, b
    diag["loss_after"] = wudi_loss(merged, taus, norms)
    return merged


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    if p.scope == "official" and not (
        is_matrix(ctx) and any(pattern in ctx.name for pattern in OFFICIAL_PATTERNS)
    ):
        check_context(ctx)
        ctx.diagnostics.update(rule="base", tasks=len(ctx.experts))
        return ctx.base.clone()
    return merge_matrix_or_mean(ctx, p.scale, lambda taus, diag: wudi_matrix(taus, diag, p=p))


METHOD = MethodInfo(
    name="wudi",
    summary=(
        "WUDI-Merging: the task vector minimising the interference loss "
        "sum_t ||(tau - tau_t) tau_t^T||^2 / ||tau_t||^2 per matrix (closed form, or the "
        "reference's Adam iterations); other tensors take the mean task vector (or stay at "
        "the base with scope 'official'). W0 + scale * result."
    ),
    params=Params,
    merge=merge,
    matrix=True,
)
