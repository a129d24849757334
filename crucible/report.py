"""The job's merge report: per-module diagnostics of the method, and job-level facts.

Stored with the job (result.report) and written as merge_report.json next to the model
card, so a fallback solve or an ill-conditioned module is visible after the fact.
"""

from __future__ import annotations

import math
from typing import Any

REPORT_FILE = "merge_report.json"


def json_safe(value: Any) -> Any:
    """Diagnostics as strict JSON: non-finite floats become the strings 'inf'/'-inf'/'nan'
    (PostgreSQL's JSON refuses them), tuples become lists, other objects their str()."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)


class MergeReport:
    def __init__(self, method: str, device: str) -> None:
        self.method = method
        self.device = device
        self.modules: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def add_module(self, tensor: str, diagnostics: dict[str, Any]) -> None:
        if diagnostics:
            self.modules.append({"tensor": tensor, **json_safe(diagnostics)})

    def note(self, key: str, value: Any) -> None:
        self.facts[key] = json_safe(value)

    def fallbacks(self) -> list[str]:
        return [m["tensor"] for m in self.modules if "fallback" in m]

    def ill_conditioned(self) -> list[str]:
        return [m["tensor"] for m in self.modules if m.get("ill_conditioned")]

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "device": self.device,
            "summary": {
                "modules_reported": len(self.modules),
                "fallbacks": self.fallbacks(),
                "ill_conditioned": self.ill_conditioned(),
            },
            **self.facts,
            "modules": self.modules,
        }
