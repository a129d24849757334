"""Scale-out planning: whether a job's merge stage is split, and into which parts.

The output layout is fixed by the input headers before anything is merged
(crucible.engine.output_plan, ShardedSafetensorsWriter), so a part is a run of whole,
consecutive output shards: it merges only their tensors and writes exactly those files,
byte-identical to a single-worker run's. Parts are balanced by bytes. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from crucible.settings import Settings

# Why a job is not split (None: it may be). Checked by crucible.parts.split_reason.
NEEDS_REDIS = "chords need a result backend; only a Redis broker provides one here"


@dataclass(frozen=True)
class Part:
    """Output shards [first, stop) of the layout, `bytes` of them in all."""

    index: int
    first: int
    stop: int
    bytes: int

    @property
    def shards(self) -> set[int]:
        return set(range(self.first, self.stop))

    def as_dict(self) -> dict[str, int]:
        return {"index": self.index, "first": self.first, "stop": self.stop, "bytes": self.bytes}


def partition(sizes: list[int], parts: int) -> list[Part]:
    """`sizes` (bytes per shard, in order) cut into min(parts, len(sizes)) runs of
    consecutive shards, every shard in exactly one, each run's bytes as close to an equal
    share as shard boundaries allow: the j-th cut is the boundary nearest j/parts of the
    total (so a run is off its share by at most one shard)."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    n = len(sizes)
    count = min(parts, n)
    if count == 0:
        return []
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    total = prefix[-1]
    cuts = [0]
    for j in range(1, count):
        target = total * j / count
        # Leave at least one shard for each run before and after this cut.
        lo, hi = cuts[-1] + 1, n - (count - j)
        best = min(range(lo, hi + 1), key=lambda i: (abs(prefix[i] - target), i))
        cuts.append(best)
    cuts.append(n)
    return [
        Part(j, cuts[j], cuts[j + 1], prefix[cuts[j + 1]] - prefix[cuts[j]]) for j in range(count)
    ]


def part_count(settings: Settings, input_bytes: int, shards: int) -> int:
    """How many parts a job of `input_bytes` over `shards` output shards gets (1: no split)."""
    if settings.split_max_parts < 2 or shards < 2 or input_bytes < settings.split_min_input_bytes:
        return 1
    return min(settings.split_max_parts, shards)


def layout_key(plan: list[Any], shard_size: int) -> str:
    """Names one output layout: parts of different layouts never mix (an input that changed
    between the parent's plan and a part's is caught by comparing keys)."""
    doc = json.dumps([shard_size, [[n, list(s), c] for n, s, c in plan]], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def chord_backend(settings: Settings) -> str | None:
    """The Celery result backend the parts' chord counts completions in: the Redis broker
    itself. None (jobs are never split) with any other broker."""
    url = settings.resolved_broker_url
    return url if url.startswith(("redis://", "rediss://")) else None
