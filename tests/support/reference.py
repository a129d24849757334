"""Independent float64 (numpy) computations of the merge formulas, for checking outputs.

Written from merge-math.md and mergekit's documented semantics, not from crucible's code.
"""

from __future__ import annotations

import numpy as np


def magnitude_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keep the max(1, int(density * n)) entries of largest magnitude (per tensor)."""
    if density >= 1:
        return tau.copy()
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.size))
    out = np.zeros_like(flat)
    if k > 0:
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        out[keep] = flat[keep]
    return out.reshape(tau.shape)


def ties_reference(
    base: np.ndarray,
    experts: list[np.ndarray],
    weights: list[float],
    density: float,
    scale: float = 1.0,
    normalize: bool = True,
) -> np.ndarray:
    """TIES with per-tensor trim, mass-weighted sign election, disjoint (weighted) mean."""
    base = base.astype(np.float64)
    merged = np.zeros_like(base)
    divisor = np.zeros_like(base)
    trimmed = [
        w * magnitude_trim(e.astype(np.float64) - base, density)
        for e, w in zip(experts, weights, strict=True)
    ]
    total = sum(trimmed)
    elected = np.where(total >= 0, 1.0, -1.0)
    for delta, w in zip(trimmed, weights, strict=True):
        agree = np.sign(delta) == elected
        merged += np.where(agree, delta, 0.0)
        divisor += np.where(agree, w, 0.0)
    if normalize:
        divisor[divisor == 0] = 1.0
        merged = merged / divisor
    return base + scale * merged
