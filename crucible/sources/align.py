"""Line up an expert's tensor names with the base's.

A fine-tuned classifier saved from `*ForSequenceClassification` names its encoder
`bert.encoder...` and adds a head (`classifier.weight`), while the base, saved from
`AutoModel`, names the same encoder `encoder...`. The alignment finds the one name prefix
that one side carries and the other does not, maps every shared tensor to the base's name,
and lists the tensors only the expert has (its task head): those are never merged, they
travel with the expert (engine: per_expert/ files; evaluation: the expert's own head).

Torch-free: headers only.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NameAlignment:
    # base name -> the expert's name of the same tensor
    to_expert: dict[str, str]
    # the expert's tensors with no counterpart in the base (task heads)
    expert_only: list[str] = field(default_factory=list)
    # the base's tensors the expert lacks
    base_only: list[str] = field(default_factory=list)
    # "bert." when the expert's names are the base's with that prefix; "-bert." when the
    # base's names carry it and the expert's do not; "" when the names agree as they are
    prefix: str = ""


def _candidates(names: Collection[str]) -> set[str]:
    return {n.split(".", 1)[0] + "." for n in names if "." in n}


def align_names(base: Collection[str], expert: Collection[str]) -> NameAlignment:
    """The alignment that matches the most base tensors (ties keep the plain names)."""
    base_set, expert_set = set(base), set(expert)
    best: tuple[int, str, dict[str, str]] = (
        len(base_set & expert_set),
        "",
        {n: n for n in base_set & expert_set},
    )
    if best[0] < len(base_set):
        for p in sorted(_candidates(expert_set)):
            mapped = {n: p + n for n in base_set if p + n in expert_set}
            if len(mapped) > best[0]:
                best = (len(mapped), p, mapped)
        for p in sorted(_candidates(base_set)):
            mapped = {n: n[len(p) :] for n in base_set if n.startswith(p) and n[len(p) :] in expert}
            if len(mapped) > best[0]:
                best = (len(mapped), "-" + p, mapped)
    _, prefix, to_expert = best
    used = set(to_expert.values())
    return NameAlignment(
        to_expert=dict(sorted(to_expert.items())),
        expert_only=sorted(expert_set - used),
        base_only=sorted(base_set - set(to_expert)),
        prefix=prefix,
    )
