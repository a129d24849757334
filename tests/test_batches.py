"""crucible.evaluate.batches: rows -> padded batches, checked against the tokenizers' own
encodings (a BERT-style word-piece tokenizer with [CLS]/[SEP] and a pad token; a GPT-2
byte-level one with neither)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import BertTokenizerFast, GPT2TokenizerFast

from crucible.errors import CrucibleError
from crucible.evaluate.batches import iter_batches, split_budget, text_of

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue", "big", "small", "ran", "far"]


@pytest.fixture(scope="module")
def bert_tok() -> BertTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate([*specials, *WORDS])})


@pytest.fixture(scope="module")
def gpt2_tok() -> GPT2TokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2TokenizerFast(vocab=vocab, merges=[])


def test_text_of() -> None:
    assert text_of({"text": "a b", "label": 1}, "classification") == "a b"
    assert text_of({"text": "a b"}, "text") == "a b"
    assert text_of({"prompt": "Q: x", "completion": " A: y"}, "prompt_completion") == "Q: x A: y"
    with pytest.raises(CrucibleError) as err:
        text_of({"prompt": "x"}, "text", index=4)
    assert err.value.code == "bad_dataset" and err.value.detail == {"row": 5}
    with pytest.raises(CrucibleError) as err:
        text_of({"text": "x"}, "images")
    assert err.value.code == "bad_dataset"


def test_classification_matches_the_tokenizer(bert_tok: BertTokenizerFast) -> None:
    rows = [
        {"text": "the cat sat on the mat", "label": "pos"},
        {"text": "dog", "label": "neg"},
        {"text": "the big red dog ran far on the blue mat", "label": "pos"},
    ]
    labels = {"neg": 0, "pos": 1}
    batches = list(
        iter_batches(rows, bert_tok, "classification", max_length=8, batch_size=2,
                     label_to_index=labels)
    )  # fmt: skip
    assert [b.size for b in batches] == [2, 1]
    for batch, chunk in zip(batches, [rows[:2], rows[2:]], strict=True):
        assert batch.loss_mask is None
        assert batch.labels is not None
        assert batch.labels.tolist() == [labels[r["label"]] for r in chunk]
        for i, row in enumerate(chunk):
            # The tokenizer's own truncation keeps [CLS] ... [SEP] within max_length.
            expected = bert_tok(row["text"], truncation=True, max_length=8)["input_ids"]
            n = int(batch.attention_mask[i].sum())
            assert batch.input_ids[i, :n].tolist() == expected
            assert batch.attention_mask[i, :n].eq(1).all()
            assert batch.input_ids[i, n:].eq(bert_tok.pad_token_id).all()
            assert batch.attention_mask[i, n:].eq(0).all()
    assert batches[0].input_ids.shape == (2, 8)
    assert batches[1].input_ids.shape == (1, 8)  # truncated to max_length


def test_classification_without_label_map_has_no_labels(bert_tok: BertTokenizerFast) -> None:
    (batch,) = iter_batches(
        [{"text": "cat", "label": 3}], bert_tok, "classification", max_length=8, batch_size=4
    )
    assert batch.labels is None


def test_unknown_label_names_the_row(bert_tok: BertTokenizerFast) -> None:
    rows = [{"text": "cat", "label": "a"}, {"text": "dog", "label": "zzz"}]
    with pytest.raises(CrucibleError) as err:
        list(iter_batches(rows, bert_tok, "classification", max_length=8, batch_size=4,
                          label_to_index={"a": 0}))  # fmt: skip
    assert err.value.code == "bad_dataset" and err.value.detail == {"row": 2}


def test_gpt2_pads_with_eos_and_counts_every_text_token(gpt2_tok: GPT2TokenizerFast) -> None:
    assert gpt2_tok.pad_token_id is None
    rows = [{"text": "hello there"}, {"text": "hi"}]
    (batch,) = iter_batches(rows, gpt2_tok, "text", max_length=64, batch_size=8)
    assert batch.loss_mask is not None and batch.labels is None
    for i, row in enumerate(rows):
        expected = gpt2_tok(row["text"])["input_ids"]
        assert batch.input_ids[i, : len(expected)].tolist() == expected
        assert batch.input_ids[i, len(expected) :].eq(gpt2_tok.eos_token_id).all()
        assert batch.attention_mask[i].tolist() == [1] * len(expected) + [0] * (
            batch.input_ids.shape[1] - len(expected)
        )
    assert torch.equal(batch.loss_mask, batch.attention_mask)
    assert gpt2_tok.pad_token_id is None  # the caller's tokenizer is not modified


def test_prompt_completion_boundary_is_exact(gpt2_tok: GPT2TokenizerFast) -> None:
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "say hi:", "completion": " hello"}]
    (batch,) = iter_batches(rows, gpt2_tok, "prompt_completion", max_length=64, batch_size=8)
    assert batch.loss_mask is not None
    for i, row in enumerate(rows):
        p = gpt2_tok(row["prompt"])["input_ids"]
        c = gpt2_tok(row["completion"])["input_ids"]
        n = len(p) + len(c)
        assert batch.input_ids[i, :n].tolist() == p + c
        assert batch.loss_mask[i].tolist() == [0] * len(p) + [1] * len(c) + [0] * (
            batch.input_ids.shape[1] - n
        )


def test_prompt_completion_with_special_tokens(bert_tok: BertTokenizerFast) -> None:
    rows = [{"prompt": "the cat", "completion": "sat on the mat"}]
    (batch,) = iter_batches(rows, bert_tok, "prompt_completion", max_length=16, batch_size=1)
    p = bert_tok("the cat", add_special_tokens=False)["input_ids"]
    c = bert_tok("sat on the mat", add_special_tokens=False)["input_ids"]
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    assert batch.input_ids[0].tolist() == [cls, *p, *c, sep]
    assert batch.loss_mask is not None
    assert batch.loss_mask[0].tolist() == [0] * (1 + len(p)) + [1] * len(c) + [0]


@pytest.mark.parametrize(
    ("n_prompt", "n_completion", "budget", "expected"),
    [
        (3, 4, 10, (3, 4)),  # fits
        (10, 100, 50, (10, 40)),  # short prompt: the completion takes the rest
        (100, 5, 50, (45, 5)),  # short completion: the prompt's last 45 tokens
        (100, 100, 50, (25, 25)),  # both long: half each
        (0, 100, 50, (0, 50)),
    ],
)
def test_split_budget(
    n_prompt: int, n_completion: int, budget: int, expected: tuple[int, int]
) -> None:
    assert split_budget(n_prompt, n_completion, budget) == expected


def test_prompt_completion_truncation_keeps_the_prompt_end(gpt2_tok: GPT2TokenizerFast) -> None:
    prompt, completion = "abcdefghijklmnopqrstuvwxyz", "0123456789"
    (batch,) = iter_batches([{"prompt": prompt, "completion": completion}], gpt2_tok,
                            "prompt_completion", max_length=16, batch_size=1)  # fmt: skip
    p, c = gpt2_tok(prompt)["input_ids"], gpt2_tok(completion)["input_ids"]
    assert batch.input_ids.shape == (1, 16)
    # Both need more than half of the 16: each keeps half, the prompt its end.
    assert batch.input_ids[0].tolist() == p[-8:] + c[:8]
    assert batch.loss_mask is not None
    assert batch.loss_mask[0].tolist() == [0] * 8 + [1] * 8
    (batch,) = iter_batches([{"prompt": prompt, "completion": "0123"}], gpt2_tok,
                            "prompt_completion", max_length=16, batch_size=1)  # fmt: skip
    assert batch.input_ids[0].tolist() == p[-12:] + gpt2_tok("0123")["input_ids"]


def test_deterministic_and_padded_per_batch(bert_tok: BertTokenizerFast) -> None:
    rows: list[dict[str, Any]] = [{"text": " ".join(WORDS[: 1 + i % 7])} for i in range(11)]
    first = list(iter_batches(rows, bert_tok, "text", max_length=32, batch_size=4))
    second = list(iter_batches(iter(rows), bert_tok, "text", max_length=32, batch_size=4))
    assert [b.size for b in first] == [4, 4, 3]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.attention_mask, b.attention_mask)
        # Each batch is as wide as its longest row.
        assert a.input_ids.shape[1] == int(a.attention_mask.sum(dim=1).max())
    assert sum(b.tokens for b in first) == sum(len(bert_tok(r["text"])["input_ids"]) for r in rows)


def test_a_row_without_tokens_is_bad(gpt2_tok: GPT2TokenizerFast) -> None:
    with pytest.raises(CrucibleError) as err:
        list(iter_batches([{"text": "a"}, {"text": ""}], gpt2_tok, "text", max_length=8,
                          batch_size=2))  # fmt: skip
    assert err.value.code == "bad_dataset" and err.value.detail == {"row": 2}
