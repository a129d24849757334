"""The merge stage end to end on disk: shape-mismatch policies, per-tensor overrides, the
GPT-2 Conv1D orientation of matrix methods, the merge report and the device setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file

from crucible.errors import CrucibleError
from crucible.methods.registry import METHODS
from crucible.pipeline import run_merge_job
from crucible.report import REPORT_FILE
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support.reporters import QuietReporter

RNG = np.random.default_rng(7)


def _model(folder: Path, tensors: dict[str, np.ndarray], model_type: str | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors")
    )
    if model_type:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"], **kw)


def _spec(base: Path, experts: list[Path], method: dict[str, Any], **kw: Any) -> MergeSpec:
    return MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri(), "name": f"e{i}"} for i, e in enumerate(experts)],
            "method": method,
            "output": {"dtype": "float32"},
            **kw,
        }
    )


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.fixture
def headed_family(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two experts fine-tuned from one base; expert 1 has a 5-class head, the base 3."""
    body = {"h.0.mlp.c_fc.weight": _f32(6, 4), "h.0.ln.bias": _f32(4)}
    base = _model(tmp_path / "models/base", {**body, "score.weight": _f32(3, 4)})
    experts = [
        _model(
            tmp_path / f"models/e{i}",
            {
                **{k: v + _f32(*v.shape) for k, v in body.items()},
                "score.weight": _f32(3 if i == 0 else 5, 4),
            },
        )
        for i in range(2)
    ]
    return base, experts


def test_shape_mismatch_fails_by_default_naming_the_tensor_and_the_policy(
    tmp_path: Path, headed_family: tuple[Path, list[Path]]
) -> None:
    base, experts = headed_family
    spec = _spec(base, experts, {"name": "task_arithmetic"})
    with pytest.raises(CrucibleError) as info:
        run_merge_job(spec, tmp_path / "out", _settings(tmp_path), QuietReporter())
    assert info.value.code == "incompatible_models"
    assert "score.weight" in info.value.message and "shape_mismatch" in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy", ["base", "keep_per_expert"])
def test_shape_mismatch_policies_keep_the_base_and_never_average(
    tmp_path: Path, headed_family: tuple[Path, list[Path]], policy: str
) -> None:
    base, experts = headed_family
    spec = _spec(base, experts, {"name": "task_arithmetic"}, shape_mismatch=policy)
    outcome = run_merge_job(spec, tmp_path / "out", _settings(tmp_path), QuietReporter())
    out = load_file(str(outcome.output_dir / "model.safetensors"))
    w0 = load_file(str(base / "model.safetensors"))
    ws = [load_file(str(e / "model.safetensors")) for e in experts]
    np.testing.assert_array_equal(out["score.weight"], w0["score.weight"])
    for name in ("h.0.mlp.c_fc.weight", "h.0.ln.bias"):  # the rest is merged as usual
        expected = w0[name] + (ws[0][name] - w0[name]) + (ws[1][name] - w0[name])
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-6)
    report = json.loads((outcome.output_dir / REPORT_FILE).read_text())
    assert report["shape_mismatch"] == {"policy": policy, "tensors": {"score.weight": ["e1"]}}
    assert outcome.report is not None and outcome.report["shape_mismatch"]["policy"] == policy
    per_expert = outcome.output_dir / "per_expert"
    if policy == "base":
        assert not per_expert.exists()
    else:
        # Only the expert whose head differs gets a file, holding its own head unchanged.
        assert sorted(p.name for p in per_expert.iterdir()) == ["1-e1"]
        kept = load_file(str(per_expert / "1-e1" / "model.safetensors"))
        assert set(kept) == {"score.weight"}
        np.testing.assert_array_equal(kept["score.weight"], ws[1]["score.weight"])
        assert "per_expert/1-e1/model.safetensors" in {f["path"] for f in outcome.files}


def test_per_tensor_overrides_reach_each_tensor(tmp_path: Path) -> None:
    """scale by rule (mlp tensors 0, the rest 1) and a layer gradient (0 -> 1 over 3 layers)."""
    names = [f"h.{i}.{part}" for i in range(3) for part in ("mlp.w", "attn.w")] + ["wte.weight"]
    base = _model(tmp_path / "models/base", {n: _f32(4, 3) for n in names})
    w0 = load_file(str(base / "model.safetensors"))
    expert = _model(tmp_path / "models/e0", {n: w0[n] + _f32(4, 3) for n in names})
    w1 = load_file(str(expert / "model.safetensors"))
    settings = _settings(tmp_path)

    rules = {"scale": [{"filter": "*.mlp.*", "value": 0.0}, {"filter": "re:^h\\.", "value": 1}]}
    spec = _spec(base, [expert], {"name": "task_arithmetic", "params": rules})
    out = load_file(
        str(
            run_merge_job(spec, tmp_path / "a", settings, QuietReporter()).output_dir
            / "model.safetensors"
        )
    )
    for n in names:
        expected = {"mlp.w": 0.0, "attn.w": 1.0}.get(n.split(".", 2)[-1], 1.0)  # wte: default
        np.testing.assert_allclose(out[n], w0[n] + expected * (w1[n] - w0[n]), rtol=1e-6, atol=1e-6)

    gradient = {"scale": [0.0, 1.0]}
    spec = _spec(base, [expert], {"name": "task_arithmetic", "params": gradient})
    out = load_file(
        str(
            run_merge_job(spec, tmp_path / "b", settings, QuietReporter()).output_dir
            / "model.safetensors"
        )
    )
    for n in names:
        layer = {"h.0": 0.0, "h.1": 0.5, "h.2": 1.0}.get(n[:3], 0.0)  # embeddings at t = 0
        np.testing.assert_allclose(out[n], w0[n] + layer * (w1[n] - w0[n]), rtol=1e-6, atol=1e-6)


def test_regmean_on_gpt2_conv1d_weights_works_in_linear_layout(tmp_path: Path) -> None:
    """GPT-2 stores c_fc as Conv1D (d_in x d_out). RegMean's Gram is over the d_in inputs, so
    the merge must happen on the transpose and be transposed back (merge-math.md section 0).
    The expected value is the float64 formula in nn.Linear layout; treating the stored matrix
    as Linear would need a d_out x d_out Gram and is refused by the shape check."""
    d_in, d_out, t = 4, 6, 2
    name = "h.0.mlp.c_fc.weight"
    stored0 = _f32(d_in, d_out)
    base = _model(tmp_path / "models/base", {name: stored0, "h.0.ln.bias": _f32(d_in)}, "gpt2")
    experts, grams = [], []
    for i in range(t):
        experts.append(
            _model(
                tmp_path / f"models/e{i}",
                {name: stored0 + _f32(d_in, d_out), "h.0.ln.bias": _f32(d_in)},
                "gpt2",
            )
        )
        x = RNG.standard_normal((32, d_in))
        gram = (x.T @ x / 32).astype(np.float32)
        grams.append(_model(tmp_path / f"models/g{i}", {name: gram}))
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "grams": {"uri": g.as_uri()}}
                for e, g in zip(experts, grams, strict=True)
            ],
            "method": {"name": "regmean", "params": {"alpha": 1.0, "ridge": 0.0}},
            "output": {"dtype": "float32"},
        }
    )
    outcome = run_merge_job(spec, tmp_path / "out", _settings(tmp_path), QuietReporter())
    out = load_file(str(outcome.output_dir / "model.safetensors"))
    lin = [load_file(str(e / "model.safetensors"))[name].astype(np.float64).T for e in experts]
    g = [load_file(str(p / "model.safetensors"))[name].astype(np.float64) for p in grams]
    expected_linear = sum(w @ gi for w, gi in zip(lin, g, strict=True)) @ np.linalg.inv(sum(g))
    np.testing.assert_allclose(out[name], expected_linear.T, rtol=1e-5, atol=1e-5)
    module = next(m for m in outcome.report["modules"] if m["tensor"] == name)
    assert module["transposed"] is True and module["solve"] == "cholesky"
    assert module["dtype"] == "float64"
    # A Gram of the wrong size is a clear failure, not a broadcast.
    bad = _model(tmp_path / "models/bad", {name: np.eye(d_out, dtype=np.float32)})
    spec2 = spec.model_copy(deep=True)
    spec2.experts[0].grams = spec2.experts[0].grams.model_copy(update={"uri": bad.as_uri()})
    with pytest.raises(CrucibleError) as info:
        run_merge_job(spec2, tmp_path / "out2", _settings(tmp_path), QuietReporter())
    assert info.value.code == "bad_grams" and f"[{d_in}, {d_in}]" in info.value.message


def test_device_setting(tmp_path: Path, headed_family: tuple[Path, list[Path]]) -> None:
    import torch

    with pytest.raises(ValidationError):
        Settings(device="tpu")
    base, experts = headed_family
    spec = _spec(base, experts, {"name": "task_arithmetic"}, shape_mismatch="base")
    auto = run_merge_job(spec, tmp_path / "a", _settings(tmp_path, device="auto"), QuietReporter())
    cpu = run_merge_job(spec, tmp_path / "c", _settings(tmp_path, device="cpu"), QuietReporter())
    assert cpu.metrics["device"] == "cpu" and cpu.report is not None
    if torch.cuda.is_available():  # a GPU worker: auto takes it, and agrees with the CPU
        assert auto.metrics["device"].startswith("cuda")
        a = load_file(str(auto.output_dir / "model.safetensors"))
        c = load_file(str(cpu.output_dir / "model.safetensors"))
        for name in c:
            np.testing.assert_allclose(a[name], c[name], rtol=1e-6, atol=1e-6)
    else:  # no GPU: auto falls back to the CPU, and an explicit cuda is a clear failure
        assert auto.metrics["device"] == "cpu"
        with pytest.raises(CrucibleError) as info:
            run_merge_job(spec, tmp_path / "g", _settings(tmp_path, device="cuda"), QuietReporter())
        assert info.value.code == "device_unavailable"


def _method_context(name: str, dtype: Any, device: Any) -> Any:
    import torch

    from crucible.methods.base import TensorContext

    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    experts = [base + 0.1 * torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(40, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x / 40 for x in xs]
    return TensorContext(
        name=name,
        base=base.to(device=device, dtype=dtype),
        experts=[e.to(device=device, dtype=dtype) for e in experts],
        weights=[1.0, 0.8, 0.6],
        grams=[gm.to(device=device, dtype=dtype) for gm in grams],
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_the_compute_device(method: str) -> None:
    """Each method on the worker's compute device (CUDA where this machine has a GPU, the
    CPU otherwise) returns a tensor on that device, in the input dtype, equal to the CPU
    float64 result; float32 inputs stay float32."""
    import torch

    from crucible.device import compute_device
    from crucible.methods.registry import get_method

    info = get_method(method)
    params = info.params()
    device = compute_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    reference = info.merge(_method_context("h.0.mlp.w", torch.float64, "cpu"), params)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        out = info.merge(_method_context("h.0.mlp.w", dtype, device), params)
        assert out.device.type == device.type and out.dtype == dtype
        np.testing.assert_allclose(
            out.cpu().double().numpy(), reference.numpy(), rtol=tol, atol=tol, err_msg=method
        )


def test_prefixed_classifier_experts_merge_by_base_names_and_keep_their_heads(
    tmp_path: Path,
) -> None:
    """Experts saved from *ForSequenceClassification (`bert.` prefix, a `classifier` head of
    their own size) merge with a base saved from AutoModel: shared tensors by the base's
    names, each head written untouched to per_expert/ with the expert's config.json."""
    body = {"encoder.layer.0.dense.weight": _f32(6, 4), "embeddings.norm.bias": _f32(4)}
    base = _model(tmp_path / "models/base", body)
    experts, heads = [], []
    for i, classes in enumerate((2, 3)):
        head = {"classifier.weight": _f32(classes, 4), "classifier.bias": _f32(classes)}
        tensors = {f"bert.{k}": v + _f32(*v.shape) for k, v in body.items()}
        experts.append(_model(tmp_path / f"models/e{i}", {**tensors, **head}, "bert"))
        heads.append(head)
    spec = _spec(base, experts, {"name": "task_arithmetic", "params": {"scale": 0.5}})
    out = tmp_path / "out"
    run_merge_job(spec, out, _settings(tmp_path), QuietReporter())
    merged = load_file(str(out / "model.safetensors"))
    assert sorted(merged) == sorted(body)
    for name, w0 in body.items():
        taus = [load_file(str(e / "model.safetensors"))[f"bert.{name}"] - w0 for e in experts]
        want = w0.astype(np.float64) + 0.5 * sum(t.astype(np.float64) for t in taus)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
    for i, head in enumerate(heads):
        folder = out / "per_expert" / f"{i}-e{i}"
        kept = load_file(str(folder / "model.safetensors"))
        assert sorted(kept) == sorted(head)
        for name, value in head.items():
            np.testing.assert_array_equal(kept[name], value)
        assert json.loads((folder / "config.json").read_text()) == {"model_type": "bert"}


def test_an_unrelated_expert_is_still_refused(tmp_path: Path) -> None:
    base = _model(tmp_path / "models/base", {"a.weight": _f32(2, 2), "b.weight": _f32(2, 2)})
    other = _model(tmp_path / "models/e0", {"x.a.weight": _f32(2, 2), "y.weight": _f32(2, 2)})
    spec = _spec(base, [other], {"name": "linear"})
    with pytest.raises(CrucibleError) as err:
        run_merge_job(spec, tmp_path / "out", _settings(tmp_path), QuietReporter())
    assert err.value.code == "incompatible_models"
    assert "'b.weight' is present in the base, missing in the expert" in err.value.message
