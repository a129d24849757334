"""Dataset files without the API: streamed reading of each format, schema detection and row
validation, and the deterministic (stratified) split."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.datasets.formats import DatasetFormatError, format_from_filename, iter_rows
from crucible.datasets.schema import (
    MAX_BAD_ROWS,
    DatasetInvalid,
    detect_schema,
    parse_declared_labels,
    validate_file,
)
from crucible.datasets.split import split_indices, split_sizes
from crucible.spec import SplitSpec

ROWS = [
    {"text": "the cat sat", "label": "pets"},
    {"text": 'quotes " and, commas', "label": "misc"},
    {"text": "line\nbreak inside", "label": "pets"},
    {"text": "ünïcödé ✓", "label": "misc"},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 1000) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def bad_rows(exc: pytest.ExceptionInfo[DatasetInvalid]) -> list[tuple[int | None, str]]:
    return [(b["row"], b["reason"]) for b in exc.value.detail["bad_rows"]]


# -- reading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("writer", "fmt"), [(write_jsonl, "jsonl"), (write_csv, "csv"), (write_parquet, "parquet")]
)
def test_each_format_reads_back_the_rows_written(tmp_path: Path, writer: Any, fmt: str) -> None:
    path = writer(tmp_path / f"d.{fmt}", ROWS)
    assert list(iter_rows(path, fmt)) == ROWS  # type: ignore[arg-type]


def test_parquet_is_read_across_row_groups_and_batches(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": i % 7} for i in range(2600)]
    path = write_parquet(tmp_path / "d.parquet", rows, row_group_size=700)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert list(iter_rows(path, "parquet")) == rows


def test_jsonl_skips_blank_lines_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n   \n{"text": "b"}')
    assert list(iter_rows(path, "jsonl")) == [{"text": "a"}, {"text": "b"}]


def test_truncated_jsonl_names_the_line_and_byte(tmp_path: Path) -> None:
    head = b'{"text": "a"}\n{"text": "b"}\n'
    tail = b'{"text": "c", "lab'
    path = tmp_path / "d.jsonl"
    path.write_bytes(head + tail)
    with pytest.raises(DatasetFormatError) as exc:
        list(iter_rows(path, "jsonl"))
    assert exc.value.row == 3
    # json reports the unterminated string at its opening quote.
    offset = len(head) + tail.index(b'"lab')
    assert exc.value.message.startswith(f"line 3: invalid JSON at byte {offset}: ")
    assert "truncated" in exc.value.message


def test_jsonl_array_and_non_object_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"}\n]\n')
    with pytest.raises(DatasetFormatError, match=r"line 1: invalid JSON .*JSON array"):
        list(iter_rows(path, "jsonl"))
    path.write_text('{"text": "a"}\n"just a string"\n')
    with pytest.raises(DatasetFormatError, match="line 2: expected a JSON object, got str"):
        list(iter_rows(path, "jsonl"))


def test_invalid_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    content = b'{"text": "a"}\n{"text": "\xff"}\n'
    path.write_bytes(content)
    at = content.index(b"\xff")
    with pytest.raises(DatasetFormatError, match=rf"line 2: not valid UTF-8 at byte {at}"):
        list(iter_rows(path, "jsonl"))


def test_truncated_parquet_is_an_error(tmp_path: Path) -> None:
    whole = write_parquet(tmp_path / "d.parquet", ROWS).read_bytes()
    path = tmp_path / "cut.parquet"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetFormatError, match="Parquet"):
        list(iter_rows(path, "parquet"))


def test_format_from_filename() -> None:
    assert format_from_filename("a.JSONL") == "jsonl"
    assert format_from_filename("a.json") == "jsonl"
    assert format_from_filename("dir/a.csv") == "csv"
    assert format_from_filename("a.parquet") == "parquet"
    assert format_from_filename("a.txt") is None
    assert format_from_filename("noext") is None


# -- schemas and validation ----------------------------------------------------------------


def test_schemas_are_detected_from_the_columns() -> None:
    assert detect_schema(["label", "text"]) == "classification"
    assert detect_schema(["text"]) == "text"
    assert detect_schema(["completion", "prompt"]) == "prompt_completion"
    with pytest.raises(DatasetInvalid, match=r"row 1: unknown columns \['sentence'\]"):
        detect_schema(["sentence", "label"])
    with pytest.raises(DatasetInvalid, match=r"columns \['label'\] match no schema"):
        detect_schema(["label"])


@pytest.mark.parametrize(
    ("writer", "fmt"), [(write_jsonl, "jsonl"), (write_csv, "csv"), (write_parquet, "parquet")]
)
def test_summary_counts_labels(tmp_path: Path, writer: Any, fmt: str) -> None:
    rng = random.Random(5)
    rows = [{"text": f"t{i}", "label": rng.choice(["b", "a", "c"])} for i in range(50)]
    summary = validate_file(writer(tmp_path / f"d.{fmt}", rows), fmt)
    counts = Counter(r["label"] for r in rows)
    assert summary.schema == "classification" and summary.rows == 50
    assert summary.labels == [{"label": k, "count": counts[k]} for k in sorted(counts)]


def test_csv_integer_labels_are_integers(tmp_path: Path) -> None:
    rows = [{"text": "x", "label": v} for v in (10, 2, -1, 2)]
    summary = validate_file(write_csv(tmp_path / "d.csv", rows), "csv")
    # Sorted numerically, not as text ("-1" < "10" < "2").
    assert summary.labels == [
        {"label": -1, "count": 1},
        {"label": 2, "count": 2},
        {"label": 10, "count": 1},
    ]


def test_text_and_prompt_completion(tmp_path: Path) -> None:
    text = validate_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}]), "jsonl")
    assert (text.schema, text.rows, text.labels) == ("text", 2, [])
    rows = [{"prompt": "2+2=", "completion": "4"}]
    pc = validate_file(write_parquet(tmp_path / "p.parquet", rows), "parquet")
    assert (pc.schema, pc.rows) == ("prompt_completion", 1)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"text": "a", "label": 1.5}], [(1, "label is a float (1.5); labels are strings or")]),
        ([{"text": "a", "label": [1]}], [(1, "label is a list; labels are")]),
        ([{"text": "a", "label": True}], [(1, "label is a boolean")]),
        ([{"text": "a", "label": None}], [(1, "label is null")]),
        ([{"text": "a", "label": " "}], [(1, "label is empty")]),
        ([{"text": 3, "label": "x"}], [(1, "text is an integer, expected a string")]),
        ([{"text": "", "label": "x"}], [(1, "text is empty")]),
        ([{"text": "a", "label": "x"}, {"text": "b"}], [(2, "missing columns ['label']")]),
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": "y", "extra": 1}],
            [(2, "unknown columns ['extra']")],
        ),
        (
            [{"text": "a", "label": 1}, {"text": "b", "label": "x"}],
            [(2, "label 'x' is a string but earlier labels are integers")],
        ),
        ([{"prompt": "p", "completion": None}], [(1, "completion is null")]),
    ],
)
def test_bad_rows_are_named_with_their_reason(
    tmp_path: Path, rows: list[dict[str, Any]], expected: list[tuple[int, str]]
) -> None:
    with pytest.raises(DatasetInvalid) as exc:
        validate_file(write_jsonl(tmp_path / "d.jsonl", rows), "jsonl")
    got = bad_rows(exc)
    assert [r for r, _ in got] == [r for r, _ in expected]
    for (_, reason), (_, want) in zip(got, expected, strict=True):
        assert reason.startswith(want), reason
    assert exc.value.code == "invalid_dataset"
    assert exc.value.message.startswith(f"row {expected[0][0]}: {expected[0][1]}")


def test_every_bad_row_up_to_the_cap_is_listed(tmp_path: Path) -> None:
    rows = [{"text": "ok", "label": "a"}] + [{"text": "", "label": "a"}] * (MAX_BAD_ROWS + 5)
    with pytest.raises(DatasetInvalid) as exc:
        validate_file(write_jsonl(tmp_path / "d.jsonl", rows), "jsonl")
    assert [r for r, _ in bad_rows(exc)] == list(range(2, 2 + MAX_BAD_ROWS))
    assert f"(and {MAX_BAD_ROWS - 1}+ more bad rows)" in exc.value.message


def test_bad_rows_then_a_truncated_end_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 2.5}\n{"text": "b", "label": 1}\n{"text": "c", "la')
    with pytest.raises(DatasetInvalid) as exc:
        validate_file(path, "jsonl")
    got = bad_rows(exc)
    assert [r for r, _ in got] == [1, 3]
    assert got[1][1].startswith("invalid JSON at byte")


def test_csv_short_and_long_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb\nc,y,z\n")
    with pytest.raises(DatasetInvalid) as exc:
        validate_file(path, "csv")
    assert bad_rows(exc) == [
        (2, "fewer fields than the header"),
        (3, "more fields than the header"),
    ]


@pytest.mark.parametrize(
    ("content", "fmt", "reason"),
    [
        (b"", "jsonl", "the file is empty"),
        (b"\n\n", "jsonl", "the file holds no rows"),
        (b"", "csv", "the file is empty"),
        (b"text,label\n", "csv", "the file holds no rows"),
    ],
)
def test_empty_files(tmp_path: Path, content: bytes, fmt: str, reason: str) -> None:
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(content)
    with pytest.raises(DatasetInvalid) as exc:
        validate_file(path, fmt)  # type: ignore[arg-type]
    assert bad_rows(exc) == [(None, reason)] and exc.value.message == reason


def test_empty_parquet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    pq.write_table(pa.Table.from_pylist([], schema=schema), path)
    with pytest.raises(DatasetInvalid, match="the file holds no rows"):
        validate_file(path, "parquet")


def test_parquet_float_labels_are_bad(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"text": "a", "label": 0.0}])
    with pytest.raises(DatasetInvalid, match=r"row 1: label is a float \(0.0\)"):
        validate_file(path, "parquet")


def test_declared_label_set(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 2}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetInvalid) as exc:
        validate_file(path, "jsonl", [0, 1])
    assert bad_rows(exc) == [(3, "label 2 is not in the declared label set")]
    # Declared labels without rows are still classes (count 0); "3" declares the int 3.
    summary = validate_file(path, "jsonl", [0, 1, 2, "3"])
    assert summary.labels == [
        {"label": 0, "count": 1},
        {"label": 1, "count": 1},
        {"label": 2, "count": 1},
        {"label": "3", "count": 0},
    ]
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DatasetInvalid, match="labels were declared but the dataset is text"):
        validate_file(text, "jsonl", ["a"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("neg,pos", "labels: not JSON"),
        ("[]", "non-empty JSON list"),
        ('{"a": 1}', "non-empty JSON list"),
        ("[1.5]", "1.5 is a float"),
        ('["a", "a"]', "repeated ['a']"),
        ('[1, "1"]', "repeated ['1']"),
        ('[""]', "an empty label"),
    ],
)
def test_declared_labels_parse_errors(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_declared_labels(raw)
    assert parse_declared_labels('["neg", "pos"]') == ["neg", "pos"]


# -- split ---------------------------------------------------------------------------------


def reference_split(n: int, v: float, t: float, seed: int) -> tuple[list[int], list[int]]:
    """The documented algorithm, written out: seeded shuffle, half-up sizes, slice."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(v * n + 0.5)
    n_test = min(int(t * n + 0.5), n - n_val)
    return sorted(order[:n_val]), sorted(order[n_val : n_val + n_test])


@pytest.mark.parametrize(
    ("n", "v", "t", "seed"), [(10, 0.5, 0.5, 0), (101, 0.3, 0.2, 7), (1000, 0.1, 0.9, 123)]
)
def test_split_follows_the_documented_algorithm(n: int, v: float, t: float, seed: int) -> None:
    val, test = split_indices(n, SplitSpec(validation=v, test=t, seed=seed))
    assert (val, test) == reference_split(n, v, t, seed)
    assert len(val) == int(v * n + 0.5) and not set(val) & set(test)
    assert (val, test) == split_indices(n, SplitSpec(validation=v, test=t, seed=seed))
    other = split_indices(n, SplitSpec(validation=v, test=t, seed=seed + 1))
    assert other != (val, test)


def test_split_is_the_same_in_another_process() -> None:
    code = (
        "from crucible.datasets.split import split_indices; from crucible.spec import SplitSpec;"
        "print(split_indices(50, SplitSpec(validation=0.4, test=0.4, seed=3),"
        " ['ab'[i % 2] for i in range(50)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    here = split_indices(
        50, SplitSpec(validation=0.4, test=0.4, seed=3), ["ab"[i % 2] for i in range(50)]
    )
    assert out.strip() == str(here)


def test_small_splits_are_never_empty() -> None:
    assert split_sizes(2, 0.5, 0.5) == (1, 1)
    assert split_sizes(3, 0.5, 0.5) == (2, 1)
    assert split_sizes(2, 0.01, 0.01) == (1, 1)
    assert split_sizes(2, 0.99, 0.01) == (1, 1)
    assert split_sizes(1, 0.5, 0.5) == (1, 0)
    assert split_sizes(0, 0.5, 0.5) == (0, 0)
    assert split_sizes(10, 1.0, 0.0) == (10, 0)
    assert split_sizes(10, 0.25, 0.25) == (3, 3)  # half up: 2.5 -> 3
    for n in range(2, 40):
        v, t = split_sizes(n, 0.5, 0.5)
        assert v >= 1 and t >= 1 and v + t <= n


def test_stratified_split_holds_every_label_in_both_splits() -> None:
    rng = random.Random(1)
    labels = ["common"] * 80 + ["rare"] * 3 + ["pair"] * 2 + ["single"]
    rng.shuffle(labels)
    split = SplitSpec(validation=0.5, test=0.5, seed=9)
    val, test = split_indices(len(labels), split, labels)
    assert not set(val) & set(test) and val == sorted(val) and test == sorted(test)
    for label, count in Counter(labels).items():
        in_val = sum(labels[i] == label for i in val)
        in_test = sum(labels[i] == label for i in test)
        assert (in_val, in_test) == split_sizes(count, 0.5, 0.5), label
    # Every label with two or more rows is in both splits; a single row goes to validation.
    assert {labels[i] for i in test} == {"common", "rare", "pair"}
    assert {labels[i] for i in val} == {"common", "rare", "pair", "single"}
    assert (val, test) == split_indices(len(labels), split, list(labels))


def test_stratified_split_keeps_proportions() -> None:
    labels = [0] * 90 + [1] * 10
    val, test = split_indices(100, SplitSpec(validation=0.2, test=0.3, seed=0), labels)
    assert Counter(labels[i] for i in val) == {0: 18, 1: 2}
    assert Counter(labels[i] for i in test) == {0: 27, 1: 3}


def test_split_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        split_indices(4, SplitSpec(), ["a", "b", "a"])
    with pytest.raises(ValueError, match=">= 0"):
        split_indices(-1, SplitSpec())
