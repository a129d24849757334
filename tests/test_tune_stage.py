"""The tune stage in process: tuned task_arithmetic on tiny BERT classifiers (per layer
type), checked against an independent float64 computation of the published weights from
the recorded best trial, and language-model tuning of bmm on a tiny GPT-2."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from crucible.datasets.storage import DatasetHandle
from crucible.pipeline import run_merge_job
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.tune.space import layer_pattern
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_bert_classifier_family, tiny_texts

LABELS = [["pos", "neg"], ["x", "y", "z"]]
NAMES = ["sentiment", "topic"]


class TrialLog(QuietReporter):
    def __init__(self) -> None:
        self.trials: dict[int, dict[str, Any]] = {}
        self.stages: list[str] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def trial(self, index: int, data: dict[str, Any]) -> None:
        self.trials[index] = data


def _dataset(folder: Path, name: str, rows: list[dict[str, Any]], schema: str) -> DatasetHandle:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = sorted({r["label"] for r in rows}) if schema == "classification" else []
    return DatasetHandle(
        id=f"ds_{name}0000000",
        tenant="t",
        name=name,
        sha256="0" * 64,
        path=path,
        format="jsonl",
        schema=schema,  # type: ignore[arg-type]
        rows=len(rows),
        labels=labels,
        bytes=path.stat().st_size,
        created_at=datetime.now(UTC),
    )


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def test_tuned_task_arithmetic_publishes_the_best_trial_per_layer_type(tmp_path: Path) -> None:
    base, experts = make_bert_classifier_family(tmp_path / "models", LABELS, seed=5)
    datasets = {}
    for i, labels in enumerate(LABELS):
        rows = [
            {"text": t, "label": labels[j % len(labels)]}
            for j, t in enumerate(tiny_texts(40, seed=i))
        ]
        handle = _dataset(tmp_path, NAMES[i], rows, "classification")
        datasets[handle.id] = handle
    ids = list(datasets)
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "name": n} for e, n in zip(experts, NAMES, strict=True)
            ],
            "method": {"name": "task_arithmetic", "params": {"scale": 0.4}},
            "output": {"dtype": "float32"},
            "tuning": {
                "dataset": dict(zip(NAMES, ids, strict=True)),
                "trials": 4,
                "init_trials": 3,
                "groups": "layer_type",
            },
        }
    )
    log = TrialLog()
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    outcome = run_merge_job(spec, tmp_path / "out", settings, log, datasets)
    assert log.stages == ["resolve", "tune", "merge", "evaluate", "publish"]
    assert sorted(log.trials) == [0, 1, 2, 3]
    # Trial 0 is the requested scale in every group.
    assert all(v == {"scale": pytest.approx(0.4)} for v in log.trials[0]["params"].values())
    tuning = outcome.metrics["tuning"]
    best = log.trials[tuning["best_trial"]]
    assert best["objective"] == max(t["objective"] for t in log.trials.values())
    assert tuning["published_validation"]["value"] == pytest.approx(best["objective"])
    assert 0 < tuning["merge_and_swap_share"] < 1

    w0 = _tensors(base / "model.safetensors")
    taus = [
        {k: v - w0[k.removeprefix("bert.")] for k, v in _tensors(e / "model.safetensors").items()
         if k.removeprefix("bert.") in w0}
        for e in experts
    ]  # fmt: skip
    merged = _tensors(tmp_path / "out" / "model.safetensors")
    groups = best["params"]
    seen = set()
    for name, value in w0.items():
        module = name.rsplit(".", 1)[0]
        scale = groups[layer_pattern(module)]["scale"]
        seen.add(layer_pattern(module))
        want = value + scale * sum(t[f"bert.{name}"] for t in taus)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert seen == set(groups)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Tuning" in card


def test_language_model_tuning_minimises_loss(tmp_path: Path) -> None:
    """bmm (data-free Grams) tuned globally on {prompt, completion} rows of a tiny GPT-2:
    the objective is -loss, and the recorded loss of the published model is the best."""
    from tests.support.tiny_models import make_gpt2_family, tiny_word_tokenizer

    base, experts = make_gpt2_family(tmp_path / "models", n_experts=2, seed=3)
    tok = tiny_word_tokenizer()
    tok.eos_token = "[SEP]"
    for folder in (base, *experts):
        tok.save_pretrained(folder)
    rows = [{"prompt": t, "completion": " the cat"} for t in tiny_texts(24, seed=9)]
    handle = _dataset(tmp_path, "lm", rows, "prompt_completion")
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri()} for e in experts],
            "method": {"name": "bmm"},
            "output": {"dtype": "float32"},
            "tuning": {"dataset": handle.id, "trials": 3, "init_trials": 2, "groups": "global"},
        }
    )
    log = TrialLog()
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    outcome = run_merge_job(spec, tmp_path / "out", settings, log, {handle.id: handle})
    tuning = outcome.metrics["tuning"]
    assert tuning["metric"] == "loss"
    losses = {i: t["value"] for i, t in log.trials.items()}
    assert all(t["objective"] == pytest.approx(-t["value"]) for t in log.trials.values())
    assert tuning["best_trial"] == min(losses, key=losses.__getitem__)
    assert tuning["published_validation"]["value"] == pytest.approx(min(losses.values()), rel=1e-5)
    assert tuning["test"]["value"] > 0
