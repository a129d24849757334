"""LoRA adapters as experts: PEFT's scaling rules, refusals, the base check, hf:// adapters
checked before their weights are downloaded, the spec's lora fields and the pipeline.

Every adapter is a real PEFT 0.21 adapter saved by the test (tests/support/lora_models.py);
the expected ΔW is PEFT's own (`merge_and_unload` in float64, or PEFT's load of the adapter
from disk), never Crucible's code.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from crucible.errors import CrucibleError
from crucible.pipeline import _resolve, run_merge_job
from crucible.settings import Settings
from crucible.sources.adapter import module_scaling, pattern_value
from crucible.sources.resolve import ResolvedModel, resolve_model
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import ExpertRef, MergeSpec, ModelRef
from tests.support.lora_models import TINY_LLAMA, LoraFamily, make_lora_family, tiny_llama
from tests.support.olah import HUB_ENV_REMOVE, OlahServer, hub_env
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import perturbed_state_dict

# Relative Frobenius error allowed between Crucible's float64 reads and PEFT's float64 merge.
RTOL = 1e-10
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

# The Llama family's adapters, by index (see the `llama` fixture).
PLAIN, RSLORA, PATTERNS, SAVED_HEAD, RSLORA_PATTERNS = range(5)


class EventLog(QuietReporter):
    """A reporter that keeps the events, to check what the pipeline tells the job."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))


# ----------------------------------------------------------------------------- fixtures


def _save_peft(folder: Path, config: Any, base_name: str | None, seed: int = 0) -> Path:
    """A PEFT adapter of `tiny_llama(seed)` saved as is (for adapters that are refused, so
    PEFT's merge, which some of them do not support, is not needed)."""
    torch.manual_seed(seed + 99)
    model = get_peft_model(tiny_llama(seed), config)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(folder)
    return folder


def _variant(
    src: Path,
    dst: Path,
    config: Callable[[dict[str, Any]], Any] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], Any] | None = None,
) -> Path:
    """A copy of adapter `src` with its config and/or tensors edited in place by callbacks."""
    shutil.copytree(src, dst)
    if config is not None:
        doc = json.loads((dst / CONFIG).read_text())
        config(doc)
        (dst / CONFIG).write_text(json.dumps(doc))
    if tensors is not None:
        state = load_file(dst / WEIGHTS)
        tensors(state)
        save_file(state, dst / WEIGHTS, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LoraFamily:
    """Five LoRA adapters of one tiny Llama, one per scaling rule (indices above)."""
    root = tmp_path_factory.mktemp("lora-llama")
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"]),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "down_proj", "embed_tokens"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
            alpha_pattern={"layers.0.self_attn.q_proj": 3, "down_proj": 5},
        ),
        LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"]),
        LoraConfig(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["o_proj", "gate_proj"],
            rank_pattern={"gate_proj": 8},
            alpha_pattern={"layers.1.self_attn.o_proj": 7},
        ),
    ]
    family = make_lora_family(root, configs)
    # PEFT saves modules_to_save as an untrained copy of lm_head: make it a trained one, so
    # reading the base's lm_head instead would fail the test.
    saved = family.adapters[SAVED_HEAD] / WEIGHTS
    state = load_file(saved)
    generator = torch.Generator().manual_seed(17)
    head = state["base_model.model.lm_head.weight"]
    state["base_model.model.lm_head.weight"] = head + 0.1 * torch.randn(
        head.shape, generator=generator
    )
    save_file(state, saved, metadata={"format": "pt"})
    return family


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> LoraFamily:
    """GPT-2 (Conv1D weights stored in x out) adapters with fan_in_fan_out: 0 targets the
    square c_proj, so a missing transpose would not show up as a shape error; 1 trains every
    bias (bias="all"), which PEFT saves as full tensors."""
    root = tmp_path_factory.mktemp("lora-gpt2")
    configs = [
        LoraConfig(
            r=4, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        ),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"),
    ]
    family = make_lora_family(root, configs, arch="gpt2")
    # PEFT saves the biases as they were (untrained): move them, as training would.
    saved = family.adapters[1] / WEIGHTS
    state = load_file(saved)
    generator = torch.Generator().manual_seed(23)
    for key in [k for k in state if k.endswith(".bias")]:
        state[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=generator)
    save_file(state, saved, metadata={"format": "pt"})
    return family


@pytest.fixture(scope="module")
def refused(llama: LoraFamily) -> dict[str, Path]:
    """Real PEFT adapters of the Llama base that Crucible must refuse."""
    root = llama.base.parent / "refused"
    base = str(llama.base)
    return {
        "dora": _save_peft(
            root / "dora",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
            base,
        ),
        "lora_bias": _save_peft(
            root / "lora_bias",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True),
            base,
        ),
        "ia3": _save_peft(
            root / "ia3",
            IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
            base,
        ),
        "loha": _save_peft(
            root / "loha", LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]), base
        ),
    }


def _settings(*roots: Path) -> Settings:
    return Settings(data_dir=roots[0] / "data", allowed_local_dirs=list(roots))


def _base(family: LoraFamily) -> ResolvedModel:
    return resolve_model(ModelRef(uri=family.base.as_uri()), _settings(family.base.parent))


def _expert(family: LoraFamily, adapter: Path, allow_base_mismatch: bool = False) -> ResolvedModel:
    return resolve_model(
        ExpertRef(uri=adapter.as_uri()),
        _settings(family.base.parent, adapter.parent),
        _base(family),
        allow_base_mismatch,
    )


def _refusal(family: LoraFamily, adapter: Path, allow_base_mismatch: bool = False) -> CrucibleError:
    with pytest.raises(CrucibleError) as info:
        _expert(family, adapter, allow_base_mismatch)
    return info.value


def _reference(family: LoraFamily) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(family.base / "model.safetensors").items()}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _assert_reads_base_plus_delta(
    expert: ResolvedModel, reference: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]
) -> None:
    """Every tensor of the expert reads as the base's plus PEFT's ΔW; untouched ones are the
    base's bytes, with no ΔW."""
    assert set(expert.tensors) == set(reference)
    with TensorReader(expert) as reader:
        for name, w0 in reference.items():
            got = reader.read(name)
            if name in deltas:
                assert got.dtype == torch.float64, name
                assert _rel(got, w0 + deltas[name]) < RTOL, name
            else:
                assert reader.delta(name) is None, name
                assert torch.equal(got.double(), w0), name


# ----------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("index", [PLAIN, RSLORA, PATTERNS, RSLORA_PATTERNS])
def test_adapter_reads_equal_base_plus_pefts_delta(llama: LoraFamily, index: int) -> None:
    """lora_alpha/r, rsLoRA (alpha/sqrt r), rank_pattern/alpha_pattern and embedding LoRA:
    Crucible's ΔW equals PEFT's merge in float64, module by module, and nothing else moves."""
    expert = _expert(llama, llama.adapters[index])
    deltas = llama.deltas[index]
    assert expert.adapter is not None
    assert set(expert.adapter.deltas) == set(deltas)
    with TensorReader(expert) as reader:
        for name, want in deltas.items():
            assert want.norm() > 0
            got = reader.delta(name)
            assert got is not None and got.dtype == torch.float64
            assert _rel(got, want) < RTOL, name
    _assert_reads_base_plus_delta(expert, _reference(llama), deltas)


def test_per_module_rank_and_alpha_follow_the_patterns(llama: LoraFamily) -> None:
    """The scalings Crucible derived are PEFT's rule, written out by hand for each module."""
    plans = {i: _expert(llama, llama.adapters[i]).adapter for i in (PATTERNS, RSLORA_PATTERNS)}
    patterns, rs = plans[PATTERNS], plans[RSLORA_PATTERNS]
    assert patterns is not None and rs is not None
    got = {name: (d.rank, d.scaling) for name, d in patterns.deltas.items()}
    assert got == {
        "model.embed_tokens.weight": (4, 8 / 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 3 / 4),
        "model.layers.1.self_attn.q_proj.weight": (2, 8 / 2),
        "model.layers.0.mlp.down_proj.weight": (6, 5 / 6),
        "model.layers.1.mlp.down_proj.weight": (6, 5 / 6),
    }
    got = {name: (d.rank, d.scaling) for name, d in rs.deltas.items()}
    assert got == {
        "model.layers.0.self_attn.o_proj.weight": (4, 16 / 2),
        "model.layers.1.self_attn.o_proj.weight": (4, 7 / 2),
        "model.layers.0.mlp.gate_proj.weight": (8, 16 / math.sqrt(8)),
        "model.layers.1.mlp.gate_proj.weight": (8, 16 / math.sqrt(8)),
    }


@pytest.mark.parametrize(
    "module",
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.embed_tokens",
        "model.layers.1.self_attn.xq_proj",
        "model.layers.12.mlp.up_proj",
    ],
)
def test_pattern_lookup_is_pefts(module: str) -> None:
    """pattern_value picks the key PEFT's own get_pattern_key picks (first match in order,
    whole dotted suffix, keys as regular expressions), or the default when PEFT finds none."""
    patterns = {"layers.1.self_attn.q_proj": 2, "q_proj": 6, "down_proj": 3, r"layers\.1\d\..*": 9}
    key = get_pattern_key(list(patterns), module)
    expected = patterns.get(key, 4)
    assert pattern_value(patterns, module, 4) == expected
    config = {"lora_alpha": 8, "alpha_pattern": patterns, "use_rslora": False}
    assert module_scaling(config, module, 2) == patterns.get(key, 8) / 2


def test_embedding_lora_is_transposed_onto_the_saved_base_layer(llama: LoraFamily) -> None:
    """PEFT saves the embedding's base_layer next to lora_embedding_A/B (r x vocab, dim x r):
    the read is that saved tensor plus (B A)^T, i.e. vocab x dim like the base."""
    expert = _expert(llama, llama.adapters[PATTERNS])
    assert expert.adapter is not None
    name = "model.embed_tokens.weight"
    lora = expert.adapter.deltas[name]
    assert lora.embedding and lora.transposed
    assert lora.a.name.endswith("lora_embedding_A") and lora.b.name.endswith("lora_embedding_B")
    assert expert.adapter.full[name].name == "base_model.model.model.embed_tokens.base_layer.weight"
    saved = load_file(llama.adapters[PATTERNS] / WEIGHTS)
    scale = 8 / 4
    a = saved["base_model.model.model.embed_tokens.lora_embedding_A"].double()
    b = saved["base_model.model.model.embed_tokens.lora_embedding_B"].double()
    base_layer = saved["base_model.model.model.embed_tokens.base_layer.weight"].double()
    with TensorReader(expert) as reader:
        got = reader.read(name)
    assert got.shape == (TINY_LLAMA["vocab_size"], TINY_LLAMA["hidden_size"])
    assert _rel(got, base_layer + scale * (b @ a).T) < RTOL


def test_gpt2_conv1d_fan_in_fan_out(gpt2: LoraFamily) -> None:
    """GPT-2's Conv1D stores weights in x out; with fan_in_fan_out the ΔW is (B A)^T, and the
    square c_proj proves the transpose is applied, not just shape-matched."""
    expert = _expert(gpt2, gpt2.adapters[0])
    assert expert.adapter is not None
    deltas = gpt2.deltas[0]
    assert "transformer.h.0.attn.c_proj.weight" in deltas
    assert set(expert.adapter.deltas) == set(deltas)
    assert all(d.transposed and not d.embedding for d in expert.adapter.deltas.values())
    with TensorReader(expert) as reader:
        for name, want in deltas.items():
            got = reader.delta(name)
            assert got is not None
            assert _rel(got, want) < RTOL, name
    _assert_reads_base_plus_delta(expert, _reference(gpt2), deltas)


def _peft_loaded(model_class: Any, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own load of the adapter from disk onto the base, merged in float64."""
    base_model = model_class.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, adapter).double().merge_and_unload()
    return {k: v.detach().double() for k, v in merged.state_dict().items()}


def test_modules_to_save_replace_the_base_tensor(llama: LoraFamily) -> None:
    """A modules_to_save tensor (lm_head) is the adapter's full tensor: every tensor reads as
    PEFT's own load of the adapter from disk (PeftModel.from_pretrained, merged in float64)."""
    adapter = llama.adapters[SAVED_HEAD]
    expert = _expert(llama, adapter)
    assert expert.adapter is not None
    assert set(expert.adapter.full) == {"lm_head.weight"}
    want = _peft_loaded(LlamaForCausalLM, llama.base, adapter)
    reference = _reference(llama)
    assert set(want) == set(reference)
    assert not torch.equal(want["lm_head.weight"], reference["lm_head.weight"])
    with TensorReader(expert) as reader:
        assert reader.delta("lm_head.weight") is None
        for name, w in want.items():
            assert _rel(reader.read(name), w) < RTOL, name
        assert torch.equal(reader.read("lm_head.weight").double(), want["lm_head.weight"])


def test_trained_biases_replace_the_base_biases(gpt2: LoraFamily) -> None:
    """bias="all": PEFT saves every bias (a LoRA layer's as base_layer.bias); each replaces the
    base's, and the whole model reads as PEFT's load of the adapter from disk."""
    expert = _expert(gpt2, gpt2.adapters[1])
    assert expert.adapter is not None
    reference = _reference(gpt2)
    biases = {n for n in reference if n.endswith(".bias")}
    assert set(expert.adapter.full) == biases
    want = _peft_loaded(GPT2LMHeadModel, gpt2.base, gpt2.adapters[1])
    assert set(reference) <= set(want)  # PEFT's state also has the tied lm_head
    with TensorReader(expert) as reader:
        for name in reference:
            if name in biases:
                assert not torch.equal(want[name], reference[name]), name
            assert _rel(reader.read(name), want[name]) < RTOL, name


@pytest.mark.parametrize("rows", ["0:5", "7:30", "3:3", "tail"])
@pytest.mark.parametrize("which", ["llama_patterns", "llama_head", "gpt2"])
def test_block_reads_are_slices_of_the_whole_read(
    llama: LoraFamily, gpt2: LoraFamily, which: str, rows: str
) -> None:
    """read/delta with rows=(a, b) equal rows a..b of the whole tensor, for plain, embedding
    (transposed), Conv1D (transposed), full (modules_to_save) and untouched tensors."""
    family, index = {
        "llama_patterns": (llama, PATTERNS),
        "llama_head": (llama, SAVED_HEAD),
        "gpt2": (gpt2, 0),
    }[which]
    expert = _expert(family, family.adapters[index])
    assert expert.adapter is not None
    checked = 0
    with TensorReader(expert) as reader:
        for name in reader.names():
            whole = reader.read(name)
            n = whole.shape[0] if whole.dim() else 0
            a, b = (n - 3, n) if rows == "tail" else map(int, rows.split(":"))
            if n < b:
                continue
            block = reader.read(name, (a, b))
            assert block.dtype == whole.dtype and block.shape == whole[a:b].shape, name
            torch.testing.assert_close(block, whole[a:b], rtol=1e-13, atol=1e-13)
            delta = reader.delta(name)
            if delta is not None:
                part = reader.delta(name, (a, b))
                assert part is not None
                torch.testing.assert_close(part, delta[a:b], rtol=1e-13, atol=1e-13)
                checked += 1
    assert checked == len(expert.adapter.deltas)


# ----------------------------------------------------------------------------- refusals


def test_dora_is_refused_from_its_config(
    llama: LoraFamily, refused: dict[str, Path], tmp_path: Path
) -> None:
    """A real DoRA adapter is refused by its use_dora switch, before its weights are read
    (the same refusal comes with the weights file removed)."""
    err = _refusal(llama, refused["dora"])
    assert err.code == "unsupported_adapter"
    assert "DoRA" in err.message and "use_dora=True" in err.message
    assert err.detail["switch"] == "use_dora"
    no_weights = _variant(refused["dora"], tmp_path / "dora-config-only")
    (no_weights / WEIGHTS).unlink()
    assert _refusal(llama, no_weights).code == "unsupported_adapter"


def test_dora_magnitudes_are_refused_even_when_the_config_hides_them(
    llama: LoraFamily, refused: dict[str, Path], tmp_path: Path
) -> None:
    """DoRA's lora_magnitude_vector tensors are refused even under a config with use_dora off."""
    hidden = _variant(
        refused["dora"],
        tmp_path / "dora-hidden",
        config=lambda c: c.update(use_dora=False),
    )
    err = _refusal(llama, hidden)
    assert err.code == "unsupported_adapter"
    assert "lora_magnitude_vector" in err.message and "DoRA" in err.message


def test_lora_bias_is_refused(llama: LoraFamily, refused: dict[str, Path]) -> None:
    """LoRA with trainable biases changes biases too: not B·A, refused naming lora_bias."""
    err = _refusal(llama, refused["lora_bias"])
    assert err.code == "unsupported_adapter"
    assert "lora_bias" in err.message
    assert err.detail["switch"] == "lora_bias"


@pytest.mark.parametrize(("kind", "peft_type"), [("ia3", "IA3"), ("loha", "LOHA")])
def test_other_peft_types_are_refused(
    llama: LoraFamily, refused: dict[str, Path], kind: str, peft_type: str
) -> None:
    """Real IA3 and LoHa adapters are refused by their PEFT type."""
    assert json.loads((refused[kind] / CONFIG).read_text())["peft_type"] == peft_type
    err = _refusal(llama, refused[kind])
    assert err.code == "unsupported_adapter"
    assert f"PEFT type {peft_type!r} is not supported" in err.message
    assert err.detail["peft_type"] == peft_type


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(peft_type="GARBAGE"), "PEFT type 'GARBAGE' is not supported"),
        (lambda c: c.pop("peft_type"), "PEFT type None is not supported"),
        (lambda c: c.update(r=0), "r must be a positive number, got 0"),
        (lambda c: c.update(lora_alpha="8"), "lora_alpha must be a positive number"),
        (lambda c: c.update(rank_pattern=[4]), "rank_pattern must be an object"),
        (lambda c: c.update(layer_replication=[[0, 2]]), "layer_replication"),
        (lambda c: c.update(init_lora_weights="pissa_niter_4"), "convert it first"),
        (lambda c: c.update(init_lora_weights="olora"), "applies to a modified base"),
    ],
    ids=[
        "garbage-type",
        "no-type",
        "r-zero",
        "alpha-string",
        "pattern-list",
        "replication",
        "unconverted-pissa",
        "unconverted-olora",
    ],
)
def test_hand_edited_configs_are_refused(
    llama: LoraFamily, tmp_path: Path, edit: Callable[[dict[str, Any]], Any], message: str
) -> None:
    """A config that is not a plain LoRA's is refused with the reason in the message."""
    adapter = _variant(llama.adapters[PLAIN], tmp_path / "adapter", config=edit)
    err = _refusal(llama, adapter)
    assert err.code == "unsupported_adapter"
    assert message in err.message
    assert err.message.startswith(adapter.as_uri())


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object")],
)
def test_unreadable_configs_are_refused(
    llama: LoraFamily, tmp_path: Path, text: str, message: str
) -> None:
    """A config that is not JSON, or not a JSON object, is refused as unsupported."""
    adapter = _variant(llama.adapters[PLAIN], tmp_path / "adapter")
    (adapter / CONFIG).write_text(text)
    err = _refusal(llama, adapter)
    assert err.code == "unsupported_adapter"
    assert f"adapter_config.json {message}" in err.message


def test_missing_lora_b_is_corrupt(llama: LoraFamily, tmp_path: Path) -> None:
    """A module with lora_A but no lora_B is a corrupt adapter, naming the module."""
    module = "model.layers.1.self_attn.v_proj"
    adapter = _variant(
        llama.adapters[PLAIN],
        tmp_path / "adapter",
        tensors=lambda s: s.pop(f"base_model.model.{module}.lora_B.weight"),
    )
    err = _refusal(llama, adapter)
    assert err.code == "corrupt_adapter"
    assert f"module {module!r} has no lora_B tensor" in err.message
    assert err.detail["module"] == module


def test_rank_differing_from_rank_pattern_is_corrupt(llama: LoraFamily, tmp_path: Path) -> None:
    """down_proj's factors are rank 6; a rank_pattern saying 5 would make alpha/r wrong."""
    adapter = _variant(
        llama.adapters[PATTERNS],
        tmp_path / "adapter",
        config=lambda c: c["rank_pattern"].update(down_proj=5),
    )
    err = _refusal(llama, adapter)
    assert err.code == "corrupt_adapter"
    assert "has rank 6 but the config (r / rank_pattern) says 5" in err.message
    assert err.detail["module"].endswith("mlp.down_proj")


def test_pickled_adapter_weights_are_not_read(llama: LoraFamily, tmp_path: Path) -> None:
    """An adapter with only adapter_model.bin is refused: pickles are never read."""
    adapter = _variant(llama.adapters[PLAIN], tmp_path / "adapter")
    (adapter / WEIGHTS).rename(adapter / "adapter_model.bin")
    err = _refusal(llama, adapter)
    assert err.code == "no_weights"
    assert "adapter_model.bin" in err.message


def test_a_base_of_another_shape_is_refused_even_when_mismatch_is_allowed(
    llama: LoraFamily, gpt2: LoraFamily
) -> None:
    """allow_base_mismatch skips the name check only: a Llama of another width, or a GPT-2,
    cannot take the adapter's factors (adapter_base_mismatch)."""
    wider = llama.base.parent / "wider-base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "intermediate_size": 96})).save_pretrained(wider)
    settings = _settings(llama.base.parent)
    base = resolve_model(ModelRef(uri=wider.as_uri()), settings)
    adapter = llama.adapters[RSLORA]  # targets up_proj: 128 x 64 in the adapter, 96 x 64 here
    with pytest.raises(CrucibleError) as info:
        resolve_model(ExpertRef(uri=adapter.as_uri()), settings, base, True)
    assert info.value.code == "adapter_base_mismatch"
    assert "up_proj" in info.value.message and "[96, 64]" in info.value.message

    settings = _settings(llama.base.parent, gpt2.base.parent)
    other = resolve_model(ModelRef(uri=gpt2.base.as_uri()), settings)
    with pytest.raises(CrucibleError) as info:
        resolve_model(ExpertRef(uri=adapter.as_uri()), settings, other, True)
    assert info.value.code == "adapter_base_mismatch"
    assert "which the base does not have" in info.value.message


def test_an_adapter_cannot_be_the_base(llama: LoraFamily, tmp_path: Path) -> None:
    """An adapter named as the job's base is refused at resolve and through the pipeline."""
    adapter = llama.adapters[PLAIN]
    with pytest.raises(CrucibleError) as info:
        resolve_model(ModelRef(uri=adapter.as_uri()), _settings(llama.base.parent))
    assert info.value.code == "unsupported_adapter"
    assert "the base must be a full model" in info.value.message
    spec = _spec(adapter, [llama.adapters[RSLORA]], "full")
    with pytest.raises(CrucibleError) as info:
        run_merge_job(spec, tmp_path / "out", _settings(llama.base.parent, tmp_path), EventLog())
    assert info.value.code == "unsupported_adapter"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- base check


def test_adapter_of_another_base_fails_unless_allowed(llama: LoraFamily, tmp_path: Path) -> None:
    """base_model_name_or_path naming another model fails at resolve; with
    allow_base_mismatch the same adapter resolves and reads as base + PEFT's ΔW."""
    adapter = _variant(
        llama.adapters[PLAIN],
        tmp_path / "adapter",
        config=lambda c: c.update(base_model_name_or_path="org/another-model"),
    )
    err = _refusal(llama, adapter)
    assert err.code == "adapter_base_mismatch"
    assert "'org/another-model'" in err.message and "allow_base_mismatch" in err.message
    assert err.detail["adapter_base"] == "org/another-model"
    allowed = _expert(llama, adapter, allow_base_mismatch=True)
    assert allowed.adapter is not None and allowed.warning is None
    _assert_reads_base_plus_delta(allowed, _reference(llama), llama.deltas[PLAIN])


def test_hub_id_naming_the_local_base_folder_matches(llama: LoraFamily, tmp_path: Path) -> None:
    """A local base matches an adapter recording a Hub id whose name is the folder's name."""
    assert llama.base.name == "base"
    adapter = _variant(
        llama.adapters[PLAIN],
        tmp_path / "adapter",
        config=lambda c: c.update(base_model_name_or_path="some-org/base"),
    )
    expert = _expert(llama, adapter)
    assert expert.adapter is not None and expert.warning is None


def test_unrecorded_base_resolves_with_a_warning_event(llama: LoraFamily, tmp_path: Path) -> None:
    """An adapter without base_model_name_or_path resolves; the pipeline reports an
    adapter_base_unchecked event naming it (and none for an adapter that records its base)."""
    adapter = _variant(
        llama.adapters[PLAIN],
        tmp_path / "adapter",
        config=lambda c: c.update(base_model_name_or_path=None),
    )
    expert = _expert(llama, adapter)
    assert expert.warning is not None and "base_model_name_or_path" in expert.warning
    spec = _spec(llama.base, [adapter, llama.adapters[RSLORA]], "full")
    log = EventLog()
    _resolve(spec, _settings(llama.base.parent, tmp_path), log)
    unchecked = [e for e in log.events if e[0] == "adapter_base_unchecked"]
    assert unchecked == [("adapter_base_unchecked", expert.warning, {"uri": adapter.as_uri()})]


# ----------------------------------------------------------------------------- hf://


@pytest.fixture(scope="module")
def hub(llama: LoraFamily, refused: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """olah serving the Llama base and three adapter repos of it."""
    root = llama.base.parent / "hub"

    def named(src: Path, name: str, base: str) -> Path:
        return _variant(src, root / name, config=lambda c: c.update(base_model_name_or_path=base))

    with OlahServer(root / "olah") as server:
        commits = {
            "base": server.add_repo("org/llama-base", llama.base),
            "good": server.add_repo(
                "org/good-adapter", named(llama.adapters[PLAIN], "good", "org/llama-base")
            ),
            "wrong": server.add_repo(
                "org/wrong-adapter", named(llama.adapters[PLAIN], "wrong", "org/another-model")
            ),
            "dora": server.add_repo(
                "org/dora-adapter", named(refused["dora"], "dora", "org/llama-base")
            ),
        }
        yield {"server": server, "commits": commits, "root": root}


@pytest.fixture
def hf_home(hub: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Hugging Face cache per test, and the process pointed at olah."""
    home = tmp_path / "hf-home"
    for key in HUB_ENV_REMOVE:
        monkeypatch.delenv(key, raising=False)
    for key, value in hub_env(hub["server"].endpoint, home).items():
        monkeypatch.setenv(key, value)
    return home


def _hub_expert(repo: str, allow: bool = False, revision: str = "main") -> ResolvedModel:
    settings = Settings()
    base = resolve_model(ModelRef(uri="hf://org/llama-base"), settings)
    return resolve_model(ExpertRef(uri=f"hf://{repo}", revision=revision), settings, base, allow)


def _cached_files(hf_home: Path, repo: str) -> dict[str, list[str]]:
    """The repo's cache: file names under snapshots/ and the blobs' count."""
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    return {
        "snapshots": sorted(p.name for p in (folder / "snapshots").rglob("*") if not p.is_dir()),
        "blobs": sorted(p.name for p in (folder / "blobs").iterdir()),
    }


def test_hub_adapter_resolves_at_its_pinned_commit(
    llama: LoraFamily, hub: dict[str, Any], hf_home: Path
) -> None:
    """An hf:// adapter of the hf:// base resolves at its commit (main or the sha itself)
    from the HF cache, and reads as base + PEFT's ΔW."""
    sha = hub["commits"]["good"]
    expert = _hub_expert("org/good-adapter")
    assert expert.commit == sha and expert.revision == "main"
    assert expert.root == hf_home / "hub" / "models--org--good-adapter" / "snapshots" / sha
    assert expert.weight_files == [expert.root / WEIGHTS]
    assert expert.warning is None
    _assert_reads_base_plus_delta(expert, _reference(llama), llama.deltas[PLAIN])
    assert _hub_expert("org/good-adapter", revision=sha).commit == sha


def test_hub_adapter_of_another_base_is_refused_before_its_weights_download(
    hub: dict[str, Any], hf_home: Path
) -> None:
    """The config alone is fetched and checked: adapter_model.safetensors never reaches the
    cache (which does hold the config, so the walk looks in the right place)."""
    with pytest.raises(CrucibleError) as info:
        _hub_expert("org/wrong-adapter")
    assert info.value.code == "adapter_base_mismatch"
    assert "'org/another-model'" in info.value.message
    assert "hf://org/llama-base" in info.value.message
    assert not [p for p in hf_home.rglob("*") if p.name == WEIGHTS]
    cached = _cached_files(hf_home, "org/wrong-adapter")
    assert cached["snapshots"] == [CONFIG] and len(cached["blobs"]) == 1
    # Allowed, the same repo resolves and its weights are fetched.
    expert = _hub_expert("org/wrong-adapter", allow=True)
    assert expert.commit == hub["commits"]["wrong"] and expert.adapter is not None
    assert (expert.root / WEIGHTS).is_file()


def test_hub_dora_adapter_is_refused_before_its_weights_download(
    hub: dict[str, Any], hf_home: Path
) -> None:
    """A DoRA repo is refused from its config alone: its weights never reach the cache."""
    with pytest.raises(CrucibleError) as info:
        _hub_expert("org/dora-adapter")
    assert info.value.code == "unsupported_adapter" and "DoRA" in info.value.message
    assert _cached_files(hf_home, "org/dora-adapter")["snapshots"] == [CONFIG]
    assert not [p for p in hf_home.rglob("*") if p.name == WEIGHTS]


# ----------------------------------------------------------------------------- spec


def _spec_doc(
    experts: list[dict[str, Any]], method: dict[str, Any], output: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    return {
        "base": {"uri": "file:///models/base"},
        "experts": experts,
        "method": method,
        "output": output,
        **kw,
    }


TWO = [{"uri": "file:///models/a", "weight": 0.7}, {"uri": "file:///models/b", "weight": 0.7}]


def test_lora_output_with_tuning_is_refused() -> None:
    """Tuning with output.format lora is a validation error (and fine with format full)."""
    tuning = {"dataset": "ds_0123456789ab", "trials": 2, "init_trials": 1}
    doc = _spec_doc(TWO, {"name": "task_arithmetic"}, {"format": "lora"}, tuning=tuning)
    with pytest.raises(ValidationError, match=r"tuning with output\.format lora"):
        MergeSpec.model_validate(doc)
    doc["output"] = {"format": "full"}
    assert MergeSpec.model_validate(doc).tuning is not None


def test_linear_unnormalized_weights_must_sum_to_one_for_lora_output() -> None:
    """(sum w - 1) W0 is not a LoRA: refused for format lora, fine for full or sum w = 1."""
    method = {"name": "linear", "params": {"normalize": False}}
    with pytest.raises(ValidationError, match=r"summing to 1\.4 gives"):
        MergeSpec.model_validate(_spec_doc(TWO, method, {"format": "lora"}))
    MergeSpec.model_validate(_spec_doc(TWO, method, {"format": "full"}))
    MergeSpec.model_validate(_spec_doc(TWO, {"name": "linear"}, {"format": "lora"}))
    halves = [{**e, "weight": w} for e, w in zip(TWO, (0.25, 0.75), strict=True)]
    MergeSpec.model_validate(_spec_doc(halves, method, {"format": "lora"}))


@pytest.mark.parametrize("rank", [0, -1, 65537, "big", 2.5])
def test_bad_lora_ranks_are_refused(rank: Any) -> None:
    """lora_rank must be an integer in 1..65536 or auto."""
    with pytest.raises(ValidationError, match="lora_rank"):
        MergeSpec.model_validate(
            _spec_doc(TWO, {"name": "task_arithmetic"}, {"format": "lora", "lora_rank": rank})
        )


def test_lora_rank_auto_and_numbers_are_accepted() -> None:
    """auto (the default) and integer ranks are accepted; lora_energy is in (0, 1];
    allow_base_mismatch defaults to false."""
    doc = _spec_doc(TWO, {"name": "task_arithmetic"}, {"format": "lora"})
    spec = MergeSpec.model_validate(doc)
    assert spec.output.lora_rank == "auto" and spec.output.lora_energy == 0.999
    assert not spec.experts[0].allow_base_mismatch
    for rank in ("auto", 1, 16, 65536):
        doc["output"] = {"format": "lora", "lora_rank": rank, "lora_energy": 0.9}
        assert MergeSpec.model_validate(doc).output.lora_rank == rank
    for energy in (0, 1.5):
        doc["output"] = {"format": "lora", "lora_energy": energy}
        with pytest.raises(ValidationError, match="lora_energy"):
            MergeSpec.model_validate(doc)
    doc["output"] = {"format": "lora"}
    doc["experts"] = [{**TWO[0], "weight": 1.0, "allow_base_mismatch": True}]
    assert MergeSpec.model_validate(doc).experts[0].allow_base_mismatch


# ----------------------------------------------------------------------------- pipeline


def _spec(base: Path, experts: list[Path], fmt: str) -> MergeSpec:
    return MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri(), "name": f"e{i}"} for i, e in enumerate(experts)],
            "method": {"name": "task_arithmetic"},
            "output": {"dtype": "float32", "format": fmt},
        }
    )


@pytest.fixture(scope="module")
def full_finetune(llama: LoraFamily) -> Path:
    """A full fine-tune of the Llama base: every tensor moved a little."""
    folder = llama.base.parent / "full-ft"
    model = LlamaForCausalLM.from_pretrained(llama.base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    model.load_state_dict(perturbed_state_dict(model.state_dict(), generator))
    model.save_pretrained(folder)
    return folder


def test_full_and_adapter_experts_merge_to_a_full_model(
    llama: LoraFamily, full_finetune: Path, tmp_path: Path
) -> None:
    """Task arithmetic of a full fine-tune and an adapter: W0 + (W_ft - W0) + ΔW_peft."""
    spec = _spec(llama.base, [full_finetune, llama.adapters[PLAIN]], "full")
    settings = _settings(llama.base.parent, tmp_path)
    outcome = run_merge_job(spec, tmp_path / "out", settings, EventLog())
    out = load_file(outcome.output_dir / "model.safetensors")
    w0 = _reference(llama)
    ft = {k: v.double() for k, v in load_file(full_finetune / "model.safetensors").items()}
    deltas = llama.deltas[PLAIN]
    assert set(out) == set(w0)
    for name, base in w0.items():
        want = ft[name] + deltas.get(name, torch.zeros_like(base))
        torch.testing.assert_close(out[name].double(), want, rtol=1e-5, atol=1e-6)
    adapter_input = outcome.inputs[2]
    assert adapter_input["uri"] == llama.adapters[PLAIN].as_uri()
    assert adapter_input["adapter"] == {
        "type": "lora",
        "ranks": [4],
        "modules": 4,
        "modules_to_save": 0,
        "use_rslora": False,
    }
    assert "adapter" not in outcome.inputs[1]


def test_lora_output_refuses_a_full_model_expert(
    llama: LoraFamily, full_finetune: Path, tmp_path: Path
) -> None:
    """format lora with a full fine-tune among the experts fails at resolve, naming it."""
    spec = _spec(llama.base, [full_finetune, llama.adapters[PLAIN]], "lora")
    with pytest.raises(CrucibleError) as info:
        run_merge_job(spec, tmp_path / "out", _settings(llama.base.parent, tmp_path), EventLog())
    assert info.value.code == "lora_output_needs_adapters"
    assert info.value.detail == {"experts": ["e0"]}
    assert "e0 is a full model" in info.value.message
    assert not (tmp_path / "out").exists()


def test_untied_lm_head_on_a_tied_base_is_refused(gpt2: LoraFamily, tmp_path: Path) -> None:
    """GPT-2's files hold no lm_head.weight (tied to wte): an adapter saving lm_head as a
    modules_to_save tensor is refused as unsupported, naming the tie, not as another base."""
    adapter = _variant(
        gpt2.adapters[0],
        tmp_path / "adapter",
        config=lambda c: c.update(modules_to_save=["lm_head"]),
        tensors=lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(256, 64)}),
    )
    err = _refusal(gpt2, adapter)
    assert err.code == "unsupported_adapter"
    assert "tied" in err.message and "lm_head.weight" in err.message
