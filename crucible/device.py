"""Where the merge math runs: CRUCIBLE_DEVICE=auto|cpu|cuda. Storage stays on the CPU."""

from __future__ import annotations

import torch

from crucible.errors import CrucibleError


def compute_device(setting: str) -> torch.device:
    """The torch device for the math; `auto` takes CUDA when this worker has a GPU."""
    choice = setting.strip().lower()
    if choice == "cpu":
        return torch.device("cpu")
    if choice in ("cuda", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if choice == "auto":
            return torch.device("cpu")
        raise CrucibleError(
            "device_unavailable",
            "CRUCIBLE_DEVICE=cuda but this worker sees no CUDA GPU; run it on a GPU machine "
            "or set CRUCIBLE_DEVICE=auto",
            {"device": setting},
        )
    raise CrucibleError(
        "bad_setting",
        f"CRUCIBLE_DEVICE={setting!r} is not one of auto, cpu, cuda",
        {"device": setting},
    )
