"""Evaluation of merged models (worker side): evaluators built once from the base, merged
weights swapped in place between trials.

Submodules import torch; this package's top level stays light (the API never imports it,
but cheap imports keep it that way).
"""

from crucible.evaluate.base import EvalResult, Evaluator, Split
from crucible.evaluate.factory import build_evaluator

__all__ = ["EvalResult", "Evaluator", "Split", "build_evaluator"]
