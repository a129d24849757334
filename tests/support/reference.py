"""Independent float64 (numpy, explicit loops) computations of the merge formulas, for
checking outputs. Written from merge-math.md and mergekit's documented semantics, not from
crucible's code: the formula tests, the blockwise tests and the e2e test all check against
these."""

from __future__ import annotations

import numpy as np


def ref_linear(experts: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    acc = np.zeros_like(experts[0])
    for expert, w in zip(experts, weights, strict=True):
        acc = acc + w * expert
    if normalize:
        acc = acc / sum(weights)
    return acc


def ref_task_arithmetic(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    scale: float,
    normalize: bool,
) -> np.ndarray:
    acc = np.zeros_like(base)
    for expert, w in zip(experts, weights, strict=True):
        acc = acc + w * (expert - base)
    total = sum(weights)
    if normalize and abs(total) >= 1e-8:  # mergekit skips dividing by a ~zero weight sum
        acc = acc / total
    return base + scale * acc


def ref_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = max(1, int(density * n)) largest |tau|; ties at the cut go to the lower
    flat index."""
    flat = tau.reshape(-1)
    if density >= 1:
        return tau.copy()
    k = max(1, int(density * flat.size))
    order = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))
    out = np.zeros_like(flat)
    for i in order[:k]:
        out[i] = flat[i]
    return out.reshape(tau.shape)


def ref_elect_merge(
    base: np.ndarray,
    deltas: list[np.ndarray],
    weights: list[float],
    majority_sign: str,
    normalize: bool,
    scale: float,
) -> np.ndarray:
    """TIES steps 2-5 (weight, elect, disjoint merge, scale), one coordinate at a time."""
    flat_base = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    out = np.empty_like(flat_base)
    for j in range(flat_base.size):
        values = [w * d[j] for d, w in zip(flat, weights, strict=True)]
        if majority_sign == "total":
            elected = 1.0 if sum(values) >= 0 else -1.0
        else:
            positives = sum(1 for v in values if v > 0)
            negatives = sum(1 for v in values if v < 0)
            elected = 1.0 if positives >= negatives else -1.0
        agreeing = [t for t, v in enumerate(values) if np.sign(v) == elected]
        merged = sum(values[t] for t in agreeing)
        if normalize:
            divisor = sum(weights[t] for t in agreeing)
            merged = merged / (divisor if divisor != 0 else 1.0)
        out[j] = flat_base[j] + scale * merged
    return out.reshape(base.shape)


def ref_ties(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    density: float,
    majority_sign: str,
    normalize: bool,
    scale: float,
) -> np.ndarray:
    trimmed = [ref_trim(e - base, density) for e in experts]
    return ref_elect_merge(base, trimmed, weights, majority_sign, normalize, scale)


def ref_outlier_trim(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit's magnitude_outliers as its docstring and merge-math section 4 state it:
    n = int(density * N) survive, n_top = int(gamma * N), n_bot = max(0, N - n - n_top);
    in ascending order of |tau| the entries at positions n_bot .. n_bot + n - 1 survive.
    Equal magnitudes rank the higher flat index as smaller (so, from the top, the lower
    index first, as ref_trim)."""
    if density >= 1:
        return tau.copy()
    flat = tau.reshape(-1)
    size = flat.size
    n = int(density * size)
    n_top = int(gamma * size)
    n_bot = max(0, size - n - n_top)
    ascending = sorted(range(size), key=lambda i: (abs(flat[i]), -i))
    out = np.zeros_like(flat)
    for i in ascending[n_bot : n_bot + n]:
        out[i] = flat[i]
    return out.reshape(tau.shape)


def ref_breadcrumbs(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    density: float,
    gamma: float,
    normalize: bool,
    scale: float,
) -> np.ndarray:
    """Sparsify each task vector (ref_outlier_trim), then task arithmetic, coordinate by
    coordinate: W0 + scale * sum_t w_t delta_t [/ sum_t w_t unless that is below 1e-8]."""
    deltas = [ref_outlier_trim(e - base, density, gamma).reshape(-1) for e in experts]
    flat_base = base.reshape(-1)
    total = sum(weights)
    out = np.empty_like(flat_base)
    for j in range(flat_base.size):
        merged = 0.0
        for d, w in zip(deltas, weights, strict=True):
            merged += w * d[j]
        if normalize and abs(total) >= 1e-8:
            merged /= total
        out[j] = flat_base[j] + scale * merged
    return out.reshape(base.shape)


def ref_breadcrumbs_ties(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    density: float,
    gamma: float,
    majority_sign: str,
    normalize: bool,
    scale: float,
) -> np.ndarray:
    trimmed = [ref_outlier_trim(e - base, density, gamma) for e in experts]
    return ref_elect_merge(base, trimmed, weights, majority_sign, normalize, scale)
