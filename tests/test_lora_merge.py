"""Merges of LoRA adapters (issue 5), checked against independent float64 computations from
PEFT's own ΔW (merge_and_unload) and against PEFT 0.21.2 itself.

Families (tests/support/lora_models.py): a tiny Llama with three adapters of different ranks
and alphas, one rsLoRA with rank_pattern/alpha_pattern, and differing target modules; a tiny
GPT-2 (Conv1D, fan_in_fan_out) with three adapters for the add_weighted_adapter comparisons.
Every job runs in process through crucible.pipeline.run_merge_job.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tests.support.lora_models as lora_models
from crucible.methods.base import TensorContext
from crucible.methods.registry import METHODS
from crucible.pipeline import MergeOutcome, run_merge_job
from crucible.report import REPORT_FILE
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support.lora_models import LoraFamily
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import perturbed_state_dict

PREFIX = "base_model.model."
LLAMA_WEIGHTS = [1.0, 0.5, 2.0]
# float32 storage: a float32 result is within a few ulps (eps 1.2e-7) of its magnitude.
F32_TOL = 2e-6


def _llama_configs() -> list[LoraConfig]:
    return [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
            # k_proj (32 x 64) at full rank: its merged Gram is not rank-deficient.
            rank_pattern={"k_proj": 32, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"down_proj": 4},
        ),
        LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "gate_proj", "down_proj"]),
    ]


def _gpt2_configs() -> list[LoraConfig]:
    # Adapter 0 is not rsLoRA: PEFT's add_weighted_adapter copies the first adapter's config
    # (use_rslora included) for the merged one, whose lora_alpha = r is meant as scaling 1.
    return [
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        LoraConfig(
            r=6,
            lora_alpha=3,
            use_rslora=True,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
        ),
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        ),
    ]


def _independent_family(root: Path, configs: list[LoraConfig], arch: str) -> LoraFamily:
    """make_lora_family with each adapter's factors drawn from its own seed.

    The helper seeds torch before building each adapter's model, but building the model
    re-seeds torch with the base's seed, so every adapter's LoRA init draws from one stream
    (adapter 0's lora_A on a module is the first rows of adapter 1's): their row spaces would
    overlap. Keeping the RNG state across the model build makes the adapters independent
    (harmless once the helper seeds after the build)."""
    make = getattr(lora_models, f"tiny_{arch}")

    def build_keeping_rng(seed: int = 0) -> Any:
        state = torch.random.get_rng_state()
        model = make(seed)
        torch.random.set_rng_state(state)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_models, f"tiny_{arch}", build_keeping_rng)
        family = lora_models.make_lora_family(root, configs, arch=arch)
    # Independence: where two adapters change a module, their ΔW span sum-of-ranks rows.
    for i, j in itertools.combinations(range(len(family.deltas)), 2):
        for name in family.deltas[i].keys() & family.deltas[j].keys():
            a, b = family.deltas[i][name], family.deltas[j][name]
            stacked = torch.cat([a, b], dim=0)
            expected = int(torch.linalg.matrix_rank(a)) + int(torch.linalg.matrix_rank(b))
            assert int(torch.linalg.matrix_rank(stacked)) == min(expected, a.shape[1]), name
    return family


@dataclass
class Bench:
    """A family on disk and a way to run jobs on it."""

    root: Path
    family: LoraFamily
    base: dict[str, torch.Tensor]  # float64
    counter: Iterator[int]

    def grams(self, index: int) -> Path:
        """A Gram folder for adapter `index`: G = X^T X / n of random X for every 2-D
        weight of the base (what the statistics stage would write), seeded per adapter."""
        folder = self.root / f"grams-{index}"
        if not folder.is_dir():
            g = torch.Generator().manual_seed(100 + index)
            grams = {}
            for name, w0 in self.base.items():
                if w0.ndim == 2:
                    x = torch.randn(3 * w0.shape[1], w0.shape[1], generator=g)
                    grams[name] = (x.T @ x / x.shape[0]).float().contiguous()
            folder.mkdir(parents=True)
            save_file(grams, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    def run(
        self,
        experts: list[tuple[Path, float]],
        method: dict[str, Any],
        output: dict[str, Any] | None = None,
        lowrank: bool = True,
        grams: bool = False,
    ) -> MergeOutcome:
        spec = MergeSpec.model_validate(
            {
                "base": {"uri": self.family.base.as_uri()},
                "experts": [
                    {
                        "uri": p.as_uri(),
                        "weight": w,
                        **({"grams": {"uri": self.grams(i).as_uri()}} if grams else {}),
                    }
                    for i, (p, w) in enumerate(experts)
                ],
                "method": method,
                "output": output or {},
            }
        )
        settings = Settings(
            data_dir=self.root / "data", allowed_local_dirs=[self.root], lora_lowrank=lowrank
        )
        out = self.root / f"out-{next(self.counter)}"
        return run_merge_job(spec, out, settings, QuietReporter())

    def adapters(self, weights: list[float]) -> list[tuple[Path, float]]:
        return list(zip(self.family.adapters, weights, strict=True))

    def exact(self, coefs: list[float]) -> dict[str, torch.Tensor]:
        """sum_t c_t ΔW_t per module any adapter changes, float64, from PEFT's ΔW."""
        out: dict[str, torch.Tensor] = {}
        for c, deltas in zip(coefs, self.family.deltas, strict=True):
            for name, delta in deltas.items():
                out[name] = out.get(name, torch.zeros_like(delta)) + c * delta
        return out


def _bench(root: Path, configs: list[LoraConfig], arch: str) -> Bench:
    family = _independent_family(root, configs, arch)
    base = {k: v.double() for k, v in load_file(str(family.base / "model.safetensors")).items()}
    return Bench(root=root, family=family, base=base, counter=itertools.count())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return _bench(tmp_path_factory.mktemp("lora_llama"), _llama_configs(), "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return _bench(tmp_path_factory.mktemp("lora_gpt2"), _gpt2_configs(), "gpt2")


def _load64(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(path)).items()}


def _lora_products(out_dir: Path) -> dict[str, torch.Tensor]:
    """Base tensor name -> B @ A (float64) of a Crucible LoRA output, nn.Linear layout.
    The config must give scaling 1 on every module (lora_alpha = r, alpha_pattern =
    rank_pattern), so B @ A is the merged ΔW."""
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    tensors = _load64(out_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            out[f"{module}.weight"] = tensors[f"{PREFIX}{module}.lora_B.weight"] @ a
    return out


def _fresh_base(bench: Bench) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(bench.family.base).eval()


def _lora_layers(model: PeftModel, adapter: str) -> dict[str, LoraLayer]:
    """Base tensor name -> the LoRA layer holding `adapter`."""
    return {
        f"{name}.weight": module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def _peft_deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW of `adapter` per module (scaling included), in the base's layout."""
    with torch.no_grad():
        return {
            name: layer.get_delta_weight(adapter).double()
            for name, layer in _lora_layers(model, adapter).items()
        }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_close_f32(
    actual: torch.Tensor, expected: torch.Tensor, name: str, scale: float
) -> None:
    """|actual - expected| <= F32_TOL * scale elementwise (scale: the magnitudes involved)."""
    err = float((actual - expected).abs().max())
    assert err <= F32_TOL * scale, f"{name}: max error {err:.3g} > {F32_TOL * scale:.3g}"


def _magnitude(*tensors: torch.Tensor) -> float:
    return max(1e-3, *(float(t.abs().max()) for t in tensors))


def _svd_truncation(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The best rank-`rank` approximation (Eckart-Young) and sqrt(sum_{i>r} s^2 / sum s^2)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    squares = s.pow(2)
    return kept, math.sqrt(float(squares[rank:].sum() / squares.sum()))


# -- 1. format full ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "coefs"),
    [
        pytest.param(
            {"name": "task_arithmetic", "params": {"scale": 0.7}},
            [0.7 * w for w in LLAMA_WEIGHTS],
            id="task_arithmetic",
        ),
        pytest.param(
            {"name": "linear", "params": {"normalize": True}},
            [w / sum(LLAMA_WEIGHTS) for w in LLAMA_WEIGHTS],
            id="linear-normalized",
        ),
    ],
)
def test_full_output_is_base_plus_weighted_peft_deltas(
    llama: Bench, method: dict[str, Any], coefs: list[float]
) -> None:
    """format full: every output tensor is W0 + sum_t c_t ΔW_t, ΔW_t from PEFT's own
    merge_and_unload in float64 (tensors no adapter targets stay W0)."""
    outcome = llama.run(llama.adapters(LLAMA_WEIGHTS), method, {"format": "full"})
    merged = _load64(outcome.output_dir / "model.safetensors")
    assert merged.keys() == llama.base.keys()
    exact = llama.exact(coefs)
    assert len(exact) == 14  # every linear module of both layers is targeted by some adapter
    for name, w0 in llama.base.items():
        expected = w0 + exact.get(name, torch.zeros_like(w0))
        _assert_close_f32(merged[name], expected, name, _magnitude(w0, expected))


def test_full_output_mixes_a_full_fine_tune_with_adapters(llama: Bench) -> None:
    """A full fine-tune among LoRA experts: W0 + c_0 (W_ft - W0) + sum_t c_t ΔW_t, on every
    tensor (the fine-tune changes embeddings and norms too)."""
    model = lora_models.tiny_llama(0)
    generator = torch.Generator().manual_seed(5)
    model.load_state_dict(perturbed_state_dict(model.state_dict(), generator))
    full_dir = llama.root / "full_ft"
    model.save_pretrained(full_dir)
    full = _load64(full_dir / "model.safetensors")
    weights = [0.6, *LLAMA_WEIGHTS]
    scale = 0.8
    outcome = llama.run(
        [(full_dir, weights[0]), *llama.adapters(LLAMA_WEIGHTS)],
        {"name": "task_arithmetic", "params": {"scale": scale}},
        {"format": "full"},
    )
    merged = _load64(outcome.output_dir / "model.safetensors")
    lora = llama.exact([scale * w for w in LLAMA_WEIGHTS])
    for name, w0 in llama.base.items():
        tau_ft = full[name] - w0
        assert float(tau_ft.abs().max()) > 0, name
        expected = w0 + scale * weights[0] * tau_ft + lora.get(name, torch.zeros_like(w0))
        _assert_close_f32(merged[name], expected, name, _magnitude(w0, full[name], expected))


# -- 2. format lora, lossless rank, loaded by PEFT -------------------------------------------


@pytest.fixture(scope="module")
def lossless(llama: Bench) -> tuple[MergeOutcome, MergeOutcome]:
    """task_arithmetic (scale 0.7) as format full and as format lora at a rank covering every
    module's sum of adapter ranks (4 + 32 + 2 = 38, capped per module at min(d))."""
    method = {"name": "task_arithmetic", "params": {"scale": 0.7}}
    experts = llama.adapters(LLAMA_WEIGHTS)
    full = llama.run(experts, method, {"format": "full"})
    lora = llama.run(experts, method, {"format": "lora", "lora_rank": 38})
    return full, lora


def test_lossless_lora_output_loads_in_peft_with_full_merge_logits(
    llama: Bench, lossless: tuple[MergeOutcome, MergeOutcome]
) -> None:
    """PEFT loads the adapter on the base; its logits equal the format full merge's loaded
    with transformers, and merge_and_unload gives the full merge's tensors."""
    full, lora = lossless
    peft_model = PeftModel.from_pretrained(_fresh_base(llama), lora.output_dir).eval()
    dense = AutoModelForCausalLM.from_pretrained(full.output_dir).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits.double()
        want = dense(input_ids=ids).logits.double()
        plain = _fresh_base(llama)(input_ids=ids).logits.double()
    assert _rel(plain, want) > 0.05  # the merge changes the model: the check can fail
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    layers = _lora_layers(peft_model, "default")
    assert layers.keys() == llama.exact([1.0] * 3).keys()  # every targeted module, no other
    for layer in layers.values():
        assert layer.scaling["default"] == 1.0
    unloaded = {k: v.double() for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged = _load64(full.output_dir / "model.safetensors")
    for name, tensor in merged.items():
        _assert_close_f32(unloaded[name], tensor, name, _magnitude(tensor, llama.base[name]))


def test_lossless_lora_config_and_factors(
    llama: Bench, lossless: tuple[MergeOutcome, MergeOutcome]
) -> None:
    """adapter_config: lora_alpha == r (patterns too), target_modules the union of the
    inputs' lists, ranks capped at min(d) in rank_pattern; B A is sum_t c_t ΔW_t exactly and
    the reported errors are 0."""
    _, lora = lossless
    config = json.loads((lora.output_dir / "adapter_config.json").read_text())
    union = set().union(*(set(c.target_modules) for c in _llama_configs()))
    assert set(config["target_modules"]) == union
    assert config["r"] == config["lora_alpha"] == 38
    assert config["peft_type"] == "LORA" and not config["use_rslora"]
    capped = {k: 32 for k in ("k_proj", "v_proj")}  # 32 x 64 modules: rank at most 32
    assert {re.sub(r"\\", "", k): v for k, v in config["rank_pattern"].items()} == {
        f"model.layers.{i}.self_attn.{m}": r for i in (0, 1) for m, r in capped.items()
    }
    assert config["alpha_pattern"] == config["rank_pattern"]
    products = _lora_products(lora.output_dir)
    exact = llama.exact([0.7 * w for w in LLAMA_WEIGHTS])
    assert products.keys() == exact.keys()
    for name, delta in exact.items():
        assert _rel(products[name], delta) < 1e-6, name
    assert lora.metrics["lora"]["error_max"] < 1e-12


# -- 3. low-rank path vs dense path ----------------------------------------------------------


@pytest.mark.parametrize("rank", [3, 38])
def test_lowrank_and_dense_paths_agree(llama: Bench, rank: int) -> None:
    """The QR path (linear/task_arithmetic) and the dense SVD (lora_lowrank false) give the
    same B A per module, truncated (rank 3) or not, the same config, and say which ran."""
    method = {"name": "task_arithmetic", "params": {"scale": 0.7}}
    output = {"format": "lora", "lora_rank": rank}
    experts = llama.adapters(LLAMA_WEIGHTS)
    low = llama.run(experts, method, output, lowrank=True)
    dense = llama.run(experts, method, output, lowrank=False)
    n = len(llama.exact([1.0] * 3))
    assert low.metrics["lora"]["lowrank_modules"] == n and low.metrics["lora"]["dense_modules"] == 0
    assert dense.metrics["lora"]["lowrank_modules"] == 0
    assert dense.metrics["lora"]["dense_modules"] == n
    for outcome, path in ((low, "lowrank"), (dense, "dense")):
        report = json.loads((outcome.output_dir / REPORT_FILE).read_text())
        assert report["lora"]["lowrank_modules"] == outcome.metrics["lora"]["lowrank_modules"]
        assert {m["lora_path"] for m in report["modules"]} == {path}
        assert len(report["modules"]) == n
    configs = [json.loads((o.output_dir / "adapter_config.json").read_text()) for o in (low, dense)]
    assert configs[0] == configs[1]
    a, b = _lora_products(low.output_dir), _lora_products(dense.output_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert _rel(a[name], b[name]) < 1e-5, name


# -- 4. truncation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def truncated(llama: Bench) -> MergeOutcome:
    return llama.run(
        llama.adapters(LLAMA_WEIGHTS),
        {"name": "task_arithmetic", "params": {"scale": 0.7}},
        {"format": "lora", "lora_rank": 3},
    )


def test_truncation_errors_match_an_independent_svd(llama: Bench, truncated: MergeOutcome) -> None:
    """lora_rank 3 (below every exact rank but gate_proj's 2): per-module lora_error and the
    job's error_max / error_mean equal sqrt(sum of discarded s^2 / sum s^2) of the float64
    merged ΔW, and B A is its best rank-3 approximation."""
    exact = llama.exact([0.7 * w for w in LLAMA_WEIGHTS])
    report = json.loads((truncated.output_dir / REPORT_FILE).read_text())
    by_module = {m["tensor"]: m for m in report["modules"]}
    products = _lora_products(truncated.output_dir)
    errors = []
    for name, delta in exact.items():
        kept, error = _svd_truncation(delta, 3)
        errors.append(error)
        entry = by_module[name]
        assert entry["lora_rank"] == 3
        assert entry["lora_error"] == pytest.approx(error, rel=1e-6, abs=1e-9), name
        assert _rel(products[name], kept) < 1e-5, name
    assert max(errors) > 0.1  # the rank truncates: the errors are not trivially 0
    summary = truncated.metrics["lora"]
    assert summary["error_max"] == pytest.approx(max(errors), rel=1e-6)
    assert summary["error_mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-6)
    assert report["lora"]["error_max"] == pytest.approx(max(errors), rel=1e-6)


def test_auto_rank_keeps_the_energy_and_peft_honours_the_patterns(llama: Bench) -> None:
    """lora_rank auto, lora_energy 0.9: each module's rank is the smallest keeping 90% of
    sum s^2 (independent SVD); the ranks go to rank_pattern/alpha_pattern, and PEFT loads
    them: each layer's rank, scaling 1, and ΔW the rank-k truncation."""
    energy = 0.9
    exact = llama.exact([0.7 * w for w in LLAMA_WEIGHTS])
    expected: dict[str, int] = {}
    for name, delta in exact.items():
        squares = torch.linalg.svdvals(delta).pow(2)
        share = torch.cumsum(squares, 0) / squares.sum()
        expected[name] = int(torch.nonzero(share >= energy)[0]) + 1
    assert len(set(expected.values())) > 2  # ranks differ across modules
    outcome = llama.run(
        llama.adapters(LLAMA_WEIGHTS),
        {"name": "task_arithmetic", "params": {"scale": 0.7}},
        {"format": "lora", "lora_rank": "auto", "lora_energy": energy},
    )
    report = json.loads((outcome.output_dir / REPORT_FILE).read_text())
    assert {m["tensor"]: m["lora_rank"] for m in report["modules"]} == expected
    config = json.loads((outcome.output_dir / "adapter_config.json").read_text())
    assert config["r"] == max(expected.values())
    peft_model = PeftModel.from_pretrained(_fresh_base(llama), outcome.output_dir)
    layers = _lora_layers(peft_model, "default")
    assert layers.keys() == expected.keys()
    deltas = _peft_deltas(peft_model, "default")
    for name, layer in layers.items():
        assert layer.r["default"] == expected[name], name
        assert layer.scaling["default"] == 1.0, name
        kept, _ = _svd_truncation(exact[name], expected[name])
        assert _rel(deltas[name], kept) < 1e-5, name


# -- 5. PEFT's add_weighted_adapter ------------------------------------------------------


def _peft_with_adapters(bench: Bench, indices: list[int]) -> PeftModel:
    first, *rest = indices
    model = PeftModel.from_pretrained(
        _fresh_base(bench), bench.family.adapters[first], adapter_name=f"a{first}"
    )
    for i in rest:
        model.load_adapter(bench.family.adapters[i], adapter_name=f"a{i}")
    return model


def _gpt2_scalings() -> list[float]:
    return [c.lora_alpha / (math.sqrt(c.r) if c.use_rslora else c.r) for c in _gpt2_configs()]


@pytest.mark.parametrize(
    ("method", "weights"),
    [
        pytest.param({"name": "task_arithmetic"}, [0.6, -0.3, 1.2], id="task_arithmetic"),
        pytest.param(
            {"name": "linear", "params": {"normalize": False}}, [0.5, 0.2, 0.3], id="linear-sum1"
        ),
    ],
)
def test_peft_svd_combination_equals_crucible(
    gpt2: Bench, method: dict[str, Any], weights: list[float]
) -> None:
    """PEFT's add_weighted_adapter(combination_type="svd", svd_rank = sum r) is
    sum_t w_t ΔW_t (get_delta_weight already holds each adapter's scaling, and 0.21.2 does
    not apply it twice: checked against sum_t w_t s_t ΔW_t below), then an SVD. Crucible's
    task_arithmetic (scale 1) with the same weights, or linear without normalization with
    weights summing to 1, as format lora at that rank gives the same ΔW on every module
    (GPT-2 Conv1D, fan_in_fan_out adapters, one rsLoRA)."""
    svd_rank = sum(c.r for c in _gpt2_configs())
    model = _peft_with_adapters(gpt2, [0, 1, 2])
    model.add_weighted_adapter(
        ["a0", "a1", "a2"], weights, "svd", combination_type="svd", svd_rank=svd_rank
    )
    peft_merged = _peft_deltas(model, "svd")
    exact = gpt2.exact(weights)
    twice = gpt2.exact([w * s for w, s in zip(weights, _gpt2_scalings(), strict=True)])
    assert peft_merged.keys() == exact.keys()
    outcome = gpt2.run(gpt2.adapters(weights), method, {"format": "lora", "lora_rank": svd_rank})
    ours = _peft_deltas(PeftModel.from_pretrained(_fresh_base(gpt2), outcome.output_dir), "default")
    assert ours.keys() == exact.keys()
    for name, delta in exact.items():
        assert _rel(peft_merged[name], delta) < 1e-5, name
        assert _rel(twice[name], delta) > 0.1, name  # the scaling is not applied twice
        assert _rel(ours[name], peft_merged[name]) < 1e-5, name


def test_peft_linear_combination_drops_cross_terms_crucible_does_not(gpt2: Bench) -> None:
    """PEFT's combination_type="linear" mixes A and B separately (each by sqrt(w s)), so
    B A = sum_t w_t ΔW_t + cross terms sqrt(w_t s_t w_u s_u) B_t A_u. On adapters 0 and 2
    (both r = 4) with weights 0.3 / 0.7 the relative Frobenius difference from the exact sum
    measured 0.63 to 0.65 on the four modules both target; Crucible's linear (normalize
    false, weights summing to 1) equals the exact sum."""
    weights = [0.3, 0.7]
    model = _peft_with_adapters(gpt2, [0, 2])
    model.add_weighted_adapter(["a0", "a2"], weights, "lin", combination_type="linear")
    peft_merged = _peft_deltas(model, "lin")
    exact = gpt2.exact([weights[0], 0.0, weights[1]])
    outcome = gpt2.run(
        [(gpt2.family.adapters[0], weights[0]), (gpt2.family.adapters[2], weights[1])],
        {"name": "linear", "params": {"normalize": False}},
        {"format": "lora", "lora_rank": 8},
    )
    ours = _peft_deltas(PeftModel.from_pretrained(_fresh_base(gpt2), outcome.output_dir), "default")
    # Modules both adapters target (c_attn; c_fc): there the cross terms exist.
    shared = gpt2.family.deltas[0].keys() & gpt2.family.deltas[2].keys()
    assert shared
    differences = {name: _rel(peft_merged[name], exact[name]) for name in shared}
    assert min(differences.values()) > 0.5, differences
    for name, delta in exact.items():
        assert _rel(ours[name], delta) < 1e-5, name


# -- 6. every method in delta space ------------------------------------------------------


def _method_params(name: str) -> dict[str, Any]:
    # DARE's masks are seeded per (seed, tensor, expert): both formats draw the same ones.
    return {"seed": 7} if name.startswith("dare") else {}


@dataclass
class MethodRun:
    full: MergeOutcome
    lora: MergeOutcome


@pytest.fixture(scope="module")
def method_runs(llama: Bench) -> Callable[[str], MethodRun]:
    """One format full and one format lora (rank 64 >= every min(d)) job per method."""
    cache: dict[str, MethodRun] = {}

    def get(name: str) -> MethodRun:
        if name not in cache:
            method = {"name": name, "params": _method_params(name)}
            experts = llama.adapters(LLAMA_WEIGHTS)
            # regmean (and any method needing Grams) gets per-expert Gram folders.
            info = METHODS[name]
            grams = info.needs_grams is not None and bool(info.needs_grams(info.params()))
            cache[name] = MethodRun(
                full=llama.run(experts, method, {"format": "full"}, grams=grams),
                lora=llama.run(experts, method, {"format": "lora", "lora_rank": 64}, grams=grams),
            )
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_a_function_of_the_task_vectors(
    llama: Bench, method_runs: Callable[[str], MethodRun], name: str
) -> None:
    """format lora at full rank reproduces (format full - base) on every targeted module, and
    the format full output keeps W0 where no adapter changes anything: the method is
    W0 + g(tau_1..tau_T), so merging in delta space loses nothing."""
    run = method_runs(name)
    full = _load64(run.full.output_dir / "model.safetensors")
    products = _lora_products(run.lora.output_dir)
    targeted = llama.exact([1.0] * 3).keys()
    assert products.keys() == targeted
    assert run.lora.metrics["lora"]["error_max"] < 1e-9
    for tensor, w0 in llama.base.items():
        if tensor in targeted:
            delta = full[tensor] - w0
            _assert_close_f32(products[tensor], delta, tensor, _magnitude(w0, delta))
        else:
            _assert_close_f32(full[tensor], w0, tensor, _magnitude(w0))


@pytest.mark.parametrize(
    ("name", "extra_rank"),
    [
        ("task_arithmetic", False),
        ("linear", False),
        ("tsv", False),
        ("bmm", True),
        ("iso_c", False),
        ("iso_cts", False),
    ],
)
def test_merged_delta_rank_stays_within_merge_math_bounds(
    llama: Bench, method_runs: Callable[[str], MethodRun], name: str, extra_rank: bool
) -> None:
    """merge-math.md section 11: TA, ISO-C, ISO-CTS and TSV-M of low-rank task vectors have
    rank <= sum_t r_t; BMM adds at most the anchor's rank (TA: sum_t r_t again)."""
    products = _lora_products(method_runs(name).lora.output_dir)
    for tensor, product in products.items():
        bound = sum(
            int(torch.linalg.matrix_rank(d[tensor])) for d in llama.family.deltas if tensor in d
        )
        bound = min(2 * bound if extra_rank else bound, min(product.shape))
        s = torch.linalg.svdvals(product)
        numerical = int((s > 1e-5 * s[0]).sum())  # float32 factors: noise ~1e-7 s[0]
        assert numerical <= bound, f"{tensor}: rank {numerical} > {bound}"


@pytest.mark.parametrize(
    "low_rank",
    [
        pytest.param(False, id="full-rank"),
        pytest.param(True, id="low-rank"),
    ],
)
@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_subspace_methods_are_continuous_in_the_task_vectors(name: str, low_rank: bool) -> None:
    """Perturbing the task vectors by 1e-13 must not move the merged task vector (relative
    change < 1e-8). Before these methods kept only the numerical rank (crucible.methods.
    linalg.numerical_rank), rank-3 and rank-5 task vectors (64 x 48) moved it by 0.78
    (tsv), 1.28 (iso_c) and 1.39 (iso_cts): the SVD's arbitrary null-space vectors
    entered the result, and the delta-space checks above failed for them."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    taus = [randn(64, r) @ randn(r, 48) if low_rank else randn(64, 48) for r in (3, 5)]
    noisy = [t + 1e-13 * randn(*t.shape) for t in taus]
    info = METHODS[name]

    def merged(experts: list[torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros(64, 48, dtype=torch.float64)
        ctx = TensorContext(name="m.weight", base=zero, experts=experts, weights=[1.0, 1.0])
        return info.merge(ctx, info.params())

    assert _rel(merged(noisy), merged(taus)) < 1e-8


# -- 7. data-free Gram methods on low-rank adapters -------------------------------------------

DATA_FREE = ["ace", "wudi", "bmm", "tsv", "iso_c", "iso_cts"]


@pytest.mark.parametrize("name", DATA_FREE)
def test_data_free_gram_methods_report_adapter_ranks(
    llama: Bench, method_runs: Callable[[str], MethodRun], name: str
) -> None:
    """Finite outputs; every targeted module's report entry (both formats) lists the ranks of
    the adapters that change it and rank_deficient = sum of ranks < min(d) (k_proj, at rank
    32 = min(d), is not); untouched modules carry no lora_ranks."""
    if name == "bmm":
        assert METHODS["bmm"].params().gram == "data_free"  # the default run is data-free
    run = method_runs(name)
    full = _load64(run.full.output_dir / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in full.values())
    lora = _load64(run.lora.output_dir / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in lora.values())
    expected: dict[str, list[int]] = {}
    for deltas in llama.family.deltas:
        for tensor, delta in deltas.items():
            expected.setdefault(tensor, []).append(int(torch.linalg.matrix_rank(delta)))
    deficient = {t: sum(r) < min(llama.base[t].shape) for t, r in expected.items()}
    assert set(deficient.values()) == {True, False}
    for outcome in (run.full, run.lora):
        report = json.loads((outcome.output_dir / REPORT_FILE).read_text())
        entries = {m["tensor"]: m for m in report["modules"]}
        for tensor, ranks in expected.items():
            assert entries[tensor]["lora_ranks"] == ranks, tensor
            assert entries[tensor]["rank_deficient"] is deficient[tensor], tensor
        for tensor, entry in entries.items():
            if tensor not in expected:
                assert "lora_ranks" not in entry and "rank_deficient" not in entry, tensor


@pytest.mark.parametrize(
    "name",
    DATA_FREE,
)
def test_data_free_gram_methods_stay_bounded(
    llama: Bench, method_runs: Callable[[str], MethodRun], name: str
) -> None:
    """||merged ΔW||_F <= 10 sum_t ||w_t tau_t||_F on every module (measured: at most 1.9,
    bmm; ace 5.7e9); a zero task vector must not blow the merge up."""
    products = _lora_products(method_runs(name).lora.output_dir)
    for tensor, product in products.items():
        scale = sum(
            abs(w) * float(d[tensor].norm())
            for w, d in zip(LLAMA_WEIGHTS, llama.family.deltas, strict=True)
            if tensor in d
        )
        assert float(product.norm()) <= 10 * scale, f"{tensor}: {float(product.norm()):.3g}"


# -- 8. the published folder ---------------------------------------------------------------


def test_lora_output_folder_and_model_card(llama: Bench, truncated: MergeOutcome) -> None:
    """The adapter folder holds adapter files, the base's tokenizer files, README.md and
    merge_report.json, and no config.json; the card states the worst and mean relative
    Frobenius errors, which equal the independent SVD's."""
    out = truncated.output_dir
    tokenizer = {
        p.name
        for p in llama.family.base.iterdir()
        if p.name not in {"config.json", "generation_config.json", "model.safetensors"}
    }
    assert tokenizer  # the base has tokenizer files to copy
    files = {p.name for p in out.iterdir()}
    assert files == {
        "adapter_config.json", "adapter_model.safetensors", "README.md", REPORT_FILE, *tokenizer
    }  # fmt: skip
    for name in tokenizer:
        assert (out / name).read_bytes() == (llama.family.base / name).read_bytes()
    exact = llama.exact([0.7 * w for w in LLAMA_WEIGHTS])
    errors = [_svd_truncation(delta, 3)[1] for delta in exact.values()]
    card = (out / "README.md").read_text()

    def stated(row: str) -> float:
        match = re.search(rf"\|\s*{row}\s*\|\s*([0-9.eE+-]+)%\s*\|", card)
        assert match, f"no '{row}' row in the card"
        return float(match[1]) / 100

    assert stated("worst module") == pytest.approx(max(errors), rel=1e-3)
    assert stated("mean over modules") == pytest.approx(sum(errors) / len(errors), rel=1e-3)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties"])
def test_dense_path_merges_large_modules_in_blocks_of_rows(
    llama: Bench, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Past engine.BLOCK_ELEMENTS an elementwise method merges blocks of rows; the LoRA
    output's dense path must assemble them into the whole ΔW (a 2048-wide bench once failed
    here). Shrinking the block size makes the tiny model's modules blockwise: same result."""
    import crucible.engine as engine

    method = {"name": name, "params": {}}
    experts = llama.adapters(LLAMA_WEIGHTS)
    output = {"format": "lora", "lora_rank": 64}
    whole = _lora_products(llama.run(experts, method, output, lowrank=False).output_dir)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 512)  # 64-wide rows: blocks of 8 rows
    assert len(engine.row_blocks((64, 64), True)) == 8
    blocked = _lora_products(llama.run(experts, method, output, lowrank=False).output_dir)
    assert blocked.keys() == whole.keys()
    for tensor, product in whole.items():
        assert _rel(blocked[tensor], product) < 1e-6, tensor
