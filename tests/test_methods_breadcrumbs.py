"""Model Breadcrumbs (`breadcrumbs`, `breadcrumbs_ties`): formulas, blockwise merging and
parity with mergekit 0.1.5.

1. Formulas: float64 results equal the plain loop references of tests/support/reference.py
   (ref_outlier_trim follows mergekit's ascending-order formulation; the method cuts from
   the top twice: two independent routes to the same survivors) to 1e-12.
2. Blockwise: the pipeline's merge in blocks of rows (both cuts from tensor_stats on the
   whole task vector) equals the whole-tensor merge exactly.
3. mergekit: tiny whole models through `mergekit-yaml` agree to float32 rounding. Missing
   mergekit is a failure with the install hint, not a skip.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.numpy import load_file as load_numpy

import crucible.engine as engine
import crucible.pipeline as pipeline
from crucible.methods import breadcrumbs, breadcrumbs_ties
from crucible.methods.base import TensorContext
from crucible.methods.registry import METHODS
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support.mergekit_runner import (
    MergeRun,
    ParityModels,
    crucible_merge,
    parity_models,
    require_mergekit,
    run_mergekit_gta_tensors,
    run_mergekit_yaml_many,
)
from tests.support.reference import ref_breadcrumbs, ref_breadcrumbs_ties, ref_outlier_trim
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(), (7,), (5, 6), (2, 3, 4), (2, 1, 3, 3), (12, 10)]
WEIGHTS = [0.7, 0.4, 1.3]
NEG_WEIGHTS = [0.9, -0.4, 1.2]
TOL = {"rtol": 1e-12, "atol": 1e-12}
# (density, gamma): the default gamma (n_top is 0 below 100 entries); outliers removed;
# gamma 0; density 1 (untouched, gamma ignored); density + gamma > 1 (n_bot < 0: n_top
# shrinks to N - n); n = int(density * N) = 0 on the small shapes (nothing survives);
# large gamma.
DENSITY_GAMMA = [
    (0.5, 0.01),
    (0.3, 0.2),
    (0.6, 0.0),
    (1.0, 0.3),
    (0.9, 0.3),
    (0.05, 0.1),
    (0.2, 0.5),
]
DG_IDS = [f"d{d}-g{g}" for d, g in DENSITY_GAMMA]


def make(shape: tuple[int, ...], n_experts: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    return base, [base + 0.1 * rng.normal(size=shape) for _ in range(n_experts)]


def ctx_of(
    base: np.ndarray | torch.Tensor,
    experts: list[np.ndarray] | list[torch.Tensor],
    weights: list[float],
    name: str = "t",
) -> TensorContext:
    def tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))

    return TensorContext(
        name=name, base=tensor(base), experts=[tensor(e) for e in experts], weights=list(weights)
    )


def run(method: str, ctx: TensorContext, **params: Any) -> np.ndarray:
    info = METHODS[method]
    out = info.merge(ctx, info.params(**params))
    assert out.dtype == ctx.base.dtype and out.shape == ctx.base.shape
    return out.numpy()


def cut_ranks(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top after shrinking, n_top + n): the survivors' ranks from the top, [a, b)."""
    n = int(density * numel)
    n_bot = max(0, numel - n - int(gamma * numel))
    return numel - n_bot - n, numel - n_bot


# --- 1. formulas -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("density", "gamma"), DENSITY_GAMMA, ids=DG_IDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [WEIGHTS, NEG_WEIGHTS], ids=["pos", "neg"])
def test_breadcrumbs(
    shape: tuple[int, ...], density: float, gamma: float, normalize: bool, weights: list[float]
) -> None:
    base, experts = make(shape, 3, seed=21)
    params = {"density": density, "gamma": gamma, "normalize": normalize, "scale": 0.8}
    out = run("breadcrumbs", ctx_of(base, experts, weights), **params)
    np.testing.assert_allclose(out, ref_breadcrumbs(base, experts, weights, **params), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("density", "gamma"), DENSITY_GAMMA, ids=DG_IDS)
@pytest.mark.parametrize("majority_sign", ["total", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [WEIGHTS, NEG_WEIGHTS], ids=["pos", "neg"])
def test_breadcrumbs_ties(
    shape: tuple[int, ...],
    density: float,
    gamma: float,
    majority_sign: str,
    normalize: bool,
    weights: list[float],
) -> None:
    base, experts = make(shape, 3, seed=22)
    params = {
        "density": density,
        "gamma": gamma,
        "majority_sign": majority_sign,
        "normalize": normalize,
        "scale": 0.8,
    }
    out = run("breadcrumbs_ties", ctx_of(base, experts, weights), **params)
    expected = ref_breadcrumbs_ties(base, experts, weights, **params)
    np.testing.assert_allclose(out, expected, **TOL)


def test_counts_like_mergekit() -> None:
    """|tau| = 1..100: which ranks survive, for each branch of mergekit's arithmetic."""
    tau = torch.arange(1, 101, dtype=torch.float64)

    def kept(density: float, gamma: float) -> list[int]:
        out = breadcrumbs.outlier_trim(tau, density, gamma)
        np.testing.assert_array_equal(out.numpy(), ref_outlier_trim(tau.numpy(), density, gamma))
        return [int(v) for v in out[out != 0]]

    # n = 30, n_top = 5: the 30 below the top 5.
    assert kept(0.3, 0.05) == list(range(66, 96))
    # gamma 0: plain top-n.
    assert kept(0.3, 0.0) == list(range(71, 101))
    # n = 90, n_top = 30 > N - n: n_bot < 0, n_top shrinks to 10.
    assert kept(0.9, 0.3) == list(range(1, 91))
    # int() truncates: 0.29 * 100 is 28.999999999999996, so 28 survive (n_top = 1).
    assert kept(0.29, 0.01) == list(range(72, 100))
    # n = int(0.005 * 100) = 0: nothing survives (no "at least one", unlike TIES).
    assert kept(0.005, 0.01) == []
    # density 1 returns the task vector itself, outliers included.
    assert breadcrumbs.outlier_trim(tau, 1.0, 0.3) is tau
    # gamma 1 removes as many outliers as density leaves room for: the smallest n survive.
    assert kept(0.1, 1.0) == list(range(1, 11))


def test_exactly_n_survive_with_ties_at_both_cuts_and_blocks_agree() -> None:
    """Task vectors with entries in +-{1, 2, 3, 4} tie at both cuts: exactly n survive,
    ranked by magnitude, then lower flat index first (the reference's order), and cutting
    block by block with the whole tensor's cuts (the pipeline's path) keeps the same ones."""
    g = torch.Generator().manual_seed(3)
    mag = torch.randint(1, 5, (40, 7), generator=g)
    sign = torch.randint(0, 2, (40, 7), generator=g) * 2 - 1
    tau = (mag * sign).to(torch.float64)
    flat_sorted = tau.abs().reshape(-1).sort(descending=True).values
    numel = tau.numel()
    # The last case has n + n_top > N: n_top shrinks and there is no density cut.
    for density, gamma in [(0.3, 0.1), (0.5, 0.2), (0.6, 0.3), (0.2, 0.05), (0.9, 0.4)]:
        whole = breadcrumbs.outlier_trim(tau, density, gamma)
        n = int(density * numel)
        assert int((whole != 0).sum()) == n
        np.testing.assert_array_equal(whole.numpy(), ref_outlier_trim(tau.numpy(), density, gamma))
        cut = breadcrumbs.outlier_cut(tau.abs().reshape(-1), density, gamma)
        assert cut is not None and cut.kept == n and cut.inner is not None
        top, bottom = cut_ranks(numel, density, gamma)
        assert flat_sorted[top - 1] == flat_sorted[top], "the data must tie at the outlier cut"
        assert cut.inner.room > 0
        if bottom < numel:
            assert flat_sorted[bottom - 1] == flat_sorted[bottom], "and at the density cut"
            assert cut.outer is not None and cut.outer.room > 0
        else:
            assert cut.outer is None
        blocks = [breadcrumbs.apply_outlier_cut(tau[r : r + 6], cut) for r in range(0, 40, 6)]
        assert torch.equal(torch.cat(blocks), whole), (density, gamma)
        assert cut.inner.room == 0 and (cut.outer is None or cut.outer.room == 0)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_single_expert_and_identical_experts(method: str) -> None:
    base, (expert,) = make((9, 8), 1, seed=23)
    tau = expert - base
    trimmed = ref_outlier_trim(tau, 0.4, 0.05)
    single = run(method, ctx_of(base, [expert], [0.5]), density=0.4, gamma=0.05, scale=0.9)
    np.testing.assert_allclose(single, base + 0.9 * 0.5 * trimmed, **TOL)
    same = run(method, ctx_of(base, [expert] * 3, WEIGHTS), density=0.4, gamma=0.05, normalize=True)
    np.testing.assert_allclose(same, base + trimmed, **TOL)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_stats_path_equals_the_whole_tensor_merge(method: str) -> None:
    """merge with ctx.extra["stats"] from tensor_stats (whole tensor, one block) is the merge
    without; tensor_stats may take |tau| in place: it gets a fresh flat copy."""
    base, experts = make((30, 11), 3, seed=24)
    info = METHODS[method]
    p = info.params(density=0.35, gamma=0.08)
    assert info.tensor_stats is not None and not info.elementwise
    ctx = ctx_of(base, experts, WEIGHTS)
    whole = info.merge(ctx, p)
    stats = [info.tensor_stats(t.reshape(-1).clone(), p) for t in ctx.task_vectors()]
    ctx.extra = {"shape": (30, 11), "rows": (0, 30), "stats": stats}
    assert torch.equal(info.merge(ctx, p), whole)


# --- params -----------------------------------------------------------------------------------


def test_defaults_and_descriptions() -> None:
    """mergekit's defaults (gamma 0.01, normalize false, lambda 1, consensus 'sum'), except
    density: mergekit's 1 returns every task vector untouched (gamma ignored), so the
    default is the paper's typical density (merge-math section 4), as ties does."""
    assert breadcrumbs.Params().model_dump() == {
        "density": 0.1,
        "gamma": 0.01,
        "normalize": False,
        "scale": 1.0,
    }
    assert breadcrumbs_ties.Params().model_dump() == {
        "density": 0.1,
        "gamma": 0.01,
        "majority_sign": "total",
        "normalize": False,
        "scale": 1.0,
    }
    for module in (breadcrumbs, breadcrumbs_ties):
        for name, info in module.Params.model_fields.items():
            assert info.description, f"{module.__name__}.{name} has no description"


@pytest.mark.parametrize("module", [breadcrumbs, breadcrumbs_ties])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("density", 0),
        ("density", 1.5),
        ("density", float("nan")),
        ("gamma", -0.01),
        ("gamma", 1.1),
        ("gamma", float("inf")),
        ("scale", float("nan")),
        ("lambda", 0.5),
    ],
)
def test_bad_params_are_errors(module: Any, field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        module.Params(**{field: value})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


def test_bad_majority_sign_is_an_error() -> None:
    with pytest.raises(ValidationError):
        breadcrumbs_ties.Params(majority_sign="frequency")


def test_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from crucible.methods import breadcrumbs, breadcrumbs_ties\n"
        "from crucible.methods.registry import METHODS\n"
        "for name in ('breadcrumbs', 'breadcrumbs_ties'):\n"
        "    METHODS[name].params.model_json_schema(); METHODS[name].params()\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- 2. blockwise -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("breadcrumbs", {"density": 0.3, "gamma": 0.05, "scale": 0.8}),
        ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.1, "normalize": True}),
        ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.2, "majority_sign": "count"}),
    ],
)
def test_pipeline_blocks_equal_the_whole_tensor_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]
) -> None:
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=3, seed=13)
    weights = [1.0, 0.5, 2.0]
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "weight": w} for e, w in zip(experts, weights, strict=True)
            ],
            "method": {"name": method, "params": params},
            "output": {"dtype": "float32"},
        }
    )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    outcome = pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    merged = load_numpy(str(outcome.output_dir / "model.safetensors"))
    w0 = load_numpy(str(base / "model.safetensors"))
    ex = [load_numpy(str(e / "model.safetensors")) for e in experts]
    info = METHODS[method]
    blocked = unchanged = total = 0
    for name, w in w0.items():
        blocked += len(engine.row_blocks(w.shape, True)) > 1
        ctx = ctx_of(torch.from_numpy(w), [torch.from_numpy(e[name]) for e in ex], weights, name)
        whole = info.merge(ctx, spec.method.params).numpy()
        np.testing.assert_array_equal(merged[name], whole, err_msg=name)
        unchanged += int((merged[name] == w).sum())
        total += w.size
    assert blocked > 5
    # The sparsification took effect: at density d an entry stays at W0 when all three
    # experts' entries were removed, about (1 - d)^3 of them.
    expected = (1 - params["density"]) ** 3
    assert expected / 2 < unchanged / total < expected * 2 + 0.01


# --- 3. mergekit parity -----------------------------------------------------------------------

# fp32 outputs are O(1); both sides sparsify the same entries and then do the same
# operations up to summation order, so they differ by a few ulp (~1e-7). One entry
# sparsified differently changes the output by a task-vector entry, 1e-3 or more.
ATOL = 1e-6


@dataclass(frozen=True)
class Case:
    method: str  # the same name in Crucible and mergekit
    ours: dict[str, Any]  # Crucible params
    theirs: dict[str, Any]  # mergekit global parameters (`lambda` is our `scale`)
    weights: list[float]


CASES: dict[str, Case] = {
    # gamma, normalize and lambda left at their defaults on both sides: they must agree.
    "breadcrumbs": Case("breadcrumbs", {"density": 0.3}, {"density": 0.3}, WEIGHTS),
    "breadcrumbs_gamma_0": Case(
        "breadcrumbs", {"density": 0.3, "gamma": 0.0}, {"density": 0.3, "gamma": 0.0}, WEIGHTS
    ),
    "breadcrumbs_outliers_normalized": Case(
        "breadcrumbs",
        {"density": 0.55, "gamma": 0.1, "normalize": True, "scale": 0.7},
        {"density": 0.55, "gamma": 0.1, "normalize": True, "lambda": 0.7},
        NEG_WEIGHTS,
    ),
    # n_bot < 0: n_top shrinks to N - n.
    "breadcrumbs_shrunk_outliers": Case(
        "breadcrumbs", {"density": 0.95, "gamma": 0.2}, {"density": 0.95, "gamma": 0.2}, WEIGHTS
    ),
    # density 1: the task vectors are untouched, gamma is ignored.
    "breadcrumbs_density_1": Case(
        "breadcrumbs", {"density": 1.0, "gamma": 0.2}, {"density": 1.0, "gamma": 0.2}, WEIGHTS
    ),
    "breadcrumbs_ties": Case("breadcrumbs_ties", {"density": 0.3}, {"density": 0.3}, WEIGHTS),
    "breadcrumbs_ties_outliers_normalized": Case(
        "breadcrumbs_ties",
        {"density": 0.5, "gamma": 0.05, "normalize": True, "scale": 0.8},
        {"density": 0.5, "gamma": 0.05, "normalize": True, "lambda": 0.8},
        NEG_WEIGHTS,
    ),
    "breadcrumbs_ties_shrunk_outliers": Case(
        "breadcrumbs_ties",
        {"density": 0.9, "gamma": 0.3},
        {"density": 0.9, "gamma": 0.3},
        NEG_WEIGHTS,
    ),
    # n = int(0.02 * N) is 0 for the 32- to 128-entry vectors: nothing survives there.
    "breadcrumbs_ties_tiny_density": Case(
        "breadcrumbs_ties", {"density": 0.02}, {"density": 0.02}, WEIGHTS
    ),
}
# The direct calls below: mergekit's sparsify() defaults gamma to 0 when not given.
COUNT_DENSITY_GAMMA = (0.4, 0.0)


def _distinct_at_breadcrumbs_cuts(name: str, mags: torch.Tensor) -> None:
    cuts = {(c.ours["density"], c.ours.get("gamma", 0.01)) for c in CASES.values()}
    cuts.add(COUNT_DENSITY_GAMMA)
    for density, gamma in cuts:
        if density >= 1:
            continue
        for rank in cut_ranks(mags.numel(), density, gamma):
            if 0 < rank < mags.numel():
                assert mags[rank - 1] != mags[rank] or mags[rank - 1] == 0, name


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ParityModels:
    """Three experts of a tiny float32 GPT-2 (embeddings, Conv1D weights, biases, norms).

    mergekit ranks with an unstable sort and breaks magnitude ties arbitrarily; Crucible
    ranks ties by flat index. Parity cannot depend on that here: the fixture asserts that
    at every cut the cases use (both the outlier cut and the density cut, each expert and
    tensor) the two magnitudes on either side differ, or are zeros (a tie among zero task
    vector entries is harmless: a kept zero is still zero). With Gaussian float32 task
    vectors of 32 to 4096 entries equal magnitudes at a cut do not occur; the assertion
    proves it for this data. Both sides rank the same float32 magnitudes (mergekit casts
    CPU magnitudes to float32; the inputs are float32)."""
    return parity_models(
        tmp_path_factory.mktemp("breadcrumbs_models"), 20240611, _distinct_at_breadcrumbs_cuts
    )


@pytest.fixture(scope="module")
def mergekit_outputs(
    models: ParityModels, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, torch.Tensor]]:
    require_mergekit()
    runs = {
        key: MergeRun(
            method=case.method,
            models=[
                (d, {"weight": w}) for d, w in zip(models.expert_dirs, case.weights, strict=True)
            ],
            base=models.base_dir,
            parameters=case.theirs,
        )
        for key, case in CASES.items()
    }
    return run_mergekit_yaml_many(runs, tmp_path_factory.mktemp("breadcrumbs_runs"))


@pytest.mark.parametrize("key", list(CASES))
def test_matches_mergekit_yaml(
    key: str, models: ParityModels, mergekit_outputs: dict[str, dict[str, torch.Tensor]]
) -> None:
    case = CASES[key]
    theirs = mergekit_outputs[key]
    assert set(theirs) == set(models.base), "mergekit wrote a different set of tensors"
    ours = crucible_merge(models, case.method, case.ours, case.weights)
    moved = 0.0
    for name, base in models.base.items():
        assert ours[name].dtype == torch.float32 and ours[name].shape == base.shape
        torch.testing.assert_close(
            ours[name], theirs[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved = max(moved, float((theirs[name] - base).abs().max()))
    assert moved > 1e-2  # equality above is not base == base


def test_outlier_removal_took_effect_in_both(
    models: ParityModels, mergekit_outputs: dict[str, dict[str, torch.Tensor]]
) -> None:
    """The cases must exercise what they claim: gamma 0.01 vs 0 changes the large tensors
    (n_top = int(0.01 * N) > 0 from 100 entries), and at density 0.02 the small vectors of
    mergekit's output stay at W0 (n = 0) while the large ones move."""
    with_outliers, without = (
        mergekit_outputs["breadcrumbs"],
        mergekit_outputs["breadcrumbs_gamma_0"],
    )
    changed = sum(int(((with_outliers[n] - without[n]).abs() > 1e-4).sum()) for n in models.base)
    assert changed > 50
    tiny = mergekit_outputs["breadcrumbs_ties_tiny_density"]
    for name, base in models.base.items():
        if int(0.02 * base.numel()) == 0:
            assert torch.equal(tiny[name], base), name
        else:
            assert not torch.equal(tiny[name], base), name


@pytest.mark.parametrize("normalize", [True, False])
def test_breadcrumbs_ties_count_consensus_matches_mergekit_code(
    models: ParityModels, tmp_path: Path, normalize: bool
) -> None:
    """mergekit-yaml wires breadcrumbs_ties to the 'sum' consensus, so mergekit's own
    per-tensor merge is called with 'count' and magnitude_outliers directly. That call does
    not pass gamma, and mergekit's sparsify() then uses gamma 0 (its YAML default, 0.01,
    is not applied): the outlier cut itself is covered by the YAML cases above."""
    require_mergekit()
    density, gamma = COUNT_DENSITY_GAMMA
    theirs = run_mergekit_gta_tensors(
        models.base,
        models.experts,
        NEG_WEIGHTS,
        consensus="count",
        sparsification="magnitude_outliers",
        density=density,
        normalize=normalize,
        lam=0.9,
        workdir=tmp_path,
    )
    params = {
        "density": density,
        "gamma": gamma,
        "majority_sign": "count",
        "normalize": normalize,
        "scale": 0.9,
    }
    ours = crucible_merge(models, "breadcrumbs_ties", params, NEG_WEIGHTS)
    total = crucible_merge(
        models, "breadcrumbs_ties", params | {"majority_sign": "total"}, NEG_WEIGHTS
    )
    differs = 0
    for name in models.base:
        torch.testing.assert_close(
            ours[name], theirs[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
        differs += int(((ours[name] - total[name]).abs() > 1e-4).sum())
    assert differs > 50  # 'count' and 'total' disagree somewhere: 'count' is what is checked
