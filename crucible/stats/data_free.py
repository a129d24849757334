"""Data-free Gram-like statistics of a task vector (merge-math.md sections 8, 9, 10.3).

One definition of each, shared by the methods and by the statistics stage:

- `task_vector_gram(tau)`: G = tau^T tau / ||tau||_F^2 (d_in x d_in, trace 1; the zero
  matrix for a zero tau). WUDI's surrogate Gram (section 8) and BMM's data-free Gram
  (section 10.3): by Theorem 1 it is positively aligned with the activation second moment
  E[x x^T] of the module's inputs, up to an unknown per-task scale, which the trace
  normalisation removes.
- `centred_covariance(tau)`: ACE's S_t = tau~^T tau~ with tau~ = tau - 1 mu^T, mu the mean of
  tau's d_out rows (section 9, step 2): each row of tau is one sample of the input covariance.

`tau` is in nn.Linear layout (d_out x d_in); a GPT-2 Conv1D weight (d_in x d_out) is
transposed first (`write_task_vector_grams` does it from the base's config).

`write_task_vector_grams` writes an expert's data-free Grams in the same folder format as the
activation Grams (a safetensors tensor per base weight name, d_in x d_in, float64), so either
estimator can feed `MergeInputs.grams` and the Gram cache.

Torch is imported inside functions only: crucible.methods imports this module, and the API
imports the methods to validate params.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

if TYPE_CHECKING:
    import torch

    from crucible.sources.resolve import ResolvedModel

# How a Gram folder's matrices were estimated: X^T X / n of the module's inputs on data, or
# tau^T tau / ||tau||_F^2 of the task vector.
Estimator = Literal["activations", "task_vector"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
# Grams are stored in float64: the statistics are accumulated in it, and the engine casts.
GRAM_DTYPE_CODE = "F64"


def task_vector_gram(tau: torch.Tensor) -> torch.Tensor:
    """tau^T tau / ||tau||_F^2, in tau's dtype and on its device; zero for a zero tau."""
    gram = tau.T @ tau
    norm2 = float(gram.diagonal().sum())  # = ||tau||_F^2
    return gram.div_(norm2) if norm2 > 0 else gram


class CentredCovariance(NamedTuple):
    covariance: torch.Tensor  # S = tau~^T tau~, d_in x d_in
    centred: torch.Tensor  # tau~ = tau - 1 mu^T, d_out x d_in


def centred_covariance(tau: torch.Tensor) -> CentredCovariance:
    """ACE's row-centred covariance (merge-math.md section 9, step 2), with tau~ itself
    (ACE's closed form uses the centred task vector as well)."""
    centred = tau - tau.mean(dim=0, keepdim=True)
    return CentredCovariance(centred.T @ centred, centred)


def gram_tensor_names(base: ResolvedModel) -> list[str]:
    """The base's tensors that get a data-free Gram: floating 2-D tensors outside
    crucible.methods.base.NON_MATRIX_NAMES (the matrix tensors of merge-math.md section 0)."""
    from crucible.methods.base import NON_MATRIX_NAMES

    floating = {"F16", "BF16", "F32", "F64"}
    return [
        name
        for name, info in base.tensors.items()
        if len(info.shape) == 2
        and info.dtype in floating
        and not any(n in name for n in NON_MATRIX_NAMES)
    ]


def write_task_vector_grams(
    base: ResolvedModel,
    expert: ResolvedModel,
    folder: Path,
    *,
    names: list[str] | None = None,
    device: torch.device | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Write tau^T tau / ||tau||_F^2 for each matrix tensor of `base` (or `names`) into
    `folder` as safetensors keyed by the base's names, streamed one Gram at a time.

    Expert names are matched to the base's (crucible.sources.align: a `bert.` prefix, a head
    of its own); a tensor whose shape differs from the base's is skipped. Returns the
    written tensors' d_in by name."""
    import torch

    from crucible.publish.writer import ShardedSafetensorsWriter
    from crucible.sources.align import align_names
    from crucible.sources.layout import transposed_weights
    from crucible.sources.tensor_reader import TensorReader

    device = device or torch.device("cpu")
    alignment = align_names(base.tensors, expert.tensors)
    wanted = gram_tensor_names(base) if names is None else names
    transposed = transposed_weights(base.root, wanted)
    plan: list[tuple[str, tuple[int, ...], str]] = []
    d_ins: dict[str, int] = {}
    for name in wanted:
        other = alignment.to_expert.get(name)
        if other is None or expert.tensors[other].shape != base.tensors[name].shape:
            continue
        shape = base.tensors[name].shape
        d_in = shape[0] if name in transposed else shape[1]
        plan.append((name, (d_in, d_in), GRAM_DTYPE_CODE))
        d_ins[name] = d_in
    folder.mkdir(parents=True, exist_ok=True)
    with (
        TensorReader(base) as base_reader,
        TensorReader(expert) as expert_reader,
        ShardedSafetensorsWriter(folder, plan, 5 * 10**9, metadata={"format": "pt"}) as writer,
    ):
        for name, _, _ in plan:
            if check_cancelled is not None:
                check_cancelled()
            w0 = base_reader.read(name).to(device=device, dtype=torch.float64)
            tau = expert_reader.read(alignment.to_expert[name]).to(
                device=device, dtype=torch.float64
            )
            tau.sub_(w0)
            del w0
            if name in transposed:
                tau = tau.T  # Conv1D (d_in x d_out) -> nn.Linear layout
            writer.write(name, task_vector_gram(tau).cpu())
            del tau
    return d_ins
