"""Blockwise TIES: a large tensor is trimmed at each whole task vector's magnitude cut and
merged in blocks of rows; the result must equal the whole-tensor method exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

import crucible.engine as engine
import crucible.pipeline as pipeline
from crucible.methods import ties
from crucible.settings import Settings
from crucible.spec import MergeSpec
from tests.support.reference import ref_ties
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family


def test_cut_applied_block_by_block_equals_the_whole_trim() -> None:
    """Many entries tie with the threshold, across block boundaries: exactly k survive, the
    first ones in flat order, as in the whole-tensor trim."""
    g = torch.Generator().manual_seed(1)
    tau = torch.randint(-3, 4, (40, 7), generator=g).to(torch.float32)
    for density in (0.05, 0.3, 0.5, 0.9):
        whole = ties.magnitude_trim(tau, density)
        cut = ties.magnitude_cut(tau, density)
        assert cut is not None and cut.room > 0, "the data must tie at the cut"
        blocks = [ties.apply_cut(tau[r : r + 6], cut) for r in range(0, 40, 6)]
        assert torch.equal(torch.cat(blocks), whole), density
        assert cut.room == 0


def test_pipeline_merges_ties_in_blocks_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=3, seed=11)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    assert len(engine.row_blocks((256, 64), blockwise=True)) > 1
    weights = [1.0, 0.5, 2.0]
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "weight": w} for e, w in zip(experts, weights, strict=True)
            ],
            "method": {"name": "ties", "params": {"density": 0.3, "scale": 0.8}},
            "output": {"dtype": "float32"},
        }
    )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    outcome = pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    merged = load_numpy(str(outcome.output_dir / "model.safetensors"))
    w0 = load_numpy(str(base / "model.safetensors"))
    ex = [load_numpy(str(e / "model.safetensors")) for e in experts]
    for name, w in w0.items():
        expected = ref_ties(
            w.astype(np.float64),
            [e[name].astype(np.float64) for e in ex],
            weights,
            density=0.3,
            majority_sign="total",
            normalize=True,
            scale=0.8,
        )
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_dare_masks_do_not_depend_on_the_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    from crucible.methods import dare_linear

    monkeypatch.setattr(dare_linear, "MASK_CHUNK_ELEMENTS", 50)
    shape = (37, 7)  # 7 rows per mask chunk
    whole = dare_linear.dare_mask(shape, 0.4, 3, "w", 1)
    for step in (1, 5, 7, 11, 37):
        parts = [
            dare_linear.dare_mask(shape, 0.4, 3, "w", 1, (r, min(37, r + step)))
            for r in range(0, 37, step)
        ]
        assert torch.equal(torch.cat(parts), whole), step
    assert 0.25 < float(whole.float().mean()) < 0.55
    other = dare_linear.dare_mask(shape, 0.4, 3, "w", 2)
    assert not torch.equal(other, whole)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "linear", "task_arithmetic"])
def test_pipeline_blocks_equal_the_whole_tensor_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    from crucible.methods import dare_linear
    from crucible.methods.base import TensorContext
    from crucible.methods.registry import get_method

    monkeypatch.setattr(dare_linear, "MASK_CHUNK_ELEMENTS", 300)
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=2, seed=5)
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [
                {"uri": e.as_uri(), "weight": w} for e, w in zip(experts, [0.9, 0.6], strict=True)
            ],
            "method": {"name": method},
            "output": {"dtype": "float32"},
        }
    )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)
    outcome = pipeline.run_merge_job(spec, tmp_path / "out", settings, QuietReporter())
    merged = load_numpy(str(outcome.output_dir / "model.safetensors"))
    w0 = load_numpy(str(base / "model.safetensors"))
    ex = [load_numpy(str(e / "model.safetensors")) for e in experts]
    info = get_method(method)
    blocked = 0
    for name, w in w0.items():
        blocked += len(engine.row_blocks(w.shape, True)) > 1
        ctx = TensorContext(
            name=name,
            base=torch.from_numpy(w),
            experts=[torch.from_numpy(e[name]) for e in ex],
            weights=[0.9, 0.6],
        )
        whole = info.merge(ctx, spec.method.params).numpy()
        np.testing.assert_array_equal(merged[name], whole, err_msg=name)
    assert blocked > 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_by_bisection_equals_kthvalue(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny limits: large-tensor paths (sample bracket, then bisection when it misses).
    monkeypatch.setattr(ties, "KTHVALUE_MAX", 3)
    monkeypatch.setattr(ties, "SAMPLE_SIZE", 64)
    g = torch.Generator().manual_seed(2)
    cases = [
        torch.randn(10_001, generator=g, dtype=dtype).abs(),
        torch.randint(0, 5, (999,), generator=g).to(dtype),  # many ties and zeros
        torch.zeros(17, dtype=dtype),
        torch.tensor([3e-39, 1e-45, 0.0, 7.0, float("inf")], dtype=dtype),  # subnormals, inf
    ]
    for mag in cases:
        n = mag.numel()
        for k in {1, 2, n // 3, n // 2, n - 1, n}:
            expected = float(torch.kthvalue(mag, n - k + 1).values)
            assert ties.kth_largest(mag, k) == expected, (n, k)
            assert ties.kth_largest(mag.reshape(-1, 1), k) == expected  # any shape
            assert ties._bisect(mag, k) == expected


def test_kth_largest_sample_bracket_finds_the_value_without_bisection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 50k entries, a 1-in-3 sample: the bracket holds a few thousand candidates.
    monkeypatch.setattr(ties, "KTHVALUE_MAX", 6000)
    monkeypatch.setattr(ties, "SAMPLE_SIZE", 16384)

    def no_bisect(flat: torch.Tensor, k: int) -> float:
        raise AssertionError("the sample bracket should have held the value")

    monkeypatch.setattr(ties, "_bisect", no_bisect)
    mag = torch.randn(50_000, generator=torch.Generator().manual_seed(4)).abs()
    for k in (1, 10, 5_000, 10_000, 25_000, 49_999, 50_000):
        assert ties.kth_largest(mag, k) == float(torch.kthvalue(mag, 50_000 - k + 1).values), k
