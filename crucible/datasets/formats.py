"""Reading dataset files row by row: JSON Lines, CSV and Parquet, never the whole file at once.

Row numbers in errors are 1-based: the line number for JSON Lines (blank lines are skipped
but counted, so the number is the one an editor shows), the record number after the header
for CSV, the record number for Parquet.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from crucible.errors import CrucibleError

DatasetFormat = Literal["jsonl", "csv", "parquet"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)
# File extensions a format is inferred from (.json is read as JSON Lines).
EXTENSIONS: dict[str, DatasetFormat] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Parquet rows decoded at once: bounds memory whatever the row-group size.
_PARQUET_BATCH_ROWS = 1024
# CSV fields may hold long documents; the csv module's default cap is 128 KiB.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


class DatasetFormatError(CrucibleError):
    """The file cannot be read as its format (truncated, not UTF-8, malformed); `row` is
    the 1-based row (line for JSON Lines) where reading stopped, None for the whole file;
    `reason` is the message without that location."""

    def __init__(self, reason: str, row: int | None = None, unit: str = "row") -> None:
        message = reason if row is None else f"{unit} {row}: {reason}"
        super().__init__("invalid_dataset", message, {"row": row} if row is not None else None)
        self.row = row
        self.reason = reason


def format_from_filename(filename: str) -> DatasetFormat | None:
    """The format an extension names, or None when it names none we read."""
    return EXTENSIONS.get(Path(filename).suffix.lower())


def iter_rows(path: Path, fmt: DatasetFormat) -> Iterator[dict[str, Any]]:
    """The file's rows as dicts, streamed; DatasetFormatError where the file is unreadable."""
    for _, row in iter_numbered_rows(path, fmt):
        yield row


def iter_numbered_rows(path: Path, fmt: DatasetFormat) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs; the number is the one errors name (see the module doc)."""
    if fmt == "jsonl":
        return _jsonl(path)
    if fmt == "csv":
        return _csv(path)
    if fmt == "parquet":
        return _parquet(path)
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    offset = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(
                    f"not valid UTF-8 at byte {start + exc.start}", line_no, "line"
                ) from exc
            if line_no == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if line_no == 1 and line.lstrip().startswith("["):
                    hint = " (a JSON array is not read: upload JSON Lines, one object per line)"
                elif not raw.endswith(b"\n"):
                    hint = " (the file ends mid-record: truncated?)"
                raise DatasetFormatError(
                    f"invalid JSON at byte {start + len(line[: exc.pos].encode())}: "
                    f"{exc.msg}{hint}",
                    line_no,
                    "line",
                ) from exc
            if not isinstance(value, dict):
                raise DatasetFormatError(
                    f"expected a JSON object, got {type(value).__name__}", line_no, "line"
                )
            yield line_no, value


def _csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    row_no = 0
    # utf-8-sig drops the byte-order mark spreadsheet programs write.
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                row_no += 1
                yield row_no, row
        except UnicodeDecodeError as exc:
            raise DatasetFormatError("not valid UTF-8", row_no + 1) from exc
        except csv.Error as exc:
            raise DatasetFormatError(
                f"malformed CSV (file line {reader.line_num}): {exc}", row_no + 1
            ) from exc


def _parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"not a readable Parquet file (truncated?): {exc}") from exc
    row_no = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(
            f"Parquet data unreadable (corrupt or truncated): {exc}", row_no + 1
        ) from exc
