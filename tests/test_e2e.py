"""End to end through real processes: uvicorn over HTTP, a Celery worker process, a job
store, and olah serving tiny GPT-2 models as the Hugging Face Hub.

Two stacks: production parts (PostgreSQL, Redis) and embedded defaults (SQLite,
kombu's filesystem broker). Each POSTs a TIES merge of a base and 3 experts, polls it to
`succeeded`, checks every output tensor against an independent float64 computation, and
loads the merged model with transformers for a forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tests.support.olah import OlahServer, hub_env
from tests.support.postgres import throwaway_postgres_url
from tests.support.redis_server import private_redis
from tests.support.reference import ref_ties
from tests.support.stack import Stack
from tests.support.tiny_models import make_gpt2_family

pytestmark = pytest.mark.e2e

ORG = "crucible-test"
TIES_PARAMS = {"density": 0.5, "scale": 1.0}
WEIGHTS = [1.0, 0.7, 0.4]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub")
    base_dir, expert_dirs = make_gpt2_family(root / "models", n_experts=3, seed=7)
    # A model whose MLP is wider: same names, mismatched shapes.
    wide_dir = root / "models" / "wide"
    wide_dir.mkdir()
    tensors = load_numpy(str(base_dir / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("mlp.c_fc.weight"))
    tensors = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 8)
    save_file(tensors, str(wide_dir / "model.safetensors"), metadata={"format": "pt"})
    (wide_dir / "config.json").write_text((base_dir / "config.json").read_text())
    corrupt_dir = root / "models" / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (corrupt_dir / "config.json").write_text((base_dir / "config.json").read_text())

    with OlahServer(root / "olah") as server:
        commits = {"base": server.add_repo(f"{ORG}/base", base_dir)}
        for i, d in enumerate(expert_dirs):
            commits[f"expert-{i}"] = server.add_repo(f"{ORG}/expert-{i}", d)
        commits["wide"] = server.add_repo(f"{ORG}/wide", wide_dir)
        commits["corrupt"] = server.add_repo(f"{ORG}/corrupt", corrupt_dir)
        yield {"server": server, "base": base_dir, "experts": expert_dirs, "commits": commits}


@pytest.fixture(scope="module", params=["postgres+redis", "embedded"])
def stack(
    request: pytest.FixtureRequest, hub: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    env = {
        **hub_env(hub["server"].endpoint, work / "hf-home"),
        "CRUCIBLE_DATA_DIR": str(work / "data"),
    }
    with _backing_services(request.param, work) as service_env:
        env.update(service_env)
        s = Stack(env, work / "logs").start()
        try:
            yield s
        finally:
            s.stop()


class _backing_services:
    """PostgreSQL + a private Redis for production mode; nothing for embedded mode."""

    def __init__(self, mode: str, work: Path) -> None:
        self.mode, self.work = mode, work
        self._cms: list[Any] = []

    def __enter__(self) -> dict[str, str]:
        if self.mode == "embedded":
            return {}
        pg, rd = throwaway_postgres_url(), private_redis(self.work / "redis")
        self._cms = [pg, rd]
        return {"CRUCIBLE_DATABASE_URL": pg.__enter__(), "CRUCIBLE_BROKER_URL": rd.__enter__()}

    def __exit__(self, *exc: object) -> None:
        for cm in reversed(self._cms):
            cm.__exit__(None, None, None)


def _ties_spec(
    base: str = "base",
    experts: tuple[str, ...] = ("expert-0", "expert-1", "expert-2"),
    revision: str = "main",
) -> dict[str, Any]:
    return {
        "base": {"uri": f"hf://{ORG}/{base}", "revision": revision},
        "experts": [
            {"uri": f"hf://{ORG}/{e}", "revision": "main", "name": e, "weight": w}
            for e, w in zip(experts, WEIGHTS, strict=False)
        ],
        "method": {"name": "ties", "params": TIES_PARAMS},
        "output": {"dtype": "float32", "shard_size": "200KB"},
    }


def test_ties_merge_end_to_end(stack: Stack, hub: dict[str, Any], tmp_path: Path) -> None:
    key = stack.crucible("keys", "create", "--tenant", "acme").strip()
    with stack.client(key) as client:
        resp = client.post("/v1/merges", json=_ties_spec(), headers={"Idempotency-Key": "e2e-1"})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert resp.json()["status"] == "queued"
        job = stack.wait_for_job(client, job_id)
        assert job["status"] == "succeeded", (job, stack.logs())
        assert job["progress"]["done"] == job["progress"]["total"] > 0
        commits = {i["name"] or "base": i["commit"] for i in job["result"]["inputs"]}
        assert commits == {k: v for k, v in hub["commits"].items() if k in commits}
        assert commits["base"] == hub["commits"]["base"]

        # Download every output file over HTTP and check its recorded sha256.
        out = tmp_path / "merged"
        out.mkdir()
        files = {f["path"]: f for f in job["result"]["files"]}
        assert "model.safetensors.index.json" in files, "200KB shards must give several files"
        for path, entry in files.items():
            r = client.get(f"/v1/merges/{job_id}/files/{path}")
            assert r.status_code == 200, (path, r.text)
            import hashlib

            assert hashlib.sha256(r.content).hexdigest() == entry["sha256"]
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_bytes(r.content)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_numpy(str(out / shard)))
    base = load_numpy(str(hub["base"] / "model.safetensors"))
    experts = [load_numpy(str(d / "model.safetensors")) for d in hub["experts"]]
    assert set(merged) == set(base)
    for name, w0 in base.items():
        expected = ref_ties(
            w0.astype(np.float64),
            [e[name].astype(np.float64) for e in experts],
            WEIGHTS,
            majority_sign="total",
            normalize=True,
            **TIES_PARAMS,
        )
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)

    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert (out / "README.md").read_text().count(hub["commits"]["expert-2"]) >= 1


@pytest.mark.parametrize(
    ("spec_change", "code", "needle"),
    [
        ({"base": "missing-model"}, "source_not_found", "missing-model"),
        ({"revision": "no-such-branch"}, "source_not_found", "no-such-branch"),
        ({"experts": ("expert-0", "wide")}, "incompatible_models", "mlp.c_fc.weight"),
        ({"experts": ("expert-0", "corrupt")}, "corrupt_safetensors", "model.safetensors"),
    ],
    ids=["missing-repo", "missing-revision", "mismatched-shapes", "corrupt-safetensors"],
)
def test_bad_sources_fail_the_job_with_a_code(
    stack: Stack, spec_change: dict[str, Any], code: str, needle: str
) -> None:
    key = stack.crucible("keys", "create", "--tenant", "bad-inputs").strip()
    with stack.client(key) as client:
        resp = client.post("/v1/merges", json=_ties_spec(**spec_change))
        assert resp.status_code == 202, resp.text
        job = stack.wait_for_job(client, resp.json()["id"], timeout=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == code, job["error"]
    assert needle in job["error"]["message"], job["error"]


BMM_PARAMS = {
    "anchor": "task_arithmetic",
    "anchor_params": {"scale": 0.5},
    "gram": "data_free",
    "rho": 0.5,
    "scale": 0.9,
    "alpha": 1.0,
    "ridge": 0.0,
}
CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def _ref_bmm_data_free(name: str, w0: np.ndarray, ws: list[np.ndarray]) -> np.ndarray:
    """BMM (merge-math.md section 10.3), data-free Grams, TA anchor, float64, written from
    the formula: G_t = tau_t^T tau_t / ||tau_t||_F^2, lambda = rho tr(sum G_t) / d_in,
    tau = (sum tau_t G_t + lambda tau_a)(sum G_t + lambda I)^-1, W = W0 + s tau. GPT-2
    Conv1D weights are (d_in, d_out): the formula applies to their transpose."""
    taus = [w.astype(np.float64) - w0.astype(np.float64) for w in ws]
    anchor = BMM_PARAMS["anchor_params"]["scale"] * sum(taus)
    if w0.ndim != 2:  # non-matrix tensors come from the anchor
        return w0 + anchor
    flip = name.endswith(CONV1D_SUFFIXES)
    if flip:
        taus, anchor = [t.T for t in taus], anchor.T
    grams = [t.T @ t / np.sum(t * t) for t in taus]
    d_in = taus[0].shape[1]
    lam = BMM_PARAMS["rho"] * np.trace(sum(grams)) / d_in
    lhs = sum(grams) + lam * np.eye(d_in)
    rhs = sum(t @ g for t, g in zip(taus, grams, strict=True)) + lam * anchor
    tau = np.linalg.solve(lhs.T, rhs.T).T  # rhs @ lhs^-1 without forming the inverse
    return w0 + BMM_PARAMS["scale"] * (tau.T if flip else tau)


def test_data_free_bmm_end_to_end(stack: Stack, hub: dict[str, Any], tmp_path: Path) -> None:
    """A data-free BMM job through the real service: every tensor against the float64
    formula (Conv1D orientation included), and the per-module report in the job."""
    spec = _ties_spec()
    for expert in spec["experts"]:
        expert["weight"] = 1.0
    spec["method"] = {"name": "bmm", "params": BMM_PARAMS}
    key = stack.crucible("keys", "create", "--tenant", "acme").strip()
    with stack.client(key) as client:
        resp = client.post("/v1/merges", json=spec)
        assert resp.status_code == 202, resp.text
        job = stack.wait_for_job(client, resp.json()["id"])
        assert job["status"] == "succeeded", (job, stack.logs())
        out = tmp_path / "merged"
        out.mkdir()
        for entry in job["result"]["files"]:
            r = client.get(f"/v1/merges/{job['id']}/files/{entry['path']}")
            assert r.status_code == 200, r.text
            (out / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            (out / entry["path"]).write_bytes(r.content)
    merged: dict[str, np.ndarray] = {}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_numpy(str(out / shard)))
    base = load_numpy(str(hub["base"] / "model.safetensors"))
    experts = [load_numpy(str(d / "model.safetensors")) for d in hub["experts"]]
    for name, w0 in base.items():
        expected = _ref_bmm_data_free(name, w0, [e[name] for e in experts])
        np.testing.assert_allclose(merged[name], expected, rtol=1e-4, atol=1e-5, err_msg=name)

    report = job["result"]["report"]
    assert report == json.loads((out / "merge_report.json").read_text())
    modules = {m["tensor"]: m for m in report["modules"]}
    matrices = [n for n, w in base.items() if w.ndim == 2]
    assert set(matrices) <= set(modules)
    c_fc = next(n for n in matrices if n.endswith("mlp.c_fc.weight"))
    assert modules[c_fc]["transposed"] is True and modules[c_fc]["dtype"] == "float64"
    assert report["summary"]["fallbacks"] == []
    assert "## Numerics" in (out / "README.md").read_text()
