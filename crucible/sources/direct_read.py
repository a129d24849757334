"""Reading a file range that is not in the page cache with O_DIRECT.

A buffered read of an uncached range costs the kernel a page-cache fill and a copy per
page: on the 2-core bench machine, reading five 1.3 GB inputs cold took ~2 s of system
CPU that the merge then lacked, and dd reads a file at 0.5 GB/s buffered against 1.9 GB/s
with O_DIRECT. Inputs are read once per merge, so caching them buys nothing (and evicts
what other jobs use). A range that is mostly cached (the inputs were just downloaded, or
merged a moment ago) is read buffered as before: memory beats the disk.

Residency comes from cachestat(2) (Linux 6.5+), which looks without starting I/O (a
RWF_NOWAIT read would start readahead on a miss, then the direct read would fetch the same
bytes again). Where cachestat or O_DIRECT is missing (older kernels, other systems, tmpfs)
everything is read buffered, and so is every later read of a file whose O_DIRECT read
was refused with EINVAL (an open that accepts the flag does not promise 4 KiB reads work).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from pathlib import Path

# Offsets, lengths and the buffer of an O_DIRECT read must be multiples of the device's
# logical block size; 4096 covers 512 and 4 KiB devices.
DIRECT_ALIGN = 4096
# Below this a read is buffered: small reads (headers, norms) are not worth a syscall more.
DIRECT_MIN_BYTES = 1 << 20
# One page-aligned bounce buffer per reading thread; a longer range takes several reads.
BOUNCE_BYTES = 8 << 20
_CACHESTAT = 451  # the syscall's number, the same on every Linux architecture


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


class _Support:
    """Whether this system has cachestat and O_DIRECT (learned on first use)."""

    def __init__(self) -> None:
        self.enabled = sys.platform.startswith("linux") and hasattr(os, "O_DIRECT")
        self._syscall = None
        if self.enabled:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                self._syscall = libc.syscall
            except (OSError, AttributeError):
                self.enabled = False

    def cached_pages(self, fd: int, offset: int, length: int) -> int | None:
        """Pages of [offset, offset + length) in the page cache; None without cachestat."""
        if not self.enabled or self._syscall is None:
            return None
        stat = _Stat()
        span = _Range(offset, length)
        rc = self._syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0)
        if rc != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                self.enabled = False  # seccomp or an old kernel: never ask again
            return None
        return int(stat.nr_cache)


SUPPORT = _Support()
_BOUNCE = threading.local()


def _bounce() -> memoryview:
    view = getattr(_BOUNCE, "view", None)
    if view is None:
        # An anonymous mapping is page-aligned, as O_DIRECT wants.
        view = _BOUNCE.view = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
    return view


def mostly_uncached(fd: int, offset: int, length: int) -> bool:
    """True when fewer than half of the range's pages are cached (and cachestat says so)."""
    if length < DIRECT_MIN_BYTES:
        return False
    first = offset // mmap.PAGESIZE
    pages = (offset + length - 1) // mmap.PAGESIZE - first + 1
    cached = SUPPORT.cached_pages(fd, offset, length)
    return cached is not None and cached * 2 < pages


def open_direct(path: Path) -> int | None:
    """An O_DIRECT descriptor of `path`, or None where the file system refuses it."""
    if not SUPPORT.enabled:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None  # EINVAL: tmpfs and some FUSE file systems


def read_direct(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` from the O_DIRECT descriptor `fd` at `offset`: aligned reads into the
    bounce buffer, each copied into place."""
    bounce = _bounce()
    done, total = 0, len(view)
    while done < total:
        pos = offset + done
        start = pos - pos % DIRECT_ALIGN
        skip = pos - start
        want = min(BOUNCE_BYTES, -(-(skip + total - done) // DIRECT_ALIGN) * DIRECT_ALIGN)
        got = os.preadv(fd, [bounce[:want]], start)
        take = min(got - skip, total - done)
        if take <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {pos}")
        view[done : done + take] = bounce[skip : skip + take]
        done += take
