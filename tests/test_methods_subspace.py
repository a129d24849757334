"""The subspace methods tsv, iso_c, iso_cts and wudi (merge-math.md sections 6-8, 12).

Three kinds of checks:

1. Properties from merge-math.md section 12, as they actually hold (see the notes on
   identical experts below), plus the non-matrix rules of section 0.
2. Independent float64 references written here from the formulas: numpy, loops over tasks,
   and where possible a different algorithm than the method's (polar factors and nuclear
   norms from eigendecompositions, not SVDs). Shapes are non-square both ways, T = 2 and 3,
   with non-unit expert weights (per-task scales applied before the method).
3. Parity with FusionBench 0.2.33's own functions, run in their venv
   (tests/support/fusionbench_runner.py says where and how to install it). A missing venv is
   a failure, not a skip.

Identical experts (merge-math.md section 12, item 1 says "ISO and TSV return the scaled
sum"): that holds for ISO-C only when the common task vector has a flat spectrum; in general
ISO-C returns alpha * T * mean(sigma(tau)) * polar(tau). For TSV-M and ISO-CTS, identical
experts make the concatenated bases rank-deficient (the same k directions T times), so the
polar factor is not unique and the result outside the tasks' top subspace depends on how the
SVD completes a null space, here and in FusionBench alike. What is determined, and tested:
TSV-M's block on the top-k singular subspace of tau is diag(s_1..s_k), the top of tau itself
(the mean, not the sum), and ISO-CTS still has a flat spectrum (and equals ISO-C when the
common space is the whole rank).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from crucible.methods import iso_c, iso_cts, tsv, wudi
from crucible.methods.base import TensorContext
from crucible.methods.registry import METHODS
from tests.support.fusionbench_runner import (
    Job,
    iso_c_job,
    iso_cts_job,
    regmean_job,
    require_fusionbench,
    run_fusionbench,
    tsvm_job,
    wudi_job,
)

REPO = Path(__file__).resolve().parents[1]
SUBSPACE = ("tsv", "iso_c", "iso_cts", "wudi")
SHAPES = [(5, 8), (8, 5)]  # d_out < d_in and d_out > d_in
WEIGHTS = {1: [1.0], 2: [0.7, 1.3], 3: [0.7, 1.3, 1.0]}
# Float64 references against float64 methods: both sides are backward-stable factorisations
# of well-conditioned random matrices, so they agree to ~1e-13 relative; 1e-10 leaves room
# for BLAS differences and still catches any formula slip (those are O(1) relative).
REL64 = 1e-10


# --- helpers -----------------------------------------------------------------------------------


def make(
    shape: tuple[int, ...], n_experts: int, seed: int, spread: float = 0.1
) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    return base, [base + spread * rng.normal(size=shape) for _ in range(n_experts)]


def ctx_of(
    name: str,
    base: np.ndarray,
    experts: Sequence[np.ndarray],
    weights: Sequence[float],
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> TensorContext:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype)

    return TensorContext(
        name=name, base=t(base), experts=[t(e) for e in experts], weights=list(weights)
    )


def merge(method: str, ctx: TensorContext, **params: Any) -> torch.Tensor:
    info = METHODS[method]
    out = info.merge(ctx, info.params(**params))
    assert out.shape == ctx.base.shape
    assert out.dtype == ctx.base.dtype and out.device == ctx.base.device
    json.dumps(ctx.diagnostics, allow_nan=False)  # the report stores them as JSON
    return out


def run(method: str, ctx: TensorContext, **params: Any) -> np.ndarray:
    return merge(method, ctx, **params).cpu().numpy()


def assert_rel(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| elementwise."""
    scale = max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def weighted_taus(
    base: np.ndarray, experts: Sequence[np.ndarray], weights: Sequence[float]
) -> list[np.ndarray]:
    return [w * (e - base) for e, w in zip(experts, weights, strict=True)]


# --- independent float64 references -------------------------------------------------------------


def inv_sqrt_psd(a: np.ndarray) -> np.ndarray:
    evals, evecs = np.linalg.eigh((a + a.T) / 2)
    return (evecs / np.sqrt(evals)) @ evecs.T


def ref_polar(a: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor without an SVD: A (A^T A)^{-1/2}, or (A A^T)^{-1/2} A for wide A
    (A of full rank)."""
    if a.shape[0] >= a.shape[1]:
        return a @ inv_sqrt_psd(a.T @ a)
    return inv_sqrt_psd(a @ a.T) @ a


def ref_nuclear(a: np.ndarray) -> float:
    """Sum of singular values as tr((A^T A)^{1/2}) over the smaller Gram, via eigenvalues."""
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum())


def ref_mean_rule(base: np.ndarray, taus: Sequence[np.ndarray], scale: float) -> np.ndarray:
    acc = np.zeros_like(base)
    for tau in taus:
        acc = acc + tau
    return base + scale * acc / len(taus)


def ref_tsv(base: np.ndarray, taus: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    n_tasks = len(taus)
    d_out, d_in = base.shape
    k = min(d_out, d_in) // n_tasks
    u_cols, s_vals, v_cols = [], [], []
    for tau in taus:
        u, s, vt = np.linalg.svd(tau, full_matrices=False)
        for i in range(k):
            u_cols.append(u[:, i])
            s_vals.append(s[i])
            v_cols.append(vt[i, :])
    u_perp = ref_polar(np.stack(u_cols, axis=1))
    v_perp = ref_polar(np.stack(v_cols, axis=1))
    merged = np.zeros_like(base)
    for i, s in enumerate(s_vals):
        merged += s * np.outer(u_perp[:, i], v_perp[:, i])
    return base + alpha * merged


def ref_iso_c(base: np.ndarray, taus: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    total = np.sum(taus, axis=0)
    sigma_bar = ref_nuclear(total) / min(total.shape)
    return base + alpha * sigma_bar * ref_polar(total)


def ref_split(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, m) per merge-math.md section 7 step 1, with Python's round as FusionBench, and
    Crucible's guard for f near 0: m = floor(r / T) when T m would exceed r."""
    k_c = math.floor(r * fraction)
    m = round((r - k_c) / n_tasks)
    if m * n_tasks > r:
        m = r // n_tasks
    return r - m * n_tasks, m


def ref_iso_cts(
    base: np.ndarray, taus: Sequence[np.ndarray], fraction: float, alpha: float
) -> np.ndarray:
    n_tasks = len(taus)
    r = min(base.shape)
    k_c, m = ref_split(r, n_tasks, fraction)
    u, sigma, vt = np.linalg.svd(np.sum(taus, axis=0), full_matrices=False)
    u_c = u[:, :k_c]
    u_cols, s_vals, v_cols = [], [], []
    for tau in taus:
        residual = tau - u_c @ (u_c.T @ tau)
        ut, st, vtt = np.linalg.svd(residual, full_matrices=False)
        for i in range(m):
            u_cols.append(ut[:, i])
            s_vals.append(st[i])
            v_cols.append(vtt[i, :])
    for i in range(k_c):
        u_cols.append(u[:, i])
        s_vals.append(sigma[i])
        v_cols.append(vt[i, :])
    u_perp = ref_polar(np.stack(u_cols, axis=1))
    v_perp = ref_polar(np.stack(v_cols, axis=1))
    return base + alpha * float(np.mean(s_vals)) * (u_perp @ v_perp.T)


def ref_surrogates(taus: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """S = sum_t tau_t^T tau_t / n_t and B = sum_t tau_t tau_t^T tau_t / n_t, by loops."""
    d_out, d_in = taus[0].shape
    s, b = np.zeros((d_in, d_in)), np.zeros((d_out, d_in))
    for tau in taus:
        n = float(np.sum(tau * tau))
        if n == 0:
            continue
        s += tau.T @ tau / n
        b += (tau @ tau.T) @ tau / n
    return s, b


def ref_wudi_closed(
    base: np.ndarray, taus: Sequence[np.ndarray], ridge: float, scale: float
) -> np.ndarray:
    s, b = ref_surrogates(taus)
    a = s + ridge * np.trace(s) / s.shape[0] * np.eye(s.shape[0])
    return base + scale * np.linalg.solve(a.T, b.T).T


def ref_wudi_grad(tau: np.ndarray, taus: Sequence[np.ndarray]) -> np.ndarray:
    """d/dtau sum_t ||(tau - tau_t) tau_t^T||^2 / n_t
    = sum_t 2 ((tau - tau_t) tau_t^T) tau_t / n_t, one task at a time."""
    grad = np.zeros_like(tau)
    for tau_t in taus:
        grad += 2 * ((tau - tau_t) @ tau_t.T) @ tau_t / float(np.sum(tau_t * tau_t))
    return grad


def ref_wudi_adam(
    base: np.ndarray, taus: Sequence[np.ndarray], iterations: int, lr: float
) -> np.ndarray:
    """Adam (PyTorch's formulation, betas 0.9/0.999, eps 1e-8) from the sum, written out."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    x = np.sum(taus, axis=0)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for step in range(1, iterations + 1):
        g = ref_wudi_grad(x, taus)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + eps
        x = x - (lr / (1 - beta1**step)) * m / denom
    return base + x


def wudi_loss_autograd(tau: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The loss exactly as FusionBench writes it (stacked products, autograd-friendly)."""
    stacked = torch.stack(list(taus))
    norms = stacked.reshape(len(taus), -1).norm(dim=-1).square()
    product = (tau.unsqueeze(0) - stacked) @ stacked.transpose(1, 2)
    return (product.square() / norms[:, None, None]).sum()


# --- 2. formulas against the float64 references ----------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_tsv_reference(shape: tuple[int, int], n_tasks: int, alpha: float) -> None:
    base, experts = make(shape, n_tasks, seed=10 + n_tasks)
    weights = WEIGHTS[n_tasks]
    ctx = ctx_of("layer.weight", base, experts, weights)
    out = run("tsv", ctx, alpha=alpha)
    expected = ref_tsv(base, weighted_taus(base, experts, weights), alpha)
    assert_rel(out - base, expected - base, REL64)
    k = min(shape) // n_tasks
    assert ctx.diagnostics == {
        "rule": "matrix",
        "tasks": n_tasks,
        "rank_per_task": k,
        "rank": n_tasks * k,
    }


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_iso_c_reference(shape: tuple[int, int], n_tasks: int, alpha: float) -> None:
    base, experts = make(shape, n_tasks, seed=20 + n_tasks)
    weights = WEIGHTS[n_tasks]
    ctx = ctx_of("layer.weight", base, experts, weights)
    out = run("iso_c", ctx, alpha=alpha)
    expected = ref_iso_c(base, weighted_taus(base, experts, weights), alpha)
    assert_rel(out - base, expected - base, REL64)
    assert ctx.diagnostics["rule"] == "matrix" and ctx.diagnostics["rank"] == min(shape)


@pytest.mark.parametrize("shape", [*SHAPES, (9, 13), (13, 9)], ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0, 1.0])
def test_iso_cts_reference(shape: tuple[int, int], n_tasks: int, fraction: float) -> None:
    base, experts = make(shape, n_tasks, seed=30 + n_tasks)
    weights = WEIGHTS[n_tasks]
    ctx = ctx_of("layer.weight", base, experts, weights)
    out = run("iso_cts", ctx, common_space_fraction=fraction, alpha=1.2)
    expected = ref_iso_cts(base, weighted_taus(base, experts, weights), fraction, 1.2)
    assert_rel(out - base, expected - base, REL64)
    k_c, m = ref_split(min(shape), n_tasks, fraction)
    assert (ctx.diagnostics["common_rank"], ctx.diagnostics["rank_per_task"]) == (k_c, m)


def test_iso_cts_rank_split() -> None:
    # r = 5, T = 2, f = 0.8: k_c = 4, (5 - 4) / 2 = 0.5 rounds to even 0, so k_c = 5 (ISO-C);
    # r = 10, T = 3: k_c = 8, 2 / 3 rounds to 1, so k_c = 7 and m = 1.
    assert iso_cts.split_rank(5, 2, 0.8) == (5, 0)
    assert iso_cts.split_rank(10, 3, 0.8) == (7, 1)
    assert iso_cts.split_rank(768, 8, 0.8) == (616, 19)
    # f = 0 with r not a multiple of T: round(5 / 3) * 3 = 6 > 5 would make k_c negative;
    # Crucible takes m = floor(5 / 3) = 1 instead (k_c = 2).
    assert iso_cts.split_rank(5, 3, 0.0) == (2, 1)
    for r in range(1, 40):
        for n_tasks in range(1, 9):
            for f in (0.0, 0.1, 0.5, 0.8, 0.95, 1.0):
                k_c, m = iso_cts.split_rank(r, n_tasks, f)
                assert k_c >= 0 and m >= 0 and k_c + n_tasks * m == r


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("ridge", [1e-4, 1e-2])
def test_wudi_closed_form_reference(shape: tuple[int, int], n_tasks: int, ridge: float) -> None:
    base, experts = make(shape, n_tasks, seed=40 + n_tasks)
    weights = WEIGHTS[n_tasks]
    ctx = ctx_of("layer.weight", base, experts, weights)
    out = run("wudi", ctx, ridge=ridge, scale=0.9, solver="closed_form")
    expected = ref_wudi_closed(base, weighted_taus(base, experts, weights), ridge, 0.9)
    assert_rel(out - base, expected - base, REL64)
    diag = ctx.diagnostics
    assert diag["solver"] == "closed_form" and diag["solve"] == "cholesky"
    assert diag["loss_after"] < diag["loss_before"]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_wudi_adam_reference(shape: tuple[int, int], n_tasks: int) -> None:
    base, experts = make(shape, n_tasks, seed=50 + n_tasks)
    weights = WEIGHTS[n_tasks]
    ctx = ctx_of("layer.weight", base, experts, weights)
    out = run("wudi", ctx, solver="adam", iterations=60, lr=1e-3)
    expected = ref_wudi_adam(base, weighted_taus(base, experts, weights), 60, 1e-3)
    # Adam divides by sqrt(v): float64 rounding of the gradient (a different association
    # here) moves the result by ~1e-15 relative per step.
    assert_rel(out - base, expected - base, 1e-9)
    assert ctx.diagnostics["iterations"] == 60
    assert ctx.diagnostics["loss_after"] < ctx.diagnostics["loss_before"]


# --- 1. properties (merge-math.md section 12) -------------------------------------------------


@pytest.mark.parametrize("shape", [*SHAPES, (6, 6)], ids=str)
def test_tsv_single_expert_reconstructs_tau(shape: tuple[int, int]) -> None:
    base, experts = make(shape, 1, seed=60)
    out = run("tsv", ctx_of("w", base, experts, [1.0]))
    assert_rel(out - base, experts[0] - base, 1e-12)
    out = run("tsv", ctx_of("w", base, experts, [1.0]), alpha=0.5)
    assert_rel(out - base, 0.5 * (experts[0] - base), 1e-12)


def test_tsv_more_experts_than_rank_keeps_base() -> None:
    base, experts = make((5, 2), 3, seed=61)  # r = 2 < T = 3: k = 0, as FusionBench
    ctx = ctx_of("w", base, experts, WEIGHTS[3])
    np.testing.assert_array_equal(run("tsv", ctx), base)
    assert ctx.diagnostics["rank_per_task"] == 0 and "note" in ctx.diagnostics


def flat_tau(shape: tuple[int, int], seed: int, c: float = 0.3) -> np.ndarray:
    """c times a matrix with orthonormal columns (or rows): every singular value is c."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(max(shape), min(shape))))
    return c * (q if shape[0] >= shape[1] else q.T)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_identical_experts_iso_c(shape: tuple[int, int], n_tasks: int) -> None:
    base = np.random.default_rng(70).normal(size=shape)
    # A flat-spectrum tau: ISO-C returns the scaled sum W0 + alpha * T * tau.
    tau = flat_tau(shape, seed=71)
    out = run("iso_c", ctx_of("w", base, [base + tau] * n_tasks, [1.0] * n_tasks), alpha=0.7)
    assert_rel(out - base, 0.7 * n_tasks * tau, 1e-12)
    # A general tau: the isotropic version of the sum, alpha * T * mean(sigma) * polar(tau).
    tau = 0.1 * np.random.default_rng(72).normal(size=shape)
    out = run("iso_c", ctx_of("w", base, [base + tau] * n_tasks, [1.0] * n_tasks), alpha=0.7)
    sigma_bar = ref_nuclear(tau) / min(shape)
    assert_rel(out - base, 0.7 * n_tasks * sigma_bar * ref_polar(tau), REL64)
    # With the whole rank as the common space, ISO-CTS is ISO-C.
    out_cts = run(
        "iso_cts",
        ctx_of("w", base, [base + tau] * n_tasks, [1.0] * n_tasks),
        alpha=0.7,
        common_space_fraction=1.0,
    )
    assert_rel(out_cts - base, out - base, REL64)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_identical_experts_tsv_top_block(shape: tuple[int, int], n_tasks: int) -> None:
    """Degenerate (module docstring): only the block on tau's top-k singular subspace is
    determined, and it is tau's own top-k spectrum, i.e. the mean, not the sum."""
    base = np.random.default_rng(73).normal(size=shape)
    tau = 0.1 * np.random.default_rng(74).normal(size=shape)
    out = run("tsv", ctx_of("w", base, [base + tau] * n_tasks, [1.0] * n_tasks))
    u, s, vt = np.linalg.svd(tau, full_matrices=False)
    k = min(shape) // n_tasks
    block = u[:, :k].T @ (out - base) @ vt[:k].T
    assert_rel(block, np.diag(s[:k]), 1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [1, 2, 3])
def test_identical_experts_wudi_returns_tau(shape: tuple[int, int], n_tasks: int) -> None:
    """The loss T ||(x - tau) tau^T||^2 / ||tau||^2 is zero at x = tau (the minimiser with no
    component outside tau's row space); the scale applies on top."""
    base = np.random.default_rng(75).normal(size=shape)
    tau = 0.1 * np.random.default_rng(76).normal(size=shape)
    experts = [base + tau] * n_tasks
    if shape[0] >= shape[1]:
        # No ridge, S = T tau^T tau / ||tau||^2 nonsingular: exact.
        ctx = ctx_of("w", base, experts, [1.0] * n_tasks)
        out = run("wudi", ctx, ridge=0.0, scale=0.5, solver="closed_form")
        assert ctx.diagnostics["solve"] == "cholesky"
        assert_rel(out - base, 0.5 * tau, 1e-10)
    # The default ridge (1e-4 relative) shrinks by at most ~eps * tr(S) / (d_in * lambda_min).
    out = run("wudi", ctx_of("w", base, experts, [1.0] * n_tasks), solver="closed_form")
    assert_rel(out - base, tau, 1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_flat_spectrum(shape: tuple[int, int], n_tasks: int, method: str) -> None:
    base, experts = make(shape, n_tasks, seed=80 + n_tasks)
    ctx = ctx_of("w", base, experts, WEIGHTS[n_tasks])
    out = run(method, ctx, alpha=1.0)
    sv = np.linalg.svd(out - base, compute_uv=False)
    assert len(sv) == min(shape)
    np.testing.assert_allclose(sv, sv.mean(), rtol=1e-12)
    np.testing.assert_allclose(sv.mean(), ctx.diagnostics["sigma_mean"], rtol=1e-12)
    # Even with identical experts (degenerate bases) the output spectrum is flat.
    same = run(method, ctx_of("w", base, [experts[0]] * n_tasks, [1.0] * n_tasks))
    sv = np.linalg.svd(same - base, compute_uv=False)
    np.testing.assert_allclose(sv, sv.mean(), rtol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)], ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_wudi_closed_form_is_stationary(shape: tuple[int, int], n_tasks: int) -> None:
    """Ridge 0 on a full-rank case (T * min(d_out, d_in) >= d_in, so S is nonsingular):
    autograd's gradient of the loss as FusionBench writes it vanishes at the closed form."""
    base, experts = make(shape, n_tasks, seed=90 + n_tasks)
    weights = WEIGHTS[n_tasks]
    ctx = ctx_of("w", base, experts, weights)
    out = merge("wudi", ctx, ridge=0.0, solver="closed_form")
    assert ctx.diagnostics["solve"] == "cholesky" and ctx.diagnostics["ridge"] == 0.0
    taus = [torch.from_numpy(t) for t in weighted_taus(base, experts, weights)]
    grads = []
    for point in (out - ctx.base, sum(taus)):
        x = point.clone().requires_grad_(True)
        wudi_loss_autograd(x, taus).backward()
        assert x.grad is not None
        grads.append(float(x.grad.abs().max()))
    at_solution, at_init = grads
    assert at_solution < 1e-12 * at_init


def test_wudi_closed_form_singular_s_is_pseudo_inverse() -> None:
    """S singular (T * d_out = 4 < d_in = 7): a small ridge gives B S^+ (no component outside
    the task vectors' row spaces), which is stationary. Ridge 0: Cholesky fails on the
    singular S and solve_right_spd goes to the eigh pseudo-inverse, the same B S^+; the
    diagnostics record the fallback."""
    base, experts = make((2, 7), 2, seed=95)
    taus = weighted_taus(base, experts, [1.0, 1.0])
    s, b = ref_surrogates(taus)
    expected = b @ np.linalg.pinv(s, rcond=1e-10)
    out = (
        run("wudi", ctx_of("w", base, experts, [1.0, 1.0]), ridge=1e-9, solver="closed_form") - base
    )
    assert_rel(out, expected, 1e-6)
    np.testing.assert_allclose(ref_wudi_grad(out, taus), 0, atol=1e-6 * np.abs(b).max())
    ctx = ctx_of("w", base, experts, [1.0, 1.0])
    out = run("wudi", ctx, ridge=0.0, solver="closed_form") - base
    assert ctx.diagnostics["solve"] == "eigh_pinv" and "fallback" in ctx.diagnostics
    assert_rel(out, expected, 1e-8)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)], ids=str)
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_wudi_closed_form_is_the_long_run_adam_limit(shape: tuple[int, int], n_tasks: int) -> None:
    """Adam from the sum, 2000 steps at each of lr 1e-2, 1e-3, ..., 1e-6 in float64 (Crucible's
    own Adam, checked against FusionBench below), reaches the ridge-0 closed form to 1e-5
    relative (observed <= 1e-6 over 24 random cases). A single constant lr does not settle:
    Adam's steps stay ~lr near the optimum, so the lr is decreased in stages."""
    base, experts = make(shape, n_tasks, seed=100 + n_tasks)
    weights = WEIGHTS[n_tasks]
    closed = (
        run("wudi", ctx_of("w", base, experts, weights), ridge=0.0, solver="closed_form") - base
    )
    taus = [torch.from_numpy(t) for t in weighted_taus(base, experts, weights)]
    norms = [float(t.square().sum()) for t in taus]
    s, b = wudi.surrogate_grams(taus, norms)
    x = sum(taus[1:], taus[0].clone())
    for lr in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        x = wudi.adam(x, s, b, iterations=2000, lr=lr)
    assert_rel(x.numpy(), closed, 1e-5)


def test_wudi_adam_is_deterministic_and_lowers_the_loss() -> None:
    base, experts = make((12, 9), 3, seed=110)
    outs = []
    for _ in range(2):
        ctx = ctx_of("w", base, experts, WEIGHTS[3])
        outs.append(merge("wudi", ctx, solver="adam"))
        assert ctx.diagnostics["loss_after"] < ctx.diagnostics["loss_before"]
    assert torch.equal(outs[0], outs[1])


def test_wudi_zero_task_vectors() -> None:
    """An expert equal to the base has no loss term (FusionBench would divide 0 by 0)."""
    base, experts = make((6, 5), 2, seed=111)
    ctx = ctx_of("w", base, [*experts, base], [1.0] * 3)
    with_zero = run("wudi", ctx, solver="closed_form")
    assert ctx.diagnostics["zero_task_vectors"] == 1
    without = run("wudi", ctx_of("w", base, experts, [1.0] * 2), solver="closed_form")
    # Same loss terms; the relative ridge differs only through tr(S), the same here.
    assert_rel(with_zero - base, without - base, 1e-12)
    adam = run("wudi", ctx_of("w", base, [*experts, base], [1.0] * 3), solver="adam")
    assert np.isfinite(adam).all()
    ctx = ctx_of("w", base, [base, base], [1.0, 1.0])
    np.testing.assert_array_equal(run("wudi", ctx, solver="closed_form"), base)
    assert ctx.diagnostics["zero_task_vectors"] == 2


NON_MATRIX = {
    "scalar": (),
    "layer.bias": (7,),
    "patch_embed.weight": (3, 2, 2, 2),
    "text_projection": (6, 4),  # 2-D but excluded by name (merge-math.md section 0)
}


@pytest.mark.parametrize("name", list(NON_MATRIX))
@pytest.mark.parametrize(
    ("method", "params", "scale"),
    [
        ("tsv", {"alpha": 0.8}, 0.8),
        ("iso_c", {"alpha": 1.5}, 1.5),
        ("iso_cts", {"alpha": 1.5}, 1.5),
        ("wudi", {"scale": 0.9}, 0.9),
        ("wudi", {"scale": 0.9, "solver": "adam"}, 0.9),
    ],
)
def test_non_matrix_tensors_take_the_mean(
    name: str, method: str, params: dict[str, Any], scale: float
) -> None:
    base, experts = make(NON_MATRIX[name], 3, seed=120)
    ctx = ctx_of(name, base, experts, WEIGHTS[3])
    out = run(method, ctx, **params)
    expected = ref_mean_rule(base, weighted_taus(base, experts, WEIGHTS[3]), scale)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)
    assert ctx.diagnostics == {"rule": "mean", "tasks": 3}


@pytest.mark.parametrize(
    ("name", "shape", "optimised"),
    [
        ("visual.transformer.resblocks.0.attn.in_proj_weight", (12, 4), True),
        ("visual.transformer.resblocks.0.attn.out_proj.weight", (4, 4), True),
        ("visual.transformer.resblocks.0.mlp.c_fc.weight", (16, 4), True),
        ("visual.transformer.resblocks.0.mlp.c_proj.weight", (4, 16), True),
        ("visual.transformer.resblocks.0.attn.out_proj.bias", (4,), False),
        ("visual.transformer.resblocks.0.ln_1.weight", (4,), False),
        ("model.layers.0.self_attn.q_proj.weight", (8, 8), False),
        ("visual.conv1.weight", (4, 3, 2, 2), False),
    ],
)
def test_wudi_official_scope(name: str, shape: tuple[int, ...], optimised: bool) -> None:
    base, experts = make(shape, 3, seed=130)
    ctx = ctx_of(name, base, experts, WEIGHTS[3])
    out = run("wudi", ctx, scope="official")
    if optimised:
        everywhere = run("wudi", ctx_of(name, base, experts, WEIGHTS[3]))
        np.testing.assert_array_equal(out, everywhere)
        assert ctx.diagnostics["rule"] == "matrix"
    else:
        np.testing.assert_array_equal(out, base)  # stays at W0, whatever the scale
        assert ctx.diagnostics == {"rule": "base", "tasks": 3}


@pytest.mark.parametrize("method", SUBSPACE)
def test_float32_and_devices(method: str) -> None:
    """Whatever dtype and device the pipeline hands over come back; float32 agrees with
    float64 to float32 accuracy (random, well-conditioned inputs)."""
    base, experts = make((9, 6), 3, seed=140)
    expected = run(method, ctx_of("w", base, experts, WEIGHTS[3]))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        ctx = ctx_of("w", base, experts, WEIGHTS[3], dtype=torch.float32, device=device)
        out = merge(method, ctx).double().cpu().numpy()
        assert_rel(out - base, expected - base, 1e-4)


def test_transposed_views_are_accepted() -> None:
    """The pipeline hands GPT-2 Conv1D weights over as transposed (non-contiguous) views."""
    base, experts = make((6, 9), 2, seed=150)
    for method in SUBSPACE:
        plain = run(method, ctx_of("w", base, experts, WEIGHTS[2]))
        t = [torch.from_numpy(np.ascontiguousarray(a.T)).T for a in (base, *experts)]
        ctx = TensorContext(name="w", base=t[0], experts=t[1:], weights=WEIGHTS[2])
        assert not ctx.base.is_contiguous()
        assert_rel(run(method, ctx) - base, plain - base, 1e-12)


# --- params, registry, import hygiene ---------------------------------------------------------


def test_params_defaults_and_validation() -> None:
    assert tsv.Params().alpha == 1.0
    assert iso_c.Params().alpha == 1.0
    assert iso_cts.Params().common_space_fraction == 0.8 and iso_cts.Params().alpha == 1.0
    p = wudi.Params()
    assert (p.solver, p.ridge, p.iterations, p.lr, p.scope, p.scale) == (
        "adam",
        1e-4,
        300,
        1e-5,
        "all_matrices",
        1.0,
    )
    for bad in (
        lambda: tsv.Params(rank=3),
        lambda: iso_cts.Params(common_space_fraction=1.5),
        lambda: iso_c.Params(alpha=float("nan")),
        lambda: wudi.Params(solver="sgd"),
        lambda: wudi.Params(scope="attention"),
        lambda: wudi.Params(ridge=-1.0),
        lambda: wudi.Params(lr=0.0),
        lambda: wudi.Params(iterations=-1),
    ):
        with pytest.raises(ValidationError):
            bad()
    for method in SUBSPACE:
        info = METHODS[method]
        assert info.matrix and not info.elementwise and not info.needs
        for field_name, field in info.params.model_fields.items():
            assert field.description, f"{method}.{field_name} has no description"


def test_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from crucible.methods import iso_c, iso_cts, tsv, wudi\n"
        "from crucible.methods.registry import METHODS\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        f"assert set({list(SUBSPACE)!r}) <= set(METHODS)\n"
        f"print([METHODS[m].params.model_json_schema()['title'] for m in {list(SUBSPACE)!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- 3. parity with FusionBench 0.2.33 --------------------------------------------------------
#
# FusionBench's functions take task vectors and return the merged task vector; its algorithm
# classes then add alpha * that to W0 (TSVM with a scalar alpha, IsotropicMerging's
# scaling_factor) and, for a per-task alpha list (TSVM), scale the task vectors first. So the
# comparison is Crucible's W - W0 against alpha * FusionBench(w_t tau_t).
#
# Deliberate differences, and how the comparison matches them:
# - text_projection: Crucible's subspace methods always treat it as non-matrix (the mean);
#   FusionBench's functions only do so when it is in exclude_keys (TSVM.py and the ISO
#   classes take exclude_keys from the config; its WUDI config has none, the HF CLIP vision
#   models FusionBench merges have no text_projection). Passed as exclude_keys here.
# - WUDI: Crucible defaults to the closed form (the minimiser of the loss; deterministic, one
#   solve) where FusionBench runs Adam (lr 1e-5, its config 400 steps, its function and the
#   paper 300). Its Adam is reproduced with solver="adam" and iterations 400 or 300.
#   scope="all_matrices" (Crucible's default) is FusionBench's rule (every 2-D tensor, the
#   rest averaged); the paper's code ("official") optimises four OpenCLIP module patterns
#   and leaves the rest at W0, which FusionBench cannot express.
# - TSV-M rank per task: floor(r / T) here, int(r * (1 / T)) there: equal for every r when
#   T < 49 (float rounding of 1/49 makes them differ at T = 49).

FB_SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.in_proj_weight": (12, 7),
    "blocks.0.attn.out_proj.weight": (7, 7),
    "blocks.0.mlp.c_fc.weight": (16, 7),
    "blocks.0.mlp.c_proj.weight": (7, 16),
    "blocks.0.mlp.c_fc.bias": (16,),
    "blocks.0.ln_1.weight": (7,),
    "conv1.weight": (4, 3, 2, 2),
    "text_projection": (7, 5),
    "narrow.weight": (5, 2),  # r = 2 < T = 3: TSV-M keeps nothing (both sides)
    "odd.weight": (5, 9),  # r = 5, T = 2: ISO-CTS's (5 - 4) / 2 = 0.5 rounds to 0
}
EXCLUDE = ["text_projection"]
FB_WEIGHTS = {2: [1.0, 1.0], 3: [0.7, 1.3, 1.0]}
F64, F32 = 0, 1  # input draws: the float64 jobs, and the float32 WUDI jobs
# Float64 on both sides: the same factorisations in a different order agree to ~1e-14
# relative (observed), any semantic difference is O(1).
FB_REL64 = 1e-11
# Float32 WUDI-Adam (FusionBench's working dtype) against Crucible's float32 and float64 runs:
# observed ~1e-6 of the largest entry; the Adam displacement itself is ~0.5 of it.
FB_REL32 = 2e-5


def fb_inputs(
    n_tasks: int, variant: int
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Base and expert tensors (float64 numpy), task vectors ~1e-2 of a unit base; one
    random draw per (n_tasks, variant)."""
    rng = np.random.default_rng(1000 + 10 * variant + n_tasks)
    base = {name: rng.normal(size=shape) for name, shape in FB_SHAPES.items()}
    experts = [
        {name: b + 0.01 * rng.normal(size=b.shape) for name, b in base.items()}
        for _ in range(n_tasks)
    ]
    return base, experts


def fb_task_vectors(
    base: dict[str, np.ndarray],
    experts: list[dict[str, np.ndarray]],
    weights: Sequence[float],
    dtype: torch.dtype,
) -> list[dict[str, torch.Tensor]]:
    return [
        {name: torch.from_numpy(w * (e[name] - base[name])).to(dtype) for name in base}
        for e, w in zip(experts, weights, strict=True)
    ]


def regmean_inputs() -> tuple[dict[str, list[torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Two experts' weights (nn.Linear layout) and input Grams for one linear module, plus a
    bias that has no Gram."""
    rng = np.random.default_rng(2000)
    weights = [torch.from_numpy(rng.normal(size=(6, 4))) for _ in range(2)]
    biases = [torch.from_numpy(rng.normal(size=(6,))) for _ in range(2)]
    xs = [rng.normal(size=(20, 4)) for _ in range(2)]
    grams = [{"lin": torch.from_numpy(x.T @ x / len(x))} for x in xs]
    return {"lin.weight": weights, "lin.bias": biases}, grams


@pytest.fixture(scope="module")
def fusionbench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """Every FusionBench run of this module, in one process (importing it takes seconds)."""
    require_fusionbench()
    jobs: dict[str, Job] = {}
    for n_tasks in (2, 3):
        base, experts = fb_inputs(n_tasks, F64)
        tv = fb_task_vectors(base, experts, FB_WEIGHTS[n_tasks], torch.float64)
        jobs[f"tsv/{n_tasks}"] = tsvm_job(tv, EXCLUDE)
        jobs[f"iso_c/{n_tasks}"] = iso_c_job(tv, EXCLUDE)
        for f in (0.8, 0.5):
            jobs[f"iso_cts/{f}/{n_tasks}"] = iso_cts_job(tv, f, EXCLUDE)
        jobs[f"wudi/400/float64/{n_tasks}"] = wudi_job(tv, 400, EXCLUDE)
        base32, experts32 = fb_inputs(n_tasks, F32)
        tv32 = fb_task_vectors(base32, experts32, FB_WEIGHTS[n_tasks], torch.float32)
        for iters in (300, 400):
            jobs[f"wudi/{iters}/float32/{n_tasks}"] = wudi_job(tv32, iters, EXCLUDE)
    params, grams = regmean_inputs()
    jobs["regmean"] = regmean_job(params, grams)
    return run_fusionbench(jobs, tmp_path_factory.mktemp("fusionbench"))


def ours(
    method: str,
    n_tasks: int,
    dtype: torch.dtype,
    *,
    variant: int = 0,
    zero_base: bool = False,
    **params: Any,
) -> dict[str, np.ndarray]:
    """Crucible's merged task vector W - W0 per tensor, as float64 numpy."""
    base, experts = fb_inputs(n_tasks, variant)
    if zero_base:  # float32 runs: compare the task-vector arithmetic, not W0 + tau rounding
        experts = [{n: e[n] - base[n] for n in base} for e in experts]
        base = {n: np.zeros_like(b) for n, b in base.items()}
    out = {}
    for name in FB_SHAPES:
        ctx = ctx_of(name, base[name], [e[name] for e in experts], FB_WEIGHTS[n_tasks], dtype)
        merged = merge(method, ctx, **params)
        out[name] = (merged.double() - ctx.base.double()).numpy()
    return out


def compare(mine: dict[str, np.ndarray], theirs: dict[str, torch.Tensor], rel: float) -> None:
    assert set(theirs) == set(FB_SHAPES)
    for name, value in mine.items():
        expected = theirs[name].double().numpy()
        if not np.abs(expected).max():  # TSV-M on narrow.weight with T = 3: both zero
            np.testing.assert_array_equal(value, expected, err_msg=name)
            continue
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(value, expected, rtol=0, atol=rel * scale, err_msg=name)


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_fusionbench_tsv(
    fusionbench: dict[str, dict[str, torch.Tensor]], n_tasks: int, alpha: float
) -> None:
    theirs = {k: alpha * v for k, v in fusionbench[f"tsv/{n_tasks}"].items()}
    compare(ours("tsv", n_tasks, torch.float64, alpha=alpha), theirs, FB_REL64)


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_fusionbench_iso_c(
    fusionbench: dict[str, dict[str, torch.Tensor]], n_tasks: int, alpha: float
) -> None:
    theirs = {k: alpha * v for k, v in fusionbench[f"iso_c/{n_tasks}"].items()}
    compare(ours("iso_c", n_tasks, torch.float64, alpha=alpha), theirs, FB_REL64)


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_fusionbench_iso_cts(
    fusionbench: dict[str, dict[str, torch.Tensor]], n_tasks: int, fraction: float
) -> None:
    mine = ours("iso_cts", n_tasks, torch.float64, common_space_fraction=fraction)
    compare(mine, fusionbench[f"iso_cts/{fraction}/{n_tasks}"], FB_REL64)


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_fusionbench_wudi_adam_float64(
    fusionbench: dict[str, dict[str, torch.Tensor]], n_tasks: int
) -> None:
    mine = ours("wudi", n_tasks, torch.float64, solver="adam", iterations=400)
    compare(mine, fusionbench[f"wudi/400/float64/{n_tasks}"], FB_REL64)


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("iterations", [300, 400])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fusionbench_wudi_adam_float32_reference(
    fusionbench: dict[str, dict[str, torch.Tensor]],
    n_tasks: int,
    iterations: int,
    dtype: torch.dtype,
) -> None:
    """FusionBench's Adam in float32 (its dtype) against Crucible's Adam in float32 and in
    float64 (what the pipeline uses for modules that fit)."""
    mine = ours(
        "wudi", n_tasks, dtype, variant=F32, zero_base=True, solver="adam", iterations=iterations
    )
    compare(mine, fusionbench[f"wudi/{iterations}/float32/{n_tasks}"], FB_REL32)


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_fusionbench_wudi_closed_form_is_the_minimiser(
    fusionbench: dict[str, dict[str, torch.Tensor]], n_tasks: int
) -> None:
    """The closed form (ridge 1e-4) is not FusionBench's 400 Adam steps (the default
    solver, checked against them above): it is the point those steps move toward, and its
    loss is lower than theirs on every matrix."""
    base, experts = fb_inputs(n_tasks, F64)
    theirs = fusionbench[f"wudi/400/float64/{n_tasks}"]
    mine = ours("wudi", n_tasks, torch.float64, solver="closed_form")
    for name, shape in FB_SHAPES.items():
        if len(shape) != 2 or name in EXCLUDE:
            continue
        taus = [
            torch.from_numpy(w * (e[name] - base[name]))
            for e, w in zip(experts, FB_WEIGHTS[n_tasks], strict=True)
        ]
        start = float(wudi_loss_autograd(sum(taus[1:], taus[0].clone()), taus))
        fb_loss = float(wudi_loss_autograd(theirs[name].double(), taus))
        our_loss = float(wudi_loss_autograd(torch.from_numpy(mine[name]), taus))
        assert our_loss < fb_loss < start, name


def test_fusionbench_runner_regmean(fusionbench: dict[str, dict[str, torch.Tensor]]) -> None:
    """The runner's RegMean entry point (for the regmean parity tests): FusionBench's
    merging_with_regmean_weights gives (sum_t W_t G_t)(sum_t G_t)^{-1} in nn.Linear layout,
    and the mean for parameters without a Gram."""
    params, grams = regmean_inputs()
    w = [t.numpy() for t in params["lin.weight"]]
    g = [d["lin"].numpy() for d in grams]
    expected = (w[0] @ g[0] + w[1] @ g[1]) @ np.linalg.inv(g[0] + g[1])
    out = fusionbench["regmean"]
    assert_rel(out["lin.weight"].numpy(), expected, 1e-12)
    bias = (params["lin.bias"][0] + params["lin.bias"][1]).numpy() / 2
    assert_rel(out["lin.bias"].numpy(), bias, 1e-15)
