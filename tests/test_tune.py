"""The tuner core (crucible/tune): factorized merges against the methods' own merge
functions, search-space maps and override rules against the engine's per-tensor param
resolution, module grouping on real architectures' names, and the Bayesian optimizer on
synthetic objectives with known optima.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
import torch

from crucible.methods.base import TensorContext
from crucible.methods.overrides import request_params_model, resolve_params
from crucible.methods.registry import METHODS
from crucible.spec import TUNABLE_PARAMS
from crucible.tune.factorized import BmmModule, FixedModule, ScaledModule, build_factorized
from crucible.tune.optimizer import BayesianOptimizer, TrialRecord, run_tuning
from crucible.tune.space import (
    OUTSIDE_BLOCKS,
    PARAM_RANGES,
    SearchSpace,
    layer_pattern,
    module_groups,
    override_rules,
)

F64 = torch.float64
WEIGHTS = [0.7, 1.3, 0.4]


# --- helpers -----------------------------------------------------------------------------------


def spd_grams(d_in: int, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """G_t = X_t^T X_t / n_t with uneven feature scales (full rank for n >= d_in)."""
    grams = []
    for _ in range(n):
        x = torch.randn(40, d_in, generator=gen, dtype=F64) * (
            0.2 + 3 * torch.rand(d_in, generator=gen, dtype=F64)
        )
        grams.append(x.T @ x / 40)
    return grams


def context(
    shape: tuple[int, ...],
    seed: int,
    *,
    name: str = "encoder.layer.0.attention.self.query.weight",
    grams: bool = True,
    dtype: torch.dtype = F64,
) -> TensorContext:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=gen, dtype=F64)
    experts = [base + 0.1 * torch.randn(*shape, generator=gen, dtype=F64) for _ in WEIGHTS]
    g = spd_grams(shape[-1], len(WEIGHTS), gen) if grams and len(shape) == 2 else None
    return TensorContext(
        name=name,
        base=base.to(dtype),
        experts=[e.to(dtype) for e in experts],
        weights=list(WEIGHTS),
        grams=[x.to(dtype) for x in g] if g is not None else None,
    )


def fresh(ctx: TensorContext) -> TensorContext:
    """A copy with its own diagnostics: merge functions record into the context."""
    return TensorContext(
        name=ctx.name,
        base=ctx.base.clone(),
        experts=[e.clone() for e in ctx.experts],
        weights=list(ctx.weights),
        grams=[g.clone() for g in ctx.grams] if ctx.grams is not None else None,
    )


def reference(method: str, ctx: TensorContext, **params: Any) -> torch.Tensor:
    info = METHODS[method]
    return info.merge(fresh(ctx), info.params(**params))


def rel_err(got: torch.Tensor, want: torch.Tensor, ctx: TensorContext) -> float:
    """Error relative to the merged task vector (stricter than relative to W)."""
    return float((got - want).norm() / (want - ctx.base).norm().clamp_min(1e-300))


# --- factorized bmm ------------------------------------------------------------------------------

BMM_CASES = [
    {"gram": "data_free"},
    {"gram": "activations"},
    {"gram": "hybrid", "hybrid_weight": 0.3},
    {"gram": "activations", "alpha": 0.8, "ridge": 1e-3},
    {"gram": "data_free", "anchor": "ties", "anchor_params": {"density": 0.5}},
    {"gram": "hybrid", "anchor": "task_arithmetic", "anchor_params": {"scale": 0.4}},
]


@pytest.mark.parametrize("params", BMM_CASES)
@pytest.mark.parametrize("shape", [(7, 5), (4, 9)])
def test_factorized_bmm_equals_bmm_merge(params: dict[str, Any], shape: tuple[int, int]) -> None:
    ctx = context(shape, seed=sum(shape))
    module = build_factorized("bmm", params, fresh(ctx))
    assert isinstance(module, BmmModule)
    for rho in (1e-4, 0.03, 1.0, 100.0):
        for scale in (0.5, 1.0, 1.3):
            want = reference("bmm", ctx, rho=rho, scale=scale, **params)
            got = module.merged({"rho": rho, "scale": scale})
            assert got.dtype == F64 and got.shape == ctx.base.shape
            assert rel_err(got, want, ctx) < 1e-10, (rho, scale)


def test_factorized_bmm_defaults_transpose_dtype_and_memory() -> None:
    ctx = context((6, 4), seed=1)
    module = build_factorized("bmm", METHODS["bmm"].params(rho=0.2, scale=0.9), fresh(ctx))
    # Missing tuned params take the tensor's own params.
    want = reference("bmm", ctx, rho=0.2, scale=0.9)
    assert rel_err(module.merged({}), want, ctx) < 1e-10
    want = reference("bmm", ctx, rho=0.2, scale=1.1)
    assert rel_err(module.merged({"scale": 1.1}), want, ctx) < 1e-10
    # A Conv1D weight held transposed goes back in file layout, contiguous, in the dtype asked.
    conv = build_factorized("bmm", {}, fresh(ctx), transposed=True, dtype=torch.bfloat16)
    out = conv.merged({"rho": 0.5, "scale": 1.0})
    assert out.shape == (4, 6) and out.is_contiguous() and out.dtype == torch.bfloat16
    ref = reference("bmm", ctx, rho=0.5).T.to(torch.bfloat16)
    assert torch.equal(out, ref.contiguous())
    assert conv.merged({"rho": 0.5}, dtype=F64).dtype == F64
    # Held: W0, tau_a and E (d_out x d_in each), Q (d_in x d_in) and Lambda (d_in), float64.
    assert module.nbytes == (3 * 6 * 4 + 4 * 4 + 4) * 8
    with pytest.raises(ValueError, match="unknown tuned params"):
        module.merged({"lam": 1.0})
    with pytest.raises(ValueError, match="rho must be > 0"):
        module.merged({"rho": 0.0})


def test_factorized_bmm_non_matrix_and_missing_grams_are_the_anchor() -> None:
    bias = context((5,), seed=2, name="encoder.layer.0.attention.self.query.bias")
    module = build_factorized("bmm", {"gram": "activations"}, fresh(bias))
    assert isinstance(module, FixedModule)
    anchor = reference("task_arithmetic", bias)
    for rho, scale in [(1e-3, 0.5), (10.0, 1.5)]:
        assert torch.equal(module.merged({"rho": rho, "scale": scale}), anchor)
        assert torch.equal(module.merged({"rho": rho, "scale": scale}), reference("bmm", bias))
    # An embedding without activation Grams.
    emb = context((8, 4), seed=3, name="embeddings.word_embeddings.weight", grams=False)
    module = build_factorized("bmm", {"gram": "hybrid"}, fresh(emb))
    assert isinstance(module, FixedModule)
    assert torch.equal(module.merged({"rho": 0.1}), reference("bmm", emb, gram="hybrid"))


def test_factorized_bmm_without_evidence_is_the_scaled_anchor() -> None:
    """Experts equal to the base: every data-free Gram is zero, bmm returns W0 + s tau_a."""
    ctx = context((3, 4), seed=4)
    ctx.experts = [ctx.base.clone() for _ in WEIGHTS]
    module = build_factorized("bmm", {}, fresh(ctx))
    assert isinstance(module, ScaledModule)
    for scale in (0.5, 1.5):
        want = reference("bmm", ctx, scale=scale)
        assert torch.equal(module.merged({"rho": 3.0, "scale": scale}), want)


def test_factorized_bmm_matches_an_independent_formula() -> None:
    """tau = (sum_t b_t tau_t G_t + lam tau_a)(sum_t b_t G_t + lam I)^{-1}, straight from
    merge-math.md 10.3 with a dense solve (activation Grams, TA anchor with scale 0.5)."""
    ctx = context((5, 6), seed=5)
    module = build_factorized(
        "bmm", {"gram": "activations", "anchor_params": {"scale": 0.5}}, fresh(ctx)
    )
    taus = [e - ctx.base for e in ctx.experts]
    tau_a = 0.5 * sum(w * t for w, t in zip(WEIGHTS, taus, strict=True))
    p0 = sum(w * g for w, g in zip(WEIGHTS, ctx.grams or [], strict=True))
    rho, scale = 0.07, 1.2
    lam = rho * float(torch.trace(p0)) / 6
    rhs = sum(w * t @ g for w, t, g in zip(WEIGHTS, taus, ctx.grams or [], strict=True))
    tau = torch.linalg.solve(p0 + lam * torch.eye(6, dtype=F64), (rhs + lam * tau_a).T).T
    want = ctx.base + scale * tau
    assert rel_err(module.merged({"rho": rho, "scale": scale}), want, ctx) < 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_factorized_bmm_on_cuda_agrees_with_cpu() -> None:
    ctx = context((12, 10), seed=9)
    cuda = fresh(ctx)
    cuda.base = cuda.base.cuda()
    cuda.experts = [e.cuda() for e in cuda.experts]
    cuda.grams = [g.cuda() for g in cuda.grams or []]
    module = build_factorized("bmm", {"gram": "hybrid"}, cuda)
    got = module.merged({"rho": 0.05, "scale": 1.2})
    assert got.device.type == "cuda"
    want = reference("bmm", ctx, gram="hybrid", rho=0.05, scale=1.2)
    assert rel_err(got.cpu(), want, ctx) < 1e-10


# --- factorized task arithmetic and TIES ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {}),
        ("ties", {"density": 0.5, "majority_sign": "count", "normalize": False}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_factorized_scale_methods_equal_their_merge(
    method: str, params: dict[str, Any], dtype: torch.dtype
) -> None:
    for shape, name in [((6, 5), "h.1.mlp.c_fc.weight"), ((7,), "h.1.ln_1.bias")]:
        ctx = context(shape, seed=6, name=name, grams=False, dtype=dtype)
        module = build_factorized(method, params, fresh(ctx))
        assert module.nbytes == 2 * ctx.base.numel() * ctx.base.element_size()
        for scale in (0.0, 0.3, 1.0, 1.45):
            want = reference(method, ctx, scale=scale, **params)
            got = module.merged({"scale": scale})
            assert got.dtype == dtype
            assert torch.equal(got, want), (method, shape, scale)


def test_factorized_ties_scale_is_linear() -> None:
    """An independent check that TIES' result is W0 + s * merged: the s = 0 merge is W0 and
    the s = 2 task vector is twice the s = 1 one."""
    ctx = context((6, 5), seed=7, grams=False)
    module = build_factorized("ties", {"density": 0.4}, fresh(ctx))
    assert torch.equal(module.merged({"scale": 0.0}), ctx.base)
    one = module.merged({"scale": 1.0}) - ctx.base
    two = module.merged({"scale": 1.2}) - ctx.base
    torch.testing.assert_close(two, 1.2 * one, rtol=1e-12, atol=1e-15)


def test_build_factorized_refuses_untunable_methods() -> None:
    with pytest.raises(ValueError, match="cannot be tuned"):
        build_factorized("regmean", {}, context((3, 3), seed=8))


# --- module groups -------------------------------------------------------------------------------

BERT = [
    f"encoder.layer.{i}.{m}.weight"
    for i in (0, 1, 10, 2)
    for m in ("attention.self.query", "attention.self.key", "intermediate.dense")
] + ["embeddings.word_embeddings.weight", "pooler.dense.weight"]
GPT2 = [f"h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
LLAMA = [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)] + [
    f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)
]


def test_layer_pattern_replaces_the_layer_index() -> None:
    assert layer_pattern("encoder.layer.3.attention.self.query.weight") == (
        "encoder.layer.*.attention.self.query.weight"
    )
    assert layer_pattern("h.11.mlp.c_fc.weight") == "h.*.mlp.c_fc.weight"
    assert layer_pattern("model.layers.7.self_attn.q_proj.weight") == (
        "model.layers.*.self_attn.q_proj.weight"
    )
    # The layer-container index, not an earlier numeric component of the same value.
    assert layer_pattern("model.0.layers.0.fc.weight") == "model.0.layers.*.fc.weight"
    assert layer_pattern("lm_head.weight") == "lm_head.weight"


def test_module_groups_bert() -> None:
    layer_type = module_groups(BERT, "layer_type")
    assert list(layer_type) == [
        "embeddings.word_embeddings.weight",
        "encoder.layer.*.attention.self.key.weight",
        "encoder.layer.*.attention.self.query.weight",
        "encoder.layer.*.intermediate.dense.weight",
        "pooler.dense.weight",
    ]
    assert layer_type["encoder.layer.*.attention.self.query.weight"] == [
        f"encoder.layer.{i}.attention.self.query.weight" for i in (0, 1, 2, 10)
    ]
    block = module_groups(BERT, "block")
    assert list(block) == ["block 0", "block 1", "block 2", "block 10", OUTSIDE_BLOCKS]
    assert block["block 10"] == [
        f"encoder.layer.10.{m}.weight"
        for m in ("attention.self.key", "attention.self.query", "intermediate.dense")
    ]
    assert block[OUTSIDE_BLOCKS] == ["embeddings.word_embeddings.weight", "pooler.dense.weight"]
    assert sorted(module_groups(BERT, "global")["global"]) == sorted(BERT)
    modules = module_groups(BERT, "module")
    assert len(modules) == len(BERT) and all(modules[n] == [n] for n in BERT)
    # The same set of names in any order gives the same groups in the same order.
    assert module_groups(list(reversed(BERT)), "layer_type") == layer_type


def test_module_groups_gpt2_and_llama() -> None:
    assert module_groups(GPT2, "layer_type") == {
        "h.*.attn.c_attn.weight": ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"],
        "h.*.mlp.c_fc.weight": ["h.0.mlp.c_fc.weight", "h.1.mlp.c_fc.weight"],
    }
    assert module_groups(LLAMA, "block") == {
        "block 0": [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ],
        "block 1": [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
        ],
    }
    assert list(module_groups(LLAMA, "layer_type")) == [
        "model.layers.*.mlp.down_proj.weight",
        "model.layers.*.self_attn.q_proj.weight",
    ]
    with pytest.raises(ValueError, match="no tensors"):
        module_groups([], "global")


# --- search space and override rules -------------------------------------------------------------


def test_space_imports_no_torch() -> None:
    code = "import sys, crucible.tune.space; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_param_ranges_cover_the_tunable_params() -> None:
    assert {m: tuple(r) for m, r in PARAM_RANGES.items()} == TUNABLE_PARAMS


def test_search_space_decode_encode() -> None:
    space = SearchSpace("bmm", ["a", "b", "c"])
    assert space.dim == 6 and space.params == ("rho", "scale")
    x = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0], dtype=F64)
    values = space.decode(x)
    assert values["a"] == pytest.approx({"rho": 1e-4, "scale": 0.5})
    # Log-uniform: the midpoint is the geometric mean of 1e-4 and 1e2.
    assert values["b"] == pytest.approx({"rho": 0.1, "scale": 1.0})
    assert values["c"] == pytest.approx({"rho": 100.0, "scale": 1.5})
    torch.testing.assert_close(space.encode(values), x)
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(6, generator=gen, dtype=F64)
    torch.testing.assert_close(space.encode(space.decode(y)), y, rtol=0, atol=1e-12)
    # The default point decodes to the method's defaults.
    assert space.decode(space.default_point())["b"] == pytest.approx({"rho": 1.0, "scale": 1.0})
    with pytest.raises(ValueError, match="outside"):
        space.encode({g: {"rho": 1e3, "scale": 1.0} for g in "abc"})
    with pytest.raises(ValueError, match="coordinates"):
        space.decode(torch.zeros(5))


def test_search_space_defaults_from_the_request() -> None:
    ta = SearchSpace("task_arithmetic", ["global"], defaults={"scale": 0.3})
    assert ta.dim == 1 and ta.decode(ta.default_point()) == {
        "global": pytest.approx({"scale": 0.3})
    }
    # Outside the range: clipped to it.
    assert SearchSpace("ties", ["g"], defaults={"scale": 2.0}).defaults == {"scale": 1.5}
    with pytest.raises(ValueError, match="does not tune"):
        SearchSpace("ties", ["g"], defaults={"density": 0.5})
    with pytest.raises(ValueError, match="not tunable"):
        SearchSpace("regmean", ["g"])


@pytest.mark.parametrize("grouping", ["global", "layer_type", "block", "module"])
def test_override_rules_round_trip_through_resolve_params(grouping: str) -> None:
    names = [*BERT, "encoder.layer.3.output[x]+.weight"]  # regex metacharacters in a name
    groups = module_groups(names, grouping)  # type: ignore[arg-type]
    space = SearchSpace("bmm", list(groups))
    gen = torch.Generator().manual_seed(1)
    values = space.decode(torch.rand(space.dim, generator=gen, dtype=F64))
    rules = override_rules(values, groups, fallback={"rho": 5.0, "scale": 0.7})
    params_cls = METHODS["bmm"].params
    request = request_params_model(params_cls).model_validate(
        {"anchor": "ties", "gram": "activations", **rules}
    )
    for group, members in groups.items():
        for name in members:
            p = resolve_params(request, params_cls, name, num_layers=11)
            assert (p.rho, p.scale) == (values[group]["rho"], values[group]["scale"]), name
            assert (p.anchor, p.gram) == ("ties", "activations")
    # Other tensors take the fallback, not a group's value.
    other = resolve_params(request, params_cls, "encoder.layer.3.output.weight", 11)
    assert (other.rho, other.scale) == (5.0, 0.7)


# --- optimizer -----------------------------------------------------------------------------------

OPTIMUM = {"a": 0.4, "b": 1.1}


def quadratic(batch: list[dict[str, dict[str, float]]]) -> list[float]:
    return [-sum((v[g]["scale"] - OPTIMUM[g]) ** 2 for g in OPTIMUM) for v in batch]


def test_run_tuning_finds_the_optimum_of_a_quadratic() -> None:
    space = SearchSpace("task_arithmetic", ["a", "b"])
    seen: list[TrialRecord] = []
    result = run_tuning(space, quadratic, trials=20, init_trials=8, seed=0, on_trial=seen.append)
    assert [r.index for r in seen] == list(range(20)) and result.trials == seen
    assert seen[0].phase == "default" and seen[0].params == {
        "a": pytest.approx({"scale": 1.0}),
        "b": pytest.approx({"scale": 1.0}),
    }
    assert {r.phase for r in seen[1:8]} == {"sobol"} and {r.phase for r in seen[8:]} == {"gp"}
    assert result.best is not None and not result.fallbacks
    init_best = max(r.objective for r in seen[:8] if r.objective is not None)
    assert result.best.objective > init_best
    assert abs(result.best.params["a"]["scale"] - 0.4) < 0.05
    assert abs(result.best.params["b"]["scale"] - 1.1) < 0.05
    assert result.best.objective == max(r.objective for r in seen if r.objective is not None)


def test_run_tuning_is_deterministic_for_a_seed() -> None:
    space = SearchSpace("bmm", ["a"])

    def objective(batch: list[dict[str, dict[str, float]]]) -> list[float]:
        return [
            -((math.log10(v["a"]["rho"]) + 1) ** 2) - (v["a"]["scale"] - 1.2) ** 2 for v in batch
        ]

    runs = [run_tuning(space, objective, trials=10, init_trials=4, seed=s) for s in (5, 5, 6)]
    xs = [[r.x for r in run.trials] for run in runs]
    assert xs[0] == xs[1]
    assert xs[0][4:] != xs[2][4:]
    assert runs[0].trials[0].x == runs[2].trials[0].x  # the default point leads both


def test_batches_propose_distinct_points_and_the_last_batch_is_truncated() -> None:
    space = SearchSpace("task_arithmetic", ["a", "b"])
    sizes: list[int] = []

    def objective(batch: list[dict[str, dict[str, float]]]) -> list[float]:
        sizes.append(len(batch))
        return quadratic(batch)

    result = run_tuning(space, objective, trials=10, init_trials=4, batch=3, seed=1)
    # The initial design is used up exactly (3 + 1), then GP batches of 3, the last cut to 3.
    assert sizes == [3, 1, 3, 3] and len(result.trials) == 10
    for b in (2, 3):
        points = {tuple(r.x) for r in result.trials if r.batch == b}
        assert len(points) == 3 and {r.phase for r in result.trials if r.batch == b} == {"gp"}


def test_optimizer_pending_points_are_not_proposed_twice() -> None:
    opt = BayesianOptimizer(2, init_trials=4, batch=2, seed=0)
    x = opt.ask(4)
    opt.tell(x, [float(-(r - 0.5).pow(2).sum()) for r in x])
    first = opt.ask()
    second = opt.ask()  # first is still pending
    assert opt.last_phase == "gp"
    assert not any(torch.allclose(a, b, atol=1e-6) for a in first for b in second)


def test_nan_objectives_count_as_the_worst() -> None:
    space = SearchSpace("task_arithmetic", ["a", "b"])

    def objective(batch: list[dict[str, dict[str, float]]]) -> list[float]:
        # Diverges (NaN) above scale 0.9 in group a: the default point (1.0) among them.
        ys = quadratic(batch)
        return [math.nan if v["a"]["scale"] > 0.9 else y for v, y in zip(batch, ys, strict=True)]

    result = run_tuning(space, objective, trials=14, init_trials=6, seed=2)
    nan_trials = [r for r in result.trials if r.objective is None]
    assert result.trials[0].objective is None
    assert all(r.params["a"]["scale"] > 0.9 for r in nan_trials)
    assert {r.phase for r in result.trials[6:]} == {"gp"}
    assert result.best is not None and result.best.params["a"]["scale"] <= 0.9
    finite = [r.objective for r in result.trials if r.objective is not None]
    assert result.best.objective == max(finite)

    none = run_tuning(space, lambda b: [math.nan] * len(b), trials=4, init_trials=2, seed=0)
    assert none.best is None and all(r.objective is None for r in none.trials)

    opt = BayesianOptimizer(1, init_trials=2, seed=0)
    x = opt.ask(2)
    opt.tell(x, [math.nan, 0.5])
    best_x, best_y = opt.best()
    assert torch.equal(best_x, x[1]) and best_y == 0.5


def test_minimising_and_a_failed_gp_fit_falls_back_to_sobol() -> None:
    opt = BayesianOptimizer(2, init_trials=3, seed=0, maximize=False)
    x = opt.ask(3)
    # Values near the float64 limit: the standardised GP cannot be fitted.
    opt.tell(x, [1e200, -1e200, 3e200])
    y = opt.ask()
    assert opt.last_phase == "sobol_fallback" and len(opt.fallbacks) == 1
    assert y.shape == (1, 2) and bool(((y >= 0) & (y <= 1)).all())
    best_x, best_y = opt.best()
    assert torch.equal(best_x, x[1]) and best_y == -1e200  # minimised


def test_run_tuning_stops_when_cancelled() -> None:
    class Cancelled(Exception):
        pass

    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_tuning(
            SearchSpace("ties", ["g"]),
            quadratic_one,
            trials=8,
            init_trials=8,
            check_cancelled=check,
        )
    assert len(calls) == 3


def quadratic_one(batch: list[dict[str, dict[str, float]]]) -> list[float]:
    return [-((v["g"]["scale"] - 0.5) ** 2) for v in batch]
