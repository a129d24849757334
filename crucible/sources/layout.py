"""Which 2-D weights are stored transposed (d_in x d_out) rather than in nn.Linear layout.

HF GPT-2 and its relatives use `Conv1D`, whose weight is (d_in, d_out): y = x W + b. The
matrix methods work in nn.Linear layout (merge-math.md section 0, "Orientation trap"), so the
pipeline transposes these weights before the method and back after it. The architecture is
read from the base's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

# model_type -> suffixes of the Conv1D weights of that architecture (transformers'
# modeling code: GPT2Attention c_attn/c_proj/q_attn, GPT2MLP c_fc/c_proj).
CONV1D_SUFFIXES: dict[str, tuple[str, ...]] = {
    model_type: (
        "attn.c_attn.weight",
        "attn.q_attn.weight",
        "attn.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    )
    for model_type in ("gpt2", "decision_transformer", "imagegpt")
}


def model_type(root: Path) -> str | None:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("model_type") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def transposed_weights(root: Path, names: list[str]) -> frozenset[str]:
    """The tensor names among `names` that hold Conv1D (d_in x d_out) weights."""
    suffixes = CONV1D_SUFFIXES.get(model_type(root) or "", ())
    return frozenset(n for n in names if n.endswith(suffixes))
