"""The registry of merge methods, by name."""

from __future__ import annotations

from typing import Any

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
from crucible.methods.overrides import overridable_fields, request_params_model

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


def describe(info: MethodInfo) -> dict[str, Any]:
    """A method as GET /v1/methods and `crucible methods` publish it: what it needs, whether
    it is a matrix method, which params take per-tensor values, and the JSON schema of the
    params a request may send."""
    return {
        "name": info.name,
        "summary": info.summary,
        "needs": sorted(info.needs),
        "matrix": info.matrix,
        "per_tensor_params": list(overridable_fields(info.params)),
        "params_schema": request_params_model(info.params).model_json_schema(),
    }
