"""DARE's random drop: unbiasedness, kept fraction, reproducibility, independence of masks,
and dare_linear / dare_ties against the float64 formulas given the same masks.

The mask recipe is re-derived here from its documentation (dare_linear.py): numpy's PCG64
seeded with tensor_seed(seed, tensor name, expert index), its 64-bit outputs split into 32-bit
words low word first, keep where word < round(density * 2**32). Changing that recipe changes
every past job's output, so it is pinned (it changed once, on 2026-11-24, from torch.rand
float32 uniforms, for speed).

Statistical bounds are derived, not tuned: every check below holds with probability
>= 1 - 1e-6 under the stated distribution, and seeds are fixed, so the test is deterministic.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import torch

from crucible.methods import dare_linear
from crucible.methods.base import TensorContext, tensor_seed
from crucible.methods.registry import METHODS
from tests.support.reference import ref_elect_merge

ALPHA = 1e-6  # family-wise false-alarm probability of each statistical check


def z_two_sided(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


def documented_mask(
    shape: tuple[int, ...], density: float, seed: int, name: str, i: int
) -> np.ndarray:
    n = math.prod(shape)
    outputs = np.random.Generator(np.random.PCG64(tensor_seed(seed, name, i))).integers(
        0, 2**64, size=(n + 1) // 2, dtype=np.uint64, endpoint=False
    )
    low = (outputs & np.uint64(0xFFFFFFFF)).astype(np.uint64)
    high = outputs >> np.uint64(32)
    words = np.stack([low, high], axis=1).reshape(-1)[:n]
    return (words < np.uint64(round(density * 2**32))).reshape(shape)


def merge(method: str, ctx: TensorContext, **params: Any) -> torch.Tensor:
    info = METHODS[method]
    return info.merge(ctx, info.params(**params))


def kept_mask(tau: torch.Tensor, density: float, seed: int, name: str) -> np.ndarray:
    """The mask dare_linear applied, read off its output: base 0, one expert tau (no zeros),
    rescale off, so output = mask * tau exactly."""
    ctx = TensorContext(name, torch.zeros_like(tau), [tau], [1.0])
    out = merge("dare_linear", ctx, density=density, rescale=False, seed=seed)
    assert torch.equal(out[out != 0], tau[out != 0])  # kept entries are tau, untouched
    return (out != 0).numpy()


def nonzero_tau(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    magnitudes = rng.uniform(0.5, 2.0, size=n)
    return torch.from_numpy(magnitudes * rng.choice([-1.0, 1.0], size=n)).to(dtype)


# --- kept fraction -------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_binomial(density: float) -> None:
    n = 20_000
    tau = nonzero_tau(n)
    kept = int(kept_mask(tau, density, seed=0, name="w").sum())
    # kept ~ Binomial(n, density): within z * sd of n * density (normal approximation; n d
    # and n (1 - d) are both >= 2000).
    bound = z_two_sided(ALPHA) * math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) <= bound, (kept, n * density, bound)


def test_mask_is_the_documented_recipe() -> None:
    tau = nonzero_tau(3000)
    for seed, name in [(0, "w"), (7, "model.layers.0.mlp.down_proj.weight")]:
        expected = documented_mask((3000,), 0.3, seed, name, 0)
        np.testing.assert_array_equal(kept_mask(tau, 0.3, seed, name), expected)
        np.testing.assert_array_equal(
            dare_linear.dare_mask((3000,), 0.3, seed, name, 0).numpy(), expected
        )


# --- unbiasedness --------------------------------------------------------------------------------


def _bias_z_scores(rescale: bool, density: float, seeds: int, n: int) -> np.ndarray:
    """Per entry, (mean over seeds of the DARE'd tau - tau) / (its sd if DARE is unbiased).

    With rescale, each draw is tau * m / d, m ~ Bernoulli(d): mean tau, variance
    tau^2 (1 - d) / d, so the mean of S draws has sd |tau| sqrt((1 - d) / (d S)). Dividing
    by tau itself rather than |tau| keeps z ~ N(0, 1) under no bias, and turns a
    multiplicative bias (mean c * tau) into the same sign in every entry."""
    tau = nonzero_tau(n, seed=1)
    base = torch.zeros_like(tau)
    total = torch.zeros_like(tau)
    for seed in range(seeds):
        ctx = TensorContext("w", base, [tau], [1.0])
        total += merge("dare_linear", ctx, density=density, rescale=rescale, seed=seed)
    mean = (total / seeds).numpy()
    t = tau.numpy()
    sd = t * math.sqrt((1 - density) / (density * seeds))
    return (mean - t) / sd


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_is_unbiased(density: float) -> None:
    n, seeds = 400, 400
    z = _bias_z_scores(rescale=True, density=density, seeds=seeds, n=n)
    # Each entry: |z| <= z*(ALPHA / n) (Bonferroni over n entries; S d >= 120 draws per
    # entry make the normal approximation adequate at this depth).
    assert np.abs(z).max() <= z_two_sided(ALPHA / n)
    # All entries together: entries are independent, so sum(z) / sqrt(n) ~ N(0, 1); a
    # systematic bias of only 0.25 sd per entry would push it to 5 sd.
    assert abs(z.sum() / math.sqrt(n)) <= z_two_sided(ALPHA)


def test_unbiasedness_check_detects_a_bias() -> None:
    """The same check on DARE without rescaling (mean d * tau, biased) must fail: the
    statistic above has the power to see a missing 1/density."""
    n, seeds, density = 400, 400, 0.7
    z = _bias_z_scores(rescale=False, density=density, seeds=seeds, n=n)
    assert abs(z.sum() / math.sqrt(n)) > 10 * z_two_sided(ALPHA)


# --- reproducibility and independence ------------------------------------------------------------


def test_same_seed_same_output_whatever_the_global_rng_and_order() -> None:
    rng = np.random.default_rng(2)
    tensors = {name: rng.normal(size=(30, 20)) for name in ("a.weight", "b.weight", "c.bias")}

    def merge_all(order: list[str], torch_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(torch_seed)
        out = {}
        for name in order:
            base = torch.from_numpy(tensors[name])
            experts = [base + 0.1, base - 0.2 * base]
            ctx = TensorContext(name, base, experts, [0.6, 0.8])
            out[name] = merge("dare_ties", ctx, density=0.4, seed=11)
        return out

    first = merge_all(["a.weight", "b.weight", "c.bias"], torch_seed=0)
    again = merge_all(["c.bias", "a.weight", "b.weight"], torch_seed=12345)
    for name in tensors:
        assert torch.equal(first[name], again[name]), name
    # The methods draw from their own generators: the global RNG is not consumed.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    merge_all(["a.weight"], torch_seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_mask_independent_of_dtype() -> None:
    tau64 = nonzero_tau(5000)
    ctx64 = TensorContext("w", torch.zeros_like(tau64), [tau64], [1.0])
    ctx32 = TensorContext("w", torch.zeros(5000), [tau64.float()], [1.0])
    out64 = merge("dare_linear", ctx64, density=0.5, seed=3)
    out32 = merge("dare_linear", ctx32, density=0.5, seed=3)
    np.testing.assert_array_equal((out64 != 0).numpy(), (out32 != 0).numpy())


def _assert_independent(a: np.ndarray, b: np.ndarray, density: float) -> None:
    """Two independent Bernoulli(d) masks disagree at each entry with probability
    2 d (1 - d); identical or correlated masks would fall far outside the binomial bound."""
    n = a.size
    p = 2 * density * (1 - density)
    disagree = int((a != b).sum())
    assert abs(disagree - n * p) <= z_two_sided(ALPHA) * math.sqrt(n * p * (1 - p)), disagree


def test_masks_differ_across_seed_tensor_name_and_expert() -> None:
    n, density = 10_000, 0.5
    tau = nonzero_tau(n)
    reference = kept_mask(tau, density, seed=0, name="layer.0.weight")
    _assert_independent(reference, kept_mask(tau, density, seed=1, name="layer.0.weight"), density)
    _assert_independent(reference, kept_mask(tau, density, seed=0, name="layer.1.weight"), density)

    # Expert index: the same task vector in position 0 or 1 of one context.
    zero = torch.zeros_like(tau)
    as_first = merge(
        "dare_linear",
        TensorContext("layer.0.weight", zero, [tau, zero], [1.0, 1.0]),
        density=density,
        rescale=False,
    )
    as_second = merge(
        "dare_linear",
        TensorContext("layer.0.weight", zero, [zero, tau], [1.0, 1.0]),
        density=density,
        rescale=False,
    )
    np.testing.assert_array_equal((as_first != 0).numpy(), reference)
    _assert_independent((as_first != 0).numpy(), (as_second != 0).numpy(), density)


def test_density_one_drops_nothing() -> None:
    rng = np.random.default_rng(4)
    base = torch.from_numpy(rng.normal(size=(8, 9)))
    experts = [base + torch.from_numpy(rng.normal(size=(8, 9))) for _ in range(3)]
    ctx = TensorContext("w", base, experts, [0.5, 1.0, 0.2])
    assert torch.equal(
        merge("dare_linear", ctx, density=1.0, scale=0.4),
        merge("task_arithmetic", ctx, scale=0.4),
    )
    assert torch.equal(
        merge("dare_ties", ctx, density=1.0, normalize=True),
        merge("ties", ctx, density=1.0),
    )


# --- formulas given the masks --------------------------------------------------------------------

SHAPES = [(), (9,), (6, 5), (2, 3, 4)]
WEIGHTS = [0.8, -0.3, 1.1]


def _inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(5)
    base = np.asarray(rng.normal(size=shape))
    return base, [np.asarray(base + 0.1 * rng.normal(size=shape)) for _ in WEIGHTS]


def _dropped(
    base: np.ndarray, experts: list[np.ndarray], density: float, rescale: bool, seed: int
) -> list[np.ndarray]:
    out = []
    for i, expert in enumerate(experts):
        mask = documented_mask(base.shape, density, seed, "blk.w", i)
        tau = np.where(mask, expert - base, 0.0)
        out.append(tau / density if rescale else tau)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_dare_linear_formula(shape: tuple[int, ...], rescale: bool, normalize: bool) -> None:
    base, experts = _inputs(shape)
    ctx = TensorContext(
        "blk.w", torch.from_numpy(base), [torch.from_numpy(e) for e in experts], WEIGHTS
    )
    params = {"density": 0.4, "rescale": rescale, "seed": 9, "normalize": normalize}
    out = merge("dare_linear", ctx, scale=0.6, **params).numpy()
    acc = np.zeros_like(base)
    for tau, w in zip(_dropped(base, experts, 0.4, rescale, 9), WEIGHTS, strict=True):
        acc = acc + w * tau
    if normalize:
        acc = acc / sum(WEIGHTS)
    np.testing.assert_allclose(out, base + 0.6 * acc, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("majority_sign", ["total", "count"])
def test_dare_ties_formula(
    shape: tuple[int, ...], rescale: bool, normalize: bool, majority_sign: str
) -> None:
    base, experts = _inputs(shape)
    ctx = TensorContext(
        "blk.w", torch.from_numpy(base), [torch.from_numpy(e) for e in experts], WEIGHTS
    )
    params = {
        "density": 0.4,
        "rescale": rescale,
        "seed": 9,
        "normalize": normalize,
        "majority_sign": majority_sign,
    }
    out = merge("dare_ties", ctx, scale=0.6, **params).numpy()
    # No magnitude trim in dare_ties: the random drop replaces it (mergekit).
    deltas = _dropped(base, experts, 0.4, rescale, 9)
    expected = ref_elect_merge(base, deltas, WEIGHTS, majority_sign, normalize, 0.6)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rescale", [True, False])
def test_the_drop_keeps_every_kept_entrys_bits_and_zeroes_the_rest(
    dtype: torch.dtype, rescale: bool
) -> None:
    """dare_drop is where(keep, tau (/ density), +0.0) bit for bit: kept NaN, infinities and
    -0.0 stay as they are, dropped ones (NaN included) become +0.0, and tau is left alone."""
    special = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.5, -2.25]
    n = 4000
    values = torch.tensor([special[i % len(special)] for i in range(n)], dtype=dtype)
    tau = values.clone()
    keep = torch.from_numpy(documented_mask((n,), 0.5, 3, "blk.w", 1))
    assert 0 < int(keep.sum()) < n
    out = dare_linear.dare_drop(tau, 0.5, rescale, 3, "blk.w", 1)
    scaled = values / 0.5 if rescale else values
    expected = torch.where(keep, scaled, torch.zeros((), dtype=dtype))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    assert torch.equal(out.view(ints), expected.view(ints))
    assert torch.equal(tau.view(ints), values.view(ints))  # the input is not modified
