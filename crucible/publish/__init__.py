"""Publishing a merge: sharded safetensors, support files, manifest, model card.

`files` and `model_card` are torch-free; `writer` needs torch, so it is imported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShardedSafetensorsWriter"]


def __getattr__(name: str) -> Any:
    if name == "ShardedSafetensorsWriter":
        from crucible.publish.writer import ShardedSafetensorsWriter

        return ShardedSafetensorsWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
