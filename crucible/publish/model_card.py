"""README.md for a merged model: Hub front matter, then what was merged and how.

Torch-free. Every user-supplied string (names, URIs, params) is escaped for Markdown tables,
and the spec block's fence is longer than any backtick run inside it, so a crafted name
cannot break the card's layout.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

import crucible
from crucible.sources.uri import parse_uri

_SECRET_KEY = re.compile(r"secret|token|password|authorization|api[_-]?key", re.IGNORECASE)


def _redact(value: Any) -> Any:
    # The spec should arrive without secrets already; this is a second lock on the door.
    if isinstance(value, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v is not None else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.split())  # newlines would end the table row


def _code(value: Any) -> str:
    text = _cell(value)
    if text == "-":
        return text
    return f"`{text}`" if "`" not in text else text


def _hub_repo(uri: str) -> str | None:
    try:
        parsed = parse_uri(uri)
    except ValueError:
        return None
    return parsed.target if parsed.scheme == "hf" else None


def _fenced(body: str, lang: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{body.rstrip()}\n{fence}"


def render_model_card(
    *,
    spec: dict[str, Any],
    inputs: list[dict[str, Any]],
    method: str,
    params: dict[str, Any],
    files: list[dict[str, Any]],
    report: dict[str, Any] | None = None,
    tuning: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Render README.md.

    inputs: [{"role": "base"|"expert", "name", "uri", "revision", "commit", "weight"}]
    files: [{"path", "sha256", "bytes"}] (the manifest, README excluded).
    report: the merge report (crucible.report.MergeReport.as_dict()), summarised.
    tuning: the tuning summary (crucible.tune.stage), when the params were tuned.
    lora: the LoRA output summary (crucible.adapter_merge), for output.format lora.
    metrics: the job's metrics; the scalar ones are listed (tuning and lora have sections).
    """
    base_models: list[str] = []
    for item in sorted(inputs, key=lambda i: i.get("role") != "base"):  # base first
        repo = _hub_repo(str(item.get("uri", "")))
        if repo and repo not in base_models:
            base_models.append(repo)
    front: dict[str, Any] = {}
    if base_models:
        front["base_model"] = base_models[0] if len(base_models) == 1 else base_models
    # The method as a tag too, so merges by one method can be found on the Hub.
    tags = ["merge", "crucible", str(method), *(["lora"] if lora is not None else [])]
    front["tags"] = list(dict.fromkeys(tags))
    front["library_name"] = "peft" if lora is not None else "transformers"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]

    n_experts = sum(1 for i in inputs if i.get("role") == "expert")
    what = "a LoRA adapter of the base" if lora is not None else "the base"
    lines += [
        "# Merged LoRA adapter" if lora is not None else "# Merged model",
        "",
        # The version too: a rerun of the same spec on another version may differ (e.g.
        # DARE's mask stream changed on 2026-11-24).
        f"Produced by Crucible {crucible.__version__}: {n_experts} "
        f"expert{'s' if n_experts != 1 else ''} merged into {what} with the "
        f"`{_cell(method)}` method.",
        "",
        "## Method",
        "",
        f"Method: `{_cell(method)}`",
        "",
    ]
    if params:
        lines += ["| parameter | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_code(v)} |" for k, v in sorted(params.items())]
    else:
        lines.append("No parameters (method defaults).")
    lines += [
        "",
        "## Inputs",
        "",
        "| role | name | URI | requested revision | resolved commit | weight |",
        "|---|---|---|---|---|---|",
    ]
    for item in inputs:
        weight = item.get("weight") if item.get("role") == "expert" else None
        lines.append(
            f"| {_cell(item.get('role'))} | {_cell(item.get('name'))} | {_code(item.get('uri'))}"
            f" | {_code(item.get('revision'))} | {_code(item.get('commit'))} | {_cell(weight)} |"
        )
    scalars = {
        k: v
        for k, v in (metrics or {}).items()
        if isinstance(v, str | int | float | bool) or v is None
    }
    if scalars:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(scalars.items())]
    if tuning is not None:
        lines += ["", *_tuning_section(tuning)]
    if lora is not None:
        lines += ["", *_lora_section(lora)]
    if report is not None:
        lines += ["", *_numerics_section(report)]
    spec_yaml = yaml.safe_dump(_redact(spec), sort_keys=False, allow_unicode=True)
    lines += ["", "## Merge spec", "", _fenced(spec_yaml, "yaml"), "", "## Files", ""]
    if files:
        lines += ["| path | bytes | sha256 |", "|---|---:|---|"]
        lines += [
            f"| {_cell(f.get('path'))} | {_cell(f.get('bytes'))} | {_code(f.get('sha256'))} |"
            for f in files
        ]
    else:
        lines.append("No files.")
    return "\n".join(lines) + "\n"


def _numerics_section(report: dict[str, Any]) -> list[str]:
    summary = report.get("summary", {})
    fallbacks = summary.get("fallbacks", [])
    ill = summary.get("ill_conditioned", [])
    lines = [
        "## Numerics",
        "",
        f"Computed on `{_cell(report.get('device'))}`. Per-module diagnostics of the method "
        f"({_cell(summary.get('modules_reported', 0))} modules) are in `merge_report.json`.",
        "",
        f"- Modules that needed a fallback solve: {len(fallbacks)}"
        + (f" ({', '.join(_code(n) for n in fallbacks[:10])})" if fallbacks else ""),
        f"- Ill-conditioned modules: {len(ill)}"
        + (f" ({', '.join(_code(n) for n in ill[:10])})" if ill else ""),
    ]
    mismatch = report.get("shape_mismatch")
    if isinstance(mismatch, dict):
        tensors = mismatch.get("tensors", {})
        lines.append(
            f"- Tensors whose shapes differ between models, not merged (policy "
            f"`{_cell(mismatch.get('policy'))}`): {', '.join(_code(n) for n in list(tensors)[:10])}"
        )
    return lines


def _lora_section(lora: dict[str, Any]) -> list[str]:
    def pct(value: Any) -> str:
        return f"{100 * float(value):.4g}%" if isinstance(value, int | float) else "-"

    return [
        "## LoRA output",
        "",
        f"Each merged module's ΔW was factored by a truncated SVD into B A with lora_alpha = r "
        f"(scaling 1); requested rank `{_cell(lora.get('rank'))}`, largest rank "
        f"{_cell(lora.get('max_rank'))} over {_cell(lora.get('modules'))} modules "
        f"({_cell(lora.get('modules_to_save'))} full modules_to_save tensors).",
        "",
        "| relative Frobenius error ‖ΔW - BA‖ / ‖ΔW‖ | value |",
        "|---|---:|",
        f"| worst module | {pct(lora.get('error_max'))} |",
        f"| mean over modules | {pct(lora.get('error_mean'))} |",
        "",
        "Per-module ranks and errors are in `merge_report.json`.",
    ]


def _score(block: Any) -> str:
    if not isinstance(block, dict) or block.get("value") is None:
        return "-"
    return f"{float(block['value']):.4f}"


def _tuning_section(tuning: dict[str, Any]) -> list[str]:
    metric = _cell(tuning.get("metric"))
    lines = [
        "## Tuning",
        "",
        f"Hyperparameters tuned by Bayesian optimisation ({_cell(tuning.get('trials'))} trials, "
        f"groups `{_cell(tuning.get('groups'))}`, {_cell(tuning.get('group_count'))} groups) "
        f"on the validation split; the best trial (#{_cell(tuning.get('best_trial'))}) is the "
        "published model, scored once on the held-out test split. Per-trial records: "
        "`GET /v1/merges/{id}/trials`.",
        "",
        f"| split | {metric} |",
        "|---|---:|",
        f"| validation, method defaults (trial 0) | {_score(tuning.get('default_validation'))} |",
        f"| validation, best trial | {_score(tuning.get('validation'))} |",
        f"| test, published model | {_score(tuning.get('test'))} |",
    ]
    test = tuning.get("test")
    per_task = test.get("per_task") if isinstance(test, dict) else None
    if per_task:
        experts = (tuning.get("experts_test") or {}).get("per_task", {})
        lines += ["", f"| task | test {metric} | expert's own |", "|---|---:|---:|"]
        for task, value in per_task.items():
            own = experts.get(task)
            own_cell = f"{float(own):.4f}" if own is not None else "-"
            lines.append(f"| {_cell(task)} | {float(value):.4f} | {own_cell} |")
    return lines
