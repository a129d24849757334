"""The quality benchmark's tasks: 3-way text classification built from Debian `fortunes`.

Each task tells three fortune categories apart; the five tasks use fifteen different
categories (disjoint label sets), so every expert has a head of its own. The triples were
chosen, among the categories with at least ~330 usable entries, to maximise the worst task's
3-way accuracy of a linear probe on the base's frozen mean-pooled embeddings (84-88%), so a
fine-tuned expert can clearly beat the base while the tasks stay far from trivial.

Entries: whitespace collapsed to single spaces; kept when 20-600 characters long; an entry
found in two of the chosen categories is dropped from both. Splits are balanced per task
(the smallest category sets the size): validation = test = min(150, n // 5) rows per
category, train = min(400, the rest). Everything is seeded and files are read in a fixed
order, so the JSONL files are byte-identical on every run.

    python bench/quality/tasks.py [--out DIR]   # writes DIR/<task>/{train,validation,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SEED = 1234
MIN_CHARS, MAX_CHARS = 20, 600
MAX_PER_CATEGORY = {"train": 400, "validation": 150, "test": 150}  # validation == test
SPLITS = ("train", "validation", "test")

# task name -> its categories (the labels); no category appears twice.
TASKS: dict[str, tuple[str, ...]] = {
    "people-definitions-zippy": ("people", "definitions", "zippy"),
    "computers-work-menwomen": ("computers", "work", "men-women"),
    "politics-platitudes-linux": ("politics", "platitudes", "linux"),
    "songs-science-fortunes": ("songs-poems", "science", "fortunes"),
    "knghtbrd-art-wisdom": ("knghtbrd", "art", "wisdom"),
}

_SEPARATOR = re.compile(r"(?m)^%\s*$")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def cache_dir() -> Path:
    """Where generated data and experts live: outside the repository."""
    env = os.environ.get("CRUCIBLE_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "crucible" / "bench-quality"


def read_category(name: str, root: Path = FORTUNES_DIR) -> list[str]:
    """A category's entries, cleaned and filtered, in file order, without repeats."""
    path = root / name
    if not path.is_file():
        raise SystemExit(f"fortune category {name!r} not found at {path}: apt-get install fortunes")
    raw = path.read_text(encoding="utf-8", errors="replace")
    entries = (" ".join(e.split()) for e in _SEPARATOR.split(raw))
    return list(dict.fromkeys(e for e in entries if MIN_CHARS <= len(e) <= MAX_CHARS))


def split_sizes(n: int) -> dict[str, int]:
    """Rows per category of each split, for a task whose smallest category has n entries."""
    held = min(MAX_PER_CATEGORY["validation"], n // 5)
    return {
        "train": min(MAX_PER_CATEGORY["train"], n - 2 * held),
        "validation": held,
        "test": held,
    }


def build_tasks(
    tasks: dict[str, tuple[str, ...]] = TASKS, seed: int = SEED, root: Path = FORTUNES_DIR
) -> dict[str, dict[str, list[Example]]]:
    """Every task's balanced, shuffled train/validation/test examples."""
    categories = [c for cats in tasks.values() for c in cats]
    if len(set(categories)) != len(categories):
        raise ValueError("tasks must use disjoint categories")
    texts = {c: read_category(c, root) for c in sorted(categories)}
    # A text filed under two categories has no single right label.
    seen = Counter(t for c in texts for t in texts[c])
    texts = {c: [t for t in ts if seen[t] == 1] for c, ts in texts.items()}
    out: dict[str, dict[str, list[Example]]] = {}
    for t_index, (task, cats) in enumerate(tasks.items()):
        sizes = split_sizes(min(len(texts[c]) for c in cats))
        rows: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for c_index, cat in enumerate(cats):
            pool = list(texts[cat])
            random.Random(seed * 1000 + t_index * 10 + c_index).shuffle(pool)
            start = 0
            for split in ("test", "validation", "train"):
                rows[split] += [Example(x, cat) for x in pool[start : start + sizes[split]]]
                start += sizes[split]
        for s_index, split in enumerate(SPLITS):
            random.Random(seed * 1000 + t_index * 10 + 5 + s_index).shuffle(rows[split])
        out[task] = rows
    return out


def write_jsonl(path: Path, rows: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r.text, "label": r.label}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


def write_tasks(folder: Path, seed: int = SEED) -> dict[str, dict[str, Path]]:
    """Writes <folder>/<task>/<split>.jsonl (rewritten each time: deterministic content)."""
    paths: dict[str, dict[str, Path]] = {}
    for task, rows in build_tasks(seed=seed).items():
        paths[task] = {}
        for split in SPLITS:
            p = folder / task / f"{split}.jsonl"
            write_jsonl(p, rows[split])
            paths[task][split] = p
    return paths


def task_paths(folder: Path) -> dict[str, dict[str, Path]]:
    return {t: {s: folder / t / f"{s}.jsonl" for s in SPLITS} for t in TASKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache_dir() / "data")
    args = parser.parse_args()
    for task, splits in write_tasks(args.out).items():
        counts = {s: sum(1 for _ in p.open()) for s, p in splits.items()}
        print(f"{task:28s} {TASKS[task]} {counts} -> {args.out / task}")


if __name__ == "__main__":
    main()
