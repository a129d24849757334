"""Data-aware merging end to end through real processes (uvicorn over HTTP, a Celery worker,
PostgreSQL, Redis): datasets uploaded over HTTP, a RegMean job whose Grams the statistics
stage computes from them, and a tuned BMM job whose trials are recorded and whose best
trial is published.

The models are a tiny BERT base saved from BertModel and two classifiers saved from
BertForSequenceClassification (`bert.` prefix, heads of 2 and 3 labels), the layout of
real fine-tuned classifiers. Grams are checked against an independent computation: the
inputs of each layer's query/key/value projections are that layer's input hidden states,
which transformers returns with output_hidden_states, padding excluded.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, BertForSequenceClassification

from tests.support.stack import service_stack
from tests.support.tiny_models import make_bert_classifier_family, tiny_texts

pytestmark = pytest.mark.e2e

LABELS = [["pos", "neg"], ["x", "y", "z"]]
NAMES = ["sentiment", "topic"]
MAX_SAMPLES = 24
QUERY = "encoder.layer.{}.attention.self.query.weight"


def _rows(labels: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    texts = tiny_texts(n, seed)
    return [{"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(texts)]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("data-aware")
    base, experts = make_bert_classifier_family(work / "models", LABELS, seed=3)
    with service_stack(work, work / "models") as (stack, client):
        train, evaluation = {}, {}
        for i, (name, labels) in enumerate(zip(NAMES, LABELS, strict=True)):
            rows = _rows(labels, 40, seed=10 + i)
            train[name] = (_upload(client, f"{name}-train.jsonl", rows), rows)
            rows = _rows(labels, 30, seed=20 + i)
            evaluation[name] = (_upload(client, f"{name}-eval.jsonl", rows), rows)
        yield {
            "stack": stack,
            "client": client,
            "base": base,
            "experts": experts,
            "train": train,
            "eval": evaluation,
            "data": work / "data",
        }


def _upload(client: Any, filename: str, rows: list[dict[str, Any]]) -> str:
    resp = client.post(
        "/v1/datasets",
        files={"file": (filename, io.BytesIO(_jsonl(rows)))},
        data={"name": filename},
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["rows"] == len(rows) and body["schema"] == "classification"
    return str(body["id"])


def _independent_grams(expert_dir: Path, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """Per layer, X^T X / n of the layer's input hidden states over the first MAX_SAMPLES
    rows, padding excluded, float64: the Gram of that layer's query/key/value inputs."""
    tok = AutoTokenizer.from_pretrained(expert_dir)
    model = BertForSequenceClassification.from_pretrained(expert_dir).eval()
    texts = [r["text"] for r in rows[:MAX_SAMPLES]]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    grams = []
    for layer in range(model.config.num_hidden_layers):
        x = hidden[layer][mask].double().numpy()
        grams.append(x.T @ x / x.shape[0])
    return grams


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    return {
        k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()
    }


def _submit(world: dict[str, Any], method: dict[str, Any], **extra: Any) -> dict[str, Any]:
    spec = {
        "base": {"uri": world["base"].as_uri()},
        "experts": [
            {"uri": d.as_uri(), "name": n, "dataset": world["train"][n][0]}
            for d, n in zip(world["experts"], NAMES, strict=True)
        ],
        "method": method,
        "statistics": {"max_samples": MAX_SAMPLES, "batch_size": 8},
        "output": {"dtype": "float32"},
        **extra,
    }
    resp = world["client"].post("/v1/merges", json=spec)
    assert resp.status_code == 202, resp.text
    job = world["stack"].wait_for_job(world["client"], resp.json()["id"], timeout=300)
    assert job["status"] == "succeeded", json.dumps(job["error"]) + world["stack"].logs()
    return job


def _output(world: dict[str, Any], job: dict[str, Any]) -> Path:
    return world["data"] / "artifacts" / "jobs" / job["id"] / "output"


def test_regmean_grams_from_uploaded_datasets(world: dict[str, Any]) -> None:
    alpha = 0.95
    job = _submit(world, {"name": "regmean", "params": {"alpha": alpha, "ridge": 0.0}})
    assert any(e["kind"] == "stage" and "statistics" in e["message"] for e in job["events"])
    base = _tensors(world["base"])
    experts = [_tensors(d) for d in world["experts"]]
    out = _output(world, job)
    merged = _tensors(out)
    grams = [
        _independent_grams(d, world["train"][n][1])
        for d, n in zip(world["experts"], NAMES, strict=True)
    ]
    for layer in range(2):
        name = QUERY.format(layer)
        shrunk = [alpha * g[layer] + (1 - alpha) * np.diag(np.diag(g[layer])) for g in grams]
        ws = [e[f"bert.{name}"] for e in experts]
        want = sum(w @ g for w, g in zip(ws, shrunk, strict=True)) @ np.linalg.inv(sum(shrunk))
        np.testing.assert_allclose(merged[name], want, rtol=2e-4, atol=2e-5)
        assert not np.allclose(merged[name], base[name], atol=1e-4)
    # Each expert's head is kept as it was, beside its config.
    for i, n in enumerate(NAMES):
        kept = _tensors(out / "per_expert" / f"{i}-{n}")
        assert sorted(kept) == ["classifier.bias", "classifier.weight"]
        np.testing.assert_array_equal(kept["classifier.weight"], experts[i]["classifier.weight"])
        assert json.loads((out / "per_expert" / f"{i}-{n}" / "config.json").read_text())[
            "id2label"
        ] == {str(j): label for j, label in enumerate(LABELS[i])}
    # The Grams were cached in the artifact store under the base's names.
    cached = []
    for meta in (world["data"] / "artifacts").glob("grams/*/meta.json"):
        entry: dict[str, np.ndarray] = {}
        for shard in meta.parent.glob("*.safetensors"):
            entry.update(load_file(str(shard)))
        cached.append(entry)
    assert len(cached) == len(NAMES)
    for g in grams:
        assert any(
            np.allclose(c.get(QUERY.format(0)), g[0], rtol=1e-6, atol=1e-9)
            for c in cached
            if QUERY.format(0) in c
        )


def test_tuned_bmm_records_trials_and_publishes_the_best(world: dict[str, Any]) -> None:
    trials = 4
    tuning = {
        "dataset": {n: world["eval"][n][0] for n in NAMES},
        "metric": "accuracy",
        "trials": trials,
        "init_trials": 2,
        "groups": "global",
        "split": {"validation": 0.5, "test": 0.5, "seed": 1},
        "max_samples": 64,
    }
    method = {
        "name": "bmm",
        "params": {"gram": "activations", "anchor_params": {"scale": 0.5}},
    }
    job = _submit(world, method, tuning=tuning)
    kinds = [e["kind"] for e in job["events"]]
    assert "tuned" in kinds
    # The first job computed the same Grams: this one did no forward pass for them.
    assert any("cache hit" in e["message"] for e in job["events"]), kinds

    client = world["client"]
    resp = client.get(f"/v1/merges/{job['id']}/trials")
    assert resp.status_code == 200, resp.text
    page = resp.json()
    items = page["items"]
    assert [t["index"] for t in items] == list(range(trials))
    for t in items:
        assert set(t["params"]) == {"global"} and set(t["params"]["global"]) == {"rho", "scale"}
        assert 0.0 <= t["objective"] <= 1.0
        assert set(t["seconds"]) >= {"merge", "swap", "evaluate", "total"}
        assert set(t["per_task"]) == set(NAMES)
    best = max(items, key=lambda t: t["objective"])
    assert page["best"] == best["index"]
    tuned = job["result"]["metrics"]["tuning"]
    assert tuned["best_trial"] == best["index"]
    assert tuned["validation"]["value"] == pytest.approx(best["objective"])
    # The published model scores what the best trial scored, and has a held-out test score.
    assert tuned["published_validation"]["value"] == pytest.approx(best["objective"], abs=1e-6)
    assert set(tuned["test"]["per_task"]) == set(NAMES)

    # The published weights are BMM with the best trial's rho and scale (float64 formula).
    rho, scale = best["params"]["global"]["rho"], best["params"]["global"]["scale"]
    base = _tensors(world["base"])
    experts = [_tensors(d) for d in world["experts"]]
    merged = _tensors(_output(world, job))
    grams = [
        _independent_grams(d, world["train"][n][1])
        for d, n in zip(world["experts"], NAMES, strict=True)
    ]
    for layer in range(2):
        name = QUERY.format(layer)
        w0 = base[name]
        taus = [e[f"bert.{name}"] - w0 for e in experts]
        tau_a = 0.5 * sum(taus)
        g = [gr[layer] for gr in grams]
        precision = sum(g)
        lam = rho * np.trace(precision) / w0.shape[1]
        evidence = sum((t - tau_a) @ gt for t, gt in zip(taus, g, strict=True))
        tau = tau_a + np.linalg.solve(precision + lam * np.eye(w0.shape[1]), evidence.T).T
        np.testing.assert_allclose(merged[name], w0 + scale * tau, rtol=2e-4, atol=2e-5)
    card = (_output(world, job) / "README.md").read_text()
    assert "## Tuning" in card and f"(#{best['index']})" in card


def test_another_tenants_dataset_is_not_found(world: dict[str, Any]) -> None:
    other = world["stack"].crucible("keys", "create", "--tenant", "other").strip()
    client = world["stack"].client(other)
    ds = world["train"][NAMES[0]][0]
    assert client.get(f"/v1/datasets/{ds}").status_code == 404
    spec = {
        "base": {"uri": world["base"].as_uri()},
        "experts": [{"uri": world["experts"][0].as_uri(), "name": "a", "dataset": ds}],
        "method": {"name": "regmean"},
    }
    resp = client.post("/v1/merges", json=spec)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "dataset_not_found"
