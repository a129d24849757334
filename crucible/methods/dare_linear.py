"""DARE + task arithmetic (Yu et al., ICML 2024; mergekit 0.1.5 `dare_linear`).

Each task vector is randomly sparsified, then combined as in task_arithmetic:
tau_t <- m_t * tau_t / density with m_t ~ Bernoulli(density) i.i.d. per entry
(merge-math.md section 3), then W = W0 + scale * sum_t w_t tau_t [/ sum_t w_t].

Rescaling divides by `density` (the paper and FusionBench), which keeps the expectation of
every entry unchanged. mergekit 0.1.5 instead rescales each pruned tensor to the L1 norm of
the unpruned one; that differs in value (and is not unbiased), so DARE is not compared with
mergekit, only with the formula.

Masks: one numpy PCG64 stream per (tensor, expert chunk), seeded by tensor_seed(seed, name,
index), drawn on the CPU whatever the tensor's device or dtype: entry i is kept when the i-th
32-bit word of the stream is below round(density * 2**32). A mask therefore depends only on
(seed, tensor name, expert index, shape, density): not on the order tensors are merged in,
the global RNG, the device or the working dtype. The keep probability is density to within
2**-33. (Before 2026-11-24 the masks were torch.rand float32 uniforms from a torch.Generator;
that mt19937 draw was 5.4 ns per entry against 1.9 here and bounded dare_ties' speed, so
outputs of DARE jobs made before then differ from reruns of the same spec.)

Torch and numpy are imported inside functions only: the API imports this module to validate params.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from pydantic import Field

from crucible.methods.base import (
    MethodInfo,
    MethodParams,
    TensorContext,
    check_context,
    tensor_seed,
)
from crucible.methods.task_arithmetic import combine

if TYPE_CHECKING:
    import numpy as np
    import torch

DENSITY_DESCRIPTION = (
    "Keep probability 1 - p of each task-vector entry (p = DARE drop rate); 1 keeps all. "
    "Default 0.5: FusionBench's sparsity_ratio 0.5 (merge-math.md section 3); LLM SFT deltas "
    "often use 0.1; mergekit defaults to 1 (no drop)."
)
RESCALE_DESCRIPTION = (
    "Divide kept entries by density so each entry keeps its expectation (the DARE paper, "
    "FusionBench). Default true. Note mergekit 0.1.5 rescales to the L1 norm instead."
)
SEED_DESCRIPTION = (
    "Seed of the drop masks. Masks are drawn per (tensor, expert) from "
    "tensor_seed(seed, tensor name, expert index): reruns are identical, and tensor order "
    "does not matter."
)


class Params(MethodParams):
    density: float = Field(
        default=0.5, gt=0, le=1, allow_inf_nan=False, description=DENSITY_DESCRIPTION
    )
    rescale: bool = Field(default=True, description=RESCALE_DESCRIPTION)
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description=SEED_DESCRIPTION)
    normalize: bool = Field(
        default=False,
        description=(
            "Divide the weighted sum by the sum of expert weights (skipped when it is below "
            "1e-8 in magnitude). Default false as mergekit's dare_linear."
        ),
    )
    scale: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description=(
            "lambda in W = W0 + lambda * merged. Default 1.0 as mergekit's `lambda`; "
            "FusionBench's DareTaskArithmetic uses 0.3 (merge-math.md section 3)."
        ),
    )


# Masks are drawn in chunks of whole rows of about this many elements, each chunk from its
# own seeded stream, so any block of rows can be drawn without drawing the whole tensor
# (the pipeline merges large tensors in blocks) and the mask never depends on the blocking.
MASK_CHUNK_ELEMENTS = 2**20


def _chunk_rows(shape: tuple[int, ...]) -> int:
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return max(1, MASK_CHUNK_ELEMENTS // max(per_row, 1))


def dare_mask(
    shape: torch.Size | tuple[int, ...],
    density: float,
    seed: int,
    name: str,
    expert_index: int,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The keep mask (bool, on the CPU) of one (tensor, expert), or of rows [start, stop) of
    it: True with probability density. Chunk c of `_chunk_rows` rows draws its words from
    tensor_seed(seed, name, expert) for c = 0 and from tensor_seed(seed, f"{name}#{c}",
    expert) after; a tensor of at most MASK_CHUNK_ELEMENTS per chunk is therefore one
    plain draw."""
    import torch

    shape = tuple(shape)
    if not shape:
        return _draw(shape, density, seed, name, expert_index)
    start, stop = rows if rows is not None else (0, shape[0])
    step = _chunk_rows(shape)
    parts = []
    for c in range(start // step, -(-stop // step)):
        c0, c1 = c * step, min(shape[0], (c + 1) * step)
        key = name if c == 0 else f"{name}#{c}"
        chunk = _draw((c1 - c0, *shape[1:]), density, seed, key, expert_index)
        parts.append(chunk[max(start, c0) - c0 : min(stop, c1) - c0])
    if not parts:
        return torch.zeros((0, *shape[1:]), dtype=torch.bool)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# The last masks drawn, by (seed, key, expert, shape, density): the engine merges blocks
# of rows smaller than a mask chunk (256 Ki elements against MASK_CHUNK_ELEMENTS), and a
# chunk's draw (torch.rand, the bulk of DARE's time) must not be repeated for each of its
# blocks. Enough entries for every expert of one chunk; at most 16 MiB of bool.
_DRAWN: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
_DRAWN_MAX = 16
_DRAWN_LOCK = threading.Lock()


def _draw(shape: tuple[int, ...], density: float, seed: int, key: str, expert: int) -> torch.Tensor:
    """The chunk's mask (read-only: it may be handed out again)."""
    import torch

    cache_key = (seed, key, expert, shape, density)
    with _DRAWN_LOCK:
        cached = _DRAWN.get(cache_key)
        if cached is not None:
            _DRAWN.move_to_end(cache_key)
            return cached
    mask = torch.from_numpy(keep_draw(math.prod(shape), density, tensor_seed(seed, key, expert)))
    mask = mask.reshape(shape)
    with _DRAWN_LOCK:
        _DRAWN[cache_key] = mask
        while len(_DRAWN) > _DRAWN_MAX:
            _DRAWN.popitem(last=False)
    return mask


def keep_draw(n: int, density: float, stream_seed: int) -> np.ndarray:
    """n keep flags: the first n 32-bit words of PCG64(stream_seed) (each 64-bit output
    split low word first) compared with round(density * 2**32)."""
    import numpy as np

    threshold = round(density * 2**32)
    if threshold >= 2**32:
        return np.ones(n, dtype=np.bool_)
    words = np.random.PCG64(stream_seed).random_raw(-(-n // 2)).view("<u4")[:n]
    return words < np.uint32(threshold)


# Integer types of a float's width: where(keep, x, 0) is x's bits AND -keep, exactly (NaN,
# infinities and signed zeros included), in one vectorized integer op. torch's where() with
# a bool mask ran at ~10 ms per Mi entries on the bench machine, the AND at ~0.7.
_SAME_WIDTH_INT = {4: "int32", 8: "int64", 2: "int16"}


def keep_or_zero(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.where(keep, x, 0.0) for a bool `keep` of x's shape, as a new tensor."""
    import torch

    if not x.is_floating_point() or x.element_size() not in _SAME_WIDTH_INT:
        return torch.where(keep, x, 0.0)
    ints = getattr(torch, _SAME_WIDTH_INT[x.element_size()])
    bits = keep.to(ints).neg_()  # all ones where kept, zero elsewhere
    return torch.bitwise_and(x.contiguous().view(ints), bits).view(x.dtype)


def dare_drop(
    tau: torch.Tensor,
    density: float,
    rescale: bool,
    seed: int,
    name: str,
    expert_index: int,
    block: tuple[tuple[int, ...], tuple[int, int]] | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """m * tau (/ density): returns `tau` itself when density >= 1 (nothing dropped).
    `block` = (full shape, rows) when `tau` is a block of rows of a larger tensor; `keep`:
    its mask when already drawn (prepare_masks), else it is drawn here."""

    if density >= 1:
        return tau
    shape, rows = block if block is not None else (tuple(tau.shape), None)
    if keep is None:
        keep = dare_mask(shape, density, seed, name, expert_index, rows)
    keep = keep.to(tau.device)
    kept = tau / density if rescale else tau
    return keep_or_zero(keep, kept)


def dare_task_vectors(
    ctx: TensorContext, density: float, rescale: bool, seed: int
) -> list[torch.Tensor]:
    block = (ctx.extra["shape"], ctx.extra["rows"]) if "rows" in ctx.extra else None
    masks = _prepared_masks(ctx, len(ctx.experts))
    return [
        dare_drop(
            tau, density, rescale, seed, ctx.name, index, block, masks[index] if masks else None
        )
        for index, tau in enumerate(ctx.task_vectors())
    ]


class _DropParams(Protocol):
    density: float
    seed: int


def prepare_masks(
    name: str, shape: tuple[int, ...], rows: tuple[int, int] | None, p: _DropParams, experts: int
) -> list[torch.Tensor] | None:
    """MethodInfo.prepare of the DARE methods: every expert's keep mask for rows of the
    tensor (the same dare_mask the merge would draw), drawn on the prefetch thread."""
    if p.density >= 1:
        return None
    return [dare_mask(shape, p.density, p.seed, name, index, rows) for index in range(experts)]


def _prepared_masks(ctx: TensorContext, experts: int) -> list[torch.Tensor] | None:
    """This block's part of the chunk's prepared masks (ctx.extra["prepared"])."""
    prepared = ctx.extra.get("prepared")
    if prepared is None or prepared[1] is None:
        return None
    chunk_rows, masks = prepared
    if len(masks) != experts:
        raise ValueError(f"{ctx.name}: {len(masks)} prepared masks for {experts} experts")
    rows = ctx.extra.get("rows")
    if rows is None:
        return list(masks)
    start = chunk_rows[0] if chunk_rows is not None else 0
    return [m[rows[0] - start : rows[1] - start] for m in masks]


def merge(ctx: TensorContext, p: Params) -> torch.Tensor:
    check_context(ctx)
    deltas = dare_task_vectors(ctx, p.density, p.rescale, p.seed)
    return combine(ctx.base, deltas, ctx.weights, scale=p.scale, normalize=p.normalize)


METHOD = MethodInfo(
    name="dare_linear",
    summary=(
        "DARE + task arithmetic: randomly drop task-vector entries (keep probability "
        "`density`, rescaled by 1/density), then add the weighted sum to the base."
    ),
    params=Params,
    merge=merge,
    elementwise=True,
    prepare=prepare_masks,
)
