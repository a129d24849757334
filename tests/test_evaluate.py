"""Evaluators against independent computations: models loaded from scratch with
`from_pretrained` and run one example at a time (no padding), losses in float64.

Tiny models made here: a BERT base saved from `AutoModel` (names `encoder...`) with experts
saved from `BertForSequenceClassification` (names `bert.encoder...`, a head of their own),
and a GPT-2 with a word-level tokenizer built offline.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from crucible.datasets.storage import DatasetHandle
from crucible.errors import CrucibleError
from crucible.evaluate import build_evaluator
from crucible.evaluate.classification import ClassificationEvaluator, ClassificationTask
from crucible.evaluate.language_model import LanguageModelEvaluator, LanguageModelTask
from crucible.evaluate.swap import WeightSwapper
from crucible.sources.resolve import open_artifact_folder
from crucible.spec import SplitSpec, TuningSpec
from tests.support.tiny_models import perturbed_state_dict, tiny_gpt2_config

WORDS = [f"w{i}" for i in range(40)]
MAX_LENGTH = 16
BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    # Large random weights: predictions then vary with the input (at the default 0.02 a
    # random tiny BERT gives every sentence the same class, and accuracy would test little).
    "initializer_range": 0.5,
}
NAMES_A = {0: "neg", 1: "neu", 2: "pos"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # Tiny matrices: on a shared 2-core machine a second thread only waits for the first.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # Some longer than MAX_LENGTH: truncation is part of what must agree.
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 20))) for _ in range(n)]


@dataclass
class BertFamily:
    base: Path
    base_no_pooler: Path
    expert_a: Path  # 3 string labels
    expert_b: Path  # 2 integer labels
    texts: list[str]


def _independent_logits(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            rows.append(model(**enc).logits[0].double())
    return torch.stack(rows)


def _classifier(expert_dir: Path, backbone: dict[str, torch.Tensor] | None = None) -> Any:
    """The expert as saved, optionally with another backbone (base-file names) loaded."""
    model = BertForSequenceClassification.from_pretrained(expert_dir).eval()
    if backbone is not None:
        missing, unexpected = model.bert.load_state_dict(backbone, strict=False)
        assert not unexpected
        assert set(missing) <= {"pooler.dense.weight", "pooler.dense.bias"}
    return model


def _accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return sum(int(p) == y for p, y in zip(logits.argmax(-1), labels, strict=True)) / len(labels)


def _mean_ce(logits: torch.Tensor, labels: list[int]) -> float:
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(float(logp[i, y]) for i, y in enumerate(labels)) / len(labels)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> BertFamily:
    root = tmp_path_factory.mktemp("bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), **BERT)
    base = BertModel(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    no_pooler = BertModel(config, add_pooling_layer=False)
    no_pooler.load_state_dict(base.state_dict(), strict=False)
    no_pooler.save_pretrained(root / "base_no_pooler")
    tokenizer.save_pretrained(root / "base_no_pooler")

    experts = []
    for i, labels in enumerate([NAMES_A, {0: "LABEL_0", 1: "LABEL_1"}]):
        cfg = BertConfig(
            vocab_size=len(vocab),
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            **BERT,
        )
        expert = BertForSequenceClassification(cfg)
        # A large move, so that the base's backbone under this head predicts differently.
        state = perturbed_state_dict(base.state_dict(), torch.Generator().manual_seed(i), 0.3)
        expert.bert.load_state_dict(state)
        expert.save_pretrained(root / f"expert_{i}")
        experts.append(root / f"expert_{i}")
    return BertFamily(
        base=root / "base",
        base_no_pooler=root / "base_no_pooler",
        expert_a=experts[0],
        expert_b=experts[1],
        texts=sentences(36, seed=1),
    )


def _rows_labelled_by(expert_dir: Path, texts: list[str], tokenizer: Any) -> list[dict]:
    """Rows whose labels are the expert's own predictions (so the expert scores 1.0)."""
    model = _classifier(expert_dir)
    preds = _independent_logits(model, tokenizer, texts).argmax(-1).tolist()
    names = model.config.id2label
    string_labels = not names[0].startswith("LABEL_")
    return [
        {"text": t, "label": names[p] if string_labels else p}
        for t, p in zip(texts, preds, strict=True)
    ]


def _index(label: Any) -> int:
    return {v: k for k, v in NAMES_A.items()}.get(label, label)


def _base_backbone(bert: BertFamily) -> dict[str, torch.Tensor]:
    return load_file(bert.base / "model.safetensors")


def _tasks(bert: BertFamily, tokenizer: Any) -> list[ClassificationTask]:
    tasks = []
    for name, expert in (("a", bert.expert_a), ("b", bert.expert_b)):
        rows = _rows_labelled_by(expert, bert.texts, tokenizer)
        tasks.append(
            ClassificationTask(
                name=name,
                expert=open_artifact_folder(expert),
                validation=rows[:24],
                test=rows[24:],
            )
        )
    return tasks


@pytest.fixture(scope="module")
def bert_tokenizer(bert: BertFamily) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert.base)


def test_accuracy_matches_independent_models(bert: BertFamily, bert_tokenizer: Any) -> None:
    tasks = _tasks(bert, bert_tokenizer)
    evaluator = ClassificationEvaluator(
        open_artifact_folder(bert.base), tasks, max_length=MAX_LENGTH, batch_size=5
    )
    assert evaluator.swapper.prefix == ""  # AutoModel-saved base, AutoModel backbone
    for split in ("validation", "test"):
        result = evaluator.evaluate(split)
        expected = {}
        for task in tasks:
            rows = list(getattr(task, split))
            model = _classifier(task.expert.root, _base_backbone(bert))
            logits = _independent_logits(model, bert_tokenizer, [r["text"] for r in rows])
            expected[task.name] = _accuracy(logits, [_index(r["label"]) for r in rows])
        assert result.per_task == pytest.approx(expected, abs=1e-12)
        assert result.value == pytest.approx(sum(expected.values()) / 2, abs=1e-12)
        assert result.objective == result.value
        assert result.metric == "accuracy"
        assert result.examples == {"validation": 48, "test": 24}[split]
        # The base's backbone is not the experts': the scores say something.
        assert min(expected.values()) < 1.0
        # Each expert's own full model predicted the labels: exactly 1.0, and the merged
        # backbone is back in place afterwards.
        assert evaluator.expert_scores(split) == {"a": 1.0, "b": 1.0}
        assert evaluator.evaluate(split).per_task == result.per_task


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_swap_in_place_equals_loading_from_scratch(
    bert: BertFamily, bert_tokenizer: Any, metric: str
) -> None:
    tasks = _tasks(bert, bert_tokenizer)
    evaluator = ClassificationEvaluator(
        open_artifact_folder(bert.base), tasks, metric=metric, max_length=MAX_LENGTH
    )
    swapper = evaluator.swapper
    pointers = {n: swapper.target(n).data_ptr() for n in swapper.names}
    before = evaluator.evaluate("validation")

    # A "merge": the mean of the base and expert a's backbones, under base-file names.
    base = _base_backbone(bert)
    expert = {
        k.removeprefix("bert."): v
        for k, v in load_file(bert.expert_a / "model.safetensors").items()
    }
    merged = {k: 0.5 * (v + expert[k]) for k, v in base.items()}
    assert swapper.swap(merged) == len(base)
    assert {n: swapper.target(n).data_ptr() for n in swapper.names} == pointers
    result = evaluator.evaluate("validation")

    for task in tasks:
        rows = list(task.validation)
        logits = _independent_logits(
            _classifier(task.expert.root, merged), bert_tokenizer, [r["text"] for r in rows]
        )
        labels = [_index(r["label"]) for r in rows]
        if metric == "accuracy":
            assert result.per_task[task.name] == _accuracy(logits, labels)
        else:
            assert result.per_task[task.name] == pytest.approx(_mean_ce(logits, labels), rel=1e-5)
    assert result.per_task != before.per_task
    if metric == "loss":
        assert result.objective == -result.value

    # load_from reads an expert saved with the bert. prefix into the unprefixed backbone.
    swapper.load_from(open_artifact_folder(bert.base))
    assert evaluator.evaluate("validation").per_task == pytest.approx(before.per_task, rel=1e-9)
    assert {n: swapper.target(n).data_ptr() for n in swapper.names} == pointers


def test_swap_errors_are_clear(bert: BertFamily) -> None:
    model = BertModel.from_pretrained(bert.base)
    swapper = WeightSwapper(model, list(open_artifact_folder(bert.base).tensors))
    name = "encoder.layer.0.attention.self.query.weight"
    with pytest.raises(CrucibleError) as err:
        swapper.swap({name: torch.zeros(3, 3)})
    assert err.value.code == "incompatible_models"
    assert name in err.value.message and "(3, 3)" in err.value.message
    with pytest.raises(CrucibleError) as err:
        swapper.swap({"encoder.layer.9.nothing.weight": torch.zeros(1)})
    assert err.value.code == "incompatible_models"
    # A dtype cast on copy: float64 values land in the float32 parameter.
    value = torch.randn(32, 32, dtype=torch.float64)
    swapper.swap({name: value})
    assert model.encoder.layer[0].attention.self.query.weight.dtype == torch.float32
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight, value.float())


def test_prefixed_base_maps_to_unprefixed_module(bert: BertFamily) -> None:
    # A base saved from BertForSequenceClassification: names carry bert., the head is unused.
    model = BertModel.from_pretrained(bert.base)
    files = open_artifact_folder(bert.expert_a)
    swapper = WeightSwapper(model, list(files.tensors))
    assert swapper.prefix == "-bert."
    assert sorted(swapper.unused) == ["classifier.bias", "classifier.weight"]
    assert swapper.uncovered == []
    swapper.load_from(files)
    state = load_file(bert.expert_a / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["bert." + name])
    assert swapper.swap({"classifier.weight": torch.zeros(1)}) == 0  # skipped, not an error


def test_expert_pooler_is_the_tasks_own(bert: BertFamily, bert_tokenizer: Any) -> None:
    # The base has no pooler: each expert's pooler is expert-only and travels with its head.
    tasks = _tasks(bert, bert_tokenizer)
    evaluator = ClassificationEvaluator(
        open_artifact_folder(bert.base_no_pooler), tasks, metric="loss", max_length=MAX_LENGTH
    )
    assert "pooler.dense.weight" in evaluator.swapper.uncovered
    result = evaluator.evaluate("validation")
    backbone = load_file(bert.base_no_pooler / "model.safetensors")
    assert not any(k.startswith("pooler.") for k in backbone)
    for task in tasks:
        rows = list(task.validation)
        logits = _independent_logits(
            _classifier(task.expert.root, backbone), bert_tokenizer, [r["text"] for r in rows]
        )
        expected = _mean_ce(logits, [_index(r["label"]) for r in rows])
        assert result.per_task[task.name] == pytest.approx(expected, rel=1e-5)


def test_labels_unknown_to_the_expert_are_a_dataset_mismatch(
    bert: BertFamily, bert_tokenizer: Any
) -> None:
    base = open_artifact_folder(bert.base)
    expert = open_artifact_folder(bert.expert_a)
    rows = [{"text": "w1 w2", "label": "neg"}, {"text": "w3", "label": "positive"}]
    with pytest.raises(CrucibleError) as err:
        ClassificationEvaluator(base, [ClassificationTask("a", expert, rows)])
    assert err.value.code == "dataset_mismatch"
    assert "'positive'" in err.value.message
    assert err.value.detail["expert_labels"] == ["neg", "neu", "pos"]
    with pytest.raises(CrucibleError) as err:
        ClassificationEvaluator(
            base, [ClassificationTask("a", expert, [{"text": "w1", "label": 3}])]
        )
    assert err.value.code == "dataset_mismatch"
    assert "3 classes" in err.value.message


# ----------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpt2")
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(vocab), n_embd=32)).eval()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _manual_lm_loss(model_dir: Path, rows: list[dict], wte: torch.Tensor | None = None) -> float:
    """Float64 mean cross-entropy over the completion tokens (every token after the first
    for {text}), one row at a time with no padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    if wte is not None:
        model.transformer.wte.weight.data.copy_(wte)  # tied: the LM head follows
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            if "prompt" in row:
                prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
                ids, first = prompt + completion, max(1, len(prompt))
            else:
                ids, first = tokenizer(row["text"], add_special_tokens=False)["input_ids"], 1
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            for j in range(first, len(ids)):
                nll -= float(logp[j - 1, ids[j]])
                count += 1
    return nll / count


def _lm_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
            "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
        }
        for _ in range(n)
    ]


def test_lm_loss_is_completion_only_cross_entropy(gpt2: Path) -> None:
    pc = _lm_rows(seed=2, n=14)
    text = [{"text": t} for t in sentences(10, seed=3) if len(t.split()) <= 12]
    evaluator = LanguageModelEvaluator(
        open_artifact_folder(gpt2),
        [
            LanguageModelTask("pc", "prompt_completion", pc[:9], pc[9:]),
            LanguageModelTask("text", "text", text[:6], text[6:]),
        ],
        max_length=32,
        batch_size=4,
    )
    result = evaluator.evaluate("validation")
    expected = {"pc": _manual_lm_loss(gpt2, pc[:9]), "text": _manual_lm_loss(gpt2, text[:6])}
    assert result.per_task == pytest.approx(expected, rel=1e-5)
    assert result.value == pytest.approx(sum(expected.values()) / 2, rel=1e-5)
    assert result.objective == -result.value
    # Only the completion counts: the loss over whole sequences is another number.
    whole = _manual_lm_loss(gpt2, [{"text": r["prompt"] + r["completion"]} for r in pc[:9]])
    assert abs(whole - expected["pc"]) > 1e-3

    test_result = evaluator.evaluate("test")
    assert test_result.per_task["pc"] == pytest.approx(_manual_lm_loss(gpt2, pc[9:]), rel=1e-5)
    assert test_result.examples == len(pc) - 9 + len(text) - 6


def test_lm_tied_head_swaps_once_and_perplexity(gpt2: Path) -> None:
    rows = _lm_rows(seed=4, n=8)
    evaluator = LanguageModelEvaluator(
        open_artifact_folder(gpt2),
        [LanguageModelTask("pc", "prompt_completion", rows)],
        metric="perplexity",
        max_length=32,
    )
    swapper = evaluator.swapper
    assert "transformer.wte.weight" in swapper.names
    assert "lm_head.weight" not in swapper.names and swapper.uncovered == []
    model = evaluator.model
    pointer = model.lm_head.weight.data_ptr()
    assert pointer == model.transformer.wte.weight.data_ptr()

    wte = load_file(gpt2 / "model.safetensors")["transformer.wte.weight"]
    new = wte + 0.3 * torch.randn(wte.shape, generator=torch.Generator().manual_seed(5))
    swapper.swap({"transformer.wte.weight": new})
    assert model.lm_head.weight.data_ptr() == pointer
    assert torch.equal(model.lm_head.weight, new)

    result = evaluator.evaluate("validation")
    loss = _manual_lm_loss(gpt2, rows, wte=new)
    assert result.metric == "perplexity"
    assert result.value == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.objective == pytest.approx(-loss, rel=1e-5)
    with pytest.raises(CrucibleError) as err:
        evaluator.evaluate("test")  # no test rows were given
    assert err.value.code == "dataset_too_small"


# ----------------------------------------------------------------------------- factory


def _handle(folder: Path, dataset_id: str, rows: list[dict], schema: str) -> DatasetHandle:
    path = folder / f"{dataset_id}.jsonl"
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(data)
    labels = sorted({r["label"] for r in rows}, key=str) if schema == "classification" else []
    return DatasetHandle(
        id=dataset_id,
        tenant="t",
        name=dataset_id,
        sha256=hashlib.sha256(data).hexdigest(),
        path=path,
        format="jsonl",
        schema=schema,  # type: ignore[arg-type]
        rows=len(rows),
        labels=labels,
        bytes=len(data),
        created_at=datetime.now(UTC),
    )


def test_factory_scores_each_expert_on_its_own_dataset(
    bert: BertFamily, bert_tokenizer: Any, tmp_path: Path
) -> None:
    rows_a = _rows_labelled_by(bert.expert_a, bert.texts, bert_tokenizer)
    rows_b = _rows_labelled_by(bert.expert_b, bert.texts[:20], bert_tokenizer)
    handles = {
        "ds_aaaaaaaa": _handle(tmp_path, "ds_aaaaaaaa", rows_a, "classification"),
        "ds_bbbbbbbb": _handle(tmp_path, "ds_bbbbbbbb", rows_b, "classification"),
    }
    split = SplitSpec(validation=0.5, test=0.5, seed=3)
    tuning = TuningSpec(
        dataset={"a": "ds_aaaaaaaa", "b": "ds_bbbbbbbb"}, split=split, max_length=MAX_LENGTH
    )
    experts = [open_artifact_folder(bert.expert_a), open_artifact_folder(bert.expert_b)]
    base = open_artifact_folder(bert.base)
    evaluator = build_evaluator(tuning, base, experts, ["a", "b"], handles, "cpu")
    assert isinstance(evaluator, ClassificationEvaluator)
    result = evaluator.evaluate("validation")
    for name, expert, rows, handle in (
        ("a", bert.expert_a, rows_a, handles["ds_aaaaaaaa"]),
        ("b", bert.expert_b, rows_b, handles["ds_bbbbbbbb"]),
    ):
        chosen = [rows[i] for i in handle.split(split)[0]]
        logits = _independent_logits(
            _classifier(expert, _base_backbone(bert)), bert_tokenizer, [r["text"] for r in chosen]
        )
        assert result.per_task[name] == _accuracy(logits, [_index(r["label"]) for r in chosen])
    assert result.examples == len(handles["ds_aaaaaaaa"].split(split)[0]) + len(
        handles["ds_bbbbbbbb"].split(split)[0]
    )

    # One shared dataset: every expert with that label set is scored on it; capped rows.
    capped = TuningSpec(dataset="ds_aaaaaaaa", split=split, max_samples=7, max_length=MAX_LENGTH)
    shared = build_evaluator(capped, base, experts[:1], ["a"], handles, "cpu")
    assert shared.examples("validation") == 7 and shared.examples("test") == 7
    assert list(shared.evaluate("test").per_task) == ["a"]


def test_factory_language_model_and_mismatches(gpt2: Path, tmp_path: Path) -> None:
    rows = _lm_rows(seed=6, n=12)
    handles = {"ds_cccccccc": _handle(tmp_path, "ds_cccccccc", rows, "prompt_completion")}
    base = open_artifact_folder(gpt2)
    split = SplitSpec(validation=0.5, test=0.5, seed=0)
    tuning = TuningSpec(dataset="ds_cccccccc", split=split, max_length=32)
    evaluator = build_evaluator(tuning, base, [base], ["x"], handles, "cpu")
    assert evaluator.metric == "loss"
    result = evaluator.evaluate("validation")
    chosen = [rows[i] for i in handles["ds_cccccccc"].split(split)[0]]
    assert result.per_task == pytest.approx(
        {"ds_cccccccc": _manual_lm_loss(gpt2, chosen)}, rel=1e-5
    )

    with pytest.raises(CrucibleError) as err:
        build_evaluator(
            TuningSpec(dataset="ds_cccccccc", metric="accuracy"),
            base,
            [base],
            ["x"],
            handles,
            "cpu",
        )
    assert err.value.code == "dataset_mismatch"
    with pytest.raises(CrucibleError) as err:
        build_evaluator(TuningSpec(dataset="ds_dddddddd"), base, [base], ["x"], handles, "cpu")
    assert err.value.code == "dataset_not_found"
