"""The numerics every matrix method shares (merge-math.md section 12).

Solve, never invert: SPD systems go through Cholesky with a relative ridge, retried with 10x
the ridge, then an eigendecomposition pseudo-inverse; general systems (ACE) through LU with
a least-squares fallback. Each call records what it did in a diagnostics dict that ends up
in the job's report, so an ill-conditioned module is visible, not silent.

Torch is imported inside functions only: the API imports the methods package.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Eigenvalues below this fraction of the largest are treated as zero by the pseudo-inverse.
PINV_RTOL = 1e-10
# A module whose condition estimate exceeds this is flagged in the report.
ILL_CONDITIONED = 1e12
# Singular values below this share of the largest are rounding noise (numerical_rank).
RANK_RTOL_FLOOR = 1e-10
# Matrix methods compute in float64 while d_in is at most this (an 8192^2 float64 Gram is
# 0.5 GiB), else float32 with the relative ridge.
FLOAT64_MAX_DIM = 8192
# Whole tensors are held in float64 up to this many elements (512 MiB each), float32 beyond
# (e.g. a 128k-vocabulary embedding): the engine's matrix methods, adapter deltas.
FLOAT64_MAX_ELEMENTS = 64 * 2**20


def relative_ridge(a: torch.Tensor, eps: float) -> float:
    """eps * tr(A) / d: a ridge that scales with A, so eps means the same for any scale."""
    d = a.shape[-1]
    trace = float(a.diagonal().sum())
    if not math.isfinite(trace) or trace <= 0:
        return eps
    return eps * trace / d


def _add_to_diagonal(a: torch.Tensor, value: float) -> torch.Tensor:
    out = a.clone()
    if value:
        out.diagonal().add_(value)
    return out


def solve_right_spd(
    a: torch.Tensor, b: torch.Tensor, *, ridge_eps: float, diag: dict[str, Any]
) -> torch.Tensor:
    """X = B (A + r I)^{-1} for symmetric PSD A (d x d) and B (m x d), r = relative ridge.

    Cholesky first; on failure 10x the ridge (when a ridge was asked for: with ridge 0 a
    tiny retry ridge would give huge pivots and an inaccurate answer); then an eigh
    pseudo-inverse that drops eigenvalues below PINV_RTOL * max, the minimum-norm
    solution. Records `solve`, `ridge` (the absolute ridge used),
    `ridge_eps` and `cond` (an estimate) in `diag`.
    """
    import torch

    a = (a + a.T) / 2  # symmetric to the last bit, as Cholesky and eigh assume
    eps = ridge_eps
    attempts = ("cholesky", "cholesky_ridge_x10") if ridge_eps > 0 else ("cholesky",)
    for attempt in attempts:
        ridge = relative_ridge(a, eps) if eps > 0 else 0.0
        factor, info = torch.linalg.cholesky_ex(_add_to_diagonal(a, ridge))
        if int(info) == 0:
            x_t = torch.cholesky_solve(b.T, factor)
            d = factor.diagonal()
            diag.update(
                solve=attempt,
                ridge=ridge,
                ridge_eps=eps,
                cond=_ratio_squared(d),
            )
            if attempt != "cholesky":
                diag["fallback"] = "Cholesky failed at the requested ridge; used 10x the ridge"
            note_conditioning(diag)
            return x_t.T
        eps *= 10
    # Cholesky failed: eigendecomposition pseudo-inverse (never an explicit inverse).
    ridge = relative_ridge(a, ridge_eps) if ridge_eps > 0 else 0.0
    evals, evecs = torch.linalg.eigh(_add_to_diagonal(a, ridge))
    top = float(evals.abs().max()) if evals.numel() else 0.0
    keep = evals > PINV_RTOL * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    x = ((b @ evecs) * inv) @ evecs.T
    kept = evals[keep]
    diag.update(
        solve="eigh_pinv",
        ridge=ridge,
        ridge_eps=ridge_eps,
        cond=float(kept.max() / kept.min()) if kept.numel() else math.inf,
        rank=int(keep.sum()),
        fallback="Cholesky failed; eigendecomposition pseudo-inverse",
    )
    note_conditioning(diag)
    return x


def solve_right_general(a: torch.Tensor, b: torch.Tensor, *, diag: dict[str, Any]) -> torch.Tensor:
    """X = B A^{-1} for a square, possibly non-symmetric A (ACE): LU on A^T X^T = B^T,
    falling back to least squares when A is singular. Records `solve` and `cond`."""
    import torch

    lu, pivots, info = torch.linalg.lu_factor_ex(a.T)
    if int(info) == 0:
        x_t = torch.linalg.lu_solve(lu, pivots, b.T)
        if bool(torch.isfinite(x_t).all()):
            diag.update(solve="lu", cond=_ratio_squared(lu.diagonal().abs().sqrt()))
            note_conditioning(diag)
            return x_t.T
    driver = "gelsd" if a.device.type == "cpu" else "gels"
    x_t = torch.linalg.lstsq(a.T, b.T, driver=driver).solution
    diag.update(solve=f"lstsq_{driver}", cond=math.inf, fallback="singular system; least squares")
    note_conditioning(diag)
    return x_t.T


def _ratio_squared(d: torch.Tensor) -> float:
    """(max/min)^2 of a factor's diagonal: a cheap lower bound on the condition number."""
    lo = float(d.abs().min())
    hi = float(d.abs().max())
    if lo == 0:
        return math.inf
    return (hi / lo) ** 2


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh with U (m x r), S (r), Vh (r x n), r = min(m, n)."""
    import torch

    return torch.linalg.svd(m, full_matrices=False)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...], reference: float | None = None) -> int:
    """How many singular values (descending) are above reference * max(shape) * eps, with
    reference = s_max by default (numpy's matrix_rank tolerance): directions below it are
    rounding noise of a rank-deficient matrix (a LoRA task vector), whose singular vectors
    are an arbitrary null-space basis; never below RANK_RTOL_FLOOR relative. A matrix that
    is itself rounding noise (what is left of a task vector after projecting out a space
    holding it) needs the scale it came from as `reference`."""
    import torch

    top = float(s[0]) if s.numel() else 0.0
    scale = top if reference is None else max(reference, top)
    if scale <= 0.0:
        return 0
    # At least 1e-10 relative: a float64 task vector formed as (W0 + ΔW) - W0 carries
    # rounding of W0's size, far above ΔW's eps when ΔW is small.
    tol = scale * max(max(shape) * torch.finfo(s.dtype).eps, RANK_RTOL_FLOOR)
    return int((s > tol).sum())


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of M = P S Q^T (thin): the nearest matrix with
    orthonormal columns (TSV-M and ISO-CTS decorrelation, merge-math.md section 6 step 3)."""
    u, _, vh = thin_svd(m)
    return u @ vh


def note_conditioning(diag: dict[str, Any]) -> None:
    """Mark a module whose condition estimate is past ILL_CONDITIONED, for the report, and
    log every fallback (the module's name is added by the engine's report)."""
    cond = diag.get("cond")
    if isinstance(cond, float) and (not math.isfinite(cond) or cond > ILL_CONDITIONED):
        diag["ill_conditioned"] = True
    if "fallback" in diag:
        log.warning("solve fallback (%s): %s; cond ~ %s", diag.get("solve"), diag["fallback"], cond)
