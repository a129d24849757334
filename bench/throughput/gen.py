"""Synthetic Llama-shaped models for the throughput bench, generated once into a cache.

    .venv/bin/python bench/throughput/gen.py [--variant bf16|fp32] [--drop-others]

Variants (each a base and 4 experts of ~1.3 GB, HF layout: sharded safetensors with an
index, a LlamaForCausalLM config.json):

- bf16: hidden 2048, intermediate 5632, 10 layers, vocab 32000, 16 heads: 644.9M params,
  1.290 GB per model (the issue's 1.29 GB reference: 131M of embeddings + lm_head, 51.4M
  per layer, so 10 layers; 16-20 would be 1.9-2.3 GB);
- fp32: the same widths with 4 layers (336.9M params, 1.348 GB per model), so both variants
  read the same bytes per merge and the cache stays under 7 GB per variant.

Base: N(0, 0.02); expert t: base + N(0, 0.002) drawn in float32, then cast (a
fine-tune-sized delta). Folders live in $CRUCIBLE_BENCH_THROUGHPUT_CACHE, default
~/.cache/crucible/bench-throughput, outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from crucible.publish.writer import ShardedSafetensorsWriter

EXPERTS = 4
# HF-style shards: a 1.3 GB model is written as two shards plus the index.
INPUT_SHARD_BYTES = 700 * 10**6


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str  # safetensors code
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int

    @property
    def tag(self) -> str:
        return f"llama-{self.name}-h{self.hidden}-i{self.intermediate}-l{self.layers}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"BF16": torch.bfloat16, "F32": torch.float32}[self.dtype]


VARIANTS = {
    "bf16": Variant("bf16", "BF16", 2048, 5632, 10, 32000, 16),
    "fp32": Variant("fp32", "F32", 2048, 5632, 4, 32000, 16),
    # For development: 0.17 GB per model.
    "small": Variant("small", "BF16", 1024, 2816, 4, 16000, 8),
}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "crucible" / "bench-throughput"
    return Path(os.environ.get("CRUCIBLE_BENCH_THROUGHPUT_CACHE", default))


def llama_plan(v: Variant) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor of a LlamaForCausalLM checkpoint, in transformers' state-dict order."""
    h, i = v.hidden, v.intermediate
    plan: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (v.vocab, h), v.dtype)
    ]
    for layer in range(v.layers):
        p = f"model.layers.{layer}."
        plan += [
            (p + "self_attn.q_proj.weight", (h, h), v.dtype),
            (p + "self_attn.k_proj.weight", (h, h), v.dtype),
            (p + "self_attn.v_proj.weight", (h, h), v.dtype),
            (p + "self_attn.o_proj.weight", (h, h), v.dtype),
            (p + "mlp.gate_proj.weight", (i, h), v.dtype),
            (p + "mlp.up_proj.weight", (i, h), v.dtype),
            (p + "mlp.down_proj.weight", (h, i), v.dtype),
            (p + "input_layernorm.weight", (h,), v.dtype),
            (p + "post_attention_layernorm.weight", (h,), v.dtype),
        ]
    plan += [("model.norm.weight", (h,), v.dtype), ("lm_head.weight", (v.vocab, h), v.dtype)]
    return plan


def llama_config(v: Variant) -> dict[str, object]:
    """A config mergekit and transformers both accept (mergekit reads `architectures` and
    num_hidden_layers to know the tensor names)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": v.hidden,
        "intermediate_size": v.intermediate,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_key_value_heads": v.heads,
        "vocab_size": v.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {"BF16": "bfloat16", "F32": "float32"}[v.dtype],
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def model_dirs(v: Variant) -> tuple[Path, list[Path]]:
    folder = cache_root() / v.tag
    return folder / "base", [folder / f"expert{t}" for t in range(EXPERTS)]


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def generate(v: Variant) -> tuple[Path, list[Path]]:
    """Write base + experts tensor by tensor (memory: one tensor), unless already done."""
    base_dir, expert_dirs = model_dirs(v)
    done = base_dir.parent / "done"
    if done.exists():
        return base_dir, expert_dirs
    shutil.rmtree(base_dir.parent, ignore_errors=True)
    plan = llama_plan(v)
    dirs = [base_dir, *expert_dirs]
    writers = [ShardedSafetensorsWriter(d, plan, INPUT_SHARD_BYTES) for d in dirs]
    for index, (name, shape, _) in enumerate(plan):
        g = torch.Generator().manual_seed(index)
        # Norm weights sit near 1 as in a trained model; matrices near 0.
        base = torch.randn(shape, generator=g).mul_(0.02)
        if len(shape) == 1:
            base.add_(1.0)
        writers[0].write(name, base.to(v.torch_dtype))
        for t, writer in enumerate(writers[1:]):
            ge = torch.Generator().manual_seed((t + 1) * 100_003 + index)
            expert = torch.randn(shape, generator=ge).mul_(0.002).add_(base)
            writer.write(name, expert.to(v.torch_dtype))
            del expert
        del base
    for writer, d in zip(writers, dirs, strict=True):
        writer.close()
        (d / "config.json").write_text(json.dumps(llama_config(v), indent=2) + "\n")
    done.write_text("ok\n")
    return base_dir, expert_dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="bf16")
    ap.add_argument(
        "--drop-others",
        action="store_true",
        help="delete the other variants' folders first (keeps the cache under ~7 GB)",
    )
    args = ap.parse_args()
    v = VARIANTS[args.variant]
    if args.drop_others:
        for other in VARIANTS.values():
            if other != v:
                shutil.rmtree(cache_root() / other.tag, ignore_errors=True)
    base_dir, expert_dirs = generate(v)
    sizes = [sum(f.stat().st_size for f in weight_files(d)) for d in [base_dir, *expert_dirs]]
    print(
        f"{v.tag}: base + {EXPERTS} experts of {sizes[0] / 1e9:.3f} GB each "
        f"({sum(sizes) / 1e9:.2f} GB) in {base_dir.parent}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
