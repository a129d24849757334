"""Low-rank factorizations of merged deltas, for LoRA outputs (merge-math.md section 11).

A merged ΔW (d_out x d_in, nn.Linear layout) becomes LoRA factors by a truncated SVD
ΔW ≈ U_r S_r V_r^T, split balanced: B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T, with
lora_alpha = r so that PEFT's scaling is 1. The relative Frobenius error of the truncation,
||ΔW - B A||_F / ||ΔW||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2), comes from the spectrum.

A linear combination sum_t c_t B_t A_t of LoRA deltas is factored without forming
d_out x d_in: with B^ = [c_1 B_1 ... c_T B_T] = Q_b R_b and A^^T = [A_1; ...; A_T]^T = Q_a R_a
(thin QR), the core R_b R_a^T is only R x R (R = sum_t r_t), and its SVD U S V^T gives
ΔW = (Q_b U) S (Q_a V)^T exactly: the same singular values and vectors as the dense SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from crucible.methods.linalg import thin_svd


@dataclass
class Spectrum:
    """ΔW = u diag(s) v^T with s descending: u (d_out x k), s (k), v (d_in x k)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def dense_spectrum(delta: torch.Tensor) -> Spectrum:
    u, s, vh = thin_svd(delta)
    return Spectrum(u=u, s=s, v=vh.T)


def lowrank_spectrum(
    bs: list[torch.Tensor], as_: list[torch.Tensor], coefs: list[float]
) -> Spectrum:
    """The SVD of sum_t coefs[t] B_t A_t through QR of the stacked factors."""
    b_hat = torch.cat([c * b for c, b in zip(coefs, bs, strict=True)], dim=1)
    a_hat = torch.cat(as_, dim=0)
    q_b, r_b = torch.linalg.qr(b_hat, mode="reduced")
    q_a, r_a = torch.linalg.qr(a_hat.T, mode="reduced")
    u, s, vh = thin_svd(r_b @ r_a.T)
    return Spectrum(u=q_b @ u, s=s, v=q_a @ vh.T)


def choose_rank(s: torch.Tensor, rank: int | Literal["auto"], energy: float, max_rank: int) -> int:
    """A fixed rank (at most `max_rank` = min(d_out, d_in): the same for the dense and the
    low-rank spectrum, which is shorter), or the smallest keeping `energy` of sum s^2.
    At least 1, so every targeted module stays in the adapter."""
    full = int(s.numel())
    if rank != "auto":
        return max(1, min(int(rank), max_rank))
    squares = s.double().pow(2)
    total = float(squares.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # The first index whose cumulative share reaches `energy` (float slack for energy = 1).
    reached = torch.nonzero(kept >= energy - 1e-12)
    return max(1, int(reached[0]) + 1) if reached.numel() else full


def truncation_error(s: torch.Tensor, rank: int) -> float:
    squares = s.double().pow(2)
    total = float(squares.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float(squares[rank:].sum()), 0.0) / total)


def balanced_factors(spec: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the rank-`rank` truncation; B = U S^1/2, A = S^1/2 V^T. Ranks past
    the spectrum's length are padded with zero columns (a fixed rank above the module's)."""
    k = min(rank, int(spec.s.numel()))
    root = spec.s[:k].clamp_min(0).sqrt()
    b = spec.u[:, :k] * root
    a = (spec.v[:, :k] * root).T
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b.contiguous(), a.contiguous()
