"""Overlap reading, computing and writing in the merge stage.

- `Prefetcher` runs a producer on a thread, at most `slots` items ahead of the consumer:
  the producer takes a slot before making an item and the consumer gives it back when it is
  done with it, so an item's buffers can be reused (`slot` is its index) and memory stays
  bounded by `slots` items. An exception in the producer is raised in the consumer;
  `close()` stops the producer and joins its thread.
- `BackgroundWriter` hands tensors to a ShardedSafetensorsWriter on a thread through a
  bounded queue (the caller computes the next block while the last one is written). An
  error in the writer thread is raised by the next `write()` or by `close()`.

Both threads spend their time in pread/write and torch kernels, which release the GIL.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

import torch

from crucible.publish.writer import ShardedSafetensorsWriter

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate over `produce(slot_source)`'s items, made on a thread.

    `produce` receives a function `take_slot() -> int` that it must call before making each
    item (it blocks while `slots` items are out) and yields (slot, item) pairs; the consumer
    calls `release(slot)` when it no longer needs that item's buffers."""

    def __init__(
        self,
        produce: Callable[[Callable[[], int]], Iterator[tuple[int, T]]],
        slots: int = 2,
        name: str = "crucible-prefetch",
    ) -> None:
        self._free: queue.Queue[int] = queue.Queue()
        for s in range(slots):
            self._free.put(s)
        self._items: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _take_slot(self) -> int:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _run(self) -> None:
        try:
            for item in self._produce(self._take_slot):
                if self._stop.is_set():
                    return
                self._items.put(item)
            self._items.put(_DONE)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer, raised there
            self._items.put(_Failed(exc))

    def __iter__(self) -> Iterator[tuple[int, T]]:
        return self

    def __next__(self) -> tuple[int, T]:
        while True:
            try:
                got = self._items.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._items.empty():
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if got is _DONE:
            self._items.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(got, _Failed):
            self._items.put(got)
            raise got.exc
        return got  # type: ignore[return-value]

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def close(self) -> None:
        """Stop the producer (between items) and wait for its thread."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Stopped(Exception):
    """The consumer closed the prefetcher while the producer waited for a slot."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BackgroundWriter:
    """`write()` queues (at most `depth` pending), a thread writes in order."""

    def __init__(
        self, writer: ShardedSafetensorsWriter, depth: int = 4, name: str = "crucible-writer"
    ) -> None:
        self.writer = writer
        self._queue: queue.Queue[tuple[str, torch.Tensor, int] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stop.is_set():
                return
            if self._error is not None:
                continue  # drain without writing: the first error is reported
            try:
                self.writer.write(*job)
            except BaseException as exc:
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Queue a tensor (or block of rows) for the plan; it must not be modified after."""
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the writer thread is not running")
        while True:
            try:
                self._queue.put((name, tensor, first_row), timeout=0.5)
                return
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():
                    raise RuntimeError("the writer thread is not running") from None

    def flush(self) -> None:
        """Wait until every queued tensor is written; raise the writer thread's error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def abort(self) -> None:
        """Stop the thread (dropping queued tensors) and remove what the writer created."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
            self._thread.join(timeout=0.1)
        self.writer.abort()
