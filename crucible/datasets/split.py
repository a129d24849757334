"""Deterministic validation/test splits of a dataset's rows.

The rows 0..n-1 are shuffled with `random.Random(seed)` (Python documents int-seeded
`Random.shuffle` as reproducible across versions and processes); the first
`round(validation * n)` of the permutation go to validation, the next `round(test * n)` to
test, the rest to neither. Rounding is half up. When n >= 2, each split with a fraction > 0
holds at least one row.

Stratified (classification: pass the row labels): each label's rows are split on their own
in the same way (labels in sorted order, one shared generator), so both splits hold every
label that has at least two rows. Split sizes then differ from the unstratified ones by at
most one row per label.

Both index lists are returned sorted, so a reader can take them in one pass over the file.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from crucible.datasets.schema import Label, sorted_labels
from crucible.spec import SplitSpec


def split_sizes(n: int, validation: float, test: float) -> tuple[int, int]:
    """(validation rows, test rows) out of n, as the module doc says."""
    n_val = min(n, int(validation * n + 0.5))
    n_test = min(n - n_val, int(test * n + 0.5))
    if n >= 2:
        if validation > 0 and n_val == 0:
            n_val = 1
            n_test = min(n_test, n - 1)
        if test > 0 and n_test == 0:
            n_test = 1
            n_val = min(n_val, n - 1)
    return n_val, n_test


def _take(order: list[int], validation: float, test: float) -> tuple[list[int], list[int]]:
    n_val, n_test = split_sizes(len(order), validation, test)
    return order[:n_val], order[n_val : n_val + n_test]


def split_indices(
    n: int, split: SplitSpec, labels: Sequence[Label] | None = None
) -> tuple[list[int], list[int]]:
    """(validation, test) row indices of a dataset of n rows; stratified when labels (one per
    row) are given."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(split.seed)
    if labels is None:
        order = list(range(n))
        rng.shuffle(order)
        val, test = _take(order, split.validation, split.test)
    else:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} rows")
        groups: dict[Label, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        val, test = [], []
        for label in sorted_labels(list(groups)):
            order = groups[label]
            rng.shuffle(order)
            v, t = _take(order, split.validation, split.test)
            val += v
            test += t
    return sorted(val), sorted(test)
