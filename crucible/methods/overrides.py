"""Per-tensor parameter overrides, as mergekit has them.

Every numeric param of a method (an int or float field of its Params) may be given as

- a scalar: the same value for every tensor;
- a list of numbers: a gradient interpolated linearly over the layer stack, the first value at
  layer 0 and the last at the final layer (mergekit's "gradients"). Tensors outside the layer
  stack take the first value if they are embeddings (names with `embed`, `wte`, `wpe`) and
  the last otherwise (final norm, LM head), as mergekit evaluates pre-layer weights at t = 0
  and post-layer weights at t = 1;
- a list of rules `{"filter": ..., "value": ...}`: the first rule whose filter matches the
  tensor name wins; a filter is a glob (`*.mlp.*`) unless it starts with `re:`, then it is a
  regular expression searched in the name. Tensors no rule matches take the param's default.

Torch-free: the API validates these shapes at request time (every value is checked against
the param's own constraints), the worker resolves them tensor by tensor.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cache
from typing import Annotated, Any, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WrapValidator,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from crucible.methods.base import MethodParams

# First integer path component after a layer-container name: h.3, layers.3, blocks.3, layer.3.
_LAYER = re.compile(
    r"(?:^|\.)(?:h|layers|layer|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)\."
)
_ANY_INDEX = re.compile(r"\.(\d+)\.")
_EMBEDDING = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, from its name; None outside the stack."""
    m = _LAYER.search(tensor_name) or _ANY_INDEX.search(tensor_name)
    return int(m[1]) if m else None


@cache
def overridable_fields(params_cls: type[MethodParams]) -> tuple[str, ...]:
    """The numeric (int or float, not bool) fields: the ones a request may override."""
    return tuple(
        name for name, f in params_cls.model_fields.items() if f.annotation in (int, float)
    )


@cache
def _compile_filter(pattern: str) -> re.Pattern[str]:
    """A regex searched in the name (`re:`), or a glob anchored at the name's start (and,
    by fnmatch's translation, its end). Cached: rules are matched against every tensor."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile("^" + fnmatch.translate(pattern))


def filter_matches(pattern: str, tensor_name: str) -> bool:
    return _compile_filter(pattern).search(tensor_name) is not None


@cache
def request_params_model(params_cls: type[MethodParams]) -> type[BaseModel]:
    """The request-side model of a method's params: each numeric field widened to
    scalar | gradient list | rule list, every value held to the field's constraints."""
    fields: dict[str, Any] = {}
    prefix = params_cls.__module__.rsplit(".", 1)[-1].title().replace("_", "")
    numeric = overridable_fields(params_cls)
    for name, info in params_cls.model_fields.items():
        if name not in numeric:
            fields[name] = (info.annotation, info)
            continue
        fields[name] = (
            _widened(f"{prefix}{name.title().replace('_', '')}Rule", info),
            Field(
                default=info.default,
                description=(info.description or "")
                + " Per tensor: a list of numbers is interpolated over the layers; a list "
                "of {filter, value} rules picks by tensor name (glob, or re:<regex>).",
            ),
        )

    def check_together(self: BaseModel) -> BaseModel:
        # The method's own cross-field validators see one concrete value per field.
        params_cls.model_validate({k: _first_value(v) for k, v in self.__dict__.items()})
        return self

    return create_model(  # type: ignore[call-overload, no-any-return]
        f"{prefix}RequestParams",
        __base__=MethodParams,
        __doc__=params_cls.__doc__,
        __validators__={"check_together": model_validator(mode="after")(check_together)},
        **fields,
    )


def _widened(rule_name: str, info: FieldInfo) -> Any:
    """scalar | list[scalar] | list[rule], parsed by shape so that an error names the bad
    item rather than listing every branch of the union."""
    scalar = Annotated[info.annotation, *info.metadata]  # type: ignore[name-defined]

    def check_filter(pattern: str) -> str:
        try:
            _compile_filter(pattern)
        except re.error as exc:
            raise ValueError(f"bad regular expression in filter {pattern!r}: {exc}") from None
        return pattern

    rule = create_model(
        rule_name,
        __config__=ConfigDict(extra="forbid"),
        filter=(
            Annotated[str, AfterValidator(check_filter)],
            Field(min_length=1, description="Glob on the tensor name, or re:<regex>."),
        ),
        value=(scalar, ...),
    )
    scalar_adapter: TypeAdapter[Any] = TypeAdapter(scalar)
    rule_adapter: TypeAdapter[Any] = TypeAdapter(rule)

    def parse(value: Any, _handler: Any) -> Any:
        if not isinstance(value, list):
            return _validated(scalar_adapter, value, None)
        if not value:
            raise ValueError(
                "an empty list gives no value: give a number, a list of numbers "
                "(interpolated over layers) or a list of {filter, value} rules"
            )
        rules = [isinstance(v, dict | BaseModel) for v in value]
        if all(rules):
            return [_validated(rule_adapter, v, i) for i, v in enumerate(value)]
        if any(rules):
            raise ValueError("a list mixes numbers and {filter, value} rules; use one kind")
        return [_validated(scalar_adapter, v, i) for i, v in enumerate(value)]

    union = Union[scalar, list[scalar], list[rule]]  # type: ignore[valid-type]  # noqa: UP007
    return Annotated[union, WrapValidator(parse)]


def _validated(adapter: TypeAdapter[Any], value: Any, index: int | None) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f".{p}" for p in err["loc"])
        at = f"item {index}{where}: " if index is not None else (f"{where[1:]}: " if where else "")
        raise ValueError(f"{at}{err['msg'].removeprefix('Value error, ')}") from None


def _first_value(value: Any) -> Any:
    if isinstance(value, list) and value:
        first = value[0]
        return first.value if isinstance(first, BaseModel) else first
    return value


def _interpolate(values: list[float], t: float) -> float:
    if len(values) == 1:
        return values[0]
    pos = t * (len(values) - 1)
    lo = min(int(pos), len(values) - 2)
    frac = pos - lo
    return values[lo] * (1 - frac) + values[lo + 1] * frac


def resolve_params(
    request: BaseModel, params_cls: type[MethodParams], tensor_name: str, num_layers: int
) -> MethodParams:
    """The concrete Params for one tensor."""
    values: dict[str, Any] = {}
    for name in params_cls.model_fields:
        value = getattr(request, name)
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for rule in value:
                if filter_matches(rule.filter, tensor_name):  # type: ignore[attr-defined]
                    values[name] = rule.value  # type: ignore[attr-defined]
                    break
        elif isinstance(value, list) and name in overridable_fields(params_cls):
            resolved = _interpolate(
                [float(v) for v in value], _layer_position(tensor_name, num_layers)
            )
            values[name] = (
                round(resolved) if params_cls.model_fields[name].annotation is int else resolved
            )
        else:
            values[name] = value
    return params_cls.model_validate(values)


def _layer_position(tensor_name: str, num_layers: int) -> float:
    index = layer_index(tensor_name)
    if index is None:
        return 0.0 if _EMBEDDING.search(tensor_name) else 1.0
    if num_layers <= 1:
        return 0.0
    return min(1.0, index / (num_layers - 1))


def count_layers(tensor_names: list[str]) -> int:
    indices = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def has_overrides(request: BaseModel, params_cls: type[MethodParams]) -> bool:
    return any(isinstance(getattr(request, n), list) for n in overridable_fields(params_cls))
