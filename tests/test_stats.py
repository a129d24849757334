"""The statistics stage: activation Grams against an independent float64 computation (BERT
nn.Linear, GPT-2 Conv1D), padding excluded, grouped passes, the cache, the data-free
estimators, and the stage's folders as the merge stage reads them.

Models are tiny and made here: a BERT base saved from BertModel with a classifier expert
saved from BertForSequenceClassification (names `bert.` + a head), and a GPT-2 pair."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
)

from crucible.datasets.storage import DatasetHandle
from crucible.errors import CrucibleError, JobCancelled
from crucible.evaluate.batches import iter_batches
from crucible.settings import Settings
from crucible.sources.align import align_names
from crucible.sources.resolve import INDEX_FILE, ResolvedModel, open_artifact_folder
from crucible.spec import MergeSpec
from crucible.stats.activations import (
    collect_activation_grams,
    linear_modules,
    module_input_dims,
    plan_groups,
)
from crucible.stats.cache import GramCache, folder_fingerprint
from crucible.stats.data_free import (
    centred_covariance,
    task_vector_gram,
    write_task_vector_grams,
)
from crucible.stats.stage import compute_statistics, task_vector_statistics

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue", "big", "small", "ran", "far",
         "under", "a", "log", "fast", "slow", "very", "happy", "sad"]  # fmt: skip
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- fixtures


def bert_tokenizer() -> BertTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate([*specials, *WORDS])})


def gpt2_tokenizer() -> GPT2TokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2TokenizerFast(vocab=vocab, merges=[])


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base/ (BertModel + tokenizer), clf/ (BertForSequenceClassification + tokenizer),
    bare/ (the same classifier without tokenizer files)."""
    root = tmp_path_factory.mktemp("bert")
    tok = bert_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                        num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    base = BertModel(config).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    clf = BertForSequenceClassification(config).eval()
    clf.bert.load_state_dict(base.state_dict())
    perturb(clf, 1)
    clf.save_pretrained(root / "clf")
    tok.save_pretrained(root / "clf")
    clf.save_pretrained(root / "bare")
    return {"base": root / "base", "clf": root / "clf", "bare": root / "bare"}


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    tok = gpt2_tokenizer()
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    perturb(model, 2)
    model.save_pretrained(root / "expert")
    tok.save_pretrained(root / "expert")
    return {"base": root / "base", "expert": root / "expert"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def handle(path: Path, schema: str, rows: int, dataset_id: str = "ds_0123456789") -> DatasetHandle:
    labels: list[Any] = (
        sorted({r["label"] for r in read_rows(path)}) if schema == "classification" else []
    )
    return DatasetHandle(
        id=dataset_id,
        tenant="t",
        name=path.name,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        path=path,
        format="jsonl",
        schema=schema,  # type: ignore[arg-type]
        rows=rows,
        labels=labels,
        bytes=path.stat().st_size,
        created_at=datetime.now(UTC),
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Recorder:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.progress_calls: list[tuple[int, int, str]] = []
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []
        self.checks = 0
        self.cancel_after = cancel_after

    def stage(self, name: str) -> None: ...

    def progress(self, done: int, total: int, unit: str) -> None:
        self.progress_calls.append((done, total, unit))

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))

    def check_cancelled(self) -> None:
        self.checks += 1
        if self.cancel_after is not None and self.checks > self.cancel_after:
            raise JobCancelled()


@contextmanager
def count_forwards() -> Iterator[list[int]]:
    """Every nn.Module forward call in the process while the block runs."""
    calls = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        calls[0] += 1

    handle_ = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle_.remove()


def regmean_spec(base: Path, experts: list[dict[str, Any]], **statistics: Any) -> MergeSpec:
    return MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": experts,
            "method": {"name": "regmean"},
            "statistics": statistics,
        }
    )


def settings_at(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path], **kw)


# ----------------------------------------------------------------------------- reference


def reference_grams(
    model: torch.nn.Module, modules: dict[str, str], rows: list[str], tokenizer: Any
) -> dict[str, np.ndarray]:
    """X^T X / n in float64 numpy, X the inputs each module received, with every example run
    alone (no padding at all) and its inputs kept by an ordinary forward hook."""
    captured: dict[str, list[np.ndarray]] = {base: [] for base in modules.values()}
    handles = []
    for path, base in modules.items():

        def hook(module: Any, args: tuple, output: Any, base: str = base) -> None:
            x = args[0].detach().double().numpy()
            captured[base].append(x.reshape(-1, x.shape[-1]))

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for text in rows:
                enc = tokenizer(text, return_tensors="pt")
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for base, xs in captured.items():
        x = np.concatenate(xs)
        out[base] = x.T @ x / x.shape[0]
    return out


def assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float = 1e-5) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=0, atol=rtol * scale)


# ----------------------------------------------------------------------------- module discovery


def test_linear_modules_map_to_base_names(bert_family: dict[str, Path]) -> None:
    base = open_artifact_folder(bert_family["base"])
    expert = open_artifact_folder(bert_family["clf"])
    model = BertForSequenceClassification.from_pretrained(bert_family["clf"])
    modules = linear_modules(model, expert.tensors, align_names(base.tensors, expert.tensors))
    assert modules["bert.encoder.layer.0.attention.self.query"] == (
        "encoder.layer.0.attention.self.query.weight"
    )
    assert modules["bert.pooler.dense"] == "pooler.dense.weight"
    assert "classifier" not in modules  # the expert's own head: the base has no such weight
    # Every nn.Linear of the encoder and pooler, each under a name the base holds.
    assert len(modules) == 2 * 6 + 1
    assert set(modules.values()) <= set(base.tensors)
    dims = module_input_dims(model, modules)
    assert dims["bert.encoder.layer.1.output.dense"] == 48


def test_gpt2_conv1d_modules_and_tied_head(gpt2_family: dict[str, Path]) -> None:
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    model = GPT2LMHeadModel.from_pretrained(gpt2_family["expert"])
    modules = linear_modules(model, expert.tensors, align_names(base.tensors, expert.tensors))
    assert sorted(modules) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )  # fmt: skip
    assert "lm_head" not in modules  # tied to wte, not in the files
    dims = module_input_dims(model, modules)
    assert dims["transformer.h.0.attn.c_attn"] == 32
    assert dims["transformer.h.0.mlp.c_proj"] == 128


# ----------------------------------------------------------------------------- activation Grams


def test_bert_grams_match_independent_computation(bert_family: dict[str, Path]) -> None:
    base = open_artifact_folder(bert_family["base"])
    expert = open_artifact_folder(bert_family["clf"])
    model = BertForSequenceClassification.from_pretrained(bert_family["clf"]).eval()
    modules = linear_modules(model, expert.tensors, align_names(base.tensors, expert.tensors))
    tok = bert_tokenizer()
    rows = texts(9, seed=3)
    batches = list(iter_batches([{"text": t} for t in rows], tok, "text", max_length=32,
                                batch_size=4))  # fmt: skip
    assert any(b.attention_mask.eq(0).any() for b in batches)  # padding present
    seen: list[int] = []
    grams = collect_activation_grams(model, batches, modules, device=CPU, progress=seen.append)
    assert seen == [4, 8, 9]
    assert set(grams) == set(modules.values())
    expected = reference_grams(model, modules, rows, tok)
    for name, gram in grams.items():
        assert gram.dtype == torch.float64 and gram.device.type == "cpu"
        assert_close(gram, expected[name])

    # A second, hook-free route: layer 1's query sees layer 0's output hidden states.
    with torch.no_grad():
        states, finals = [], []
        for text in rows:
            enc = tok(text, return_tensors="pt")
            out = model.bert(**enc, output_hidden_states=True)
            states.append(out.hidden_states[1][0].double().numpy())  # input of layer 1
            finals.append(out.hidden_states[-1][0, 0].double().numpy())
    x = np.concatenate(states)
    assert_close(grams["encoder.layer.1.attention.self.query.weight"], x.T @ x / x.shape[0])
    # The pooler sees one row per example, the last layer's [CLS] state: n = examples.
    cls = np.stack(finals)
    assert_close(grams["pooler.dense.weight"], cls.T @ cls / len(rows))


def test_gpt2_conv1d_grams_match_independent_computation(gpt2_family: dict[str, Path]) -> None:
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    model = GPT2LMHeadModel.from_pretrained(gpt2_family["expert"]).eval()
    modules = linear_modules(model, expert.tensors, align_names(base.tensors, expert.tensors))
    tok = gpt2_tokenizer()
    rows = texts(7, seed=4)
    batches = iter_batches([{"text": t} for t in rows], tok, "text", max_length=64, batch_size=3)
    grams = collect_activation_grams(model, batches, modules, device=CPU)
    expected = reference_grams(model, modules, rows, tok)
    for name, gram in grams.items():
        d_in = base.tensors[name].shape[0]  # Conv1D weights are stored d_in x d_out
        assert gram.shape == (d_in, d_in)
        assert_close(gram, expected[name])

    # Hook-free: c_attn's input is ln_1 of the block's input hidden states.
    with torch.no_grad():
        xs = []
        for text in rows:
            enc = tok(text, return_tensors="pt")
            hidden = model.transformer(**enc, output_hidden_states=True).hidden_states[0]
            xs.append(model.transformer.h[0].ln_1(hidden)[0].double().numpy())
    x = np.concatenate(xs)
    assert_close(grams["transformer.h.0.attn.c_attn.weight"], x.T @ x / x.shape[0])


def test_padding_is_excluded(gpt2_family: dict[str, Path]) -> None:
    """The same examples batched alone (no padding) and together (heavy padding) give the
    same Grams; counting pad positions would not."""
    model = GPT2LMHeadModel.from_pretrained(gpt2_family["expert"]).eval()
    modules = {"transformer.h.1.mlp.c_fc": "h1.c_fc", "transformer.h.0.attn.c_attn": "h0.attn"}
    tok = gpt2_tokenizer()
    rows = [{"text": "a"}, {"text": "the big red dog ran very far under the log"}, {"text": "hi"}]

    def grams(batch_size: int) -> dict[str, torch.Tensor]:
        batches = iter_batches(rows, tok, "text", max_length=64, batch_size=batch_size)
        return collect_activation_grams(model, batches, modules, device=CPU)

    alone, together = grams(1), grams(3)
    for name in modules.values():
        torch.testing.assert_close(together[name], alone[name], rtol=1e-5, atol=1e-7)

    # What including the padding would have given: clearly different.
    (batch,) = iter_batches(rows, tok, "text", max_length=64, batch_size=3)
    captured: list[torch.Tensor] = []
    h = model.get_submodule("transformer.h.0.attn.c_attn").register_forward_hook(
        lambda m, a, o: captured.append(a[0].detach())
    )
    with torch.no_grad():
        model(**batch.model_inputs())
    h.remove()
    x = captured[0].reshape(-1, 32).double()
    with_pads = x.T @ x / x.shape[0]
    assert (with_pads - alone["h0.attn"]).abs().max() > 1e-2 * alone["h0.attn"].abs().max()


def test_left_and_right_padding_agree_for_bert(bert_family: dict[str, Path]) -> None:
    """The mask, not the position, decides: the same BERT batch padded on the left gives the
    Gram of the right-padded one."""
    model = BertModel.from_pretrained(bert_family["base"]).eval()
    modules = {"encoder.layer.0.intermediate.dense": "w"}
    tok = bert_tokenizer()
    rows = [{"text": "the cat"}, {"text": "the big red dog sat on the mat"}]
    (right,) = iter_batches(rows, tok, "text", max_length=32, batch_size=2)
    lengths = right.attention_mask.sum(dim=1)
    left = type(right)(
        input_ids=torch.stack([r.roll(int(r.shape[0] - n)) for r, n in
                               zip(right.input_ids, lengths, strict=True)]),
        attention_mask=torch.stack([m.roll(int(m.shape[0] - n)) for m, n in
                                    zip(right.attention_mask, lengths, strict=True)]),
    )  # fmt: skip
    assert left.attention_mask[0, 0] == 0
    g_right = collect_activation_grams(model, [right], modules, device=CPU)["w"]
    # Absolute positions differ for the left-padded row, so pass position ids that match.
    position_ids = (left.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    wrapped = _WithPositions(model, position_ids)
    inner = {"inner." + k: v for k, v in modules.items()}
    g_left = collect_activation_grams(wrapped, [left], inner, device=CPU)["w"]
    torch.testing.assert_close(g_left, g_right, rtol=1e-5, atol=1e-7)


class _WithPositions(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, position_ids: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.position_ids = position_ids

    def forward(self, **kw: Any) -> Any:
        return self.inner(**kw, position_ids=self.position_ids)


def test_grouped_passes_equal_one_pass(bert_family: dict[str, Path]) -> None:
    model = BertModel.from_pretrained(bert_family["base"]).eval()
    base = open_artifact_folder(bert_family["base"])
    modules = linear_modules(model, base.tensors, align_names(base.tensors, base.tensors))
    dims = module_input_dims(model, modules)
    budget = 8 * 32 * 32 * 3  # three hidden-size Grams per group
    groups = plan_groups(modules, dims, budget)
    assert len(groups) > 3
    assert [p for g in groups for p in g] == list(modules)  # every module once, in order
    for group in groups:
        cost = sum(8 * dims[p] ** 2 for p in group)
        assert cost <= budget or len(group) == 1  # the 48-wide output.dense Grams fit alone
    tok = bert_tokenizer()
    rows = [{"text": t} for t in texts(6, seed=5)]

    def batches() -> Iterator[Any]:
        return iter_batches(rows, tok, "text", max_length=32, batch_size=4)

    whole = collect_activation_grams(model, batches(), modules, device=CPU)
    parts: dict[str, torch.Tensor] = {}
    for group in groups:
        parts.update(collect_activation_grams(model, batches(), group, device=CPU))
    assert parts.keys() == whole.keys()
    for name in whole:
        assert torch.equal(parts[name], whole[name])


def test_plan_groups_rules() -> None:
    dims = {"a": 4, "b": 4, "big": 100, "c": 4, "c2": 4}
    modules = {"a": "A", "b": "B", "big": "BIG", "c": "C", "c2": "C"}  # c and c2 share a Gram
    groups = plan_groups(modules, dims, budget_bytes=8 * 16 * 2)
    assert groups == [{"a": "A", "b": "B"}, {"big": "BIG"}, {"c": "C", "c2": "C"}]
    assert plan_groups(modules, dims, budget_bytes=10**9) == [modules]


# ----------------------------------------------------------------------------- data-free


def test_task_vector_gram_formula() -> None:
    rng = np.random.default_rng(0)
    tau = rng.standard_normal((7, 5))
    gram = task_vector_gram(torch.from_numpy(tau))
    np.testing.assert_allclose(gram.numpy(), tau.T @ tau / np.sum(tau**2), rtol=1e-12)
    assert math.isclose(float(gram.trace()), 1.0, rel_tol=1e-12)
    assert torch.equal(task_vector_gram(torch.zeros(3, 4, dtype=torch.float64)),
                       torch.zeros(4, 4, dtype=torch.float64))  # fmt: skip


def test_centred_covariance_formula() -> None:
    rng = np.random.default_rng(1)
    tau = rng.standard_normal((6, 4)) + 3.0
    cov, centred = centred_covariance(torch.from_numpy(tau))
    c = tau - tau.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(centred.numpy(), c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), c.T @ c, rtol=1e-12)


def test_task_vector_gram_folder_gpt2(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    d_ins = write_task_vector_grams(base, expert, tmp_path / "g")
    folder = open_artifact_folder(tmp_path / "g")
    assert set(folder.tensors) == set(d_ins)
    # Every 2-D weight: Conv1D ones, embeddings (wte, wpe).
    assert "transformer.wte.weight" in d_ins and "transformer.h.0.attn.c_attn.weight" in d_ins
    base_w, expert_w = load_file(base.weight_files[0]), load_file(expert.weight_files[0])
    grams = load_file(folder.weight_files[0])
    for name in d_ins:
        tau = (expert_w[name].double() - base_w[name].double()).numpy()
        if ".h." in name and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tau = tau.T  # Conv1D (d_in x d_out) -> nn.Linear layout
        expected = tau.T @ tau / np.sum(tau**2)
        assert grams[name].dtype == torch.float64
        np.testing.assert_allclose(grams[name].numpy(), expected, rtol=1e-10, atol=1e-14)


def test_task_vector_gram_folder_prefixed_classifier(
    bert_family: dict[str, Path], tmp_path: Path
) -> None:
    base = open_artifact_folder(bert_family["base"])
    expert = open_artifact_folder(bert_family["clf"])
    write_task_vector_grams(base, expert, tmp_path / "g")
    folder = open_artifact_folder(tmp_path / "g")
    assert "encoder.layer.0.attention.self.query.weight" in folder.tensors
    assert not any(n.startswith(("bert.", "classifier")) for n in folder.tensors)
    assert set(folder.tensors) <= set(base.tensors)


def test_task_vector_statistics_are_cached(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    settings = settings_at(tmp_path)
    first = task_vector_statistics(base, expert, settings)
    assert first.root.parent == settings.artifacts_root / "grams"
    meta = json.loads((first.root / "meta.json").read_text())
    assert meta["inputs"]["estimator"] == "task_vector"
    assert meta["inputs"]["base"] is not None and meta["inputs"]["dataset"] is None
    write_task_vector_grams(base, expert, tmp_path / "direct")
    direct = load_file(open_artifact_folder(tmp_path / "direct").weight_files[0])
    cached = load_file(first.weight_files[0])
    assert direct.keys() == cached.keys()
    assert all(torch.equal(direct[n], cached[n]) for n in direct)
    assert task_vector_statistics(base, expert, settings).root == first.root
    # Another base is another task vector: another entry.
    assert task_vector_statistics(expert, base, settings).root != first.root


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grams_agree_with_cpu(gpt2_family: dict[str, Path]) -> None:
    model = GPT2LMHeadModel.from_pretrained(gpt2_family["expert"]).eval()
    modules = {"transformer.h.0.attn.c_attn": "a", "transformer.h.1.mlp.c_proj": "b"}
    rows = [{"text": t} for t in texts(6, seed=10)]
    tok = gpt2_tokenizer()
    cpu = collect_activation_grams(
        model, iter_batches(rows, tok, "text", max_length=64, batch_size=4), modules, device=CPU
    )
    cuda = torch.device("cuda")
    gpu = collect_activation_grams(
        model.to(cuda), iter_batches(rows, tok, "text", max_length=64, batch_size=4), modules,
        device=cuda,
    )  # fmt: skip
    model.to(CPU)
    for name in modules.values():
        assert gpu[name].device.type == "cpu"
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- stage and cache


def test_stage_prefixed_classifier_and_cache(bert_family: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": t, "label": ["x", "y", "z"][i % 3]} for i, t in enumerate(texts(11, 6))]
    data = handle(write_jsonl(tmp_path / "d.jsonl", rows), "classification", len(rows))
    base = open_artifact_folder(bert_family["base"])
    expert = open_artifact_folder(bert_family["clf"])
    spec = regmean_spec(
        bert_family["base"],
        [{"uri": bert_family["clf"].as_uri(), "name": "clf", "dataset": data.id}],
        max_samples=8, max_length=32, batch_size=3,
    )  # fmt: skip
    settings = settings_at(tmp_path)
    recorder = Recorder()
    with count_forwards() as calls:
        out = compute_statistics(spec, base, [expert], {data.id: data}, settings, recorder, CPU)
    assert calls[0] > 0
    assert out is not None and len(out) == 1
    folder = out[0]
    # Base names, the classifier's head left out, readable as the merge stage reads it.
    assert "encoder.layer.0.attention.self.query.weight" in folder.tensors
    assert "pooler.dense.weight" in folder.tensors
    assert set(folder.tensors) <= set(base.tensors)
    assert folder.root.parent == settings.artifacts_root / "grams"
    # Against the independent computation over the first max_samples rows, in file order.
    model = BertForSequenceClassification.from_pretrained(bert_family["clf"]).eval()
    modules = linear_modules(model, expert.tensors, align_names(base.tensors, expert.tensors))
    expected = reference_grams(model, modules, [r["text"] for r in rows[:8]], bert_tokenizer())
    stored = {}
    for f in folder.weight_files:
        stored.update(load_file(f))
    assert stored.keys() == expected.keys()
    for name, gram in stored.items():
        assert_close(gram, expected[name])
    meta = json.loads((folder.root / "meta.json").read_text())
    assert meta["examples"] == 8 and meta["passes"] == 1
    assert meta["inputs"]["dataset"] == data.sha256 and meta["inputs"]["max_samples"] == 8
    assert meta["tokens"] == sum(len(bert_tokenizer()(r["text"])["input_ids"]) for r in rows[:8])
    # Progress in examples, ending at the total.
    assert recorder.progress_calls[0] == (0, 8, "examples")
    assert recorder.progress_calls[-1] == (8, 8, "examples")
    assert all(unit == "examples" for *_, unit in recorder.progress_calls)

    # Same inputs again: a cache hit, no forward pass, the same folder.
    recorder = Recorder()
    with count_forwards() as calls:
        again = compute_statistics(spec, base, [expert], {data.id: data}, settings, recorder, CPU)
    assert calls[0] == 0
    assert again is not None and again[0].root == folder.root
    assert any("cache hit for expert 'clf'" in message for _, message, _ in recorder.events)
    assert recorder.progress_calls[-1] == (8, 8, "examples")

    # A different max_samples is another entry.
    spec9 = spec.model_copy(
        update={"statistics": spec.statistics.model_copy(update={"max_samples": 9})}
    )
    with count_forwards() as calls:
        other = compute_statistics(
            spec9, base, [expert], {data.id: data}, settings, Recorder(), CPU
        )
    assert calls[0] > 0
    assert other is not None and other[0].root != folder.root


def test_stage_groups_write_shards_with_an_index(
    gpt2_family: dict[str, Path], tmp_path: Path
) -> None:
    rows = [{"text": t} for t in texts(5, 7)]
    data = handle(write_jsonl(tmp_path / "d.jsonl", rows), "text", len(rows))
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    spec = regmean_spec(gpt2_family["base"],
                        [{"uri": gpt2_family["expert"].as_uri(), "dataset": data.id}],
                        max_length=64, batch_size=2)  # fmt: skip
    one = compute_statistics(spec, base, [expert], {data.id: data}, settings_at(tmp_path / "a"),
                             Recorder(), CPU)  # fmt: skip
    recorder = Recorder()
    small = settings_at(tmp_path / "b", gram_memory_bytes=8 * 32 * 32 * 2)
    split = compute_statistics(spec, base, [expert], {data.id: data}, small, recorder, CPU)
    assert one is not None and split is not None
    assert len(one[0].weight_files) == 1
    assert len(split[0].weight_files) > 2
    assert (split[0].root / INDEX_FILE).is_file()
    passes = len(split[0].weight_files)
    # Progress counts each pass over the 5 examples.
    assert recorder.progress_calls[-1] == (5 * passes, 5 * passes, "examples")
    a, b = {}, {}
    for f in one[0].weight_files:
        a.update(load_file(f))
    for f in split[0].weight_files:
        b.update(load_file(f))
    assert a.keys() == b.keys() == {n for n in base.tensors if n.endswith("weight") and ".h." in n
                                    and "ln_" not in n}  # fmt: skip
    for name in a:
        assert torch.equal(a[name], b[name])


def test_stage_prompt_completion_and_tokenizer_fallback(
    bert_family: dict[str, Path], tmp_path: Path
) -> None:
    """An expert folder without tokenizer files reads its data with the base's tokenizer;
    prompt_completion rows are read as prompt + completion."""
    rows = [{"prompt": "the cat", "completion": " sat on the mat"},
            {"prompt": "a dog", "completion": " ran far"}]  # fmt: skip
    data = handle(write_jsonl(tmp_path / "d.jsonl", rows), "prompt_completion", 2)
    base = open_artifact_folder(bert_family["base"])
    expert = open_artifact_folder(bert_family["bare"])
    spec = regmean_spec(bert_family["base"],
                        [{"uri": bert_family["bare"].as_uri(), "dataset": data.id}])  # fmt: skip
    out = compute_statistics(spec, base, [expert], {data.id: data}, settings_at(tmp_path),
                             Recorder(), CPU)  # fmt: skip
    assert out is not None
    model = BertForSequenceClassification.from_pretrained(bert_family["bare"]).eval()
    modules = linear_modules(model, expert.tensors, align_names(base.tensors, expert.tensors))
    # BERT word-level tokens: tokenising the joined text gives the same ids here.
    expected = reference_grams(
        model, modules, ["the cat sat on the mat", "a dog ran far"], bert_tokenizer()
    )
    stored = load_file(out[0].weight_files[0])
    for name in expected:
        assert_close(stored[name], expected[name])
    meta = json.loads((out[0].root / "meta.json").read_text())
    assert meta["inputs"]["tokenizer"] is not None  # the base's tokenizer is part of the key


def test_stage_mixes_grams_folders_and_datasets(
    gpt2_family: dict[str, Path], tmp_path: Path
) -> None:
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    write_task_vector_grams(base, expert, tmp_path / "given")
    rows = [{"text": t} for t in texts(3, 8)]
    data = handle(write_jsonl(tmp_path / "d.jsonl", rows), "text", 3)
    spec = regmean_spec(
        gpt2_family["base"],
        [{"uri": gpt2_family["expert"].as_uri(), "grams": {"uri": (tmp_path / "given").as_uri()}},
         {"uri": gpt2_family["expert"].as_uri(), "dataset": data.id}],
    )  # fmt: skip
    out = compute_statistics(spec, base, [expert, expert], {data.id: data},
                             settings_at(tmp_path), Recorder(), CPU)  # fmt: skip
    assert out is not None and len(out) == 2
    assert out[0].root == (tmp_path / "given").resolve()
    assert out[1].root.parent.name == "grams"


def test_no_grams_needed_returns_none(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    spec = MergeSpec.model_validate({
        "base": {"uri": gpt2_family["base"].as_uri()},
        "experts": [{"uri": gpt2_family["expert"].as_uri()}],
        "method": {"name": "bmm"},
    })  # fmt: skip
    base = open_artifact_folder(gpt2_family["base"])
    assert (
        compute_statistics(spec, base, [base], {}, settings_at(tmp_path), Recorder(), CPU) is None
    )


def test_cancelled_run_leaves_no_entry(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": t} for t in texts(6, 9)]
    data = handle(write_jsonl(tmp_path / "d.jsonl", rows), "text", 6)
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    spec = regmean_spec(gpt2_family["base"],
                        [{"uri": gpt2_family["expert"].as_uri(), "dataset": data.id}],
                        batch_size=2)  # fmt: skip
    settings = settings_at(tmp_path)
    with pytest.raises(JobCancelled):
        compute_statistics(spec, base, [expert], {data.id: data}, settings,
                           Recorder(cancel_after=3), CPU)  # fmt: skip
    grams_dir = settings.artifacts_root / "grams"
    assert not any(grams_dir.iterdir())  # no entry, no partial folder left behind
    out = compute_statistics(spec, base, [expert], {data.id: data}, settings, Recorder(), CPU)
    assert out is not None and GramCache(settings.artifacts_root).lookup(out[0].root.name)


def test_errors(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    base = open_artifact_folder(gpt2_family["base"])
    expert = open_artifact_folder(gpt2_family["expert"])
    settings = settings_at(tmp_path)
    ref = {"uri": gpt2_family["expert"].as_uri(), "dataset": "ds_0123456789"}
    spec = regmean_spec(gpt2_family["base"], [ref])

    with pytest.raises(CrucibleError) as err:
        compute_statistics(spec, base, [expert], {}, settings, Recorder(), CPU)
    assert err.value.code == "dataset_not_found"

    # Rows without the schema's field.
    bad = handle(write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"txt": "no"}]), "text", 2)
    with pytest.raises(CrucibleError) as err:
        compute_statistics(spec, base, [expert], {bad.id: bad}, settings, Recorder(), CPU)
    assert err.value.code == "bad_dataset"
    assert err.value.detail == {"row": 2, "dataset": bad.id}
    assert not any((settings.artifacts_root / "grams").glob("*"))  # nothing written

    # An architecture transformers does not know.
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in gpt2_family["expert"].iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config.update(model_type="no_such_arch", architectures=["NoSuchModel"])
    (odd / "config.json").write_text(json.dumps(config))
    good = handle(write_jsonl(tmp_path / "good.jsonl", [{"text": "ok"}]), "text", 1)
    with pytest.raises(CrucibleError) as err:
        compute_statistics(spec, base, [open_artifact_folder(odd)], {good.id: good}, settings,
                           Recorder(), CPU)  # fmt: skip
    assert err.value.code == "unsupported_model"
    assert err.value.detail == {"model_type": "no_such_arch"}


def test_folder_fingerprint_follows_the_files(tmp_path: Path, gpt2_family: dict[str, Path]) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in gpt2_family["expert"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    first = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == first
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one weight byte: same size, new mtime
    weights.write_bytes(bytes(raw))
    assert folder_fingerprint(folder) != first
    model = ResolvedModel(uri="hf://o/m", revision="main", commit="abc", root=folder,
                          weight_files=[weights], tensors={})  # fmt: skip
    from crucible.stats.cache import model_fingerprint

    assert model_fingerprint(model) == "commit:abc"
