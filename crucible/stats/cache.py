"""The Gram cache: finished statistics in the artifact store, addressed by what made them.

Entry: `<artifacts_root>/grams/<key>/` holding Gram shards `grams-0000i-of-0000n.safetensors`
(one per pass over the data), `model.safetensors.index.json` (tensor -> shard, so the
folder opens with crucible.sources.resolve.open_artifact_folder) and `meta.json` (the key's
inputs, examples, tokens, seconds, and the worker that computed it: host and pids).

The key is the sha256 of the canonical JSON of:
- model: the expert's pinned Hub commit; for a local folder (no commit), a fingerprint of
  its files (`folder_fingerprint`);
- tokenizer: the same for the folder the tokenizer came from, when it is not the model's
  own (an expert without tokenizer files borrows the base's);
- base: the same for the base model, for the task_vector estimator (tau = W_t - W0);
- dataset: the dataset's content sha256 (None for the task_vector estimator);
- max_samples, max_length, the sorted set of Gram names, the estimator, FORMAT_VERSION.
The batch size is left out: it changes nothing but the float64 summation order.

An entry is written under `<key>.partial-<host>-<pid>` and renamed into place once complete,
meta.json last: `lookup` trusts only a renamed folder with its meta.json, so a crashed job
leaves no entry that a later one would use. Two jobs computing the same key both write; the
first rename wins and the other discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.artifacts import ArtifactStore, put_folder
from crucible.sources.resolve import INDEX_FILE, ResolvedModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
# A crashed job's partial folder is removed by a later writer of the same key once it is
# this old (never a live job's: the statistics of one expert take far less).
STALE_PARTIAL_SECONDS = 24 * 3600
# safetensors headers larger than this are not a model's (the format caps them at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


def worker_record() -> dict[str, Any]:
    """Which process did the work: host, pid, and the parent pid (under a Celery prefork
    pool, the worker's main process, which is what a test or an operator kills)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker_pid": os.getppid()}


def folder_fingerprint(root: Path) -> str:
    """sha256 over every top-level file's name, size and mtime (ns), and the safetensors
    headers (tensor names, dtypes, shapes, offsets).

    Rewriting weights, config or tokenizer files changes size or mtime, so the key changes
    without reading gigabytes of weights. Not detected: bytes changed in place with size and
    mtime both restored by hand."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if path.suffix == ".safetensors":
            with path.open("rb") as f:
                raw = f.read(8)
                if len(raw) == 8:
                    (size,) = struct.unpack("<Q", raw)
                    digest.update(f.read(min(size, _MAX_HEADER)))
    return "files:" + digest.hexdigest()


def model_fingerprint(model: ResolvedModel) -> str:
    """The pinned commit of a Hub model, else its folder's fingerprint."""
    return f"commit:{model.commit}" if model.commit else folder_fingerprint(model.root)


def key_inputs(
    *,
    model: str,
    dataset: str | None,
    max_samples: int | None,
    max_length: int | None,
    modules: Iterable[str],
    estimator: str,
    tokenizer: str | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """The documented inputs of a cache key, as stored in meta.json."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "base": base,
        "tokenizer": tokenizer,
        "dataset": dataset,
        "max_samples": max_samples,
        "max_length": max_length,
        "modules": sorted(set(modules)),
        "estimator": estimator,
    }


def cache_key(inputs: dict[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def shard_name(index: int, count: int) -> str:
    return f"grams-{index + 1:05d}-of-{count:05d}.safetensors"


class GramCache:
    """`artifacts`: the artifact store (crucible.artifacts); with one on S3, a finished
    entry is uploaded (meta.json last) and an entry this machine lacks is fetched from it."""

    def __init__(self, artifacts_root: Path, artifacts: ArtifactStore | None = None) -> None:
        self.root = artifacts_root / "grams"
        self.artifacts = artifacts

    def path(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> Path | None:
        """The finished entry's folder (fetched from a remote artifact store if only it has
        the entry), or None."""
        folder = self.path(key)
        if (folder / META_FILE).is_file():
            return folder
        if self.artifacts is not None and self.artifacts.remote:
            return _fetch_entry(self, key)
        return None

    def has(self, key: str) -> bool:
        """Whether the finished entry exists here or in the remote store (nothing fetched)."""
        if (self.path(key) / META_FILE).is_file():
            return True
        store = self.artifacts
        return store is not None and store.remote and store.exists(f"grams/{key}/{META_FILE}")

    def meta(self, key: str) -> dict[str, Any] | None:
        folder = self.lookup(key)
        if folder is None:
            return None
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))

    def writer(self, key: str, inputs: dict[str, Any], shards: int) -> EntryWriter:
        return EntryWriter(self, key, inputs, shards)


class EntryWriter:
    """Builds one entry in a partial folder; `commit` renames it into place.

    Use as a context manager: leaving the block without commit() removes the partial folder.
    `folder` is where the Gram files go (task_vector Grams are written there directly)."""

    def __init__(self, cache: GramCache, key: str, inputs: dict[str, Any], shards: int) -> None:
        self.cache = cache
        self.key = key
        self.inputs = inputs
        self.shards = shards
        self.weight_map: dict[str, str] = {}
        self._next = 0
        self._started = time.perf_counter()
        cache.root.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(cache.root, key)
        self.folder = cache.root / f"{key}.partial-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)  # a crashed earlier run of this pid
        self.folder.mkdir()
        self._committed = False

    def write_group(self, grams: dict[str, torch.Tensor]) -> None:
        """The next shard: one group's Grams (float64, d_in x d_in), streamed to disk."""
        from crucible.publish.writer import SINGLE_FILE, ShardedSafetensorsWriter

        if self._next >= self.shards:
            raise RuntimeError(f"entry {self.key}: all {self.shards} shards are written")
        name = shard_name(self._next, self.shards)
        self._next += 1
        if not grams:
            return
        staging = self.folder / f".{name}.d"
        plan = [(n, tuple(g.shape), "F64") for n, g in grams.items()]
        with ShardedSafetensorsWriter(staging, plan, 2**62, metadata={"format": "pt"}) as w:
            for n in list(grams):
                w.write(n, grams.pop(n))  # the caller's dict lets go of each as it goes
        os.replace(staging / SINGLE_FILE, self.folder / name)
        staging.rmdir()
        self.weight_map.update(dict.fromkeys((n for n, *_ in plan), name))

    def commit(self, facts: dict[str, Any]) -> Path:
        """Write the index (group shards) and meta.json, then rename into place."""
        if self.weight_map:
            index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        meta = {
            "key": self.key,
            "inputs": self.inputs,
            **facts,
            "worker": worker_record(),
            "seconds": round(time.perf_counter() - self._started, 3),
            "created_at": time.time(),
        }
        (self.folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        target = self.cache.path(self.key)
        try:
            os.rename(self.folder, target)
        except OSError:
            if self.cache.lookup(self.key) is None:
                raise
            shutil.rmtree(self.folder, ignore_errors=True)  # another job finished it first
        self._committed = True
        artifacts = self.cache.artifacts
        if artifacts is not None and artifacts.remote:
            try:
                put_folder(artifacts, target, f"grams/{self.key}", last=META_FILE)
            except Exception as exc:  # a cache: this machine has it; others recompute it
                log.warning("Gram cache entry %s not stored remotely: %s", self.key, exc)
        return target

    def abort(self) -> None:
        if not self._committed:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _fetch_entry(cache: GramCache, key: str) -> Path | None:
    """Download a finished remote entry (the one with meta.json, which is uploaded last)
    into a partial folder, then rename it into place like a computed one."""
    store = cache.artifacts
    if store is None or not store.exists(f"grams/{key}/{META_FILE}"):
        return None
    keys = store.list(f"grams/{key}")
    cache.root.mkdir(parents=True, exist_ok=True)
    partial = cache.root / f"{key}.partial-{socket.gethostname()}-{os.getpid()}-fetch"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for item in sorted(keys, key=lambda k: k.endswith(f"/{META_FILE}")):
            relative = item.removeprefix(f"grams/{key}/")
            if not store.get_file(item, partial / relative):
                return None  # removed meanwhile
        try:
            os.rename(partial, cache.path(key))
        except OSError:
            if not (cache.path(key) / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cache.path(key)


def _remove_stale_partials(root: Path, key: str) -> None:
    now = time.time()
    for path in root.glob(f"{key}.partial-*"):
        try:
            if now - path.stat().st_mtime > STALE_PARTIAL_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
