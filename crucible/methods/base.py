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

    def task_vectors(self) -> list[torch.Tensor]:
        """tau_t = W_t - W0, computed out of place (the inputs may be read-only mmaps)."""
        return [expert - self.base for expert in self.experts]


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
