"""The registry of merge methods, by name."""

from __future__ import annotations

from crucible.methods import (
    ace,
    bmm,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    iso_c,
    iso_cts,
    linear,
    regmean,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from crucible.methods.base import MethodInfo

METHODS: dict[str, MethodInfo] = {
    m.METHOD.name: m.METHOD
    for m in (
        linear,
        task_arithmetic,
        ties,
        dare_linear,
        dare_ties,
        breadcrumbs,
        breadcrumbs_ties,
        tsv,
        iso_c,
        iso_cts,
        wudi,
        regmean,
        ace,
        bmm,
    )
}


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None
