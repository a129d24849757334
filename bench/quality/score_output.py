"""Score one merged output folder the way run.py scores a job's output: the merged encoder
under each expert's own head, on the test and validation files of the cached tasks.

    .venv/bin/python bench/quality/score_output.py <service data>/artifacts/jobs/<job id>/output

For a job whose run.py driver did not survive (run.py scores only the jobs it submitted).
Prints test and validation accuracy per task, their means and the normalized test accuracy
(merged / the expert's own, averaged over tasks) as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from make_experts import ensure_models
from scoring import HeadBank, load_backbone
from tasks import read_jsonl


def main(out: Path) -> dict[str, object]:
    models = ensure_models()
    rows = {
        split: {t: read_jsonl(p[split]) for t, p in models.data.items()}
        for split in ("validation", "test")
    }
    bank = HeadBank(models.experts)
    backbone = load_backbone(out)
    test = bank.score(rows["test"], backbone)
    val = bank.score(rows["validation"], backbone)
    experts = json.loads((models.cache / "experts.json").read_text())["experts"]
    norm = [test[t] / experts[t]["test_accuracy"] for t in test]
    return {
        "test": test,
        "validation": val,
        "test_avg": sum(test.values()) / len(test),
        "validation_avg": sum(val.values()) / len(val),
        "normalized": sum(norm) / len(norm),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
