"""The quality benchmark through the service's own code path.

    .venv/bin/python bench/quality/run.py [--methods ta_0.3,bmm_act_tuned] [--trials 32]
    .venv/bin/python bench/quality/run.py --eval-only   # base and experts rows only

1. Generates what is missing in the cache (tasks, base, experts: make_experts.py).
2. Starts `crucible up` on a fresh data dir in the cache, creates an API key, uploads each
   task's train split (the expert's Gram data) and validation split (tuning data) over HTTP.
3. Submits one merge per method configuration and polls it until it is terminal.
4. Scores every merged encoder itself (scoring.HeadBank: each expert's own head on the merged
   encoder, the task's test file, which the service never sees), then prints the table and
   writes bench/quality/RESULTS.md and <cache>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from make_experts import RECIPE, Models, ensure_models
from report import rich_table, summarize, write_markdown
from rich.console import Console
from scoring import HeadBank, load_backbone
from stack import Stack, submit, trials, upload, wait
from tasks import TASKS, Example, read_jsonl

HERE = Path(__file__).resolve().parent
COMMAND = "nice -n 19 .venv/bin/python " + shlex.join(["bench/quality/run.py", *sys.argv[1:]])
EXPERTS_COMMAND = "nice -n 19 .venv/bin/python bench/quality/make_experts.py  # experts (cached)"
console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True)
class Config:
    """One row of the table: a method request, whether the experts bring their train data
    (the statistics stage computes activation Grams from it) and whether it is tuned."""

    id: str
    label: str
    method: dict[str, Any]
    grams: bool = False
    tuned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Per-row changes to the run's settings (keys of `settings_of`: groups, trials,
    # gram_samples, ...), so variants of one method can share a run.
    settings: dict[str, Any] = field(default_factory=dict)


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "params": params}


TA, TIES = "task_arithmetic", "ties"
_BMM_TSV = _m("bmm", gram="activations", anchor="tsv")
CONFIGS: list[Config] = [
    Config("ta_0.3", "task_arithmetic (scale 0.3)", _m(TA, scale=0.3)),
    Config("ta_1.0", "task_arithmetic (scale 1.0)", _m(TA, scale=1.0)),
    Config("ties", "ties (density 0.2, scale 1.0)", _m(TIES, density=0.2, scale=1.0)),
    Config("tsv", "tsv", _m("tsv")),
    Config("iso_cts", "iso_cts", _m("iso_cts")),
    Config("wudi", "wudi", _m("wudi")),
    Config("ace", "ace", _m("ace")),
    Config("regmean", "regmean", _m("regmean"), grams=True),
    Config("bmm_df", "bmm data-free", _m("bmm", gram="data_free")),
    Config("bmm_act", "bmm activations", _m("bmm", gram="activations"), grams=True),
    # Tuned: the requested values are the tuner's trial 0.
    Config("ta_tuned", "task_arithmetic (tuned)", _m(TA, scale=0.3), tuned=True),
    Config("ties_tuned", "ties (density 0.2, tuned)", _m(TIES, density=0.2, scale=1.0), tuned=True),
    Config("bmm_df_tuned", "bmm data-free (tuned)", _m("bmm", gram="data_free"), tuned=True),
    Config(
        "bmm_act_tuned",
        "bmm activations (tuned)",
        _m("bmm", gram="activations"),
        grams=True,
        tuned=True,
    ),
    # Variants of tuned data-assisted bmm (ids start with `bmm_act_tuned`): report.targets
    # takes the one with the best *validation* score as the benchmark's tuned bmm.
    # merge-math.md section 10.3 lists TSV-M among the anchors (the paper's ablation uses one).
    Config("bmm_act_tsv", "bmm activations, tsv anchor", _BMM_TSV, grams=True),
    Config(
        "bmm_act_tuned_tsv", "bmm activations, tsv anchor (tuned)", _BMM_TSV, grams=True, tuned=True
    ),
    Config(
        "bmm_act_tuned_block",
        "bmm activations (tuned, groups block)",
        _m("bmm", gram="activations"),
        grams=True,
        tuned=True,
        settings={"groups": "block"},
    ),
    Config(
        "bmm_act_tuned_tsv_block",
        "bmm activations, tsv anchor (tuned, groups block)",
        _BMM_TSV,
        grams=True,
        tuned=True,
        settings={"groups": "block"},
    ),
    Config(
        "bmm_act_tuned_tsv_g1024",
        "bmm activations, tsv anchor, Grams on all train rows (tuned)",
        _BMM_TSV,
        grams=True,
        tuned=True,
        settings={"gram_samples": 1024},
    ),
]
SETTINGS = ("trials", "init_trials", "groups", "batch", "tune_samples", "gram_samples")


def settings_of(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings with the row's own changes."""
    unknown = set(cfg.settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"{cfg.id}: unknown settings {sorted(unknown)}")
    return {k: getattr(args, k) for k in SETTINGS} | cfg.settings


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kb = next(
            int(x.split()[1])
            for x in Path("/proc/meminfo").read_text().splitlines()
            if x.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        kb = 0
    setting = os.environ.get("CRUCIBLE_DEVICE", "auto")
    device = "cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": kb / 2**20,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def spec_for(
    cfg: Config, models: Models, ids: dict[str, dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    experts = []
    for task, folder in models.experts.items():
        ref: dict[str, Any] = {"uri": folder.as_uri(), "name": task}
        if cfg.grams:
            ref["dataset"] = ids[task]["train"]
        experts.append(ref)
    st = settings_of(cfg, args)
    spec: dict[str, Any] = {
        "base": {"uri": models.base.as_uri()},
        "experts": experts,
        "method": cfg.method,
        "output": {"dtype": "float32"},
    }
    if cfg.grams:
        spec["statistics"] = {
            "max_samples": st["gram_samples"],
            "max_length": 128,
            "batch_size": 16,
        }
    if cfg.tuned:
        spec["tuning"] = {
            "dataset": {task: ids[task]["validation"] for task in models.experts},
            "metric": "accuracy",
            "trials": st["trials"],
            "init_trials": st["init_trials"],
            "groups": st["groups"],
            "batch": st["batch"],
            # The test files never reach the service: tune on all of validation.
            "split": {"validation": 1.0, "test": 0.0, "seed": 0},
            "max_samples": st["tune_samples"],
        }
    return spec | cfg.extra


def _seconds(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def stage_seconds(job: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage, from the job's `stage <name> started` events."""
    starts = [
        (e["message"].split()[1], e["at"])
        for e in job.get("events", [])
        if e["kind"] == "stage" and e["message"].startswith("stage ")
    ]
    out: dict[str, float] = {}
    for i, (name, at) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else job.get("finished_at")
        s = _seconds(at, end)
        if s is not None:
            out[name] = out.get(name, 0.0) + s
    return out


class Follow:
    """Prints a job's stage changes and, at most every 20 s, its progress."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.stage: str | None = None
        self.last = 0.0

    def __call__(self, job: dict[str, Any]) -> None:
        p = job["progress"]
        now = time.monotonic()
        if job["stage"] != self.stage or now - self.last > 20:
            self.stage, self.last = job["stage"], now
            console.print(
                f"  {self.label}: {job['status']} {job['stage'] or ''} "
                f"{p['done']}/{p['total']} {p['unit']}"
            )


def run_config(
    cfg: Config,
    stack: Stack,
    client: Any,
    models: Models,
    ids: dict[str, dict[str, str]],
    bank: HeadBank,
    rows: dict[str, dict[str, list[Example]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    spec = spec_for(cfg, models, ids, args)
    console.print(f"[bold]{cfg.label}[/]: POST /v1/merges {json.dumps(cfg.method)}")
    t0 = time.monotonic()
    job = wait(client, submit(client, spec)["id"], Follow(cfg.label))
    row: dict[str, Any] = {
        "id": cfg.id,
        "label": cfg.label,
        "spec": spec,
        "job_id": job["id"],
        "status": job["status"],
        "error": job["error"],
        "wall_seconds": _seconds(job["started_at"], job["finished_at"]),
        "client_seconds": time.monotonic() - t0,
        "stages": stage_seconds(job),
        "settings": settings_of(cfg, args),
        "command": COMMAND,
    }
    if job["status"] != "succeeded":
        console.print(f"  [red]{job['status']}[/]: {json.dumps(job['error'])}")
        return row
    row["service_metrics"] = job["result"].get("metrics") or {}
    if cfg.tuned:
        row["trials"] = trials(client, job["id"])["items"]
    backbone = load_backbone(stack.job_output(job["id"]))
    row["per_task"] = bank.score(rows["test"], backbone)
    if cfg.tuned:
        # The service scored the published model on validation; so do we, as a cross-check.
        row["validation_independent"] = bank.score(rows["validation"], backbone)
        v = row["validation_independent"]
        row["validation_independent_avg"] = sum(v.values()) / len(v)
    mean = sum(row["per_task"].values()) / len(row["per_task"])
    console.print(f"  done in {row['wall_seconds']:.0f} s; test accuracy (mean) {mean:.1%}")
    return row


def order_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """base and experts first, then the CONFIGS order (runs added later slot in)."""
    rank = {cid: i for i, cid in enumerate(["base", "experts", *(c.id for c in CONFIGS)])}
    return sorted(rows, key=lambda r: rank.get(r["id"], len(rank)))


def commands(rows: list[dict[str, Any]]) -> list[str]:
    """The commands that produced the rows (rows of older runs carry none), then this one."""
    runs = [r["command"] for r in rows if r.get("command")]
    return list(dict.fromkeys([EXPERTS_COMMAND, *runs, COMMAND]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated ids (default: all): "
                        + ",".join(c.id for c in CONFIGS))  # fmt: skip
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--init-trials", type=int, default=8)
    parser.add_argument("--groups", default="layer_type")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--tune-samples", type=int, default=512, help="tuning.max_samples (rows per task)"
    )
    parser.add_argument("--gram-samples", type=int, default=256, help="statistics.max_samples")
    parser.add_argument("--eval-only", action="store_true", help="score base and experts only")
    parser.add_argument(
        "--from-partial",
        action="store_true",
        help="run nothing: rebuild the table and RESULTS.md from <cache>/results.partial.json "
        "(the rows an interrupted run finished)",
    )
    parser.add_argument(
        "--merge-partial",
        type=Path,
        action="append",
        default=[],
        help="with --from-partial: also take the rows of this JSON list (another cache's "
        "results.partial.json, or rows kept from an older run) whose ids are not in the "
        "partial file yet; repeatable",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the rows of <cache>/results.partial.json (base and experts scores included) "
        "and run only --methods, replacing rows with the same id",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: RESULTS.md here (none with --eval-only)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    by_id = {c.id: c for c in CONFIGS}
    asked = list(dict.fromkeys(filter(None, args.methods.split(","))))
    unknown = set(asked) - set(by_id)
    if unknown:
        raise SystemExit(f"unknown method ids {sorted(unknown)}")
    # In the order asked (the table keeps it), so the rows that matter most can run first.
    wanted = [by_id[i] for i in asked] if asked else CONFIGS
    started = datetime.now(UTC)
    t_start = time.monotonic()
    models = ensure_models()
    rows = {
        split: {t: read_jsonl(p[split]) for t, p in models.data.items()}
        for split in ("validation", "test")
    }
    partial = models.cache / "results.partial.json"
    keep = args.from_partial or (args.add and partial.is_file())
    if keep:
        replaced = {c.id for c in wanted} if not args.from_partial else set()
        table_rows: list[dict[str, Any]] = [
            r for r in json.loads(partial.read_text()) if r["id"] not in replaced
        ]
        for extra in args.merge_partial if args.from_partial else []:
            have = {r["id"] for r in table_rows}
            table_rows += [r for r in json.loads(extra.read_text()) if r["id"] not in have]
        table_rows = order_rows(table_rows)
    if not args.from_partial:
        bank = HeadBank(models.experts)
    if not keep:
        console.print("scoring the base encoder and the experts on the test files ...")
        table_rows = [
            {"id": "base", "label": "base (pretrained encoder)",
             "per_task": bank.score(rows["test"], load_backbone(models.base))},
            {"id": "experts", "label": "experts (each on its own task)",
             "per_task": bank.score(rows["test"])},
        ]  # fmt: skip
    if not args.eval_only and not args.from_partial:
        data_dir = models.cache / "service-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        with Stack(data_dir, [models.cache / "models"], models.cache / "crucible-up.log") as stack:
            client = stack.client(stack.create_key("bench"))
            ids: dict[str, dict[str, str]] = {}
            for task, paths in models.data.items():
                labels = list(TASKS[task])
                ids[task] = {
                    split: upload(client, paths[split], f"{task}-{split}", labels)["id"]
                    for split in ("train", "validation")
                }
            console.print(f"uploaded datasets: {json.dumps(ids)}")
            for cfg in wanted:
                table_rows.append(run_config(cfg, stack, client, models, ids, bank, rows, args))
                table_rows = order_rows(table_rows)
                partial.write_text(json.dumps(table_rows, indent=2, default=str))
    summarize(table_rows)
    results = {
        "commands": commands(table_rows),
        "machine": machine(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": time.monotonic() - t_start,
        "recipe": RECIPE,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "tasks": {
            t: {"labels": list(TASKS[t]), "rows": models.summary["experts"][t]["rows"]}
            for t in models.experts
        },
        "experts": models.summary["experts"],
        "rows": table_rows,
    }
    (models.cache / "results.json").write_text(json.dumps(results, indent=2, default=str))
    console.print(rich_table(table_rows, list(models.experts)))
    out = args.out or (None if args.eval_only else HERE / "RESULTS.md")
    if out is not None:
        write_markdown(results, out)
    console.print(f"wrote {out or 'no RESULTS.md'} and {models.cache / 'results.json'}")


if __name__ == "__main__":
    main()
