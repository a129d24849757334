"""Each method against an independent float64 computation written out plainly.

The references below loop over experts and coordinates in numpy, straight from
merge-math.md sections 1-3 and mergekit 0.1.5's documented per-tensor semantics; they share
no code with crucible.methods. Shapes cover 0-D to 4-D tensors (biases, norms, embeddings,
conv kernels): TA/TIES/DARE act on every tensor (merge-math section 0).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from crucible.methods import dare_linear, dare_ties, linear, task_arithmetic, ties
from crucible.methods.base import TensorContext
from crucible.methods.registry import METHODS
from tests.support.reference import ref_linear, ref_task_arithmetic, ref_ties, ref_trim

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(), (7,), (5, 6), (2, 3, 4), (2, 1, 3, 3)]
WEIGHTS = [0.7, 0.4, 1.3]
NEG_WEIGHTS = [0.9, -0.4, 1.2]
TOL = {"rtol": 1e-12, "atol": 1e-12}


# --- helpers -----------------------------------------------------------------------------------


def make(shape: tuple[int, ...], n_experts: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    experts = [base + 0.1 * rng.normal(size=shape) for _ in range(n_experts)]
    return base, experts


def ctx_of(
    name: str, base: np.ndarray, experts: list[np.ndarray], weights: list[float]
) -> TensorContext:
    return TensorContext(
        name=name,
        base=torch.from_numpy(np.array(base)),
        experts=[torch.from_numpy(np.array(e)) for e in experts],
        weights=list(weights),
    )


def run(method: str, ctx: TensorContext, **params: Any) -> np.ndarray:
    info = METHODS[method]
    out = info.merge(ctx, info.params(**params))
    assert out.dtype == ctx.base.dtype and out.shape == ctx.base.shape
    return out.numpy()


# --- formulas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape: tuple[int, ...], normalize: bool) -> None:
    base, experts = make(shape, 3, seed=1)
    out = run("linear", ctx_of("t", base, experts, WEIGHTS), normalize=normalize)
    np.testing.assert_allclose(out, ref_linear(experts, WEIGHTS, normalize), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("scale", "normalize"), [(1.0, False), (0.3, False), (0.6, True)])
def test_task_arithmetic(shape: tuple[int, ...], scale: float, normalize: bool) -> None:
    base, experts = make(shape, 3, seed=2)
    ctx = ctx_of("t", base, experts, WEIGHTS)
    out = run("task_arithmetic", ctx, scale=scale, normalize=normalize)
    expected = ref_task_arithmetic(base, experts, WEIGHTS, scale, normalize)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("majority_sign", ["total", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [WEIGHTS, NEG_WEIGHTS], ids=["pos", "neg"])
def test_ties(
    shape: tuple[int, ...],
    density: float,
    majority_sign: str,
    normalize: bool,
    weights: list[float],
) -> None:
    base, experts = make(shape, 3, seed=3)
    ctx = ctx_of("t", base, experts, weights)
    params = {"density": density, "majority_sign": majority_sign, "normalize": normalize}
    out = run("ties", ctx, scale=0.8, **params)
    expected = ref_ties(base, experts, weights, scale=0.8, **params)
    np.testing.assert_allclose(out, expected, **TOL)


def test_ties_count_and_total_differ_where_they_should() -> None:
    """One large positive delta against two small negative ones: 'total' elects +, 'count'
    elects -; the references above must not hide that."""
    base = np.zeros(1)
    experts = [np.array([1.0]), np.array([-0.1]), np.array([-0.2])]
    ctx = ctx_of("t", base, experts, [1.0, 1.0, 1.0])
    total = run("ties", ctx, density=1.0, majority_sign="total", normalize=True)
    count = run("ties", ctx, density=1.0, majority_sign="count", normalize=True)
    np.testing.assert_allclose(total, [1.0], **TOL)
    np.testing.assert_allclose(count, [-0.15], **TOL)


@pytest.mark.parametrize("majority_sign", ["total", "count"])
def test_ties_zero_total_or_even_count_elects_plus(majority_sign: str) -> None:
    # Weighted deltas +0.75 and -0.75 (exact in binary): total 0 and one vote each. mergekit
    # elects + in both rules, keeping expert 0 only: 0.75 / 1. Electing - would give
    # -0.75 / 3 = -0.25.
    ctx = ctx_of("t", np.zeros(1), [np.array([0.75]), np.array([-0.25])], [1.0, 3.0])
    out = run("ties", ctx, density=1.0, majority_sign=majority_sign)
    np.testing.assert_array_equal(out, [0.75])


def test_ties_trim_keeps_exactly_k_and_breaks_ties_by_index() -> None:
    tau = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    kept = ties.magnitude_trim(tau, 0.5)  # k = 3: the 2.0, then the first two of the |1|s
    assert kept.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 2.0]
    np.testing.assert_array_equal(kept.numpy(), ref_trim(tau.numpy(), 0.5))


def test_ties_trim_counts_like_mergekit() -> None:
    # int() truncates: 0.29 * 100 is 28.999999999999996 in binary floating point, so 28.
    tau = torch.arange(1, 101, dtype=torch.float64)
    assert int((ties.magnitude_trim(tau, 0.29) != 0).sum()) == 28
    # At least one entry survives, however small the density.
    assert (ties.magnitude_trim(tau[:7], 0.01) != 0).nonzero().flatten().tolist() == [6]
    # density 1 returns the input untouched (mergekit skips pruning).
    assert ties.magnitude_trim(tau, 1.0) is tau


# --- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (3, 4), (2, 2, 3)], ids=str)
def test_all_experts_equal(shape: tuple[int, ...]) -> None:
    base, (expert,) = make(shape, 1, seed=4)
    tau = expert - base
    ctx = ctx_of("t", base, [expert] * 3, WEIGHTS)
    total_w = sum(WEIGHTS)
    np.testing.assert_allclose(run("linear", ctx), expert, **TOL)
    np.testing.assert_allclose(run("task_arithmetic", ctx, normalize=True), expert, **TOL)
    np.testing.assert_allclose(
        run("task_arithmetic", ctx, scale=0.3), base + 0.3 * total_w * tau, **TOL
    )
    # Disjoint mean of identical deltas is the delta: TIES returns the (trimmed) expert.
    np.testing.assert_allclose(run("ties", ctx, density=1.0), expert, **TOL)
    np.testing.assert_allclose(
        run("ties", ctx, density=0.5, scale=0.5), base + 0.5 * ref_trim(tau, 0.5), **TOL
    )
    np.testing.assert_allclose(
        run("ties", ctx, density=1.0, normalize=False), base + total_w * tau, **TOL
    )
    np.testing.assert_allclose(run("dare_linear", ctx, density=1.0, normalize=True), expert, **TOL)
    np.testing.assert_allclose(run("dare_ties", ctx, density=1.0, normalize=True), expert, **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_single_expert(shape: tuple[int, ...]) -> None:
    base, experts = make(shape, 1, seed=5)
    tau = experts[0] - base
    ctx = ctx_of("t", base, experts, [0.5])
    np.testing.assert_allclose(run("linear", ctx), experts[0], **TOL)
    np.testing.assert_allclose(run("linear", ctx, normalize=False), 0.5 * experts[0], **TOL)
    np.testing.assert_allclose(run("task_arithmetic", ctx, scale=0.3), base + 0.15 * tau, **TOL)
    # T = 1: every non-zero entry agrees with its own sign; the disjoint mean undoes w.
    np.testing.assert_allclose(
        run("ties", ctx, density=0.4, scale=0.9), base + 0.9 * ref_trim(tau, 0.4), **TOL
    )
    np.testing.assert_allclose(
        run("ties", ctx, density=0.4, normalize=False),
        base + 0.5 * ref_trim(tau, 0.4),
        **TOL,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_task_vectors_return_the_base(shape: tuple[int, ...], method: str) -> None:
    base, _ = make(shape, 0, seed=6)
    ctx = ctx_of("t", base, [base.copy(), base.copy()], [0.3, 0.9])
    fields = METHODS[method].params.model_fields
    out = run(method, ctx, **({"density": 0.5} if "density" in fields else {}))
    if method == "linear":  # experts equal to the base: their average is the base
        np.testing.assert_allclose(out, base, **TOL)
    else:
        np.testing.assert_array_equal(out, base)


def test_ties_zero_divisor_counts_as_one() -> None:
    # Weights 1 and -1. Coordinate 0: weighted deltas +0.2 and -0.2 sum to 0, which elects
    # +, so only expert 0 agrees. Coordinate 1: no non-zero delta, nothing agrees, divisor 0.
    # Coordinate 2: -0.3 and -0.1 both agree with -, but their weights sum to 0. mergekit
    # replaces a zero divisor by 1 (the agreeing sum is kept), it does not emit inf/NaN.
    base = np.zeros(3)
    experts = [np.array([0.2, 0.0, -0.3]), np.array([0.2, 0.0, 0.1])]
    ctx = ctx_of("t", base, experts, [1.0, -1.0])
    out = run("ties", ctx, density=1.0)
    np.testing.assert_allclose(out, [0.2, 0.0, -0.4], **TOL)
    expected = ref_ties(base, experts, [1.0, -1.0], 1.0, "total", True, 1.0)
    np.testing.assert_allclose(out, expected, **TOL)


def test_task_arithmetic_normalize_with_zero_weight_sum_skips_division() -> None:
    base, experts = make((4,), 2, seed=7)
    ctx = ctx_of("t", base, experts, [1.0, -1.0])
    out = run("task_arithmetic", ctx, normalize=True)
    np.testing.assert_allclose(out, base + (experts[0] - experts[1]), **TOL)


def test_linear_normalize_with_zero_weight_sum_is_an_error() -> None:
    base, experts = make((4,), 2, seed=8)
    with pytest.raises(ValueError, match="sum is not zero"):
        run("linear", ctx_of("t", base, experts, [1.0, -1.0]))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_kept_and_inputs_untouched(method: str, dtype: torch.dtype) -> None:
    base, experts = make((4, 5), 3, seed=9)
    ctx = ctx_of("t", base, experts, WEIGHTS)
    ctx.base = ctx.base.to(dtype)
    ctx.experts = [e.to(dtype) for e in ctx.experts]
    before = [t.clone() for t in [ctx.base, *ctx.experts]]
    versions = [t._version for t in [ctx.base, *ctx.experts]]
    info = METHODS[method]
    out = info.merge(ctx, info.params())
    assert out.dtype == dtype
    # _version counts in-place writes: inputs may be read-only mmaps and must never be written.
    assert [t._version for t in [ctx.base, *ctx.experts]] == versions
    for now, then in zip([ctx.base, *ctx.experts], before, strict=True):
        assert torch.equal(now, then)
    assert all(out.data_ptr() != t.data_ptr() for t in [ctx.base, *ctx.experts])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float32_agrees_with_float64(method: str) -> None:
    base, experts = make((6, 7), 3, seed=10)
    info = METHODS[method]
    p = info.params(**({"density": 0.6} if "density" in info.params.model_fields else {}))
    out64 = info.merge(ctx_of("t", base, experts, WEIGHTS), p)
    ctx32 = ctx_of("t", base.astype(np.float32), [e.astype(np.float32) for e in experts], WEIGHTS)
    out32 = info.merge(ctx32, p)
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-5)


# --- input checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mismatched_inputs_are_errors(method: str) -> None:
    base, experts = make((3, 4), 2, seed=11)
    info = METHODS[method]
    with pytest.raises(ValueError, match="shape"):
        info.merge(ctx_of("t", base, [experts[0], experts[1][:, :3]], [1, 1]), info.params())
    with pytest.raises(ValueError, match="weights"):
        info.merge(ctx_of("t", base, experts, [1.0]), info.params())
    with pytest.raises(ValueError, match="at least one expert"):
        info.merge(ctx_of("t", base, [], []), info.params())


@pytest.mark.parametrize(
    ("module", "field", "value"),
    [
        (ties, "density", 0),
        (ties, "density", 1.5),
        (ties, "density", float("nan")),
        (ties, "majority_sign", "mean"),
        (ties, "scale", float("inf")),
        (dare_linear, "density", -0.1),
        (dare_linear, "seed", -1),
        (dare_ties, "density", 0.0),
        (dare_ties, "majority_sign", "frequency"),
        (task_arithmetic, "scale", float("nan")),
        (linear, "normalize", "maybe"),
    ],
)
def test_bad_param_is_an_error_naming_the_field(module: Any, field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        module.Params(**{field: value})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


@pytest.mark.parametrize("module", [linear, task_arithmetic, ties, dare_linear, dare_ties])
def test_unknown_param_is_an_error(module: Any) -> None:
    with pytest.raises(ValidationError) as err:
        module.Params(**{"lambda": 0.5})
    assert err.value.errors()[0]["type"] == "extra_forbidden"


def test_defaults() -> None:
    """The documented defaults (mergekit's, or merge-math's where mergekit's disable the
    method); a change here changes results of requests that omit params."""
    assert linear.Params().model_dump() == {"normalize": True}
    assert task_arithmetic.Params().model_dump() == {"scale": 1.0, "normalize": False}
    assert ties.Params().model_dump() == {
        "density": 0.2,
        "majority_sign": "total",
        "normalize": True,
        "scale": 1.0,
    }
    assert dare_linear.Params().model_dump() == {
        "density": 0.5,
        "rescale": True,
        "seed": 0,
        "normalize": False,
        "scale": 1.0,
    }
    assert dare_ties.Params().model_dump() == {
        "density": 0.5,
        "rescale": True,
        "seed": 0,
        "majority_sign": "total",
        "normalize": False,
        "scale": 1.0,
    }
    for module in (linear, task_arithmetic, ties, dare_linear, dare_ties):
        for name, info in module.Params.model_fields.items():
            assert info.description, f"{module.__name__}.{name} has no description"


def test_methods_do_not_import_torch_at_module_level() -> None:
    code = (
        "import sys\n"
        "from crucible.methods.registry import METHODS\n"
        "for info in METHODS.values():\n"
        "    info.params.model_json_schema(); info.params()\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "print(sorted(METHODS))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(
        [
            "ace",
            "bmm",
            "breadcrumbs",
            "breadcrumbs_ties",
            "dare_linear",
            "dare_ties",
            "iso_c",
            "iso_cts",
            "linear",
            "regmean",
            "task_arithmetic",
            "ties",
            "tsv",
            "wudi",
        ]
    )
