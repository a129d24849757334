"""What a merge method is, and what it is handed.

Method files import torch inside `merge` only: the API process imports this package to
validate params and publish their JSON schema, and it must never load torch (DESIGN.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch


class MethodParams(BaseModel):
    """Base of every method's params: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TensorContext:
    """One tensor position of the model, across the base and every expert.

    `base` and `experts` share one shape and one floating dtype (float32 in the pipeline,
    float64 in exactness tests); the method returns the merged tensor in that dtype.
    """

    name: str
    base: torch.Tensor
    experts: list[torch.Tensor]
    weights: list[float]
    extra: dict[str, Any] = field(default_factory=dict)
    # Per-expert input Grams G_t = X_t^T X_t / n_t (d_in x d_in), for methods whose `needs`
    # holds "gram", when the job has them for this tensor; None otherwise.
    grams: list[torch.Tensor] | None = None
    # What the method did for this tensor (solve path, ridge, condition estimate, its own
    # flags): the pipeline stores it in the job's report. JSON-serialisable values only.
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def task_vectors(self) -> list[torch.Tensor]:
        """tau_t = W_t - W0, computed out of place (the inputs may be read-only mmaps)."""
        return [expert - self.base for expert in self.experts]

    def weighted_task_vectors(self) -> list[torch.Tensor]:
        """w_t * tau_t: how the subspace methods (tsv, iso, wudi, ace) take expert weights,
        as FusionBench's per-task alphas applied before the method. Default weights are 1."""
        return [
            (expert - self.base) * w if w != 1 else expert - self.base
            for expert, w in zip(self.experts, self.weights, strict=True)
        ]


# 2-D tensors that the matrix procedures skip, matched as substrings of the name as
# FusionBench and ACE do (merge-math.md section 0): CLIP's text projection.
NON_MATRIX_NAMES: tuple[str, ...] = ("text_projection",)


def is_matrix(ctx: TensorContext) -> bool:
    """Does this tensor go through a method's matrix procedure (merge-math.md section 0)?
    2-D, and not one of NON_MATRIX_NAMES; everything else follows the method's rule for
    non-matrix tensors (usually the mean of the task vectors)."""
    return ctx.base.ndim == 2 and not any(n in ctx.name for n in NON_MATRIX_NAMES)


def check_context(ctx: TensorContext) -> None:
    """Fail loudly instead of letting broadcasting merge tensors of different shapes."""
    if not ctx.experts:
        raise ValueError(f"{ctx.name}: a merge needs at least one expert tensor")
    if len(ctx.weights) != len(ctx.experts):
        raise ValueError(f"{ctx.name}: {len(ctx.weights)} weights for {len(ctx.experts)} experts")
    for i, expert in enumerate(ctx.experts):
        if expert.shape != ctx.base.shape:
            raise ValueError(
                f"{ctx.name}: expert {i} has shape {tuple(expert.shape)}, "
                f"the base {tuple(ctx.base.shape)}"
            )
        if expert.dtype != ctx.base.dtype:
            raise ValueError(
                f"{ctx.name}: expert {i} has dtype {expert.dtype}, the base {ctx.base.dtype}"
            )


# A matrix procedure: weighted task vectors (all d_out x d_in) and the diagnostics dict in,
# the merged task vector out (before the global scale).
MatrixProcedure = Callable[["list[torch.Tensor]", "dict[str, Any]"], "torch.Tensor"]


def merge_matrix_or_mean(
    ctx: TensorContext, scale: float, procedure: MatrixProcedure
) -> torch.Tensor:
    """W0 + scale * procedure(w_t tau_t) for matrix tensors (`is_matrix`), and
    W0 + scale * mean_t(w_t tau_t) for the rest (merge-math.md section 0).

    Records `rule` ("matrix" | "mean") and `tasks` in ctx.diagnostics; the procedure records
    its own facts."""
    check_context(ctx)
    if not is_matrix(ctx):
        ctx.diagnostics.update(rule="mean", tasks=len(ctx.experts))
        return mean_of_task_vectors(ctx, scale)
    ctx.diagnostics.update(rule="matrix", tasks=len(ctx.experts))
    merged = procedure(ctx.weighted_task_vectors(), ctx.diagnostics)
    if scale != 1:
        merged.mul_(scale)  # the procedure's result is a fresh tensor: scale in place
    return merged.add_(ctx.base)


def mean_of_task_vectors(ctx: TensorContext, scale: float = 1.0) -> torch.Tensor:
    """W0 + scale * mean_t(w_t tau_t): the rule for non-matrix tensors of tsv, iso_c,
    iso_cts, ace, FusionBench's wudi and regmean (merge-math.md section 0)."""
    taus = ctx.weighted_task_vectors()
    total = taus[0]
    for tau in taus[1:]:
        total.add_(tau)  # our own temporaries: accumulate in place
    return ctx.base + total * (scale / len(taus))


def tensor_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A stable 63-bit seed per (job seed, tensor, expert): reruns draw the same masks,
    and no two tensors or experts share a stream."""
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{expert_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    params: type[MethodParams]
    merge: Callable[[TensorContext, Any], torch.Tensor]
    # What the method needs besides weights: "gram", "anchor", "data" (later issues).
    needs: frozenset[str] = frozenset()
    # True when every output element depends only on the same element of the inputs (and
    # its position: DARE's masks): the pipeline may then merge a large tensor in blocks of
    # rows to bound memory, with ctx.extra["shape"] (the whole tensor's) and
    # ctx.extra["rows"] (the block's [start, stop) along dim 0).
    elementwise: bool = False
    # Methods that are elementwise given one statistic of each whole task vector (TIES: its
    # magnitude cut). The pipeline computes `tensor_stats(tau_t, params)` one expert at a
    # time and passes the list as ctx.extra["stats"] with blocks of rows, in order.
    tensor_stats: Callable[[torch.Tensor, Any], Any] | None = None
    # Matrix methods (tsv, iso, wudi, ace, regmean, bmm) get whole tensors, in float64 where
    # the module fits (merge-math.md section 12), on the worker's compute device, and 2-D
    # weights in nn.Linear layout (d_out x d_in): the pipeline transposes GPT-2 Conv1D
    # weights before the call and back after it.
    matrix: bool = False
    # Whether the job must supply per-expert Grams for these params (e.g. regmean always,
    # bmm unless its Gram is data-free). The API refuses a job that needs them but names none.
    needs_grams: Callable[[Any], bool] | None = None
    # Methods whose merged delta is a fixed linear combination sum_t c_t tau_t of the task
    # vectors (linear, task_arithmetic): (params, weights) -> [c_t]. A merge of LoRA
    # adapters into a LoRA output then never forms d_out x d_in (merge-math.md section 11).
    delta_coefficients: Callable[[Any, list[float]], list[float]] | None = None
    # False for methods whose result does not depend on the base's values (linear averages
    # the experts only): the engine then does not read the base's float tensors (a fifth of
    # a 4-expert merge's input) and hands a placeholder of the right shape and dtype,
    # filled with NaN so a method that reads it anyway fails check_finite loudly.
    needs_base: bool = True
    # Work for a chunk of rows that needs none of the inputs' values (DARE's random masks):
    # a streamed merge runs prepare(name, shape, rows, params, experts) on its prefetch
    # thread, ahead of the merge, for rows [start, stop) of the tensor (None: all of it),
    # and hands the result to merge as ctx.extra["prepared"] = (those rows, result) with
    # every block of the chunk; merge takes its block's part, or does the work itself when
    # the key is absent.
    prepare: Callable[[str, tuple[int, ...], tuple[int, int] | None, Any, int], Any] | None = None
