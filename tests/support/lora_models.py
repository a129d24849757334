"""Real PEFT LoRA adapters made by the tests (no downloads), on tiny random models.

`make_lora_family` saves a tiny Llama base and one adapter per LoraConfig, with random
(non-zero) B so that every ΔW is non-trivial, and returns each adapter's exact ΔW per base
tensor in float64, computed independently of Crucible: PEFT's own `merge_and_unload` on a
float64 copy of the model, minus the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.support.tiny_models import tiny_word_tokenizer

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
    "tie_word_embeddings": False,
}
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 64}


@dataclass
class LoraFamily:
    base: Path
    adapters: list[Path]
    # Per adapter: base tensor name -> ΔW (float64) for every tensor the adapter changes.
    deltas: list[dict[str, torch.Tensor]]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY_GPT2, bos_token_id=0, eos_token_id=0)).eval()


def make_lora_family(
    root: Path,
    configs: list[object],
    arch: str = "llama",
    seed: int = 0,
    base_name: str | None = None,
) -> LoraFamily:
    """Save root/base (with a tokenizer) and root/adapter_<i> for each peft.LoraConfig.

    `base_name`: what the adapters record as base_model_name_or_path (default: the base
    folder's path, as PEFT writes it for a model loaded from a folder).
    """
    from peft import get_peft_model

    root = Path(root)
    make = tiny_llama if arch == "llama" else tiny_gpt2
    base_dir = root / "base"
    make(seed).save_pretrained(base_dir)
    tiny_word_tokenizer().save_pretrained(base_dir)
    reference = {k: v.detach().double() for k, v in make(seed).state_dict().items()}
    adapters: list[Path] = []
    deltas: list[dict[str, torch.Tensor]] = []
    for i, config in enumerate(configs):
        config.init_lora_weights = False  # type: ignore[attr-defined]  # random B: ΔW != 0
        model = make(seed)  # reseeds torch: seed the adapter's own draws after it
        torch.manual_seed(seed * 1000 + i + 1)
        model = get_peft_model(model, config)
        model.peft_config["default"].base_model_name_or_path = base_name or str(base_dir)
        out = root / f"adapter_{i}"
        model.save_pretrained(out)
        # Independent ΔW: PEFT merges its own adapter into a float64 copy.
        merged = model.double().merge_and_unload().state_dict()
        deltas.append(
            {
                k: merged[k].double() - reference[k]
                for k in reference
                if not torch.equal(merged[k].double(), reference[k])
            }
        )
        adapters.append(out)
    return LoraFamily(base=base_dir, adapters=adapters, deltas=deltas)
