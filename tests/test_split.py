"""Scale-out planning (crucible.split) and parts written in process (crucible.engine's
only_shards): the partition covers every shard once, in contiguous byte-balanced runs, and
parts merged separately give the same shard files, byte for byte, as one merge of the
whole model (DARE's seeded masks included)."""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path

import pytest
import torch

from crucible.engine import merge_model
from crucible.parts import layout_writer
from crucible.pipeline import _resolve
from crucible.publish.writer import INDEX_FILE
from crucible.settings import Settings
from crucible.spec import MergeSpec
from crucible.split import layout_key, part_count, partition
from tests.support.reporters import QuietReporter
from tests.support.tiny_models import make_gpt2_family


def check_partition(sizes: list[int], k: int) -> None:
    parts = partition(sizes, k)
    assert len(parts) == min(k, len(sizes))
    # Contiguous, in order, every shard exactly once.
    assert parts[0].first == 0 and parts[-1].stop == len(sizes)
    for a, b in itertools.pairwise(parts):
        assert a.stop == b.first
    assert all(p.first < p.stop for p in parts)
    assert [p.index for p in parts] == list(range(len(parts)))
    for p in parts:
        assert p.bytes == sum(sizes[p.first : p.stop])
    # Byte balance: each run is off an equal share by less than one shard on each side.
    share = sum(sizes) / len(parts)
    for p in parts:
        assert abs(p.bytes - share) <= 2 * max(sizes), (sizes, k, parts)


def test_partition_examples() -> None:
    assert [(p.first, p.stop) for p in partition([10, 10, 10, 10], 2)] == [(0, 2), (2, 4)]
    # A big shard at the front gets a run of its own.
    assert [(p.first, p.stop) for p in partition([90, 10, 10, 10, 10, 10], 2)] == [
        (0, 1),
        (1, 6),
    ]
    assert [(p.first, p.stop) for p in partition([5, 5, 5], 8)] == [(0, 1), (1, 2), (2, 3)]
    assert [(p.first, p.stop) for p in partition([7], 3)] == [(0, 1)]
    assert partition([], 3) == []
    with pytest.raises(ValueError):
        partition([1, 2], 0)


def test_partition_random_layouts() -> None:
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 60)
        sizes = [rng.randint(1, 1000) for _ in range(n)]
        check_partition(sizes, rng.randint(1, 12))


def test_partition_is_balanced_on_even_shards() -> None:
    parts = partition([100] * 12, 4)
    assert [p.bytes for p in parts] == [300, 300, 300, 300]
    parts = partition([100] * 10, 4)
    assert sorted(p.bytes for p in parts) == [200, 200, 300, 300]


def test_part_count_follows_the_settings() -> None:
    s = Settings(split_min_input_bytes=1000, split_max_parts=3)
    assert part_count(s, 999, 10) == 1  # below the threshold
    assert part_count(s, 1000, 10) == 3
    assert part_count(s, 5000, 2) == 2  # never more parts than shards
    assert part_count(s, 5000, 1) == 1
    assert part_count(Settings(split_min_input_bytes=0, split_max_parts=1), 5000, 10) == 1


def test_layout_key_names_the_layout() -> None:
    plan = [("a", (2, 3), "F32"), ("b", (4,), "BF16")]
    assert layout_key(plan, 1024) == layout_key(list(plan), 1024)
    assert layout_key(plan, 1024) != layout_key(plan, 2048)
    assert layout_key(plan, 1024) != layout_key([("a", (2, 3), "F16"), plan[1]], 1024)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "method",
    [
        {"name": "ties", "params": {"density": 0.5}},
        {"name": "dare_ties", "params": {"density": 0.6, "seed": 17}},
        {"name": "tsv"},
    ],
)
def test_parts_write_the_single_runs_shards_byte_for_byte(
    tmp_path: Path, method: dict[str, object]
) -> None:
    base, experts = make_gpt2_family(tmp_path / "models", n_experts=2, seed=4)
    spec = MergeSpec.model_validate(
        {
            "base": {"uri": base.as_uri()},
            "experts": [{"uri": e.as_uri(), "weight": 0.7} for e in experts],
            "method": method,
            "output": {"dtype": "bfloat16", "shard_size": 60_000},
        }
    )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_dirs=[tmp_path / "models"])
    inputs, _ = _resolve(spec, settings, QuietReporter())
    device = torch.device("cpu")
    whole = tmp_path / "whole"
    merge_model(spec, inputs, whole, QuietReporter(), device)
    _, writer = layout_writer(spec, inputs)
    files = writer.shard_files
    assert len(files) >= 4
    assert (whole / INDEX_FILE).read_text(encoding="utf-8") == writer.index_text()
    parted = tmp_path / "parted"
    parts = partition([b for _, b in files], 3)
    for part in reversed(parts):  # order does not matter
        metrics, _ = merge_model(
            spec, inputs, parted, QuietReporter(), device, only_shards=part.shards
        )
        assert metrics["tensors"] == len(
            [n for n, f in writer.weight_map.items() if f in {files[i][0] for i in part.shards}]
        )
    assert sorted(p.name for p in parted.iterdir()) == sorted(name for name, _ in files)
    for name, size in files:
        assert (parted / name).stat().st_size == size
        assert sha(parted / name) == sha(whole / name), name
