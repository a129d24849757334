"""Where a weight file's bytes come from: `read_into(offset, view)` fills a buffer exactly.

TensorReader reads every tensor through one ByteSource per weight file: a local file with
`pread` (LocalFile), or a Hub file with HTTP range requests (crucible/sources/remote.py,
when the job streams its inputs). A source is not shared between threads: each
TensorReader opens its own.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from crucible.sources.direct_read import mostly_uncached, open_direct, read_direct


@runtime_checkable
class ByteSource(Protocol):
    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill all of `view` with the bytes at [offset, offset + len(view)); raise on a
        short read (never return fewer bytes)."""
        ...

    def close(self) -> None: ...


class SourceOpener(Protocol):
    """Opens the source of one weight file (ResolvedModel.remote for streamed models)."""

    def open(self, path: Path) -> ByteSource: ...


def read_at(source: ByteSource, offset: int, length: int) -> bytearray:
    """`length` bytes at `offset` in a fresh buffer."""
    buf = bytearray(length)
    if length:
        source.read_into(offset, memoryview(buf))
    return buf


def pread_view(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` from `fd` at `offset` (preadv may return short reads)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


class LocalFile:
    """A local file read with pread into the caller's buffer: no mapping, so nothing stays
    resident after the buffer is freed (see tensor_reader.py). A large range that is not
    in the page cache is read with O_DIRECT (crucible/sources/direct_read.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._direct_fd: int | None = None
        self._direct_tried = False

    def read_into(self, offset: int, view: memoryview) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: read from a closed source")
        if mostly_uncached(self._fd, offset, len(view)):
            direct = self._direct()
            if direct is not None:
                try:
                    read_direct(direct, view, offset, self.path)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # The open took O_DIRECT but the read refuses our alignment (a device
                    # with larger blocks, some FUSE or overlay mounts): buffered from now on.
                    self._drop_direct()
        pread_view(self._fd, view, offset, self.path)

    def _drop_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def _direct(self) -> int | None:
        if not self._direct_tried:
            self._direct_tried = True
            self._direct_fd = open_direct(self.path)
        return self._direct_fd

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None


def open_source(path: Path, remote: SourceOpener | None = None) -> ByteSource:
    """The source of weight file `path`: streamed when `remote` is given (the model's
    weights were not downloaded), else the local file."""
    if remote is not None:
        return remote.open(path)
    return LocalFile(path)
