"""Tiny random models made by the tests themselves (no downloads): a base and fine-tunes.

An "expert" is the base plus a distinct small perturbation of every tensor, scaled to that
tensor's own magnitude, the way a short fine-tune moves every weight a little.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

TINY_GPT2 = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "vocab_size": 256,
    "n_positions": 64,
    "bos_token_id": 0,  # inside the tiny vocabulary (the GPT-2 default 50256 is not)
    "eos_token_id": 0,
}
# Relative size of an expert's delta: large enough to change outputs, small enough that the
# expert still "is" the base model fine-tuned.
DELTA_SCALE = 0.05


def tiny_gpt2_config(**overrides: object) -> GPT2Config:
    return GPT2Config(**{**TINY_GPT2, **overrides})


def perturbed_state_dict(
    state: dict[str, torch.Tensor], generator: torch.Generator, scale: float = DELTA_SCALE
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        t = tensor.float()
        rms = float(t.pow(2).mean().sqrt()) if t.numel() else 0.0
        noise = torch.randn(t.shape, generator=generator)
        out[name] = (t + scale * max(rms, 1e-2) * noise).to(tensor.dtype)
    return out


def make_gpt2_family(
    root: Path,
    n_experts: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
) -> tuple[Path, list[Path]]:
    """Save a tiny random GPT-2 in root/base and `n_experts` fine-tunes in root/expert_<i>.

    All are safetensors with the same config (`max_shard_size` makes transformers shard
    them, with a model.safetensors.index.json). Returns (base_dir, [expert_dirs]).
    """
    root = Path(root)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config()).to(dtype).eval()
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    base_dir = root / "base"
    model.save_pretrained(base_dir, **save_kwargs)

    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts: list[Path] = []
    for i in range(n_experts):
        generator = torch.Generator().manual_seed(seed * 1000 + i + 1)
        model.load_state_dict(perturbed_state_dict(base_state, generator))
        expert_dir = root / f"expert_{i}"
        model.save_pretrained(expert_dir, **save_kwargs)
        experts.append(expert_dir)
    return base_dir, experts
