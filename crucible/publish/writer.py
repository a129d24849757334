"""Streaming, sharded safetensors writer with memory bounded by one tensor.

Every output tensor's name, shape and dtype is known before the merge starts (from the input
headers), so the whole layout (which shard, which byte offset) is fixed up front. Each shard's
header is written when the shard is opened and tensor bytes go straight to their offsets as
`write()` is called: no shard is ever assembled in memory, unlike `safetensors.save_file`.

Files appear under temporary names and are renamed on `close()`, so a crashed or aborted job
never leaves a half-written `model.safetensors` that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import torch

from crucible.sources.safetensors_header import DTYPES, torch_name_for_code

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# (name, shape, safetensors dtype code of the output)
PlanItem = tuple[str, tuple[int, ...], str]


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    code: str
    nbytes: int
    shard: int
    offset: int = 0  # relative to the shard's data section


@dataclass
class _Shard:
    entries: list[_Entry] = field(default_factory=list)
    data_len: int = 0
    filename: str = ""
    tmp_path: Path | None = None
    header: bytes = b""


def shard_filename(index: int, count: int) -> str:
    """transformers' naming: model.safetensors, or model-00001-of-00003.safetensors."""
    if count == 1:
        return SINGLE_FILE
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Write tensors, in plan order, into shards of at most `shard_size` bytes of data.

    Shards are filled greedily in plan order; a tensor larger than `shard_size` gets a shard
    of its own. Use as a context manager: leaving the block normally calls close(), leaving
    it with an exception calls abort().
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[PlanItem],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        only_shards: set[int] | None = None,
    ) -> None:
        """`only_shards`: write just these shards (a scale-out part, crucible.parts): the
        layout is still the whole plan's, so each file is byte-identical to the one a full
        run writes; `write()` takes only their tensors, `close()` writes no index."""
        if sys.byteorder != "little":  # safetensors is little-endian; we copy raw bytes
            raise RuntimeError("ShardedSafetensorsWriter needs a little-endian machine")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        meta = {"format": "pt", **(metadata or {})}  # transformers refuses files without it
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self._entries = self._validate(plan)
        self._shards = self._layout(self._entries, shard_size)
        self._metadata = meta
        self._tag = uuid.uuid4().hex[:8]
        for i, shard in enumerate(self._shards):
            shard.filename = shard_filename(i, len(self._shards))
            shard.header = self._header(shard)
        self._only = only_shards
        # The tensors to write: the whole plan, or the (contiguous) range of the selected
        # shards' entries (shards take consecutive plan entries).
        chosen = [
            i for i, e in enumerate(self._entries) if only_shards is None or e.shard in only_shards
        ]
        self._next = chosen[0] if chosen else len(self._entries)
        self._end = chosen[-1] + 1 if chosen else len(self._entries)
        self._rows_done = 0  # rows of the current tensor written so far (block writes)
        self._open_shard: int | None = None
        self._fh: IO[bytes] | None = None
        self._created: list[Path] = []  # every path this writer made, temp or final
        self._closed = False
        self._finished = False

    # -------------------------------------------------------------- layout

    @staticmethod
    def _validate(plan: list[PlanItem]) -> list[_Entry]:
        entries: list[_Entry] = []
        seen: set[str] = set()
        for item in plan:
            name, shape, code = item
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r} in plan")
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the plan")
            if code not in DTYPES:
                raise ValueError(f"tensor {name!r}: unknown safetensors dtype {code!r}")
            shape = tuple(shape)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: invalid shape {shape!r}")
            seen.add(name)
            nbytes = DTYPES[code].itemsize * math.prod(shape)
            entries.append(_Entry(name, shape, code, nbytes, shard=-1))
        return entries

    @staticmethod
    def _layout(entries: list[_Entry], shard_size: int) -> list[_Shard]:
        shards = [_Shard()]
        for entry in entries:
            current = shards[-1]
            if current.entries and current.data_len + entry.nbytes > shard_size:
                current = _Shard()
                shards.append(current)
            entry.shard = len(shards) - 1
            current.entries.append(entry)
            current.data_len += entry.nbytes
        for shard in shards:
            # Place wider dtypes first so every tensor starts at a multiple of its item size
            # (the header is padded to 8 bytes), as safetensors' own writer does; mmapped
            # reads then never see a misaligned tensor. Plan order is kept within a width.
            offset = 0
            for entry in sorted(shard.entries, key=lambda e: -DTYPES[e.code].itemsize):
                entry.offset = offset
                offset += entry.nbytes
        return shards

    def _header(self, shard: _Shard) -> bytes:
        header: dict[str, object] = {"__metadata__": self._metadata}
        for entry in sorted(shard.entries, key=lambda e: e.offset):
            header[entry.name] = {
                "dtype": entry.code,
                "shape": list(entry.shape),
                "data_offsets": [entry.offset, entry.offset + entry.nbytes],
            }
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    # -------------------------------------------------------------- info

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    @property
    def total_size(self) -> int:
        return sum(e.nbytes for e in self._entries)

    @property
    def written(self) -> int:
        """How many tensors have been written so far."""
        return self._next

    @property
    def weight_map(self) -> dict[str, str]:
        return {e.name: self._shards[e.shard].filename for e in self._entries}

    @property
    def shard_files(self) -> list[tuple[str, int]]:
        """(file name, file size in bytes) of every shard of the layout, in order."""
        return [(s.filename, len(s.header) + s.data_len) for s in self._shards]

    def tensor_names(self) -> list[str]:
        """The tensors this writer takes, in order (only the selected shards' ones)."""
        return [e.name for e in self._entries if self._only is None or e.shard in self._only]

    def index_text(self) -> str:
        """model.safetensors.index.json of the whole layout (written by close() when there
        are several shards; by the scale-out assembly from the same layout)."""
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        return json.dumps(index, indent=2) + "\n"

    # -------------------------------------------------------------- writing

    def _tmp_path(self, filename: str) -> Path:
        return self.out_dir / f".{filename}.{self._tag}.partial"

    def _start_shard(self, index: int) -> None:
        self._finish_shard()
        shard = self._shards[index]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shard.tmp_path = self._tmp_path(shard.filename)
        self._created.append(shard.tmp_path)
        self._fh = shard.tmp_path.open("wb")
        self._fh.write(shard.header)
        self._open_shard = index

    def _finish_shard(self) -> None:
        if self._fh is None or self._open_shard is None:
            return
        shard = self._shards[self._open_shard]
        self._fh.close()
        self._fh = None
        self._open_shard = None
        assert shard.tmp_path is not None
        size = shard.tmp_path.stat().st_size
        expected = len(shard.header) + shard.data_len
        if size != expected:
            raise RuntimeError(f"{shard.filename}: wrote {size} bytes, expected {expected}")

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write the next tensor of the plan, whole or in consecutive blocks of rows.

        A block holds rows [first_row, first_row + len) along dim 0 with every other dim
        whole; blocks must come in order. The tensor is done when its last row is written.
        Casts to the planned dtype if needed.
        """
        if self._closed:
            raise RuntimeError("writer is closed")
        if self._next >= self._end:
            raise ValueError(f"cannot write {name!r}: every tensor of the plan is written")
        entry = self._entries[self._next]
        if name != entry.name:
            where = "is not in the plan" if name not in self.weight_map else "is out of order"
            raise ValueError(
                f"tensor {name!r} {where}: the plan expects {entry.name!r} next "
                f"(tensor {self._next + 1} of {len(self._entries)})"
            )
        shape = tuple(tensor.shape)
        whole = first_row == 0 and shape == entry.shape
        if not whole and (not entry.shape or not shape or shape[1:] != entry.shape[1:]):
            raise ValueError(f"tensor {name!r} has shape {shape}, the plan says {entry.shape}")
        if not whole and (first_row != self._rows_done or first_row + shape[0] > entry.shape[0]):
            raise ValueError(
                f"tensor {name!r}: a block of shape {shape} at row {first_row} does not "
                f"continue the plan's {entry.shape} (rows written so far: {self._rows_done})"
            )
        target = getattr(torch, torch_name_for_code(entry.code))
        data = tensor.detach()
        if data.dtype != target:
            if not (data.dtype.is_floating_point and target.is_floating_point):
                raise ValueError(
                    f"tensor {name!r} is {data.dtype}, the plan says {target}: only floating "
                    "point tensors are cast"
                )
            data = data.to(target)
        data = data.to("cpu").contiguous()

        if self._open_shard != entry.shard:
            self._start_shard(entry.shard)
        assert self._fh is not None
        if data.numel():
            # Reinterpret as bytes without copying (bf16 has no numpy dtype, uint8 does).
            raw = data.reshape(-1).view(torch.uint8).numpy()
            row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else 0
            offset = entry.offset + first_row * row_bytes
            self._fh.seek(len(self._shards[entry.shard].header) + offset)
            self._fh.write(memoryview(raw))
        if whole:
            self._rows_done = entry.shape[0] if entry.shape else 0
        else:
            self._rows_done = first_row + shape[0]
        if entry.shape and self._rows_done < entry.shape[0]:
            return
        self._rows_done = 0
        self._next += 1
        shard = self._shards[entry.shard]
        if entry is shard.entries[-1]:
            self._finish_shard()

    def close(self) -> list[Path]:
        """Finish: check that every tensor was written, rename files into place.

        Returns the final paths: the shards, then the index (multi-shard only).
        """
        if self._closed:
            raise RuntimeError("writer is already closed")
        if self._next != self._end:
            missing = [e.name for e in self._entries[self._next : self._end]]
            raise ValueError(
                f"{len(missing)} planned tensors were not written, first {missing[0]!r}"
            )
        self._finish_shard()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for i, shard in enumerate(self._shards):
            if self._only is not None and i not in self._only:
                continue
            if shard.tmp_path is None:  # an empty plan: a header-only file
                shard.tmp_path = self._tmp_path(shard.filename)
                self._created.append(shard.tmp_path)
                shard.tmp_path.write_bytes(shard.header)
        pending: list[tuple[Path, Path]] = [
            (s.tmp_path, self.out_dir / s.filename) for s in self._shards if s.tmp_path
        ]
        if len(self._shards) > 1 and self._only is None:
            tmp = self._tmp_path(INDEX_FILE)
            self._created.append(tmp)
            tmp.write_text(self.index_text(), encoding="utf-8")
            pending.append((tmp, self.out_dir / INDEX_FILE))
        final: list[Path] = []
        for tmp, dest in pending:
            os.replace(tmp, dest)
            self._created.append(dest)
            final.append(dest)
        self._closed = True
        self._finished = True
        return final

    def abort(self) -> None:
        """Remove every file this writer created (temporary, or renamed by a close() that
        failed half-way). After a successful close() it does nothing: the output is done."""
        if self._finished:
            return
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._open_shard = None
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()
        self._closed = True

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
