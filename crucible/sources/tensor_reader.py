"""Read one tensor (or a block of its rows) at a time from a resolved model.

Bytes are read with `pread` into a fresh buffer rather than memory-mapped: a mapping keeps
every page it touched in the process's resident set until it is closed (a merge of five
1.3 GB models peaked at 10 GB RSS that way), while a buffer is freed with its tensor. The
buffer is private and writable, so in-place ops on it are fast (a private mapping would
take a copy-on-write fault per page).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch

from crucible.methods.linalg import FLOAT64_MAX_ELEMENTS
from crucible.sources.adapter import LoraDelta
from crucible.sources.byte_source import ByteSource, open_source, pread_view
from crucible.sources.resolve import ResolvedModel
from crucible.sources.safetensors_header import TensorInfo, torch_name_for_code


def pread_exact(fd: int, buf: torch.Tensor, offset: int, path: Path) -> None:
    """Fill the uint8 tensor `buf` from `fd` at `offset` (preadv may return short reads)."""
    pread_view(fd, memoryview(buf.numpy()), offset, path)


class TensorReader:
    """Context manager over a ResolvedModel's weight files.

    A file is opened the first time one of its tensors is read and stays open until exit,
    so reading a sharded model tensor by tensor opens each shard once.
    """

    def __init__(self, model: ResolvedModel) -> None:
        self.model = model
        # One byte source per weight file: the local file, or HTTP range reads for a model
        # whose weights are streamed (model.remote; crucible/sources/remote.py).
        self._sources: dict[Path, ByteSource] = {}
        self._open = False
        # (the factors' infos and dtype, B, A) of the adapter module read last
        self._factors: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> TensorReader:
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
        self._sources.clear()
        self._open = False

    @property
    def open_files(self) -> list[Path]:
        return list(self._sources)

    def names(self) -> list[str]:
        return list(self.model.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.model.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.model.uri}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or rows [start, stop) of it along dim 0, in a fresh buffer.
        For an adapter's module: the base's rows plus ΔW's, in float64 (or float32)."""
        raw = self._read_info(self.info(name), rows)
        delta = self.delta(name, rows)
        if delta is None:
            return raw
        return raw.to(delta.dtype).add_(delta)

    def delta(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """An adapter module's ΔW = scaling · B A (rows of it) in the base tensor's layout;
        None for a tensor the adapter does not factor (a full model's, or untouched)."""
        plan = self.model.adapter
        lora = plan.deltas.get(name) if plan is not None else None
        if lora is None:
            return None
        return self.lora_delta(lora, self.info(name).shape, rows)

    def lora_factors(
        self, lora: LoraDelta, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of a module in `dtype`, in nn.Linear layout: ΔW_linear = scaling · B A.
        The last module's are kept: a blockwise merge reads them once, not once per block."""
        key = (lora.a, lora.b, dtype)
        if self._factors is None or self._factors[0] != key:
            a = self._read_info(lora.a, None).to(dtype)
            b = self._read_info(lora.b, None).to(dtype)
            self._factors = (key, b, a)
        return self._factors[1], self._factors[2]

    def lora_delta(
        self, lora: LoraDelta, shape: tuple[int, ...], rows: tuple[int, int] | None
    ) -> torch.Tensor:
        count = (rows[1] - rows[0]) if rows is not None else shape[0]
        numel = count * (shape[1] if len(shape) > 1 else 1)
        dtype = torch.float64 if numel <= FLOAT64_MAX_ELEMENTS else torch.float32
        b, a = self.lora_factors(lora, dtype)
        if lora.transposed:  # base rows are columns of B A
            cols = a if rows is None else a[:, rows[0] : rows[1]]
            out = (b @ cols).T
        else:
            out = (b if rows is None else b[rows[0] : rows[1]]) @ a
        return out.contiguous().mul_(lora.scaling)

    def read_into(self, name: str, rows: tuple[int, int] | None, out: torch.Tensor) -> torch.Tensor:
        """The stored tensor `name` (or rows of it), read into the front of the uint8 tensor
        `out` and returned as a view of it: no allocation, so a caller can reuse buffers.
        The bytes as stored: an adapter's ΔW is not added."""
        return self._read_info(self.info(name), rows, out)

    def _read_info(
        self, info: TensorInfo, rows: tuple[int, int] | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self._open:
            raise RuntimeError("TensorReader is closed: use it as a context manager")
        offset, nbytes, shape = _byte_range(info, rows)
        if out is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() < nbytes or not out.is_contiguous():
            raise ValueError(f"{info.name!r}: the buffer cannot hold {nbytes} bytes")
        else:
            buf = out[:nbytes]
        if nbytes:
            self._pread_into(info.file, buf, offset)
        dtype = getattr(torch, torch_name_for_code(info.dtype))
        return buf.view(dtype).reshape(shape)

    def _source(self, path: Path) -> ByteSource:
        source = self._sources.get(path)
        if source is None:
            source = self._sources[path] = open_source(path, self.model.remote)
        return source

    def _pread_into(self, path: Path, buf: torch.Tensor, offset: int) -> None:
        self._source(path).read_into(offset, memoryview(buf.numpy()))


def _byte_range(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """(file offset, byte count, shape) of the tensor, or of rows [start, stop) of it."""
    shape = tuple(info.shape)
    offset, nbytes = info.start, info.nbytes
    if rows is not None:
        start, stop = rows
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {rows} out of range for {info.name!r} of shape {shape}")
        row_bytes = nbytes // shape[0] if shape[0] else 0
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
        shape = (stop - start, *shape[1:])
    return offset, nbytes, shape
