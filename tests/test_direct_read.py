"""Uncached input ranges are read with O_DIRECT (crucible/sources/direct_read.py): the bytes
are exact at any offset and length, the page cache is left as it was, cached ranges stay
buffered reads, and a merge from a cold cache equals one from a warm cache.

Files live under pytest's tmp_path (ext4 here and on CI); the page cache is emptied for a
file with posix_fadvise(DONTNEED) after fsync, which needs no privileges."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import crucible.pipeline as pipeline
import crucible.sources.byte_source as byte_source
import crucible.sources.direct_read as direct_read
from crucible.settings import Settings
from crucible.sources.byte_source import LocalFile
from crucible.spec import MergeSpec
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family

MIB = 1 << 20


def read_range(path: Path, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` read through a LocalFile of its own."""
    out = bytearray(length)
    with closing(LocalFile(path)) as source:
        source.read_into(offset, memoryview(out))
    return bytes(out)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pages(path: Path, offset: int = 0, length: int = 0) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = direct_read.SUPPORT.cached_pages(fd, offset, length)
    finally:
        os.close(fd)
    assert pages is not None
    return pages


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    """20 MiB + 777 bytes of random data: longer than the bounce buffer, and an end that
    is not block-aligned."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 4096)
    fd = direct_read.open_direct(probe)
    if fd is None or direct_read.SUPPORT.cached_pages(fd, 0, 0) is None:
        pytest.skip("this kernel or file system has no cachestat or no O_DIRECT")
    os.close(fd)
    data = np.random.default_rng(5).integers(0, 256, 20 * MIB + 777, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    evict(path)
    assert cached_pages(path) == 0, "could not empty the page cache for the test file"
    return path, data


def spy_direct(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records every direct read (offset, length) and lets it run."""
    calls: list[tuple[int, int]] = []
    real: Callable[..., None] = direct_read.read_direct

    def spy(fd: int, view: memoryview, offset: int, path: Path) -> None:
        calls.append((offset, len(view)))
        real(fd, view, offset, path)

    monkeypatch.setattr(byte_source, "read_direct", spy)
    return calls


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 3 * MIB),  # aligned start and length
        (4096 * 7 + 123, 3 * MIB + 5),  # both unaligned
        (1 * MIB + 1, 17 * MIB),  # more than two bounce buffers
        (20 * MIB + 777 - (5 * MIB + 11), 5 * MIB + 11),  # ends at the file's unaligned end
    ],
    ids=["aligned", "unaligned", "longer-than-bounce", "to-eof"],
)
def test_an_uncached_range_is_read_direct_exactly_and_stays_out_of_the_cache(
    data_file: tuple[Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
    offset: int,
    length: int,
) -> None:
    path, data = data_file
    calls = spy_direct(monkeypatch)
    out = read_range(path, offset, length)
    assert out == data[offset : offset + length]
    assert calls == [(offset, length)]
    # A buffered read would have cached the whole range (and its readahead).
    assert cached_pages(path) == 0


def test_a_cached_range_is_read_buffered(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    assert path.read_bytes() == data  # warms the cache
    assert cached_pages(path) * 4096 >= len(data) - 4096
    calls = spy_direct(monkeypatch)
    out = read_range(path, 12345, 6 * MIB)
    assert out == data[12345 : 12345 + len(out)]
    assert calls == []


def test_a_small_read_is_buffered_even_when_uncached(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    calls = spy_direct(monkeypatch)
    out = read_range(path, 99, direct_read.DIRECT_MIN_BYTES - 1)
    assert out == data[99 : 99 + len(out)]
    assert calls == []


def test_a_read_past_the_end_is_an_error(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with pytest.raises(OSError, match="unexpected end of file"):
        read_range(path, len(data) - MIB, 2 * MIB)


def test_a_file_system_that_refuses_o_direct_is_read_buffered(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems (FUSE mounts, tmpfs before Linux 6.6) refuse O_DIRECT with EINVAL
    at open: the read is then buffered, not failed. (This ext4 accepts O_DIRECT, so the
    refusal is injected at os.open.)"""
    path, data = data_file
    real_open = os.open
    refused: list[str] = []

    def refusing_open(file: str | Path, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            refused.append(str(file))
            raise OSError(22, "Invalid argument", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    out = bytearray(4 * MIB)
    with closing(LocalFile(path)) as source:
        source.read_into(777, memoryview(out))
        source.read_into(777, memoryview(out))  # the refusal is remembered, not retried
    assert bytes(out) == data[777 : 777 + len(out)]
    assert refused == [str(path)]
    assert cached_pages(path) > 0  # read through the page cache


def test_a_direct_read_refused_for_its_alignment_falls_back_to_buffered(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system may take O_DIRECT at open and refuse the reads (EINVAL: a device with
    blocks larger than 4 KiB, some FUSE or overlay mounts): the read is redone buffered,
    and later reads of the file do not try again. (The refusal is injected: this ext4
    accepts 4 KiB-aligned reads.)"""
    path, data = data_file
    refused: list[int] = []

    def refusing(fd: int, view: memoryview, offset: int, where: Path) -> None:
        refused.append(offset)
        view[:10] = b"\0" * 10  # a partial fill before the error must not survive
        raise OSError(errno.EINVAL, "Invalid argument", str(where))

    monkeypatch.setattr(byte_source, "read_direct", refusing)
    out = bytearray(3 * MIB)
    with closing(LocalFile(path)) as source:
        source.read_into(4096, memoryview(out))
        assert bytes(out) == data[4096 : 4096 + len(out)]
        evict(path)
        source.read_into(8 * MIB, memoryview(out))
        assert bytes(out) == data[8 * MIB : 8 * MIB + len(out)]
    assert refused == [4096]


def test_another_direct_read_error_is_raised(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO is the disk's failure, not a refusal: it fails the read (and the job), as a
    buffered read's would, instead of being retried in another way."""
    path, _ = data_file

    def failing(fd: int, view: memoryview, offset: int, where: Path) -> None:
        raise OSError(errno.EIO, "Input/output error", str(where))

    monkeypatch.setattr(byte_source, "read_direct", failing)
    with pytest.raises(OSError, match="Input/output error"):
        read_range(path, 0, 2 * MIB)


def test_a_merge_from_a_cold_cache_equals_the_warm_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every weight read of a dare_ties merge (base, experts) is large enough to go direct
    once the threshold is lowered; its output must be the buffered merge's, bit for bit."""
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=3, seed=21)
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri()} for e in experts],
            "method": {"name": "dare_ties", "params": {"density": 0.4, "seed": 3}},
            "output": {"dtype": "float32"},
        }
    )
    weights = sorted((tmp_path / "models").rglob("*.safetensors"))
    assert len(weights) == 4
    pipeline.run_merge_job(spec, tmp_path / "warm", settings, QuietReporter())
    assert all(cached_pages(w) > 0 for w in weights)
    warm = load_file(tmp_path / "warm" / "model.safetensors")

    monkeypatch.setattr(direct_read, "DIRECT_MIN_BYTES", 1)
    calls = spy_direct(monkeypatch)
    for w in weights:
        evict(w)
    pipeline.run_merge_job(spec, tmp_path / "cold", settings, QuietReporter())
    cold = load_file(tmp_path / "cold" / "model.safetensors")
    assert calls, "no read went direct"
    assert warm.keys() == cold.keys()
    for name, tensor in warm.items():
        assert cold[name].equal(tensor), name
