"""Rows of an earlier run, rebuilt from the RESULTS.md it wrote (its results.partial.json is gone).

    python bench/quality/old_rows.py 73e1ff0 2026-11-23 ace,regmean > rows-2026-11-23.json
    python bench/quality/old_rows.py 40988d4 "2026-11-24 early" ta_0.3,tsv > early.json

Only valid when the experts are the same: the caller checks that the regenerated experts score
the same and that rows rerun now reproduce the old per-task accuracies. A per-task accuracy is
printed to 0.1% and every test file has fewer than 1000 rows, so k/n is recovered exactly as
round(p * n) / n. Labels get a "[<date> run]" suffix so the table shows where a row came from.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from tasks import TASKS

TEST_ROWS = [315, 327, 195, 252, 243]  # the Tasks table of RESULTS.md, in TASKS order
IDS = {
    "bmm activations (tuned)": "bmm_act_tuned",
    "task_arithmetic (tuned)": "ta_tuned",
    "bmm activations": "bmm_act",
    "bmm data-free": "bmm_df",
    "ace": "ace",
    "tsv": "tsv",
    "task_arithmetic (scale 0.3)": "ta_0.3",
    "task_arithmetic (scale 1.0)": "ta_1.0",
    "ties (density 0.2, scale 1.0)": "ties",
    "regmean": "regmean",
    "iso_cts": "iso_cts",
    "wudi": "wudi",
    "ties (density 0.2, tuned)": "ties_tuned",
}


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tuning(c: list[str]) -> dict[str, Any]:
    groups = re.fullmatch(r"(\d+) \((\w+)\)", c[2])
    assert groups, c
    return {
        "trials": int(c[1]),
        "group_count": int(groups[1]),
        "groups": groups[2],
        "default_validation": {"value": float(c[3]) / 100},
        "validation": {"value": float(c[4]) / 100},
        "seconds": {
            "per_trial_mean": {
                "merge": float(c[6]),
                "swap": float(c[7]),
                "evaluate": float(c[8]),
                "total": float(c[9]),
            }
        },
        "merge_and_swap_share": float(c[10]) / 100,
    }


def rebuild(markdown: str, date: str, only: set[str]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    section = ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
        c = cells(line) if line.startswith("| ") else []
        if not c or IDS.get(c[0]) not in only:
            continue
        cid = IDS[c[0]]
        r = rows.setdefault(
            cid,
            {"id": cid, "label": f"{c[0]} [{date} run]", "status": "succeeded", "error": None},
        )
        if section.startswith("Test accuracy"):
            r["per_task"] = {
                t: round(float(p) / 100 * n) / n
                for t, p, n in zip(TASKS, c[3:8], TEST_ROWS, strict=True)
            }
            r["wall_seconds"] = float(c[8])
        elif section.startswith("Tuning"):
            r["service_metrics"] = {"tuning": tuning(c)}
            r["validation_independent_avg"] = float(c[5]) / 100
        elif section.startswith("Jobs"):
            r["job_id"] = c[1]
            r["stages"] = {k: float(v) for k, v in (kv.rsplit(" ", 1) for kv in c[4].split(", "))}
    return list(rows.values())


def main() -> None:
    commit, date, ids = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
    markdown = subprocess.run(
        ["git", "show", f"{commit}:bench/quality/RESULTS.md"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    json.dump(rebuild(markdown, date, ids), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
