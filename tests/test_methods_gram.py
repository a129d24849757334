"""RegMean, ACE and BMM against independent float64 numpy transcriptions of merge-math.md
sections 5, 9 and 10.3, written out here (plain numpy, explicit loops, np.linalg.solve) and
sharing no code with crucible.methods; plus the limits and properties the spec names.

Weights are in nn.Linear layout (d_out x d_in), non-square, with T = 2 and 3 experts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from crucible.methods import ace, bmm, regmean
from crucible.methods.base import TensorContext
from crucible.methods.registry import METHODS
from tests.support.reference import ref_task_arithmetic

REPO = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-10, "atol": 1e-12}
SHAPES = [(5, 4), (3, 6)]  # (d_out, d_in): tall and wide
WEIGHTS = {2: [0.7, 1.3], 3: [0.7, 0.4, 1.3]}


# --- helpers -----------------------------------------------------------------------------------


def make(
    shape: tuple[int, ...], n_experts: int, seed: int, spreads: list[float] | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and experts base + spread_t * noise (spread 0.1 unless given)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    spreads = spreads or [0.1] * n_experts
    return base, [base + s * rng.normal(size=shape) for s in spreads]


def random_grams(d_in: int, n_experts: int, seed: int, n: int = 32) -> list[np.ndarray]:
    """G_t = X_t^T X_t / n_t, full rank, with uneven feature scales."""
    rng = np.random.default_rng(seed)
    grams = []
    for _ in range(n_experts):
        x = rng.normal(size=(n, d_in)) * rng.uniform(0.2, 3.0, size=d_in)
        grams.append(x.T @ x / n)
    return grams


def ctx_of(
    name: str,
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float] | None = None,
    grams: list[np.ndarray] | None = None,
) -> TensorContext:
    return TensorContext(
        name=name,
        base=torch.from_numpy(np.array(base)),
        experts=[torch.from_numpy(np.array(e)) for e in experts],
        weights=list(weights) if weights is not None else [1.0] * len(experts),
        grams=[torch.from_numpy(np.array(g)) for g in grams] if grams is not None else None,
    )


def run(method: str, ctx: TensorContext, **params: Any) -> np.ndarray:
    info = METHODS[method]
    out = info.merge(ctx, info.params(**params))
    assert out.dtype == ctx.base.dtype and out.shape == ctx.base.shape
    json.dumps(ctx.diagnostics)  # the report stores it
    return out.numpy()


def right_solve(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """B A^{-1} without an inverse: solve A^T X^T = B^T."""
    return np.linalg.solve(a.T, b.T).T


def shrink(g: np.ndarray, alpha: float) -> np.ndarray:
    out = np.array(g, dtype=float)
    d = g.shape[0]
    for i in range(d):
        for j in range(d):
            if i != j:
                out[i, j] = alpha * g[i, j]
    return out


# --- RegMean (section 5) -----------------------------------------------------------------------


def ref_regmean(
    experts: list[np.ndarray],
    grams: list[np.ndarray],
    weights: list[float],
    alpha: float,
    ridge: float = 0.0,
    base: np.ndarray | None = None,
) -> np.ndarray:
    """(sum beta_t W_t G~_t)(sum beta_t G~_t)^{-1}; with a ridge, in task-vector space."""
    d_in = grams[0].shape[0]
    a = np.zeros((d_in, d_in))
    for g, w in zip(grams, weights, strict=True):
        a = a + w * shrink(g, alpha)
    if ridge == 0:
        b = np.zeros_like(experts[0])
        for e, g, w in zip(experts, grams, weights, strict=True):
            b = b + w * e @ shrink(g, alpha)
        return right_solve(b, a)
    assert base is not None
    b = np.zeros_like(base)
    for e, g, w in zip(experts, grams, weights, strict=True):
        b = b + w * (e - base) @ shrink(g, alpha)
    return base + right_solve(b, a + ridge * np.trace(a) / d_in * np.eye(d_in))


@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_regmean_matches_numpy(
    n_experts: int, shape: tuple[int, int], alpha: float, weighted: bool
) -> None:
    base, experts = make(shape, n_experts, seed=1)
    grams = random_grams(shape[1], n_experts, seed=2)
    weights = WEIGHTS[n_experts] if weighted else [1.0] * n_experts
    ctx = ctx_of("h.0.attn.c_attn.weight", base, experts, weights, grams)
    out = run("regmean", ctx, alpha=alpha, ridge=0.0)
    np.testing.assert_allclose(out, ref_regmean(experts, grams, weights, alpha), **TOL)
    assert ctx.grams is not None  # the method leaves the job's Grams as they were
    for given, kept in zip(grams, ctx.grams, strict=True):
        np.testing.assert_array_equal(kept.numpy(), given)
    assert ctx.diagnostics["rule"] == "regmean"
    assert ctx.diagnostics["solve"] == "cholesky" and ctx.diagnostics["ridge"] == 0.0


def test_regmean_relative_ridge_and_scale() -> None:
    base, experts = make((5, 4), 3, seed=3)
    grams = random_grams(4, 3, seed=4)
    ctx = ctx_of("w", base, experts, WEIGHTS[3], grams)
    out = run("regmean", ctx, alpha=0.8, ridge=0.05, scale=0.5)
    merged = ref_regmean(experts, grams, WEIGHTS[3], 0.8, ridge=0.05, base=base)
    np.testing.assert_allclose(out, base + 0.5 * (merged - base), **TOL)
    a = sum(w * g for w, g in zip(WEIGHTS[3], grams, strict=True))
    assert math.isclose(ctx.diagnostics["ridge"], 0.05 * np.trace(a) / 4, rel_tol=1e-12)
    # The ridge shrinks toward W0: a huge one returns the base.
    far = run("regmean", ctx_of("w", base, experts, WEIGHTS[3], grams), ridge=1e12)
    np.testing.assert_allclose(far, base, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_experts", [2, 3])
def test_regmean_identity_grams_give_the_mean(n_experts: int) -> None:
    base, experts = make((3, 6), n_experts, seed=5)
    eye = [np.eye(6)] * n_experts
    out = run("regmean", ctx_of("w", base, experts, None, eye), alpha=0.95, ridge=0.0)
    np.testing.assert_allclose(out, sum(experts) / n_experts, **TOL)
    # Weights are Gram multipliers: G_t = I gives the weighted average.
    w = WEIGHTS[n_experts]
    out = run("regmean", ctx_of("w", base, experts, w, eye), ridge=0.0)
    expected = sum(wt * e for wt, e in zip(w, experts, strict=True)) / sum(w)
    np.testing.assert_allclose(out, expected, **TOL)


def test_regmean_alpha_zero_is_a_per_feature_weighted_average() -> None:
    base, experts = make((5, 4), 3, seed=6)
    grams = random_grams(4, 3, seed=7)
    out = run("regmean", ctx_of("w", base, experts, None, grams), alpha=0.0, ridge=0.0)
    expected = np.zeros_like(base)
    for j in range(4):
        num = sum(e[:, j] * g[j, j] for e, g in zip(experts, grams, strict=True))
        expected[:, j] = num / sum(g[j, j] for g in grams)
    np.testing.assert_allclose(out, expected, **TOL)
    # alpha scales the off-diagonal entries only.
    g = torch.from_numpy(grams[0])
    shrunk = regmean.shrink_off_diagonal(g, 0.4).numpy()
    np.testing.assert_allclose(shrunk, shrink(grams[0], 0.4), rtol=0, atol=0)
    assert not np.allclose(shrunk, grams[0])


@pytest.mark.parametrize("n_experts", [2, 3])
def test_regmean_identical_experts_return_the_expert(n_experts: int) -> None:
    base, (expert,) = make((5, 4), 1, seed=8)
    grams = random_grams(4, n_experts, seed=9)
    ctx = ctx_of("w", base, [expert] * n_experts, WEIGHTS[n_experts], grams)
    np.testing.assert_allclose(run("regmean", ctx, ridge=0.0), expert, **TOL)
    # The default relative ridge (1e-4) shrinks toward W0 by about that much.
    ctx = ctx_of("w", base, [expert] * n_experts, None, grams)
    np.testing.assert_allclose(run("regmean", ctx), expert, rtol=0, atol=1e-3)


def test_regmean_gpt2_conv1d_orientation() -> None:
    """A Conv1D weight is stored d_in x d_out (y = x W). The pipeline transposes it to
    nn.Linear layout, where RegMean is (sum W_t G)(sum G)^{-1}; transposed back this is the
    often-quoted (sum G)^{-1} sum G W_t^conv. Feeding the Conv1D layout straight to the
    Linear formula is a different (wrong) merge when it is square, and a shape error when
    it is not."""
    d = 4
    base_lin, experts_lin = make((d, d), 2, seed=10)
    grams = random_grams(d, 2, seed=11)
    conv_base = base_lin.T
    conv_experts = [e.T for e in experts_lin]

    # Correct: transpose to Linear, merge, transpose back.
    lin_ctx = ctx_of("h.0.mlp.c_fc.weight", conv_base.T, [e.T for e in conv_experts], None, grams)
    correct_conv = run("regmean", lin_ctx, alpha=1.0, ridge=0.0).T
    quoted = np.linalg.solve(
        sum(grams), sum(g @ e for g, e in zip(grams, conv_experts, strict=True))
    )
    np.testing.assert_allclose(correct_conv, quoted, **TOL)

    # Naive: the Linear formula applied to the Conv1D layout.
    naive_ctx = ctx_of("h.0.mlp.c_fc.weight", conv_base, conv_experts, None, grams)
    naive_conv = run("regmean", naive_ctx, alpha=1.0, ridge=0.0)
    assert np.abs(naive_conv - correct_conv).max() > 1e-2

    # Non-square Conv1D weight (d_in 4 x d_out 6) in the wrong layout: the Gram does not fit.
    base_wide, experts_wide = make((4, 6), 2, seed=12)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*\(4, 4\).*\(4, 6\)"):
        run("regmean", ctx_of("h.1.mlp.c_fc.weight", base_wide, experts_wide, None, grams))


def test_regmean_tensors_without_grams_take_the_weighted_mean() -> None:
    base, experts = make((6,), 3, seed=13)
    w = WEIGHTS[3]
    expected = base + sum(wt * (e - base) for wt, e in zip(w, experts, strict=True)) / sum(w)
    ctx = ctx_of("h.0.ln_1.bias", base, experts, w)
    np.testing.assert_allclose(run("regmean", ctx), expected, **TOL)
    assert "not a matrix" in ctx.diagnostics["rule"]

    base, experts = make((7, 4), 2, seed=14)
    ctx = ctx_of("wte.weight", base, experts)  # an embedding: no Gram recorded
    expected = base + 2.0 * (sum(experts) / 2 - base)
    np.testing.assert_allclose(run("regmean", ctx, scale=2.0), expected, **TOL)
    assert "no Gram" in ctx.diagnostics["rule"]

    ctx = ctx_of("text_projection", base, experts, None, random_grams(4, 2, seed=15))
    np.testing.assert_allclose(run("regmean", ctx), sum(experts) / 2, **TOL)
    assert "not a matrix" in ctx.diagnostics["rule"]


def test_regmean_rejects_bad_grams_and_weights() -> None:
    base, experts = make((5, 4), 2, seed=16)
    with pytest.raises(ValueError, match="1 Grams for 2 experts"):
        run("regmean", ctx_of("w", base, experts, None, random_grams(4, 1, seed=17)))
    with pytest.raises(ValueError, match=r"Gram 1 has shape \(5, 5\)"):
        grams = [*random_grams(4, 1, seed=18), *random_grams(5, 1, seed=19)]
        run("regmean", ctx_of("w", base, experts, None, grams))
    with pytest.raises(ValueError, match=">= 0"):
        run("regmean", ctx_of("w", base, experts, [1.0, -0.5], random_grams(4, 2, seed=20)))


# --- ACE (section 9) ---------------------------------------------------------------------------


def ref_ace(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    eps: float = 1e-2,
    threshold: float = 0.3,
    k_frac: float = 0.3,
    scale: float = 1.0,
) -> tuple[np.ndarray, float, bool]:
    """Section 9 steps 1-7, transcribed with loops."""
    taus = [w * (e - base) for e, w in zip(experts, weights, strict=True)]
    n = len(taus)
    d_out, d_in = base.shape
    energies = [float(np.sum(t * t)) for t in taus]
    logs = np.log(np.array(energies) + 1e-12)
    gamma = float(np.var(logs, ddof=1) / (np.mean(logs) ** 2 + 1e-12))
    flag = gamma > threshold

    sigmas, regs, centred = [], [], []
    for tau in taus:
        mu = np.array([tau[:, j].mean() for j in range(d_in)])
        c_t = tau - np.outer(np.ones(d_out), mu)
        s_t = c_t.T @ c_t
        tr = np.trace(s_t) + 1e-12
        sigma, eps_t = (s_t / tr, eps / tr) if flag else (s_t, eps)
        sigmas.append(sigma)
        regs.append(sigma + eps_t * np.eye(d_in))
        centred.append(c_t)
    total = sum(sigmas)
    c = np.array([total[:, j].sum() / d_in for j in range(d_in)])
    c_agg = np.outer(np.ones(d_in), c)
    if flag:
        c_agg = c_agg / (np.mean(energies) + 1e-12)
    a = sum(regs) + c_agg
    b = sum(ct @ r for ct, r in zip(centred, regs, strict=True))
    tau_out = right_solve(b, a)
    if flag:
        sigma_bar = sum(regs) / n
        delta = sum(t @ (s - sigma_bar) for t, s in zip(taus, sigmas, strict=True))
        u, s, vh = np.linalg.svd(delta + tau_out, full_matrices=False)
        k = math.floor(k_frac * min(d_out, d_in))
        if k > 0:
            tau_out = tau_out + s[:k].mean() * u[:, :k] @ vh[:k, :]
    return base + scale * tau_out, gamma, flag


@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("shape", [(10, 7), (6, 12)])
@pytest.mark.parametrize("flagged", [False, True])
def test_ace_matches_numpy(n_experts: int, shape: tuple[int, int], flagged: bool) -> None:
    # Very different energies force gamma > 0.3; similar ones (away from 1, where gamma
    # blows up) keep it small.
    weights = WEIGHTS[n_experts]
    if flagged:
        spreads = [0.01, 3.0, 0.3][:n_experts]
    else:  # weighted task vectors of similar energies
        spreads = [0.01 * j / w for j, w in zip([1.0, 1.1, 0.95], weights, strict=False)]
    base, experts = make(shape, n_experts, seed=21, spreads=spreads)
    expected, gamma, flag = ref_ace(base, experts, weights, scale=0.8)
    assert flag is flagged
    ctx = ctx_of("h.0.attn.c_proj.weight", base, experts, weights)
    out = run("ace", ctx, scale=0.8)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-11)
    d = ctx.diagnostics
    assert d["flag"] is flagged and math.isclose(d["gamma"], gamma, rel_tol=1e-9)
    assert d["solve"] == "lu" and d["eps"] == 1e-2 and len(d["eps_t"]) == n_experts
    if flagged:
        assert d["k"] == math.floor(0.3 * min(shape)) and "sigma_iso" in d
        for eps_t, e, w in zip(d["eps_t"], experts, weights, strict=True):
            centred = w * (e - base) - w * (e - base).mean(axis=0, keepdims=True)
            assert math.isclose(eps_t, 1e-2 / (np.sum(centred**2) + 1e-12), rel_tol=1e-9)
    else:
        assert d["k"] == 0 and d["eps_t"] == [1e-2] * n_experts


def test_ace_params_change_the_result_as_the_spec_says() -> None:
    base, experts = make((10, 7), 3, seed=22, spreads=[0.01, 3.0, 0.3])
    for params in ({"eps": 1e-3, "k_frac": 0.5}, {"gamma_threshold": 1e6}):
        expected, _, flag = ref_ace(
            base,
            experts,
            [1.0] * 3,
            eps=params.get("eps", 1e-2),
            threshold=params.get("gamma_threshold", 0.3),
            k_frac=params.get("k_frac", 0.3),
        )
        ctx = ctx_of("w", base, experts)
        np.testing.assert_allclose(run("ace", ctx, **params), expected, rtol=1e-9, atol=1e-11)
        assert ctx.diagnostics["flag"] is flag
    # k = floor(0.1 * 7) = 0: the refinement is skipped (the reference code would add NaN).
    ctx = ctx_of("w", base, experts)
    out = run("ace", ctx, k_frac=0.1)
    np.testing.assert_allclose(out, ref_ace(base, experts, [1.0] * 3, k_frac=0.1)[0], **TOL)
    assert ctx.diagnostics["k"] == 0 and "skipped" in ctx.diagnostics["refinement"]


@pytest.mark.parametrize("n_experts", [2, 3])
def test_ace_identical_experts(n_experts: int) -> None:
    """Identical experts: gamma = 0, no flag, and with M = S + eps I (S the centred Gram)
    ACE gives tau~ M (M + (1/d_in) 1 1^T S)^{-1}, whatever T: not tau (centring and the
    structural prior), so section 12's 'all W_t equal returns W_t' does not hold for ACE."""
    base, (expert,) = make((8, 5), 1, seed=23)
    ctx = ctx_of("w", base, [expert] * n_experts)
    out = run("ace", ctx)
    assert ctx.diagnostics["gamma"] == 0.0 and ctx.diagnostics["flag"] is False
    tau = expert - base
    centred = tau - tau.mean(axis=0, keepdims=True)
    s = centred.T @ centred
    m = s + 1e-2 * np.eye(5)
    expected = base + right_solve(centred @ m, m + np.ones((5, 5)) @ s / 5)
    np.testing.assert_allclose(out, expected, **TOL)
    assert np.abs(out - expert).max() > 1e-3


def test_ace_one_expert_and_non_matrix_tensors() -> None:
    base, experts = make((6, 4), 1, seed=24)
    ctx = ctx_of("w", base, experts)
    run("ace", ctx)
    assert ctx.diagnostics["gamma"] is None and ctx.diagnostics["flag"] is False

    for shape, name in [
        ((6,), "h.0.ln_1.weight"),
        ((2, 1, 3, 3), "conv"),
        ((5, 4), "text_projection"),
    ]:
        base, experts = make(shape, 3, seed=25)
        ctx = ctx_of(name, base, experts, WEIGHTS[3])
        mean = sum(w * (e - base) for w, e in zip(WEIGHTS[3], experts, strict=True)) / 3
        np.testing.assert_allclose(run("ace", ctx, scale=0.5), base + 0.5 * mean, **TOL)
        assert "not a matrix" in ctx.diagnostics["rule"]


# --- BMM (section 10.3) ------------------------------------------------------------------------


def ref_data_free_gram(tau: np.ndarray) -> np.ndarray:
    return tau.T @ tau / np.sum(tau * tau)


def ref_bmm(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    anchor_w: np.ndarray,
    grams: list[np.ndarray],
    rho: float,
    scale: float = 1.0,
    alpha: float = 1.0,
) -> np.ndarray:
    """(sum beta_t tau_t G_t + lambda tau_a) P^{-1}, P = sum beta_t G_t + lambda I,
    lambda = rho tr(sum beta_t G_t) / d_in; W0 + s tau_MAP."""
    d_in = base.shape[1]
    tau_a = anchor_w - base
    shrunk = [shrink(g, alpha) for g in grams]
    g_sum = sum(w * g for w, g in zip(weights, shrunk, strict=True))
    lam = rho * np.trace(g_sum) / d_in
    num = lam * tau_a
    for e, g, w in zip(experts, shrunk, weights, strict=True):
        num = num + w * (e - base) @ g
    return base + scale * right_solve(num, g_sum + lam * np.eye(d_in))


@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [1e-2, 1.0, 30.0])
def test_bmm_data_free_matches_numpy(n_experts: int, shape: tuple[int, int], rho: float) -> None:
    base, experts = make(shape, n_experts, seed=26)
    weights = WEIGHTS[n_experts]
    anchor_w = ref_task_arithmetic(base, experts, weights, scale=0.4, normalize=False)
    grams = [ref_data_free_gram(e - base) for e in experts]
    expected = ref_bmm(base, experts, weights, anchor_w, grams, rho, scale=0.9, alpha=0.7)
    ctx = ctx_of("h.0.mlp.c_fc.weight", base, experts, weights)
    params = {"anchor_params": {"scale": 0.4}, "rho": rho, "scale": 0.9, "alpha": 0.7}
    np.testing.assert_allclose(run("bmm", ctx, **params), expected, **TOL)
    d = ctx.diagnostics
    trace = sum(w * np.trace(g) for w, g in zip(weights, grams, strict=True))
    assert math.isclose(d["lam"], rho * trace / shape[1], rel_tol=1e-12)
    assert d["rule"] == "bmm" and d["gram"] == "data_free" and d["rho"] == rho
    assert d["solve"] == "cholesky" and d["anchor"]["method"] == "task_arithmetic"


@pytest.mark.parametrize("anchor", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("n_experts", [2, 3])
def test_bmm_huge_lambda_gives_the_anchor(anchor: str, n_experts: int) -> None:
    base, experts = make((5, 4), n_experts, seed=27)
    anchor_w = run(anchor, ctx_of("w", base, experts, WEIGHTS[n_experts]))
    ctx = ctx_of("w", base, experts, WEIGHTS[n_experts])
    out = run("bmm", ctx, anchor=anchor, rho=1e12)
    np.testing.assert_allclose(out, anchor_w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_experts", [2, 3])
def test_bmm_tiny_lambda_gives_regmean_on_surrogate_grams(n_experts: int) -> None:
    base, experts = make((6, 4), n_experts, seed=28)  # sum_t rank(tau_t) >= d_in
    grams = [ref_data_free_gram(e - base) for e in experts]
    expected = ref_regmean(experts, grams, [1.0] * n_experts, alpha=1.0)
    out = run("bmm", ctx_of("w", base, experts), rho=1e-13, ridge=0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-8, atol=1e-10)
    # ... which is crucible's regmean handed those Grams.
    via_regmean = run("regmean", ctx_of("w", base, experts, None, grams), alpha=1.0, ridge=0.0)
    np.testing.assert_allclose(out, via_regmean, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("c", [0.3, 7.0])
@pytest.mark.parametrize("rho", [0.5, 3.0])
@pytest.mark.parametrize("n_experts", [2, 3])
def test_bmm_scalar_grams_give_a_convex_combination(c: float, rho: float, n_experts: int) -> None:
    """G_t = c I: lambda = rho c T, so tau_MAP = (c T mean tau + lambda tau_a)/(c T + lambda)
    = (mean tau + rho tau_a) / (1 + rho), whatever c."""
    base, experts = make((5, 4), n_experts, seed=29)
    anchor_w = run("ties", ctx_of("w", base, experts))
    mean_tau = sum(e - base for e in experts) / n_experts
    expected = base + (mean_tau + rho * (anchor_w - base)) / (1 + rho)
    ctx = ctx_of("w", base, experts, None, [c * np.eye(4)] * n_experts)
    out = run("bmm", ctx, anchor="ties", gram="activations", rho=rho)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("n_experts", [2, 3])
def test_bmm_activation_and_hybrid_grams_come_from_ctx(n_experts: int) -> None:
    base, experts = make((5, 4), n_experts, seed=30)
    weights = WEIGHTS[n_experts]
    acts = random_grams(4, n_experts, seed=31)
    anchor_w = ref_task_arithmetic(base, experts, weights, scale=1.0, normalize=True)
    params: dict[str, Any] = {"anchor_params": {"normalize": True}, "rho": 0.3}

    ctx = ctx_of("w", base, experts, weights, acts)
    out = run("bmm", ctx, gram="activations", **params)
    np.testing.assert_allclose(out, ref_bmm(base, experts, weights, anchor_w, acts, 0.3), **TOL)
    assert ctx.diagnostics["gram"] == "activations"

    hybrid = [
        0.3 * g + 0.7 * ref_data_free_gram(e - base) for g, e in zip(acts, experts, strict=True)
    ]
    ctx = ctx_of("w", base, experts, weights, acts)
    out = run("bmm", ctx, gram="hybrid", hybrid_weight=0.3, **params)
    np.testing.assert_allclose(out, ref_bmm(base, experts, weights, anchor_w, hybrid, 0.3), **TOL)
    assert ctx.diagnostics["hybrid_weight"] == 0.3
    assert ctx.grams is not None  # the method leaves the job's Grams as they were
    for given, kept in zip(acts, ctx.grams, strict=True):
        np.testing.assert_array_equal(kept.numpy(), given)

    # data_free ignores whatever Grams the context carries.
    with_grams = run("bmm", ctx_of("w", base, experts, weights, acts), **params)
    without = run("bmm", ctx_of("w", base, experts, weights), **params)
    np.testing.assert_allclose(with_grams, without, rtol=0, atol=0)
    assert np.abs(with_grams - out).max() > 1e-6


def test_bmm_tensors_take_the_anchor_when_no_matrix_rule_applies() -> None:
    for shape, name in [((6,), "h.0.ln_1.bias"), ((5, 4), "text_projection")]:
        base, experts = make(shape, 3, seed=32)
        for anchor in ("task_arithmetic", "ties"):
            anchor_w = run(anchor, ctx_of(name, base, experts, WEIGHTS[3]))
            ctx = ctx_of(name, base, experts, WEIGHTS[3])
            out = run("bmm", ctx, anchor=anchor, scale=3.0)
            np.testing.assert_array_equal(out, anchor_w)
            assert "not a matrix" in ctx.diagnostics["rule"]
    # A 2-D tensor without activation Grams (an embedding) when the Gram needs them.
    base, experts = make((7, 4), 2, seed=33)
    ctx = ctx_of("wte.weight", base, experts)
    out = run("bmm", ctx, gram="hybrid")
    np.testing.assert_array_equal(out, run("task_arithmetic", ctx_of("w", base, experts)))
    assert "no activation Gram" in ctx.diagnostics["rule"]


@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("rho", [1e-3, 1.0, 1e3])
def test_bmm_identical_experts(n_experts: int, rho: float) -> None:
    """tau_t = tau: with an anchor returning tau (TA scale 1/T, or normalize) the MAP is tau
    for every rho. TA at its default scale 1 gives tau_a = T tau and, with the data-free
    G = tau^T tau / ||tau||^2 (eigenpairs g_i, v_i) and lambda = rho T / d_in, tau_MAP =
    sum_i tau v_i v_i^T (g_i + rho T / d_in) / (g_i + rho / d_in): between tau and T tau."""
    base, (expert,) = make((5, 4), 1, seed=34)
    experts = [expert] * n_experts
    for anchor_params in ({"scale": 1 / n_experts}, {"normalize": True}):
        out = run("bmm", ctx_of("w", base, experts), anchor_params=anchor_params, rho=rho)
        np.testing.assert_allclose(out, expert, **TOL)

    tau = expert - base
    g_vals, g_vecs = np.linalg.eigh(ref_data_free_gram(tau))
    factor = (g_vals + rho * n_experts / 4) / (g_vals + rho / 4)
    expected = base + tau @ g_vecs @ np.diag(factor) @ g_vecs.T
    out = run("bmm", ctx_of("w", base, experts), rho=rho)
    np.testing.assert_allclose(out, expected, **TOL)


def test_bmm_zero_task_vectors_give_the_anchor() -> None:
    base, _ = make((5, 4), 1, seed=35)
    ctx = ctx_of("w", base, [base.copy(), base.copy()])
    np.testing.assert_array_equal(run("bmm", ctx), base)
    assert ctx.diagnostics["lam"] == 0.0 and "anchor" in ctx.diagnostics["solve"]


def test_bmm_params_validate_the_anchor_params() -> None:
    p = bmm.Params(anchor="ties", anchor_params={"density": 0.5})
    assert p.anchor_params == {"density": 0.5}
    bad: list[dict[str, Any]] = [
        {"anchor": "ties", "anchor_params": {"density": 2}},
        {"anchor_params": {"nope": 1}},
        {"anchor_params": {"scale": "x"}},
        {"anchor": "linear"},
        {"rho": 0},
        {"hybrid_weight": 1.5},
    ]
    for values in bad:
        with pytest.raises(ValidationError):
            bmm.Params(**values)
    with pytest.raises(ValidationError, match="density"):
        bmm.Params(anchor="ties", anchor_params={"density": 2})
    with pytest.raises(ValidationError, match="anchor_params"):
        bmm.Params.model_validate_json('{"anchor_params": {"normalize": "maybe"}}')


def test_needs_and_needs_grams() -> None:
    assert regmean.METHOD.needs == {"gram"} and regmean.METHOD.matrix
    assert regmean.METHOD.needs_grams is not None and regmean.METHOD.needs_grams(regmean.Params())
    assert ace.METHOD.needs == frozenset() and ace.METHOD.matrix and ace.METHOD.needs_grams is None
    assert bmm.METHOD.needs == {"anchor", "gram"} and bmm.METHOD.matrix
    needs_grams = bmm.METHOD.needs_grams
    assert needs_grams is not None
    assert not needs_grams(bmm.Params())
    assert needs_grams(bmm.Params(gram="activations")) and needs_grams(bmm.Params(gram="hybrid"))
    for module in (regmean, ace, bmm):
        for name, info in module.Params.model_fields.items():
            assert info.description, f"{module.__name__}.{name} has no description"


def test_float32_inputs_stay_float32() -> None:
    base, experts = make((5, 4), 3, seed=36, spreads=[0.01, 3.0, 0.3])
    grams = random_grams(4, 3, seed=37)
    for method, params in [("regmean", {}), ("ace", {}), ("bmm", {"gram": "hybrid"})]:
        ctx = ctx_of("w", base.astype(np.float32), [e.astype(np.float32) for e in experts])
        ctx.grams = [torch.from_numpy(g.astype(np.float32)) for g in grams]
        out = run(method, ctx, **params)
        assert out.dtype == np.float32 and np.isfinite(out).all()


# --- anchors written elsewhere (tsv, iso_cts, wudi): pass once they are registered -------------


@pytest.mark.parametrize("anchor", ["tsv", "iso_cts", "wudi"])
def test_bmm_with_subspace_anchors(anchor: str) -> None:
    base, experts = make((6, 5), 3, seed=38)
    anchor_w = run(anchor, ctx_of("w", base, experts))
    out = run("bmm", ctx_of("w", base, experts), anchor=anchor, rho=1e12)
    np.testing.assert_allclose(out, anchor_w, rtol=0, atol=1e-8)
    # Non-matrix tensors: the anchor's own output.
    bias, bias_experts = make((6,), 3, seed=39)
    expected = run(anchor, ctx_of("b.bias", bias, bias_experts))
    np.testing.assert_array_equal(
        run("bmm", ctx_of("b.bias", bias, bias_experts), anchor=anchor), expected
    )
    # And the MAP against the numpy reference around that anchor.
    grams = [ref_data_free_gram(e - base) for e in experts]
    ctx = ctx_of("w", base, experts)
    out = run("bmm", ctx, anchor=anchor, rho=0.7)
    expected_w = ref_bmm(base, experts, [1.0] * 3, anchor_w, grams, 0.7)
    np.testing.assert_allclose(out, expected_w, rtol=1e-9, atol=1e-11)
    assert ctx.diagnostics["anchor"]["method"] == anchor


def test_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from crucible.methods import ace, bmm, regmean\n"
        "for m in (ace, bmm, regmean):\n"
        "    m.Params.model_json_schema(); m.Params()\n"
        "bmm.Params(anchor='ties', anchor_params={'density': 0.5})\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
