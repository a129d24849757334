"""What the tuner searches: module groups, per-param ranges, and the map between the unit
cube the optimizer works in and concrete param values per group.

A point x in [0, 1]^D holds, group by group in `SearchSpace.groups` order, one coordinate
per tuned param in `SearchSpace.params` order: x[g * len(params) + p].

Torch-free at import (torch inside `encode`): grouping and override rules serve the API too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from crucible.methods.overrides import layer_index
from crucible.methods.registry import METHODS
from crucible.spec import TUNABLE_PARAMS

if TYPE_CHECKING:
    import torch

Groups = Literal["global", "layer_type", "block", "module"]
GroupValues = dict[str, dict[str, float]]

GLOBAL_GROUP = "global"
# Tensors without a layer index (embeddings, final norm, heads) when grouping by block.
OUTSIDE_BLOCKS = "outside blocks"


@dataclass(frozen=True)
class ParamRange:
    """One tuned param's range; `log` maps the unit interval log-uniformly."""

    low: float
    high: float
    log: bool = False

    def decode(self, u: float) -> float:
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return self.clip(value)  # exp/log rounding must not step outside the range

    def encode(self, value: float) -> float:
        if self.log:
            return (math.log(value) - math.log(self.low)) / (
                math.log(self.high) - math.log(self.low)
            )
        return (value - self.low) / (self.high - self.low)

    def clip(self, value: float) -> float:
        return min(self.high, max(self.low, value))


# Ranges per method (merge-math.md sections 1, 2, 10.3, 10.4):
# - bmm rho: log-uniform [1e-4, 1e2], from RegMean on the Grams (small rho) to the anchor
#   (large rho); bmm scale: [0.5, 1.5], a correction around the MAP's own scale of 1.
# - task_arithmetic / ties scale: [0, 1.5]. TA's lambda is usually grid-searched over [0, 1]
#   (FusionBench's 0.3 for a sum of task vectors); the margin above 1 leaves room for TIES'
#   disjoint mean (normalize, the default), whose natural lambda is about 1, and for a sum
#   of few task vectors that are individually under-scaled.
PARAM_RANGES: dict[str, dict[str, ParamRange]] = {
    "bmm": {"rho": ParamRange(1e-4, 1e2, log=True), "scale": ParamRange(0.5, 1.5)},
    "task_arithmetic": {"scale": ParamRange(0.0, 1.5)},
    "ties": {"scale": ParamRange(0.0, 1.5)},
}


def _natural_key(text: str) -> tuple[Any, ...]:
    """Digits compared as numbers: layer.2 before layer.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text))


def layer_pattern(name: str) -> str:
    """The name with the path component `layer_index` reads replaced by `*`
    (`encoder.layer.3.attention.self.query.weight` -> `encoder.layer.*.attention...`);
    the name itself outside the layer stack.

    The component is found by changing each numeric component in turn and seeing which one
    layer_index follows, so this agrees with layer_index whatever its regex."""
    index = layer_index(name)
    if index is None:
        return name
    parts = name.split(".")
    for j, part in enumerate(parts):
        if part == str(index):
            probe = ".".join([*parts[:j], str(index + 1), *parts[j + 1 :]])
            if layer_index(probe) == index + 1:
                return ".".join([*parts[:j], "*", *parts[j + 1 :]])
    return name  # unreachable: layer_index read one of the components


def module_groups(names: list[str], groups: Groups) -> dict[str, list[str]]:
    """The tuned tensors (base naming) partitioned into groups, each sharing one set of
    hyperparameters. Group order and member order are natural sorts, so the same set of
    names always gives the same groups in the same order (the optimizer's coordinates)."""
    unique = sorted(set(names), key=_natural_key)
    if not unique:
        raise ValueError("no tensors to tune")
    if groups == "global":
        return {GLOBAL_GROUP: unique}
    if groups == "module":
        return {n: [n] for n in unique}
    out: dict[str, list[str]] = {}
    if groups == "layer_type":
        for n in unique:
            out.setdefault(layer_pattern(n), []).append(n)
        return {k: out[k] for k in sorted(out, key=_natural_key)}
    if groups == "block":
        indices = {n: layer_index(n) for n in unique}
        for i in sorted({i for i in indices.values() if i is not None}):
            out[f"block {i}"] = [n for n in unique if indices[n] == i]
        outside = [n for n in unique if indices[n] is None]
        if outside:
            out[OUTSIDE_BLOCKS] = outside
        return out
    raise ValueError(f"unknown grouping {groups!r}; use global, layer_type, block or module")


class SearchSpace:
    """The unit cube [0, 1]^D, D = len(groups) * len(params), and its map to values."""

    def __init__(
        self, method: str, groups: list[str], defaults: Mapping[str, float] | None = None
    ) -> None:
        """`defaults`: the untuned values (the request's scalars); missing params take the
        method's defaults. A default outside a param's range is clipped to it."""
        if method not in TUNABLE_PARAMS:
            raise ValueError(f"method {method!r} is not tunable; tunable: {sorted(TUNABLE_PARAMS)}")
        if not groups or len(set(groups)) != len(groups):
            raise ValueError("a search space needs at least one group and no repeated groups")
        self.method = method
        self.groups: tuple[str, ...] = tuple(groups)
        self.params: tuple[str, ...] = TUNABLE_PARAMS[method]
        self.ranges: dict[str, ParamRange] = {p: PARAM_RANGES[method][p] for p in self.params}
        fields = METHODS[method].params.model_fields
        given = dict(defaults or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f"{method} does not tune {unknown}; it tunes {list(self.params)}")
        self.defaults: dict[str, float] = {
            p: self.ranges[p].clip(float(given.get(p, fields[p].default))) for p in self.params
        }

    @property
    def dim(self) -> int:
        return len(self.groups) * len(self.params)

    def decode(self, x: torch.Tensor) -> GroupValues:
        """Values per group of one point of the unit cube (shape (D,))."""
        flat = [float(v) for v in x.reshape(-1).tolist()]
        if len(flat) != self.dim:
            raise ValueError(f"a point of this space has {self.dim} coordinates, not {len(flat)}")
        if any(not 0.0 <= u <= 1.0 for u in flat):
            raise ValueError("a point of the search space lies in [0, 1]^D")
        k = len(self.params)
        return {
            g: {p: self.ranges[p].decode(flat[i * k + j]) for j, p in enumerate(self.params)}
            for i, g in enumerate(self.groups)
        }

    def encode(self, values: Mapping[str, Mapping[str, float]]) -> torch.Tensor:
        """The point (float64, shape (D,)) of values per group; every group and param must be
        given and inside its range."""
        coords: list[float] = []
        for g in self.groups:
            if g not in values:
                raise ValueError(f"no values for group {g!r}")
            for p in self.params:
                v = float(values[g][p])
                r = self.ranges[p]
                if not r.low <= v <= r.high:
                    raise ValueError(f"{g}: {p} = {v} is outside [{r.low}, {r.high}]")
                coords.append(min(1.0, max(0.0, r.encode(v))))
        import torch

        return torch.tensor(coords, dtype=torch.float64)

    def default_values(self) -> GroupValues:
        return {g: dict(self.defaults) for g in self.groups}

    def default_point(self) -> torch.Tensor:
        """The untuned values as a point: trial 0, so tuning never reports worse than it."""
        return self.encode(self.default_values())


def override_rules(
    values: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, list[str]],
    fallback: Mapping[str, float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Per param, the [{filter, value}] rules that give every tensor of every group its
    group's value through crucible.methods.overrides.resolve_params: one exact-name regex
    per group (`re:^(?:name|name)$`, names escaped). With `fallback`, a last `*` rule gives
    the other tensors that value instead of the param's default."""
    params: list[str] = []
    for per_param in values.values():
        params.extend(p for p in per_param if p not in params)
    rules: dict[str, list[dict[str, Any]]] = {p: [] for p in params}
    for group, names in groups.items():
        if not names:
            continue
        pattern = "re:^(?:" + "|".join(re.escape(n) for n in names) + ")$"
        for p in params:
            rules[p].append({"filter": pattern, "value": float(values[group][p])})
    for p, value in (fallback or {}).items():
        rules.setdefault(p, []).append({"filter": "*", "value": float(value)})
    return rules
