"""safetensors headers, parsed and validated without torch.

The resolve stage reads every header before any weight is touched, so a corrupt or truncated
file fails the job early with `corrupt_safetensors` instead of deep inside a merge. The checks
mirror what the safetensors library itself enforces at load time (the data section must be
covered exactly, tensor after tensor), so a file that passes here also opens in `safe_open`.

File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (possibly padded
with spaces), then the data section. JSON maps tensor name -> {"dtype", "shape",
"data_offsets": [begin, end]} (offsets relative to the data section), plus an optional
"__metadata__" object of string -> string.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.errors import CrucibleError

# The safetensors library refuses headers above 100 MB; so do we (a garbage length prefix
# would otherwise make us read gigabytes as "JSON").
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class DTypeInfo:
    code: str  # safetensors dtype code, e.g. "BF16"
    itemsize: int  # bytes per element
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"
    is_float: bool


# Byte-aligned safetensors dtypes that torch can hold. Sub-byte codes (F4, F6_*) and F8_E8M0
# are valid safetensors but are not merged by this service.
DTYPES: dict[str, DTypeInfo] = {
    info.code: info
    for info in (
        DTypeInfo("BOOL", 1, "bool", False),
        DTypeInfo("U8", 1, "uint8", False),
        DTypeInfo("I8", 1, "int8", False),
        DTypeInfo("U16", 2, "uint16", False),
        DTypeInfo("I16", 2, "int16", False),
        DTypeInfo("U32", 4, "uint32", False),
        DTypeInfo("I32", 4, "int32", False),
        DTypeInfo("U64", 8, "uint64", False),
        DTypeInfo("I64", 8, "int64", False),
        DTypeInfo("F8_E4M3", 1, "float8_e4m3fn", True),
        DTypeInfo("F8_E4M3FNUZ", 1, "float8_e4m3fnuz", True),
        DTypeInfo("F8_E5M2", 1, "float8_e5m2", True),
        DTypeInfo("F8_E5M2FNUZ", 1, "float8_e5m2fnuz", True),
        DTypeInfo("F16", 2, "float16", True),
        DTypeInfo("BF16", 2, "bfloat16", True),
        DTypeInfo("F32", 4, "float32", True),
        DTypeInfo("F64", 8, "float64", True),
        DTypeInfo("C64", 8, "complex64", False),
    )
}

# torch dtype name (also the MergeSpec output dtype vocabulary) -> safetensors code.
CODE_BY_TORCH_NAME: dict[str, str] = {info.torch_name: code for code, info in DTYPES.items()}


def dtype_itemsize(code: str) -> int:
    return DTYPES[code].itemsize


def torch_name_for_code(code: str) -> str:
    """ "BF16" -> "bfloat16" (use as getattr(torch, name))."""
    return DTYPES[code].torch_name


def code_for_torch_name(name: str) -> str:
    """ "bfloat16" or "torch.bfloat16" -> "BF16"; KeyError for dtypes safetensors lacks."""
    return CODE_BY_TORCH_NAME[name.removeprefix("torch.")]


def tensor_nbytes(code: str, shape: tuple[int, ...]) -> int:
    return DTYPES[code].itemsize * math.prod(shape)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: "F32", "BF16", ...
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the first data byte in `file`
    end: int  # absolute byte offset one past the last data byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, what: str) -> CrucibleError:
    return CrucibleError(
        "corrupt_safetensors",
        f"{path.name}: {what}",
        {"file": str(path), "problem": what},
    )


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last duplicate silently; a header naming a tensor twice is corrupt.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` object of a file (validated like the rest of the header)."""
    return _parse(Path(path))[1]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of one .safetensors file.

    Returns tensor name -> TensorInfo in header order. Raises
    CrucibleError("corrupt_safetensors") naming the file and the problem.
    """
    return _parse(Path(path))[0]


def _parse(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        file_size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(
                    path, f"file is {file_size} bytes, too short for the 8-byte header length"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _corrupt(
                    path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
                )
            if 8 + header_len > file_size:
                raise _corrupt(
                    path,
                    f"header length {header_len} runs past the end of the file "
                    f"({file_size} bytes): truncated or not a safetensors file",
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise _corrupt(path, f"cannot be read ({exc.strerror or exc})") from exc
    return parse_header_bytes(path, raw, file_size)


def parse_header_bytes(
    path: Path, raw: bytes, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header `raw` (the bytes after the 8-byte length) of `path`, a file
    of `file_size` bytes: (tensors, metadata). For headers read elsewhere than from a local
    file (HTTP range reads, crucible/sources/remote.py); `path` names the file in errors
    and in each TensorInfo."""
    header_len = len(raw)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt(path, f"entry for tensor {name!r} is not an object")
        code = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(code, str):
            raise _corrupt(path, f"tensor {name!r} has no dtype")
        if code not in DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = tensor_nbytes(code, tuple(shape))
        if end - begin != expected:
            raise _corrupt(
                path,
                f"tensor {name!r} spans {end - begin} bytes but {code} {tuple(shape)} "
                f"needs {expected}",
            )
        if end > data_len:
            raise _corrupt(
                path,
                f"tensor {name!r} ends at data byte {end} but the file holds only {data_len} "
                "data bytes: truncated",
            )
        tensors[name] = TensorInfo(
            name=name,
            dtype=code,
            shape=tuple(shape),
            file=path,
            start=data_start + begin,
            end=data_start + end,
        )
        spans.append((begin, end, name))

    # Tensors must tile the data section exactly: no overlap, no hole, no trailing bytes.
    spans.sort()
    cursor = 0
    previous = None
    for begin, end, name in spans:
        if begin < cursor:
            raise _corrupt(path, f"tensor {name!r} overlaps tensor {previous!r}")
        if begin > cursor:
            raise _corrupt(path, f"{begin - cursor} unaccounted bytes before tensor {name!r} (gap)")
        cursor = end
        if end > begin:
            previous = name
    if cursor != data_len:
        raise _corrupt(path, f"{data_len - cursor} trailing bytes after the last tensor's data")
    return tensors, dict(metadata)
