"""Where the merge math runs: CRUCIBLE_DEVICE=auto|cpu|cuda. Storage stays on the CPU."""

from __future__ import annotations

from typing import Literal

import torch

from crucible.errors import CrucibleError


def compute_device(setting: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """The torch device for the math; `auto` takes CUDA when this worker has a GPU.
    (Settings has already refused any other value.)"""
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "auto":
        return torch.device("cpu")
    raise CrucibleError(
        "device_unavailable",
        "CRUCIBLE_DEVICE=cuda but this worker sees no CUDA GPU; run it on a GPU machine "
        "or set CRUCIBLE_DEVICE=auto",
        {"device": setting},
    )
