"""LoRA adapters in, one LoRA adapter out, end to end through real processes (uvicorn over
HTTP, a Celery worker, PostgreSQL, Redis).

Three real PEFT adapters of different ranks, scalings (one rsLoRA) and target modules are
made on a tiny Llama. A TIES merge with `output.format: lora` is checked against an
independent float64 computation: PEFT's own ΔW of each adapter (merge_and_unload on a
float64 copy), TIES coordinate by coordinate (tests/support/reference.py), then a numpy SVD
truncated to the requested rank. The published adapter is loaded by PEFT itself on the
base, merged and run. A `format: full` merge of the same adapters must equal the untruncated
TIES result, and the adapter must sit at the reported truncation error from it. An adapter
trained on another base is refused with `adapter_base_mismatch`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.numpy import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from tests.support.lora_models import LoraFamily, make_lora_family
from tests.support.reference import ref_ties
from tests.support.stack import service_stack

pytestmark = pytest.mark.e2e

RANK = 6  # below every merged module's rank: each truncation loses something
DENSITY = 0.2  # TIES's default
OTHER_BASE = "someone/other-model"
MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def _configs() -> list[LoraConfig]:
    """Different ranks, alphas and targets; q_proj is shared by all three, so its TIES
    election mixes three adapters, while k/o, v and up/down come from one adapter each."""
    return [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        LoraConfig(
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
        LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["q_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("lora")
    family = make_lora_family(work / "models" / "family", _configs(), seed=1)
    stranger = make_lora_family(
        work / "models" / "stranger",
        [LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")],
        seed=1,
        base_name=OTHER_BASE,
    )
    with service_stack(work, work / "models") as (stack, client):
        yield {
            "stack": stack,
            "client": client,
            "family": family,
            "stranger": stranger,
            "data": work / "data",
        }


def _submit(world: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    resp = world["client"].post("/v1/merges", json=spec)
    assert resp.status_code == 202, resp.text
    return world["stack"].wait_for_job(world["client"], resp.json()["id"], timeout=300)


def _merge(world: dict[str, Any], method: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    family: LoraFamily = world["family"]
    spec = {
        "base": {"uri": family.base.as_uri()},
        "experts": [
            {"uri": a.as_uri(), "name": f"adapter{i}"} for i, a in enumerate(family.adapters)
        ],
        "method": method,
        "output": output,
    }
    job = _submit(world, spec)
    assert job["status"] == "succeeded", json.dumps(job["error"]) + world["stack"].logs()
    return job


def _output(world: dict[str, Any], job: dict[str, Any]) -> Path:
    assert job["result"]["uri"] == f"local://jobs/{job['id']}/output"
    return world["data"] / "artifacts" / "jobs" / job["id"] / "output"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def _truncate(delta: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """The best rank-`rank` approximation (numpy SVD) and its relative Frobenius error."""
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    error = float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))
    return (u[:, :rank] * s[:rank]) @ vh[:rank], error


@pytest.fixture(scope="module")
def reference(world: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per module an adapter targets: TIES (density 0.2, sign by total, disjoint mean) of
    the adapters' float64 ΔW from PEFT, zero where an adapter does not target the module."""
    family: LoraFamily = world["family"]
    names = sorted({n for d in family.deltas for n in d})
    out = {}
    for name in names:
        shape = next(d[name].shape for d in family.deltas if name in d)
        taus = [d[name].numpy() if name in d else np.zeros(shape) for d in family.deltas]
        out[name] = ref_ties(np.zeros(shape), taus, [1.0] * len(taus), DENSITY, "total", True, 1.0)
    return out


@pytest.fixture(scope="module")
def ties_adapter(world: dict[str, Any]) -> dict[str, Any]:
    return _merge(world, {"name": "ties"}, {"format": "lora", "lora_rank": RANK})


def test_ties_adapter_is_a_peft_adapter_of_the_truncated_ties_merge(
    world: dict[str, Any], ties_adapter: dict[str, Any], reference: dict[str, np.ndarray]
) -> None:
    family: LoraFamily = world["family"]
    out = _output(world, ties_adapter)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    # An adapter folder, not a model: no model config or full weights next to it.
    assert not files & {"config.json", "generation_config.json", "model.safetensors"}
    assert {f["path"] for f in ties_adapter["result"]["files"]} == files

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK
    assert set(config["target_modules"]) == MODULES
    factors = load_file(str(out / "adapter_model.safetensors"))
    modules = {n.removesuffix(".weight") for n in reference}
    assert set(factors) == {
        f"base_model.model.{m}.lora_{x}.weight" for m in modules for x in ("A", "B")
    }
    assert all(RANK in v.shape for v in factors.values())

    # PEFT loads the adapter on the base; its merged weights are W0 + the reference's
    # rank-RANK truncation on every targeted module and W0 everywhere else.
    base = _tensors(family.base / "model.safetensors")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family.base), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
        generated = model.generate(
            input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
    assert generated.shape == (1, ids.shape[1] + 4)
    assert torch.equal(generated[:, : ids.shape[1]], ids)
    assert float((logits - bare).abs().max()) > 1e-2  # the adapter does change the model

    merged = {k: v.double().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    expected = dict(base)
    errors = {}
    for name, ties in reference.items():
        truncated, errors[name] = _truncate(ties, RANK)
        expected[name] = base[name] + truncated
        np.testing.assert_allclose(merged[name] - base[name], truncated, rtol=0, atol=1e-6)
    for name in base.keys() - reference.keys():
        np.testing.assert_array_equal(merged[name], base[name])

    # The same logits as the base with the reference weights put in, independently of PEFT.
    plain = LlamaForCausalLM.from_pretrained(family.base).eval()
    plain.load_state_dict({k: torch.from_numpy(v).float() for k, v in expected.items()})
    with torch.no_grad():
        np.testing.assert_allclose(plain(input_ids=ids).logits, logits, rtol=0, atol=1e-4)

    # The reported truncation errors are the reference's, per module and in summary.
    metrics = ties_adapter["result"]["metrics"]["lora"]
    assert {"error_max", "error_mean", "modules"} <= set(metrics)
    assert metrics["modules"] == len(reference)
    assert metrics["error_max"] == pytest.approx(max(errors.values()), abs=1e-6)
    assert metrics["error_mean"] == pytest.approx(np.mean(list(errors.values())), abs=1e-6)
    assert min(errors.values()) > 0.05  # TIES's sparsified ΔW is not rank RANK: real loss
    per_module = {m["tensor"]: m for m in ties_adapter["result"]["report"]["modules"]}
    assert set(per_module) == set(reference)
    for name, error in errors.items():
        assert per_module[name]["lora_rank"] == RANK
        assert per_module[name]["lora_path"] == "dense"  # ties has no low-rank path
        assert per_module[name]["lora_error"] == pytest.approx(error, abs=1e-6)

    card = (out / "README.md").read_text()
    assert "## LoRA output" in card
    for value in (metrics["error_max"], metrics["error_mean"]):
        assert f"{100 * value:.4g}%" in card

    # Each input is recorded as the adapter it is (ranks as PEFT saved them).
    inputs = ties_adapter["result"]["inputs"]
    assert [i["role"] for i in inputs] == ["base", "expert", "expert", "expert"]
    assert [i["adapter"]["ranks"] for i in inputs[1:]] == [[4], [8], [2]]


def test_full_format_of_the_same_adapters_is_the_untruncated_merge(
    world: dict[str, Any], ties_adapter: dict[str, Any], reference: dict[str, np.ndarray]
) -> None:
    """format full publishes W0 + TIES(ΔW) itself; the adapter's B A is that ΔW truncated,
    at exactly the relative error the adapter job reported for each module."""
    family: LoraFamily = world["family"]
    job = _merge(world, {"name": "ties"}, {"format": "full"})
    out = _output(world, job)
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    base = _tensors(family.base / "model.safetensors")
    full = _tensors(out / "model.safetensors")
    factors = _tensors(_output(world, ties_adapter) / "adapter_model.safetensors")
    per_module = {m["tensor"]: m for m in ties_adapter["result"]["report"]["modules"]}
    for name, ties in reference.items():
        delta = full[name] - base[name]
        np.testing.assert_allclose(delta, ties, rtol=0, atol=1e-6)
        module = f"base_model.model.{name.removesuffix('.weight')}"
        ba = factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]
        error = np.linalg.norm(delta - ba) / np.linalg.norm(delta)
        assert error == pytest.approx(per_module[name]["lora_error"], abs=1e-5)
    for name in base.keys() - reference.keys():
        np.testing.assert_array_equal(full[name], base[name])


def test_task_arithmetic_at_the_summed_rank_is_lossless(world: dict[str, Any]) -> None:
    """A TA sum of adapters has rank <= sum r_t (14 on q_proj): at that rank the low-rank
    path (QR of the stacked factors, no d_out x d_in matrix) reproduces sum_t ΔW_t."""
    family: LoraFamily = world["family"]
    summed = sum(c.r for c in _configs())
    job = _merge(world, {"name": "task_arithmetic"}, {"format": "lora", "lora_rank": summed})
    metrics = job["result"]["metrics"]["lora"]
    assert metrics["error_max"] < 1e-6
    assert metrics["lowrank_modules"] == metrics["modules"] and metrics["dense_modules"] == 0
    factors = _tensors(_output(world, job) / "adapter_model.safetensors")
    names = {n for d in family.deltas for n in d}
    for name in names:
        module = f"base_model.model.{name.removesuffix('.weight')}"
        ba = factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]
        want = sum(d[name].numpy() for d in family.deltas if name in d)
        np.testing.assert_allclose(ba, want, rtol=0, atol=1e-6)


def test_adapter_of_another_base_is_refused(world: dict[str, Any]) -> None:
    family: LoraFamily = world["family"]
    stranger: LoraFamily = world["stranger"]
    spec = {
        "base": {"uri": family.base.as_uri()},
        "experts": [
            {"uri": family.adapters[0].as_uri()},
            {"uri": stranger.adapters[0].as_uri()},
        ],
        "method": {"name": "task_arithmetic"},
        "output": {"format": "lora", "lora_rank": RANK},
    }
    job = _submit(world, spec)
    assert job["status"] == "failed", json.dumps(job)
    error = job["error"]
    assert error["code"] == "adapter_base_mismatch", error
    assert OTHER_BASE in error["message"] and family.base.as_uri() in error["message"]
    assert stranger.adapters[0].as_uri() in error["message"]
    assert not (world["data"] / "artifacts" / "jobs" / job["id"] / "output").exists()
