"""RegMean against FusionBench 0.2.33's `merging_with_regmean_weights` (run in its own venv,
tests/support/fusionbench_runner.py), on random weights and Grams.

FusionBench merges weights, W* = (sum_t W_t G~_t)(sum_t G~_t)^{-1}, with an explicit
inverse and no ridge; Crucible merges in task-vector space, W0 + (sum_t tau_t G~_t)
(sum_t G~_t)^{-1}, by Cholesky. The two are equal whenever sum G~ is invertible
(merge-math.md section 0, "task-vector form"), so with ridge 0 they must agree to rounding.
Crucible's default ridge (1e-4 relative) is a deliberate difference (section 12: never an
explicit inverse, shrink toward W0): it is checked separately to move the result by a small,
bounded amount. Parameters without a Gram (biases) are the plain mean in both.
FusionBench builds the off-diagonal mask in float32, so alpha < 1 agrees to ~1e-7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crucible.methods.base import TensorContext
from crucible.methods.regmean import Params, merge
from tests.support.fusionbench_runner import (
    regmean_job,
    require_fusionbench,
    run_fusionbench,
)

CASES = {  # name: (d_out, d_in, tasks, alpha)
    "tall-2-pure": (7, 4, 2, 1.0),
    "wide-3-pure": (3, 6, 3, 1.0),
    "tall-3-clip": (6, 5, 3, 0.95),
    "wide-2-gpt2": (4, 7, 2, 0.6),
}


def _inputs(
    name: str,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray, list[np.ndarray]]:
    d_out, d_in, tasks, _ = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    w0 = rng.normal(size=(d_out, d_in))
    ws = [w0 + 0.1 * rng.normal(size=(d_out, d_in)) for _ in range(tasks)]
    grams = []
    for _ in range(tasks):
        x = rng.normal(size=(3 * d_in, d_in)) * rng.uniform(0.5, 2.0, size=d_in)
        grams.append(x.T @ x / len(x))
    b0 = rng.normal(size=d_out)
    bs = [b0 + 0.1 * rng.normal(size=d_out) for _ in range(tasks)]
    return w0, ws, grams, b0, bs


@pytest.fixture(scope="module")
def theirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    require_fusionbench()
    jobs = {}
    for name, (_, _, _, alpha) in CASES.items():
        _, ws, grams, _, bs = _inputs(name)
        params = {
            "lin.weight": [torch.from_numpy(w) for w in ws],
            "lin.bias": [torch.from_numpy(b) for b in bs],
        }
        jobs[name] = regmean_job(
            params, [{"lin": torch.from_numpy(g)} for g in grams], reduce_non_diagonal_ratio=alpha
        )
    return run_fusionbench(jobs, Path(tmp_path_factory.mktemp("fb-regmean")))


def _ours(name: str, tensor: str, **params: float) -> tuple[np.ndarray, dict]:
    w0, ws, grams, b0, bs = _inputs(name)
    base, experts = (w0, ws) if tensor == "weight" else (b0, bs)
    ctx = TensorContext(
        name=f"lin.{tensor}",
        base=torch.from_numpy(base),
        experts=[torch.from_numpy(e) for e in experts],
        weights=[1.0] * len(experts),
        grams=[torch.from_numpy(g) for g in grams] if tensor == "weight" else None,
    )
    return merge(ctx, Params(**params)).numpy(), ctx.diagnostics


@pytest.mark.parametrize("case", list(CASES))
def test_regmean_matches_fusionbench(theirs: dict[str, dict[str, torch.Tensor]], case: str) -> None:
    alpha = CASES[case][3]
    tol = 1e-10 if alpha == 1.0 else 1e-6  # FusionBench's float32 off-diagonal mask
    ref = theirs[case]["lin.weight"].numpy()
    out, diag = _ours(case, "weight", alpha=alpha, ridge=0.0)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * np.abs(ref).max())
    assert diag["solve"] == "cholesky"
    bias, _ = _ours(case, "bias", alpha=alpha, ridge=0.0)
    np.testing.assert_allclose(bias, theirs[case]["lin.bias"].numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_default_ridge_is_a_small_shrink_toward_the_base(
    theirs: dict[str, dict[str, torch.Tensor]], case: str
) -> None:
    """Crucible's default relative ridge (1e-4) keeps the result within ~1e-3 relative of
    FusionBench's unregularised merge on these well-conditioned Grams."""
    alpha = CASES[case][3]
    ref = theirs[case]["lin.weight"].numpy()
    w0 = _inputs(case)[0]
    out, diag = _ours(case, "weight", alpha=alpha)
    assert diag["ridge_eps"] == pytest.approx(1e-4) and diag["ridge"] > 0
    gap = np.abs(out - ref).max() / np.abs(ref - w0).max()
    assert 0 < gap < 1e-2
