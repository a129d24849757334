"""Read one tensor (or a block of its rows) at a time from a resolved model.

Bytes are read with `pread` into a fresh buffer rather than memory-mapped: a mapping keeps
every page it touched in the process's resident set until it is closed (a merge of five
1.3 GB models peaked at 10 GB RSS that way), while a buffer is freed with its tensor. The
buffer is private and writable, so in-place ops on it are fast (a private mapping would
take a copy-on-write fault per page).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import torch

from crucible.sources.resolve import ResolvedModel
from crucible.sources.safetensors_header import TensorInfo, torch_name_for_code


class TensorReader:
    """Context manager over a ResolvedModel's weight files.

    A file is opened the first time one of its tensors is read and stays open until exit,
    so reading a sharded model tensor by tensor opens each shard once.
    """

    def __init__(self, model: ResolvedModel) -> None:
        self.model = model
        self._fds: dict[Path, int] = {}
        self._open = False

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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._open = False

    @property
    def open_files(self) -> list[Path]:
        return list(self._fds)

    def names(self) -> list[str]:
        return list(self.model.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.model.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.model.uri}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or rows [start, stop) of it along dim 0, in a fresh buffer."""
        info = self.info(name)
        if not self._open:
            raise RuntimeError("TensorReader is closed: use it as a context manager")
        shape = info.shape
        offset, nbytes = info.start, info.nbytes
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"rows {rows} out of range for {name!r} of shape {shape}")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset += start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape = (stop - start, *shape[1:])
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._pread_into(info.file, buf, offset)
        dtype = getattr(torch, torch_name_for_code(info.dtype))
        return buf.view(dtype).reshape(shape)

    def _pread_into(self, path: Path, buf: torch.Tensor, offset: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"{path}: unexpected end of file at byte {offset + done}")
            done += n
