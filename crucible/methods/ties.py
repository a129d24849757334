"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Per-tensor semantics follow mergekit 0.1.5 `ties` (merge-math.md section 2, "Variants"):

1. Trim: per tensor and per expert, keep the k = max(1, int(density * numel)) entries of
   largest |tau_t| and zero the rest; density >= 1 keeps everything (mergekit skips pruning).
   Exactly k entries survive: entries tied with the k-th largest magnitude are kept in flat
   index order (mergekit's argsort breaks such ties arbitrarily; with real weights they do
   not occur at the cut).
2. Weight: delta_t = w_t * trimmed_t (the election sees weighted deltas, as in mergekit).
3. Elect: gamma = +1 where sum_t delta_t >= 0 ("total", the TIES rule), or where
   #positive >= #negative among the non-zero delta_t ("count"); -1 elsewhere. A zero total
   elects +1 (mergekit), not the sign of the global sum (FusionBench).
4. Disjoint merge: sum the delta_t whose sign equals gamma (zeros never agree); with
   `normalize`, divide by the sum of the agreeing experts' weights, a zero divisor counting
   as 1.
5. W = W0 + scale * merged.

Torch is imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from crucible.methods.base import MethodInfo, MethodParams, TensorContext, check_context

if TYPE_CHECKING:
    import torch

MajoritySign = Literal["total", "count"]

MAJORITY_SIGN_DESCRIPTION = (
    "Sign election per coordinate. 'total': the sign of the sum of the weighted deltas "
    "(TIES paper; mergekit's consensus 'sum', its default). 'count': the sign held by more "
    "of the non-zero weighted deltas (mergekit 'count'). Ties and zeros elect +."
)
NORMALIZE_DESCRIPTION = (
    "Divide the agreeing deltas' sum by the sum of their weights (the disjoint mean); a "
    "zero divisor counts as 1. "
)
SCALE_DESCRIPTION = (
    "lambda in W = W0 + lambda * merged. Default 1.0 as mergekit's `lambda` (paper: disjoint "
    "mean with lambda about 1); FusionBench uses 0.3 with a plain sum (merge-math.md "
    "section 2)."
)


class Params(MethodParams):
    density: float = Field(
        default=0.2,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Fraction of each task vector kept by magnitude, per tensor: "
            "k = max(1, int(density * numel)); 1 keeps all. Default 0.2: the TIES paper's "
            "and FusionBench's top-20% (merge-math.md section 2); mergekit defaults to 1."
        ),
    )
    majority_sign: MajoritySign = Field(default="total", description=MAJORITY_SIGN_DESCRIPTION)
    normalize: bool = Field(
        default=True, description=NORMALIZE_DESCRIPTION + "Default true as mergekit's ties."
    )
    scale: float = Field(default=1.0, allow_inf_nan=False, description=SCALE_DESCRIPTION)


@dataclass
class MagnitudeCut:
    """Where one task vector is trimmed: entries with |tau| > threshold are kept, and of
    those equal to it, the first `room` in flat order (so exactly k survive). `room` is
    spent as blocks of rows are trimmed in order."""

    threshold: float
    room: int


def magnitude_cut(tau: torch.Tensor, density: float) -> MagnitudeCut | None:
    """The cut keeping k = max(1, int(density * numel)) entries; None keeps everything.
    Never modifies `tau`."""
    return cut_from_magnitudes(tau.abs().reshape(-1), density)


def cut_from_magnitudes(mag: torch.Tensor, density: float) -> MagnitudeCut | None:
    """The cut of a flat tensor of magnitudes (|tau|, float32 or float64)."""
    n = mag.numel()
    if density >= 1 or n == 0:
        return None
    return cut_keeping(mag, max(1, int(density * n)))  # int() truncates as mergekit's does


def cut_keeping(mag: torch.Tensor, k: int) -> MagnitudeCut | None:
    """The cut keeping exactly the k >= 1 largest of a flat tensor of magnitudes (entries
    tied with the k-th largest in flat order); None when k >= numel (all are kept)."""
    if k < 1:
        raise ValueError(f"a magnitude cut keeps at least one entry, not {k}")
    if k >= mag.numel():
        return None
    threshold = kth_largest(mag, k)
    return MagnitudeCut(threshold, k - _count_above(mag.reshape(-1), threshold))


# Up to this many entries kthvalue is used as is. It copies the tensor and allocates int64
# indices (~12 bytes per entry) and is slow: on a 4 Mi-entry task vector it was 17% of a
# TIES merge's samples. Above, a strided sample of about SAMPLE_SIZE entries brackets the
# value, and kthvalue runs on the at most CANDIDATES_MAX entries inside the bracket (a
# few percent of the tensor); memory stays near 1 byte per entry. Every path is exact.
KTHVALUE_MAX = 2**18
SAMPLE_SIZE = 2**16
CANDIDATES_MAX = 2**22


def kth_largest(mag: torch.Tensor, k: int) -> float:
    """The exact k-th largest of non-negative floats (float32 or float64).

    Large tensors: a strided sample brackets the value, one pass counts the entries above
    and inside the bracket, and kthvalue runs on the few inside. If the bracket misses
    (structured data), bisection on the bit patterns (which order like the values for
    non-negative IEEE floats) narrows it instead. Where kthvalue on the whole tensor needs
    1.3 GB for a 65M-entry embedding, this needs a boolean mask."""
    import torch

    flat = mag.reshape(-1)
    n = flat.numel()
    if n <= KTHVALUE_MAX:
        return float(torch.kthvalue(flat, n - k + 1).values)
    sample = flat[:: max(1, n // SAMPLE_SIZE)].contiguous()
    m = sample.numel()
    j = k * m / n  # the value's rank from the top, in the sample
    margin = 6 * math.sqrt(max(j * (1 - k / n), 1.0)) + 32
    top = min(m, max(1, math.floor(j - margin)))
    bottom = min(m, max(1, math.ceil(j + margin)))
    # At the ends of the sample the bracket must reach the ends of the whole tensor.
    upper = math.inf if top <= 1 else float(torch.kthvalue(sample, m - top + 1).values)
    lower = 0.0 if bottom >= m else float(torch.kthvalue(sample, m - bottom + 1).values)
    found = _select_between(flat, k, lower, upper)
    if found is not None:
        return found
    return _bisect(flat, k)


def _select_between(flat: torch.Tensor, k: int, lower: float, upper: float) -> float | None:
    """The k-th largest if it lies in [lower, upper] and few entries do; else None."""
    import torch

    above, count, parts = 0, 0, []
    for sl in _slices(flat):  # one pass: the counts and the candidates
        above += _count(sl > upper)
        inside = (sl >= lower).logical_and_(sl <= upper)
        got = _count(inside)
        if got and count + got <= CANDIDATES_MAX:
            parts.append(sl[inside])
        count += got
    if not above < k <= above + count or count > CANDIDATES_MAX:
        return None
    candidates = torch.cat(parts)
    return float(torch.kthvalue(candidates, count - (k - above) + 1).values)


def _bisect(flat: torch.Tensor, k: int) -> float:
    import torch

    if flat.dtype == torch.float32:
        bits, lo, hi = flat.view(torch.int32), 0, 0x7F800000  # up to +inf
    elif flat.dtype == torch.float64:
        bits, lo, hi = flat.view(torch.int64), 0, 0x7FF0000000000000
    else:
        raise ValueError(f"magnitudes must be float32 or float64, not {flat.dtype}")
    # Invariant: the k-th largest value's bit pattern is in [lo, hi].
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(bits >= mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return float(torch.tensor(lo, dtype=bits.dtype).view(flat.dtype))


# Whole-tensor statistics (counts, the bracket's candidates) run over slices of this many
# entries: every temporary (a bool mask, the selected candidates) then stays in the caches
# and in reused heap memory. On whole tensors of 16 Mi entries each fresh temporary
# page-faulted (4-6 ms per Mi entries for an abs or a subtraction) and masked_select
# cost 18 ms per Mi entries.
STATS_SLICE = 2**18


def _slices(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + STATS_SLICE] for i in range(0, flat.numel(), STATS_SLICE)]


def _count_above(flat: torch.Tensor, value: float, inclusive: bool = False) -> int:
    """count(flat > value) (or >= with `inclusive`) of a flat tensor, slice by slice."""
    return sum(_count(sl >= value if inclusive else sl > value) for sl in _slices(flat))


def _float_bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of `value` rounded to `dtype`, as comparisons with it round it."""
    import torch

    return int(torch.tensor(value, dtype=dtype).view(_BITS[dtype][0]))


def _above_bits(mag: torch.Tensor, bound: int, inf_bits: int, shift: int) -> torch.Tensor:
    """All ones where bound < mag <= inf_bits, else zero, for the non-negative bit
    patterns `mag` of magnitudes (consumed: modified in place). NaN patterns lie above
    inf_bits; the differences cannot overflow, both terms lying in [-2^(w-1), 2^(w-1))."""
    import torch

    mask = torch.sub(bound, mag)  # < 0 where mag > bound
    mask.bitwise_and_(mag.sub_(inf_bits + 1))  # and < 0 where mag is not NaN
    return mask.bitwise_right_shift_(shift)


def _count(mask: torch.Tensor) -> int:
    """True (non-zero) entries of a mask. bool.sum() would first make an int64 copy of the
    mask (8 bytes per entry: 0.5 GB for a 65M-entry embedding)."""
    import torch

    return int(torch.count_nonzero(mask))


def apply_cut(tau: torch.Tensor, cut: MagnitudeCut | None) -> torch.Tensor:
    """Trim `tau` (a whole tensor, or the next block of rows) at `cut`; never modifies it."""
    import torch

    if cut is None:
        return tau
    _init_bits()
    if tau.dtype in _BITS and cut.threshold >= 0:
        trimmed = _trim_bits(tau, cut)
        if trimmed is not None:
            return trimmed
    return torch.where(keep_mask(tau, cut), tau, 0.0)


# Float dtype -> (integer type of its width, bits of +inf, sign shift). Masks below are
# built with integer ops on the float's bits: torch's bool kernels (comparisons, where,
# masked_fill, bool -> float) ran at 2-10 ms per Mi entries on the bench machine, integer
# and float arithmetic at 0.1-0.7, and the bits give the same values exactly.
_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {}


def _init_bits() -> None:
    import torch

    if not _BITS:
        _BITS[torch.float32] = (torch.int32, 0x7F800000, 31)
        _BITS[torch.float64] = (torch.int64, 0x7FF0000000000000, 63)


def _trim_bits(tau: torch.Tensor, cut: MagnitudeCut) -> torch.Tensor | None:
    """torch.where(keep_mask(tau, cut), tau, 0.0), exactly (NaN dropped, +-inf kept, the
    cut's room spent the same way), with integer ops: non-negative IEEE floats order like
    their bit patterns, so with m = bits(|tau|) and t = bits(threshold) the kept entries
    are t < m <= inf, or t <= m <= inf while the room lasts. None (the caller takes the
    bool path) when the block has more ties at the threshold than room: once per tensor."""
    ints, inf_bits, shift = _BITS[tau.dtype]
    bound = _float_bits(cut.threshold + 0.0, tau.dtype)
    tau = tau.contiguous()
    mag = tau.abs().view(ints)
    if cut.room > 0:
        ties = mag.numel() - _count(mag - bound)  # count_nonzero: any dtype
        if ties > cut.room:
            return None
        cut.room -= ties
        bound -= 1  # keep every tie: m > t - 1
    mask = _above_bits(mag, bound, inf_bits, shift)
    return mask.bitwise_and_(tau.view(ints)).view(tau.dtype)


def keep_mask(tau: torch.Tensor, cut: MagnitudeCut) -> torch.Tensor:
    """The entries of `tau` (a whole tensor, or the next block of rows) that `cut` keeps,
    as a bool tensor of tau's shape; spends the cut's room on entries at the threshold."""
    import torch

    mag = tau.abs()
    if cut.room == 0:  # the usual case once the first blocks spent the room: one pass
        return mag > cut.threshold
    at_threshold = (mag == cut.threshold).reshape(-1)
    ties = _count(at_threshold)
    if ties <= cut.room:
        cut.room -= ties
        return mag >= cut.threshold
    # More ties at the cut than room: keep the first `room` of them in flat order, so
    # exactly k entries survive (their indices, not a cumulative sum over the block).
    keep = mag > cut.threshold
    first = torch.nonzero(at_threshold).reshape(-1)[: cut.room]
    keep.view(-1)[first] = True
    cut.room = 0
    return keep


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) largest-magnitude entries, zero the rest.

    Returns `tau` itself when nothing is pruned; never modifies it.
    """
    return apply_cut(tau, magnitude_cut(tau, density))


def elect_and_merge(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    majority_sign: MajoritySign,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """Steps 2-5 of the module docstring on already-sparsified deltas (shared with dare_ties)."""
    import torch

    first = deltas[0]
    w = torch.tensor(list(weights), dtype=first.dtype, device=first.device)
    # w_t * delta_t written straight into the stack (one pass, not a copy then a product);
    # a new tensor: safe to modify in place below.
    stacked = torch.empty((len(deltas), *first.shape), dtype=first.dtype, device=first.device)
    for t, delta in enumerate(deltas):
        torch.mul(delta, w[t], out=stacked[t])
    if majority_sign not in ("total", "count"):
        raise ValueError(f"unknown majority_sign {majority_sign!r}")
    fast = _elect_and_merge_fast(base, stacked, w, majority_sign, normalize, scale)
    if fast is not None:
        return fast
    w = w.reshape((len(weights),) + (1,) * base.dim())

    positive = stacked > 0
    negative = stacked < 0
    if majority_sign == "total":
        elected_positive = stacked.sum(dim=0) >= 0
    elif majority_sign == "count":
        elected_positive = positive.sum(dim=0) >= negative.sum(dim=0)
    else:  # Params validation makes this unreachable; a direct caller gets a clear error
        raise ValueError(f"unknown majority_sign {majority_sign!r}")
    # where(elected, positive, negative) as vectorized bool ops (where on bools is a scalar
    # loop): the same mask, NaN entries included (neither positive nor negative).
    agree = positive.logical_and_(elected_positive)
    agree.logical_or_(negative.logical_and_(elected_positive.logical_not_()))
    del positive, negative

    stacked.masked_fill_(~agree, 0)
    mixed = stacked.sum(dim=0)
    if normalize:
        # sum_t agree_t * w_t, accumulated in t order as sum(dim=0) does; agree_t * w_t is
        # exact (w_t or a zero), and a zero sum of either sign becomes 1 below.
        divisor = torch.zeros_like(mixed)
        for t in range(len(weights)):
            divisor.add_(agree[t], alpha=float(w[t]))
        divisor.masked_fill_(divisor == 0, 1)
        mixed.div_(divisor)
    if scale != 1:
        mixed.mul_(scale)
    return base + mixed


def _elect_and_merge_fast(
    base: torch.Tensor,
    stacked: torch.Tensor,
    w: torch.Tensor,
    majority_sign: MajoritySign,
    normalize: bool,
    scale: float,
) -> torch.Tensor | None:
    """elect_and_merge's steps 3-5 on the weighted stack with float ops only
    (no bool tensors), giving the same bits; None (the caller takes the bool path) when
    the stack holds a non-finite entry or is not float32/float64.

    For finite x: the elected sign s is +1 where the total (or the count difference, the
    sum of signs) is >= 0, else -1, and delta_t agrees where s * delta_t > 0."""
    import torch

    _init_bits()
    if stacked.dtype not in _BITS:
        return None
    if majority_sign == "total":
        total = stacked.sum(dim=0)
        finite = bool(torch.isfinite(total.sum()))  # a NaN or inf entry reaches the total
    else:
        finite = bool(torch.isfinite(stacked.sum()))
        total = stacked.sign().sum(dim=0)  # #positive - #negative, exact
    if not finite:
        return None
    # s = 1 - 2 * [total < 0]: relu(-total) is > 0 exactly where total < 0 (-0 elects +).
    s = torch.neg(total).relu_().sign_().mul_(-2).add_(1)
    # s * delta_t > 0 exactly where delta_t agrees: relu keeps it and zeroes the rest, and
    # a second * s restores delta_t (exact: s is +-1). The zeros may be -0 where
    # masked_fill wrote +0; a sum of values equal but for zero signs has the same bits
    # unless it is zero, and adding +0 below makes that zero +0 as before.
    agreeing = stacked.mul_(s).relu_()
    agreed = agreeing.sign() if normalize else None  # agree_t as 1.0 / +-0.0
    mixed = agreeing.mul_(s).sum(dim=0).add_(0.0)
    if agreed is not None:
        # sum_t agree_t * w_t as the bool path adds it: +-0 * w_t adds nothing to a
        # non-zero divisor and leaves a zero one +0 (the divisor starts at +0).
        divisor = torch.zeros_like(mixed)
        for t in range(len(stacked)):
            divisor.add_(agreed[t], alpha=float(w[t]))
        # A zero divisor (either sign) becomes 1: d + (1 - sign|d|), d itself elsewhere.
        divisor.add_(torch.abs(divisor).sign_().neg_().add_(1))
        mixed.div_(divisor)
    if scale != 1:
        mixed.mul_(scale)
    return base + mixed


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    # Blockwise: the pipeline computed each whole task vector's cut (tensor_stats) and hands
    # blocks of rows in order; otherwise the tensor is whole and cut here.
    taus = ctx.task_vectors()
    cuts = ctx.extra.get("stats") or [magnitude_cut(tau, p.density) for tau in taus]
    trimmed = [apply_cut(tau, cut) for tau, cut in zip(taus, cuts, strict=True)]
    return elect_and_merge(
        ctx.base,
        trimmed,
        ctx.weights,
        majority_sign=p.majority_sign,
        normalize=p.normalize,
        scale=p.scale,
    )


def tensor_stats(tau: torch.Tensor, p: Params) -> MagnitudeCut | None:
    """The one whole-tensor statistic TIES needs per expert: its magnitude cut. The
    pipeline hands over a fresh flat task vector, so |tau| is taken in place."""
    return cut_from_magnitudes(tau.abs_(), p.density)


METHOD = MethodInfo(
    name="ties",
    summary=(
        "TIES-Merging: per tensor, keep each task vector's top `density` fraction by "
        "magnitude, elect a sign per coordinate, and average (or sum) the agreeing entries."
    ),
    params=Params,
    merge=merge,
    tensor_stats=tensor_stats,
)
