"""The registry of merge methods, by name."""

from __future__ import annotations

from crucible.methods import dare_linear, dare_ties, linear, task_arithmetic, ties
from crucible.methods.base import MethodInfo

METHODS: dict[str, MethodInfo] = {
    m.METHOD.name: m.METHOD for m in (linear, task_arithmetic, ties, dare_linear, dare_ties)
}


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None
