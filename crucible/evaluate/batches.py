"""Dataset rows -> padded token batches for a transformers model (statistics and evaluation).

- Rows are `{text, label}` (classification), `{text}` (text) or `{prompt, completion}`
  (prompt_completion), as the datasets API stores them.
- Every sequence is the tokenizer's own special-token frame around the content tokens
  (BERT: [CLS] ... [SEP]; GPT-2: nothing; Llama: <s> ...), so it is what
  `tokenizer(text)` would give, and it never exceeds `max_length`.
- prompt_completion: prompt and completion are tokenised separately and concatenated, so
  the boundary between them is exact (joint tokenisation can merge across it). When the
  pair is too long the completion keeps its first tokens (at least half the room when the
  prompt is long too) and the prompt keeps its last ones, those nearest the completion.
- Padding is on the right with the tokenizer's pad token, or its end-of-sequence token when
  it has none (GPT-2); `attention_mask` is 0 there. Right padding leaves the real tokens'
  positions at 0..len-1 for models that number positions themselves.
- `loss_mask` (language modelling) marks the tokens that count as prediction targets: every
  real token for `text`, only completion tokens for `prompt_completion`. The model's
  prediction for token i comes from position i - 1; the evaluator does that shift.

Deterministic: rows are batched in the order given, nothing is shuffled. Torch is imported
inside functions: this module is worker-side, but importing it must stay cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crucible.errors import CrucibleError

if TYPE_CHECKING:
    import torch

TEXT_SCHEMAS: frozenset[str] = frozenset({"classification", "text"})
LM_SCHEMAS: frozenset[str] = frozenset({"text", "prompt_completion"})
SCHEMAS: frozenset[str] = TEXT_SCHEMAS | LM_SCHEMAS
# Any short text: tokenised once per tokenizer to learn its special-token frame.
_PROBE = "a"


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64: 1 real token, 0 padding
    labels: torch.Tensor | None = None  # (batch,) int64 class indices (classification)
    loss_mask: torch.Tensor | None = None  # (batch, seq) int64: 1 where a token is a target

    @property
    def size(self) -> int:
        """Examples in the batch."""
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=move(self.labels),
            loss_mask=move(self.loss_mask),
        )


def _bad_row(index: int, reason: str) -> CrucibleError:
    return CrucibleError("bad_dataset", f"row {index + 1}: {reason}", {"row": index + 1})


def _check_schema(schema: str) -> None:
    if schema not in SCHEMAS:
        raise CrucibleError(
            "bad_dataset",
            f"dataset schema {schema!r} cannot be tokenised; expected one of {sorted(SCHEMAS)}",
            {"schema": schema},
        )


def _field(row: Mapping[str, Any], key: str, index: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _bad_row(index, f"{key!r} must be a string, got {type(value).__name__}")
    return value


def text_of(row: Mapping[str, Any], schema: str, index: int = 0) -> str:
    """The text a model reads for this row: `text`, or prompt + completion. `index` (0-based)
    only names the row in errors."""
    _check_schema(schema)
    if schema == "prompt_completion":
        return _field(row, "prompt", index) + _field(row, "completion", index)
    return _field(row, "text", index)


@dataclass(frozen=True)
class _Frame:
    prefix: list[int]
    suffix: list[int]
    pad_id: int


def _frame(tokenizer: Any) -> _Frame:
    """The special tokens the tokenizer puts before and after a single sequence, and the id
    padding uses."""
    enc = tokenizer(_PROBE, add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    content = [i for i, s in enumerate(special) if not s]
    if content:
        prefix, suffix = ids[: content[0]], ids[content[-1] + 1 :]
    else:
        prefix, suffix = ids, []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise CrucibleError(
            "no_tokenizer",
            "the tokenizer has neither a padding nor an end-of-sequence token to pad batches",
            None,
        )
    return _Frame(prefix=prefix, suffix=suffix, pad_id=int(pad_id))


def _content_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def split_budget(n_prompt: int, n_completion: int, budget: int) -> tuple[int, int]:
    """(prompt tokens kept, completion tokens kept) within `budget` content tokens."""
    if n_prompt + n_completion <= budget:
        return n_prompt, n_completion
    keep_c = min(n_completion, max(budget - n_prompt, budget // 2))
    return min(n_prompt, budget - keep_c), keep_c


def iter_batches(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    schema: str,
    *,
    max_length: int,
    batch_size: int,
    label_to_index: Mapping[Any, int] | None = None,
) -> Iterator[Batch]:
    """Padded batches of `batch_size` rows (the last may be smaller), in row order.

    `labels` is set for classification rows when `label_to_index` is given; `loss_mask` for
    text and prompt_completion. A row with no tokens or a label outside `label_to_index`
    is a CrucibleError `bad_dataset` naming the row (1-based)."""
    _check_schema(schema)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    frame = _frame(tokenizer)
    budget = max_length - len(frame.prefix) - len(frame.suffix)
    if budget < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for content next to the tokenizer's "
            f"{len(frame.prefix) + len(frame.suffix)} special tokens"
        )
    chunk: list[tuple[int, Mapping[str, Any]]] = []
    for index, row in enumerate(rows):
        chunk.append((index, row))
        if len(chunk) == batch_size:
            yield _batch(chunk, tokenizer, schema, frame, budget, label_to_index)
            chunk = []
    if chunk:
        yield _batch(chunk, tokenizer, schema, frame, budget, label_to_index)


def _batch(
    chunk: list[tuple[int, Mapping[str, Any]]],
    tokenizer: Any,
    schema: str,
    frame: _Frame,
    budget: int,
    label_to_index: Mapping[Any, int] | None,
) -> Batch:
    import torch

    sequences: list[list[int]] = []
    targets: list[list[int]] = []  # per sequence: 1 where the token is a loss target
    if schema == "prompt_completion":
        prompts = _content_ids(tokenizer, [_field(r, "prompt", i) for i, r in chunk])
        completions = _content_ids(tokenizer, [_field(r, "completion", i) for i, r in chunk])
        for p, c in zip(prompts, completions, strict=True):
            keep_p, keep_c = split_budget(len(p), len(c), budget)
            kept_p, kept_c = p[len(p) - keep_p :], c[:keep_c]
            sequences.append(frame.prefix + kept_p + kept_c + frame.suffix)
            targets.append(
                [0] * (len(frame.prefix) + keep_p) + [1] * keep_c + [0] * len(frame.suffix)
            )
    else:
        for ids in _content_ids(tokenizer, [_field(r, "text", i) for i, r in chunk]):
            seq = frame.prefix + ids[:budget] + frame.suffix
            sequences.append(seq)
            targets.append([1] * len(seq))
    for (index, _), seq in zip(chunk, sequences, strict=True):
        if not seq:
            raise _bad_row(index, "the text has no tokens")

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), frame.pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, target) in enumerate(zip(sequences, targets, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        loss_mask[i, : len(seq)] = torch.tensor(target, dtype=torch.long)

    labels = None
    if schema == "classification" and label_to_index is not None:
        indices = []
        for index, row in chunk:
            label = row.get("label")
            if label not in label_to_index:
                raise _bad_row(
                    index, f"label {label!r} is not one of {sorted(map(str, label_to_index))}"
                )
            indices.append(label_to_index[label])
        labels = torch.tensor(indices, dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        loss_mask=loss_mask if schema in LM_SCHEMAS else None,
    )
