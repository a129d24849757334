"""Do the experts line up with the base? Checked from headers, before any weight is read."""

from __future__ import annotations

from typing import Any

from crucible.errors import CrucibleError
from crucible.sources.resolve import ResolvedModel

MAX_REPORTED_PROBLEMS = 20


def _problem(label: str, name: str, kind: str, message: str) -> dict[str, Any]:
    return {"expert": label, "tensor": name, "kind": kind, "message": message}


def _problems(base: ResolvedModel, expert: ResolvedModel, label: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    # Sorted so that "the first offending tensor" is the same on every run.
    for name in sorted(set(base.tensors) | set(expert.tensors)):
        b = base.tensors.get(name)
        e = expert.tensors.get(name)
        if e is None:
            out.append(
                _problem(label, name, "missing", "present in the base, missing in the expert")
            )
        elif b is None:
            out.append(_problem(label, name, "extra", "present in the expert, missing in the base"))
        elif b.shape != e.shape:
            message = f"shape {list(e.shape)} in the expert, {list(b.shape)} in the base"
            out.append(_problem(label, name, "shape", message))
        elif b.dtype != e.dtype:
            message = f"dtype {e.dtype} in the expert, {b.dtype} in the base"
            out.append(_problem(label, name, "dtype", message))
    return out


def check_compatible(
    base: ResolvedModel,
    experts: list[ResolvedModel],
    labels: list[str],
    *,
    allow_shape_mismatch: bool = False,
) -> dict[str, list[int]]:
    """Raise CrucibleError("incompatible_models") unless every expert has exactly the base's
    tensor names, shapes and dtypes.

    With `allow_shape_mismatch` (the job's shape_mismatch policy is not 'fail'), differing
    shapes are not a problem: they are returned as {tensor: [indices of the experts whose
    shape differs]} for the policy to handle. Missing or extra tensors and dtype differences
    always fail. The message names the first offending expert and tensor; `detail` lists up
    to MAX_REPORTED_PROBLEMS problems over all experts and the total count.
    """
    if len(labels) != len(experts):
        raise ValueError(f"{len(experts)} experts but {len(labels)} labels")
    problems: list[dict[str, Any]] = []
    mismatched: dict[str, list[int]] = {}
    for index, (expert, label) in enumerate(zip(experts, labels, strict=True)):
        for problem in _problems(base, expert, label):
            if allow_shape_mismatch and problem["kind"] == "shape":
                mismatched.setdefault(problem["tensor"], []).append(index)
            else:
                problems.append(problem)
    if not problems:
        return mismatched
    first = problems[0]
    more = f" ({len(problems) - 1} more problems in detail)" if len(problems) > 1 else ""
    hint = ""
    if first["kind"] == "shape":
        hint = "; set shape_mismatch to 'base' or 'keep_per_expert' to keep such tensors unmerged"
    raise CrucibleError(
        "incompatible_models",
        f"expert '{first['expert']}' does not match the base: tensor '{first['tensor']}' is "
        f"{first['message']}{more}{hint}",
        {"problems": problems[:MAX_REPORTED_PROBLEMS], "total": len(problems)},
    )
