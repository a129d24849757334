"""Row schemas of uploaded datasets, detected from the first row and checked on every row.

- classification: {text: str, label: str | int}; every label of one type
- text: {text: str} (language modelling)
- prompt_completion: {prompt: str, completion: str} (language modelling on the completion)

Other columns are refused (a misspelt column would otherwise be silently ignored). Text
fields must be non-empty strings. CSV has no types: a CSV label written as a canonical
integer ("0", "-3", not "01") is read as that integer, so 0/1 labels mean the same thing in
CSV, JSON Lines and Parquet.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from crucible.datasets.formats import DatasetFormat, DatasetFormatError, iter_numbered_rows
from crucible.errors import CrucibleError

SchemaName = Literal["classification", "text", "prompt_completion"]
SCHEMA_NAMES: tuple[str, ...] = get_args(SchemaName)
SCHEMAS: dict[str, frozenset[str]] = {
    "classification": frozenset({"text", "label"}),
    "text": frozenset({"text"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
}
KNOWN_COLUMNS: frozenset[str] = frozenset().union(*SCHEMAS.values())
Label = str | int
# Bad rows reported (and read) before validation stops.
MAX_BAD_ROWS = 10
# A "label" column with more distinct values than this is not a class label.
MAX_LABELS = 10_000
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_PLURAL: dict[type, str] = {int: "integers", str: "strings"}


def describe_schemas() -> str:
    return "; ".join(f"{n} {{{', '.join(sorted(SCHEMAS[n]))}}}" for n in SCHEMA_NAMES)


@dataclass(frozen=True)
class BadRow:
    row: int | None  # None: the whole file
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "reason": self.reason}

    def __str__(self) -> str:
        return self.reason if self.row is None else f"row {self.row}: {self.reason}"


class DatasetInvalid(CrucibleError):
    """The file is not a valid dataset; detail lists the first bad rows."""

    def __init__(self, bad: Sequence[BadRow], more: bool = False) -> None:
        first = str(bad[0])
        if len(bad) > 1 or more:
            n = len(bad) - 1
            first += (
                f" (and {n}{'+' if more else ''} more bad row{'' if n == 1 and not more else 's'})"
            )
        super().__init__("invalid_dataset", first, {"bad_rows": [b.as_dict() for b in bad]})
        self.bad_rows = list(bad)


@dataclass
class DatasetSummary:
    schema: SchemaName
    rows: int
    # Classification only: [{"label": ..., "count": n}] sorted by label.
    labels: list[dict[str, Any]] = field(default_factory=list)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def detect_schema(columns: Sequence[str]) -> SchemaName:
    """The schema whose columns are exactly these; DatasetInvalid (row 1) otherwise."""
    cols = set(columns)
    unknown = sorted(cols - KNOWN_COLUMNS)
    if unknown:
        raise DatasetInvalid(
            [BadRow(1, f"unknown columns {unknown}; the schemas are: {describe_schemas()}")]
        )
    for name in SCHEMA_NAMES:
        if cols == SCHEMAS[name]:
            return name  # type: ignore[return-value]
    raise DatasetInvalid(
        [
            BadRow(
                1, f"columns {sorted(cols)} match no schema; the schemas are: {describe_schemas()}"
            )
        ]
    )


def normalize_row(row: dict[str, Any], fmt: DatasetFormat) -> dict[str, Any]:
    """The row as consumers see it: CSV labels that are canonical integers become ints."""
    if (
        fmt == "csv"
        and isinstance(row.get("label"), str)
        and _CANONICAL_INT.fullmatch(row["label"])
    ):
        return {**row, "label": int(row["label"])}
    return row


def row_problem(row: dict[str, Any], schema: SchemaName) -> str | None:
    """Why the (normalized) row does not fit the schema, or None when it does."""
    if None in row:  # csv.DictReader puts surplus fields under the key None
        return "more fields than the header"
    expected = SCHEMAS[schema]
    missing = sorted(expected - set(row))
    unknown = sorted(set(row) - expected)
    if missing or unknown:
        parts = [f"unknown columns {unknown}"] if unknown else []
        parts += [f"missing columns {missing}"] if missing else []
        return f"{'; '.join(parts)} (schema {schema}: {sorted(expected)})"
    for column in sorted(expected - {"label"}):
        value = row[column]
        if not isinstance(value, str):
            return f"{column} is {_type_name(value)}, expected a string"
        if not value.strip():
            return f"{column} is empty"
    if schema == "classification":
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, str | int):
            shown = f" ({label!r})" if isinstance(label, float) and math.isfinite(label) else ""
            return f"label is {_type_name(label)}{shown}; labels are strings or integers"
        if isinstance(label, str) and not label.strip():
            return "label is empty"
    return None


def parse_declared_labels(raw: str) -> list[Label]:
    """The upload form's `labels` field: a JSON list of distinct strings or integers."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f'labels: not JSON ({exc.msg}); send a JSON list, e.g. ["neg", "pos"]'
        ) from None
    if not isinstance(value, list) or not value:
        raise ValueError("labels: expected a non-empty JSON list of strings or integers")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError(
                f"labels: {item!r} is {_type_name(item)}; labels are strings or integers"
            )
        if isinstance(item, str) and not item.strip():
            raise ValueError("labels: an empty label")
    keys = [_label_key(v) for v in value]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"labels: repeated {dupes}")
    return value


def _label_key(label: Label) -> str:
    # Declared labels match data labels by text: ["0", "1"] declares the ints 0 and 1 too.
    return str(label)


def sorted_labels(labels: Sequence[Label]) -> list[Label]:
    """Ints numerically, strings by code point; one type per dataset, but be total anyway."""
    return sorted(
        labels, key=lambda v: (isinstance(v, str), v if isinstance(v, int) else 0, str(v))
    )


def validate_file(
    path: Path, fmt: DatasetFormat, declared_labels: Sequence[Label] | None = None
) -> DatasetSummary:
    """Read the whole file once; the summary, or DatasetInvalid naming the first bad rows."""
    bad: list[BadRow] = []
    counts: Counter[Label] = Counter()
    schema: SchemaName | None = None
    label_type: type | None = None
    allowed = {_label_key(v) for v in declared_labels} if declared_labels else None
    rows = 0
    more = False
    try:
        for row_no, raw in iter_numbered_rows(path, fmt):
            if schema is None:
                schema = detect_schema([k for k in raw if k is not None])
                if declared_labels and schema != "classification":
                    raise DatasetInvalid(
                        [
                            BadRow(
                                None,
                                f"labels were declared but the dataset is {schema}, "
                                "not classification ({text, label})",
                            )
                        ]
                    )
            rows += 1
            row = normalize_row(raw, fmt)
            if fmt == "csv" and None in row.values():  # csv.DictReader pads short rows
                problem: str | None = "fewer fields than the header"
            else:
                problem = row_problem(row, schema)
            if problem is None and schema == "classification":
                label = row["label"]
                if label_type is None:
                    label_type = type(label)
                if not isinstance(label, label_type):
                    problem = (
                        f"label {label!r} is {_type_name(label)} but earlier labels are "
                        f"{_PLURAL[label_type]}; labels must all be one type"
                    )
                elif allowed is not None and _label_key(label) not in allowed:
                    problem = f"label {label!r} is not in the declared label set"
                else:
                    counts[label] += 1
                    if len(counts) > MAX_LABELS:
                        problem = f"more than {MAX_LABELS} distinct labels: is this a class label?"
            if problem is not None:
                bad.append(BadRow(row_no, problem))
                if len(bad) >= MAX_BAD_ROWS:
                    more = True
                    break
    except DatasetFormatError as exc:
        bad.append(BadRow(exc.row, exc.reason))
    if bad:
        raise DatasetInvalid(bad, more)
    if schema is None:
        empty = "the file is empty" if path.stat().st_size == 0 else "the file holds no rows"
        raise DatasetInvalid([BadRow(None, empty)])
    labels: list[dict[str, Any]] = []
    if schema == "classification":
        # Declared labels without rows are listed too (count 0): they are classes all the same.
        values = list(counts) + [
            v for v in declared_labels or [] if _label_key(v) not in {_label_key(c) for c in counts}
        ]
        labels = [{"label": v, "count": counts[v]} for v in sorted_labels(values)]
    return DatasetSummary(schema=schema, rows=rows, labels=labels)


def iter_valid_rows(path: Path, fmt: DatasetFormat) -> Iterator[dict[str, Any]]:
    """A stored (already validated) dataset's rows, normalized as on upload."""
    for _, row in iter_numbered_rows(path, fmt):
        yield normalize_row(row, fmt)
