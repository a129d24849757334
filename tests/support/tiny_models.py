"""Tiny random models made by the tests themselves (no downloads): a base and fine-tunes.

An "expert" is the base plus a distinct small perturbation of every tensor, scaled to that
tensor's own magnitude, the way a short fine-tune moves every weight a little.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

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


# A tiny word-level vocabulary: enough for texts the tests generate, saved with the models
# so the statistics and evaluation stages find a tokenizer (no downloads).
TINY_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "red",
    "blue",
    "big",
    "small",
    "fast",
    "slow",
    "happy",
    "sad",
    "good",
    "bad",
    "film",
    "book",
    "song",
    "game",
    "very",
    "not",
    "quite",
    "rather",
    "movie",
    "story",
    "tune",
    "play",
]


def tiny_word_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style ([CLS] text [SEP]) word-level tokenizer over TINY_WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate([*specials, *TINY_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def tiny_texts(n: int, seed: int) -> list[str]:
    """`n` short sentences of TINY_WORDS, 3 to 9 words each (so batches need padding)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(TINY_WORDS, k=rng.randint(3, 9))) for _ in range(n)]


def make_bert_classifier_family(
    root: Path, label_sets: list[list[str]], seed: int = 0
) -> tuple[Path, list[Path]]:
    """A tiny BERT base saved from BertModel (names `encoder...`, with a tokenizer) and one
    expert per label set saved from BertForSequenceClassification (names `bert.encoder...`
    plus a `classifier` head of its own size): the base plus a perturbation of every tensor,
    the layout of real fine-tuned classifiers."""
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = tiny_word_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base = BertModel(config).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    experts: list[Path] = []
    for i, labels in enumerate(label_sets):
        generator = torch.Generator().manual_seed(seed * 1000 + i + 1)
        fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        cfg = BertConfig(
            **fields,
            id2label=dict(enumerate(labels)),
            label2id={label: j for j, label in enumerate(labels)},
        )
        model = BertForSequenceClassification(cfg).eval()
        model.bert.load_state_dict(perturbed_state_dict(base.state_dict(), generator, 0.2))
        expert_dir = root / f"expert_{i}"
        model.save_pretrained(expert_dir)
        tokenizer.save_pretrained(expert_dir)
        experts.append(expert_dir)
    return base_dir, experts
